"""Handling one poll batch: parse each record, skip repeats, call the service's handler with retries, and turn
whatever cannot be handled into a dead letter. Nothing here produces to Kafka: the batch's outputs are returned."""

import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable

from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from common.messages import DeadLetter, Envelope, Output, dead_letter, parse
from common.settings import DEAD_LETTER

log = logging.getLogger("common")

Triple = tuple[str, Envelope, bytes | str | None]  # (topic name, message, key): an output with the key it keeps
Handler = Callable[[Envelope], list[Output]]

# Failures worth retrying (a busy database, a network blip); anything else is a bug or bad data: dead-letter it at once.
TRANSIENT = (OSError, sqlite3.OperationalError, KafkaError)
HANDLER_ATTEMPTS = 5
RETRY_BUDGET_S = 30.0  # retries in one poll batch stop after this, well inside the group's max.poll.interval


class Seen:
    """The ids handled recently (bounded), so a redelivered command has no second effect while the service runs."""

    def __init__(self, capacity: int = 100_000):
        self.capacity, self.ids = capacity, OrderedDict()

    def __contains__(self, message_id: str) -> bool:
        return message_id in self.ids

    def add(self, message_id: str) -> bool:
        """Remember message_id; False if it was already there."""
        if message_id in self.ids:
            return False
        self.ids[message_id] = None
        if len(self.ids) > self.capacity:
            self.ids.popitem(last=False)
        return True


def handle_batch(name: str, batch: dict, handle: Handler, seen: Seen | None) -> tuple[list[Triple], dict, list[str]]:
    """Handle every record of a poll: (outputs, offsets to commit, ids handled). A dead-lettered message's id is
    not among them, so the same message replayed once its cause is fixed is handled, not skipped as a repeat."""
    outputs, offsets, ids, retry_until = [], {}, [], time.monotonic() + RETRY_BUDGET_S
    for partition, records in batch.items():
        for record in records:
            try:
                message = parse(record.value)
            except DeadLetter as reason:
                results = [(DEAD_LETTER, rejected(name, record, str(reason)))]
            else:
                if seen is not None and (message.id in seen or message.id in ids):
                    log.info("%s: %s %s already handled; ignoring the redelivery", name, message.type, message.id[:8])
                    continue
                results = handle_with_retries(name, record, message, handle, retry_until)
                if all(t != DEAD_LETTER for t, _ in results):
                    ids.append(message.id)
            outputs += [(t, m, record.key) for t, m in results]
        offsets[partition] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
    return outputs, offsets, ids


def handle_with_retries(name: str, record, message: Envelope, handle: Handler, retry_until: float) -> list[Output]:
    """handle(message); a transient failure is retried with capped exponential backoff, then dead-lettered."""
    for attempt in range(1, HANDLER_ATTEMPTS + 1):
        try:
            return handle(message)
        except DeadLetter as reason:
            return [(DEAD_LETTER, rejected(name, record, str(reason)))]
        except TRANSIENT as error:
            if attempt == HANDLER_ATTEMPTS or time.monotonic() > retry_until:
                reason = f"handler failed {attempt} times, last: {type(error).__name__}: {error}"
                return [(DEAD_LETTER, rejected(name, record, reason))]
            log.warning("%s: handler failed on %s (attempt %d: %s); retrying", name, message.id[:8], attempt, error)
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
        except Exception as error:  # noqa: BLE001 -- a bug or bad data in one message must not stop the service
            return [(DEAD_LETTER, rejected(name, record, f"handler failed: {type(error).__name__}: {error}"))]
    raise AssertionError("unreachable")


def rejected(name: str, record, reason: str) -> Envelope:
    log.warning("%s: dead letter from %s:%s:%s: %s", name, record.topic, record.partition, record.offset, reason)
    return dead_letter(record.value, reason, name, record)
