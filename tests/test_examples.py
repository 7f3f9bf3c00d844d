"""Examples 1-3 end to end, run as a user runs them: each script its own process, against the real broker."""

import json
import re
import time

from helpers import NO_RESENDS, detections, ids_of, unit_event, wait_completed, wait_for_reports
from kafka import KafkaAdminClient

from common import MESSAGE_STREAM, new_event
from contracts import NOTIFICATION_COMMAND, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND

SERVICES = ("security_service.py", "notification_service.py")


def test_example_1_each_detection_reaches_security_and_notification(scripts, topics):
    # Given the two services and an Example 1 orchestrator
    for service in SERVICES:
        scripts.start(service)
    scripts.start("orchestrator.py", "--example", "1")
    # When ten detections are produced
    scripts.run("security_detector.py", "--count", "10", "--rate", "50")
    stream, third_party = topics(MESSAGE_STREAM), topics(THIRD_PARTY)
    workflows = ids_of(stream.read_count(10, type_="security_detection"), "security_detection")
    # Then each has exactly one security command and one delivered notification, with matching workflow ids
    commands = topics(SEC_COMMAND).read_count(10)
    delivered = third_party.read_count(10)
    assert sorted(m.workflow_id for m in commands) == sorted(workflows)
    assert sorted(m.workflow_id for m in delivered) == sorted(workflows)
    # And each security action was reported back on message_stream
    stream.read_until(lambda ms: workflows <= ids_of(ms, "security_action_completed"))
    assert len(topics(NOTIFICATION_COMMAND).read_count(10)) == 10


def test_example_2_reporting_joins_with_only_the_orchestrator_restarted(scripts, topics):
    # Given Example 1 running with five detections done
    services = [scripts.start(service) for service in SERVICES]
    orchestrator = scripts.start("orchestrator.py", "--example", "1")
    stream, third_party = topics(MESSAGE_STREAM), topics(THIRD_PARTY)
    scripts.run("security_detector.py", "--count", "5", "--rate", "50")
    first = detections(stream.read_count(5, type_="security_detection"))
    wait_completed(stream, third_party, first)
    # When the reporting service starts, the orchestrator stops, five detections arrive meanwhile,
    # the orchestrator starts at Example 2 and five more detections arrive
    scripts.start("reporting_service.py", "--example", "2")
    assert scripts.stop(orchestrator) == 0
    scripts.run("security_detector.py", "--count", "5", "--rate", "50")
    scripts.start("orchestrator.py", "--example", "2")
    scripts.run("security_detector.py", "--count", "5", "--rate", "50")
    later = detections(stream.read_count(15, type_="security_detection")) - first
    # Then all fifteen workflows complete, the ten routed at Example 2 are reported exactly once each
    wait_completed(stream, third_party, first | later)
    summary = wait_for_reports(scripts, 10)
    assert summary["reports"] == 10 and summary["workflows"] == {"security": 10}
    assert len(third_party.messages()) == 15
    # And the original services never restarted
    assert all(service.poll() is None for service in services)


def test_example_3_unit_events_wait_in_kafka_until_the_orchestrator_looks_for_them(scripts, topics):
    # Given the Example 2 system running, with detections streaming in
    for service in SERVICES:
        scripts.start(service)
    reporting = scripts.start("reporting_service.py", "--example", "2")
    orchestrator = scripts.start("orchestrator.py", "--example", "2")
    scripts.start("security_detector.py", "--rate", "5")
    stream, third_party = topics(MESSAGE_STREAM), topics(THIRD_PARTY)
    # When the unit producer starts (step 1) and all its events are on message_stream
    scripts.start("unit_event_producer.py", "--count", "8", "--rate", "4", "--seed", "3")
    units = ids_of(stream.read_count(8, type_="unit_event"), "unit_event")
    # Then the stage-2 orchestrator does not read them at all: no dead letter, no offset on the unit producer's topic
    assert json.loads(scripts.run("monitor.py", "--once", "--json").stdout)["dead_letters"] == 0
    admin = KafkaAdminClient(bootstrap_servers=scripts.env["KAFKA_BOOTSTRAP_SERVERS"])
    group = scripts.env["TOPIC_PREFIX"] + "orchestrator"
    assert {tp.topic.removeprefix(scripts.env["TOPIC_PREFIX"]) for tp in admin.list_group_offsets({group: None})[group]} == \
        {"message_stream.security_detector", "message_stream.security_service"}
    admin.close()
    # When the reporting service and the orchestrator restart at Example 3 (steps 2-5), with no replay
    scripts.stop(reporting)
    scripts.start("reporting_service.py", "--example", "3")
    scripts.stop(orchestrator)
    restarted_at = time.time()
    scripts.start("orchestrator.py", "--example", "3")
    # Then the waiting unit events are routed at once: each gets its unit command, is applied, and is reported once
    commands = topics(UNIT_COMMAND).read_until(lambda ms: units <= {m.workflow_id for m in ms})
    assert len(commands) == 8
    stream.read_until(lambda ms: units <= ids_of(ms, "unit_command_applied"))
    assert wait_for_reports(scripts, 8, workflow="unit")["workflows"]["unit"] == 8
    assert json.loads(scripts.run("monitor.py", "--once", "--json").stdout)["dead_letters"] == 0
    # And security workflows started after the restart complete too
    stream.read_until(lambda ms: any(m.created_at.timestamp() > restarted_at for m in ms
                                     if m.type == "security_detection"))
    after = {m.workflow_id for m in stream.messages()
             if m.type == "security_detection" and m.created_at.timestamp() > restarted_at}
    wait_completed(stream, third_party, after)


def test_nothing_produced_while_the_orchestrator_is_down_is_lost_or_doubled(scripts, topics):
    # Given the Example 2 system, orchestrator stopped
    for service in (*SERVICES, "reporting_service.py"):
        scripts.start(service)
    orchestrator = scripts.start("orchestrator.py", "--example", "2")
    stream, third_party, commands = topics(MESSAGE_STREAM), topics(THIRD_PARTY), topics(SEC_COMMAND)
    scripts.run("security_detector.py", "--count", "1")
    commands.read_count(1)  # the orchestrator is up and has routed
    scripts.stop(orchestrator)
    # When twenty detections arrive while it is down, and it starts again
    scripts.run("security_detector.py", "--count", "20", "--rate", "100")
    started = time.monotonic()
    scripts.start("orchestrator.py", "--example", "2")
    commands.read_count(2)
    gap = time.monotonic() - started
    # Then all twenty-one workflows complete, each once, and each is reported once
    workflows = detections(stream.read_count(21, type_="security_detection"))
    wait_completed(stream, third_party, workflows)
    assert sorted(m.workflow_id for m in commands.read_count(21)) == sorted(workflows)
    assert sorted(m.workflow_id for m in third_party.messages()) == sorted(workflows)
    assert wait_for_reports(scripts, 21)["reports"] == 21
    assert gap < 30, f"restart gap {gap:.1f} s"  # an outcome bound (a hung rejoin), not a speed target
    print(f"restart gap (process start -> first backlog command on sec_command): {gap:.2f} s")


def test_split_orchestrators_restart_independently(scripts, topics):
    # Given one orchestrator per workflow, all services, and both producers streaming
    for service in (*SERVICES, "reporting_service.py"):
        scripts.start(service)
    scripts.start("orchestrator.py", "--workflows", "security")
    unit_orchestrator = scripts.start("orchestrator.py", "--workflows", "unit")
    scripts.start("security_detector.py", "--rate", "5")
    scripts.start("unit_event_producer.py", "--rate", "5")
    stream, third_party, unit_commands = topics(MESSAGE_STREAM), topics(THIRD_PARTY), topics(UNIT_COMMAND)
    unit_commands.read_count(1)
    # When the unit orchestrator is stopped
    scripts.stop(unit_orchestrator)
    stopped_at = time.time()
    # Then security workflows that start meanwhile still complete
    stream.read_until(lambda ms: len([m for m in ms if m.type == "security_detection"
                                      and m.created_at.timestamp() > stopped_at]) >= 5)
    meanwhile = {m.workflow_id for m in stream.messages()
                 if m.type == "security_detection" and m.created_at.timestamp() > stopped_at}
    wait_completed(stream, third_party, meanwhile)
    # And when it starts again, the unit events that waited are commanded
    waiting = {m.workflow_id for m in stream.messages() if m.type == "unit_event"
               and m.created_at.timestamp() > stopped_at}
    assert waiting
    scripts.start("orchestrator.py", "--workflows", "unit")
    unit_commands.read_until(lambda ms: waiting <= {m.workflow_id for m in ms})


def test_an_unknown_type_and_invalid_json_are_dead_lettered_once_by_split_orchestrators(scripts, topics, producer):
    # Given one orchestrator per workflow
    scripts.start("orchestrator.py", "--workflows", "security")
    scripts.start("orchestrator.py", "--workflows", "unit")
    # When an event of a type no workflow knows and invalid JSON arrive, followed by one event of each workflow
    stranger = new_event("unit_event", {"unit_id": "u", "status": "offline", "battery": 1}, "test")
    producer(MESSAGE_STREAM, stranger.model_copy(update={"type": "weather_report"}))
    producer(MESSAGE_STREAM, b"{not json")
    detection = new_event("security_detection", {"sensor_id": "s", "zone": "z", "kind": "smoke", "severity": 1}, "t")
    unit = new_event("unit_event", {"unit_id": "u", "status": "offline", "battery": 1}, "test")
    producer(MESSAGE_STREAM, detection)
    producer(MESSAGE_STREAM, unit)
    # Then, once both orchestrators have routed past them, each is in dead_letter exactly once
    topics(SEC_COMMAND).read_count(1)
    topics(UNIT_COMMAND).read_count(1)
    reasons = [letter.payload["reason"] for letter in topics("dead_letter").read_count(2)]
    assert len(reasons) == 2 and reasons[0] == (  # (the detector may send detections only)
        f"security_detector may not send 'weather_report'; {scripts.env['TOPIC_PREFIX']}message_stream.security_detector "
        f"carries security_detection only") and reasons[1].startswith("not valid JSON")


def test_a_split_orchestrator_takes_over_where_the_single_one_left_off(scripts, topics, producer):
    # Given a single orchestrator that has routed five detections and a unit event, and stopped
    single = scripts.start("orchestrator.py", *NO_RESENDS)
    commands = topics(SEC_COMMAND)
    scripts.run("security_detector.py", "--count", "5", "--rate", "50")
    producer(MESSAGE_STREAM, unit_event())
    commands.read_count(5)
    topics(UNIT_COMMAND).read_count(1)
    scripts.stop(single)
    # When the security workflow gets an orchestrator of its own and one more detection arrives
    split = scripts.start("orchestrator.py", "--workflows", "security", *NO_RESENDS)
    scripts.run("security_detector.py", "--count", "1")
    # Then only the new detection is routed: the new group started where the single orchestrator left off
    stream = topics(MESSAGE_STREAM)
    workflows = detections(stream.read_count(6, type_="security_detection"))
    commands.read_until(lambda ms: workflows <= {m.workflow_id for m in ms})
    assert len(commands.messages()) == 6
    # And it took over the offsets of its own topics only (another split one's would never move on)
    admin = KafkaAdminClient(bootstrap_servers=scripts.env["KAFKA_BOOTSTRAP_SERVERS"])
    group = scripts.env["TOPIC_PREFIX"] + "orchestrator-security"
    taken = {tp.topic.removeprefix(scripts.env["TOPIC_PREFIX"]) for tp in admin.list_group_offsets({group: None})[group]}
    admin.close()
    assert taken == {"message_stream.security_detector"}
    # And the monitor shows the lag of the running orchestrator only (the single one's would only grow)
    lag = next(line for line in scripts.run("monitor.py", "--once").stdout.splitlines() if line.startswith("consumer lag"))
    assert re.search(r"orchestrator-security \d+", lag) and not re.search(r"orchestrator \d+", lag)
    # And a single orchestrator started by mistake meanwhile refuses in one line, naming the running one
    refused = scripts.run("orchestrator.py", check=False)
    assert refused.returncode == 1 and refused.stderr.splitlines()[-1].startswith(
        "orchestrator: group orchestrator-security (workflows security) is running (1 copy), and both would route "
        "security. Stop it first")
    # And when the split one is stopped and the single one started again, it starts where the split one left off
    scripts.stop(split)
    single = scripts.start("orchestrator.py", *NO_RESENDS)
    scripts.run("security_detector.py", "--count", "1")
    workflows = detections(stream.read_count(7, type_="security_detection"))
    commands.read_until(lambda ms: workflows <= {m.workflow_id for m in ms})
    assert len(commands.messages()) == 7
    # And each took over what the other knew of the workflows (all 6 of the single one, then the one it routed)
    assert "took over 6 state entries of orchestrator" in scripts.output(split)
    assert "took over 1 state entry of orchestrator-security" in scripts.output(single)  # (the 6th detection)
    # And it says, with the milliseconds, how long after its start it routed the first waiting message
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3} orchestrator INFO first message routed \d+\.\d\d s after this "
                     r"process started", scripts.output(single))

