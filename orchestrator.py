"""Orchestrator: owns the workflows. Reads message_stream; route() below decides which commands each event causes.

Consumes: message_stream.<writer> of the writers of the workflows active at --example (each may send only its own
          types; a later stage's events wait in Kafka until an orchestrator at that stage reads them), and
          message_stream.operator (a person's requests: python workflows.py cancel ID / retry ID)
Produces: the commands of WORKFLOWS' steps (topics and message types: contracts.py), dead_letter.orchestrator,
          message_stream.orchestrator (step_timed_out, workflow_completed, workflow_failed; answers to a person's
          requests: workflow_cancelled, workflow_retried, operator_request_refused)
Run:      python orchestrator.py --example 1         # the walkthrough's stage: 1, 2, 3 (the default) or 4
          python orchestrator.py --workflows security  # one orchestrator per workflow; each restarts on its own
          python orchestrator.py --step-timeout 2 --attempts 2  # each step's time limit and tries
          python orchestrator.py --dry-run --example 4 --compare 3  # preview a routing change on the recorded
                                                      # message_stream: produces and commits nothing
A workflow changes by editing route() and WORKFLOWS here, then restarting this script; the services never change.
Messages that arrive while it is down wait in message_stream and are routed once it is back; a workflow in flight
goes on as the stage it started under routes it.
"""

from common import ANSWERS, FINISHED, DeadLetter, Envelope, Output, Step, Workflow, caused_by, reports_done, run_orchestrator
from contracts import NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND

SOURCE = "orchestrator"


def route(event: Envelope, stage: int = 3) -> list[Output]:
    """The routing table: the commands an event causes at a stage of the walkthrough (--example)."""
    if event.type == "security_detection":
        commands = [(SEC_COMMAND, security_command(event)), (NOTIFICATION_COMMAND, notify_on_duty(event))]
        if stage >= 2:  # EXAMPLE 2: the walkthrough's "uncomment the reporting line".
            commands.append((REPORT_DATA, report(event, "security", event.payload["kind"], event.payload["sensor_id"])))
        return commands
    elif event.type == "unit_event" and stage >= 3:  # EXAMPLE 3: the new unit-event workflow.
        return [(UNIT_COMMAND, unit_command(event)),
                (REPORT_DATA, report(event, "unit", event.payload["status"], event.payload["unit_id"]))]
    elif event.type == "security_action_completed" and guarded(event) and stage >= 4:  # EXAMPLE 4: the next step
        return [(SEC_COMMAND, unlock_zone(event)), (NOTIFICATION_COMMAND, all_clear(event))]
    elif event.type == "security_action_failed" and guarded(event) and stage >= 4:  # EXAMPLE 4: the compensation
        return [(SEC_COMMAND, lock_down(event)), (NOTIFICATION_COMMAND, escalate(event))]
    elif event.type == "security_action_failed":  # a failed action: a person takes over
        return [(NOTIFICATION_COMMAND, escalate(event))]
    elif event.type == "step_timed_out" and event.payload["attempt"] < event.payload["attempts"]:
        return [(event.payload["topic"], Envelope.model_validate(event.payload["command"]))]  # again, same id
    elif event.type == "step_timed_out":  # no answer after every try: a person takes over
        return [(NOTIFICATION_COMMAND, escalate_timeout(event))]
    elif event.type == "workflow_cancel_requested":  # a person stopped the workflow: nothing more is sent
        return []
    elif event.type == "workflow_retry_requested":  # a person retries its failed step: its command, under a new id
        return [(event.payload["topic"], Envelope.model_validate(event.payload["command"]))]
    elif reports_done(WORKFLOWS, event.type) or event.type in FINISHED + ANSWERS:  # (the orchestrator's own too)
        return []  # a step reported done (security_action_completed, ...): nothing follows
    else:
        raise DeadLetter(f"no route for {event.type!r} at example {stage}")


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


def guarded(outcome: Envelope) -> bool:
    """Whether a security outcome is a guard's: the guard reported the zone clear, or could not be dispatched."""
    return outcome.payload["action"] == "dispatch_guard"


def unlock_zone(event: Envelope) -> Envelope:
    return caused_by(event, "unlock", "security_command", {"action": "unlock_zone", "zone": event.payload["zone"]},
                     SOURCE)


def lock_down(event: Envelope) -> Envelope:
    return caused_by(event, "lock-down", "security_command", {"action": "lock_zone", "zone": event.payload["zone"]},
                     SOURCE)


def all_clear(event: Envelope) -> Envelope:
    zone = event.payload["zone"]
    return caused_by(event, "all-clear", "notification_command", {
        "channel": "sms", "recipient": f"on-duty-{zone}", "text": f"all clear at {zone}: the guard found nothing; "
                                                                 f"the zone is unlocked"}, SOURCE)


def escalate(event: Envelope) -> Envelope:
    outcome = event.payload
    return caused_by(event, "escalate", "notification_command", {
        "channel": "pager", "recipient": "security-supervisor",
        "text": f"ESCALATION: {outcome['action']} failed at {outcome['zone']}: {outcome['detail']}"}, SOURCE)


def escalate_timeout(event: Envelope) -> Envelope:
    timeout = event.payload  # (any workflow's step: its command said in a few words)
    command = ", ".join(f"{name} {value}" for name, value in timeout["command"]["payload"].items() if value is not None)
    return caused_by(event, "escalate", "notification_command", {
        "channel": "pager", "recipient": f"{timeout['workflow']}-supervisor",
        "text": f"ESCALATION: {timeout['step']} ({command[:300]}) got no answer after {timeout['attempts']} attempts"},
        SOURCE)


def unit_command(event: Envelope) -> Envelope:
    command = {"heartbeat": "acknowledge", "battery_low": "power_save", "offline": "reboot", "tamper": "lockdown"}
    unit = event.payload
    return caused_by(event, "unit", "unit_command", {"unit_id": unit["unit_id"], "command": command[unit["status"]]},
                     SOURCE)


def report(event: Envelope, workflow: str, category: str, entity: str) -> Envelope:
    return caused_by(event, "report", "report_data", {
        "workflow": workflow, "category": category, "entity": entity, "zone": event.payload.get("zone", "")}, SOURCE)


# Each workflow once: every step route() above may send, what each follows (none: sent as the workflow starts) and
# who does it. The engine keeps each workflow's state from them (a step is pending until its report, tried again
# past its time limit; a workflow ends when no step is pending), and --workflows ownership, the monitor, the dry run
# and the ACLs read them too. tests/test_routing_table.py checks route() agrees with this table.
SECURITY_DONE, SECURITY_FAILED = ("security_action_completed",), ("security_action_failed",)
WORKFLOWS = {
    "security": Workflow("security_detection", "security_detector", started="detected", steps=(
        Step("acted", "security_command", SEC_COMMAND, "security_service", time_limit=5.0,
             done=SECURITY_DONE, failed=SECURITY_FAILED),
        Step("notified", "notification_command", NOTIFICATION_COMMAND, "notification_service",
             done=("notification_delivered",), reports_on=THIRD_PARTY),
        Step("reported", "report_data", REPORT_DATA, "reporting_service", from_stage=2),
        Step("escalated", "notification_command", NOTIFICATION_COMMAND, "notification_service",
             after=("acted", "unlocked", "locked_down"), when="failed"),
        Step("unlocked", "security_command", SEC_COMMAND, "security_service", from_stage=4, after="acted",
             time_limit=5.0, done=SECURITY_DONE, failed=SECURITY_FAILED),
        Step("told", "notification_command", NOTIFICATION_COMMAND, "notification_service", from_stage=4, after="acted"),
        Step("locked_down", "security_command", SEC_COMMAND, "security_service", from_stage=4, after="acted",
             when="failed", time_limit=5.0, done=SECURITY_DONE, failed=SECURITY_FAILED))),
    "unit": Workflow("unit_event", "unit_event_producer", from_stage=3, started="event", steps=(
        Step("applied", "unit_command", UNIT_COMMAND, "unit_event_producer", time_limit=5.0,
             done=("unit_command_applied",)),
        Step("reported", "report_data", REPORT_DATA, "reporting_service"),
        Step("escalated", "notification_command", NOTIFICATION_COMMAND, "notification_service", after="applied",
             when="failed"))),
}


def main() -> None:
    # Everything beyond the table (flags, the workflows' state and time limits, exactly once, splitting) is the
    # engine's, in common/: it is handed the table and route().
    run_orchestrator(__doc__, WORKFLOWS, route, default_stage=3)  # (the seed's last example; 4 goes beyond it)


if __name__ == "__main__":
    main()
