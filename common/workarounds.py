"""Every workaround of a kafka-python behaviour, in one place. Each names the version it was seen in (3.0.12) and
what the client does; requirements.txt pins kafka-python to the 3.0 series because two of them touch private
attributes (`_transaction_manager`, `_sender`). tests/test_workarounds.py shows why each is needed."""

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaProducer
from kafka.partitioner.default import DefaultPartitioner, murmur2
from kafka.errors import KafkaError, KafkaTimeoutError, SaslAuthenticationFailedError

# kafka-python 3.0.12 can wait for ever on a transaction step whose coordinator broker died (its sender keeps
# retrying without finding the new coordinator). A step taking longer than this gives up the producer: a new one
# finds the new coordinator and fences the old one, whose open transaction is aborted (or finished, if its commit
# had begun; the Delivery then checks the committed offsets before the batch is handled again).
TRANSACTION_STEP_TIMEOUT_S = 6.0


class Stuck(KafkaTimeoutError):
    """A transaction step that did not finish in time: the producer is given up, not reused."""


def in_background(function: Callable, **kwargs) -> Callable[[float | None], Any]:
    """Start function(**kwargs) in a daemon thread, which never holds up the process's exit; returns a function
    that waits for its result (re-raising its error), raising Stuck if it has not finished within the timeout."""
    outcome: dict[str, Any] = {}

    def run():
        try:
            outcome["result"] = function(**kwargs)
        except Exception as error:  # noqa: BLE001 -- handed over to whoever waits for the result
            outcome["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result(timeout: float | None = None):
        thread.join(timeout)
        if thread.is_alive():
            raise Stuck(f"did not finish within {timeout:.0f} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
    return result


TRANSACTION_RETRY_MS = 5


def quick_transaction_retries(producer: KafkaProducer) -> KafkaProducer:
    """The producer, retrying its transaction requests after 5 ms instead of its retry_backoff_ms. kafka-python
    3.0.12 retries them after the producer's retry backoff (20 ms here), and a transaction begun right after a
    commit often meets CONCURRENT_TRANSACTIONS: the coordinator is still writing the last commit's markers, which
    takes a millisecond or two. Back-to-back transactions are the normal case for a busy service, so each hop waited
    20 ms more. (Its produce requests keep the 20 ms.) With the producer's linger cut from 20 to 5 ms, this took
    the end-to-end p50 and p95 at 100 events/s about 15% lower (three paired runs of bench.py's latency)."""
    manager = producer._transaction_manager  # noqa: SLF001 -- the backoff is only set from the producer's config
    if manager is not None:
        manager.retry_backoff_ms = TRANSACTION_RETRY_MS
    return producer


def knowing(producer: KafkaProducer, topics: list[str]) -> KafkaProducer:
    """The producer, having learnt where each topic's partitions are, so that a first send does not wait for it.
    kafka-python 3.0.12 asks for one topic's metadata at a time (about 0.1 s each here: 0.7 s for the orchestrator's
    seven topics); told of them all first (the private `_sender.add_topic`), it asks for them in one request."""
    for topic in topics:
        producer._sender.add_topic(topic)
    for topic in topics:
        producer.partitions_for(topic)
    return producer


def bounded(step: Callable, *args) -> None:
    """step(*args), raising Stuck if it takes longer than TRANSACTION_STEP_TIMEOUT_S. kafka-python 3.0.12's
    `send_offsets_to_transaction`, `commit_transaction` and `abort_transaction` take no timeout and can block for
    ever when the transaction coordinator's broker dies."""
    try:
        in_background(lambda: step(*args))(TRANSACTION_STEP_TIMEOUT_S)
    except Stuck as error:
        raise Stuck(f"{getattr(step, '__name__', 'step')} {error.args[0]}") from None


def discard(producer: KafkaProducer, timeout: float = 1) -> None:
    """Close a producer without waiting for what it still holds. kafka-python 3.0.12's close() flushes first and,
    if that times out, raises before stopping its sender thread, which then goes on retrying for ever; so stop that
    thread here (no public call does)."""
    try:
        producer.close(timeout=timeout)
    except KafkaError:
        producer._sender.force_close()  # what close() would have done next


def underlying(error: KafkaError, producer: KafkaProducer | None) -> Exception:
    """The error behind a failed transactional delivery. kafka-python 3.0.12 reports a refused write inside a
    transaction as a plain KafkaError ("... error state: TopicAuthorizationFailedError") and keeps the real one
    as the transaction manager's last error."""
    last = getattr(getattr(producer, "_transaction_manager", None), "last_error", None)
    return last if type(error) is KafkaError and isinstance(last, Exception) else error


class ConnectionWatch(logging.Handler):
    """Hears why kafka-python's connections fail. kafka-python 3.0.12 only logs a failed sign-in
    (SaslAuthenticationFailedError) and a broker closing the connection, and retries for ever; the caller sees
    nothing but a KafkaTimeoutError. Installed while a script waits for Kafka, so that "wrong password" or
    "sign-in needed" is reported as such instead of as "waiting for Kafka"."""

    @classmethod
    def install(cls) -> "ConnectionWatch":
        """Listen to the client's log records; while connecting, its connection errors are not printed (the caller
        says in one line what is wrong: waiting for Kafka, no Kafka, refused)."""
        watch = cls()
        logging.getLogger("kafka").addHandler(watch)
        for handler in logging.getLogger().handlers:
            handler.addFilter(watch.quiet)
        return watch

    def __init__(self):
        super().__init__(logging.ERROR)
        self.sign_in_error, self.disconnects = None, 0
        self.quiet = QuietClientErrors()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        error = next((a for a in args if isinstance(a, SaslAuthenticationFailedError)), None)
        if error is not None:
            self.sign_in_error = str(error).split(": ", 1)[-1]  # the broker's reason; never the password
        elif "socket disconnected" in record.getMessage():
            self.disconnects += 1

    def remove(self) -> None:
        logging.getLogger("kafka").removeHandler(self)
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self.quiet)


class QuietClientErrors(logging.Filter):
    """Hides kafka-python's connection errors (kafka-python 3.0.12 logs "Connection failed ... ECONNREFUSED" at ERROR
    on every attempt), except at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("kafka.") or logging.getLogger().isEnabledFor(logging.DEBUG)


def heartbeat_silence_s(consumer) -> float:
    """Seconds since the group coordinator last answered this member's heartbeat. kafka-python 3.0.12 does not
    raise when the coordinator stops answering (a frozen broker, or one whose group coordinator failed to load
    after a crash and answers NOT_COORDINATOR): poll() just returns nothing and the client logs warnings. The
    heartbeat's last answer, a private attribute, is the only sign a caller can read."""
    heartbeat = consumer._coordinator.heartbeat
    return time.monotonic() - max(heartbeat.last_receive, heartbeat.last_reset)


def member_id(consumer) -> str:
    """This consumer's member id in its group now (a private attribute of kafka-python 3.0.12's coordinator)."""
    return consumer._coordinator._generation.member_id


class LastWords(logging.Handler):
    """The client's last warning or error (kafka-python logs what the broker answered rather than raising it)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.text, self.fenced = "", False
        logging.getLogger("kafka").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.text = record.getMessage()[:300]
        # (a heartbeat answered FencedInstanceIdError: another process joined as this one; kafka-python 3.0.12 logs
        # it, stops the heartbeat and raises nothing, so the member would wait for ever)
        self.fenced = self.fenced or (record.name.startswith("kafka.coordinator") and "fenced" in self.text.lower())


class HidePassword(logging.Filter):
    """No log line shows the password: kafka-python 3.0.12 logs its whole configuration, password included, at DEBUG."""

    def __init__(self, password: str | None):
        super().__init__()
        self.password = password

    def filter(self, record: logging.LogRecord) -> bool:
        if self.password and self.password in record.getMessage():
            record.msg, record.args = record.getMessage().replace(self.password, "********"), None
        return True


class HideClientRefusals(logging.Filter):
    """Hides kafka-python's own lines about a refused right or a fenced producer (kafka-python 3.0.12 logs "Fatal
    Error handling request FindCoordinatorRequest: [Error 53] TransactionalIdAuthorizationFailedError", or "...
    [Error 90] ProducerFencedError", at ERROR, then raises): the script says what it means in a line of its own
    (common.clients.refused; another copy with its INSTANCE_ID; a transaction of its own that timed out). So is
    the heartbeat's "fenced id error" (another process joined the group as this one: the script stops, saying so)."""
    SAID = ("AuthorizationFailedError", "ProducerFencedError", "fenced id error", "fenced group_instance_id")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.name.startswith("kafka.") and any(said in message for said in self.SAID)) \
            or logging.getLogger().isEnabledFor(logging.DEBUG)


class QuietClientChatter(logging.Filter):
    """Hides kafka-python 3.0.12 lines seen on a healthy broker that need nothing from anyone (at DEBUG they show):
    - the producer's "Unable to verify the partition has been added to the transaction" (NotEnoughReplicas /
      NETWORK_EXCEPTION): Kafka 4's broker checks each new partition of a transaction with its coordinator
      (KIP-890) and, when that check's connection is not up yet, asks the producer to retry, which it does;
    - "Metadata refresh: failed Cancelled": a refresh still pending when a one-shot tool closes its client;
    - "... for unknown reasons: Cancelled" (ERROR): a transaction step the script gave up on (it says so itself);
    - the event loop's "Task ... ran for 0.137s (>0.100s threshold)": a busy machine (two cores here) makes one
      step of the client's loop slow; nothing is lost or late because of it;
    - "Topic ... not found in cluster metadata" (ERROR) for a topic the script created a moment before: the broker
      answering is not told of it yet, and the client asks again. (A topic that is really missing ends in the
      script's own error line, when its messages are not acknowledged.)"""
    CHATTER = ("Unable to verify the partition has been added to the transaction", "Metadata refresh: failed Cancelled",
               "(>0.100s threshold)", "not found in cluster metadata", "for unknown reasons: Cancelled")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kafka") or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        return not any(chatter in record.getMessage() for chatter in self.CHATTER)


class RememberingPartitioner(DefaultPartitioner):
    """Kafka's default partitioner (murmur2 of the key, as the Java client), each key's hash remembered: the keys
    are entities (what a workflow is about), few and repeated, and kafka-python 3.0.12's murmur2 is pure Python
    (about 8 µs a record here). A record without a key is placed as by the default partitioner."""

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        known = cluster.partitions_for_topic(topic)  # (None for a topic not known: the default says so)
        if serialized_key is None or not known:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        partitions = sorted(known)
        return partitions[hashed(bytes(serialized_key)) % len(partitions)]


@functools.lru_cache(maxsize=100_000)
def hashed(key: bytes) -> int:
    return murmur2(key) & 0x7fffffff


STOPPING = threading.Event()  # set by the first stop signal (common.waiting.Stopper)


class QuietOnceStopping(logging.Filter):
    """Hides kafka-python's lines once a stop signal came: closing its clients, kafka-python 3.0.12 logs the
    heartbeat it could not send and the connections it closed (ERROR), none of which is trouble on a clean stop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (STOPPING.is_set() and record.name.startswith("kafka")) or \
            logging.getLogger().isEnabledFor(logging.DEBUG)


class ClientWarningsOncePer(logging.Filter):
    """Lets through one kafka-python warning per `seconds`: while the broker is down kafka-python 3.0.12 logs
    several connection warnings a second, which would bury the services' own lines."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.last, self.hidden = seconds, float("-inf"), 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kafka") or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        if record.created - self.last < self.seconds:
            self.hidden += 1
            return False
        if self.hidden:
            record.msg = f"{record.msg} (and {self.hidden} more client warnings in the last {self.seconds:.0f} s)"
        self.last, self.hidden = record.created, 0
        return True


def resumed(consumer, partitions: list) -> None:
    """Resume paused partitions so that they are fetched again. kafka-python 3.0.12 parks the records of a partition
    paused mid-batch, and puts them back on resume only when its in-line slot is None; an exhausted batch of a
    partition still paused is falsy but not None, so a resumed partition stays parked, is never fetched again, and a
    read to the end waits for ever (`monitor.py --once` over 30 000 workflows). The exhausted batch is let go."""
    consumer.resume(*partitions)
    fetcher = consumer._fetcher
    if fetcher._next_partition_records is not None and not fetcher._next_partition_records:
        fetcher._next_partition_records = None
