"""The three views agree with the orchestrator, workflow by workflow, against a real broker: after a mixed run (one
completed, one failed, one failed and retried to completion, one cancelled by a bulk cancel, one whose event is a
dead letter, one that waits for a later example), `monitor.py --once --json --workflows`, `workflows.py list --json`
and the console's API say the same state of each."""

import json
import os
import signal
import time
import urllib.request

from helpers import detection, ids_of, unit_event, wait_until

import local_kafka
from common import MESSAGE_STREAM, new_event
from contracts import SEC_COMMAND


def lines(result) -> dict[str, dict]:
    return {row["workflow_id"]: row for row in map(json.loads, result.stdout.splitlines())}


def test_the_monitor_the_list_and_the_console_say_what_the_orchestrator_says(scripts, topics, producer):
    # Given the orchestrator at Example 1, no security service yet: a first workflow waits for its action
    scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "300")
    stream, commands = topics(MESSAGE_STREAM), topics(SEC_COMMAND)
    cancelled = detection()
    producer(MESSAGE_STREAM, cancelled, key=b"sensor-1")
    commands.read_until(lambda ms: cancelled.workflow_id in ids_of(ms, "security_command"))
    # When a person cancels every running security workflow (a bulk cancel by filter: it finds this one)
    bulk = scripts.run("workflows.py", "cancel", "--type", "security", "--state", "running", "--reason", "drill",
                       "--by", "ann", "--yes")
    assert bulk.stdout.splitlines()[0] == f"cancel 1 workflow: {cancelled.workflow_id[:8]}"
    assert bulk.stdout.splitlines()[-1] == "1 asked: 1 granted, 0 not"
    # And a security service whose zone-2 fails starts; one detection completes, one fails, one fails and is retried
    failing = scripts.start("security_service.py", "--fail-zones", "zone-2")
    completed, failed, retried = detection(), zone_2(), zone_2()
    for event in (completed, failed, retried):
        producer(MESSAGE_STREAM, event, key=event.payload["sensor_id"].encode())
    stream.read_until(lambda ms: {failed.workflow_id, retried.workflow_id} <= ids_of(ms, "workflow_failed"))
    scripts.stop(failing)
    scripts.start("security_service.py")
    scripts.run("workflows.py", "retry", retried.workflow_id, "--reason", "actuator fixed")
    # And an event the orchestrator dead-letters (no sensor named), and a unit event Example 1 does not route
    dead = new_event("security_detection", {"sensor_id": "sensor-1", "zone": "zone-1", "kind": "motion",
                                            "severity": 3}, "test").model_copy(update={"payload": {"zone": "zone-1"}})
    waiting = unit_event()
    producer(MESSAGE_STREAM, dead, key=b"sensor-1")
    producer(MESSAGE_STREAM, waiting, key=b"unit-1")
    ended = {completed.workflow_id, retried.workflow_id}
    stream.read_until(lambda ms: ended <= ids_of(ms, "workflow_completed"))
    topics("dead_letter").read_until(lambda ms: len(ms) >= 1)
    # Then the list (the orchestrator's state) says what happened
    listed = {w: row["state"] for w, row in lines(scripts.run("workflows.py", "list", "--json")).items()}
    assert listed == {cancelled.workflow_id: "cancelled", completed.workflow_id: "completed",
                      failed.workflow_id: "failed", retried.workflow_id: "completed"}
    # And the monitor says the same of each, and of the other two: dead-lettered, waiting
    monitored = lines(scripts.run("monitor.py", "--once", "--json", "--workflows"))
    assert {w: row["state"] for w, row in monitored.items()} == listed | {dead.workflow_id: "dead_lettered",
                                                                         waiting.workflow_id: "waiting"}
    # And so does the console, once it has read the topics to their end
    port = local_kafka.free_port()
    scripts.wait_for_output(scripts.start("console.py", "--port", str(port)), f"console: http://127.0.0.1:{port}")
    shown = console_rows(port)
    assert {w: row["state"] for w, row in shown.items()} == listed | {dead.workflow_id: "dead_lettered",
                                                                     waiting.workflow_id: "waiting"}
    assert all(row["stuck"] is None for w, row in shown.items() if w != waiting.workflow_id)
    # And the console finds one by its entity, and the failed one by state
    found = api(port, "/api/workflows?entity=zone-2&state=failed")
    assert [row["workflow_id"] for row in found["rows"]] == [failed.workflow_id] and found["total"] == 1


def zone_2():
    return new_event("security_detection", {"sensor_id": "sensor-2", "zone": "zone-2", "kind": "motion",
                                            "severity": 3}, "test")


def api(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


def console_rows(port: int) -> dict[str, dict]:
    """The console's rows once it has read the topics to their end (it says so: "reading" false)."""
    def read() -> dict | None:
        page = api(port, "/api/workflows?per_page=1000")
        return None if page["reading"] else {row["workflow_id"]: row for row in page["rows"]}
    return wait_until(read, timeout=60, what="the console read the topics to their end")


def test_when_kafka_does_not_answer_the_console_says_so_and_marks_its_figures_old(scripts, env, tmp_path):
    # Given a broker of this test's own, a workflow on it, and the console reading it
    started, _ = local_kafka.start(local_kafka.free_port(), tmp_path / "kafka")
    env.update(KAFKA_BOOTSTRAP_SERVERS=started.address)
    try:
        scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "300")
        scripts.run("security_detector.py", "--count", "1")
        port = local_kafka.free_port()
        scripts.wait_for_output(scripts.start("console.py", "--port", str(port)), f"console: http://127.0.0.1:{port}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events", timeout=60) as events:
            next_event(events, lambda said: said["figures"]["workflows"]["started"] == 1 and said["problem"] is None)
            # When the broker stops answering (SIGSTOP: its connections stay open, nothing comes back)
            os.killpg(started.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                stale = next_event(events, lambda said: said["problem"] is not None)
                took = time.monotonic() - stopped
            finally:
                os.killpg(started.pid, signal.SIGCONT)
            # Then the page is told so, with the time its figures are from, and keeps them
            assert stale["problem"].startswith("Kafka does not answer: the figures are as of ")
            assert stale["answered_at"] <= time.time() and stale["figures"]["workflows"]["started"] == 1
            print(f"console: said Kafka does not answer {took:.1f} s after the broker stopped")
            # And once it answers again, the problem is gone
            assert next_event(events, lambda said: said["problem"] is None)["figures"]["workflows"]["started"] == 1
    finally:
        local_kafka.stop(tmp_path / "kafka")


def next_event(events, wanted) -> dict:
    """The next server-sent event of the console's that `wanted` holds for (the stream sends one a second)."""
    for line in events:
        if line.startswith(b"data: ") and wanted(said := json.loads(line[6:])):
            return said
    raise AssertionError("the console's events ended")
