"""The loop every consuming service runs: run_service (consume -> handle -> produce).

run_service's normal path is four lines: poll, handle the batch (common/handling.py), deliver it
(common/delivery.py), and on to the next. Everything that can go wrong on the way is behind those names: bad input
becomes a dead letter in handle_batch; a failed delivery is recovered by the Delivery, which says whether the batch
was committed or must be handled again (the loop then rewinds to it)."""

import logging
import time
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import AuthorizationError, FencedInstanceIdError, KafkaError, NoError
from kafka.structs import OffsetAndMetadata, TopicPartition

from common import metrics, tracing
from common.clients import make_consumer, refused, wait_for_kafka
from common.copies import Copies
from common.delivery import Delivery
from common.handling import (Handled, Handler, Out, Triple, handle_batch, offsets_of, outputs_of, rejected,
                             serialised)
from common.settings import DEAD_LETTER, FAMILIES, SETTINGS, Settings, written_by
from common.state import State, Store, adopt, ensure_changelog
from common.waiting import Pause, Poller, Stopper
from common.workarounds import heartbeat_silence_s

log = logging.getLogger("common")


def run_service(name: str, inputs: list[str], handle: Handler, *, writes: tuple[str, ...] = (),
                accepts: dict[str, frozenset] | None = None, group: str | None = None,
                tick: Callable[[], list[Triple]] | None = None, transactional: bool = False, dedupe: bool = False,
                state: bool = False, timer: Callable[[State, str], list[Triple]] | None = None,
                take_over: tuple[str, ...] = (), check: Callable[[KafkaAdminClient, Stopper], None] | None = None,
                metrics_port: int | None = None, running: Callable[[Store], int] | None = None,
                settings: Settings = SETTINGS) -> None:
    """Consume `inputs`, handle each message, produce what the handler returns, then commit.

    transactional=True: a batch's outputs and its offsets commit in one Kafka transaction (exactly once); else its
    offsets are committed once Kafka acknowledged its outputs (at least once). A batch that cannot be delivered is
    handled again. dedupe=True skips ids any copy of the service handled before. state=True: the handler is called as
    handle(message, state), `state` being its partition's entries (common/state.py); `timer(state, key)` is called
    when an entry's due time passes, and returns what to send then. State and handled ids are kept in Kafka with
    the work when transactional, else in memory only. What a handler rejects or keeps failing on goes to
    dead_letter. Outputs keep the input's key. `tick()` adds (topic, message, key) triples each loop. `take_over`:
    groups whose offsets it moves forward to, where they are further (see furthest_offsets); `check(admin, stop)` runs
    once Kafka answers, and may end the script. `writes`: the topics it writes (a family: its own member);
    `accepts`: input topic -> the message types its writer may send (others are dead letters). `metrics_port`: serve
    Prometheus metrics there (common/metrics.py); `running(store)`: how many workflows run (its open_workflows).
    """
    group, stop = group or name, Stopper()
    tracing.start(name)
    metrics.start(name, metrics_port)
    own = [written_by(topic, name) for topic in (*writes, DEAD_LETTER)]
    store = Store(group, settings, durable=transactional, dedupe=dedupe) if dedupe or state else None
    if not prepare(stop, name, group, take_over, settings, [*inputs, *own], store, check, inputs):
        return
    loop = Loop(name, group, inputs, handle if state else lambda message, _: handle(message), stop, settings,
                running=running,
                transactional=transactional, store=store, tick=tick, timer=timer, writes=[*own, *writes],
                accepts={settings.topic(topic): types for topic, types in (accepts or {}).items()})
    fenced = False
    try:
        while not stop:
            loop.once()
    except FencedInstanceIdError:
        fenced = True
        log.error("%s: another process joined group %s as INSTANCE_ID=%s and took over; give each copy its own "
                  "INSTANCE_ID. This one stops (its last batch will be handled again by the other).", name, group,
                  settings.instance_id)
        raise SystemExit(1) from None
    finally:
        loop.close(fenced)


class Loop:
    """One consuming service's loop: its consumer, its Delivery, what it remembers, and what it waits out."""

    def __init__(self, name: str, group: str, inputs: list[str], handle: Handler, stop: "Stopper", settings: Settings,
                 *, transactional: bool, store: Store | None, tick, timer, writes: list[str],
                 accepts: dict[str, frozenset], running=None):
        self.name, self.handle, self.stop, self.tick, self.timer, self.accepts = name, handle, stop, tick, timer, accepts
        writes = [t for t in dict.fromkeys(writes) if t not in FAMILIES] + ([store.topic] if store and store.topic else [])
        self.delivery = Delivery(name, stop, settings.transactional_id(group) if transactional else None, settings,
                                 warm=tuple(writes))
        self.store = store
        if store is not None:
            store.open()  # (its reader starts meanwhile, too)
        self.copies = Copies(name, group, settings)
        listener = Forget(store, self.copies) if store is not None else None
        self.consumer = join(stop, group, inputs, settings, listener)  # (meanwhile the Delivery's producer starts)
        self.poller, self.pause = Poller(self.consumer, name, stop, settings), Pause(name, settings.group(group), stop)
        self.unsent, self.count, self.expired_at = [], 0, time.monotonic()
        self.spans: list = []  # the timers' spans of this batch (tracing on)
        self.running, self.counted_at = running, float("-inf")
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
        if self.store is not None and not self.restored(batch):
            return
        self.unsent += made(self.name, self.tick(), new_traces=True) if self.tick and not self.stop else []  # (no new
        # work once stopped; each event a tick makes starts its workflow's trace)
        handled, holdup = handle_batch(self.name, batch, self.handle, self.store, self.stop, self.accepts)
        timed, changes, offsets = self.timers(batch, holdup)
        began = time.perf_counter()
        try:
            done, own = deliver(self.delivery, self.consumer, self.unsent + timed, handled, offsets)
        except FencedInstanceIdError:  # (another copy runs as this one: the script stops, the batch is not committed)
            self.delivery.trouble = "fenced: another copy runs with this INSTANCE_ID"
            self.traced(handled, None, False)
            raise
        metrics.observe("commit", time.perf_counter() - began, service=self.name)
        self.traced(handled, done, own)
        if own:
            self.unsent = []
        if done is not None:
            self.count += len(done)
        if self.store is not None and done is None:
            self.store.abandon()
        elif self.store is not None:  # (a timer whose messages Kafka refused fires again)
            self.store.commit([*(changes if own else []), *(c for item in done for c in item.changes)], fired=own)
        self.measured(done or [])
        if holdup or done is None or len(done) < len(handled):
            rewind(self.consumer, batch, done or [])
            self.pause.until_better(holdup or self.delivery.trouble)
        else:
            self.pause.over()

    def measured(self, done: list[Handled]) -> None:
        """Count the committed records (metrics on): how each ended, the lag of each partition of the batch, and
        how many workflows run. A failure here is logged, never more: metrics must not stop the work."""
        if not metrics.ON:
            return
        try:
            for item in done:
                metric, label = item.counted
                metrics.count(metric, service=self.name, **({"reason": label} if metric == "dead" else
                                                            {} if metric == "repeats" else {"type": label}))
            for tp in {TopicPartition(item.record.topic, item.record.partition) for item in done}:
                # (the partitions just handled, whose position is known: past their last record and any commit
                # marker after it, which the high watermark counts too)
                metrics.gauge("lag", max(0, (self.consumer.highwater(tp) or 0) - self.consumer.position(tp)),
                              service=self.name, topic=tp.topic, partition=str(tp.partition))
            if self.running is not None and self.store is not None and time.monotonic() - self.counted_at > 5:
                self.counted_at = time.monotonic()  # (a scan of the state: every 5 s at most)
                metrics.gauge("open", self.running(self.store))
        except Exception as error:  # noqa: BLE001 -- see the docstring
            log.warning("%s: metrics not updated: %s: %s", self.name, type(error).__name__, error)

    def traced(self, handled: list[Handled], done: list[Handled] | None, own: bool) -> None:
        """End the spans of the batch (tracing on): an error where its transaction did not commit."""
        if not tracing.active():
            return
        committed = {id(item.record) for item in done or ()}
        for item in handled:
            if id(item.record) not in committed:
                tracing.failed(item.span, f"not delivered ({self.delivery.trouble}); handled again")
            tracing.ended(item.span)
        for span in self.spans:
            if not own:
                tracing.failed(span, f"not delivered ({self.delivery.trouble}); fires again")
            tracing.ended(span)
        self.spans = []

    def restored(self, batch: dict) -> bool:
        """Read back the state of every partition assigned since the last batch, before any of its records is
        handled; False (the batch waits in Kafka) if that could not be done now."""
        missing = {tp.partition for tp in self.consumer.assignment()} - self.store.loaded
        if time.monotonic() - self.expired_at > 60:
            self.expired_at = time.monotonic()
            self.store.expire(time.time())
        rebalanced, self.copies.rebalanced = self.copies.rebalanced and self.delivery.transactional, False
        if rebalanced and not missing:  # (another copy joined, say: who is in the group now)
            self.copies.learn()
        if not missing:
            return True
        began = time.monotonic()
        try:
            if rebalanced:
                self.copies.end_departed()
            count = self.store.restore(missing)
        except KafkaError as error:
            rewind(self.consumer, batch, [])
            self.pause.until_better(f"its state could not be read back ({type(error).__name__}: {error})")
            return False
        if self.store.topic:
            log.info("%s: state of partition%s %s read back (%d entries in %.2f s)", self.name,
                     "s" * (len(missing) > 1), ", ".join(map(str, sorted(missing))), count, time.monotonic() - began)
        return True

    def timers(self, batch: dict, holdup: str | None) -> tuple[list[Out], list, dict]:
        """What the timers due now send, the state changes they make, and the offsets that fence them (a copy that
        lost the partition meanwhile cannot commit them). A partition still catching up waits: the answer a timer
        waits for may be further on."""
        if self.timer is None:
            return [], [], {}
        behind = {tp.partition for tp in batch if holdup or self.consumer.position(tp) < (self.consumer.highwater(tp) or 0)}
        outs, changes, fired = [], [], set()
        for partition, key in self.store.due(time.time(), skip=behind):
            span = tracing.resumed(self.store.trace_of(partition, key), f"timer {key}")  # (in the entry's trace)
            self.spans.append(span)
            carried = tracing.headers(span)
            state = self.store.view(partition, trace=tracing.traceparent(carried))
            try:
                triples = self.timer(state, key)
                tracing.about(span, triples[0][1] if triples else None)
                outs += made(self.name, triples, carried)
            except Exception as error:  # noqa: BLE001 -- a bug in one timer (say, a step renamed) must not stop the loop
                log.error("%s: the timer of %s failed and is dropped: %s: %s", self.name, key, type(error).__name__, error)
                tracing.failed(span, f"the timer failed: {type(error).__name__}: {error}")
                state.undo()
                continue
            outs += self.store.outs(state.changes)
            changes += state.changes
            fired.add(partition)
        offsets = {tp: OffsetAndMetadata(self.consumer.position(tp), "", -1) for tp in self.consumer.assignment()
                   if tp.partition in fired and tp not in batch}
        return outs, changes, offsets

    def close(self, fenced: bool = False) -> None:
        """Stop; fenced: another copy runs with this one's INSTANCE_ID, and must keep its place in the group."""
        log.info("%s: stopping after %d messages", self.name, self.count)
        # (A coordinator that answers no heartbeat would not answer who else is there either: no wait for it.)
        others = set() if fenced or heartbeat_silence_s(self.consumer) > 3 else self.copies.others()
        self.consumer.close(autocommit=False)
        if others:
            self.copies.leave(len(others))
        self.delivery.close()
        if self.store is not None:
            self.store.close()
        self.copies.close()


class Forget(ConsumerRebalanceListener):
    """Partitions taken away by a rebalance: their state is forgotten, and read back if they come back."""

    def __init__(self, store: Store, copies: "Copies"):
        self.store, self.copies = store, copies

    def on_partitions_revoked(self, revoked):
        self.store.forget({tp.partition for tp in revoked})
        for tp in revoked:  # (another copy reports their lag now)
            metrics.dropped("lag", service=self.copies.name, topic=tp.topic, partition=str(tp.partition))

    def on_partitions_assigned(self, assigned):
        self.copies.rebalanced = True  # (the loop reads new partitions back before their first record is handled)


def deliver(delivery: Delivery, consumer: KafkaConsumer, own: list[Out], handled: list[Handled],
            offsets: dict | None = None) -> tuple[list | None, bool]:
    """Deliver a handled batch and the loop's own messages (a tick's, a timer's; `offsets`: theirs): (the records
    committed, in order, or None if none could be; whether its own messages went out). A batch Kafka refuses for good
    is split: each record on its own, and one Kafka never takes is dead-lettered."""
    offsets = offsets or {}
    if delivery.deliver(consumer, own + outputs_of(handled), {**offsets, **offsets_of(handled)}):
        return handled, True
    if not delivery.undeliverable:
        return None, False
    sent = not own or delivery.deliver(consumer, own, offsets)
    if not sent and not delivery.undeliverable:
        return None, False
    if not sent:
        log.error("%s: dropped %d messages of its own that Kafka refuses for good (%s)", delivery.name, len(own),
                  delivery.trouble)
    done: list[Handled] = []
    for item in handled:
        if not delivery.deliver(consumer, item.outputs, offsets_of([item])):
            if not delivery.undeliverable:
                break
            reason = f"its output could not be delivered: {delivery.trouble}"
            item = Handled(item.record, [rejected(delivery.name, item.record, reason, item.span)], span=item.span,
                           counted=("dead", metrics.reason_kind(reason)))
            if not delivery.deliver(consumer, item.outputs, offsets_of([item])):
                break
        done.append(item)
    return done, sent


def made(name: str, triples: list[Triple], headers: list | None = None, new_traces: bool = False) -> list[Out]:
    """A tick's or a timer's messages, serialised; one that cannot be is a bug of the script's own: logged and left
    out. `headers`: the trace context they carry (a timer's); new_traces: each starts a trace of its own (a tick's)."""
    outs = []
    for topic, message, key in triples:
        span = tracing.produced(written_by(topic, name), message) if new_traces else None
        try:
            outs.append(serialised(written_by(topic, name), message, key, tracing.headers(span) or headers))
        except ValueError as error:
            log.error("%s: a %s of its own could not be written and is left out: %s", name, message.type, error)
            tracing.failed(span, f"could not be written: {error}")
        tracing.ended(span)
    return outs


def prepare(stop: "Stopper", name: str, group: str, take_over: tuple[str, ...], settings: Settings,
            topics: list[str], store: Store | None = None, check=None, inputs: list[str] = ()) -> bool:
    """Wait for Kafka, create missing topics (and the state topic), run `check(admin, stop)` (it may end the script), and
    move the group's offsets forward to where the groups in `take_over` left off; False if stopped meanwhile."""
    admin = wait_for_kafka(stop, name, settings, topics=topics)
    if admin is None:
        return False
    try:
        while (check or take_over) and not stop:
            try:
                if check:
                    check(admin, stop)
                furthest = furthest_offsets(admin, group, take_over, inputs, settings) if not stop else {}
                if furthest and store is not None and store.topic:  # (their state first: the offsets say it is done)
                    ensure_changelog(admin, group, settings)
                    copied = adopt(group, take_over, settings)
                    log.info("%s: took over %d state entr%s of %s", name, copied, "y" if copied == 1 else "ies",
                             ", ".join(take_over))
                if furthest:
                    move_offsets(admin, group, furthest, take_over, settings)
                break
            except AuthorizationError as error:
                raise refused(name, error, settings) from None
            except KafkaError as error:  # e.g. the group coordinator is still loading on a fresh or failing-over cluster
                if not error.retriable:
                    raise
                stop.wait(0.5)
        if store is not None and store.topic and not stop:
            ensure_changelog(admin, group, settings)
    finally:
        admin.close()
    return not stop


def furthest_offsets(admin: KafkaAdminClient, group: str, others: tuple[str, ...], inputs: list[str],
                     settings: Settings = SETTINGS) -> dict:
    """Where any of `others` committed further than `group` on its `inputs`, partition by partition: the offsets
    that let it start where they left off instead of routing again what they routed (one orchestrator split in two,
    or split ones joined back into one). Only ever forward: where it is ahead, it keeps its own. Nothing while a copy
    of the group runs already (it took over when it started)."""
    if not others or admin.describe_groups([settings.group(group)]).get(settings.group(group), {}).get("members"):
        return {}
    names, reads = [settings.group(name) for name in (group, *others)], {settings.topic(name) for name in inputs}
    try:
        offsets = admin.list_group_offsets({name: None for name in names})
    except AuthorizationError:  # a user who may not see the others' groups: it cannot take over from them
        log.warning("%s: may not see groups %s, so it cannot start where they left off (if they ran, it routes "
                    "again what they routed; the commands have the same ids)", group, ", ".join(names[1:]))
        offsets = admin.list_group_offsets({names[0]: None})
    own, furthest = offsets.get(names[0]) or {}, {}
    for name in names[1:]:
        for tp, meta in (offsets.get(name) or {}).items():
            if tp.topic not in reads:  # (another split one's topics: never read here, so never moved on)
                continue
            ahead_of = furthest.get(tp, own.get(tp))
            if ahead_of is None or meta.offset > ahead_of.offset:
                furthest[tp] = meta
    return furthest


def move_offsets(admin: KafkaAdminClient, group: str, offsets: dict, others: tuple[str, ...],
                 settings: Settings = SETTINGS) -> None:
    failed = {tp: error for tp, error in admin.alter_group_offsets(settings.group(group), offsets).items()
              if error is not NoError}
    if failed:
        log.warning("could not start group %s where %s left off (%s): it routes again what they routed; the commands "
                    "have the same ids, so services ignore them", group, ", ".join(others), failed)
    else:
        log.info("group %s starts where %s left off (%d partitions moved forward)", group, " and ".join(others),
                 len(offsets))


def join(stop: "Stopper", group: str, inputs: list[str], settings: Settings, listener=None) -> KafkaConsumer:
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


def rewind(consumer: KafkaConsumer, batch: dict, done: list[Handled]) -> None:
    """Seek back to the first record of the batch not committed, partition by partition, so it is handled again
    (a partition taken away meanwhile goes to its new owner, which starts from the committed offset)."""
    last_done = {(item.record.topic, item.record.partition): item.record.offset for item in done}
    for partition, records in batch.items():
        following = last_done.get((partition.topic, partition.partition), records[0].offset - 1) + 1
        if partition in consumer.assignment() and following <= records[-1].offset:
            consumer.seek(partition, following)


