"""The dead letters: each one read (which, what it says, when), where its original came from and whether it was
replayed; the originals of chosen letters, read back or decoded, and their replay to the topic they came from.
dead_letters.py and the console use it."""

import base64
import binascii
import logging
import re
import time
from datetime import datetime

from kafka import KafkaConsumer
from kafka.errors import AuthorizationError
from kafka.structs import TopicPartition
from pydantic import ValidationError

from common import (DEAD_LETTER, SETTINGS, DeadLetterPayload, Envelope, Settings, discard, make_producer, read_all, read_from,
                    readers_and_writers, refused, tracing, wait_for_acks)
from orchestrator import WORKFLOWS

log = logging.getLogger("dead_letters")


READS = readers_and_writers(WORKFLOWS)  # script -> (the topics it reads, those it writes)

REPLAYED = "replayed-from"  # the header a replayed original carries: the letter it was replayed from


def load(records) -> tuple[list[tuple[str, DeadLetterPayload, datetime]], list[str]]:
    """(which letter, "SERVICE:PARTITION:OFFSET"; what it says; when it was written) for each readable dead letter, and
    which records are not
    dead letters at all (junk written to a dead_letter topic): those are shown, never fatal. SERVICE is the writer
    of the dead_letter topic it is on, which only that service may write."""
    letters, unreadable = [], []
    for record in records:
        which = f"{record.topic.rsplit('.', 1)[-1]}:{record.partition}:{record.offset}"
        try:
            envelope = Envelope.model_validate_json(record.value)
            letters.append((which, DeadLetterPayload.model_validate(envelope.payload), envelope.created_at))
        except ValidationError:  # (invalid JSON is a ValidationError too)
            unreadable.append(which)
    return letters, unreadable


def workflow_of(letter: DeadLetterPayload) -> str:
    """The workflow id of a letter's original, when it is an envelope that says one; else "-"."""
    try:
        return Envelope.model_validate_json(decoded(letter)[1] or b"").workflow_id[:8]
    except (ValidationError, ValueError):  # (not an envelope, or cut to fit)
        return "-"


def original_of(letter: DeadLetterPayload) -> tuple | None:
    """What a letter holds, as a replay of it is found again: (topic, key, value); None if it cannot be replayed."""
    try:
        return (letter.topic, *decoded(letter))
    except (binascii.Error, ValueError):
        return None


def replays(letters) -> dict[tuple, list[float]]:
    """When each letter's original was replayed: the records marked REPLAYED on its topic after the original."""
    starts: dict[TopicPartition, int] = {}
    for _, letter, _ in letters:
        if letter.topic and letter.partition is not None and letter.offset is not None:
            where = TopicPartition(letter.topic, letter.partition)
            starts[where] = min(starts.get(where, letter.offset), letter.offset)
    found: dict[tuple, list[float]] = {}
    with Source() as source:
        for record in source.since(starts):
            if any(name == REPLAYED for name, _ in record.headers or ()):
                found.setdefault((record.topic, record.key, record.value), []).append(record.timestamp / 1000)
    return found


def chosen(letters, reason: str | None, service: str | None, which: list[str] | None):
    return [(name, letter, made) for name, letter, made in letters
            if (reason is None or reason in letter.reason)
            and (service is None or name.startswith(service + ":"))
            and (not which or name in which)]


def consumes(writer: str, topic: str) -> bool:
    """Whether `writer`, the service whose dead_letter topic a letter is on, consumes `topic` (a real name)."""
    reads = READS.get(writer, ([], []))[0]
    return bool(reads) and re.match(SETTINGS.pattern(reads), topic) is not None


def originals(letters, every_copy: bool = False) -> list[tuple[str, bytes | None, bytes | None, list | None]]:
    """What to replay, as (topic, key, value, headers): each letter's original, if it is kept whole, goes back to a
    topic its writer consumes, and is still in Kafka byte for byte where the letter says it came from (so a letter
    cannot make up a message another script would have sent); each original once (unless every_copy). The headers
    are the original's trace context: with tracing on, a replay stays in its workflow's trace."""
    kept, seen = [], set()
    with Source() as source:
        for which, letter, _ in letters:
            reason = unfit(which, letter)
            key, value = (None, None) if reason else decoded(letter)
            record = None if reason else source.record(letter.topic, letter.partition, letter.offset)
            if reason is None and (record is None or (key, value) != (record.key, record.value)):
                reason = f"its original is not at {letter.topic}:{letter.partition}:{letter.offset} (any more)"
            if reason:
                log.warning("dead letter %s is not replayed: %s", which, reason)
            elif every_copy or (letter.topic, key, value) not in seen:
                kept.append((letter.topic, key, value, [*(tracing.kept(record.headers) or []), (REPLAYED, which.encode())]))
                seen.add((letter.topic, key, value))
    return kept


def unfit(which: str, letter: DeadLetterPayload) -> str | None:
    """Why a letter cannot be replayed as it stands, if it cannot."""
    writer = which.split(":", 1)[0]
    if letter.topic is None or letter.partition is None or letter.offset is None or not consumes(writer, letter.topic):
        return f"it names {letter.topic}, which {writer} does not consume"
    if letter.original_truncated or letter.key_truncated:
        return "its original was not kept whole"
    if letter.original_null and not letter.key_b64:  # kafka-python sends no record with neither key nor value
        return "a null value without a key"
    try:
        decoded(letter)
    except binascii.Error:
        return "its original is not valid base64"
    return None


def decoded(letter: DeadLetterPayload) -> tuple[bytes | None, bytes | None]:
    return (base64.b64decode(letter.key_b64, validate=True) if letter.key_b64 else None,
            None if letter.original_null else base64.b64decode(letter.original_b64, validate=True))


class Source:
    """Reads single records back from where dead letters say they came from (committed only; joins no group)."""

    def __enter__(self):
        self.consumer = KafkaConsumer(**SETTINGS.kafka_config(), enable_auto_commit=False,
                                      isolation_level="read_committed")
        return self

    def record(self, topic: str, partition: int, offset: int):
        """The record at topic:partition:offset, or None if there is none (any more)."""
        where = TopicPartition(topic, partition)
        self.consumer.assign([where])
        self.consumer.seek(where, offset)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for record in self.consumer.poll(timeout_ms=200).get(where, []):
                return record if record.offset == offset else None
            if self.consumer.position(where) >= self.consumer.end_offsets([where])[where]:
                return None
        return None

    def since(self, starts: dict[TopicPartition, int]) -> list:
        """Every record from each partition's start offset to its end now."""
        return read_from(self.consumer, starts, "the originals' topics")

    def __exit__(self, *exc):
        self.consumer.close(autocommit=False)


def replay(originals: list[tuple[str, bytes | None, bytes | None, list | None]]) -> int:
    """Send each original (null as null), with its key and trace context, back to the topic it came from."""
    producer = make_producer()
    try:
        futures = [producer.send(topic, key=key, value=value, headers=headers)
                   for topic, key, value, headers in originals]
        wait_for_acks(producer, futures, "dead_letters")
    except AuthorizationError as error:
        raise refused("dead_letters", error) from None
    finally:
        discard(producer, timeout=10)
    return len(futures)


def rows(settings: Settings) -> list[dict]:
    """dead_letters.py list's letters, newest first: where each came from, why, and whether and when it was replayed."""
    found, _ = load(read_all(DEAD_LETTER, settings=settings))
    replayed = replays(found)
    return [{"letter": which, "at": made.timestamp(), "service": which.split(":")[0],
             "workflow": workflow_of(letter), "reason": letter.reason,
             "from": f"{letter.topic}:{letter.partition}:{letter.offset}",
             "replayed": sorted(replayed.get(original_of(letter), []))}
            for which, letter, made in sorted(found, key=lambda row: row[2], reverse=True)]


class NoSuchLetter(LookupError):
    """A letter asked for that the dead letters do not hold (the text says which)."""


def replay_one(which: str, settings: Settings) -> int:
    """Replay one letter's original (the console's Replay button): how many were sent (0: it cannot be, as logged);
    NoSuchLetter if there is no such letter."""
    found, _ = load(read_all(DEAD_LETTER, settings=settings))
    if not (picked := chosen(found, None, None, [which])):
        raise NoSuchLetter(f"no dead letter {which} (a letter is SERVICE:PARTITION:OFFSET, as listed)")
    todo = originals(picked)
    return replay(todo) if todo else 0
