"""Orchestrator: owns the workflows. Reads message_stream, decides with the routing table below which commands to send.

Consumes: message_stream.<writer> of its workflows' writers (each may send only its own types)
Produces: sec_command, notification_command, report_data, unit_command, dead_letter.orchestrator
Run:      python orchestrator.py --example 1        # stage of the walkthrough: 1, 2 or 3 (default 3, everything)
          python orchestrator.py --workflows security   # one orchestrator per workflow, each restarts on its own
          python orchestrator.py --dry-run --example 3 --compare 2   # preview a routing change on the recorded
                                                        # message_stream: produces and commits nothing
Changing a workflow means editing its entry in WORKFLOWS and its branch of route(), then restarting this script; the
services never change. Messages that arrive while it is down wait in message_stream and are routed once it is back.
"""

import argparse
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime

from common import (DEAD_LETTER, MESSAGE_STREAM, NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND,
                    SETTINGS, DeadLetter, Envelope, Output, caused_by, parse, read_all, run_service, setup_logging,
                    written_by)

log = logging.getLogger("orchestrator")
SOURCE = "orchestrator"


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
        Step("acted", "security_command", SEC_COMMAND, "security_service",
             done=("security_action_completed",), failed=("security_action_failed",)),
        Step("notified", "notification_command", NOTIFICATION_COMMAND, "notification_service",
             done=("notification_delivered",), reports_on=THIRD_PARTY),
        Step("reported", "report_data", REPORT_DATA, "reporting_service", from_example=2))),
    "unit": Workflow("unit_event", "unit_event_producer", from_example=3, started="event", steps=(
        Step("applied", "unit_command", UNIT_COMMAND, "unit_event_producer", done=("unit_command_applied",)),
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
    elif reports_done(event.type):  # a step reported done (security_action_completed, ...): nothing follows
        return []
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


def unit_command(event: Envelope) -> Envelope:
    command = {"heartbeat": "acknowledge", "battery_low": "power_save", "offline": "reboot", "tamper": "lockdown"}
    unit = event.payload
    return caused_by(event, "unit", "unit_command", {"unit_id": unit["unit_id"], "command": command[unit["status"]]},
                     SOURCE)


def report(event: Envelope, workflow: str, category: str, entity: str) -> Envelope:
    return caused_by(event, "report", "report_data", {
        "workflow": workflow, "category": category, "entity": entity, "zone": event.payload.get("zone", "")}, SOURCE)


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
            if step.reports_on == MESSAGE_STREAM and step.done + step.failed:
                may_send.setdefault(step.service, set()).update(step.done + step.failed)
    return {written_by(MESSAGE_STREAM, writer): frozenset(types) for writer, types in may_send.items()}


def command_topics() -> tuple[str, ...]:
    """The topics the orchestrator writes: each step's."""
    return tuple(dict.fromkeys(step.topic for workflow in WORKFLOWS.values() for step in workflow.steps))


def group_for(workflows: set[str]) -> str:
    """One consumer group per set of workflows, so split orchestrators each read every event and restart alone."""
    return "orchestrator" if workflows == set(WORKFLOWS) else "orchestrator-" + "-".join(sorted(workflows))


def preview(records, example: int, workflows: set[str]) -> dict[str, Counter]:
    """What route() would emit for recorded events: event type -> Counter of output topics (nothing is sent)."""
    emitted: dict[str, Counter] = defaultdict(Counter)
    accepts = senders(workflows)
    for record in records:
        allowed = accepts.get(record.topic.removeprefix(SETTINGS.topic_prefix))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", type=int, choices=[1, 2, 3], default=3, help="walkthrough stage (default 3)")
    parser.add_argument("--workflows", help=f"comma-separated subset of {','.join(WORKFLOWS)} (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="preview routing of the recorded message_stream")
    parser.add_argument("--since", help="with --dry-run: only messages from this ISO time on (e.g. 2026-11-27T18:00)")
    parser.add_argument("--compare", type=int, choices=[1, 2, 3], help="with --dry-run: a second stage to compare")
    parser.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    parser.add_argument("--no-transactions", action="store_true",
                        help="at least once instead of exactly once (for comparison in the benchmark)")
    args = parser.parse_args()
    setup_logging()
    workflows = set(args.workflows.split(",")) if args.workflows is not None else set(WORKFLOWS)
    if not workflows or not workflows <= set(WORKFLOWS):
        parser.error(f"--workflows takes a comma-separated subset of {','.join(WORKFLOWS)}, not {args.workflows!r}")
    group, split = group_for(workflows), workflows != set(WORKFLOWS)
    active = sorted(w for w in workflows if WORKFLOWS[w].from_example <= args.example)
    if args.dry_run:
        return dry_run(args, workflows)
    later = ", ".join(f"{w} starts at {WORKFLOWS[w].from_example}" for w in sorted(workflows - set(active)))
    log.info("routing table: example %d, workflows %s", args.example, ", ".join(active) or f"none yet ({later})")

    def handle(event: Envelope) -> list[Output]:
        if not owns(event.type, workflows):
            return []
        commands = route(event, args.example)
        log.info("%s %s -> %s", event.type, event.workflow_id[:8], ", ".join(t for t, _ in commands) or "done")
        return commands

    # Exactly once: the commands routed from a batch and the batch's offsets commit in one Kafka transaction.
    # A split orchestrator's new group takes over where the single orchestrator left off, not from the beginning.
    # dedupe: an event handled before is not routed again, and the same id with other content is a dead letter.
    # It reads only the writers of its workflows, each allowed only its own message types.
    accepts = senders(workflows)
    run_service("orchestrator", list(accepts), handle, writes=command_topics(), accepts=accepts, group=group,
                transactional=not args.no_transactions, dedupe=True, start_like="orchestrator" if split else None)


if __name__ == "__main__":
    main()
