"""The read model the console keeps live: the topics tailed into a Flow by a thread of its own (the only one that uses
its Kafka clients), the orchestrators' state followed and indexed, and what the console's page and API ask of them:
the figures, one page of workflows found by a filter, one workflow with its messages, every workflow a filter finds.
A workflow the orchestrator has state of is as that state says; one it has not routed is as the topics say
(waiting, dead_lettered). When Kafka does not answer, the figures are kept and said to be old."""

import logging
import threading
import time

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from common import ANSWERS, FINISHED, REQUESTS, Settings, tracing
from orchestrator import WORKFLOWS
from views import flow, search, workflows
from views.search import PER_PAGE, Filter
from views.workflows import Following

log = logging.getLogger("console")
EVERY_S = 1.0  # how often the page is told what changed
LAG_EVERY_S = 2.0


class Watch:
    """The monitor's model of the topics, kept up to date by a thread of its own (the only one that uses its Kafka
    clients), and the orchestrators' state, read again at most once a second; requests read both under a lock."""

    def __init__(self, settings: Settings, sla: float):
        self.settings, self.sla, self.flow = settings, sla, flow.Flow(sla, settings)
        self.index, self.checked, self.unread, self.answered_at = search.Index(), {}, 1, time.time()
        self.tail, self.admin = flow.Tail(self.flow), KafkaAdminClient(**settings.kafka_config())
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.read, self.lag, self.problem = 0, {}, None
        self.state_lock, self.states, self.states_at, self.states_read = threading.Lock(), {}, 0.0, -1
        self.following = Following(settings)

    def run(self) -> None:
        lagged = 0.0
        while not self.stop.is_set():
            try:
                batches = self.tail.fetch(200)
                with self.lock:
                    self.tail.feed(batches)
                    self.read += sum(map(len, batches.values()))
                if time.monotonic() - lagged > LAG_EVERY_S:
                    lagged, lag, unread = time.monotonic(), self.tail.lag(self.admin), self.tail.unread()
                    with self.lock:
                        self.lag, self.unread = lag, self.unread if unread is None else unread
                        self.problem = self.stale() if unread is None else None
                        self.answered_at = self.answered_at if unread is None else time.time()
            except (KafkaError, SystemExit) as error:  # (the broker away, a right taken: said on the page)
                self.problem = f"reading the topics: {error}"
                self.stop.wait(1)
            except Exception as error:  # noqa: BLE001 -- a bug: said on the page and in the log, not a frozen page
                log.exception("console: reading the topics failed")
                self.problem = f"reading the topics failed: {type(error).__name__}: {error}"
                self.stop.wait(1)

    def stale(self) -> str:
        at = time.strftime("%H:%M:%S", time.localtime(self.answered_at))
        return f"Kafka does not answer: the figures are as of {at}, when it last did"

    def snapshot(self) -> dict:
        """What the page's live parts show: the flow, the totals, and a count that changes when anything was read;
        whether the topics are still being read to their end; a problem (Kafka away: since when the figures are)."""
        with self.lock:
            return {"read": self.read, "figures": self.flow.figures(), "lag": self.lag, "problem": self.problem,
                    "reading": self.unread, "answered_at": self.answered_at,
                    "rates": {name: round(rate, 1) for name, rate in self.flow.rates().items()}}

    def located(self) -> dict[str, workflows.Located]:
        """The workflows in the orchestrators' state (read again if the topics said something new, or a second old)."""
        with self.state_lock:
            if time.monotonic() - self.states_at > EVERY_S or self.states_read != self.read:
                self.states_read = self.read
                self.states = workflows.located(self.settings, quiet=True, entries=self.following.entries(),
                                                checked=self.checked)
                self.states_at = time.monotonic()
            return self.states

    def listed(self, wanted: Filter, page: int, per_page: int = PER_PAGE) -> dict:
        """One page of the workflows the filter finds, newest first, as workflows.py list --json prints them (each
        with why it is stuck, as data, or None); and the total. A workflow the orchestrator has state of is as that
        state says; one whose first event the topics show but no orchestrator has routed is "waiting" (or
        "dead_lettered": its event is a dead letter). While the topics are still being read to their end, a waiting
        one is not called stuck."""
        found, ids, now = self.many(wanted)
        routed = [(found[w].workflow["started_at"], w) for w in ids]
        with self.lock:
            before = {w: self.before(w, kind, now) for w, kind in self.flow.kind.items() if w not in found}
        unrouted = [(row["started"], w) for w, row in before.items()
                    if wanted.holds(search.Facts(row["started"], w, row["type"], row["state"], frozenset()),
                                    row["stuck"] is not None)]
        ids, pages = search.paged([w for _, w in sorted(routed + unrouted, reverse=True)], page, per_page)
        rows = [workflows.summary(found[w].workflow, self.sla, now) if w in found else waiting_row(w, before[w])
                for w in ids]
        return pages | {"rows": rows, "reading": self.unread > 0, "actionable": len(routed)}  # (a request needs state)

    def before(self, workflow_id: str, kind: str, now: float) -> dict:
        """What the topics say of a workflow no orchestrator has state of (under the lock)."""
        state, stuck = self.flow.status(workflow_id, now)
        started = self.flow.times[workflow_id].get(WORKFLOWS[kind].starts_with, now)
        if stuck is not None and (self.unread > 0 or state != "waiting"):
            stuck = None  # (still reading: it may have been routed; or routed, and its state not read yet)
        return {"state": state, "type": kind, "started": started,  # (an ended one: its state entry expired)
                "stuck": stuck}

    def many(self, wanted: Filter) -> tuple[dict[str, workflows.Located], list[str], float]:
        """The orchestrators' state now, the ids in it the filter finds (newest first: a request can be made about
        each), and when that was."""
        found, now = self.located(), time.time()
        with self.state_lock:
            self.index.update(found)
            return found, self.index.find(wanted, workflows.stuck_among(found, self.sla, now)), now

    def shown(self, wanted: str) -> dict:
        """workflows.py show --json's object, with its state entry, its messages in Kafka's order and its trace."""
        found, now = self.located(), time.time()
        with self.lock:
            waiting = {w: waiting_row(w, self.before(w, kind, now)) for w, kind in self.flow.kind.items()
                       if w not in found}
        workflow_id = workflows.one({**waiting, **found}, wanted)  # (one the orchestrator has not routed yet, too)
        _, rows = flow.messages_of(workflow_id, self.settings)
        shown = workflows.summary(found[workflow_id].workflow, self.sla, now) if workflow_id in found \
            else waiting[workflow_id]
        return shown | {
            "entry": found[workflow_id].workflow if workflow_id in found else None,
            "trace": tracing.zipkin_trace(workflows.trace_of(found[workflow_id].raw)) if workflow_id in found else None,
            "messages": [{"at": at, "topic": topic, "type": m.type, "source": m.source, "id": m.id, "repeat": repeat,
                          "note": note(m)} for at, topic, m, repeat in rows]}


def waiting_row(workflow_id: str, before: dict) -> workflows.Row:
    """A workflow the topics show but no orchestrator has routed, as every view shows a workflow."""
    return workflows.Row(workflow_id=workflow_id, type=before["type"], state=before["state"], retries=0, stage=None,
                         started_at=workflows.stamp(before["started"]), finished_at=None, steps=[],
                         retry_refused=None, stuck=before["stuck"])


def note(message) -> str:
    """What a person's request and its answer say (who, why, what was done), for the workflow's history."""
    said = message.payload
    if message.type in REQUESTS:
        return f"{said.get('by')}: {said.get('reason')}"
    return str(said.get("detail", "")) if message.type in ANSWERS + FINISHED else ""
