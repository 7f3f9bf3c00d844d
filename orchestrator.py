"""Orchestrator: owns the workflows. Reads message_stream; route() below decides which commands each event causes.

Consumes: message_stream.<writer> of the writers of the workflows active at --example (each may send only its own
          types; a later stage's events wait in Kafka until an orchestrator at that stage reads them), and
          message_stream.operator (a person's requests: python workflows.py cancel ID / retry ID)
Produces: sec_command, notification_command, report_data, unit_command, dead_letter.orchestrator,
          message_stream.orchestrator (step_timed_out, workflow_completed, workflow_failed; answers to a person's
          requests: workflow_cancelled, workflow_retried, operator_request_refused)
Run:      python orchestrator.py --example 1         # the walkthrough's stage: 1, 2 or 3 (default 3)
          python orchestrator.py --workflows security  # one orchestrator per workflow; each restarts on its own
          python orchestrator.py --step-timeout 2 --attempts 2  # each step's time limit and tries
          python orchestrator.py --dry-run --example 3 --compare 2  # preview a routing change on the recorded
                                                      # message_stream: produces and commits nothing
A workflow changes by editing route() and WORKFLOWS here, then restarting this script; the services never change.
Messages that arrive while it is down wait in message_stream and are routed once it is back.
"""

from common import (ANSWERS, FINISHED, NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND, DeadLetter,
                    Envelope, Output, Step, Workflow, caused_by, reports_done, run_orchestrator)

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
    elif event.type == "security_action_failed":  # compensation is just another route: escalate to a human
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
                f"{timeout['attempts']} attempts"}, SOURCE)


def unit_command(event: Envelope) -> Envelope:
    command = {"heartbeat": "acknowledge", "battery_low": "power_save", "offline": "reboot", "tamper": "lockdown"}
    unit = event.payload
    return caused_by(event, "unit", "unit_command", {"unit_id": unit["unit_id"], "command": command[unit["status"]]},
                     SOURCE)


def report(event: Envelope, workflow: str, category: str, entity: str) -> Envelope:
    return caused_by(event, "report", "report_data", {
        "workflow": workflow, "category": category, "entity": entity, "zone": event.payload.get("zone", "")}, SOURCE)


# Each workflow once: route() above sends these steps' commands; the engine keeps each workflow's state from them (a
# step is pending until its report, tried again past its time limit), and --workflows ownership, the monitor, the
# dry run and the ACLs read them too. tests/test_routing_table.py checks route() agrees with this table.
WORKFLOWS = {
    "security": Workflow("security_detection", "security_detector", started="detected", steps=(
        Step("acted", "security_command", SEC_COMMAND, "security_service", time_limit=5.0,
             done=("security_action_completed",), failed=("security_action_failed",)),
        Step("notified", "notification_command", NOTIFICATION_COMMAND, "notification_service",
             done=("notification_delivered",), reports_on=THIRD_PARTY),
        Step("reported", "report_data", REPORT_DATA, "reporting_service", from_stage=2))),
    "unit": Workflow("unit_event", "unit_event_producer", from_stage=3, started="event", steps=(
        Step("applied", "unit_command", UNIT_COMMAND, "unit_event_producer", time_limit=5.0,
             done=("unit_command_applied",)),
        Step("reported", "report_data", REPORT_DATA, "reporting_service"))),
}


def main() -> None:
    # Everything beyond the table (flags, the workflows' state and time limits, exactly once, splitting) is the
    # engine's, in common/: it is handed the table and route().
    run_orchestrator(__doc__, WORKFLOWS, route)


if __name__ == "__main__":
    main()
