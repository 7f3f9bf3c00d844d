"""Why each kafka-python workaround in common/workarounds.py is there: the client's behaviour it works around,
shown where it can be (a real broker for the producer that will not close), and what the workaround then does.
Two behaviours need a broker to die or a secured cluster, so the tests that show them live there:
test_cluster.py kills the transaction coordinator's broker (the unbounded transaction step), and test_secure.py
writes a topic the user may not (the refusal hidden behind a plain KafkaError)."""

import logging
import threading
import time

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, SaslAuthenticationFailedError, TopicAuthorizationFailedError

import common.workarounds
import local_kafka
from common.workarounds import (ClientWarningsOncePer, ConnectionWatch, HidePassword, QuietClientChatter, Stuck, bounded,
                                discard, underlying)


def test_a_producer_whose_broker_is_gone_is_not_stopped_by_close_but_is_by_discard(tmp_path):
    # Given a producer with a record in hand whose broker has gone away (a broker of this test's own)
    broker, _ = local_kafka.start(local_kafka.free_port(), tmp_path)
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.address)
        admin.create_topics([NewTopic("held", 1, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=broker.address)
        producer.send("held", b"first").get(timeout=30)
    finally:
        local_kafka.stop(tmp_path)
    producer.send("held", b"second")
    # When it is closed with a timeout, kafka-python 3.0.12 raises and leaves its sender thread retrying
    with pytest.raises(KafkaTimeoutError):
        producer.close(timeout=1)
    assert producer._sender.is_alive()
    # Then discard() stops the sender, which close() never reached
    discard(producer)
    producer._sender.join(5)
    assert not producer._sender.is_alive()


@pytest.mark.no_broker
def test_a_transaction_step_that_blocks_is_given_up_after_the_bound(monkeypatch):
    monkeypatch.setattr(common.workarounds, "TRANSACTION_STEP_TIMEOUT_S", 0.1)
    never = threading.Event()

    def commit_transaction():
        never.wait(5)
    began = time.monotonic()
    with pytest.raises(Stuck, match="commit_transaction did not finish"):
        bounded(commit_transaction)
    assert time.monotonic() - began < 2
    never.set()


@pytest.mark.no_broker
def test_the_real_error_of_a_failed_transaction_is_found_behind_the_plain_one():
    hidden = TopicAuthorizationFailedError("sec_command")
    producer = type("Producer", (), {"_transaction_manager": type("Manager", (), {"last_error": hidden})()})()
    assert underlying(KafkaError("... error state: TopicAuthorizationFailedError"), producer) is hidden
    specific = KafkaTimeoutError("slow")
    assert underlying(specific, producer) is specific  # a specific error is its own cause


@pytest.mark.no_broker
def test_a_sign_in_failure_is_heard_in_the_clients_log_records():
    # kafka-python logs the failed sign-in and retries; the caller only ever sees a timeout
    watch = ConnectionWatch.install()
    try:
        logging.getLogger("kafka.conn").error("%s: %s", "<conn>", SaslAuthenticationFailedError(
            "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM"))
        logging.getLogger("kafka.conn").error("%s socket disconnected", "<conn>")
    finally:
        watch.remove()
    assert watch.sign_in_error.startswith("Authentication failed during authentication due to invalid credentials")
    assert watch.disconnects == 1


def record(name: str, message: str, *args, created: float | None = None) -> logging.LogRecord:
    entry = logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, None)
    if created is not None:
        entry.created = created
    return entry


@pytest.mark.no_broker
def test_the_password_in_the_clients_debug_configuration_is_masked():
    line = record("kafka.producer", "Starting the Kafka producer with config %s", {"sasl_plain_password": "s3cret"})
    assert HidePassword("s3cret").filter(line) and "s3cret" not in line.getMessage() and "********" in line.getMessage()


@pytest.mark.no_broker
def test_a_burst_of_client_warnings_shows_one_line_then_how_many_were_hidden():
    only_one = ClientWarningsOncePer(30.0)
    burst = [record("kafka.conn", "connect to %s failed", "localhost:9092", created=100 + i / 10) for i in range(10)]
    assert [only_one.filter(r) for r in burst] == [True] + [False] * 9
    later = record("kafka.conn", "connect to %s failed", "localhost:9092", created=131)
    assert only_one.filter(later) and later.getMessage().endswith("(and 9 more client warnings in the last 30 s)")
    assert only_one.filter(record("orchestrator", "routed", created=131.1))  # the services' own lines always pass


@pytest.mark.no_broker
def test_the_clients_own_line_about_a_refused_right_is_hidden_since_the_script_says_it_in_one_line():
    from common.workarounds import HideClientRefusals
    line = record("kafka.producer.transaction_manager", "Fatal Error handling request %s: %s", "FindCoordinatorRequest",
                  "[Error 53] TransactionalIdAuthorizationFailedError")
    assert not HideClientRefusals().filter(line)
    assert HideClientRefusals().filter(record("common", "orchestrator: Kafka does not allow user %r", "x"))


def test_a_producer_learns_one_topics_metadata_at_a_time_unless_told_of_them_all_first(kafka):
    # Given five topics a producer has not written yet
    names = [f"know_{time.time_ns()}_{i}" for i in range(5)]
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(name, 1, 1) for name in names])
    admin.close()

    def known_after_learning_the_first(tell_first):
        producer = KafkaProducer(bootstrap_servers=kafka)
        try:
            if tell_first:
                for name in names:
                    producer._sender.add_topic(name)
            producer.partitions_for(names[0])  # (what a first send waits for)
            return [producer._metadata.partitions_for_topic(name) is not None for name in names[1:]]
        finally:
            producer.close()
    # When the first topic's metadata is learnt, the others' not being asked for
    # Then the client knows nothing of the others (each would cost a round trip), unless told of them all first
    assert known_after_learning_the_first(tell_first=False) == [False] * 4
    assert known_after_learning_the_first(tell_first=True) == [True] * 4


@pytest.mark.no_broker
def test_the_clients_chatter_on_a_healthy_broker_is_hidden_and_nothing_else():
    quiet = QuietClientChatter()
    for line in (record("kafka.producer.sender", "Got error produce response: %s. Unable to verify the partition has "
                        "been added to the transaction", "NotEnoughReplicasError"),
                 record("kafka.cluster", "Metadata refresh: failed %s", "Cancelled"),
                 record("kafka.net.selector", "Task %s ran for 0.137s (>0.100s threshold). It is blocking", "t"),
                 record("kafka.cluster", "Topic %s not found in cluster metadata", "message_stream.security_detector")):
        assert not quiet.filter(line)
    assert quiet.filter(record("kafka.cluster", "Metadata refresh: failed %s", "KafkaConnectionError"))
    assert quiet.filter(record("orchestrator", "(>0.100s threshold)"))  # (the scripts' own lines always pass)


@pytest.mark.no_broker
def test_the_clients_lines_while_closing_after_a_stop_signal_are_hidden_and_the_scripts_own_are_not(monkeypatch):
    # (found by hand: a clean Ctrl-C printed "kafka.coordinator ERROR Error sending HeartbeatRequest ...")
    from common import workarounds
    monkeypatch.setattr(workarounds, "STOPPING", threading.Event())
    quiet, heartbeat = workarounds.QuietOnceStopping(), record("kafka.coordinator", "Error sending HeartbeatRequest")
    assert quiet.filter(heartbeat)  # (before a stop: trouble worth a line)
    workarounds.STOPPING.set()
    assert not quiet.filter(heartbeat) and quiet.filter(record("orchestrator", "stopping after 3 messages"))


@pytest.mark.no_broker
def test_the_clients_lines_about_a_fenced_copy_are_hidden_since_the_script_says_it():
    from common.workarounds import HideClientRefusals
    for line in (record("kafka.producer.transaction_manager", "Fatal Error handling request %s: %s",
                        "AddOffsetsToTxnRequest", "[Error 90] ProducerFencedError"),
                 record("kafka.coordinator.heartbeat", "Heartbeat failed for group %s due to fenced id error: %s", "g",
                        "g-1")):
        assert not HideClientRefusals().filter(line)


@pytest.mark.no_broker
def test_the_remembering_partitioner_places_every_key_as_kafkas_default_partitioner_does():
    from kafka.partitioner.default import DefaultPartitioner

    from common.workarounds import RememberingPartitioner

    class Cluster:
        def topics(self):
            return {"t"}

        def partitions_for_topic(self, topic):
            return set(range(7))

        def available_partitions_for_topic(self, topic):
            return set(range(7))
    keys = [f"sensor-{i}".encode() for i in range(500)] + [b"", b"\xff\xfe", b"workflow/" + b"x" * 300]
    for key in keys * 2:  # (the second time from what it remembered)
        assert RememberingPartitioner().partition("t", key, key, None, None, Cluster()) == \
            DefaultPartitioner().partition("t", key, key, None, None, Cluster())


@pytest.mark.no_broker
def test_a_commit_window_gathers_polls_in_order_and_keeps_only_what_is_still_read_and_still_assigned():
    from types import SimpleNamespace

    from kafka.structs import TopicPartition

    from common import Settings
    from common.waiting import Poller

    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)

    def records(tp, *offsets):
        return [SimpleNamespace(topic="t", partition=tp.partition, offset=o) for o in offsets]

    class Consumer:
        """Polls as a rebalance would have them: p0 set back to its committed offset, p1 taken away."""
        _coordinator = SimpleNamespace(heartbeat=SimpleNamespace(last_receive=time.monotonic(), last_reset=0))

        def __init__(self, polls):
            self.polls, self.assigned = list(polls), {p0, p1}

        def poll(self, timeout_ms):
            batch, revoke = self.polls.pop(0) if self.polls else ({}, False)
            if revoke:
                self.assigned = {p0}
            return batch

        def assignment(self):
            return self.assigned
    consumer = Consumer([({p0: records(p0, 10, 11), p1: records(p1, 5)}, False),
                         ({p0: records(p0, 13)}, False),           # (12: a transaction's marker)
                         ({p0: records(p0, 10, 11, 13, 14)}, True)])  # (a rebalance: p0 read again, p1 gone)
    class Running:  # (a stop signal not given)
        def __bool__(self):
            return False
    poller = Poller(consumer, "t", stop=Running(), settings=Settings())
    batch = poller.gathered(100, window_s=0.3, most=7)
    assert {tp: [r.offset for r in rs] for tp, rs in batch.items()} == {p0: [10, 11, 13, 14]}
    # And a batch as large as a poll's is not made larger
    busy = Consumer([({p0: records(p0, 1, 2), p1: records(p1, 3)}, False), ({p0: records(p0, 4)}, False)])
    assert sum(map(len, Poller(busy, "t", Running(), Settings()).gathered(100, window_s=0.3, most=3).values())) == 3
    assert len(busy.polls) == 1  # (the second poll was not asked for)
    # And without a window, one poll is one batch
    assert Poller(Consumer([({p1: records(p1, 1)}, False)]), "t", Running(), Settings()).gathered(
        100, window_s=0)[p1][0].offset == 1


def test_a_resumed_partition_is_not_left_parked_behind_an_exhausted_batch(kafka):
    # (kafka-python 3.0.12 restores a resumed partition's parked records only when its in-line slot is None; an
    # exhausted batch there is falsy, not None: over 30 000 workflows `monitor.py --once` then waited for ever)
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    from common import resumed
    consumer = KafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    try:
        fetcher, parked = consumer._fetcher, TopicPartition("t", 0)
        exhausted = type("Exhausted", (), {"__bool__": lambda self: False, "topic_partition": TopicPartition("u", 0)})()
        fetcher._next_partition_records = exhausted
        resumed(consumer, [])
        assert fetcher._next_partition_records is None  # (so that the parked partition is put back on the next poll)
        fetcher._paused_partition_records[parked] = "its records"
        assert parked not in fetcher._fetchable_partitions()  # (parked: never fetched until it is put back)
    finally:
        fetcher._paused_partition_records.clear()
        consumer.close()
