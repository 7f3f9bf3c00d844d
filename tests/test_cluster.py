"""A three-node cluster (replication factor 3, min ISR 2): one broker killed under load and restarted loses nothing
acknowledged, and the workflows keep completing."""

import re
import time

import pytest
from helpers import NO_RESENDS, detections, exactly_one_each, wait_completed, wait_for_reports, worst_delay
from kafka import KafkaAdminClient

import local_kafka
from common import MESSAGE_STREAM
from contracts import NOTIFICATION_COMMAND, SEC_COMMAND, THIRD_PARTY


@pytest.fixture
def cluster(env, tmp_path):
    """A three-node local_kafka cluster of this test's own; the test's scripts use it."""
    data_dir = tmp_path / "cluster"
    started, _ = local_kafka.start(local_kafka.free_ports(3), data_dir, nodes=3)
    env.update(KAFKA_BOOTSTRAP_SERVERS=started.address, TOPIC_PARTITIONS="3")
    yield started, data_dir
    local_kafka.stop(data_dir)


def transaction_coordinator(address: str, transactional_id: str) -> int:
    """The node coordinating a transactional id's transactions: the leader of its __transaction_state partition."""
    admin = KafkaAdminClient(bootstrap_servers=address.split(","))
    try:
        [state] = admin.describe_topics(["__transaction_state"])
        java_hash = 0
        for char in transactional_id:  # Kafka places it by the id's Java hashCode
            java_hash = (31 * java_hash + ord(char)) & 0xFFFFFFFF
        partition = (java_hash & 0x7FFFFFFF) % len(state["partitions"])
        return next(p["leader_id"] for p in state["partitions"] if p["partition_index"] == partition)
    finally:
        admin.close()


def test_killing_a_broker_under_load_loses_nothing_acknowledged(cluster, env, scripts, topics):
    started, data_dir = cluster
    # Given the Example 2 system on the cluster and 300 detections streaming in
    for service in ("security_service.py", "notification_service.py", "reporting_service.py"):
        scripts.start(service)
    scripts.start("orchestrator.py", "--example", "2", *NO_RESENDS)
    detector = scripts.start("security_detector.py", "--count", "300", "--rate", "15", "--seed", "31")
    commands, stream = topics(SEC_COMMAND), topics(MESSAGE_STREAM)
    commands.read_count(40, timeout=90)
    # When the broker coordinating the orchestrator's transactions is killed (SIGKILL), and restarted 40 commands later
    victim = transaction_coordinator(started.address, env["TOPIC_PREFIX"] + "orchestrator-1")
    killed_at = time.monotonic()
    local_kafka.kill_node(data_dir, victim)
    commands.read_count(80, timeout=90)
    back_after = time.monotonic() - killed_at
    local_kafka.restart_node(data_dir, victim)
    # Then the detector had every detection acknowledged, and every one is in message_stream once
    assert detector.wait(timeout=120) == 0
    assert re.search(r"produced 300 messages", scripts.output(detector))
    workflows = detections(stream.read_count(300, type_="security_detection", timeout=60))
    assert len(workflows) == 300 and len(stream.messages()) >= 300
    # And each has exactly one security and one notification command, and completes, reported once
    notifications, third_party = topics(NOTIFICATION_COMMAND), topics(THIRD_PARTY)
    exactly_one_each(workflows, commands, notifications)
    wait_completed(stream, third_party, workflows, timeout=90)
    assert wait_for_reports(scripts, 300)["reports"] == 300
    print(f"3 nodes, node {victim} killed for {back_after:.1f} s: detections=300 acknowledged=300 commands="
          f"{len(commands.messages())} lost=0 duplicates=0; longest detection->command "
          f"{worst_delay(stream, 'security_detection', commands, 'security_command'):.1f} s")
