"""What each workflow is doing, as the orchestrators' state says: the state topics (state.orchestrator, and a split
orchestrator's state.orchestrator-security...) read from the beginning, or followed (each look reads only what was
written since); one workflow found by its id or a beginning of it; a workflow as one object of one vocabulary
(workflows.py list --json, the console's API), with why it is stuck as data. Joins no group, commits nothing."""

import json
import sys
import time
from datetime import datetime
from typing import NamedTuple, TypedDict

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from common import (SETTINGS, WORKFLOW, Latest, Settings, changelog, is_workflow, latest_entries, not_retriable,
                    orchestrator_groups, read_from)
from orchestrator import WORKFLOWS

WORKFLOW_KEY = WORKFLOW.encode()


class Located(NamedTuple):
    partition: int        # of the state topic that holds it (and of the topics its events come on)
    workflow: dict        # the workflow, as its state entry holds it
    raw: bytes            # its entry as stored (the trace context of the record that wrote it last: trace_of)


def located(settings=SETTINGS, quiet: bool = False, entries: dict | None = None,
            checked: dict | None = None) -> dict[str, Located]:
    """Every workflow, by id, with where its state is (quiet: entries set aside are not said). `entries`: the state
    as latest_entries gives it, if read already (the console follows it). `checked`: what an earlier call found of
    each entry, kept by the caller (then only an entry that changed since is checked again)."""
    cutoff, found, unreadable = time.time() - settings.state_retention_s, {}, []
    entries = latest_entries(orchestrator_groups(WORKFLOWS), settings) if entries is None else entries
    checked = {} if checked is None else checked
    for slot, (at, _, raw, value) in entries.items():
        partition, key = slot
        if at < cutoff or not key.startswith(WORKFLOW_KEY):
            continue
        kept = checked.get(slot)
        if kept is None or kept[0] is not raw:
            workflow_id = key.decode(errors="replace").removeprefix(WORKFLOW)
            kept = checked[slot] = (raw, workflow_id, Located(partition, value, raw) if is_workflow(WORKFLOWS, value)
                                    else None)
        if kept[2] is None:
            unreadable.append(kept[1])
        else:
            found[kept[1]] = kept[2]
    for gone in checked.keys() - entries.keys():
        del checked[gone]
    if unreadable and not quiet:
        print(f"workflows: {len(unreadable)} entr{'y' if len(unreadable) == 1 else 'ies'} of the state set aside as "
              f"unreadable, e.g. {unreadable[0]}: what each held is lost (the orchestrator dead-letters it, or else the next "
              f"event of its workflow; see dead_letters.py list)",
              file=sys.stderr)
    return found


def trace_of(raw: bytes) -> str | None:
    """The trace context a stored entry keeps (tracing on), or None."""
    trace = json.loads(raw).get("trace")
    return trace if isinstance(trace, str) else None


class NotFound(LookupError):
    """No workflow, or more than one, has the id asked for (the text says which)."""


def one(found: dict, wanted: str) -> str:
    """The id of the one workflow `wanted` names (its id, or a beginning of 8 or more characters only it has)."""
    matches = [w for w in found if w == wanted or (len(wanted) >= 8 and w.startswith(wanted))]
    if not matches and len(wanted) < 8 and (begin := sum(w.startswith(wanted) for w in found)):
        raise NotFound(f"{wanted!r} is too short: give the whole id, or 8 characters or more ({begin} "
                       f"{'workflow begins' if begin == 1 else 'workflows begin'} so)")
    if len(matches) != 1:
        raise NotFound(f"{len(matches) or 'no'} workflows have an id {wanted!r}"
                         f"{' or starting so' if len(wanted) >= 8 else ' (give the whole id, or 8 characters or more)'}"
                         f"{': ' + ', '.join(sorted(matches)[:5]) if matches else ''}")
    return matches[0]


class Stuck(TypedDict):
    """Why a workflow is stuck: the step awaited (routed: not yet routed), who should answer, since when."""
    step: str
    service: str
    since: str | None
    why: str


class Row(TypedDict):
    """A workflow as every view shows it (workflows.py list --json and show --json, the console's API): its state in
    one vocabulary (the orchestrator's, STATES; or, before it routed one, waiting or dead_lettered), why it is stuck
    as data (None: it is not), its steps in the order they were sent."""
    workflow_id: str
    type: str
    state: str
    retries: int
    stage: int | None
    started_at: str | None
    finished_at: str | None
    retry_refused: str | None
    steps: list[dict]
    stuck: Stuck | None


def summary(workflow: dict, sla: float = 5.0, now: float | None = None) -> Row:
    """One workflow as show --json prints it: its steps in the order they were sent, each with what it follows and
    the answers that came too late to change it (an outcome after its time limit; a service's word that it did not
    act on a command read after its deadline); why it cannot be retried now, if it cannot; why it is stuck (a step
    awaited longer than `sla` seconds), if it is."""
    defined = {step.name: step for step in WORKFLOWS[workflow["type"]].steps}
    return Row(workflow_id=workflow["workflow_id"], type=workflow["type"], state=workflow["state"],
               retries=workflow.get("retries", 0), stage=workflow["stage"], started_at=stamp(workflow["started_at"]),
               finished_at=stamp(workflow["finished_at"]), retry_refused=not_retriable(workflow, defined),
               steps=[{"name": name, "state": step["state"], "attempts": step["attempts"],
                       "sent_at": stamp(step["sent_at"]), "finished_at": stamp(step["finished_at"]),
                       "deadline": stamp(step["deadline"]), "follows": step.get("after") or follows(defined.get(name)),
                       "late": [{"type": type_, "at": stamp(at), "meaning": meaning(type_, defined.get(name))}
                                for type_, at in step.get("late", ())]}
                      for name, step in workflow["steps"].items()],
               stuck=stuck_of(workflow, sla, time.time() if now is None else now))


def stuck_of(workflow: dict, sla: float, now: float) -> Stuck | None:
    """Why a running workflow is stuck, as data, or None: its first step still awaited `sla` seconds after it was
    sent (a retry sends it again), and the service that should answer it."""
    if workflow["state"] != "running":
        return None
    defined = {step.name: step for step in WORKFLOWS[workflow["type"]].steps}
    for name, step in workflow["steps"].items():
        if step["state"] == "pending" and now - step["sent_at"] > sla:
            service = defined[name].service if name in defined else "?"
            return Stuck(step=name, service=service, since=stamp(step["sent_at"]),
                         why=f"no '{name}' from {service} since {clock(stamp(step['sent_at']))}")
    return None


def stuck_among(found: dict[str, Located], sla: float, now: float):
    """A test of whether the workflow of an id is stuck now (what views.search.Index.find asks of a running one)."""
    return lambda workflow_id: stuck_of(found[workflow_id].workflow, sla, now) is not None


def meaning(type_: str, step) -> str:
    """What an answer that came late says of its step's action."""
    if type_ == "command_expired":
        return "not acted on: its service read it after its deadline"
    return "done after all" if step is not None and type_ in step.done else "answered late"


def follows(step) -> str:
    """What a step follows, said: "" for one sent as its workflow starts (or one the table no longer has)."""
    if step is None or not step.after:
        return ""
    return f"{' or '.join(step.after)} {step.when}"


def stamp(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="milliseconds")


def clock(iso: str | None) -> str:
    return "-" if iso is None else iso[11:23]


class Following:
    """The orchestrators' state topics, followed: each look reads only what was written since the last (workflows.py
    reads them whole each time)."""

    def __init__(self, settings: Settings):
        self.settings, self.latest = settings, Latest()
        self.groups = {settings.topic(changelog(group)): group for group in orchestrator_groups(WORKFLOWS)}
        for group in self.groups.values():  # (in workflows.py's order: on a tie, the same entry wins)
            self.latest.kept[group] = {}
        self.consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False,
                                      isolation_level="read_committed")
        self.next: dict[TopicPartition, int | None] = {}  # where the last look ended (None: the beginning)

    def entries(self) -> dict:
        """The state now, as latest_entries gives it (a state topic made since is read from its beginning). A read
        that stalls ends in one line (common.read_from)."""
        wanted = [TopicPartition(t, p) for t in sorted(set(self.consumer.topics()) & set(self.groups))
                  for p in self.consumer.partitions_for_topic(t) or ()]
        end = self.consumer.end_offsets(wanted, timeout_ms=5000)
        if set(wanted) != set(self.next) or any((self.next[tp] or 0) > end[tp] for tp in wanted):
            for group in self.latest.kept:  # (a state topic made, or deleted and made again: all read anew)
                self.latest.kept[group] = {}
            self.next = dict.fromkeys(wanted)
        read: dict[str, list] = {}
        for record in read_from(self.consumer, self.next, "the orchestrators' state", timeout=5):
            read.setdefault(record.topic, []).append(record)
        for topic, records in read.items():
            self.latest.add(self.groups[topic], records)
        self.next = {tp: self.consumer.position(tp) for tp in wanted}
        return self.latest.entries()
