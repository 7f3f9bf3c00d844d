"""No single record, fault or slip stops a service or a tool: each case as it was found, against a real broker."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys

import pytest

from helpers import ROOT, TopicReader, detection, unit_event, wait_for_reports

import local_kafka
from common import DEAD_LETTER, MESSAGE_STREAM, caused_by
from contracts import NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND
from orchestrator import route

SERVICES = {MESSAGE_STREAM: "orchestrator.py", SEC_COMMAND: "security_service.py",
            NOTIFICATION_COMMAND: "notification_service.py", REPORT_DATA: "reporting_service.py",
            UNIT_COMMAND: "unit_event_producer.py"}


def unit_command(status="offline"):
    return route(unit_event(status), stage=3)[0][1]


def with_field(message, field: str, raw_value: bytes) -> bytes:
    """The message's bytes with one payload field's JSON value replaced as is (e.g. a lone surrogate escape)."""
    data = message.to_bytes()
    old = json.dumps(message.payload[field]).encode()
    assert data.count(b'"%s":%s' % (field.encode(), old)) == 1
    return data.replace(b'"%s":%s' % (field.encode(), old), b'"%s":%s' % (field.encode(), raw_value))


def letters_for(reader, sent: set) -> list:
    """The dead letters of the records sent (topic, offset), once each is there."""
    read = reader.read_until(lambda ms: sent <= {(m.payload["topic"], m.payload["offset"]) for m in ms})
    return [m for m in read if (m.payload["topic"], m.payload["offset"]) in sent]


def test_a_record_that_would_fail_only_when_written_out_is_dead_lettered_and_those_behind_it_are_handled(
        scripts, topics, producer):
    # Given the unit producer and the notification service
    units = scripts.start("unit_event_producer.py", "--count", "0")
    notifier = scripts.start("notification_service.py")
    # When a command with a lone surrogate in a field arrives on each, followed by three good commands
    bad = {producer(UNIT_COMMAND, with_field(unit_command(), "unit_id", b'"x\\ud800"')),
           producer(NOTIFICATION_COMMAND, with_field(route(detection(), 1)[1][1], "recipient", b'"x\\ud800"'))}
    good = [unit_command() for _ in range(3)]
    for command in good:
        producer(UNIT_COMMAND, command)
    producer(NOTIFICATION_COMMAND, route(detection(), 1)[1][1])
    # Then each bad one is a dead letter saying why, and the good ones behind it are all handled
    letters = letters_for(topics(DEAD_LETTER), {(meta.topic, meta.offset) for meta in bad})
    assert all("lone UTF-16 surrogate" in m.payload["reason"] for m in letters) and len(letters) == 2
    applied = topics(MESSAGE_STREAM).read_count(3, type_="unit_command_applied")
    assert sorted(m.workflow_id for m in applied) == sorted(c.workflow_id for c in good)
    topics(THIRD_PARTY).read_count(1)
    assert units.poll() is None and notifier.poll() is None


def test_a_huge_key_on_any_input_topic_is_dead_lettered_and_the_next_message_is_handled(scripts, topics, producer):
    # Given every service running
    running = [scripts.start(script) for script in SERVICES.values() if script != "unit_event_producer.py"]
    running.append(scripts.start("unit_event_producer.py", "--count", "0"))
    # When an 8-byte value with a 300 KB binary key arrives on each input topic
    sent = {producer(name, b"8 bytes!", key=os.urandom(300_000)) for name in SERVICES}
    sent = {(meta.topic, meta.offset) for meta in sent}
    # Then each is one dead letter that says so (the key cut, the letter small enough for Kafka)
    letters = letters_for(topics(DEAD_LETTER), sent)
    assert len(letters) == 5
    assert {m.payload["reason"] for m in letters} == {"key of 300000 bytes is over the 256-byte limit"}
    assert all(m.payload["key_truncated"] and len(m.payload["key"]) <= 256 for m in letters)  # cut, and says so
    # And a good detection sent after them completes its workflow through every service
    event = detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    topics(THIRD_PARTY).read_until(lambda ms: any(m.workflow_id == event.id for m in ms))
    assert all(p.poll() is None for p in running)


def test_an_overlong_id_has_its_effect_once_and_is_never_rejected_after_acting(scripts, topics, producer):
    # Given the notification service and a command whose id is 195 characters long
    service = scripts.start("notification_service.py")
    command = route(detection(), 1)[1][1].model_copy(update={"id": "n" * 195})
    # When it arrives, and again
    producer(NOTIFICATION_COMMAND, command)
    producer(NOTIFICATION_COMMAND, command)
    producer(NOTIFICATION_COMMAND, last := route(detection(), 1)[1][1])
    # Then it is delivered once (its derived id shortened), no dead letter, and notified once
    delivered = topics(THIRD_PARTY).read_until(lambda ms: any(m.workflow_id == last.workflow_id for m in ms))
    assert [m.workflow_id for m in delivered] == [command.workflow_id, last.workflow_id]
    assert len(delivered[0].id) <= 200
    assert scripts.output(service).count(f"(workflow {command.workflow_id[:8]})") == 1
    assert "dead letter" not in scripts.output(service)


def report(workflow_status="offline"):
    return route(unit_event(workflow_status), stage=3)[1][1]


def test_a_locked_store_is_waited_for_then_used_and_nothing_is_dead_lettered(env, scripts, topics, producer):
    # Given the reporting service, whose store someone then locks
    service = scripts.start("reporting_service.py", "--example", "3", "--every", "1")
    producer(REPORT_DATA, report())
    scripts.wait_for_output(service, "summary:")
    lock = sqlite3.connect(env["REPORT_DB"], isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    # When reports arrive while it stays locked (past the periodic summary, past several retries)
    for _ in range(20):
        producer(REPORT_DATA, report())
    scripts.wait_for_output(service, "cannot be used (database is locked); waiting, then trying again")
    scripts.wait_for_output(service, "no summary now")
    lock.execute("ROLLBACK")
    lock.close()
    # Then the service stayed up and, once the store is free, stores every report; none was dead-lettered
    assert wait_for_reports(scripts, 21)["reports"] == 21
    assert service.poll() is None and "dead letter" not in scripts.output(service)
    scripts.wait_for_output(service, "going on after")


def test_a_deleted_store_is_opened_anew(env, scripts, producer):
    service = scripts.start("reporting_service.py", "--example", "3")
    producer(REPORT_DATA, report())
    wait_for_reports(scripts, 1)
    os.remove(env["REPORT_DB"])
    for _ in range(5):
        producer(REPORT_DATA, report())
    assert wait_for_reports(scripts, 5)["reports"] == 5  # a new file, with the five new reports
    assert "dead letter" not in scripts.output(service)


def test_a_stop_while_waiting_for_the_store_is_honoured_at_once_and_loses_nothing(env, scripts, producer):
    # Given a reporting service waiting for its locked store, with 300 reports queued
    service = scripts.start("reporting_service.py", "--example", "3")
    producer(REPORT_DATA, report())
    wait_for_reports(scripts, 1)
    lock = sqlite3.connect(env["REPORT_DB"], isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    for _ in range(300):
        producer(REPORT_DATA, report())
    scripts.wait_for_output(service, "waiting, then trying again")
    # When it is stopped (SIGTERM)
    service.send_signal(signal.SIGTERM)
    # Then it exits cleanly within a few seconds
    assert service.wait(timeout=60) == 0  # (a generous bound: a loaded machine is slow to even exit)
    # And, started again with the store free, it stores all of them once, with no dead letter
    lock.execute("ROLLBACK")
    lock.close()
    again = scripts.start("reporting_service.py", "--example", "3")
    assert wait_for_reports(scripts, 301)["reports"] == 301
    assert "dead letter" not in scripts.output(service) + scripts.output(again)


def test_the_same_id_with_different_content_is_a_dead_letter_not_a_silent_drop(scripts, topics, producer):
    # Given the orchestrator and a detection sent three times, one copy with another zone and severity
    scripts.start("orchestrator.py", "--example", "1")
    event = detection(severity=2)
    forged = event.model_copy(update={"payload": {**event.payload, "zone": "zone-3", "severity": 5}})
    for message in (event, event, forged):
        producer(MESSAGE_STREAM, message)
    # Then one command was sent, and the changed copy is a dead letter with that reason
    [letter] = topics(DEAD_LETTER).read_count(1)
    assert letter.payload["reason"] == f"id {event.id!r} was handled before with different content; not handled again"
    [command] = topics(SEC_COMMAND).read_count(1)
    assert command.payload["zone"] == "zone-1"


def test_junk_on_dead_letter_is_shown_as_unreadable_and_disables_no_tool(scripts, producer):
    # Given a real dead letter, a non-JSON record and an envelope without a reason on dead_letter
    producer(MESSAGE_STREAM, b"not json")
    scripts.start("orchestrator.py")
    reader = TopicReader(scripts.env, DEAD_LETTER)
    reader.read_count(1)
    reader.close()
    producer(DEAD_LETTER, b"\x00 junk")
    producer(DEAD_LETTER, caused_by(detection(), "x", "security_detection", detection().payload, "t")
             .model_copy(update={"type": "dead_letter", "payload": {"service": "nobody"}}))
    # When the tools run
    listed = scripts.run("dead_letters.py", "list").stdout
    once = scripts.run("monitor.py", "--once").stdout
    # Then the readable letter is listed, the junk counted and skipped, and the monitor counts all three
    assert "not valid JSON" in listed and "1 dead letters" in listed
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} +orchestrator:0:\d+ +- +", listed, re.M)  # (time, letter; junk: no workflow)
    assert re.search(r"^2 records on dead_letter are not dead letters \(orchestrator:0:\d+, orchestrator:0:\d+\); skipped$",
                     listed, re.M)
    assert "dead letters: 2 (last: (no reason given))" in once


def test_replay_all_replays_each_original_once_and_a_null_as_null(scripts, topics, producer):
    # Given three unit reports a reporting service at Example 2 has no section for, and one null value
    scripts.start("orchestrator.py", "--example", "2")
    scripts.start("reporting_service.py", "--example", "2")
    for _ in range(3):
        producer(REPORT_DATA, route(unit_event(), stage=3)[1][1])
    producer(MESSAGE_STREAM, None, key=b"sensor-1")  # (a null needs a key: kafka-python sends no record without both)
    dead = topics(DEAD_LETTER)
    dead.read_count(4)
    # When everything is replayed twice, while the cause is not fixed
    first = scripts.run("dead_letters.py", "replay", "--all").stdout
    dead.read_count(8)
    second = scripts.run("dead_letters.py", "replay", "--all").stdout
    # Then each run replays the four originals once (no snowball), and the null stays null
    assert first == "replayed 4 of 4 dead letters\n"
    assert second == "replayed 4 of 8 dead letters (4 not: an original replayed once already, or one that cannot be, " \
                     "as logged above)\n"
    letters = dead.read_count(12)
    assert sum(m.payload["reason"] == "empty message (null value)" for m in letters) == 3
    # And the list says of each letter that its original was replayed twice, and when last
    listed = scripts.run("dead_letters.py", "list").stdout
    assert len(re.findall(r" 2x, last \d\d:\d\d:\d\d ", listed)) == 12, listed


def test_the_one_shot_tools_say_in_one_line_that_no_broker_answers(scripts, env):
    nowhere = dict(env, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    result = scripts.run("dead_letters.py", "list", env=nowhere, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().endswith("dead_letters: no Kafka answers at 127.0.0.1:1 (start it with 'make kafka-up')")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_group_that_makes_no_progress_says_so_as_an_error_and_status_finds_the_broker_unhealthy(tmp_path, env, scripts):
    # Given a service on a broker of this test's own
    broker, _ = local_kafka.start(local_kafka.free_port(), tmp_path / "kafka")
    env["KAFKA_BOOTSTRAP_SERVERS"] = broker.address
    pid = local_kafka.status(tmp_path / "kafka").nodes[0].pid
    try:
        service = scripts.start("security_service.py")
        scripts.wait_for_output(service, "started;")
        # When the broker stops answering (frozen), for longer than the group's session
        os.kill(pid, signal.SIGSTOP)
        # Then the service says so as an error naming its group, and the broker's status is unhealthy
        scripts.wait_for_output(service, f"group {env['TOPIC_PREFIX']}security_service has made no progress for")
        status = subprocess.run([sys.executable, "-m", "local_kafka", "status", "--dir", str(tmp_path / "kafka")],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert status.returncode == 3 and "UNHEALTHY: the broker does not answer" in status.stdout
        # And once the broker answers again, the service goes on by itself
        os.kill(pid, signal.SIGCONT)
        scripts.wait_for_output(service, "going on after")
        assert service.poll() is None
    finally:
        os.kill(pid, signal.SIGCONT)
        scripts.stop_all()
        local_kafka.stop(tmp_path / "kafka")


@pytest.mark.no_broker
def test_a_second_stop_signal_says_it_exits_at_once():
    # Given a script's stop signal handling, a stop already asked for (the first Ctrl-C)
    script = ("import os, signal, time; from common.waiting import Stopper; stop = Stopper(); "
              "os.kill(os.getpid(), signal.SIGINT); assert stop; "
              "os.kill(os.getpid(), signal.SIGINT); time.sleep(10)")
    # When Ctrl-C comes again
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    # Then it exits at once and says so
    assert result.returncode == 128 + signal.SIGINT
    assert result.stderr == "second stop signal: exiting at once, without finishing the batch (it is handled again)\n"
