"""kafka-python clients built the project's way (a consuming service joins its group through join()), topic
creation, reading a topic whole, and telling a user in one line why Kafka will not talk to them."""

import logging
import re
import socket
import struct
import time
from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import AuthorizationError, KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.structs import TopicPartition

from common.messages import Envelope
from common.settings import FAMILIES, REVOKED, SETTINGS, Settings
from common.workarounds import (ConnectionWatch, RememberingPartitioner, discard, in_background,
                                quick_transaction_retries)

log = logging.getLogger("common")
SESSION_TIMEOUT_MS = 6_000  # a member silent this long (a killed copy) loses its partitions to the others (the
# broker's least, group.min.session.timeout.ms); heartbeats every second tell the others of a rebalance within one
HEARTBEAT_INTERVAL_MS = 1_000
# A transactional producer that has not started within this long is given up and made anew (its caller retries):
# after a broker crash kafka-python 3.0.12 can keep asking a coordinator that is gone, up to max_block_ms (120 s).
INIT_TIMEOUT_S = 30


def make_producer(transactional_id: str | None = None, settings: Settings = SETTINGS, **overrides) -> KafkaProducer:
    """Idempotent, acks=all producer that keeps retrying through a broker outage rather than failing records;
    transactional (and initialised) when given a transactional id. It lingers up to 5 ms: a busy loop's records
    go out in large batches, and a transaction's records go out while its offsets are added (the loop flushes at the
    end of each batch, so no message waits longer)."""
    config = dict(settings.kafka_config(), acks="all", enable_idempotence=True, linger_ms=5, batch_size=256 * 1024,
                  delivery_timeout_ms=300_000, max_block_ms=120_000, transactional_id=transactional_id,
                  retry_backoff_ms=20,  # 100 ms by default: the first transaction after a restart waits on it
                  # A batch's transaction takes well under a second. If its process dies, the broker aborts it after
                  # this long (default 60 s), and until then readers (read_committed) wait behind it.
                  transaction_timeout_ms=10_000,
                  metrics_enabled=False,  # (kafka-python's own metrics: nobody reads them, and they cost CPU a record)
                  partitioner=RememberingPartitioner())
    config.update(overrides)
    producer = quick_transaction_retries(KafkaProducer(**config))
    if transactional_id:
        try:  # (fences any earlier producer with this id, finishing its open transaction)
            in_background(producer.init_transactions)(INIT_TIMEOUT_S)
        except KafkaError:  # Stuck too: a client still asking a coordinator that died; a new one asks afresh
            discard(producer)
            raise
    return producer


def make_consumer(group: str, topics: list[str], static: bool = False, settings: Settings = SETTINGS,
                  listener=None, **overrides) -> KafkaConsumer:
    """At-least-once consumer: manual commits, start from the beginning when the group is new, committed reads only.
    A static member (group_instance_id) restarted within the session timeout rejoins without waiting out a
    rebalance, which is what keeps an orchestrator restart short."""
    config = dict(settings.kafka_config(), group_id=settings.group(group), enable_auto_commit=False,
                  auto_offset_reset="earliest", isolation_level="read_committed", session_timeout_ms=SESSION_TIMEOUT_MS,
                  heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
                  max_poll_records=500, client_id=settings.group(group), fetch_max_wait_ms=50, metrics_enabled=False)
    if static:
        config["group_instance_id"] = settings.member(group)
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    consumer.subscribe([settings.topic(name) for name in topics], listener=listener)
    return consumer


def join(stop, group: str, inputs: list[str], settings: Settings, listener=None) -> KafkaConsumer:
    """A static member of `group` reading `inputs`. It subscribes only once the input topics' partitions are in the
    client's metadata: a member that joins right after the topics were created can be assigned nothing, and is not
    told when they appear."""
    # A service that keeps state needs partition p of every input on one copy (its state is partition p of its
    # state topic): the range assignor gives it so when the inputs have as many partitions each.
    ranged = {"partition_assignment_strategy": (RangePartitionAssignor,)} if listener else {}
    consumer = make_consumer(group, inputs, static=True, settings=settings, listener=listener, **ranged)
    while not stop and not all(consumer.partitions_for_topic(settings.topic(name)) for name in inputs):
        stop.wait(0.1)
    counts = {settings.topic(name): len(consumer.partitions_for_topic(settings.topic(name)) or ()) for name in inputs}
    if listener and not stop and len(set(counts.values())) > 1:
        consumer.close(autocommit=False)
        raise SystemExit(f"{group}: its input topics have different partition counts ({counts}); a service that keeps "
                         "state needs them equal (a workflow's messages must share a partition number)")
    return consumer


def send(producer: KafkaProducer, name: str, value: Envelope | bytes | None, key: bytes | str | None = None,
         settings: Settings = SETTINGS, partition: int | None = None, headers: list | None = None):
    """Produce one message (an envelope, or one already serialised) to a project topic; returns the future.
    `headers`: the record's headers (the trace context, when tracing is on)."""
    if isinstance(key, str):
        key = key.encode()
    return producer.send(settings.topic(name), value=value.to_bytes() if isinstance(value, Envelope) else value, key=key,
                         partition=partition, headers=headers)


def wait_for_acks(producer: KafkaProducer, futures: list, name: str = "", stop=None) -> None:
    """Send what is batched now and wait until Kafka acknowledged every record (raise if one failed), saying so
    while the broker is away; a stop ends the wait (KafkaTimeoutError: not acknowledged). The producer lingers to
    build big batches; flushing here adds no latency."""
    began = time.monotonic()
    while True:
        try:
            producer.flush(timeout=10)
            break
        except KafkaTimeoutError:
            if stop:
                raise
            waiting = sum(not f.is_done for f in futures)
            log.warning("%s: %d message%s waiting %.0f s for Kafka to acknowledge them; still trying (is it up?)", name,
                        waiting, "s" * (waiting != 1), time.monotonic() - began)
    for future in futures:
        future.get()  # flush() does not raise for a failed record; get() does


def ensure_topics(admin: KafkaAdminClient, settings: Settings, names: Iterable[str]) -> None:
    """Create whichever of these project topics (members of a family by their own name) are missing, so every
    script runs against any cluster."""
    missing = {settings.topic(name) for name in names if name not in FAMILIES} - set(admin.list_topics())
    if not missing:
        return
    try:  # (the revocations keep the last record of each workflow, as a state topic does)
        admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor,
                                      topic_configs=settings.kept() if name == settings.topic(REVOKED) else {})
                             for name in sorted(missing)])
        log.info("created topics %s", ", ".join(sorted(missing)))
    except TopicAlreadyExistsError:  # another script created them at the same moment
        pass


def wait_for_kafka(stop, what: str, settings: Settings = SETTINGS, wait: bool = True,
                   topics: Iterable[str] = ()) -> KafkaAdminClient | None:
    """Connect an admin client (saying clearly that we wait if the broker is not up yet) and create any of `topics`
    that is missing (the script's own inputs and outputs); returns the client, or None if stopped meanwhile. A broker
    that refuses us (wrong password, or sign-in needed) or forbids a topic ends the script with one clear line:
    waiting would not help. wait=False (the one-shot tools): no broker answering ends the script with one line too."""
    waiting_since, watch, began = None, ConnectionWatch.install(), time.monotonic()
    try:
        while not stop:
            try:
                admin = KafkaAdminClient(**settings.kafka_config(), bootstrap_timeout_ms=2000, client_id=what)
                if waiting_since is not None:
                    log.info("%s: Kafka is up after %.0f s of waiting", what, time.monotonic() - waiting_since)
                ensure_topics(admin, settings, topics)
                return admin
            except KafkaTimeoutError:
                if reason := why_refused(watch, settings):
                    log.error("%s: %s", what, reason)
                    raise SystemExit(2) from None
                if not wait and time.monotonic() - began > 10:  # (a sign-in failure shows within a few tries, even
                    # on a busy machine: SCRAM makes the broker work)
                    log.error("%s: no Kafka answers at %s (start it with 'make kafka-up')", what,
                              settings.bootstrap_servers)
                    raise SystemExit(2) from None
                if waiting_since is None and wait:
                    waiting_since = time.monotonic()
                    log.warning("%s: waiting for Kafka at %s (start it with 'make kafka-up')", what,
                                settings.bootstrap_servers)
            except AuthorizationError as error:
                raise refused(what, error, settings) from None
    finally:
        watch.remove()
    return None


def why_refused(watch: ConnectionWatch, settings: Settings = SETTINGS) -> str | None:
    """Why Kafka refuses us, if it does, from what the client logged while connecting."""
    servers = settings.bootstrap_servers
    if watch.sign_in_error:
        return (f"Kafka at {servers} refused to sign in user {settings.user!r} ({watch.sign_in_error}); "
                f"check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
    if "security_protocol" not in settings.sign_in and watch.disconnects >= 2 and answers_kafka(servers):
        return (f"Kafka at {servers} accepts connections but closes ours: it wants clients to sign in; "
                f"set KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
    return None


def answers_kafka(servers: str) -> bool:
    """True if the first bootstrap server answers a Kafka ApiVersions request (v0, sent by hand). A broker that wants
    sign-in answers it and then closes the connection on the next request; a port that is open while the broker
    behind it is still starting (a Docker port proxy, say) does not answer at all."""
    host, _, port = servers.split(",")[0].rpartition(":")
    client_id = b"probe"
    request = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id  # ApiVersions v0, correlation id 1
    try:
        with socket.create_connection((host, int(port)), timeout=2) as connection:
            connection.sendall(struct.pack(">i", len(request)) + request)
            reply = connection.recv(8)
    except (OSError, ValueError):
        return False
    return len(reply) == 8 and struct.unpack(">ii", reply)[1] == 1


def refused(what: str, error: KafkaError, settings: Settings = SETTINGS) -> SystemExit:
    """An authorization error ends the script with one line: retrying cannot grant a right."""
    log.error("%s: Kafka does not allow user %r to do this (%s). Each user may only do its own script's job "
              "(see acls.py); run the script as its own user or ask the cluster's admin", what,
              settings.user or "(anonymous)", error)
    return SystemExit(3)


def read_from(consumer: KafkaConsumer, starts: dict[TopicPartition, int | None], what: str,
              timeout: float = 30.0) -> list:
    """Every record of these partitions from each one's start offset (None: its beginning) to its end now, read with
    a consumer of no group. A read that makes no progress for `timeout` s ends the script in one line."""
    if not starts:
        return []
    consumer.assign(list(starts))
    for partition, offset in starts.items():
        if offset is None:
            consumer.seek_to_beginning(partition)
        else:
            consumer.seek(partition, offset)
    end, records, deadline = consumer.end_offsets(list(starts)), [], time.monotonic() + timeout
    while any(consumer.position(p) < end[p] for p in starts):
        if time.monotonic() > deadline:
            raise SystemExit(f"reading {what} made no progress for {timeout:.0f} s; is the broker healthy?")
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
            deadline = time.monotonic() + timeout  # (a long topic may take long; a stuck read may not)
    return records


def read_all(name: str | list[str], timeout: float = 30.0, settings: Settings = SETTINGS) -> list:
    """Every record now in a project topic, or in every member of a family (all partitions, committed only), or in
    each of a list of them, without joining a group. For the one-shot tools: a read that stalls ends the script
    with one line."""
    names = [name] if isinstance(name, str) else name
    real = ", ".join(map(settings.topic, names))
    consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, isolation_level="read_committed")
    try:
        topics = [t for t in consumer.topics() if re.match(settings.pattern(names), t)]
        partitions = [TopicPartition(t, p) for t in sorted(topics) for p in consumer.partitions_for_topic(t) or ()]
        if not partitions:  # no such topic (yet): nothing in it
            return []
        return read_from(consumer, dict.fromkeys(partitions), real, timeout)
    except AuthorizationError as error:
        raise refused(f"reading {real}", error, settings) from None
    finally:
        consumer.close(autocommit=False)
