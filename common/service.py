"""The loop every consuming service runs: run_service (consume -> handle -> produce).

run_service's normal path is four lines: poll, handle the batch (common/handling.py), deliver it
(common/delivery.py), and on to the next. Everything that can go wrong on the way is behind those names: bad input
becomes a dead letter in handle_batch; a failed delivery is recovered by the Delivery, which says whether the batch
was committed or must be handled again (the loop then rewinds to it)."""

import logging
from collections.abc import Callable

from kafka import KafkaAdminClient, KafkaConsumer
from kafka.errors import AuthorizationError, FencedInstanceIdError, KafkaError, NoError

from common.clients import make_consumer, refused, wait_for_kafka
from common.delivery import Delivery
from common.handling import (Handled, Handler, Out, Seen, Triple, handle_batch, offsets_of, outputs_of, rejected,
                             serialised)
from common.settings import DEAD_LETTER, SETTINGS, Settings, written_by
from common.waiting import Pause, Poller, Stopper

log = logging.getLogger("common")


def run_service(name: str, inputs: list[str], handle: Handler, *, writes: tuple[str, ...] = (),
                accepts: dict[str, frozenset] | None = None, group: str | None = None,
                tick: Callable[[], list[Triple]] | None = None, transactional: bool = False, dedupe: bool = False,
                start_like: str | None = None, settings: Settings = SETTINGS) -> None:
    """Consume `inputs`, handle each message, produce what the handler returns, then commit.

    transactional=True: a batch's outputs and its offsets commit in one Kafka transaction (exactly once); else its
    offsets are committed once Kafka acknowledged its outputs (at least once). A batch that cannot be delivered is
    handled again. dedupe=True skips ids already handled. What a handler rejects or keeps failing on goes to
    dead_letter. Outputs keep the input's key. `tick()` adds (topic, message, key) triples each loop; `start_like`:
    a new group starts where that group left off. `writes`: the topics it writes (a family: its own member);
    `accepts`: input topic -> the message types its writer may send (others are dead letters).
    """
    group, stop = group or name, Stopper()
    own = [written_by(topic, name) for topic in (*writes, DEAD_LETTER)]
    if not prepare(stop, name, group, start_like, settings, [*inputs, *own]):
        return
    loop = Loop(name, group, inputs, handle, stop, settings, transactional=transactional, dedupe=dedupe, tick=tick,
                accepts={settings.topic(topic): types for topic, types in (accepts or {}).items()})
    try:
        while not stop:
            loop.once()
    except FencedInstanceIdError:
        log.error("%s: another process joined group %s as INSTANCE_ID=%s and took over; give each copy its own "
                  "INSTANCE_ID. This one stops (its last batch will be handled again by the other).", name, group,
                  settings.instance_id)
        raise SystemExit(1) from None
    finally:
        loop.close()


class Loop:
    """One consuming service's loop: its consumer, its Delivery, what it remembers, and what it waits out."""

    def __init__(self, name: str, group: str, inputs: list[str], handle: Handler, stop: "Stopper", settings: Settings,
                 *, transactional: bool, dedupe: bool, tick, accepts: dict[str, frozenset]):
        self.name, self.handle, self.stop, self.tick, self.accepts = name, handle, stop, tick, accepts
        self.delivery = Delivery(name, stop, settings.transactional_id(group) if transactional else None, settings)
        self.consumer = join(stop, group, inputs, settings)  # (meanwhile the Delivery's producer starts)
        self.poller, self.pause = Poller(self.consumer, name, stop, settings), Pause(name, settings.group(group), stop)
        self.seen, self.unsent, self.count = Seen() if dedupe else None, [], 0
        log.info("%s: started; consuming %s as group %s%s from %s", name, ", ".join(map(settings.topic, inputs)),
                 group, f", exactly once as transactional id {self.delivery.transactional_id}" if transactional
                 else ", at least once", settings.bootstrap_servers)

    def once(self) -> None:
        """Poll, handle the batch, deliver it; on trouble, rewind to what was not committed and wait a little."""
        batch = self.poller.poll(timeout_ms=100 if self.tick else 500)
        if batch is None:  # the broker is away: nothing new is made until it is back
            self.pause.until_better(self.poller.trouble)
            return
        if self.poller.unheard:  # (said, not waited on: polling is what rejoins the group)
            self.pause.until_better(self.poller.trouble, wait=False)
            return
        self.unsent += made(self.name, self.tick()) if self.tick else []
        handled, holdup = handle_batch(self.name, batch, self.handle, self.seen, self.stop, self.accepts)
        done = deliver(self.delivery, self.consumer, self.unsent, handled)
        if done is not None:
            self.unsent, self.count = [], self.count + len(done)
            if self.seen is not None:
                self.seen.remember(done)
        if holdup or done is None or len(done) < len(handled):
            rewind(self.consumer, batch, done or [])
            self.pause.until_better(holdup or self.delivery.trouble)
        else:
            self.pause.over()

    def close(self) -> None:
        log.info("%s: stopping after %d messages", self.name, self.count)
        self.consumer.close(autocommit=False)
        self.delivery.close()


def deliver(delivery: Delivery, consumer: KafkaConsumer, unsent: list[Out], handled: list[Handled]) -> list | None:
    """Deliver a handled batch (and a tick's outputs): the records committed, in order, or None if none could be.
    A batch Kafka refuses for good is split: each record on its own, and one Kafka never takes is dead-lettered."""
    if delivery.deliver(consumer, unsent + outputs_of(handled), offsets_of(handled)):
        return handled
    if not delivery.undeliverable:
        return None
    if unsent and not delivery.deliver(consumer, unsent, {}):
        if not delivery.undeliverable:
            return None
        log.error("%s: dropped %d messages of its own that Kafka refuses for good (%s)", delivery.name, len(unsent),
                  delivery.trouble)
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


def made(name: str, triples: list[Triple]) -> list[Out]:
    """A tick's messages, serialised; one that cannot be is a bug of the script's own: logged and left out."""
    outs = []
    for topic, message, key in triples:
        try:
            outs.append(serialised(written_by(topic, name), message, key))
        except ValueError as error:
            log.error("%s: a %s of its own could not be written and is left out: %s", name, message.type, error)
    return outs


def prepare(stop: "Stopper", name: str, group: str, start_like: str | None, settings: Settings,
            topics: list[str]) -> bool:
    """Wait for Kafka, create missing topics and, for a new group with `start_like`, take over that group's
    offsets; False if stopped meanwhile."""
    admin = wait_for_kafka(stop, name, settings, topics=topics)
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


def rewind(consumer: KafkaConsumer, batch: dict, done: list[Handled]) -> None:
    """Seek back to the first record of the batch not committed, partition by partition, so it is handled again
    (a partition taken away meanwhile goes to its new owner, which starts from the committed offset)."""
    last_done = {(item.record.topic, item.record.partition): item.record.offset for item in done}
    for partition, records in batch.items():
        following = last_done.get((partition.topic, partition.partition), records[0].offset - 1) + 1
        if partition in consumer.assignment() and following <= records[-1].offset:
            consumer.seek(partition, following)


