"""A service's timers, fired after its batch is handled: each state entry whose due time has passed is handed to the
service's timer (the orchestrator's: a step's time limit), in the entry's trace; what it sends and the state changes
it makes are delivered with the batch, fenced by the offsets of the partitions they belong to (a copy that lost the
partition meanwhile cannot commit them). A partition still catching up waits: the answer a timer waits for may be
further on. A timer that fails is dropped, said, and never stops the loop."""

import logging
import time

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from common import tracing
from common.handling import Serialised, serialise_own
from common.state import Store

log = logging.getLogger("common")


class Firing:
    """The timers of one consuming service (its Service's `timer`), over its state and its consumer's positions."""

    def __init__(self, service, store: Store, consumer: KafkaConsumer):
        self.name, self.timer, self.store, self.consumer = service.name, service.timer, store, consumer
        self.spans: list = []  # the timers' spans of this batch (tracing on)

    def taken(self) -> list:
        spans, self.spans = self.spans, []
        return spans

    def due(self, batch: dict, holdup: str | None) -> tuple[list[Serialised], list, dict]:
        """What the timers due now send, the state changes they make, and the offsets that fence them (a copy that
        lost the partition meanwhile cannot commit them). A partition still catching up waits: the answer a timer
        waits for may be further on."""
        if self.timer is None or not self.store.any_due(time.time()):
            return [], [], {}  # (the usual batch: nothing more to ask the consumer)
        positions = self.positions()
        if positions is None:
            return [], [], {}
        outs, changes, fired = [], [], set()
        behind = {tp.partition for tp in batch if holdup or self.catching_up(tp, positions)}
        for partition, key in self.store.due(time.time(), skip=behind):
            state = self.fire(partition, key, outs)
            if state is not None:
                outs += self.store.outs(state.changes)
                changes += state.changes
                fired.add(partition)
        offsets = {tp: OffsetAndMetadata(position, "", -1) for tp, position in positions.items()
                   if tp.partition in fired and tp not in batch}
        return outs, changes, offsets

    def fire(self, partition: int, key: str, outs: list[Serialised]):
        """Call the timer of one entry, in the entry's trace, adding what it sends to `outs`: its state view, or None
        if it failed (a bug in one timer, say a step renamed, must not stop the loop: it is dropped)."""
        span = tracing.resumed(self.store.trace_of(partition, key), f"timer {key}")
        self.spans.append(span)
        carried = tracing.headers(span)
        state = self.store.view(partition, trace=tracing.traceparent(carried))
        try:
            outputs = self.timer(state, key)
            tracing.about(span, outputs[0][1] if outputs else None, "fire")
            outs += serialise_own(self.name, outputs, carried)
            return state
        except Exception as error:  # noqa: BLE001 -- see the docstring
            log.error("%s: the timer of %s failed and is dropped: %s: %s", self.name, key, type(error).__name__, error)
            tracing.failed(span, f"the timer failed: {type(error).__name__}: {error}")
            state.undo()
            return None

    def catching_up(self, tp, positions: dict) -> bool:
        """Whether a partition of the batch has records after it (a partition taken away counts as catching up)."""
        return positions.get(tp, 0) < (self.consumer.highwater(tp) or 0)

    def positions(self) -> dict | None:
        """Where each assigned partition stands; None while the broker cannot say (a position kafka-python must
        validate first, during an outage): no timer fires until it can."""
        try:
            return {tp: self.consumer.position(tp) for tp in self.consumer.assignment()}
        except KafkaError as error:
            log.info("%s: timers wait: the positions of its partitions are not known now (%s)", self.name, error)
            return None
