"""monitor.py and orchestrator.py --dry-run against a real broker, on workflows whose steps and times are known."""

import json
from datetime import datetime, timedelta, timezone

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from common import MESSAGE_STREAM, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND, caused_by, new_event
from orchestrator import route
from test_orchestrator import detection, unit_event


def at(message, seconds_ago: float):
    """The message as if created `seconds_ago` seconds ago."""
    return message.model_copy(update={"created_at": datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)})


def outcome(command, type_, **payload):
    return caused_by(command, "done", type_, {"action": "lock_zone", "zone": "zone-1", "detail": "", **payload}, "t")


def test_once_shows_completed_failed_and_stuck_workflows(scripts, producer):
    # Given three security workflows on the topics: one completed, one whose action failed, one stuck after routing
    done, failed, stuck = detection(), detection(), detection()
    for event, age in ((done, 10), (failed, 10), (stuck, 60)):
        producer(MESSAGE_STREAM, at(event, age))
        for name, command in route(event, example=1):
            producer(name, at(command, age - 0.5))
    producer(MESSAGE_STREAM, at(outcome(route(done, 1)[0][1], "security_action_completed"), 9))
    producer(THIRD_PARTY, at(caused_by(route(done, 1)[1][1], "delivered", "notification_delivered",
                                       route(done, 1)[1][1].payload, "t"), 9))
    producer(MESSAGE_STREAM, at(outcome(route(failed, 1)[0][1], "security_action_failed", detail="jammed"), 9))
    # When the monitor takes one snapshot with a 5 s SLA
    screen = scripts.run("monitor.py", "--once", "--sla", "5").stdout
    rows = {line.split("│")[1].strip(): line for line in screen.splitlines() if line.count("│") > 4}
    # Then each workflow shows its state, and the stuck one names the missing step and its service
    assert "completed" in rows[done.id[:8]] and "latency" not in rows[done.id[:8]]
    assert "failed" in rows[failed.id[:8]]
    assert "STUCK: no 'acted' from security_service" in rows[stuck.id[:8]]
    assert "workflows: 3 started, 1 completed, duplicates 0" in screen


def test_sla_report_gives_percentiles_and_breaches_of_known_latencies(scripts, producer):
    # Given ten unit workflows that took 1, 2, ... 10 s end to end
    for latency in range(1, 11):
        event = at(unit_event("offline"), 100)
        command = route(event, example=3)[0][1]
        applied = caused_by(command, "applied", "unit_command_applied",
                            {"unit_id": "unit-1", "command": "reboot", "state": "rebooting"}, "t")
        producer(MESSAGE_STREAM, event)
        producer(UNIT_COMMAND, at(command, 99.5))
        producer(MESSAGE_STREAM, applied.model_copy(update={"created_at": event.created_at + timedelta(seconds=latency)}))
    # When the SLA report is asked for with a 5 s SLA
    report = json.loads(scripts.run("monitor.py", "--sla-report", "--json", "--sla", "5").stdout)
    # Then the nearest-rank percentiles and the five late workflows are reported
    assert report["unit"] == {"count": 10, "completed": 10, "p50": 5.0, "p95": 10.0, "p99": 10.0, "sla_s": 5.0,
                              "breaches": 5}
    assert report["security"]["count"] == 0 and report["security"]["p50"] is None
    # And a window that excludes them counts none
    recent = json.loads(scripts.run("monitor.py", "--sla-report", "--json", "--window", "30").stdout)
    assert recent["unit"]["count"] == 0


def test_dry_run_previews_a_routing_change_and_produces_and_commits_nothing(env, scripts, producer):
    # Given recorded traffic: three detections, two unit events and one junk message
    events = [detection() for _ in range(3)] + [unit_event() for _ in range(2)]
    for event in events:
        producer(MESSAGE_STREAM, event)
    producer(MESSAGE_STREAM, b"junk")
    # When the Example 2 table is previewed against Example 3
    preview = json.loads(scripts.run("orchestrator.py", "--dry-run", "--example", "2", "--compare", "3", "--json").stdout)
    # Then its counts are those of route() for each stage
    assert preview["example 2"] == {"security_detection": {"sec_command": 3, "notification_command": 3, "report_data": 3},
                                    "unit_event": {"dead_letter": 2}, "(invalid)": {"dead_letter": 1}}
    assert preview["example 3"]["unit_event"] == {"unit_command": 2, "report_data": 2}
    assert sum(len(route(e, 3)) for e in events) == sum(sum(c.values()) for t, c in preview["example 3"].items()
                                                         if t != "(invalid)")
    # And nothing was produced or committed
    consumer = KafkaConsumer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    partition = TopicPartition(env["TOPIC_PREFIX"] + SEC_COMMAND, 0)
    assert consumer.end_offsets([partition])[partition] == 0
    consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    group = env["TOPIC_PREFIX"] + "orchestrator"
    assert not admin.list_group_offsets({group: None}).get(group)
    admin.close()


def test_a_failed_security_action_is_escalated_end_to_end(scripts, topics, producer):
    # Given services where every action in zone-1 fails
    scripts.start("security_service.py", "--fail-zones", "zone-1")
    scripts.start("notification_service.py")
    scripts.start("orchestrator.py", "--example", "1")
    # When a detection in zone-1 arrives
    event = new_event("security_detection", {"sensor_id": "sensor-1", "zone": "zone-1", "kind": "smoke",
                                              "severity": 5}, "test")
    producer(MESSAGE_STREAM, event)
    # Then the on-duty notification and an escalation to the supervisor are both delivered, in the same workflow
    delivered = topics(THIRD_PARTY).read_count(2)
    assert sorted(m.payload["recipient"] for m in delivered) == ["on-duty-zone-1", "security-supervisor"]
    assert {m.workflow_id for m in delivered} == {event.id}
    escalation = next(m for m in delivered if m.payload["recipient"] == "security-supervisor")
    assert escalation.payload["text"] == "ESCALATION: dispatch_guard failed at zone-1: actuator not responding"
