"""The orchestrator's Example-2 job done by Quix Streams, for bench.py to compare (not part of the walkthrough).

Reads the detector's member of message_stream; for each detection not handled before (its workflow entry is in the
state store, whose changelog Quix keeps in Kafka), writes the three Example-2 commands (sec_command,
notification_command, report_data) and a workflow entry of the orchestrator's size. Exactly once.
It checks less than the orchestrator: no envelope or payload validation, no per-writer type check, no time limits.
Run by bench.py: python peers/quix_router.py BOOTSTRAP PREFIX GROUP STATE_DIR COMMIT_INTERVAL_S (0: Quix's default)
"""

import sys
from datetime import datetime, timezone

from quixstreams import Application


PAD = "x" * 173  # (the entry is then the size of the orchestrator's, about 740 bytes as compact JSON)


def commands(detection: dict) -> dict:
    """The three commands of one detection, and the workflow entry kept for it (about 740 bytes as JSON)."""
    workflow, payload, now = detection["workflow_id"], detection["payload"], datetime.now(timezone.utc).isoformat()
    severity, zone, sensor = payload["severity"], payload["zone"], payload["sensor_id"]

    def command(suffix: str, type_: str, body: dict) -> dict:
        return {"id": f"{detection['id']}.{suffix}", "type": type_, "workflow_id": workflow, "source": "orchestrator",
                "created_at": now, "payload": body}
    security = command("security", "security_command", {
        "action": "dispatch_guard" if severity >= 4 else "lock_zone" if severity == 3 else "inspect",
        "zone": zone, "sensor_id": sensor, "severity": severity})
    notify = command("notify", "notification_command", {
        "channel": "pager" if severity >= 4 else "sms", "recipient": f"on-duty-{zone}",
        "text": f"{payload['kind']} at {zone} (sensor {sensor}, severity {severity})"})
    report = command("report", "report_data", {"workflow": "security", "category": payload["kind"], "entity": sensor,
                                               "zone": zone})
    entry = {"workflow_id": workflow, "type": "security", "stage": 2, "state": "running", "started_at": now,
             "steps": {"acted": {"state": "pending", "attempts": 1, "command": security}}, "handled": {detection["id"]: 1},
             "pad": PAD}
    return {"security": security, "notify": notify, "report": report, "entry": entry}


def main() -> None:
    bootstrap, prefix, group, state_dir, interval = sys.argv[1:6]
    app = Application(broker_address=bootstrap, consumer_group=group, auto_offset_reset="earliest",
                      processing_guarantee="exactly-once", state_dir=state_dir,
                      **({"commit_interval": float(interval)} if float(interval) else {}))
    detections = app.topic(prefix + "message_stream.security_detector", value_deserializer="json")
    outputs = {name: app.topic(prefix + topic, value_serializer="json")
               for name, topic in (("security", "sec_command"), ("notify", "notification_command"),
                                   ("report", "report_data"))}

    def route(detection: dict, state) -> dict | None:
        key = "workflow/" + detection["workflow_id"]
        if state.get(key) is not None:  # handled before: nothing is sent again
            return None
        routed = commands(detection)
        state.set(key, routed["entry"])
        return routed

    routed = app.dataframe(detections).apply(route, stateful=True).filter(lambda value: value is not None)
    for name, topic in outputs.items():
        routed.apply(lambda value, name=name: value[name]).to_topic(topic)
    app.run()


if __name__ == "__main__":
    main()
