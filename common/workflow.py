"""The workflow table's shape and what can be asked of it: a Workflow (the event that starts it, its steps, and
which step follows which) and the questions the engine, the tools, the ACLs and the dry run ask of a table (which
step a command is, which workflow an event belongs to, which topics there are, who may write what). The table itself
is orchestrator.py's WORKFLOWS, handed in as `table`; nothing here imports a script. No Kafka."""

from dataclasses import dataclass
from itertools import combinations

from common.messages import SCHEMAS
from common.settings import DEAD_LETTER, FAMILIES, MESSAGE_STREAM, REVOKED, written_by

Table = dict  # workflow name -> Workflow, as orchestrator.py's WORKFLOWS
SOURCE = "orchestrator"  # the script that routes: it reads message_stream and writes every step's command
FINISHED = ("workflow_completed", "workflow_failed", "workflow_cancelled")  # the orchestrator's, when a workflow ends
OPERATOR = "operator"  # the writer of a person's requests (workflows.py cancel/retry, the console)
REQUESTS = ("workflow_cancel_requested", "workflow_retry_requested")  # what a person may ask of a workflow
ANSWERS = ("workflow_cancelled", "workflow_retried", "operator_request_refused")  # the orchestrator's answers
EXPIRED = "command_expired"  # a service's word: it read a command after its deadline, and did not act on it


OUTCOMES = ("done", "failed")  # what a step that follows another waits for: that one done, or failed (a compensation)


@dataclass(frozen=True)
class Step:
    """One step of a workflow: the command the orchestrator sends, the topic it goes to, the service that does it,
    and the message types by which that service reports it done or failed (none: done once sent). A step with no
    `after` is sent when the workflow starts; one with `after` may be sent when one of those steps ends `when` says
    (route() decides whether it is): done, or failed (failed, or out of attempts: a compensation, say)."""
    name: str                     # unique in its workflow: the state, the monitor and the console call it so
    command: str                  # message type the orchestrator sends
    topic: str
    service: str
    done: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    from_stage: int = 1           # the walkthrough stage (--example) that adds the step
    reports_on: str = MESSAGE_STREAM  # where the service reports (its own member of message_stream)
    time_limit: float | None = None  # seconds to wait for the report before trying again (--step-timeout)
    after: tuple[str, ...] | str = ()  # the steps it follows (a name, or several); none: it starts with the workflow
    when: str = "done"            # on which outcome of those: "done" or "failed"
    expires_after: float | None = None  # a step that reports nothing back: how long its command may still be carried
    # out (a notification of no use an hour later, say); none: as long as the state is kept (STATE_RETENTION_S)

    def __post_init__(self):
        if isinstance(self.after, str):  # (one name, as a table writes it most often)
            object.__setattr__(self, "after", (self.after,) if self.after else ())

    @property
    def tracked(self) -> bool:
        """Whether the orchestrator waits for this step's report (it reads message_stream, not an outbound feed)."""
        return self.reports_on == MESSAGE_STREAM and bool(self.done + self.failed)

    def follows(self, step: str | None, outcome: str | None) -> bool:
        """Whether this step may be sent on `step` ending so (None, None: the workflow starting)."""
        return (step is None and outcome is None and not self.after) or (step in self.after and outcome == self.when)


@dataclass(frozen=True)
class Workflow:
    """A workflow: the event that starts it, the script that produces that event, and its steps."""
    starts_with: str
    source: str
    steps: tuple[Step, ...]
    from_stage: int = 1           # the walkthrough stage (--example) that adds the workflow
    started: str = "started"      # what the monitor calls its first moment


def pending(now: float, limit: float | None, topic: str, command: dict, tracked: bool = True) -> dict:
    """A step's record in its workflow's state once its command is sent: awaited, its first attempt, its deadline
    (none without a time limit); a step that reports nothing back is "sent", and so done."""
    return {"state": "pending" if tracked else "sent", "attempts": 1, "sent_at": now, "finished_at": None if tracked
            else now, "deadline": now + limit if limit and tracked else None, "topic": topic, "command": command}


def steps_by_name(table: Table) -> dict[str, dict[str, Step]]:
    """Each workflow's steps by name (a step in a workflow's state is named so)."""
    return {name: {step.name: step for step in workflow.steps} for name, workflow in table.items()}


def problems(table: Table) -> list[str]:
    """What is wrong with a table, a line each (the orchestrator starts on none): a message type no contract has a
    schema for, two steps of one name, a step that follows nothing there is, two steps one command could be."""
    return [problem for name, workflow in table.items() for problem in workflow_problems(f"WORKFLOWS[{name!r}]", workflow)]


def workflow_problems(where: str, workflow: Workflow) -> list[str]:
    """What is wrong with one workflow of a table."""
    named = {step.name: step for step in workflow.steps}
    found = [f"{where}: {what} is {type_!r}, which no contract has a schema for: add one to contracts.py (MESSAGES)"
             for type_, what in types_of(workflow) if type_ not in SCHEMAS]
    found += [f"{where}: two steps are called {step!r}: each step has a name of its own"
              for step in sorted(named) if sum(s.name == step for s in workflow.steps) > 1]
    found += [f"{where}: no step starts it (each step names a step it follows)"] if not first_steps(workflow) else []
    for step in workflow.steps:
        found += follow_problems(where, step, named)
    return found + [f"{where}: steps {a.name!r} and {b.name!r} both send {a.command!r} at the same moment, so a "
                    "command could be either: give one another command type, or make them follow different steps or "
                    "outcomes" for a, b in combinations(workflow.steps, 2) if a.command == b.command and same_moment(a, b)]


def follow_problems(where: str, step: Step, named: dict[str, Step]) -> list[str]:
    """What is wrong with what one step follows."""
    if step.when not in OUTCOMES:
        return [f"{where}: step {step.name!r} follows on {step.when!r}: a step follows another {' or '.join(OUTCOMES)}"]
    return [f"{where}: step {step.name!r} follows {before!r}, " + ("which is no step of it" if before not in named else
            "which reports nothing back: nothing can follow it") for before in step.after
            if before not in named or not named[before].tracked]


def same_moment(a: Step, b: Step) -> bool:
    """Whether two steps may be sent on the same event (both at the start, or on the same outcome of a step)."""
    return (not a.after and not b.after) or (bool(set(a.after) & set(b.after)) and a.when == b.when)


def types_of(workflow: Workflow) -> list[tuple[str, str]]:
    """Every message type a workflow names, and where: (type, what it is)."""
    return [(workflow.starts_with, "its starting event")] + [
        (type_, f"the {what} of step {step.name!r}") for step in workflow.steps
        for type_, what in [(step.command, "command")] + [(t, "report") for t in step.done + step.failed]]


def step_sent(workflow: Workflow, after: str | None, outcome: str | None, command_type: str,
              stage: int) -> Step | None:
    """The step a command of this type is when route() sends it on `after` ending `outcome` (None, None: the
    workflow starting) at a stage, or None if the table declares none."""
    return next((step for step in workflow.steps if step.command == command_type and step.from_stage <= stage
                 and step.follows(after, outcome)), None)


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


def stages(table: Table) -> list[int]:
    """The stages of the walkthrough a table has (--example): from 1 to the latest a workflow or a step starts at."""
    return list(range(1, 1 + max((stage for workflow in table.values()
                                  for stage in (workflow.from_stage, *(s.from_stage for s in workflow.steps))), default=1)))


def active(table: Table, workflows: set[str], stage: int) -> set[str]:
    """Those of `workflows` that run at a stage of the walkthrough (--example): an orchestrator reads only their
    writers, so a later stage's events wait in Kafka."""
    return {name for name in workflows if table[name].from_stage <= stage}


def senders(table: Table, workflows: set[str]) -> dict[str, frozenset]:
    """Who writes to the orchestrator of `workflows`, and what each may send: the script that starts a workflow
    its starting event, a service its step's reports. Each writes its own member of message_stream, so a type
    from a writer that may not send it (one workflow's starting event forged by another's source) is a dead letter."""
    may_send: dict[str, set[str]] = {OPERATOR: set(REQUESTS)}  # (a person's requests about any workflow)
    for name in sorted(workflows):
        workflow = table[name]
        may_send.setdefault(workflow.source, set()).add(workflow.starts_with)
        for step in workflow.steps:
            if step.tracked:  # (and its word that it did not act on a command: its deadline had passed)
                may_send.setdefault(step.service, set()).update((*step.done, *step.failed, EXPIRED))
    return {written_by(MESSAGE_STREAM, writer): frozenset(types) for writer, types in may_send.items()}


def command_topics(table: Table) -> tuple[str, ...]:
    """The topics the orchestrator writes: each step's."""
    return tuple(dict.fromkeys(step.topic for workflow in table.values() for step in workflow.steps))


def topics(table: Table) -> list[str]:
    """Every topic of the application: message_stream, each step's topic, where each step's service reports,
    dead_letter (the families stand for all their members) and the revocations. What the tools read and the ACLs
    grant."""
    reports = [step.reports_on for workflow in table.values() for step in workflow.steps if step.done + step.failed]
    return list(dict.fromkeys([MESSAGE_STREAM, *command_topics(table), *reports, DEAD_LETTER, REVOKED]))


def single_writer_topics(table: Table) -> list[str]:
    """The application's topics that are no family: each has its one writer (a step's topic, the orchestrator)."""
    return [name for name in topics(table) if name not in FAMILIES]


def first_steps(workflow: Workflow) -> tuple[Step, ...]:
    """The steps sent when a workflow starts (the others follow them)."""
    return tuple(step for step in workflow.steps if not step.after)


def readers_and_writers(table: Table) -> dict[str, tuple[list[str], list[str]]]:
    """Who reads and who writes what, as the table says: script -> (the topics it reads, the topics it writes; a
    family stands for the script's own member). The orchestrator reads message_stream and writes each step's topic
    and the revocations; a workflow's source writes message_stream; a step's service reads the step's topic and the
    revocations and writes where it reports; every script that consumes writes its dead letters."""
    scripts: dict[str, tuple[list[str], list[str]]] = {
        SOURCE: ([MESSAGE_STREAM], [*command_topics(table), MESSAGE_STREAM, REVOKED, DEAD_LETTER])}
    for workflow in table.values():
        scripts.setdefault(workflow.source, ([], []))[1].append(MESSAGE_STREAM)
        for step in workflow.steps:
            reads, writes = scripts.setdefault(step.service, ([], []))
            reads += [step.topic, REVOKED]
            writes += [step.reports_on] * bool(step.done + step.failed) + [DEAD_LETTER]
    return {script: (list(dict.fromkeys(reads)), list(dict.fromkeys(writes))) for script, (reads, writes) in
            scripts.items()}


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
