"""The two loops every script runs: run_service (consume -> handle -> produce, for every consuming service) and
run_producer (for the event sources), with the clean stop they share.

run_service's normal path is four lines: poll, handle the batch (common/handling.py), deliver it
(common/delivery.py), and on to the next. Everything that can go wrong on the way is behind those names: bad input
becomes a dead letter in handle_batch; a failed delivery is recovered by the Delivery, which says whether the batch
was committed or must be handled again (the loop then rewinds to it)."""

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from kafka import KafkaAdminClient, KafkaConsumer
from kafka.errors import AuthorizationError, FencedInstanceIdError, KafkaError, NoError

from common.clients import SESSION_TIMEOUT_MS, make_consumer, make_producer, refused, send, wait_for_acks, wait_for_kafka
from common.delivery import Delivery
from common.handling import (Handled, Handler, Out, Seen, Triple, handle_batch, offsets_of, outputs_of, rejected,
                             serialised)
from common.messages import Envelope
from common.settings import SETTINGS, Settings
from common.workarounds import LastWords, discard, heartbeat_silence_s

log = logging.getLogger("common")


def run_service(name: str, inputs: list[str], handle: Handler, *, group: str | None = None,
                tick: Callable[[], list[Triple]] | None = None, transactional: bool = False, dedupe: bool = False,
                start_like: str | None = None, settings: Settings = SETTINGS) -> None:
    """Consume `inputs`, handle each message, produce what the handler returns, then commit.

    transactional=True: a batch's outputs and its offsets commit in one Kafka transaction (exactly once); else its
    offsets are committed once Kafka acknowledged its outputs (at least once). A batch that cannot be delivered is
    handled again. dedupe=True skips ids already handled. What a handler rejects or keeps failing on goes to
    dead_letter. Outputs keep the input's key. `tick()` adds (topic, message, key) triples each loop; `start_like`:
    a new group starts where that group left off.
    """
    group, stop = group or name, Stopper()
    if not prepare(stop, name, group, start_like, settings):
        return
    delivery = Delivery(name, stop, settings.transactional_id(group) if transactional else None, settings)
    consumer = join(stop, group, inputs, settings)
    poller, pause = Poller(consumer, name, stop, settings), Pause(name, settings.group(group), stop)
    seen, unsent, count = Seen() if dedupe else None, [], 0
    log.info("%s: started; consuming %s as group %s%s from %s", name, ", ".join(map(settings.topic, inputs)), group,
             f", exactly once as transactional id {delivery.transactional_id}" if transactional else ", at least once",
             settings.bootstrap_servers)
    try:
        while not stop:
            batch = poller.poll(timeout_ms=100 if tick else 500)
            if batch is None:  # the broker is away: nothing new is made until it is back
                pause.until_better(poller.trouble)
                continue
            unsent += [serialised(*triple) for triple in tick()] if tick else []
            handled, holdup = handle_batch(name, batch, handle, seen, stop)
            done = deliver(delivery, consumer, unsent, handled)
            if done is not None:
                unsent, count = [], count + len(done)
                seen.remember(done) if seen is not None else None
            if holdup or done is None or len(done) < len(handled):
                rewind(consumer, batch, done or [])
                pause.until_better(holdup or delivery.trouble)
            else:
                pause.over()
    except FencedInstanceIdError:
        log.error("%s: another process joined group %s as INSTANCE_ID=%s and took over; give each copy its own "
                  "INSTANCE_ID. This one stops (its last batch will be handled again by the other).", name, group,
                  settings.instance_id)
        raise SystemExit(1) from None
    finally:
        log.info("%s: stopping after %d messages", name, count)
        consumer.close(autocommit=False)
        delivery.close()


def deliver(delivery: Delivery, consumer: KafkaConsumer, unsent: list[Out], handled: list[Handled]) -> list | None:
    """Deliver a handled batch (and a tick's outputs): the records committed, in order, or None if none could be.
    A batch Kafka refuses for good is split: each record on its own, and one Kafka never takes is dead-lettered."""
    if delivery.deliver(consumer, unsent + outputs_of(handled), offsets_of(handled)):
        return handled
    if not delivery.undeliverable or (unsent and not delivery.deliver(consumer, unsent, {})):
        return None
    done: list[Handled] = []
    for item in handled:
        if not delivery.deliver(consumer, item.outputs, offsets_of([item])):
            if not delivery.undeliverable:
                break
            reason = f"its output could not be delivered: {delivery.trouble}"
            item = Handled(item.record, [rejected(delivery.name, item.record, reason)])
            if not delivery.deliver(consumer, item.outputs, offsets_of([item])):
                break
        done.append(item)
    return done


def prepare(stop: "Stopper", name: str, group: str, start_like: str | None, settings: Settings) -> bool:
    """Wait for Kafka, create missing topics and, for a new group with `start_like`, take over that group's
    offsets; False if stopped meanwhile."""
    admin = wait_for_kafka(stop, name, settings)
    if admin is None:
        return False
    try:
        while start_like and not stop:
            try:
                inherit_offsets(admin, group, start_like, settings)
                break
            except AuthorizationError as error:
                raise refused(name, error, settings) from None
            except KafkaError as error:  # e.g. the group coordinator is still loading on a fresh or failing-over cluster
                if not error.retriable:
                    raise
                stop.wait(0.5)
    finally:
        admin.close()
    return not stop


def inherit_offsets(admin: KafkaAdminClient, group: str, start_like: str, settings: Settings = SETTINGS) -> None:
    """Give a group that has never committed the committed offsets of another, so that it takes over where that
    group left off rather than re-reading the topic from the beginning (e.g. when one orchestrator is split in two)."""
    group, start_like = settings.group(group), settings.group(start_like)
    offsets = admin.list_group_offsets({group: None, start_like: None})
    if offsets.get(group) or not offsets.get(start_like):
        return
    failed = {tp: error for tp, error in admin.alter_group_offsets(group, offsets[start_like]).items()
              if error is not NoError}
    if failed:
        log.warning("could not start group %s where %s left off (%s): it reads from the beginning; the commands it sends "
                    "again have the same ids, so services ignore them", group, start_like, failed)
    else:
        log.info("new group %s starts where group %s left off", group, start_like)


def join(stop: "Stopper", group: str, inputs: list[str], settings: Settings) -> KafkaConsumer:
    """A static member of `group` reading `inputs`. It subscribes only once the input topics' partitions are in the
    client's metadata: a member that joins right after the topics were created can be assigned nothing, and is not
    told when they appear."""
    consumer = make_consumer(group, inputs, static=True, settings=settings)
    while not stop and not all(consumer.partitions_for_topic(settings.topic(name)) for name in inputs):
        stop.wait(0.1)
    return consumer


class Poller:
    """consumer.poll that outlives a broker outage: while the broker or the group coordinator is away (or answers
    no heartbeat) it returns None and keeps what the broker answered in `trouble`. A user who may not read an
    input or use the group is told so, and the script ends."""

    def __init__(self, consumer: KafkaConsumer, name: str, stop: "Stopper", settings: Settings):
        self.consumer, self.name, self.stop, self.settings, self.trouble = consumer, name, stop, settings, ""
        self.client = LastWords()

    def poll(self, timeout_ms: int) -> dict | None:
        try:
            batch = self.consumer.poll(timeout_ms=timeout_ms)
            if not batch and (silence := heartbeat_silence_s(self.consumer)) > SESSION_TIMEOUT_MS / 1000:
                self.trouble = (f"its group coordinator has answered no heartbeat for {silence:.0f} s (the client's "
                                f"last words: {self.client.text or 'none'})")
                return None
            return batch
        except AuthorizationError as error:
            raise refused(self.name, error, self.settings) from None
        except KafkaError as error:
            if not error.retriable:
                raise
            self.trouble = f"Kafka unavailable ({type(error).__name__}: {error})"
            return None


class Pause:
    """Waits out a trouble (the broker away, a delivery that failed, a handler's store that cannot be used) in short
    steps, so a stop is honoured at once. Says what it waits for (then every 30 s); past the group's session it says
    so as an error naming the group, since by then the group is making no progress; says when it is over."""

    def __init__(self, name: str, group: str, stop: "Stopper", session_s: float = SESSION_TIMEOUT_MS / 1000):
        self.name, self.group, self.stop, self.session_s = name, group, stop, session_s
        self.since, self.said, self.step = None, float("-inf"), 0.5

    def until_better(self, trouble: str) -> None:
        if self.stop:
            return
        now = time.monotonic()
        self.since = self.since or now
        if now - self.said >= 30 or (self.said < self.since + self.session_s <= now):
            if now - self.since > self.session_s:
                log.error("%s: group %s has made no progress for %.0f s: %s; it goes on trying (is the broker "
                          "healthy? `python -m local_kafka status` checks it)", self.name, self.group,
                          now - self.since, trouble)
            else:
                log.warning("%s: %s; waiting, then trying again", self.name, trouble)
            self.said = now
        self.stop.wait(self.step)
        self.step = min(self.step * 2, 5.0)

    def over(self) -> None:
        if self.since is not None and self.said >= self.since:
            log.info("%s: going on after %.0f s", self.name, time.monotonic() - self.since)
        self.since, self.step = None, 0.5


def rewind(consumer: KafkaConsumer, batch: dict, done: list[Handled]) -> None:
    """Seek back to the first record of the batch not committed, partition by partition, so it is handled again
    (a partition taken away meanwhile goes to its new owner, which starts from the committed offset)."""
    last_done = {(item.record.topic, item.record.partition): item.record.offset for item in done}
    for partition, records in batch.items():
        following = last_done.get((partition.topic, partition.partition), records[0].offset - 1) + 1
        if partition in consumer.assignment() and following <= records[-1].offset:
            consumer.seek(partition, following)


class Stopper:
    """SIGINT and SIGTERM take the same clean path: finish the batch, commit, close. A second signal exits at once."""

    def __init__(self):
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.event.is_set():
            os._exit(128 + signum)
        self.event.set()  # (no logging here: a log call inside a signal handler can collide with one in progress)

    def __bool__(self):
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)


def run_producer(name: str, make: Callable[[], tuple[str, Envelope, str]], count: int | None, rate: float,
                 settings: Settings = SETTINGS) -> int:
    """Produce make()'s messages at `rate` per second until `count` are sent (None: until stopped)."""
    stop = Stopper()
    admin = wait_for_kafka(stop, name, settings)
    if admin is None:
        return 0
    admin.close()
    producer = make_producer(settings=settings)
    pacer, delivered = Pacer(rate, count), 0
    log.info("%s: producing %s at %s/s to %s", name, "forever" if count is None else count, rate,
             settings.bootstrap_servers)
    try:
        while not stop and not pacer.finished:
            futures = [send(producer, *make(), settings=settings) for _ in range(pacer.due())]
            try:
                wait_for_acks(producer, futures, name)
                delivered += len(futures)
            except AuthorizationError as error:  # this user may not write there: nothing was written
                raise refused(name, error, settings) from None
            except KafkaError as error:  # delivery_timeout_ms (5 min) passed: these messages are not in Kafka
                log.error("%s: %d messages could not be delivered: %s", name, len(futures), error)
            stop.wait(pacer.pause())
    finally:
        discard(producer, timeout=10)
        log.info("%s: produced %d messages", name, delivered)
    return delivered


class Pacer:
    """How many messages are due now to keep `rate` per second, up to `count` in all."""

    def __init__(self, rate: float, count: int | None):
        self.rate, self.count, self.sent, self.began = rate, count, 0, time.monotonic()

    @property
    def finished(self) -> bool:
        return self.count is not None and self.sent >= self.count

    def due(self) -> int:
        behind = (time.monotonic() - self.began) * self.rate - self.sent
        if behind > self.rate:  # stalled (Kafka was down): carry on at the rate instead of bursting to catch up
            self.began += (behind - self.rate) / self.rate
        target = int((time.monotonic() - self.began) * self.rate) + 1
        if self.count is not None:
            target = min(target, self.count)
        due, self.sent = max(0, target - self.sent), max(self.sent, target)
        return due

    def pause(self) -> float:
        """Seconds until the next message is due (at most 0.1, so a stop is prompt)."""
        return 0.0 if self.finished else min(0.1, max(0.0, (self.sent / self.rate) - (time.monotonic() - self.began)))
