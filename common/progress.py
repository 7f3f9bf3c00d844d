"""How a workflow's entry moves on with each event routed for it: which step the event reports on (the outcome names
the command it answers), that step done, failed, tried again or out of attempts, each command route() sent recorded
as the step of the table it is (one that starts the workflow, or follows a step done or failed), and the workflow's
end once no step is pending. Plain functions on the entry (a dict, as the state keeps it) and the table's Workflow;
the orchestration (common/orchestration.py) calls them. No Kafka."""

from dataclasses import dataclass
from datetime import datetime, timezone

from common.messages import DeadLetter, Envelope, Output, caused_by
from common.settings import MESSAGE_STREAM
from common.workflow import OUTCOMES, Step, Workflow, pending, step_sent

ATTEMPTS = 3  # tries of a step that reports back, before a person is asked to take over (--attempts)
ENDED_WELL = ("done", "sent", "removed")  # a step's states that leave its workflow completed
MAX_NOTES = 10  # late answers kept beside a step
Reported = tuple[str | None, str | None]  # (the step an event reports on, how it ended: "done", "failed", or None)


@dataclass(frozen=True)
class Limits:
    """How long a step that reports back may take, and how often it is tried (the table's, or the flags'); and how
    long the command of a step with no limit of its own may still be carried out (the state's retention, so that a
    cancel's revocation, kept as long, outlives every command)."""
    step_timeout: float | None = None  # overrides every step's own time_limit
    attempts: int = ATTEMPTS
    expires: float = 7 * 24 * 3600

    def of(self, step: Step) -> float | None:
        return self.step_timeout if self.step_timeout is not None else step.time_limit


def reported(workflow: dict, definitions: dict[str, Step], event: Envelope) -> Reported | None:
    """The step awaited now that an event reports on, and how that step ended ("done", "failed"; None: a time limit
    passed with attempts left; "removed": the table has it no more); None if it reports on none. An outcome names the
    command it answers (cause_id); one that does not (written before outcomes did) is taken for the first pending
    step that reports so. A retried step is done by its earlier command's success too: its service applies both
    under one key, so that action is the retry's (a failure of the earlier one is old news)."""
    steps = workflow["steps"]
    if event.type == "step_timed_out":
        return timed_out(steps, event)
    for name, step in steps.items():
        if step["state"] == "pending" and (outcome := answered(step, definitions.get(name), event)):
            return name, outcome
    return None


def answered(step: dict, definition: Step | None, event: Envelope) -> str | None:
    """How an event ends a pending step ("done", "failed", "removed": the table has the step no more), or None."""
    answers = event.cause_id in (None, step["command"].get("id"))
    if definition is None:
        return "removed" if answers and event.cause_id is not None else None
    if event.type in definition.done and (answers or event.cause_id in step.get("earlier", ())):
        return "done"
    return "failed" if answers and event.type in definition.failed else None


def timed_out(steps: dict, event: Envelope) -> Reported | None:
    """The step a step_timed_out event is about, if it still waits on that attempt: tried again, or failed."""
    name, step = event.payload["step"], steps.get(event.payload["step"], {})
    if step.get("state") != "pending" or step.get("attempts") != event.payload["attempt"]:
        return None
    return name, "failed" if event.payload["attempt"] >= event.payload["attempts"] else None


def advance(workflow: dict, definitions: dict[str, Step], reported_: Reported, event: Envelope, now: float,
            limits: Limits) -> None:
    """The step an event reports on, after it: done or failed, tried again, or out of attempts. A pending step the
    table no longer has (renamed or removed since the workflow started) is removed: nothing reports on it now."""
    steps = workflow["steps"]
    for name, step in steps.items():
        if step["state"] == "pending" and name not in definitions:
            step.update(state="removed", deadline=None)
    name, outcome = reported_
    if name is None or name not in definitions:
        return
    step = steps[name]
    if event.type == "step_timed_out" and outcome is None:
        limit = limits.of(definitions[name])
        step.update(attempts=step["attempts"] + 1, deadline=now + limit if limit else None)
    else:
        step.update(state="timed_out" if event.type == "step_timed_out" else outcome, finished_at=now, deadline=None)


def record(workflow: dict, definition: Workflow, reported_: Reported, event: Envelope, commands: list[Output],
           now: float, limits: Limits) -> tuple[list[Output], list[str]]:
    """Each command route() sent for an event, as the step of the table it is: pending until its report (sent, if it
    reports nothing back). Returns the commands as they go out, each with its deadline (its attempt's time limit, or
    the step's own `expires_after`), and the steps added. A step's own command sent again (the same id: a time
    limit's resend, a retry) carries its new deadline. A command the table has no step for, or a step sent while it
    is pending, is a DeadLetter that says what to change."""
    steps, out, added = workflow["steps"], [], []
    awaited = {step["command"].get("id"): step for step in steps.values() if step["state"] == "pending"}
    for topic, command, *key in commands:
        if command.id in awaited:  # (sent again: its deadline moved on)
            record_ = awaited[command.id]
            command = stamped(command, record_["deadline"] or now + limits.expires)
            record_["command"] = command.model_dump(mode="json")
        else:
            step = step_sent(definition, *reported_, command.type, workflow["stage"])
            if step is None or step.topic != topic or steps.get(step.name, {}).get("state") == "pending":
                raise DeadLetter(undeclared(workflow, reported_, event, topic, command.type, step))
            limit = limits.of(step)
            command = stamped(command, deadline_of(step, limit, now, limits))
            steps.pop(step.name, None)  # (a step run again once its earlier run is over: it goes last, in order sent)
            kept = command.model_dump(mode="json") if step.tracked else {"id": command.id}  # (sent again, or retried)
            steps[step.name] = pending(now, limit, topic, kept, step.tracked)
            if reported_[1] in OUTCOMES:  # (what it was sent after, as it happened)
                steps[step.name]["after"] = f"{reported_[0]} {reported_[1]}"
            added.append(step.name)
        out.append((topic, command, *key))  # (as route() gave it: a pair keeps the input's key)
    return out, added


def deadline_of(step: Step, limit: float | None, now: float, limits: Limits) -> float:
    """Until when a step's command sent now may be carried out: its first attempt's time limit if it reports back,
    else the step's own expires_after, else the limits' (the state's retention)."""
    if step.tracked and limit:
        return now + limit
    return now + (step.expires_after or limits.expires)


def stamped(command: Envelope, deadline: float | None) -> Envelope:
    """The command with its deadline (epoch seconds; None: it may be carried out at any time)."""
    return command.model_copy(update={"deadline": None if deadline is None else
                                      datetime.fromtimestamp(deadline, timezone.utc)})


def noted(workflow: dict, event: Envelope, now: float) -> str | None:
    """An answer that changes no step, kept beside the step it answers (by the command it names: this attempt's or
    an earlier retry's): a service's word that it did not act in time (command_expired), or an outcome that came
    late. Returns the step's name, or None if it answers none."""
    if event.cause_id is None:
        return None
    for name, step in workflow["steps"].items():
        if event.cause_id in (step["command"].get("id"), *step.get("earlier", ())):
            step["late"] = [*step.get("late", ())[-(MAX_NOTES - 1):], [event.type, round(now, 3)]]
            return name
    return None


def done_late(step: dict, definition: Step | None) -> float | None:
    """When a step's outcome said it was done after all, though it came late (a retry would do it again), or None."""
    return next((at for type_, at in step.get("late", ()) if definition and type_ in definition.done), None)


def undeclared(workflow: dict, reported_: Reported, event: Envelope, topic: str, command: str,
               step: Step | None) -> str:
    """Why a command route() sent is not sent: the step it would be, and what to change in the table or route()."""
    name, outcome = reported_
    followed = outcome in ("done", "failed")
    moment = f"on {event.type} (step {name!r} {outcome})" if followed else \
        "as the workflow starts" if name is None and outcome is None else f"on {event.type}"
    where = f"WORKFLOWS[{workflow['type']!r}]"
    if step is not None and step.topic != topic:
        return f"route() sent {command} to {topic!r} {moment}, but step {step.name!r} of {where} sends it to {step.topic!r}"
    if step is not None:
        return f"route() sent step {step.name!r} of {where} again {moment} while it is still pending"
    wanted = f", after={name!r}" + (", when='failed'" if outcome == "failed" else "") if followed else ""
    return (f"route() sent {command} to {topic!r} {moment} at example {workflow['stage']}, but {where} has no step "
            f"that sends it then: add Step(NAME, {command!r}, {topic!r}, SERVICE{wanted}) or change route()")


def ended(workflow: dict, event: Envelope, now: float, source: str) -> list[Output]:
    """The workflow_completed or workflow_failed an event causes once no step of its workflow is pending (what
    follows a step is sent with its outcome, so nothing more is due), if any: failed if any step failed or ran out of
    attempts, a compensation that followed it or not."""
    steps = workflow["steps"]
    if workflow["state"] != "running" or any(step["state"] == "pending" for step in steps.values()):
        return []
    bad = [f"{name} {step['state']}" for name, step in steps.items() if step["state"] not in ENDED_WELL]
    workflow.update(state="failed" if bad else "completed", finished_at=now)
    return [(MESSAGE_STREAM, caused_by(event, workflow["state"], f"workflow_{workflow['state']}", {
        "workflow": workflow["type"], "detail": ", ".join(bad)}, source))]


def next_deadline(workflow: dict) -> float | None:
    return min((s["deadline"] for s in workflow["steps"].values() if s["deadline"] is not None), default=None)
