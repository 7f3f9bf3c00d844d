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

from common.clients import make_consumer, make_producer, refused, send, wait_for_acks, wait_for_kafka
from common.delivery import Delivery
from common.handling import Handler, Seen, Triple, handle_batch
from common.messages import Envelope
from common.settings import SETTINGS, Settings
from common.workarounds import discard

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
    poller = Poller(consumer, name, stop, settings)
    seen, unsent, handled = Seen() if dedupe else None, [], 0
    log.info("%s: started; consuming %s as group %s%s from %s", name, ", ".join(map(settings.topic, inputs)), group,
             f", exactly once as transactional id {delivery.transactional_id}" if transactional else ", at least once",
             settings.bootstrap_servers)
    try:
        while not stop:
            batch = poller.poll(timeout_ms=100 if tick else 500)
            if batch is None:  # the broker is away: nothing new is made until it is back
                continue
            unsent += tick() if tick else []
            if not batch and not unsent:
                continue
            outputs, offsets, ids = handle_batch(name, batch, handle, seen)
            if delivery.deliver(consumer, unsent + outputs, offsets):
                unsent, handled = [], handled + sum(len(records) for records in batch.values())
                for message_id in ids if seen is not None else ():
                    seen.add(message_id)
            else:
                rewind(consumer, batch)
                stop.wait(1.0)
    except FencedInstanceIdError:
        log.error("%s: another process joined group %s as INSTANCE_ID=%s and took over; give each copy its own "
                  "INSTANCE_ID. This one stops (its last batch will be handled again by the other).", name, group,
                  settings.instance_id)
        raise SystemExit(1) from None
    finally:
        log.info("%s: stopping after %d messages", name, handled)
        consumer.close(autocommit=False)
        delivery.close()


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
    """consumer.poll that outlives a broker outage: while the broker or the group coordinator is away it returns
    None and says so every 10 s (the service waits, it does not crash). A user who may not read an input or use
    the group is told so, and the script ends."""

    def __init__(self, consumer: KafkaConsumer, name: str, stop: "Stopper", settings: Settings):
        self.consumer, self.name, self.stop, self.settings = consumer, name, stop, settings
        self.last_warning = float("-inf")

    def poll(self, timeout_ms: int) -> dict | None:
        try:
            return self.consumer.poll(timeout_ms=timeout_ms)
        except AuthorizationError as error:
            raise refused(self.name, error, self.settings) from None
        except KafkaError as error:
            if not error.retriable:
                raise
            if time.monotonic() - self.last_warning > 10:
                log.warning("%s: Kafka unavailable (%s); carrying on when it is back", self.name, error)
                self.last_warning = time.monotonic()
            self.stop.wait(0.5)
            return None


def rewind(consumer: KafkaConsumer, batch: dict) -> None:
    """Seek back to the start of a batch that must be handled again (a partition taken away meanwhile goes to its
    new owner, which starts from the committed offset)."""
    for partition, records in batch.items():
        if partition in consumer.assignment():
            consumer.seek(partition, records[0].offset)


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
