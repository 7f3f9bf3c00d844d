"""State that survives a restart, the Kafka Streams way: a small keyed store per consuming service, held in memory
(each entry packed: common/packing.py; their due times: common/timers.py) and backed by a compacted changelog topic
(state.<group>). Partition p of the changelog holds the state of input
partition p (one workflow's messages share a key, so a partition). Each change goes out in the same Kafka transaction
as the batch that made it, with the batch's outputs and offsets: after a crash the state and the offsets agree.
Before a partition's records are handled (at start, and whenever a rebalance assigns it) its state is read back.
Entries expire after STATE_RETENTION_S (a week by default); the topic's retention drops them too.

Only a service that runs exactly once keeps its state in Kafka; an at-least-once one keeps it in memory only."""

import json
import logging
import time
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any

from pydantic_core import PydanticSerializationError, to_json

from common.changelog import UNREADABLE, Reader, as_record, changelog, checked, read
from common.handling import Serialised
from common.packing import Packer, hand_back_freed
from common.settings import SETTINGS, Settings
from common.timers import Timers, slot_of

log = logging.getLogger("common")
UNSET = object()
TIMERS_PER_BATCH = 500  # timers fired in one loop at most


@dataclass
class Reading:
    """One partition's state as it is read back: its entries so far, their timers, the records to set aside."""
    entries: dict = field(default_factory=dict)  # key -> entry (packed), oldest write first
    timers: Timers = field(default_factory=Timers)
    odd: dict = field(default_factory=dict)   # key -> (record, why it is no entry, whether its key is text)
    cutoff: float = 0.0  # entries written before this are past the retention


@dataclass
class Change:
    partition: int
    key: str
    stored: bytes | None  # None: the entry is removed
    due: float | None = None  # (kept beside the stored entry: applying it needs no second parse)


def stored(value: Any, due: float | None, now: float, trace: str | None = None) -> bytes:
    """An entry as the changelog holds it: when it was written, when its timer is due (or null), and its value; with
    tracing on, also the trace context of the record that wrote it (what its timer sends stays in that trace)."""
    entry = {"at": round(now, 3), "due": due, "value": value} | ({"trace": trace} if trace else {})
    try:
        return to_json(entry)  # (pydantic's serialiser, written in Rust: a quarter of the stdlib's time)
    except PydanticSerializationError:  # a key that is not UTF-8, kept with surrogate escapes: only json writes those
        return json.dumps(entry, separators=(",", ":")).encode()


class State:
    """One partition's entries, as a handler sees them: what it put earlier in this batch counts, the rest is what
    Kafka has committed. `due`: a time (epoch seconds) at which the loop calls the service's timer for this key."""

    def __init__(self, store: "Store", partition: int, key: bytes | None = None, trace: str | None = None):
        self.store, self.partition, self.changes, self.before = store, partition, [], []
        self.key = key  # the Kafka key of the record being handled (outputs keep it)
        self.trace = trace  # the trace context of its handling (tracing on), kept with what it puts

    def get(self, key: str) -> Any:
        entry = self.store.entry(self.partition, key)
        return None if entry is None else entry["value"]

    def put(self, key: str, value: Any, due: float | None = None) -> None:
        change = Change(self.partition, key, None if value is None else stored(value, due, time.time(), self.trace), due)
        self.before.append((key, self.store.pending.get((self.partition, key), UNSET)))
        self.store.pending[(self.partition, key)] = change.stored
        self.changes.append(change)

    def undo(self) -> None:
        """Take back this view's changes (its record ended as a dead letter, or waits for later)."""
        for key, before in reversed(self.before):
            if before is UNSET:
                self.store.pending.pop((self.partition, key), None)
            else:
                self.store.pending[(self.partition, key)] = before
        self.changes, self.before = [], []


class Store:
    """The state of every partition this copy is assigned, restored from and written to its changelog."""

    def __init__(self, group: str, settings: Settings = SETTINGS, durable: bool = True, dedupe: bool = False,
                 stop=None):
        self.topic, self.settings, self.dedupe = changelog(group) if durable else None, settings, dedupe
        self.stop = stop  # (a Stopper: a read-back ends early once it is signalled)
        self.entries: dict[int, dict[str, bytes]] = {}  # partition -> key -> entry (packed), oldest write first
        self.packer = Packer()
        self.pending: dict[tuple[int, str], bytes | None] = {}  # this batch's changes, not yet committed
        self.timers = Timers()                                  # when entries are due; stale ones skipped
        self.firing: list[tuple[int, int, str]] = []            # timers handed out, put back if not committed
        self.reader: Reader | None = None
        self.reading: dict[int, Reading] = {}  # partition -> its state, while it is read back
        self.set_aside: list[tuple] = []  # (record, why, change): records read back that are not state entries
        self.removed: list = []  # tombstones read back that removed an entry (Records): written by someone else
        self.retention_s = settings.state_retention_s

    def view(self, partition: int, key: bytes | None = None, trace: str | None = None) -> State:
        return State(self, partition, key, trace)

    def count(self, prefix: str, marked: bytes) -> int:
        """How many entries under `prefix` contain `marked` as stored (a quick scan, parsing none)."""
        unpack = self.packer.unpack
        return sum(marked in unpack(kept) for entries in self.entries.values() for key, kept in entries.items()
                   if key.startswith(prefix))

    def trace_of(self, partition: int, key: str) -> str | None:
        """The trace context kept with an entry (tracing on), or None."""
        kept = self.entries.get(partition, {}).get(key)
        return None if kept is None else read(self.packer.unpack(kept)).get("trace")

    def entry(self, partition: int, key: str) -> dict | None:
        if (partition, key) in self.pending:
            raw = self.pending[(partition, key)]
            return None if raw is None else read(raw)
        kept = self.entries.get(partition, {}).get(key)
        return None if kept is None else read(self.packer.unpack(kept))

    def outs(self, changes: list[Change]) -> list[Serialised]:
        """The changelog records of these changes, ready to send with the batch (none if kept in memory only)."""
        return [Serialised(self.topic, c.stored, c.key.encode(errors="surrogateescape"), c.partition)
                for c in changes] if self.topic else []

    def commit(self, changes: list[Change], fired: bool = True) -> None:
        """Apply changes Kafka has committed (fired=False: the timers handed out did not go out, and are due again)."""
        for change in changes:
            self._apply(change)
        self.pending.clear()
        if not fired:
            self.abandon()
        self.firing.clear()

    def abandon(self) -> None:
        """The batch was not committed: forget its changes; timers it fired are due again."""
        self.pending.clear()
        for timer in self.firing:
            self.timers.add(*timer)
        self.firing.clear()

    def any_due(self, now: float) -> bool:
        """Whether some timer may be due (a stale one too: due() skips those)."""
        return self.timers.any_due(now)

    def due(self, now: float, skip: set[int] = frozenset(), limit: int = TIMERS_PER_BATCH) -> list[tuple[int, str]]:
        """The (partition, key) of each entry whose timer is due, handed out once (until abandon()); at most `limit`
        (the rest next time, so one transaction stays small), none of the partitions in `skip`."""
        fired = {}
        for slot, partition, key in self.timers.take(now, skip, limit):
            entry = self.entries.get(partition, {}).get(key)
            due = None if entry is None else checked(self.packer.unpack(entry))[0].due
            if due is not None and slot_of(due) == slot:  # (else stale: the entry changed, expired or went away)
                fired[(slot, partition, key)] = None  # (a timer pushed twice fires once)
        self.firing += fired
        return [(partition, key) for _, partition, key in fired]

    @property
    def loaded(self) -> set[int]:
        return set(self.entries)

    def forget(self, partitions: set[int]) -> None:
        """Partitions taken away: their state is read again if they come back (another copy may change it)."""
        for partition in partitions:
            self.entries.pop(partition, None)

    def restore(self, partitions: set[int]) -> int | None:
        """Read the state of `partitions` back from the changelog (committed entries only); returns how many records,
        or None if the service was stopped meanwhile."""
        if self.topic is None:
            self.entries.update({partition: {} for partition in partitions})
            return 0
        self.open()
        cutoff = time.time() - self.retention_s
        self.reading = {partition: Reading(cutoff=cutoff) for partition in partitions}
        count = self.reader.entries(partitions, self._take)
        if count is not None:
            for partition, reading in self.reading.items():
                self._restored(partition, reading)
        self.reading = {}
        if count:
            hand_back_freed()
        return count

    def _take(self, partition: int, records: list) -> None:
        """Records read back, in order, each checked and packed as it comes: the last record of a key wins, a
        tombstone removes it, an entry past the retention is dropped. One that is not a state entry (a key that is
        not UTF-8 text, a value that is not an entry) is set aside at the end unless a later record of its key
        replaces it."""
        reading, entries = self.reading[partition], self.reading[partition].entries
        for record in records:
            try:
                key = record.key.decode()
            except (AttributeError, UnicodeDecodeError):  # (no key, or one that is not UTF-8 text)
                if record.key is not None:  # (a keyless record cannot be removed: it is left alone)
                    key = record.key.decode(errors="surrogateescape")
                    reading.odd.pop(key, None)
                    if record.value is not None:
                        reading.odd[key] = (as_record(record), "its key is not UTF-8 text", False)
                continue
            reading.odd.pop(key, None)
            if entries.pop(key, None) is not None and record.value is None:  # (a project script writes none)
                self.removed.append(as_record(record))
            if record.value is None:
                continue
            entry, why = checked(record.value)
            if why is not None:
                reading.odd[key] = (as_record(record), why, True)
            elif entry.at >= reading.cutoff:
                entries[key] = self.packer.pack(record.value)
                if entry.due is not None:
                    reading.timers.push(entry.due, partition, key)  # (stale if a later record of its key comes)

    def _restored(self, partition: int, reading: "Reading") -> None:
        """A partition read back: its entries kept, their timers set; a record set aside holds {"unreadable": why}
        from now on if its key is text (what it held is said lost, not guessed), and is removed if not."""
        entries = self.entries[partition] = reading.entries
        for key, (record, why, text) in reading.odd.items():
            if text:
                entries[key] = stored({UNREADABLE: why}, None, time.time())
            self.set_aside.append((record, why, Change(partition, key, entries.get(key))))
        self.timers.merge(reading.timers)

    def take_set_aside(self) -> list[tuple]:
        """The records the read-back set aside since last asked: (the record, why, the change that stands for it)."""
        taken, self.set_aside = self.set_aside, []
        return taken

    def take_removed(self) -> list:
        """The tombstones the read-back found removing an entry, since last asked."""
        taken, self.removed = self.removed, []
        return taken

    def expire(self, now: float) -> int:
        """Drop entries not written for STATE_RETENTION_S (the changelog's retention drops them from Kafka)."""
        cutoff, dropped = now - self.retention_s, 0
        for entries in self.entries.values():
            expired = list(takewhile(lambda item: checked(self.packer.unpack(item[1]))[0].at < cutoff, entries.items()))
            for key, _ in expired:  # (the oldest writes come first)
                del entries[key]
            dropped += len(expired)
        return dropped

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def _apply(self, change: Change) -> None:
        entries = self.entries.get(change.partition)
        if entries is None:  # (the partition was taken away meanwhile: its new owner reads it from the changelog)
            return
        entries.pop(change.key, None)
        if change.stored is not None:
            entries[change.key] = self.packer.pack(change.stored)
            if change.due is not None:
                self.timers.push(change.due, change.partition, change.key)

    def open(self) -> None:
        """Start making the changelog's reader now (while the service joins its group): a restart reads its state
        back sooner. Kept in memory only, it has none."""
        if self.topic is not None and self.reader is None:
            self.reader = Reader(self.topic, self.settings, self.stop)
