"""The workflow table's shape and what can be asked of it: a Workflow (the event that starts it, its steps) and the
questions the engine, the monitor, the ACLs and the dry run ask of a table (which step sends a command, which
workflow an event belongs to, who may write what). The table itself is orchestrator.py's WORKFLOWS, handed in as
`table`; nothing here imports a script. No Kafka."""

from dataclasses import dataclass
from itertools import combinations

from common.settings import MESSAGE_STREAM, written_by

Table = dict  # workflow name -> Workflow, as orchestrator.py's WORKFLOWS
FINISHED = ("workflow_completed", "workflow_failed", "workflow_cancelled")  # the orchestrator's, when a workflow ends
OPERATOR = "operator"  # the writer of a person's requests (workflows.py cancel/retry, the console)
REQUESTS = ("workflow_cancel_requested", "workflow_retry_requested")  # what a person may ask of a workflow
ANSWERS = ("workflow_cancelled", "workflow_retried", "operator_request_refused")  # the orchestrator's answers


@dataclass(frozen=True)
class Step:
    """One step of a workflow: the command the orchestrator sends, the topic it goes to, the service that does it,
    and the message types by which that service reports it done or failed (none: done once sent)."""
    name: str                     # what the monitor shows once the step is done
    command: str                  # message type the orchestrator sends
    topic: str
    service: str
    done: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    from_stage: int = 1           # the walkthrough stage (--example) that adds the step
    reports_on: str = MESSAGE_STREAM  # where the service reports (its own member of message_stream)
    time_limit: float | None = None  # seconds to wait for the report before trying again (--step-timeout)

    @property
    def tracked(self) -> bool:
        """Whether the orchestrator waits for this step's report (it reads message_stream, not third_party)."""
        return self.reports_on == MESSAGE_STREAM and bool(self.done + self.failed)


@dataclass(frozen=True)
class Workflow:
    """A workflow: the event that starts it, the script that produces that event, and its steps."""
    starts_with: str
    source: str
    steps: tuple[Step, ...]
    from_stage: int = 1           # the walkthrough stage (--example) that adds the workflow
    started: str = "started"      # what the monitor calls its first moment


def pending(now: float, limit: float | None, topic: str, command: dict) -> dict:
    """A step's record in its workflow's state once its command is sent: awaited, its first attempt, its deadline
    (none without a time limit)."""
    return {"state": "pending", "attempts": 1, "sent_at": now, "finished_at": None,
            "deadline": now + limit if limit else None, "topic": topic, "command": command}


def steps_by_name(table: Table) -> dict[str, dict[str, Step]]:
    """Each workflow's steps by name (a step in a workflow's state is named so)."""
    return {name: {step.name: step for step in workflow.steps} for name, workflow in table.items()}


def step_for(table: Table, command_type: str) -> tuple[str, Step] | None:
    """The workflow and step that send a command of this type."""
    for name, workflow in table.items():
        for step in workflow.steps:
            if step.command == command_type:
                return name, step
    return None


def reports_done(table: Table, event_type: str) -> bool:
    """Whether an event reports a step of some workflow done."""
    return any(event_type in step.done for workflow in table.values() for step in workflow.steps)


def workflow_of(table: Table, event_type: str) -> str | None:
    """The workflow an event type belongs to: the one it starts, or whose step it reports on."""
    for name, workflow in table.items():
        if event_type == workflow.starts_with or any(event_type in step.done + step.failed for step in workflow.steps):
            return name
    return None


def owns(table: Table, event_type: str, workflows: set[str]) -> bool:
    """Whether an orchestrator running `workflows` handles this event type: all but another orchestrator's types. (A
    type no workflow knows never gets this far: no writer may send it, so the loop dead-letters it.)"""
    return workflow_of(table, event_type) in {*workflows, None}


def active(table: Table, workflows: set[str], stage: int) -> set[str]:
    """Those of `workflows` that run at a stage of the walkthrough (--example): an orchestrator reads only their
    writers, so a later stage's events wait in Kafka."""
    return {name for name in workflows if table[name].from_stage <= stage}


def senders(table: Table, workflows: set[str]) -> dict[str, frozenset]:
    """Who writes to the orchestrator of `workflows`, and what each may send: the script that starts a workflow
    its starting event, a service its step's reports. Each writes its own member of message_stream, so a type
    from a writer that may not send it (a forged unit_event from the detector, say) is a dead letter."""
    may_send: dict[str, set[str]] = {OPERATOR: set(REQUESTS)}  # (a person's requests about any workflow)
    for name in sorted(workflows):
        workflow = table[name]
        may_send.setdefault(workflow.source, set()).add(workflow.starts_with)
        for step in workflow.steps:
            if step.tracked:
                may_send.setdefault(step.service, set()).update(step.done + step.failed)
    return {written_by(MESSAGE_STREAM, writer): frozenset(types) for writer, types in may_send.items()}


def command_topics(table: Table) -> tuple[str, ...]:
    """The topics the orchestrator writes: each step's."""
    return tuple(dict.fromkeys(step.topic for workflow in table.values() for step in workflow.steps))


def services(table: Table) -> list[str]:
    """The services that do the table's steps, in order of first mention."""
    return list(dict.fromkeys(step.service for workflow in table.values() for step in workflow.steps))


def group_for(table: Table, workflows: set[str]) -> str:
    """One consumer group per set of workflows, so split orchestrators each read every event and restart alone."""
    return "orchestrator" if workflows == set(table) else "orchestrator-" + "-".join(sorted(workflows))


def orchestrator_groups(table: Table) -> dict[str, set[str]]:
    """Every consumer group an orchestrator can run in (the single one, each split one): group -> its workflows."""
    names = sorted(table)
    return {group_for(table, set(chosen)): set(chosen) for n in range(1, len(names) + 1)
            for chosen in combinations(names, n)}


def overlapping(table: Table, workflows: set[str]) -> dict[str, set[str]]:
    """Every other orchestrator group whose workflows overlap these: only one of them may run at a time, and each
    starts where the others left off."""
    return {group: theirs for group, theirs in orchestrator_groups(table).items()
            if theirs & workflows and theirs != workflows}
