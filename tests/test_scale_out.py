"""Several copies of a script in one consumer group share the partitions. Killing one hands its partitions to the
others: nothing lost, nothing doubled (read committed), and each key's messages still in order. Stopping one hands
them over at once; the copy that takes over a killed one's partitions ends the transaction it left open."""

import signal
import re
import time
from collections import defaultdict

import pytest
from helpers import (NO_RESENDS, detection, detections, envelope_of, exactly_one_each, wait_completed, worst_delay,
                     writer_of)
from kafka import KafkaAdminClient, KafkaProducer
from kafka.errors import KafkaError

from common import MESSAGE_STREAM, Settings
from contracts import NOTIFICATION_COMMAND, SEC_COMMAND, THIRD_PARTY
from common.copies import members


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
    # And the copy that runs on says nothing of the other (it is not fenced in turn)
    kept = second if stopped is first else first
    assert not re.findall(r".* (?:WARNING|ERROR) .*", scripts.output(kept))


def group_members(env: dict, group: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    try:
        return members(admin, group, Settings.from_env(env))
    finally:
        admin.close()


def wait_members(env: dict, group: str, expected: set[str], timeout: float = 60) -> None:
    deadline, now = time.monotonic() + timeout, None
    while True:
        try:
            if (now := group_members(env, group)) == expected:
                return
        except KafkaError:  # (no such group yet, or a fresh broker making its offsets topic on first use)
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"group {group} has members {now}, not {expected}")
        time.sleep(0.2)  # polling the group's state


@pytest.mark.usefixtures("partitioned")
def test_a_copy_stopped_while_others_run_hands_its_partitions_over_at_once_and_the_last_keeps_its_place(env, scripts):
    # Given two orchestrators in one group
    prefix = env["TOPIC_PREFIX"]
    copies = [scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS, INSTANCE_ID=str(i)) for i in (1, 2)]
    wait_members(env, "orchestrator", {f"{prefix}orchestrator-1", f"{prefix}orchestrator-2"})
    # When the second is stopped (Ctrl-C, a scale-down)
    scripts.stop(copies[1], signal.SIGINT)
    # Then it has left the group as it exited: the other need not wait out its session to take its partitions
    assert group_members(env, "orchestrator") == {f"{prefix}orchestrator-1"}
    assert "left group orchestrator to the other copy" in scripts.output(copies[1])
    # And when the last one is stopped, it keeps its place (a restart finds its partitions waiting)
    scripts.stop(copies[0], signal.SIGINT)
    assert group_members(env, "orchestrator") == {f"{prefix}orchestrator-1"}
    assert "left group" not in scripts.output(copies[0])


@pytest.mark.usefixtures("partitioned")
def test_the_copy_that_takes_over_ends_the_transaction_a_killed_copy_left_open(env, scripts, topics):
    # Given two orchestrators in one group and the services
    prefix = env["TOPIC_PREFIX"]
    copies = [scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS, INSTANCE_ID=str(i)) for i in (1, 2)]
    wait_members(env, "orchestrator", {f"{prefix}orchestrator-1", f"{prefix}orchestrator-2"})
    for copy in copies:  # (each has its partitions: the group has settled with both)
        scripts.wait_for_output(copy, "read back")
    # When the second is killed in the middle of a transaction: one left open on every partition of sec_command
    # (made here with its transactional id, and a timeout of a minute, as a copy that died in it leaves it)
    scripts.stop(copies[1], signal.SIGKILL)
    dead = KafkaProducer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"], transactional_id=f"{prefix}orchestrator-2",
                         transaction_timeout_ms=60_000)
    dead.init_transactions()
    dead.begin_transaction()
    left_open = [dead.send(prefix + SEC_COMMAND, b"never committed", partition=partition) for partition in range(4)]
    dead.flush()
    assert all(future.get().offset >= 0 for future in left_open)
    # And a detection comes in
    event, detector = detection(severity=4), KafkaProducer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    detector.send(prefix + writer_of(MESSAGE_STREAM, event), event.to_bytes(), key=b"sensor-1").get(timeout=30)
    detector.close()
    # Then its command is routed and readable (read committed) well before Kafka would have timed that transaction
    # out: the survivor, given the killed copy's partitions, ended it
    commands = topics(SEC_COMMAND).read_count(1, timeout=40)
    assert [c.workflow_id for c in commands] == [event.id]
    scripts.wait_for_output(copies[0], f"ended what {prefix}orchestrator-2, gone from the group, left open")
    with pytest.raises(KafkaError):  # (and the dead copy's producer is fenced off)
        dead.commit_transaction()
    dead.close(timeout=1)
