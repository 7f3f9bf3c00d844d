"""One consuming service's loop, a batch at a time: poll -> handle -> deliver -> commit. Everything that can go wrong on
the way is behind those names: bad input becomes a dead letter in handle_batch (common/handling.py); a failed
delivery is recovered by the Delivery (common/delivery.py), which says which records were committed; whatever was
not is handled again (the loop rewinds to it) after a pause that says why. A service that keeps state reads a
partition's state back before its first record (common/state.py, from common/changelog.py) and fires the timers that
come due (common/firing.py)."""

import logging
import time

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.errors import FencedInstanceIdError, KafkaError

from common import metrics, tracing
from common.clients import join
from common.copies import Copies
from common.delivery import Delivery
from common.gate import Gate
from common.firing import Firing
from common.handling import Handled, Serialised, dead_letter_of, handle_batch, serialise_own
from common.settings import FAMILIES, Settings
from common.changelog import first_of_each_partition
from common.state import Store
from common.waiting import Pause, Poller
from common.workarounds import member_id, heartbeat_silence_s

log = logging.getLogger("common")
EXPIRE_EVERY_S = 60  # how often entries past the state's retention are dropped from memory


class Loop:
    """One consuming service's loop: its consumer, its Delivery, what it remembers, and what it waits out."""

    def __init__(self, service, stop, settings: Settings, store: Store | None, writes: list[str]):
        self.service, self.name, self.stop, self.store = service, service.name, stop, store
        self.handle = service.handle if service.keeps_state else lambda message, _: service.handle(message)
        self.accepts = {settings.topic(topic): types for topic, types in (service.accepts or {}).items()}
        group = service.group or service.name
        self.copies = Copies(self.name, group, settings)
        self.delivery = Delivery(self.name, stop, settings.transactional_id(group) if service.exactly_once else None,
                                 settings, warm=warm(writes, store),
                                 replaced=lambda: self.copies.replaced(member_id(self.consumer), stop))
        listener = None
        if store is not None:
            store.open()  # (its reader starts meanwhile, too)
            listener = Forget(store, self.copies)
        self.consumer = join(stop, group, service.inputs, settings, listener)  # (meanwhile the producer starts)
        self.poller, self.pause = Poller(self.consumer, self.name, stop, settings), Pause(self.name, settings.group(group), stop)
        self.unsent: list[Serialised] = []  # a tick's messages, until Kafka takes them
        self.firing = Firing(service, store, self.consumer) if service.timer else None
        self.count, self.expired_at = 0, time.monotonic()
        self.window_s = settings.commit_window_s if self.delivery.transactional else 0.0
        self.gate = Gate.of(service, settings) if service.gated else None
        log.info("%s: started; consuming %s as group %s%s from %s", self.name, ", ".join(map(settings.topic, service.inputs)),
                 group, f", exactly once as transactional id {self.delivery.transactional_id}"
                 if self.delivery.transactional else ", at least once", settings.bootstrap_servers)

    def once(self) -> None:
        """One batch: poll, handle, deliver, commit. What was not committed is handled again after a pause."""
        batch = self.poll()
        if batch is None:
            return
        self.take_tick()
        handled, holdup = handle_batch(self.name, batch, self.handle, self.store, self.stop, self.accepts,
                                       self.service.doing, self.gate)
        timed, changes, offsets = self.firing.due(batch, holdup) if self.firing else ([], [], {})
        done, sent = self.deliver(self.unsent + timed, handled, offsets)
        self.remember_committed(done, changes if sent else [], sent)
        self.stop_if_state_gone(done)
        tracing.end_batch(handled, done, self.spans(), sent, self.delivery.trouble)
        metrics.batch_committed(self.name, self.consumer, done or [], self.store, self.service.open_count)
        if holdup or done is None or len(done) < len(handled):
            rewind(self.consumer, batch, done or [])
            self.pause.until_better(holdup or self.delivery.trouble)
        else:
            self.pause.over()

    def poll(self) -> dict | None:
        """The next batch ({} if none), its partitions' state read back; None (having paused) while the broker is
        away, the group coordinator is not heard, or the state cannot be read."""
        batch = self.poller.gathered(100 if self.service.tick else 500, self.window_s)
        if batch is None:  # the broker is away: nothing new is made until it is back
            self.pause.until_better(self.poller.trouble)
            return None
        if self.poller.unheard:  # (said, not waited on: polling is what rejoins the group)
            self.pause.until_better(self.poller.trouble, wait=False)
            return None
        if self.store is not None and not self.restore_state(batch):
            return None
        return batch

    def take_tick(self) -> None:
        """Add a tick's events to what the loop sends of its own (none once stopped; each starts its workflow's
        trace); they are kept until Kafka takes them."""
        if self.service.tick and not self.stop:
            self.unsent += serialise_own(self.name, self.service.tick(), new_traces=True)

    def deliver(self, own: list[Serialised], handled: list[Handled], offsets: dict) -> tuple[list | None, bool]:
        """The batch to Kafka: (the records committed, or None; whether the loop's own messages went out)."""
        began = time.perf_counter()
        try:
            done, sent = self.delivery.deliver(self.consumer, own, handled, offsets)
        except FencedInstanceIdError:  # (another copy runs as this one: the script stops, the batch is not committed)
            self.delivery.trouble = "fenced: another copy runs with this INSTANCE_ID"
            tracing.end_batch(handled, None, self.spans(), False, self.delivery.trouble)
            raise
        metrics.observe("commit", time.perf_counter() - began, service=self.name)
        return done, sent

    def spans(self) -> list:
        """The spans of this batch's timers (tracing on), handed over to be ended with the batch."""
        return self.firing.taken() if self.firing else []

    def remember_committed(self, done: list[Handled] | None, changes: list, sent: bool) -> None:
        """The commit's other half: apply what Kafka committed to what the loop remembers (its state; a timer whose
        messages Kafka refused fires again)."""
        if sent:
            self.unsent = []
        if done is not None:
            self.count += len(done)
        if self.store is None:
            return
        if done is None:
            self.store.abandon()
        else:
            # (the records' changes first: a timer's were made after them, from them)
            self.store.commit([*(change for item in done for change in item.changes), *changes], fired=sent)

    def stop_if_state_gone(self, done: list[Handled] | None) -> None:
        """After a batch that could not be delivered: if the state topic is gone (deleted), say what is lost and end
        the script (exit 1) instead of retrying writes to a topic that is no more."""
        if done is not None or self.store is None or not self.store.topic:
            return
        real = self.store.settings.topic(self.store.topic)
        try:
            gone = real not in self.consumer.topics()
        except KafkaError:  # (the broker is away: that is waited out, not a lost topic)
            return
        if gone:
            entries = sum(map(len, self.store.entries.values()))
            partitions = len(self.store.entries)
            log.error("%s: its state topic %s is gone (deleted?): %d entr%s of %d partition%s it held %s lost there. "
                      "Stopping; the batch was not committed and waits in Kafka. Start it again with "
                      "ACCEPT_STATE_LOSS=1 to go on with empty state", self.name, real, entries,
                      "y" if entries == 1 else "ies", partitions, "" if partitions == 1 else "s",
                      "is" if entries == 1 else "are")
            raise SystemExit(1)

    def restore_state(self, batch: dict) -> bool:
        """Read back the state of every partition assigned since the last batch, before any of its records is
        handled; False (the batch waits in Kafka) if that could not be done now."""
        missing = {tp.partition for tp in self.consumer.assignment()} - self.store.loaded
        if time.monotonic() - self.expired_at > EXPIRE_EVERY_S:
            self.expired_at = time.monotonic()
            self.store.expire(time.time())
        rebalanced, self.copies.rebalanced = self.copies.rebalanced and self.delivery.transactional, False
        if rebalanced and not missing:  # (another copy joined, say: who is in the group now)
            self.copies.learn()
        if not missing:
            return True
        began = time.monotonic()
        if self.store.topic:
            log.info("%s: reading the state of partition%s %s back from %s", self.name, "s" * (len(missing) > 1),
                     ", ".join(map(str, sorted(missing))), self.store.settings.topic(self.store.topic))
        try:
            if rebalanced:
                self.copies.end_departed()
            count = self.store.restore(missing)
            if count is None:  # (stopped meanwhile: the batch waits in Kafka)
                rewind(self.consumer, batch, [])
                return False
        except KafkaError as error:
            rewind(self.consumer, batch, [])
            self.pause.until_better(f"its state could not be read back ({type(error).__name__}: {error})")
            return False
        if self.store.topic:
            log.info("%s: state of partition%s %s read back (%d entries in %.2f s)", self.name, "s" * (len(missing) > 1),
                     ", ".join(map(str, sorted(missing))), count, time.monotonic() - began)
        self.dead_letter_set_aside()
        self.say_removed()
        return True

    def dead_letter_set_aside(self) -> None:
        """Each state record the read-back set aside becomes a dead letter, and what stands for it (a marker, or a
        tombstone for a key that is not text) is written with it: sent with the next batch, said once a partition."""
        set_aside = self.store.take_set_aside()
        for (record, why, _), more in first_of_each_partition(set_aside, lambda item: item[0]):
            log.warning("%s: %s:%d:%d key '%s': %s; set aside%s: each is a dead letter of %s, and what it held is lost",
                        self.name, record.topic, record.partition, record.offset,
                        (record.key or b"").decode(errors="backslashreplace"), why, more, self.name)
        for record, why, change in set_aside:
            self.unsent.append(dead_letter_of(self.name, record, f"state record set aside: {why}"))
            self.unsent += self.store.outs([change])
            metrics.count("set_aside", service=self.name)

    def say_removed(self) -> None:
        """Entries a tombstone removed (no project script writes one for them: an operator or a stray client did):
        said once a partition and counted, for what they held is forgotten."""
        removed = self.store.take_removed()
        for record, more in first_of_each_partition(removed, lambda record: record):
            log.warning("%s: %s:%d:%d key '%s' was removed by a tombstone%s, written by none of this project's scripts: "
                        "what it held is forgotten (a workflow's later outcomes are said unknown; a message handled "
                        "before is handled again if it comes again)", self.name, record.topic, record.partition,
                        record.offset, record.key.decode(), more)
        for _ in removed:
            metrics.count("removed", service=self.name)

    def close(self, fenced: bool = False) -> None:
        """Stop; fenced: another copy runs with this one's INSTANCE_ID, and must keep its place in the group."""
        log.info("%s: stopping after %d message%s", self.name, self.count, "" if self.count == 1 else "s")
        # (A coordinator that answers no heartbeat would not answer who else is there either: no wait for it.)
        others = set() if fenced or heartbeat_silence_s(self.consumer) > 3 else self.copies.others()
        self.consumer.close(autocommit=False)
        if others:
            self.copies.leave(len(others))
        self.delivery.close()
        if self.store is not None:
            self.store.close()
        if self.gate is not None:
            self.gate.close()
        self.copies.close()


class Forget(ConsumerRebalanceListener):
    """Partitions taken away by a rebalance: their state is forgotten, and read back if they come back."""

    def __init__(self, store: Store, copies: Copies):
        self.store, self.copies = store, copies

    def on_partitions_revoked(self, revoked):
        self.store.forget({tp.partition for tp in revoked})
        for tp in revoked:  # (another copy reports their lag now)
            metrics.dropped("lag", service=self.copies.name, topic=tp.topic, partition=str(tp.partition))

    def on_partitions_assigned(self, assigned):
        self.copies.rebalanced = True  # (the loop reads new partitions back before their first record is handled)


def warm(writes: list[str], store: Store | None) -> tuple[str, ...]:
    """The topics a service writes whose partitions its producer learns as it starts (a family's members are many)."""
    return tuple(t for t in dict.fromkeys(writes) if t not in FAMILIES) + ((store.topic,) if store and store.topic else ())


def rewind(consumer: KafkaConsumer, batch: dict, done: list[Handled]) -> None:
    """Seek back to the first record of the batch not committed, partition by partition, so it is handled again
    (a partition taken away meanwhile goes to its new owner, which starts from the committed offset)."""
    last_done = {(item.record.topic, item.record.partition): item.record.offset for item in done}
    for partition, records in batch.items():
        following = last_done.get((partition.topic, partition.partition), records[0].offset - 1) + 1
        if partition in consumer.assignment() and following <= records[-1].offset:
            consumer.seek(partition, following)
