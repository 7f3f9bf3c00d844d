"""Delivery guarantees against a real broker: crashes, a broker outage, replay (a store that fails: test_hardening.py)."""

import json
import os
import random
import re
import signal
import time
from collections import Counter

import pytest

from helpers import (NO_RESENDS, detection, detections, exactly_one_each, report_summary, unit_event, wait_completed,
                     wait_for_reports)
from kafka import KafkaAdminClient

import common.workarounds
import local_kafka
from common import MESSAGE_STREAM, Settings, Stopper, ensure_topics, make_producer, new_event, read_all, written_by
from common.delivery import Delivery
from common.handling import serialised
from common import topics as topics_of
from contracts import NOTIFICATION_COMMAND, SEC_COMMAND, THIRD_PARTY
from orchestrator import WORKFLOWS

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


def test_a_broker_stalled_during_commits_doubles_no_record_on_any_topic(tmp_path, env, scripts, topics):
    # Given Example 3 on a broker of this test's own: events of both workflows streaming in, each a transaction of
    # its own at the unit producer (its ticks consume nothing: no committed offset can tell whether one committed)
    port = local_kafka.free_port()
    broker, _ = local_kafka.start(port, tmp_path / "kafka")
    env["KAFKA_BOOTSTRAP_SERVERS"] = broker.address
    pid = local_kafka.status(tmp_path / "kafka").nodes[0].pid
    try:
        for name in SERVICES:
            scripts.start(name, *(("--example", "3") if name == "reporting_service.py" else ()))
        scripts.start("orchestrator.py", "--example", "3", *NO_RESENDS)
        scripts.start("unit_event_producer.py", "--count", "60", "--rate", "4", "--seed", "3")
        scripts.start("security_detector.py", "--count", "60", "--rate", "4", "--seed", "3")
        stream = topics(MESSAGE_STREAM)
        stream.read_count(8, timeout=120, type_="workflow_completed")
        # When the broker freezes (SIGSTOP) for longer than a transaction step may take, three times, mid-commit
        for _ in range(3):
            os.kill(pid, signal.SIGSTOP)
            time.sleep(8)  # (the fault itself: how long the broker is frozen)
            os.kill(pid, signal.SIGCONT)
            stream.read_count(len(stream.messages()) + 1, timeout=120)  # (it goes on before the next freeze)
        # Then every workflow completes
        stream.read_count(120, timeout=240, type_="workflow_completed")
        # And on every topic every id is there once: no event, command, outcome or end written twice
        everything = topics_of_the_test(env)
        counted = Counter((record.topic.removeprefix(env["TOPIC_PREFIX"]), message_id(record)) for record in everything)
        doubled = {key: n for key, n in counted.items() if n > 1}
        assert not doubled, f"written twice: {sorted(doubled)[:10]}"
        per_topic = Counter(topic for topic, _ in counted)
        assert per_topic["message_stream.unit_event_producer"] == 60 + 60  # (its events, and each command applied)
        assert per_topic[SEC_COMMAND] == 60 and per_topic[NOTIFICATION_COMMAND] == 60
        print(f"broker stalled 3 x 8 s during commits: records {sum(per_topic.values())} on {len(per_topic)} topics, "
              f"none twice; workflows completed 120")
    finally:
        os.kill(pid, signal.SIGCONT)
        scripts.stop_all()
        local_kafka.stop(tmp_path / "kafka")


def topics_of_the_test(env) -> list:
    """Every record on this test's topics (not its state topics), read_committed, from the beginning."""
    settings = Settings.from_env(env)
    return [record for record in read_all([*topics_of(WORKFLOWS)], timeout=60, settings=settings)]


def message_id(record) -> str:
    try:
        return json.loads(record.value)["id"]
    except (ValueError, KeyError, TypeError):
        return f"(not an envelope at offset {record.offset})"


def test_a_commit_that_answered_too_late_after_it_committed_is_found_committed_and_not_written_again(env, monkeypatch):
    # Given a service's own events in a transaction (a tick: no record consumed, so no committed offset can tell)
    # whose commit goes through at the broker but answers later than a transaction step may take (a stalled broker)
    monkeypatch.setattr(common.workarounds, "TRANSACTION_STEP_TIMEOUT_S", 1.0)
    settings = Settings.from_env(env)
    member = written_by(MESSAGE_STREAM, "ticking")
    admin = KafkaAdminClient(**settings.kafka_config())
    ensure_topics(admin, settings, [member])
    admin.close()
    made = []

    def new_producer(transactional_id, settings):
        producer = make_producer(transactional_id=transactional_id, settings=settings)
        if not made:  # (the first commits, then answers 3 s late; the next ones are as they should be)
            committing = producer.commit_transaction
            producer.commit_transaction = lambda: (committing(), time.sleep(3))
        made.append(producer)
        return producer
    delivery = Delivery("ticking", Stopper(), settings.transactional_id("ticking"), settings, new_producer=new_producer)
    events = [new_event("security_detection", detection().payload, "ticking") for _ in range(3)]
    try:
        # When they are delivered
        done = delivery.write(None, [serialised(member, event, b"k") for event in events], {})
        # Then the delivery found out that they were committed, so nothing is written again: each is there once
        assert done is True and len(made) == 2
        written = Counter(message_id(record) for record in read_all(member, settings=settings))
        assert written == Counter(event.id for event in events)
    finally:
        delivery.close()
