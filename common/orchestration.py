"""A workflow's life in the orchestrator: each event is routed by the table's `route()`, at the stage its workflow
started under, and its workflow's entry (its steps in the order they were sent, their attempts and deadlines, how it
ended) is kept in the orchestrator's state, committed with the commands. Every command route() sends is a step the
table declares: one that starts the workflow, or one that follows another step done or failed (the next step, a
compensation); a command the table has no step for is a dead letter that says what to declare. A step is pending
until its report (the outcome names the command it answers), a time limit or a failure; a deadline passing becomes a
step_timed_out event, routed like any other; an answer that comes too late changes nothing. A workflow ends when no
step is pending: nothing more follows. Handed the table (WORKFLOWS) and `route`; it never imports orchestrator.py."""

import logging
import os
import time
from collections.abc import Callable

from common import metrics, operating
from common.handling import SEEN, is_repeat, mark
from common.changelog import unreadable
from common.messages import DeadLetter, Envelope, Output, caused_by
from common.settings import MESSAGE_STREAM
from common.state import State
from common.progress import Limits, Reported, advance, ended, next_deadline, noted, record, reported
from common.workflow import EXPIRED, FINISHED, REQUESTS, SOURCE, Table, command_topics, steps_by_name

log = logging.getLogger("orchestrator")
WORKFLOW = "workflow/"  # state key of a workflow, by its id
STATES = ("running", "completed", "failed", "cancelled")
CLOCK_SKEW_S = 5.0  # how far ahead a service's clock may be of the orchestrator's
LOADED = time.monotonic()
Route = Callable[[Envelope, int], list[Output]]  # route(event, stage): orchestrator.py's routing table


class Orchestration:
    """The orchestrator's handler and timer: routes events with the table, a new workflow at this orchestrator's
    stage of the walkthrough and each one in flight at the stage it started under, and keeps each workflow's state.
    `owned`: the workflows this orchestrator runs (the rest belong to a split one)."""

    def __init__(self, table: Table, route: Route, stage: int, limits: Limits | None = None,
                 owned: set[str] | None = None):
        self.table, self.route, self.stage, self.limits = table, route, stage, limits or Limits()
        self.owned = set(table) if owned is None else owned
        self.routed_any, self.followed = False, ""  # (followed: the steps the last event made follow, for its log line)
        # (the table asked once, not per event: which workflow each event type belongs to)
        self.commands, self.kind = command_topics(table), {}
        for name, workflow in table.items():
            for event_type in (workflow.starts_with, *(t for step in workflow.steps for t in step.done + step.failed)):
                self.kind.setdefault(event_type, name)
        self.starts = {workflow.starts_with for workflow in table.values()}
        self.handles = {*self.owned, None}  # (a type no workflow knows: route() dead-letters it)
        self.steps_done = {t for workflow in table.values() for step in workflow.steps for t in step.done}
        self.defined = steps_by_name(table)  # workflow -> step name -> Step

    def handle(self, event: Envelope, state: State) -> list[Output]:
        """The loop's handler: an event of this orchestrator's workflows, routed and its workflow kept."""
        if self.kind.get(event.type) not in self.handles:
            return []  # (another orchestrator's: it routes it)
        outputs = self.decide(event, state)
        if outputs is None:  # (handled before, or too late: said where it was found)
            return []
        self.count_routed(outputs, self.kind.get(event.type) or event.payload.get("workflow"))
        log.info("%s %s -> %s%s", event.type, event.workflow_id[:8],
                 ", ".join(m.type if t == MESSAGE_STREAM else t for t, m, *_ in outputs) or
                 ("its step is done; nothing follows" if event.type in self.steps_done else "nothing follows"),
                 self.followed)
        if outputs and not self.routed_any:  # (the restart gap, to read off by hand)
            self.routed_any = True
            log.info("first message routed %.2f s after this process started", process_age())
        return outputs

    def decide(self, event: Envelope, state: State, now: float | None = None) -> list[Output] | None:
        """Route an event and keep its workflow's state: the commands, plus workflow_completed/failed when it ends
        (or a person's request answered); None if it changes nothing (handled before, too late, another's)."""
        now, key, self.followed = now or time.time(), WORKFLOW + event.workflow_id, ""
        workflow = self.state_of_workflow(event, state)
        if self.skipped(event, state, workflow):
            return None
        if event.type in REQUESTS:
            if operating.owner(event, workflow) not in self.owned:
                return None  # (another orchestrator's workflow: it answers)
            outputs = self.requested(event, workflow, now)
        else:  # (the step it reports on, asked once)
            reported_ = self.reported(workflow, event) if workflow is not None and event.type != EXPIRED else None
            if why := self.late(event, workflow, reported_):  # (kept beside its step, but nothing follows: said here)
                self.say_late(event, workflow, why, now)
                outputs = None
            else:
                workflow, outputs = self.routed(event, state, workflow, reported_, now)
        # (a workflow's entry keeps the ids of its events; an event of no workflow, say an outcome after its
        # workflow expired, is kept on its own)
        if workflow is not None:
            workflow.setdefault("handled", {})[event.id] = mark(event)
            state.put(key, workflow, due=next_deadline(workflow))
        else:
            state.put(SEEN + event.id, mark(event))
        return outputs

    def routed(self, event: Envelope, state: State, workflow: dict | None, reported_: Reported | None,
               now: float) -> tuple[dict | None, list | None]:
        """An event routed by the table at its workflow's stage: (its workflow, started by it if it starts one;
        what it sends). `reported_`: the step it reports on (its workflow known). An outcome of a workflow unknown
        here sends nothing."""
        if workflow is None and event.type not in self.starts:
            if event.type in self.kind:
                self.say_unknown(event)
                return None, None  # (said there: nothing follows)
            return None, self.route(event, self.stage)  # (no route: a dead letter)
        if workflow is None:
            workflow, reported = self.started(event, None if state.key is None else
                                              state.key.decode(errors="surrogateescape"), now), (None, None)
        else:  # (an event of its workflow that reports on no step, say its end, has no step follow it)
            reported = reported_ or (None, "unreported")
        commands = [] if reported[1] == "removed" else self.route(event, workflow["stage"])
        advance(workflow, self.defined[workflow["type"]], reported, event, now, self.limits)
        sent = self.record(workflow, reported, event, commands, now)
        return workflow, sent + ended(workflow, event, now, SOURCE)

    def requested(self, event: Envelope, workflow: dict | None, now: float) -> list[Output]:
        """A person's request (cancel, retry), granted and routed by the table, or refused: with the answer. A
        cancel is also said to the services (revoked), so none acts on a command of the workflow it reads later."""
        why = operating.refusal(event, workflow, self.defined.get((workflow or {}).get("type"), {}))
        metrics.count("operator", request=event.type, outcome="refused" if why else "granted")
        if why is not None:
            log.warning("%s %s refused: %s", event.type, event.workflow_id[:8], why)
            return [operating.answer(event, workflow, "operator_request_refused", why)]
        if event.type == "workflow_cancel_requested":
            routed, done, answer, name = event, operating.cancel(workflow, now), "workflow_cancelled", ""
        else:
            name = operating.retriable(workflow)
            step = self.defined[workflow["type"]].get(name)
            limit = self.limits.of(step) if step else None
            routed, done = operating.retry(event, workflow, name, limit, now)
            answer = "workflow_retried"
        log.warning("%s %s by %s (%s): %s", event.type, event.workflow_id[:8], event.payload["by"],
                    event.payload["reason"], done)
        sent = self.record(workflow, (name or None, "requested"), routed, self.route(routed, workflow["stage"]), now)
        revoked = [operating.revocation(event)] if answer == "workflow_cancelled" else []
        return sent + revoked + [operating.answer(event, workflow, answer, done, name)]

    def state_of_workflow(self, event: Envelope, state: State) -> dict | None:
        """The state of an event's workflow (None: none kept); a dead letter if it was set aside as unreadable."""
        workflow = state.get(WORKFLOW + event.workflow_id)
        if workflow is not None and not is_workflow(self.table, workflow):
            raise DeadLetter(f"the state of workflow {event.workflow_id} was unreadable "
                             f"({unreadable(workflow) or 'not a workflow entry'}) and set aside: what it held is lost, "
                             "so nothing is routed for it")
        return workflow

    def skipped(self, event: Envelope, state: State, workflow: dict | None) -> bool:
        """Whether an event was handled before (said), or is another orchestrator's to note."""
        known = (workflow or {}).get("handled", {}).get(event.id) or state.get(SEEN + event.id)
        if is_repeat(SOURCE, event, known):
            metrics.count("repeats", service=SOURCE)
            return True
        return event.type == EXPIRED and workflow is not None and workflow["type"] not in self.owned

    def say_late(self, event: Envelope, workflow: dict | None, why: str, now: float) -> None:
        """An answer that changes no step, said and kept beside the step it answers (the console and workflows.py
        show it there: a command not acted on, an action done after all)."""
        step = noted(workflow, event, now) if workflow is not None else None
        if event.type == EXPIRED:
            log.warning("%s %s: %s%s", event.type, event.workflow_id[:8], why, f" (step {step})" if step else "")
        else:
            log.info("%s %s arrived late (%s); nothing follows%s", event.type, event.workflow_id[:8], why,
                     f"; kept beside step {step}" if step else "")

    @staticmethod
    def say_unknown(event: Envelope) -> None:
        """An outcome of a workflow with no state here (never started here, expired, or its entry removed): it
        changes no workflow and sends nothing, and that is said and counted, never taken for a step done."""
        log.warning("%s %s: its workflow is unknown here (never started here, expired, or its state removed); it "
                    "changes no workflow and nothing follows", event.type, event.workflow_id[:8])
        metrics.count("unknown", type=event.type)

    def started(self, event: Envelope, key: str | None, now: float) -> dict:
        """A new workflow's state, under this orchestrator's stage: its steps come as route() sends them."""
        return {"workflow_id": event.workflow_id, "type": self.kind[event.type], "stage": self.stage,
                "key": key, "started_at": now, "state": "running", "finished_at": None, "steps": {}, "handled": {}}

    def late(self, event: Envelope, workflow: dict | None, reported_: Reported | None) -> str | None:
        """Why an event no longer changes its workflow (a timeout after the step's report, an outcome after the
        workflow finished or of an attempt since replaced), or None. Late events are recorded, never routed: no
        resend, no second escalation, no step followed twice. A service's word that it did not act on a command (its
        deadline had passed) changes no step either: the step's own time limit, the same deadline, moves it on."""
        if event.type == EXPIRED:
            if event.payload["deadline"].timestamp() > time.time() + CLOCK_SKEW_S:  # (no service says that)
                raise DeadLetter(f"it says its command expired at {event.payload['deadline'].isoformat()}, which is "
                                 "still to come")
            return f"{event.source} read its command after its deadline and did not act on it"
        if workflow is None or event.type in FINISHED or event.type in REQUESTS:  # (a request is always answered)
            return None
        if event.type == self.table[workflow["type"]].starts_with:
            return "its workflow has started already"
        if workflow["state"] != "running":
            return f"the workflow had already {workflow['state']}"
        if reported_ is not None:
            return None
        if event.type == "step_timed_out":
            step = workflow["steps"].get(event.payload["step"], {})
            return f"the step is {step.get('state', 'unknown')} (attempt {step.get('attempts')})"
        return "it answers no step awaited now (an earlier attempt's, or a step that has ended)"

    def reported(self, workflow: dict, event: Envelope) -> Reported | None:
        return reported(workflow, self.defined[workflow["type"]], event)

    def record(self, workflow: dict, reported_: Reported, event: Envelope, commands: list[Output],
               now: float) -> list[Output]:
        """Each command route() sent, as the step it is (common/progress.py): the commands as they go out, each with
        its deadline; the steps it made follow, for the log."""
        sent, followers = record(workflow, self.table[workflow["type"]], reported_, event, commands, now, self.limits)
        if followers and reported_[0] is not None and reported_[1] in ("done", "failed"):
            self.followed = f" ({', '.join(followers)} after {reported_[0]} {reported_[1]})"
        return sent

    def timer(self, state: State, key: str, now: float | None = None) -> list[Output]:
        """The loop's timer: each pending step whose deadline passed gets a step_timed_out event, published and
        routed at once (tried again, or escalated). Firing, the state change and what it sends commit in one
        transaction: once each. Workflows not owned (taken over, but another split orchestrator's) are left alone."""
        workflow, now, outputs = state.get(key), now or time.time(), []
        if not is_workflow(self.table, workflow) or workflow["type"] not in self.owned:
            return []
        steps = self.defined[workflow["type"]]
        for name, step in workflow["steps"].items():
            if step["state"] == "pending" and (step["deadline"] or now + 1) <= now and name in steps:
                outputs += self.time_out(state, workflow, name, step, now)
        return [Output(topic, message, workflow["key"]) for topic, message, *_ in outputs]

    def time_out(self, state: State, workflow: dict, name: str, step: dict, now: float) -> list[Output]:
        """A step's step_timed_out event, and what routing it sends."""
        log.warning("%s %s: no answer to %s within its limit (attempt %d of %d)", workflow["type"],
                    workflow["workflow_id"][:8], name, step["attempts"], self.limits.attempts)
        event = caused_by(Envelope.model_validate(step["command"]), f"timeout-{step['attempts']}", "step_timed_out", {
            "workflow": workflow["type"], "step": name, "attempt": step["attempts"], "attempts": self.limits.attempts,
            "topic": step["topic"], "command": step["command"]}, SOURCE)
        routed = self.decide(event, state, now) or []
        metrics.count("timeouts", workflow=workflow["type"])
        self.count_routed(routed, workflow["type"])
        log.info("step_timed_out %s -> %s%s", workflow["workflow_id"][:8],
                 ", ".join(m.type if t in (MESSAGE_STREAM, m.type) else f"{t} ({m.type})" for t, m, *_ in routed),
                 self.followed)
        return [(MESSAGE_STREAM, event), *routed]

    def count_routed(self, outputs: list[Output], workflow: str | None) -> None:
        """The commands among a workflow's outputs, counted per topic (metrics on)."""
        if not metrics.ON:
            return
        for topic, *_ in outputs:
            if topic in self.commands:
                metrics.count("routed", topic=topic, workflow=workflow or "none")

    @staticmethod
    def open_workflows(store) -> int:
        """How many workflows run now (a quick scan of the stored entries, parsing none)."""
        return store.count(WORKFLOW, b'"state":"running"')


def is_workflow(table: Table, value) -> bool:
    """Whether a state entry's value is a workflow as the orchestrator writes them (not one set aside, or junk):
    each field the orchestrator and workflows.py read there is present and of its kind."""
    return isinstance(value, dict) and value.get("type") in table and value.get("state") in STATES and \
        isinstance(value.get("workflow_id"), str) and isinstance(value.get("stage"), int) and \
        isinstance(value.get("key"), str | None) and isinstance(value.get("handled", {}), dict) and \
        type(value.get("retries", 0)) is int and \
        isinstance(value.get("started_at"), int | float) and isinstance(value.get("finished_at"), int | float | None) \
        and isinstance(value.get("steps"), dict) and all(map(is_step, value["steps"].values()))


def is_step(step) -> bool:
    """Whether a workflow's step holds each field the orchestrator reads, of its kind."""
    return isinstance(step, dict) and isinstance(step.get("state"), str) and isinstance(step.get("attempts"), int) \
        and isinstance(step.get("sent_at"), int | float) and isinstance(step.get("finished_at"), int | float | None) \
        and isinstance(step.get("deadline"), int | float | None) and isinstance(step.get("topic"), str) \
        and isinstance(step.get("command"), dict) and isinstance(step.get("late", []), list) \
        and isinstance(step.get("earlier", []), list)


def process_age() -> float:
    """Seconds since this process started (Linux's /proc; elsewhere, since this module was loaded)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.monotonic() - LOADED
