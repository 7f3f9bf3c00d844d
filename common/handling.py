"""Handling one poll batch: check and parse each record, skip repeats, call the service's handler, and turn whatever
cannot be handled or written out into that record's dead letter. Nothing here produces to Kafka: each record's
outputs come back serialised, ready to deliver (and so do the loop's own messages: a tick's, a timer's). A handler
whose resource is unavailable holds the batch up there: the records before it are delivered, the rest wait in Kafka.
Dedupe is here, once: a handled id is kept in the service's state (seen/<id>, or in the entry of a workflow)."""

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from common import metrics, tracing
from common.changelog import unreadable
from common.gate import Expired, Gate, Revoked
from common.messages import SCHEMAS, DeadLetter, Envelope, Output, check_key, dead_letter, digest, parse
from common.settings import DEAD_LETTER, written_by

log = logging.getLogger("common")

Handler = Callable[..., list[Output]]  # handle(message), or handle(message, state) for a service that keeps state


class Serialised(NamedTuple):
    """An Output as Kafka takes it: project topic name, serialised value, key, (a state change) its partition, and
    its headers (the trace context of the span that made it, when tracing is on)."""
    topic: str
    value: bytes | None
    key: bytes | None
    partition: int | None = None
    headers: list | None = None

# Failures of a handler's resource (a busy database, a network blip): retried briefly, then the batch is held up
# there and handled again later, never dead-lettered. Anything else a handler raises is a bug or bad data.
TRANSIENT = (OSError, sqlite3.OperationalError, KafkaError)
QUICK_ATTEMPTS = 3
BATCH_BUDGET_S = 60.0  # a batch handled longer than this is cut there: well inside the group's max.poll.interval
SEEN = "seen/"  # state key of a handled message id (its value: a digest of what the message said)
MAX_RECORD_BYTES = 1_000_000  # an output Kafka would refuse (the producer's default limit is 1 MiB) is a dead letter


class Unavailable(Exception):
    """Raised by a handler whose resource cannot be used now (the message is not at fault); the text says what."""


@dataclass
class Handled:
    """One record after handling: what to send for it, the state changes to apply once that is committed, and the
    span of its handling (tracing; ended by the loop once the batch is delivered, or not)."""
    record: Any
    outputs: list[Serialised] = field(default_factory=list)
    changes: list = field(default_factory=list)
    span: Any = None
    counted: tuple[str, str] = ("handled", "(unread)")  # (metric, label): counted once its batch is committed


def handle_batch(name: str, batch: dict, handle: Handler, store, stop, accepts: dict[str, frozenset] | None = None,
                 doing: str = "act on", gate: Gate | None = None) -> tuple[list[Handled], str | None]:
    """Handle the records of a poll in order: (the records handled, why handling stopped early or None). It stops
    early when the service is stopping or a handler's resource is unavailable; the rest is handled again later.
    `handle(message, state)`; `store`: the service's state (common/state.py), None if it keeps none.
    `accepts`: real topic -> the message types its writer may send; any other type from there is a dead letter.
    `doing`: what handling a message is, for its span's name ("act on <type>", "route <type>"). `gate`: a service's
    checks before it acts (common/gate.py): the revocations are read to their end first."""
    handled: list[Handled] = []
    until = time.monotonic() + BATCH_BUDGET_S
    if gate is not None and any(batch.values()):
        try:
            gate.read()
        except KafkaError as error:  # (not known whether a command was revoked: none is acted on now)
            return handled, f"the revocations cannot be read now ({type(error).__name__}: {error})"
    for records in batch.values():
        for record in records:
            if stop:
                return handled, "stopping"
            if time.monotonic() > until:  # (slow handling: commit what is done, handle the rest next)
                return handled, f"handling took over {BATCH_BUDGET_S:.0f} s; the rest of the batch comes next"
            try:
                handled.append(handle_record(name, record, handle, store, stop, accepts, doing, gate))
            except Unavailable as reason:
                return handled, str(reason)
    return handled, None


def handle_record(name: str, record, handle: Handler, store, stop, accepts: dict[str, frozenset] | None = None,
                  doing: str = "act on", gate: Gate | None = None) -> Handled:
    """Check, parse, skip a repeat, pass the gate, handle, serialise: one record's outputs (each to the topic `name`
    writes for it) and state changes, or its dead letter, or what is said of a command not acted on."""
    span = tracing.consumed(record)
    carried = tracing.headers(span)  # (what its outputs carry: its context, when tracing is on)
    state = store.view(record.partition, record.key, tracing.traceparent(carried)) if store is not None else None
    try:
        check_key(record.key)
        message = parse(record.value)
        tracing.about(span, message, doing)
        refuse_if_not_theirs(record, message, accepts)
        kind = message.type if message.type in SCHEMAS else "(other)"  # (a label per known type only)
        if repeated(name, message, store, state, gate):
            return Handled(record, span=span, counted=("repeats", kind))
        outputs = call_handler(name, message, lambda m: handle(m, state), stop)
        outs = [serialised(written_by(t, name), m, next(iter(key), None) or record.key, carried) for t, m, *key in outputs]
        if state is None:
            return Handled(record, outs, span=span, counted=("handled", kind))
        return Handled(record, outs + store.outs(state.changes), state.changes, span, ("handled", kind))
    except (Revoked, Expired) as why:  # (not marked handled: a resend with a later deadline is acted on)
        undo(store, state)
        return not_acted(name, record, message, why, gate, carried, span)
    except DeadLetter as reason:
        undo(store, state)
        return Handled(record, [rejected(name, record, str(reason), span)], span=span,
                       counted=("dead", metrics.reason_kind(str(reason))))
    except (ValueError, PydanticSerializationError) as error:  # an output that cannot be written (ValidationError too)
        undo(store, state)
        reason = f"output could not be written: {type(error).__name__}: {str(error)[:300]}"
        return Handled(record, [rejected(name, record, reason, span)], span=span,
                       counted=("dead", metrics.reason_kind(reason)))
    except Unavailable:
        undo(store, state)
        tracing.ended(span)  # (handled again later: that is another span)
        raise


def repeated(name: str, message: Envelope, store, state, gate: Gate | None) -> bool:
    """Whether a message was handled before (its id kept in the service's state); if not, it passes the gate
    (Revoked, Expired) and its id is kept, committed with its outputs or not at all."""
    dedupe = store is not None and store.dedupe
    if dedupe and is_repeat(name, message, state.get(SEEN + message.id)):
        return True
    if gate is not None:
        try:
            gate.check(message)
        except KafkaError as error:  # (not known whether it was revoked: not acted on now)
            raise Unavailable(f"the revocations cannot be read now ({type(error).__name__}: {error})") from None
    if dedupe:
        state.put(SEEN + message.id, mark(message))
    return False


def not_acted(name: str, record, message: Envelope, why: Exception, gate: Gate, carried, span) -> Handled:
    """A command the service does not act on, said: its workflow was cancelled, or its deadline had passed (and then
    the orchestrator is told, where it can be)."""
    outs = [serialised(written_by(t, name), m, record.key, carried) for t, m in gate.not_acted(message, why)]
    return Handled(record, outs, span=span, counted=("revoked" if isinstance(why, Revoked) else "expired", message.type))


def refuse_if_not_theirs(record, message: Envelope, accepts: dict[str, frozenset] | None) -> None:
    """DeadLetter if the record's writer may not send a message of this type (`accepts`: topic -> its types)."""
    if accepts and message.type not in accepts.get(record.topic, frozenset({message.type})):
        raise DeadLetter(f"{record.topic.rsplit('.', 1)[-1]} may not send {message.type!r}; {record.topic} "
                         f"carries {', '.join(sorted(accepts[record.topic]))} only")


def undo(store, state) -> None:
    """A record that is not handled after all changes nothing."""
    if state is not None:
        state.undo()


def is_repeat(name: str, message: Envelope, known) -> bool:
    """True for a message handled before: `known` is what its id's entry says (mark(), where the service keeps it:
    seen/<id>, or a workflow's entry), or None. The same id saying something else is a dead letter."""
    if why := unreadable(known):
        raise DeadLetter(f"its id's state entry was set aside as unreadable ({why}); not handled, in case it was before")
    if known is None:
        return False
    if known != mark(message):
        raise DeadLetter(f"id {message.id!r} was handled before with different content; not handled again")
    log.info("%s: %s %s already handled; ignoring the redelivery", name, message.type, message.id[:8])
    return True


def mark(message: Envelope) -> str:
    """What is kept of a handled message under its id: a digest of what it said."""
    return digest(message).hex()


def call_handler(name: str, message: Envelope, handle: Handler, stop) -> list[Output]:
    """handle(message). A transient failure is retried briefly, then raised as Unavailable; a bug is a dead letter."""
    for attempt in range(1, QUICK_ATTEMPTS + 1):
        began = time.perf_counter()
        try:
            return handle(message)
        except (DeadLetter, Unavailable, Expired):  # (Expired: the deadline passed as it was about to act)
            raise
        except TRANSIENT as error:
            if attempt == QUICK_ATTEMPTS or stop.wait(0.2 * attempt):
                raise Unavailable(f"{type(error).__name__}: {error}") from None
            log.warning("%s: handler failed on %s (attempt %d: %s); retrying", name, message.id[:8], attempt, error)
        except ValidationError as error:  # the handler built an invalid output from this message
            raise DeadLetter(f"output invalid: {str(error)[:300]}") from None
        except Exception as error:  # noqa: BLE001 -- a bug or bad data in one message must not stop the service
            raise DeadLetter(f"handler failed: {type(error).__name__}: {error}") from None
        finally:
            metrics.observe("handler", time.perf_counter() - began, service=name)
    raise AssertionError("unreachable")


def serialised(topic: str, message: Envelope, key: bytes | str | None, headers: list | None = None) -> Serialised:
    """An output as it will be sent; one Kafka would refuse is a ValueError (so, its input's dead letter)."""
    value = message.to_bytes()
    key = key.encode(errors="surrogateescape") if isinstance(key, str) else key  # (a key kept as text gives its bytes)
    if len(value) + len(key or b"") > MAX_RECORD_BYTES:
        raise ValueError(f"a {message.type} of {len(value)} bytes is over the {MAX_RECORD_BYTES}-byte record limit")
    return Serialised(topic, value, key, None, headers)


def serialise_own(name: str, outputs: list[Output], headers: list | None = None, new_traces: bool = False) -> list[Serialised]:
    """A tick's or a timer's messages, serialised; one that cannot be is a bug of the script's own: logged and left
    out. `headers`: the trace context they carry (a timer's); new_traces: each starts a trace of its own (a tick's)."""
    outs = []
    for topic, message, *key in outputs:  # (a pair keeps no key)
        key = key[0] if key else None
        span = tracing.produced(written_by(topic, name), message) if new_traces else None
        try:
            outs.append(serialised(written_by(topic, name), message, key, tracing.headers(span) or headers))
        except ValueError as error:
            log.error("%s: a %s of its own could not be written and is left out: %s", name, message.type, error)
            tracing.failed(span, f"could not be written: {error}")
        tracing.ended(span)
    return outs


def rejected(name: str, record, reason: str, span=None) -> Serialised:
    """The record's dead letter, said and ready to send; its span is marked as an error."""
    log.warning("%s: dead letter from %s:%s:%s: %s", name, record.topic, record.partition, record.offset, reason[:300])
    tracing.failed(span, f"dead letter: {reason}")
    return dead_letter_of(name, record, reason)


def dead_letter_of(name: str, record, reason: str) -> Serialised:
    """The record's dead letter, ready to send: keyed like the record unless its key is what was wrong. It carries
    the record's trace context (a replay of it stays in the same trace)."""
    letter = dead_letter(record.value, reason, name, record)
    try:
        check_key(record.key)
        key = record.key
    except DeadLetter:
        key = None
    return Serialised(written_by(DEAD_LETTER, name), letter.to_bytes(), key, None, tracing.kept(getattr(record, "headers", None)))


def outputs_of(handled: list[Handled]) -> list[Serialised]:
    return [out for item in handled for out in item.outputs]


def offsets_of(handled: list[Handled]) -> dict:
    """The offsets to commit once `handled` is delivered: per partition, the one after its last record."""
    offsets = {}
    for item in handled:
        offsets[(item.record.topic, item.record.partition)] = item.record.offset + 1
    return {TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
            for (topic, partition), offset in offsets.items()}
