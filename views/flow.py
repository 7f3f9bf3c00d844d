"""What the topics say about the flow and about each workflow: every project topic read from the beginning (joins no
group, commits nothing) into a Flow, which keeps when each message type of each workflow appeared (Kafka's record
times), the rates, the duplicates, the dead letters; and one workflow's messages in the order Kafka got them. The
monitor, the console and the demo read it."""

import base64
import math
import random
import re
import time
from array import array
from collections import Counter, OrderedDict, defaultdict, deque

from kafka import KafkaAdminClient, KafkaConsumer
from kafka.errors import AuthorizationError, KafkaError
from kafka.structs import TopicPartition
from pydantic import ValidationError

from common import (DEAD_LETTER, FINISHED, SETTINGS, Envelope, Settings, ensure_topics, family_of, first_steps, group_for,
                    read_all, refused, replaced, resumed, services, single_writer_topics, topics)
from orchestrator import WORKFLOWS
from views.workflows import Stuck, clock, stamp


TOPICS = topics(WORKFLOWS)  # every topic of the application: what the monitor reads

ENDED = ("completed", "failed", "cancelled")  # a workflow's states once the orchestrator has ended it

VERDICTS = {"workflow_cancelled": "cancelled", "workflow_failed": "failed", "workflow_completed": "completed"}

SKEW_S = 60.0  # a message's created_at this far from its record time says its writer's clock is off


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def weighted(rows: list[tuple], test) -> int:
    """How many of (latency, state, weight) rows pass test(latency, state), each standing for `weight` workflows."""
    return round(sum(weight for latency, state, weight in rows if test(latency, state)))


def milestones(kind: str) -> list[tuple[str, set[str], str, bool]]:
    """A workflow's moments as the topics show them: (name, message types that mark it, the service that should
    bring it about, whether the workflow needs it to complete). Read from the orchestrator's definition: the steps
    sent as it starts (a step that follows another is sent only if route() says so; the orchestrator says when the
    workflow has ended)."""
    workflow = WORKFLOWS[kind]
    first = first_steps(workflow)
    marks = [(workflow.started, {workflow.starts_with}, workflow.source, True),
             ("routed", {first[0].command}, "orchestrator", True)]
    return marks + [(step.name, set(step.done + step.failed) or {step.command}, step.service, bool(step.done))
                    for step in first] + [("ended", set(FINISHED), "orchestrator", True)]


def groups() -> list[str]:
    """The consumer groups whose lag the monitor shows: the orchestrator's (whole and split) and each service's."""
    return [group_for(WORKFLOWS, set(WORKFLOWS)), *(group_for(WORKFLOWS, {name}) for name in WORKFLOWS),
            *services(WORKFLOWS)]


class Folded:
    """Workflows of one type that left the window: exact counts, and (start, latency, state) of each, or of a uniform
    random sample of `cap` of them once there are more (so memory stays bounded)."""

    STATES = ("unknown", "completed", "failed", "cancelled")  # (stored as their index; unknown: not known to have ended)

    def __init__(self, cap: int = 200_000):
        self.cap, self.count, self.completed, self.failed, self.cancelled = cap, 0, 0, 0, 0
        self.starts, self.latencies, self.states = array("d"), array("d"), array("b")

    def add(self, start: float, latency: float | None, state: str) -> None:
        """One workflow; latency None if not known (unfinished, or its times skewed)."""
        self.count += 1
        self.completed += state == "completed"
        self.failed += state == "failed"
        self.cancelled += state == "cancelled"
        row = (start, math.nan if latency is None else latency, self.STATES.index(state) if state in self.STATES else 0)
        if len(self.starts) < self.cap:
            for column, value in zip((self.starts, self.latencies, self.states), row, strict=True):
                column.append(value)
        elif (slot := random.randrange(self.count)) < self.cap:
            self.starts[slot], self.latencies[slot], self.states[slot] = row

    def rows(self, since: float) -> tuple[list[tuple[float | None, str]], float]:
        """(latency or None, state) of the kept workflows started since `since`, and how many each row stands for."""
        rows = [(None if math.isnan(latency) else latency, self.STATES[state])
                for start, latency, state in zip(self.starts, self.latencies, self.states, strict=True) if start >= since]
        return rows, max(1.0, self.count / max(1, len(self.starts)))


class Flow:
    """What the topics say about each workflow: when each message type of it appeared (Kafka's record time, epoch s).
    Pure bookkeeping: add() what was read, then ask; Tail below does the reading. Memory is bounded: the newest
    `window` workflows are kept message by message, older finished ones only as counts (Folded)."""

    def __init__(self, sla: float = 5.0, settings: Settings = SETTINGS, window: int = 50_000):
        self.sla, self.settings, self.window = sla, settings, window
        self.kind: dict[str, str] = {}                       # workflow id -> "security" | "unit" | ... (the window)
        self.times: dict[str, dict[str, float]] = defaultdict(dict)  # workflow id -> message type -> first seen
        self.seen: OrderedDict[tuple[str, str], None] = OrderedDict()  # recent (topic, id), to spot duplicates
        self.duplicates = 0                                   # the same effect twice (an outcome, a delivery)
        self.resent = 0                                       # a command sent again (a timeout's retry, a re-route)
        self.timeouts: dict[str, int] = defaultdict(int)      # workflow id -> its steps' timeouts (step_timed_out)
        self.timeouts_total = 0
        self.followed: dict[str, int] = defaultdict(int)      # workflow id -> commands of steps that followed a step
        self.retried: dict[str, tuple[float, str]] = {}       # workflow id -> (its last retry's time, the step retried)
        self.again: dict[str, dict[str, float]] = defaultdict(dict)  # workflow id -> type -> when last seen, if later
        self.followed_total = 0
        self.commands = {step.topic for workflow in WORKFLOWS.values() for step in workflow.steps}
        self.arrivals: dict[str, deque] = defaultdict(deque)  # topic -> recent arrival times, for rates
        self.dead_letters, self.last_reason = 0, "-"
        self.lettered: dict[str, None] = {}                   # workflows an original of a dead letter belongs to
        self.folded: dict[str, Folded] = defaultdict(Folded)  # kind -> the workflows that left the window
        self.unknown_fate = 0                                 # left the window before they finished
        self.gone: OrderedDict[str, None] = OrderedDict()     # recent workflows that left the window (late messages
        # of theirs are not a new workflow)
        self.next_fold = int(window * 1.2)
        self.starts = {workflow.starts_with: name for name, workflow in WORKFLOWS.items()}
        self.skewed: set[str] = set()                         # workflows with a message whose created_at is skewed
        self.skew = 0                                         # messages whose created_at is over SKEW_S from Kafka's

    def add(self, topic_name: str, message: Envelope, at: float | None = None) -> None:
        """A message read, with its record time (`at`, epoch seconds; without it, its created_at is trusted)."""
        family = family_of(topic_name.removeprefix(self.settings.topic_prefix))
        if family == DEAD_LETTER:
            self.dead_letters += 1
            self.last_reason = str(message.payload.get("reason", "(no reason given)"))[:200]
            if (original := lettered(message)) is not None:
                self.lettered[original] = None  # (its starting event, if never routed, is dead-lettered: status())
            return
        first = (topic_name, message.id) not in self.seen
        if not first and message.type not in self.starts:  # (a replayed event: no effect)
            if topic_name.removeprefix(self.settings.topic_prefix) in self.commands:
                self.resent += 1  # (same id: a service that acted on it ignores it)
            else:
                self.duplicates += 1  # an outcome, a delivery, a workflow's end: an effect twice
        if message.type == "step_timed_out":
            self.timeouts[message.workflow_id] += 1
            self.timeouts_total += 1
        if first and message.cause_id not in (None, message.workflow_id) and \
                topic_name.removeprefix(self.settings.topic_prefix) in self.commands:  # (caused by an outcome)
            self.followed[message.workflow_id] += 1
            self.followed_total += 1
        self.seen[(topic_name, message.id)] = None
        if len(self.seen) > 8 * self.window:
            self.seen.popitem(last=False)
        if message.workflow_id in self.gone:
            return
        if message.type in self.starts:
            self.kind[message.workflow_id] = self.starts[message.type]
        written = message.created_at.timestamp()
        if at is not None and first and abs(written - at) > SKEW_S:  # (a replay or a re-sent command is sent later)
            self.skew += 1
            self.skewed.add(message.workflow_id)
        if message.type == "workflow_retried":  # (its step runs again: see standing())
            when = written if at is None else at
            if when >= self.retried.get(message.workflow_id, (0.0, ""))[0]:
                self.retried[message.workflow_id] = (when, str(message.payload.get("step", "")))
        when, times = written if at is None else at, self.times[message.workflow_id]
        if first and when > times.setdefault(message.type, when):  # (a type seen again under a new id: a retried step's
            self.again[message.workflow_id][message.type] = when  # report, the workflow's end again; see standing())
        if len(self.times) > self.next_fold:
            self.fold()
            self.next_fold = len(self.times) + self.window // 5  # (a scan every window/5 adds at most)

    def standing(self, workflow: str) -> dict[str, float]:
        """What the topics said of a workflow, as it stands: after a person's retry, the retried step's failure (and
        a first step's report) and the workflow's end from before it count no more (the step reports again, the
        workflow ends again). Asked of the record times, so it holds whatever order the topics were read in (the
        monitor reads them side by side)."""
        times = self.times.get(workflow, {})
        if workflow not in self.retried or workflow not in self.kind:
            return times
        times = {**times, **self.again.get(workflow, {})}  # (after a retry, what was said last counts)
        retried_at, name = self.retried[workflow]
        workflow_ = WORKFLOWS[self.kind[workflow]]
        first = {step.name for step in first_steps(workflow_)}  # (a later step's report may be an earlier one's too)
        again = {t for step in workflow_.steps if step.name == name
                 for t in step.failed + (step.done if name in first else ())} | {*FINISHED}
        return {t: at for t, at in times.items() if t not in again or at >= retried_at}

    def fold(self) -> None:
        """Fold the oldest finished workflows into the counts until the window holds `window`; past twice that,
        the oldest of any state go too (counted as of unknown fate)."""
        now, excess = time.time(), len(self.times) - self.window
        gone = [w for w in self.times if w in self.kind and self.verdict(w, now) in ENDED][:excess]
        if len(self.times) - len(gone) > 2 * self.window:
            gone += [w for w in list(self.times)[:excess] if w not in gone]
        for workflow in gone:
            if workflow in self.kind:
                state, latency = self.verdict(workflow, now), self.timed(workflow)
                kind = self.kind.pop(workflow)
                self.folded[kind].add(self.times[workflow][WORKFLOWS[kind].starts_with], latency, state)
                self.unknown_fate += state not in ENDED
            del self.times[workflow]
            self.gone[workflow] = None
            if len(self.gone) > 8 * self.window:
                self.gone.popitem(last=False)
            self.timeouts.pop(workflow, None)
            self.followed.pop(workflow, None)
            self.retried.pop(workflow, None)
            self.again.pop(workflow, None)
            self.skewed.discard(workflow)

    def step_times(self, workflow: str) -> list[tuple[str, float | None, str, bool]]:
        times = self.standing(workflow)
        return [(name, min((times[t] for t in types if t in times), default=None), service, needed)
                for name, types, service, needed in milestones(self.kind[workflow])]

    def failed(self, workflow: str) -> bool:
        """Whether it failed: the orchestrator said so, or a step reported a failure (a workflow with a failed step
        ends failed, once what follows the failure, a compensation say, is done)."""
        steps, times = WORKFLOWS[self.kind[workflow]].steps, self.standing(workflow)
        return "workflow_failed" in times or any(t in times for step in steps for t in step.failed)

    def verdict(self, workflow: str, now: float) -> str:
        """A workflow's state as it leaves the window: as the topics show it, or else the orchestrator's word on how
        it ended (the monitor reads the topics side by side, not in time order: a command may not be read yet)."""
        state, times = self.state(workflow, now), self.standing(workflow)
        said = [end for message, end in VERDICTS.items() if message in times]
        return state if state in ENDED or not said else said[0]

    def status(self, workflow: str, now: float) -> tuple[str, dict | None]:
        """A workflow's state in the views' one vocabulary, and why it is stuck as data (views.workflows.Stuck) or None.
        The orchestrator's last word on how it ended, once read, is its state; before, what the topics show: a failed
        step, every needed step done, or still running; "waiting" while no orchestrator has routed its first event,
        "dead_lettered" if that event is a dead letter. Stuck: running (or waiting) past the SLA since it began (again)."""
        times = self.standing(workflow)
        said = max(((at, end) for message, end in VERDICTS.items() if (at := times.get(message)) is not None),
                   default=None)
        if said is not None:
            return said[1], None
        if self.failed(workflow):
            return "failed", None
        steps = self.step_times(workflow)
        missing = [(name, service) for name, at, service, needed in steps if needed and at is None]
        if not missing:
            return "completed", None
        if steps[1][1] is None and workflow in self.lettered:  # (never routed: its event went to dead_letter)
            return "dead_lettered", None
        state = "running" if steps[1][1] is not None else "waiting"
        began = max(steps[0][1], self.retried.get(workflow, (0.0, ""))[0])  # (since it began, or began again)
        if now - began > self.sla:
            name, service = missing[0]
            why = f"no '{name}' from {service} since {clock(stamp(began))}" + \
                (" (its event waits in Kafka until an orchestrator routes it)" if state == "waiting" else "")
            return state, Stuck(step=name, service=service, since=stamp(began), why=why)
        return state, None

    def state(self, workflow: str, now: float) -> str:
        """status() in a word for the board: STUCK and why, when it is stuck."""
        state, stuck = self.status(workflow, now)
        return f"STUCK: no '{stuck['step']}' from {stuck['service']}" if stuck else state

    def completed(self, workflow: str) -> bool:
        return self.state(workflow, time.time()) == "completed"

    def latency(self, workflow: str) -> float | None:
        """End-to-end seconds from the starting event to its last needed step, once every needed step is done."""
        needed = [at for _, at, _, need in self.step_times(workflow) if need]
        if any(at is None for at in needed):
            return None
        return max(needed) - needed[0]

    def timed(self, workflow: str) -> float | None:
        """A workflow's latency for the percentiles: None while unknown, or if a writer's clock was off."""
        return None if workflow in self.skewed else self.latency(workflow)

    def counts(self) -> tuple[int, int]:
        """(workflows started, workflows completed), those out of the window included."""
        return (len(self.kind) + sum(f.count for f in self.folded.values()),
                sum(self.completed(w) for w in self.kind) + sum(f.completed for f in self.folded.values()))

    def figures(self) -> dict:
        """Every count, as `--once --json` prints it. A workflow that left the window unfinished counts as running."""
        now, folded = time.time(), self.folded.values()
        states = Counter("stuck" if stuck else "running" if state == "waiting" else state for state, stuck in
                         (self.status(w, now) for w in self.kind))
        workflows = {"started": self.counts()[0],
                     "completed": states["completed"] + sum(f.completed for f in folded),
                     "failed": states["failed"] + sum(f.failed for f in folded),
                     "cancelled": states["cancelled"] + sum(f.cancelled for f in folded),
                     "stuck": states["stuck"], "running": states["running"] + self.unknown_fate,
                     "dead_lettered": states["dead_lettered"]}
        return {"workflows": workflows, "duplicate_effects": self.duplicates, "resent_ignored": self.resent,
                "steps_timed_out": self.timeouts_total, "steps_followed": self.followed_total,
                "dead_letters": self.dead_letters, "clock_skew": self.skew}

    def sla_report(self, window: float | None = None) -> dict:
        """Per workflow type: completed and failed counts, p50/p95/p99 latency (s) of the completed ones and breaches
        (late, stuck or failed; a workflow a person cancelled is none). Past the Folded sample's cap, the figures of
        workflows out of the window are estimated from the sample."""
        now = time.time()
        since = float("-inf") if window is None else now - window
        report = {}
        for kind, definition in WORKFLOWS.items():
            rows = [(self.timed(w), self.state(w, now), 1.0) for w, k in self.kind.items()
                    if k == kind and self.times[w][definition.starts_with] >= since]
            sample, weight = self.folded[kind].rows(since)
            rows += [(lat, state, weight) for lat, state in sample]
            latencies = [lat for lat, state, _ in rows if state == "completed" and lat is not None]
            report[kind] = {"count": weighted(rows, lambda lat, state: True),
                            "completed": weighted(rows, lambda lat, state: state == "completed"),
                            "failed": weighted(rows, lambda lat, state: state == "failed"),
                            **{f"p{p}": round(percentile(latencies, p), 3) if latencies else None for p in (50, 95, 99)},
                            "sla_s": self.sla,
                            "breaches": weighted(rows, lambda lat, state: state not in ("completed", "running",
                                                                                           "cancelled") or
                                                 (state == "completed" and lat is not None and lat > self.sla))}
        return report

    def rates(self, seconds: float = 10.0) -> dict[str, float]:
        """Messages per second of each topic (a family's members together) over the last `seconds`."""
        since, counts = time.time() - seconds, dict.fromkeys(TOPICS, 0)
        for topic_name, arrivals in self.arrivals.items():
            while arrivals and arrivals[0] < since:
                arrivals.popleft()
            counts[family_of(topic_name.removeprefix(self.settings.topic_prefix))] += len(arrivals)
        return {name: count / seconds for name, count in counts.items()}


class Tail:
    """Reads every project topic from the beginning into a Flow (committed messages only; joins no group)."""

    def __init__(self, flow: Flow):
        self.flow, settings = flow, flow.settings
        admin = KafkaAdminClient(**settings.kafka_config())
        ensure_topics(admin, settings, single_writer_topics(WORKFLOWS))
        admin.close()
        # A pattern, so that a member of a family created later (a service started later) is read too.
        # Small fetches, so that reading a long history the topics stay in step (see read_to_end).
        self.consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, auto_offset_reset="earliest",
                                      isolation_level="read_committed", metadata_max_age_ms=1000,
                                      max_partition_fetch_bytes=16 * 1024)
        self.consumer.subscribe(pattern=settings.pattern(TOPICS))
        self.last_read: dict[TopicPartition, int] = {}  # partition -> timestamp (ms) of the last record read
        self.last_offset: dict[TopicPartition, int] = {}  # partition -> offset of the last record read

    def poll(self, timeout_ms: int = 200) -> None:
        self.feed(self.fetch(timeout_ms))

    def fetch(self, timeout_ms: int = 200) -> dict:
        """The records read since the last fetch (the Flow not yet told: the console tells it under its lock)."""
        try:
            return self.consumer.poll(timeout_ms=timeout_ms)
        except AuthorizationError as error:  # a user who may not read every topic: one line, not a traceback
            raise refused("monitor", error, self.flow.settings) from None

    def feed(self, batches: dict) -> None:
        """Tell the Flow what was read."""
        for partition, records in batches.items():
            self.last_read[partition], self.last_offset[partition] = records[-1].timestamp, records[-1].offset
            arrivals = self.flow.arrivals[records[0].topic]
            for record in records:
                arrivals.append(record.timestamp / 1000)  # when Kafka got it
                try:
                    message = Envelope.model_validate_json(record.value)
                except ValidationError:  # junk on an input topic: the service reading it dead-letters it
                    continue
                self.flow.add(record.topic, message, record.timestamp / 1000)
            while arrivals and arrivals[0] < arrivals[-1] - 10:  # only the last 10 s count for rates
                arrivals.popleft()

    def read_to_end(self, stop=None) -> bool:
        """Read everything on the topics now (for --once and reports); False if stopped before the end."""
        pattern = self.flow.settings.pattern(TOPICS)
        topics = {topic for topic in self.consumer.topics() if re.match(pattern, topic)}  # (every topic there is now)
        while not topics <= {partition.topic for partition in self.consumer.assignment()}:
            if stop:
                return False
            self.poll()
        end = self.consumer.end_offsets(list(self.consumer.assignment()))
        while behind := {p: self.last_read.get(p, 0) for p, offset in end.items() if self.consumer.position(p) < offset}:
            if stop:
                return False
            self.in_step(behind)
            self.poll()
        resumed(self.consumer, list(self.consumer.assignment()))
        return True

    def in_step(self, behind: dict) -> None:
        """Read the partitions in step by record time (pausing those more than 0.2 s ahead of the slowest), so that
        a workflow's messages on its several topics are read together and the Flow's window need not hold the gap."""
        slowest = min(behind.values())
        ahead = [p for p, at in behind.items() if at > slowest + 200]
        self.consumer.pause(*ahead)
        resumed(self.consumer, [p for p in behind if p not in ahead])

    def wait(self, condition, timeout: float) -> bool:
        """Keep reading until condition() holds or timeout seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if condition():
                return True
        return condition()

    def lag(self, admin: KafkaAdminClient) -> dict[str, int] | str:
        """Messages each known group still has to read, summed over its partitions; or why that is not known now
        (the broker away: the view goes on with what it read)."""
        try:
            end = self.consumer.end_offsets(list(self.consumer.assignment()), timeout_ms=2000)
        except KafkaError as error:
            return f"not known now: Kafka does not answer ({type(error).__name__})"
        names = {group: self.flow.settings.group(group) for group in groups()}
        try:
            offsets = admin.list_group_offsets({real: None for real in names.values()})
            gone = replaced(admin, WORKFLOWS, self.flow.settings)  # (split off or joined back: its lag only grows)
        except KafkaError:  # no group coordinator yet (a brand-new cluster): no lag to show
            return {}
        try:
            return {group: sum(self.behind(tp, meta.offset, end) for tp, meta in offsets[real].items())
                    for group, real in names.items() if offsets.get(real) and group not in gone}
        except KafkaError as error:
            return f"not known now: Kafka does not answer ({type(error).__name__})"

    def unread(self) -> int | None:
        """Records on the topics this Tail has still to read (0: it has read to their end); None if Kafka does not
        answer now."""
        assigned = list(self.consumer.assignment())
        try:
            end = self.consumer.end_offsets(assigned, timeout_ms=2000) if assigned else {}
            return sum(max(0, end[tp] - (self.consumer.position(tp, timeout_ms=2000) or 0)) for tp in assigned) if assigned else 1
        except KafkaError:
            return None

    def behind(self, tp: TopicPartition, committed: int, end: dict) -> int:
        """Records a group has still to read on a partition: none once it is past the last record there (what
        follows is a transaction's commit marker, which takes an offset but is no message); else up to the end."""
        if committed > self.last_offset.get(tp, -1) and tp in self.consumer.assignment() and \
                self.consumer.position(tp) >= end.get(tp, 0):
            return 0
        return max(0, end.get(tp, 0) - committed)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def lettered(letter: Envelope) -> str | None:
    """The workflow of a dead letter's original, when the original is an envelope that says one (else None)."""
    try:
        return Envelope.model_validate_json(base64.b64decode(letter.payload.get("original_b64") or "")).workflow_id
    except (ValidationError, ValueError, TypeError):  # (not an envelope, or cut to fit)
        return None


def messages_of(wanted: str, settings: Settings = SETTINGS) -> tuple[set[str], list[tuple]]:
    """Every message on the topics of the workflows whose id starts with `wanted`, in the order Kafka got them: (the
    workflows' ids, rows of (Kafka's time in ms, topic, message, whether it repeats an id seen before on that topic:
    a re-sent command, a replayed event))."""
    found, quick = [], wanted.encode() if wanted.isascii() else b""
    for record in read_all(TOPICS, settings=settings):
        if quick not in (record.value or b""):  # (a quick look first: most records are another workflow's)
            continue
        try:
            message = Envelope.model_validate_json(record.value)
        except ValidationError:  # (junk has no workflow)
            continue
        if message.workflow_id.startswith(wanted):
            found.append((record.timestamp, record.topic.removeprefix(settings.topic_prefix), message))
    rows, seen = [], set()
    for at, topic, message in sorted(found, key=lambda row: row[0]):
        rows.append((at, topic, message, (topic, message.id) in seen))
        seen.add((topic, message.id))
    return {message.workflow_id for _, _, message in found}, rows
