"""Several copies of a script in one consumer group share the partitions. Killing one hands its partitions to the
others: nothing lost, nothing doubled (read committed), and each key's messages still in order."""

import signal
import time
from collections import defaultdict

import pytest
from helpers import NO_RESENDS, detections, envelope_of, exactly_one_each, wait_completed, worst_delay

from common import MESSAGE_STREAM, NOTIFICATION_COMMAND, SEC_COMMAND, THIRD_PARTY


@pytest.fixture
def partitioned(env):
    """Topics with four partitions (the scripts create them so, from TOPIC_PARTITIONS)."""
    env["TOPIC_PARTITIONS"] = "4"
    return env


def in_key_order(reader, type_: str) -> dict[bytes, list[str]]:
    """key -> workflow ids of the `type_` messages with that key, in the order the topic holds them."""
    order = defaultdict(list)
    for record in reader.raw:  # records of one partition arrive in offset order, and a key lives in one partition
        message = envelope_of(record)
        if message.type == type_:
            order[record.key].append(message.workflow_id)
    return dict(order)


@pytest.mark.usefixtures("partitioned")
def test_three_orchestrators_share_the_partitions_and_survive_losing_one(scripts, topics):
    # Given the services and three orchestrators in one group, each with its own INSTANCE_ID
    for service in ("security_service.py", "notification_service.py"):
        scripts.start(service)
    orchestrators = [scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS, INSTANCE_ID=str(i)) for i in (1, 2, 3)]
    # When 300 detections stream in and, once every orchestrator has routed some, one is killed (SIGKILL)
    scripts.start("security_detector.py", "--count", "300", "--rate", "20", "--seed", "21")
    for orchestrator in orchestrators:
        scripts.wait_for_output(orchestrator, "-> sec_command")
    scripts.stop(orchestrators[0], signal.SIGKILL)
    # Then every detection has exactly one security command and one notification (none lost, none doubled)
    stream, commands, notifications = topics(MESSAGE_STREAM), topics(SEC_COMMAND), topics(NOTIFICATION_COMMAND)
    workflows = detections(stream.read_count(300, type_="security_detection", timeout=90))
    exactly_one_each(workflows, commands, notifications)
    # And each sensor's commands are in the order of its detections
    assert in_key_order(commands, "security_command") == in_key_order(stream, "security_detection")
    # And the survivors did the killed one's share: every workflow completes
    wait_completed(stream, third_party := topics(THIRD_PARTY), workflows, timeout=90)
    print(f"3 orchestrators, 1 killed: detections=300 commands={len(commands.messages())} lost=0 duplicates=0 "
          f"deliveries={len(third_party.messages())}; longest detection->command "
          f"{worst_delay(stream, 'security_detection', commands, 'security_command'):.1f} s")


@pytest.mark.usefixtures("partitioned")
def test_two_copies_of_a_service_share_the_partitions_and_survive_losing_one(scripts, topics):
    # Given one orchestrator, the notification service and two copies of the security service in one group
    scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS)
    scripts.start("notification_service.py")
    copies = [scripts.start("security_service.py", INSTANCE_ID=str(i)) for i in (1, 2)]
    # When 200 detections stream in and, once both copies have acted, one copy is killed (SIGKILL)
    scripts.start("security_detector.py", "--count", "200", "--rate", "20", "--seed", "22")
    for copy in copies:
        scripts.wait_for_output(copy, "-> zone now")
    scripts.stop(copies[0], signal.SIGKILL)
    # Then every command has exactly one outcome on message_stream (none lost, none doubled)
    stream, commands = topics(MESSAGE_STREAM), topics(SEC_COMMAND)
    workflows = detections(stream.read_count(200, type_="security_detection", timeout=90))
    stream.read_until(lambda ms: workflows <= {m.workflow_id for m in ms if m.type == "security_action_completed"},
                      timeout=90)
    outcomes = [m.workflow_id for m in stream.messages() if m.type == "security_action_completed"]
    assert sorted(outcomes) == sorted(workflows)
    # And each sensor's outcomes are in the order of its commands
    commands.read_count(200)
    assert in_key_order(stream, "security_action_completed") == in_key_order(commands, "security_command")
    print(f"2 security services, 1 killed: commands=200 outcomes={len(outcomes)} lost=0 duplicates=0; longest "
          f"command->outcome {worst_delay(commands, 'security_command', stream, 'security_action_completed'):.1f} s")


@pytest.mark.usefixtures("partitioned")
def test_a_second_copy_with_the_same_instance_id_is_stopped_with_a_clear_error(scripts, topics):
    # Given an orchestrator routing a stream of detections
    first = scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS)
    scripts.start("security_detector.py", "--count", "150", "--rate", "20", "--seed", "23")
    scripts.wait_for_output(first, "-> sec_command")
    # When a second copy starts without its own INSTANCE_ID (both are "1")
    second = scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS)
    # Then one of the two stops, saying why, and the other routes every detection exactly once
    started, stopped = time.monotonic(), None
    while stopped is None:
        stopped = next((p for p in (first, second) if p.poll() is not None), None)
        if time.monotonic() - started > 60:
            pytest.fail("both copies with INSTANCE_ID=1 still run after 60 s")
        time.sleep(0.2)  # polling for a process exit
    print(f"same INSTANCE_ID: the {'first' if stopped is first else 'second'} copy stopped after "
          f"{time.monotonic() - started:.1f} s")
    assert stopped.returncode == 1
    assert "give each copy its own INSTANCE_ID" in scripts.output(stopped)
    stream, commands = topics(MESSAGE_STREAM), topics(SEC_COMMAND)
    workflows = detections(stream.read_count(150, type_="security_detection", timeout=60))
    exactly_one_each(workflows, commands)
