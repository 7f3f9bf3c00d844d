"""State that survives restarts, against a real broker: a command has one effect whatever happens to the service in
between, and the orchestrator's time limits act exactly once across kill -9 and takeover."""

import json
import random
import signal
import time

import pytest
from helpers import detection, ids_of, unit_event, write_raw

from common import MESSAGE_STREAM
from contracts import NOTIFICATION_COMMAND, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND
from orchestrator import route

SERVICES = {  # script -> (its command topic, a new command, where its effect shows, the effect's type)
    "security_service.py": (SEC_COMMAND, lambda: route(detection(), 1)[0][1], MESSAGE_STREAM,
                            "security_action_completed"),
    "notification_service.py": (NOTIFICATION_COMMAND, lambda: route(detection(), 1)[1][1], THIRD_PARTY,
                                "notification_delivered"),
    "unit_event_producer.py": (UNIT_COMMAND, lambda: route(unit_event(), 3)[0][1], MESSAGE_STREAM,
                               "unit_command_applied"),
}


@pytest.mark.parametrize("script", SERVICES)
def test_a_command_has_one_effect_across_kill_restart_and_takeover_by_another_copy(script, scripts, topics, producer):
    command_topic, new_command, effect_topic, effect = SERVICES[script]
    args = ("--count", "0") if script == "unit_event_producer.py" else ()
    effects = topics(effect_topic)

    def effect_of(command):
        return lambda ms: command.workflow_id in ids_of(ms, effect)
    # Given the service carried out a command
    first, command = scripts.start(script, *args), new_command()
    producer(command_topic, command, key=b"k")
    effects.read_until(effect_of(command))
    # When it is killed (SIGKILL), started again, and the same command comes again
    first = scripts.restart(first, signal.SIGKILL)
    after_restart = new_command()
    producer(command_topic, command, key=b"k")
    producer(command_topic, after_restart, key=b"k")
    effects.read_until(effect_of(after_restart))
    # And when a second copy takes its partition over (the first killed) and the command comes once more
    second = scripts.start(script, *args, INSTANCE_ID="2")
    scripts.wait_for_output(second, "started;")
    scripts.stop(first, signal.SIGKILL)
    after_takeover = new_command()
    producer(command_topic, command, key=b"k")
    producer(command_topic, after_takeover, key=b"k")
    effects.read_until(effect_of(after_takeover), timeout=90)
    # Then each command had exactly one effect, and the copy that took over had read the handled ids back first
    assert [m.workflow_id for m in effects.messages() if m.type == effect] == [
        command.workflow_id, after_restart.workflow_id, after_takeover.workflow_id]
    assert "ignoring the redelivery" in scripts.output(second) and "read back (2 entries" in scripts.output(second)


def test_a_step_without_answer_is_sent_attempts_times_then_escalated_and_the_workflow_failed(scripts, topics,
                                                                                             producer):
    # Given an orchestrator with a 1 s limit and 3 tries, and no security service running
    scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "1", "--attempts", "3")
    stream, event = topics(MESSAGE_STREAM), detection()
    # When a detection comes
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    stream.read_until(lambda ms: event.workflow_id in ids_of(ms, "workflow_failed"))
    # Then the command went out 3 times with one id, one timeout per attempt, and one escalation to a person
    commands = topics(SEC_COMMAND).read_count(3)
    assert len(commands) == 3 and len({c.id for c in commands}) == 1
    assert [m.payload["attempt"] for m in stream.messages() if m.type == "step_timed_out"] == [1, 2, 3]
    notes = topics(NOTIFICATION_COMMAND).read_count(2)
    assert [n.payload["recipient"] for n in notes] == ["on-duty-zone-1", "security-supervisor"]
    # And workflows.py shows it failed, its step timed out after 3 attempts
    shown = json.loads(scripts.run("workflows.py", "show", event.workflow_id[:8], "--json").stdout)
    assert (shown["workflow_id"], shown["type"], shown["state"], shown["stage"]) == (event.workflow_id, "security",
                                                                                     "failed", 1)
    assert [(s["name"], s["state"], s["attempts"]) for s in shown["steps"]] == [
        ("acted", "timed_out", 3), ("notified", "sent", 1), ("escalated", "sent", 1)]
    # And the monitor's timeline of it shows each timeout and marks the commands sent again as repeats
    lines = scripts.run("monitor.py", "--workflow", event.workflow_id[:8]).stdout.splitlines()
    assert lines[0] == f"workflow {event.workflow_id}: 10 messages"  # (1 + 3 + 2 + 3 + 1)
    assert sum("step_timed_out" in line for line in lines) == 3 and sum("workflow_failed" in line for line in lines) == 1
    assert [("repeat" in line) for line in lines if " sec_command " in line] == [False, True, True]


def test_a_service_started_before_the_attempts_run_out_acts_once_and_the_workflow_completes(scripts, topics,
                                                                                            producer):
    # Given a detection whose security action got no answer in time (the service is not running); tries enough that
    # no loaded machine can start the service after the last
    scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "4", "--attempts", "15")
    stream, event = topics(MESSAGE_STREAM), detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    stream.read_until(lambda ms: "step_timed_out" in {m.type for m in ms})
    # When the security service starts before the attempts run out
    scripts.start("security_service.py")
    stream.read_until(lambda ms: event.workflow_id in ids_of(ms, "workflow_completed"))
    # Then it acted once though the command came more than once, and nobody was asked to take over
    assert [m.type for m in stream.messages()].count("security_action_completed") == 1
    assert len(topics(SEC_COMMAND).read_count(2)) >= 2
    assert [n.payload["recipient"] for n in topics(NOTIFICATION_COMMAND).read_count(1)] == ["on-duty-zone-1"]
    shown = json.loads(scripts.run("workflows.py", "show", event.workflow_id, "--json").stdout)
    assert shown["state"] == "completed" and shown["steps"][0]["state"] == "done"


def test_killing_the_orchestrator_around_deadlines_fires_every_timeout_exactly_once(scripts, topics):
    # Given an orchestrator whose steps time out after 1 s, twice, and a detector sending 60 detections
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "1", "--attempts", "2")
    scripts.start("security_detector.py", "--count", "60", "--rate", "20", "--seed", "12")
    stream, rng = topics(MESSAGE_STREAM), random.Random(12)

    def timeouts(ms):
        return [(m.workflow_id, m.payload["attempt"]) for m in ms if m.type == "step_timed_out"]
    # When it is SIGKILLed three times while timeouts are firing, and started again each time
    for goal in sorted(rng.sample(range(5, 100), 3)):
        stream.read_until(lambda ms, goal=goal: len(timeouts(ms)) >= goal, timeout=90)
        orchestrator = scripts.restart(orchestrator, signal.SIGKILL)
    workflows = stream.read_until(lambda ms: len(ids_of(ms, "security_detection")) == 60 and
                                  ids_of(ms, "security_detection") <= ids_of(ms, "workflow_failed"), timeout=120)
    # Then every workflow failed once, after exactly one timeout per attempt; none is left running
    fired = timeouts(workflows)
    assert sorted(fired) == sorted((w, attempt) for w in ids_of(workflows, "security_detection") for attempt in (1, 2))
    assert sorted(m.workflow_id for m in workflows if m.type == "workflow_failed") == sorted(
        ids_of(workflows, "security_detection"))
    assert scripts.run("workflows.py", "list", "--state", "running").stdout.endswith(
        "0 workflows running (of 60 in the orchestrator's state)\n")


def test_a_surviving_orchestrator_restores_a_killed_ones_partitions_and_fires_their_timers(env, scripts, topics):
    # Given two orchestrators sharing two partitions, with one try each and a limit no loaded machine crosses before
    # the test kills one
    env["TOPIC_PARTITIONS"] = "2"
    dying = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "25", "--attempts", "1")
    scripts.wait_for_output(dying, "read back")
    survivor = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "25", "--attempts", "1",
                             INSTANCE_ID="2")
    scripts.wait_for_output(survivor, "read back")
    # When 20 detections are routed, and one orchestrator is killed before any limit passes
    scripts.start("security_detector.py", "--count", "20", "--rate", "40", "--seed", "3")
    topics(SEC_COMMAND).read_count(20)
    scripts.stop(dying, signal.SIGKILL)
    # Then the survivor fires every timer, its own and the dead one's: one timeout and one failure each
    stream = topics(MESSAGE_STREAM)
    messages = stream.read_until(lambda ms: len(ids_of(ms, "workflow_failed")) == 20, timeout=90)
    assert sorted(m.workflow_id for m in messages if m.type == "step_timed_out") == sorted(
        ids_of(messages, "security_detection"))
    assert "no answer" not in scripts.output(dying)
    assert scripts.output(survivor).count("no answer to acted") == 20
    # (and read the dead one's state back first: a second read-back, of both partitions or of the one it took over,
    # as the rebalance went)
    assert scripts.output(survivor).count(" read back (") >= 2


def test_a_stop_signal_during_a_long_read_back_is_honoured_before_it_ends(env, scripts):
    # Given an orchestrator's state topic holding 200 000 entries (written straight to it, as the orchestrator would)
    entry = json.dumps({"at": time.time(), "due": None, "value": "0" * 64}).encode()
    write_raw(env, "orchestrator", ((f"seen/{i}".encode(), entry) for i in range(200_000)))
    # When the orchestrator starts reading it back and is sent SIGTERM meanwhile
    orchestrator = scripts.start("orchestrator.py", "--example", "1")
    scripts.wait_for_output(orchestrator, "reading the state of partition 0 back")
    # Then it stops cleanly without reading the rest (the batch waits in Kafka)
    assert scripts.stop(orchestrator) == 0
    assert "stopping after 0 messages" in scripts.output(orchestrator)
    assert "read back (" not in scripts.output(orchestrator)
