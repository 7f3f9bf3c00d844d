"""Delivering a handled batch: its outputs and its input offsets, in one Kafka transaction (exactly once) or
acknowledged first and committed after (at least once). The Delivery owns the producer; when a delivery fails it
recovers the producer and answers plainly: the batch is committed, or it must be handled again. A commit whose result
is not known (it timed out: the broker may have committed it all the same) is found out, never guessed, before
anything is written again: by the group's committed offsets when the batch consumed records, else by reading one of
its outputs back once the transaction is settled (a tick's events, a batch of timers alone)."""

import logging
import time
from collections.abc import Callable

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from kafka.errors import (AuthorizationError, CorruptRecordError, FencedInstanceIdError, InvalidRecordError,
                          InvalidTimestampError, KafkaError, MessageSizeTooLargeError, ProducerFencedError,
                          RecordListTooLargeError)

from common.clients import make_producer, refused, send, wait_for_acks
from common import metrics
from common.handling import Handled, Serialised, offsets_of, outputs_of, rejected
from common.settings import SETTINGS, Settings
from common.workarounds import Stuck, bounded, discard, in_background, knowing, underlying

log = logging.getLogger("common")

PRODUCER_START_S = 30      # a producer that has not started by then is given up (a stop is then honoured)
COMMIT_TIMEOUT_MS = 6_000  # an at-least-once commit or a committed-offsets look-up that takes longer has failed
FENCED_AGAIN_S = 30        # fenced twice within this long: another copy runs with our INSTANCE_ID
# What Kafka answers about a record it will never take, however often it is sent.
UNDELIVERABLE = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, CorruptRecordError,
                 InvalidTimestampError)


class Delivery:
    """Delivers batches for one consuming service: deliver() says which records were committed; write() sends
    outputs and commits offsets once, True if committed and False if they must be handled again (`undeliverable`
    then says whether Kafka refused a record for good). A refusal ends the script and a second copy with our
    INSTANCE_ID raises FencedInstanceIdError, since retrying helps neither."""

    def __init__(self, name: str, stop, transactional_id: str | None, settings: Settings = SETTINGS,
                 new_producer: Callable[..., KafkaProducer] = make_producer, warm: tuple[str, ...] = (),
                 replaced: Callable[[], bool] = lambda: False):
        self.name, self.stop, self.transactional_id, self.settings = name, stop, transactional_id, settings
        self.replaced = replaced  # whether another process took this copy's place in its group
        self.new_producer = lambda: new_producer(transactional_id=transactional_id, settings=settings)
        # Made (and its transactional id fenced) while the consumer joins its group, and told where the topics it
        # writes (`warm`, all existing) are: a restart's first batch then waits for neither (about 0.25 s).
        self.starting = in_background(lambda: knowing(self.new_producer(), [settings.topic(t) for t in warm]))
        self.producer: KafkaProducer | None = None
        self.fenced_at = float("-inf")
        self.undeliverable, self.trouble = False, ""

    @property
    def transactional(self) -> bool:
        return self.transactional_id is not None

    def deliver(self, consumer: KafkaConsumer, own: list[Serialised], handled: list[Handled],
                offsets: dict | None = None) -> tuple[list[Handled] | None, bool]:
        """Deliver a handled batch and the loop's own messages (a tick's, a timer's; `offsets`: theirs): (the records
        committed, in order, or None if none could be; whether its own messages went out). The loop's own go after
        the records' outputs: a timer's state change is made after the batch's, from it, and must land last. A batch
        Kafka refuses for good is split: each record on its own, and one Kafka never takes is dead-lettered."""
        offsets = offsets or {}
        if self.write(consumer, outputs_of(handled) + own, {**offsets, **offsets_of(handled)}, offsets_of(handled),
                      len(own)):
            return handled, True
        if not self.undeliverable:
            return None, False
        done: list[Handled] = []
        for item in handled:
            if not self.write(consumer, item.outputs, offsets_of([item]), offsets_of([item])):
                if not self.undeliverable:
                    return done, False
                reason = f"its output could not be delivered: {self.trouble}"
                item = Handled(item.record, [rejected(self.name, item.record, reason, item.span)], span=item.span,
                               counted=("dead", metrics.reason_kind(reason)))
                if not self.write(consumer, item.outputs, offsets_of([item]), offsets_of([item])):
                    return done, False
            done.append(item)
        sent = not own or self.write(consumer, own, offsets, {}, len(own))
        if not sent and self.undeliverable:
            log.error("%s: %d messages of its own are refused by Kafka for good (%s)", self.name, len(own), self.trouble)
        return done, sent

    def write(self, consumer: KafkaConsumer, outputs: list[Serialised], offsets: dict, consumed: dict | None = None,
              own: int = 0) -> bool:
        """Produce `outputs` and commit `offsets` (`consumed`: those of records handled in the batch, which advance
        the group's, by default all of them; `own`: how many of the outputs, the last, are the loop's own, made from
        no record); True if committed, False if they must be handled again."""
        self.undeliverable = False
        if not outputs and not offsets:
            return True
        sent: list = []  # (the outputs' futures: what Kafka acknowledged of them, should the commit be unclear)
        try:
            producer = self._ready()
            if self.transactional:
                in_one_transaction(producer, consumer, outputs, offsets, self.settings, sent)
            else:
                acknowledged_then_committed(producer, consumer, outputs, offsets, self.settings, self.stop)
            return True
        except FencedInstanceIdError:
            raise
        except KafkaError as error:  # includes a transaction the broker aborted (timed out) and a stuck step
            return self._recover(error, consumer, offsets if consumed is None else consumed, sent[len(sent) - own:]
                                 if own else [], sent)

    def close(self) -> None:
        if self.producer is not None:
            discard(self.producer, timeout=10)

    def _ready(self) -> KafkaProducer:
        if self.producer is None:  # a failed start is not kept: the next try makes a new producer
            starting, self.starting = self.starting, None
            self.producer = starting(PRODUCER_START_S) if starting else self.new_producer()
        return self.producer

    def _recover(self, error: KafkaError, consumer: KafkaConsumer, consumed: dict, own: list, sent: list) -> bool:
        """After a failed delivery: a usable producer again, and whether the batch was committed after all (asked
        once the failed transaction is settled: the new producer's start has finished or aborted it)."""
        cause = underlying(error, self.producer)
        self.undeliverable, self.trouble = isinstance(cause, UNDELIVERABLE), f"{type(cause).__name__}: {cause}"
        if isinstance(cause, AuthorizationError):  # e.g. writing a topic this user does not own
            raise refused(self.name, cause) from None
        if isinstance(cause, ProducerFencedError):
            self._fenced(cause)
        self._abandon(error)
        if self.transactional and self.producer is None:
            self.producer = self._settle()
            if self.producer is None:  # stopped meanwhile: the batch waits in Kafka for the next start
                return False
        if self.transactional and self.committed(consumer, consumed, own, sent):
            log.info("%s: a batch whose commit seemed to fail (%s) had been committed, or its records handled by the "
                     "copy that took them over; going on", self.name, error)
            return True
        log.info("%s: could not deliver a batch (%s); it will be handled again", self.name, error)
        return False

    def committed(self, consumer: KafkaConsumer, consumed: dict, own: list, sent: list) -> bool:
        """Whether a settled transaction's work is done: where it carried the loop's own messages (made from no record:
        nothing else would make them again), one of those read back tells; else, where it consumed records, the
        group's committed offsets (this copy's, or a copy's that took the records over and handled them); else one of
        its outputs read back. Nothing acknowledged, or one refused: it cannot have committed."""
        if consumed and not own:
            return committed_after_all(consumer, consumed)
        futures = own or sent
        acknowledged = [future.value for future in futures if future.is_done and future.succeeded()]
        if not acknowledged or len(acknowledged) < len(futures):
            return False
        while not self.stop:  # (found out, never guessed: nothing is written again until it is known)
            known = read_back(self.settings, acknowledged[0], self.stop)
            if known is not None:
                return known
            log.warning("%s: it is not known yet whether a batch was committed (%s:%d:%d); finding out before "
                        "anything is written again", self.name, acknowledged[0].topic, acknowledged[0].partition,
                        acknowledged[0].offset)
        return False

    def _fenced(self, cause: ProducerFencedError) -> None:
        """Fenced once can be our own transaction that timed out; twice soon after, or with another process in our
        place in the group, is another copy of us (trying again would fence it in turn)."""
        if time.monotonic() - self.fenced_at < FENCED_AGAIN_S or self.replaced():
            raise FencedInstanceIdError(str(cause)) from None
        self.fenced_at = time.monotonic()

    def _abandon(self, error: KafkaError) -> None:
        """Abort the failed batch's transaction; if that fails too, or the producer is stuck, drop the producer
        (the next one fences it, which aborts its open transaction)."""
        if self.producer is None or not self.transactional:
            return
        if not isinstance(error, Stuck):
            try:
                bounded(self.producer.abort_transaction)
                return
            except KafkaError:  # cannot abort now (broker gone, producer fenced)
                pass
        discard(self.producer)
        self.producer = None

    def _settle(self) -> KafkaProducer | None:
        """A new transactional producer: its start finishes or aborts the old one's open transaction, after which
        the committed offsets tell whether the batch went through. None if stopped meanwhile."""
        while not self.stop:
            try:
                return self.new_producer()
            except AuthorizationError as error:
                raise refused(self.name, error) from None
            except KafkaError as error:
                log.warning("%s: could not start a producer as %s (%s); trying again", self.name,
                            self.transactional_id, error)
                self.stop.wait(1.0)
        return None


def in_one_transaction(producer: KafkaProducer, consumer: KafkaConsumer, outputs: list[Serialised], offsets: dict,
                       settings: Settings, sent: list | None = None) -> None:
    """Exactly once: the outputs and the consumed offsets commit together, or neither does. `sent`: the outputs'
    futures are added to it as they are sent."""
    producer.begin_transaction()
    futures = sent if sent is not None else []
    futures += [send(producer, *out[:3], settings, *out[3:]) for out in outputs]  # (partition, headers)
    for future in futures:  # kafka-python fails a record refused before it was batched (say, an unknown topic) only
        if future.is_done and future.failed():  # in its future: the transaction would commit without it
            raise future.exception
    if offsets:
        bounded(producer.send_offsets_to_transaction, offsets, consumer.group_metadata())
    bounded(producer.commit_transaction)


def acknowledged_then_committed(producer: KafkaProducer, consumer: KafkaConsumer, outputs: list[Serialised],
                                offsets: dict, settings: Settings, stop=None) -> None:
    """At least once: the offsets are committed only after Kafka acknowledged every output."""
    wait_for_acks(producer, [send(producer, *out[:3], settings, *out[3:]) for out in outputs], "batch", stop)
    if offsets:
        consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)


def read_back(settings: Settings, written, stop, wait_s: float = 30.0) -> bool | None:
    """Whether the record Kafka acknowledged at `written` (its topic, partition and offset) was committed: a
    read_committed read returns it, or passes over it (aborted); None if that is not known within `wait_s` (another
    transaction holds the partition's stable end back, or the broker is away) or once stopped."""
    reader = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, isolation_level="read_committed")
    tp = TopicPartition(written.topic, written.partition)
    try:
        reader.assign([tp])
        reader.seek(tp, written.offset)
        until = time.monotonic() + wait_s
        while not stop and time.monotonic() < until:
            records = reader.poll(timeout_ms=500).get(tp)
            if records:
                return records[0].offset == written.offset
            if reader.position(tp) > written.offset:
                return False
        return None
    except KafkaError:  # (the broker away: asked again)
        return None
    finally:
        reader.close(autocommit=False)


def committed_after_all(consumer: KafkaConsumer, offsets: dict) -> bool:
    """True if the group's committed offsets already cover the batch (asked once its transaction is settled)."""
    try:
        return all((consumer.committed(tp, timeout_ms=COMMIT_TIMEOUT_MS) or -1) >= meta.offset
                   for tp, meta in offsets.items())
    except KafkaError:
        return False
