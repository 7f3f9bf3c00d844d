"""Orchestrator: owns the workflows. Reads message_stream, decides with the routing table below which commands to send.

Consumes: message_stream.<writer> of its workflows' writers (each may send only its own types)
Produces: sec_command, notification_command, report_data, unit_command, dead_letter.orchestrator,
          message_stream.orchestrator (step_timed_out, workflow_completed, workflow_failed)
State:    each workflow (its steps, attempts, deadlines) in state.<group>, committed with the commands; see workflows.py
Run:      python orchestrator.py --example 1        # stage of the walkthrough: 1, 2 or 3 (default 3, everything)
          python orchestrator.py --workflows security   # one orchestrator per workflow, each restarts on its own
          python orchestrator.py --step-timeout 2 --attempts 2   # each step's time limit and tries (defaults below)
          python orchestrator.py --dry-run --example 3 --compare 2   # preview a routing change on the recorded
                                                        # message_stream: produces and commits nothing
Changing a workflow means editing its entry in WORKFLOWS and its branch of route(), then restarting this script; the
services never change. Messages that arrive while it is down wait in message_stream and are routed once it is back.
"""

import argparse
import json
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from itertools import combinations

from kafka.errors import AuthorizationError

from common import (DEAD_LETTER, MESSAGE_STREAM, NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND,
                    SETTINGS, DeadLetter, Envelope, Output, State, Triple, caused_by, parse, read_all, run_service,
                    setup_logging, written_by, metrics)
from common.clients import SESSION_TIMEOUT_MS
from common.handling import SEEN, is_repeat
from common.messages import digest

log = logging.getLogger("orchestrator")
LOADED = time.monotonic()
SOURCE = "orchestrator"
ATTEMPTS = 3  # tries of a step that reports back, before a person is asked to take over (--attempts)
WORKFLOW = "workflow/"  # state key of a workflow, by its id


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
    from_example: int = 1         # the walkthrough stage that adds the step
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
    from_example: int = 1         # the walkthrough stage that adds the workflow
    started: str = "started"      # what the monitor calls its first moment


# Each workflow once: route() below sends these steps' commands; --workflows ownership, the monitor (steps, STUCK,
# SLA report), the dry run and the ACLs read this table. tests/test_orchestrator.py checks route() agrees with it.
WORKFLOWS = {
    "security": Workflow("security_detection", "security_detector", started="detected", steps=(
        Step("acted", "security_command", SEC_COMMAND, "security_service", time_limit=5.0,
             done=("security_action_completed",), failed=("security_action_failed",)),
        Step("notified", "notification_command", NOTIFICATION_COMMAND, "notification_service",
             done=("notification_delivered",), reports_on=THIRD_PARTY),
        Step("reported", "report_data", REPORT_DATA, "reporting_service", from_example=2))),
    "unit": Workflow("unit_event", "unit_event_producer", from_example=3, started="event", steps=(
        Step("applied", "unit_command", UNIT_COMMAND, "unit_event_producer", time_limit=5.0,
             done=("unit_command_applied",)),
        Step("reported", "report_data", REPORT_DATA, "reporting_service"))),
}


def route(event: Envelope, example: int = 3) -> list[Output]:
    """The routing table: the commands an event causes at a stage of the walkthrough."""
    if event.type == "security_detection":
        commands = [(SEC_COMMAND, security_command(event)), (NOTIFICATION_COMMAND, notify_on_duty(event))]
        if example >= 2:  # EXAMPLE 2: the walkthrough's "uncomment the reporting line".
            commands.append((REPORT_DATA, report(event, "security", event.payload["kind"], event.payload["sensor_id"])))
        return commands
    elif event.type == "unit_event" and example >= 3:  # EXAMPLE 3: the new unit-event workflow.
        return [(UNIT_COMMAND, unit_command(event)),
                (REPORT_DATA, report(event, "unit", event.payload["status"], event.payload["unit_id"]))]
    elif event.type == "security_action_failed":  # compensation is just another route: escalate to a human
        return [(NOTIFICATION_COMMAND, escalate(event))]
    elif event.type == "step_timed_out" and event.payload["attempt"] < event.payload["attempts"]:
        return [(event.payload["topic"], Envelope.model_validate(event.payload["command"]))]  # again, same id
    elif event.type == "step_timed_out":  # no answer after every try: a person takes over
        return [(NOTIFICATION_COMMAND, escalate_timeout(event))]
    elif reports_done(event.type) or event.type in ("workflow_completed", "workflow_failed"):
        return []  # a step reported done (security_action_completed, ...): nothing follows
    else:
        raise DeadLetter(f"no route for {event.type!r} at example {example}")


def security_command(event: Envelope) -> Envelope:
    detection = event.payload
    action = "dispatch_guard" if detection["severity"] >= 4 else "lock_zone" if detection["severity"] == 3 else "inspect"
    return caused_by(event, "security", "security_command", {
        "action": action, "zone": detection["zone"], "sensor_id": detection["sensor_id"],
        "severity": detection["severity"]}, SOURCE)


def notify_on_duty(event: Envelope) -> Envelope:
    detection = event.payload
    return caused_by(event, "notify", "notification_command", {
        "channel": "pager" if detection["severity"] >= 4 else "sms", "recipient": f"on-duty-{detection['zone']}",
        "text": f"{detection['kind']} at {detection['zone']} (sensor {detection['sensor_id']}, "
                f"severity {detection['severity']})"}, SOURCE)


def escalate(event: Envelope) -> Envelope:
    outcome = event.payload
    return caused_by(event, "escalate", "notification_command", {
        "channel": "pager", "recipient": "security-supervisor",
        "text": f"ESCALATION: {outcome['action']} failed at {outcome['zone']}: {outcome['detail']}"}, SOURCE)


def escalate_timeout(event: Envelope) -> Envelope:
    timeout, command = event.payload, event.payload["command"]["payload"]
    where = command.get("zone") or command.get("unit_id", "")
    return caused_by(event, "escalate", "notification_command", {
        "channel": "pager", "recipient": f"{timeout['workflow']}-supervisor",
        "text": f"ESCALATION: {command.get('action') or command.get('command')} at {where} got no answer after "
                f"{timeout['attempts']} attempts (workflow {event.workflow_id[:8]})"}, SOURCE)


def unit_command(event: Envelope) -> Envelope:
    command = {"heartbeat": "acknowledge", "battery_low": "power_save", "offline": "reboot", "tamper": "lockdown"}
    unit = event.payload
    return caused_by(event, "unit", "unit_command", {"unit_id": unit["unit_id"], "command": command[unit["status"]]},
                     SOURCE)


def report(event: Envelope, workflow: str, category: str, entity: str) -> Envelope:
    return caused_by(event, "report", "report_data", {
        "workflow": workflow, "category": category, "entity": entity, "zone": event.payload.get("zone", "")}, SOURCE)


# What the orchestrator remembers of each workflow (common/state.py keeps it in Kafka, committed with the commands).
# route() stays the table; these keep its state: a step is pending until its report, a timeout or a failure.
@dataclass(frozen=True)
class Limits:
    """How long a step that reports back may take, and how often it is tried (the table's, or the flags')."""
    step_timeout: float | None = None  # overrides every step's own time_limit
    attempts: int = ATTEMPTS

    def of(self, step: Step) -> float | None:
        return self.step_timeout if self.step_timeout is not None else step.time_limit


def step_for(command_type: str) -> tuple[str, Step] | None:
    """The workflow and step that send a command of this type."""
    for name, workflow in WORKFLOWS.items():
        for step in workflow.steps:
            if step.command == command_type:
                return name, step
    return None


def started(event: Envelope, commands: list[Output], stage: int, key: str | None, limits: Limits,
            now: float) -> dict:
    """A new workflow's state: each step it sent that reports back is pending, with its deadline."""
    steps, kind = {}, workflow_of(event.type)
    for topic, command in commands:
        found = step_for(command.type)
        if found and found[1].tracked:
            limit = limits.of(found[1])
            steps[found[1].name] = {"state": "pending", "attempts": 1, "sent_at": now, "finished_at": None,
                                    "deadline": now + limit if limit else None, "topic": topic,
                                    "command": command.model_dump(mode="json")}
    return {"workflow_id": event.workflow_id, "type": kind, "stage": stage, "key": key, "started_at": now,
            "state": "running", "finished_at": None, "steps": steps, "handled": {}}


def late(event: Envelope, workflow: dict | None) -> str | None:
    """Why an event no longer changes its workflow (a timeout after the step's report, an outcome after the workflow
    finished), or None. Late events are recorded, never routed: no resend, no second escalation."""
    if workflow is None or event.type in ("workflow_completed", "workflow_failed"):
        return None
    if event.type == "step_timed_out":
        step = workflow["steps"].get(event.payload["step"], {})
        if step.get("state") != "pending" or step.get("attempts") != event.payload["attempt"]:
            return f"the step is {step.get('state', 'unknown')} (attempt {step.get('attempts')})"
        return None
    if workflow["state"] != "running" and event.type != WORKFLOWS[workflow["type"]].starts_with:
        return f"the workflow had already {workflow['state']}"
    return None


def track(workflow: dict, event: Envelope, limits: Limits, now: float) -> list[Output]:
    """Update a workflow with an event routed for it; the workflow_completed/workflow_failed it causes, if any."""
    steps, definitions = workflow["steps"], {step.name: step for step in WORKFLOWS[workflow["type"]].steps}
    for name, step in steps.items():
        definition = definitions.get(name)
        if definition is None:  # (a step since renamed or removed from the table: nothing reports on it any more)
            step.update(state="removed" if step["state"] == "pending" else step["state"], deadline=None)
            continue
        if event.type in definition.done + definition.failed and step["state"] == "pending":
            step.update(state="done" if event.type in definition.done else "failed", finished_at=now, deadline=None)
        elif event.type == "step_timed_out" and event.payload["step"] == name:
            if event.payload["attempt"] < event.payload["attempts"]:
                limit = limits.of(definition)
                step.update(attempts=step["attempts"] + 1, deadline=now + limit if limit else None)
            else:
                step.update(state="timed_out", finished_at=now, deadline=None)
    if workflow["state"] != "running" or any(step["state"] == "pending" for step in steps.values()):
        return []
    bad = [f"{name} {step['state']}" for name, step in steps.items() if step["state"] not in ("done", "removed")]
    workflow.update(state="failed" if bad else "completed", finished_at=now)
    return [(MESSAGE_STREAM, caused_by(event, workflow["state"], f"workflow_{workflow['state']}", {
        "workflow": workflow["type"], "detail": ", ".join(bad)}, SOURCE))]


def timed_out(state: State, key: str, stage: int, limits: Limits, now: float | None = None,
              owned: set[str] = frozenset(WORKFLOWS)) -> list[Triple]:
    """The timer: each pending step whose deadline passed gets a step_timed_out event, published and routed at once
    (tried again, or escalated). Firing, the state change and what it sends commit in one transaction: once each.
    Workflows not `owned` (taken over from a single orchestrator, but another split one's) are left alone."""
    workflow, now, outputs = state.get(key), now or time.time(), []
    if workflow is None or workflow["type"] not in owned:
        return []
    steps = {step.name for step in WORKFLOWS[workflow["type"]].steps}
    for name, step in workflow["steps"].items():
        if step["state"] == "pending" and (step["deadline"] or now + 1) <= now and name in steps:
            log.warning("%s %s: no answer to %s within its limit (attempt %d of %d)", workflow["type"],
                        workflow["workflow_id"][:8], name, step["attempts"], limits.attempts)
            event = caused_by(Envelope.model_validate(step["command"]), f"timeout-{step['attempts']}",
                              "step_timed_out", {"workflow": workflow["type"], "step": name,
                                                 "attempt": step["attempts"], "attempts": limits.attempts,
                                                 "topic": step["topic"], "command": step["command"]}, SOURCE)
            routed = decide(event, state, stage, limits, now)
            metrics.count("timeouts", workflow=workflow["type"])
            counted(routed, workflow["type"])
            log.info("step_timed_out %s -> %s", workflow["workflow_id"][:8],
                     ", ".join(m.type if t in (MESSAGE_STREAM, m.type) else f"{t} ({m.type})" for t, m in routed))
            outputs += [(MESSAGE_STREAM, event), *routed]
    return [(topic, message, workflow["key"]) for topic, message in outputs]


def counted(outputs: list[Output], workflow: str | None) -> None:
    """The commands among a workflow's outputs, counted per topic (metrics on)."""
    if not metrics.ON:
        return
    for topic, _ in outputs:
        if topic in command_topics():
            metrics.count("routed", topic=topic, workflow=workflow or "none")


def next_deadline(workflow: dict) -> float | None:
    return min((s["deadline"] for s in workflow["steps"].values() if s["deadline"] is not None), default=None)


def decide(event: Envelope, state: State, stage: int, limits: Limits, now: float | None = None) -> list[Output]:
    """Route an event and keep its workflow's state: the commands, plus workflow_completed/failed when it ends."""
    now, key = now or time.time(), WORKFLOW + event.workflow_id
    workflow = state.get(key)
    handled = workflow.get("handled", {}) if workflow is not None else {}
    if is_repeat(SOURCE, event, handled.get(event.id) or state.get(SEEN + event.id)):
        metrics.count("repeats", service=SOURCE)
        return []  # (handled before: a workflow's entry keeps the ids it handled, with what each said)
    why = late(event, workflow)
    if why:
        log.info("%s %s arrived late (%s); nothing follows", event.type, event.workflow_id[:8], why)
        return []
    commands = route(event, stage)
    if workflow is None and any(event.type == w.starts_with for w in WORKFLOWS.values()):
        workflow = started(event, commands, stage, None if state.key is None else
                           state.key.decode(errors="surrogateescape"), limits, now)
    news = track(workflow, event, limits, now) if workflow is not None else []
    if workflow is not None:
        workflow.setdefault("handled", {})[event.id] = digest(event).hex()
        state.put(key, workflow, due=next_deadline(workflow))
    else:  # (an event of no workflow it knows, say an outcome after the workflow expired: its id kept on its own)
        state.put(SEEN + event.id, digest(event).hex())
    return commands + news


def reports_done(event_type: str) -> bool:
    """Whether an event reports a step of some workflow done."""
    return any(event_type in step.done for workflow in WORKFLOWS.values() for step in workflow.steps)


def workflow_of(event_type: str) -> str | None:
    """The workflow an event type belongs to: the one it starts, or whose step it reports on."""
    for name, workflow in WORKFLOWS.items():
        if event_type == workflow.starts_with or any(event_type in step.done + step.failed for step in workflow.steps):
            return name
    return None


def owns(event_type: str, workflows: set[str]) -> bool:
    """Whether an orchestrator running `workflows` handles this event type: all but another orchestrator's types. (A
    type no workflow knows never gets this far: no writer may send it, so the loop dead-letters it.)"""
    return workflow_of(event_type) in {*workflows, None}


def senders(workflows: set[str]) -> dict[str, frozenset]:
    """Who writes to the orchestrator of `workflows`, and what each may send: the script that starts a workflow
    its starting event, a service its step's reports. Each writes its own member of message_stream, so a type
    from a writer that may not send it (a forged unit_event from the detector, say) is a dead letter."""
    may_send: dict[str, set[str]] = {}
    for name in sorted(workflows):
        workflow = WORKFLOWS[name]
        may_send.setdefault(workflow.source, set()).add(workflow.starts_with)
        for step in workflow.steps:
            if step.tracked:
                may_send.setdefault(step.service, set()).update(step.done + step.failed)
    return {written_by(MESSAGE_STREAM, writer): frozenset(types) for writer, types in may_send.items()}


def command_topics() -> tuple[str, ...]:
    """The topics the orchestrator writes: each step's."""
    return tuple(dict.fromkeys(step.topic for workflow in WORKFLOWS.values() for step in workflow.steps))


def group_for(workflows: set[str]) -> str:
    """One consumer group per set of workflows, so split orchestrators each read every event and restart alone."""
    return "orchestrator" if workflows == set(WORKFLOWS) else "orchestrator-" + "-".join(sorted(workflows))


def orchestrator_groups() -> dict[str, set[str]]:
    """Every consumer group an orchestrator can run in (the single one, each split one): group -> its workflows."""
    names = sorted(WORKFLOWS)
    return {group_for(set(chosen)): set(chosen) for n in range(1, len(names) + 1) for chosen in combinations(names, n)}


def overlapping(workflows: set[str]) -> dict[str, set[str]]:
    """Every other orchestrator group whose workflows overlap these: only one of them may run at a time, and each
    starts where the others left off."""
    return {group: theirs for group, theirs in orchestrator_groups().items() if theirs & workflows and theirs != workflows}


def replaced(admin, settings=SETTINGS) -> set[str]:
    """Orchestrator groups with no member while one of other but overlapping workflows runs: split off, or joined
    back. Their lag means nothing: should they run again, they start where the running one left off."""
    every = orchestrator_groups()
    running = running_groups(admin, every, settings)
    return {group for group, theirs in every.items() if group not in running and any(theirs & every[r] for r in running)}


def alone(admin, workflows: set[str], stop, settings=SETTINGS) -> None:
    """End this orchestrator in one line while another one runs whose workflows overlap its own: both would route
    their events (the split ones and the single one are different consumer groups). A copy stopped just now is
    still a member until its session ends (a static member does not leave on close), so that is waited out first."""
    others, until = overlapping(workflows), time.monotonic() + SESSION_TIMEOUT_MS / 1000 + 2
    running = running_groups(admin, others, settings)
    if running:
        log.info("group %s has a member; waiting up to %d s in case it was stopped just now", ", ".join(running),
                 until - time.monotonic())
    while running and time.monotonic() < until and not stop.wait(1.0):
        running = running_groups(admin, others, settings)
    if stop:
        return
    for group, members in running.items():
        theirs, rest = others[group], sorted(workflows - others[group])
        raise SystemExit(
            f"orchestrator: group {group} (workflows {','.join(sorted(theirs))}) is running ({len(members)} "
            f"cop{'y' if len(members) == 1 else 'ies'}), and both would route {','.join(sorted(workflows & theirs))}. "
            f"Stop it first (Ctrl-C in its terminal), then start this one: it starts where that one left off"
            + (f"; or run this one with --workflows {','.join(rest)}" if rest else ""))


def running_groups(admin, groups: dict[str, set[str]], settings=SETTINGS) -> dict[str, list]:
    """Those of these groups that have members now: group -> its members."""
    try:
        described = admin.describe_groups([settings.group(group) for group in groups])
    except AuthorizationError:  # a user who may not see those groups may not run in them either
        return {}
    return {group: members for group in groups if (members := described.get(settings.group(group), {}).get("members"))}


def preview(records, example: int, workflows: set[str]) -> dict[str, Counter]:
    """What route() would emit for recorded events: event type -> Counter of output topics (nothing is sent)."""
    emitted: dict[str, Counter] = defaultdict(Counter)
    accepts = senders(workflows)
    for record in records:
        allowed = accepts.get(record.topic.removeprefix(SETTINGS.topic_prefix))
        if record.topic == SETTINGS.topic(written_by(MESSAGE_STREAM, SOURCE)):  # its own timeouts and finished workflows
            continue
        if allowed is None:  # a writer of another orchestrator's workflows
            emitted["(another orchestrator)"]["-"] += 1
            continue
        try:
            event = parse(record.value)
        except DeadLetter:
            emitted["(invalid)"][DEAD_LETTER] += 1
            continue
        if event.type not in allowed or not owns(event.type, workflows):
            emitted[event.type][DEAD_LETTER if event.type not in allowed else "(another orchestrator)"] += 1
            continue
        try:
            outputs = [name for name, _ in route(event, example)]
        except DeadLetter:
            outputs = [DEAD_LETTER]
        emitted[event.type].update(outputs or ["(nothing: step done)"])
    return emitted


def dry_run(args, workflows: set[str]) -> None:
    """Route the recorded message_stream through the table (and a second stage, to compare) and print the counts."""
    since = datetime.fromisoformat(args.since).timestamp() * 1000 if args.since else 0
    records = [r for r in read_all(MESSAGE_STREAM) if r.timestamp >= since]
    stages = {f"example {args.example}": preview(records, args.example, workflows)}
    if args.compare:
        stages[f"example {args.compare}"] = preview(records, args.compare, workflows)
    if args.json:
        print(json.dumps({stage: {t: dict(c) for t, c in counts.items()} for stage, counts in stages.items()},
                         sort_keys=True))
        return
    print(f"dry run over {len(records)} recorded messages on message_stream: nothing is produced or committed")
    for event_type in sorted({t for counts in stages.values() for t in counts}):
        for stage, counts in stages.items():
            outputs = ", ".join(f"{n} {name}" for name, n in sorted(counts[event_type].items())) or "-"
            print(f"  {event_type:<28} {stage}: {outputs}")
        if args.compare and len({str(sorted(c[event_type].items())) for c in stages.values()}) > 1:
            print(f"  {'':<28} ^ changes between the two stages")


def running_for() -> float:
    """Seconds since this process started (Linux's /proc; elsewhere, since this module was loaded)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.monotonic() - LOADED


def checked(args) -> set[str]:
    """The workflows this orchestrator runs; a flag that means nothing here, or cannot be read, ends it in one line."""
    def refuse(why: str):
        raise SystemExit(f"orchestrator: {why}")
    workflows = set(args.workflows.split(",")) if args.workflows is not None else set(WORKFLOWS)
    if not workflows or not workflows <= set(WORKFLOWS):
        refuse(f"--workflows takes a comma-separated subset of {','.join(WORKFLOWS)}, not {args.workflows!r}")
    flags = {"--since": args.since, "--compare": args.compare, "--json": args.json} if not args.dry_run else {
        "--step-timeout": args.step_timeout, "--attempts": args.attempts, "--no-transactions": args.no_transactions}
    if meaningless := [flag for flag, value in flags.items() if value]:
        refuse(f"{', '.join(meaningless)} {'is' if len(meaningless) == 1 else 'are'} "
               f"{'not ' if args.dry_run else ''}for --dry-run{'' if args.dry_run else ' only'}; nothing was started")
    if (args.attempts is not None and args.attempts < 1) or (args.step_timeout is not None and args.step_timeout <= 0):
        refuse("--attempts must be at least 1 and --step-timeout above 0")
    try:
        datetime.fromisoformat(args.since or "2000-01-01")
    except ValueError:
        refuse(f"--since takes a date and time, e.g. 2026-11-27T18:00 (local time), not {args.since!r}")
    later = {w: WORKFLOWS[w].from_example for w in sorted(workflows) if WORKFLOWS[w].from_example > args.example}
    if not args.dry_run and len(later) == len(workflows):
        refuse(f"no workflow of {','.join(sorted(workflows))} runs at example {args.example} ("
               f"{', '.join(f'{w} starts at {n}' for w, n in later.items())}); give --example "
               f"{min(later.values())} or more")
    return workflows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", type=int, choices=[1, 2, 3], default=3, help="walkthrough stage (default 3)")
    parser.add_argument("--workflows", help=f"comma-separated subset of {','.join(WORKFLOWS)} (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="preview routing of the recorded message_stream")
    parser.add_argument("--since", help="with --dry-run: only messages from this ISO time on (e.g. 2026-11-27T18:00)")
    parser.add_argument("--compare", type=int, choices=[1, 2, 3], help="with --dry-run: a second stage to compare")
    parser.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    parser.add_argument("--step-timeout", type=float, metavar="SECONDS",
                        help="time limit of every step that reports back (default: each step's own, 5 s)")
    parser.add_argument("--attempts", type=int,
                        help=f"tries of such a step before escalating to a person (default {ATTEMPTS})")
    metrics.flag(parser)
    parser.add_argument("--no-transactions", action="store_true",
                        help="at least once instead of exactly once (for comparison in the benchmark)")
    args = parser.parse_args()
    setup_logging()
    workflows = checked(args)
    group = group_for(workflows)
    if args.dry_run:
        return dry_run(args, workflows)
    active = sorted(w for w in workflows if WORKFLOWS[w].from_example <= args.example)
    log.info("routing table: example %d, workflows %s", args.example, ", ".join(active))

    limits = Limits(args.step_timeout, args.attempts or ATTEMPTS)

    routed: list[str] = []

    def handle(event: Envelope, state: State) -> list[Output]:
        if not owns(event.type, workflows):
            return []
        outputs = decide(event, state, args.example, limits)
        counted(outputs, workflow_of(event.type))
        log.info("%s %s -> %s", event.type, event.workflow_id[:8],
                 ", ".join(m.type if t == MESSAGE_STREAM else t for t, m in outputs) or "done")
        if not routed:  # (the restart gap, to read off by hand)
            routed.append(event.id)
            log.info("first message routed %.2f s after this process started", running_for())
        return outputs

    # Exactly once: the commands routed from a batch and the batch's offsets commit in one Kafka transaction.
    # It refuses to start while an orchestrator of other but overlapping workflows runs (split and single), and
    # starts where such ones left off: splitting, or joining back into one, routes nothing twice.
    # An event handled before is not routed again, and the same id with other content is a dead letter: decide()
    # keeps the ids of a workflow's events in its entry (one state record per event, not two).
    # It reads only the writers of its workflows, each allowed only its own message types.
    accepts = senders(workflows)
    # Each workflow's state (its steps, attempts and deadlines) is kept in Kafka, committed with the commands;
    # a step's deadline passing calls timed_out(), whose step_timed_out event is routed like any other.
    run_service("orchestrator", list(accepts), handle, writes=(*command_topics(), MESSAGE_STREAM), accepts=accepts,
                group=group, transactional=not args.no_transactions, state=True,
                timer=lambda state, key: timed_out(state, key, args.example, limits, owned=workflows),
                metrics_port=args.metrics_port, running=lambda store: store.count(WORKFLOW, b'"state":"running"'),
                take_over=tuple(overlapping(workflows)), check=lambda admin, stop: alone(admin, workflows, stop))


if __name__ == "__main__":
    main()
