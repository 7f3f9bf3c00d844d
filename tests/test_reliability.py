"""Delivery guarantees against a real broker: crashes, a broker outage, replay (a store that fails: test_hardening.py)."""

import random
import re
import signal
import time

import pytest

from helpers import (NO_RESENDS, detections, exactly_one_each, report_summary, unit_event, wait_completed,
                     wait_for_reports)

import local_kafka
from common import MESSAGE_STREAM
from contracts import NOTIFICATION_COMMAND, SEC_COMMAND, THIRD_PARTY

SERVICES = ("security_service.py", "notification_service.py", "reporting_service.py")


@pytest.mark.parametrize("window_ms", ["0", "40"])  # (a commit window gathers several polls into one transaction)
def test_killing_the_orchestrator_repeatedly_loses_and_doubles_no_command(scripts, topics, window_ms):
    # Given the Example 2 system and 200 detections streaming in
    for service in SERVICES:
        scripts.start(service)
    orchestrator = scripts.start("orchestrator.py", "--example", "2", *NO_RESENDS, COMMIT_WINDOW_MS=window_ms)
    scripts.start("security_detector.py", "--count", "200", "--rate", "40", "--seed", "11")
    commands, notifications = topics(SEC_COMMAND), topics(NOTIFICATION_COMMAND)
    stream, third_party = topics(MESSAGE_STREAM), topics(THIRD_PARTY)
    # When the orchestrator is killed with SIGKILL at random moments (after 5-30 more commands) and restarted
    rng, kills = random.Random(5), 0
    for _ in range(4):
        routed = len(commands.messages())
        commands.read_count(min(200, routed + rng.randint(5, 30)))
        orchestrator = scripts.restart(orchestrator, signal.SIGKILL)
        kills += 1
    # Then every detection has exactly one security command and one notification command (read committed)
    workflows = detections(stream.read_count(200, type_="security_detection"))
    exactly_one_each(workflows, commands, notifications, timeout=120)
    # And every workflow completes, each reported once
    wait_completed(stream, third_party, workflows, timeout=120)
    assert wait_for_reports(scripts, 200)["reports"] == 200
    print(f"chaos: sent=200 kills={kills} commands={len(commands.messages())} lost=0 duplicates=0")


def test_killing_each_downstream_service_once_loses_nothing(scripts, topics):
    # Given the Example 2 system and 150 detections streaming in
    services = {name: scripts.start(name) for name in SERVICES}
    scripts.start("orchestrator.py", "--example", "2")
    scripts.start("security_detector.py", "--count", "150", "--rate", "30", "--seed", "12")
    stream, third_party, commands = topics(MESSAGE_STREAM), topics(THIRD_PARTY), topics(SEC_COMMAND)
    # When each downstream service is killed with SIGKILL mid-stream and started again
    for i, (name, process) in enumerate(services.items()):
        commands.read_count(30 * (i + 1))
        services[name] = scripts.restart(process, signal.SIGKILL)
    # Then every workflow completes and the report store counts each workflow once
    workflows = detections(stream.read_count(150, type_="security_detection"))
    wait_completed(stream, third_party, workflows, timeout=120)
    summary = wait_for_reports(scripts, 150)
    assert summary["reports"] == 150
    delivered = [m for m in third_party.messages() if m.type == "notification_delivered"]
    assert len(delivered) == len({m.id for m in delivered}) == 150  # exactly once on third_party, SIGKILL or not
    print(f"kill -9 downstream: sent=150 kills=3 completed={len(workflows)} reports={summary['reports']} "
          f"deliveries={len(delivered)}")


def test_a_broker_outage_is_ridden_out_without_restarting_any_service(tmp_path, env, scripts, topics):
    # Given a broker of this test's own, the Example 2 system on it, and detections streaming in
    port = local_kafka.free_port()
    broker, _ = local_kafka.start(port, tmp_path / "kafka")
    env["KAFKA_BOOTSTRAP_SERVERS"] = broker.address
    try:
        running = [scripts.start(name) for name in (*SERVICES, "orchestrator.py")]
        running.append(scripts.start("security_detector.py", "--count", "150", "--rate", "5", "--seed", "13"))
        commands = topics(SEC_COMMAND)
        commands.read_count(20, timeout=90)
        # When the broker stops for 15 s mid-stream and comes back on the same data
        local_kafka.stop(tmp_path / "kafka")
        down_until = time.monotonic() + 15
        while time.monotonic() < down_until:  # the outage itself; the services must stay up throughout
            assert all(p.poll() is None for p in running), "a process exited while the broker was down"
            time.sleep(0.5)
        routed_before = len(commands.messages())
        local_kafka.start(port, tmp_path / "kafka")
        back = time.monotonic()
        commands.read_count(routed_before + 1, timeout=120)
        resumed = time.monotonic() - back
        # Then all workflows complete without restarting any service
        stream, third_party = topics(MESSAGE_STREAM), topics(THIRD_PARTY)
        workflows = detections(stream.read_count(150, type_="security_detection", timeout=120))
        wait_completed(stream, third_party, workflows, timeout=120)
        assert wait_for_reports(scripts, 150, timeout=120)["reports"] == 150
        assert all(p.poll() is None for p in running[:-1])
        # And meanwhile the detector said how long and how many of its messages waited
        assert re.search(r"security_detector: \d+ messages? waiting 10 s for Kafka to acknowledge them; still trying",
                         scripts.output(running[-1]))
        print(f"broker outage: 15 s; first command routed {resumed:.1f} s after the broker was back; "
              f"sent=150 completed={len(workflows)} lost=0")
    finally:
        scripts.stop_all()
        local_kafka.stop(tmp_path / "kafka")


def test_a_fixed_and_replayed_dead_letter_has_its_effect_once(scripts, topics, producer):
    # Given a reporting service left at Example 2 (no unit section) under an Example 3 orchestrator
    reporting = scripts.start("reporting_service.py", "--example", "2")
    scripts.start("orchestrator.py", "--example", "3")
    scripts.start("unit_event_producer.py", "--count", "0")
    event = unit_event("tamper")
    producer(MESSAGE_STREAM, event, key=b"unit-1")
    [letter] = topics("dead_letter").read_count(1)
    assert letter.payload["reason"] == "no report section for 'unit' reports at example 2"
    # When the cause is fixed (the reporting service restarted at Example 3) and the dead letter replayed
    scripts.stop(reporting)
    reporting = scripts.start("reporting_service.py", "--example", "3")
    assert scripts.run("dead_letters.py", "replay", "--reason", "no report section").stdout == \
        "replayed 1 of 1 dead letters\n"
    # Then the report is stored
    assert wait_for_reports(scripts, 1, workflow="unit")["workflows"] == {"unit": 1}
    # And when the reporting service is killed (SIGKILL), started again and the letter replayed once more
    reporting = scripts.restart(reporting, signal.SIGKILL)
    assert scripts.run("dead_letters.py", "replay", "--letter", "reporting_service:0:0").stdout == \
        "replayed 1 of 1 dead letters\n"
    scripts.wait_for_output(reporting, "already stored; ignoring the redelivery")
    # Then it had no second effect: one report
    assert report_summary(scripts)["workflows"] == {"unit": 1}
