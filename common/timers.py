"""The timers of a state store: when an entry's `due` time comes, the loop calls the service's timer for its key (an
orchestrator's step that ran out of time, say). Kept in slots of a tenth of a second, one list of keys per slot and
partition, so a timer costs a few bytes (200 000 open workflows' deadlines take ~2 MB, where one heap item each took
~20 MB); a timer is handed out within a tenth of a second after its time, never before. Timers are never removed: the store
skips one whose entry has changed since (a stale timer). No Kafka."""

import heapq
import math

SLOTS_PER_S = 10


def slot_of(due: float) -> int:
    """The slot a time falls in: its timers fire once the slot begins, which is at or after the time itself."""
    return math.ceil(due * SLOTS_PER_S)


class Timers:
    """The timers of the entries of every partition a store holds."""

    def __init__(self):
        self.keys: dict[tuple[int, int], list[str]] = {}  # (slot, partition) -> the keys due then
        self.slots: list[tuple[int, int]] = []  # the (slot, partition) of each list of keys, a heap: the earliest first

    def add(self, slot: int, partition: int, key: str) -> None:
        keys = self.keys.get((slot, partition))
        if keys is None:
            keys = self.keys[(slot, partition)] = []
            heapq.heappush(self.slots, (slot, partition))
        keys.append(key)

    def push(self, due: float, partition: int, key: str) -> None:
        self.add(slot_of(due), partition, key)

    def merge(self, other: "Timers") -> None:
        """Take over the timers of another (a partition read back)."""
        for (slot, partition), keys in other.keys.items():
            for key in keys:
                self.add(slot, partition, key)

    def any_due(self, now: float) -> bool:
        """Whether some timer may be due (a stale one too)."""
        return bool(self.slots) and self.slots[0][0] <= now * SLOTS_PER_S

    def take(self, now: float, skip: set[int], limit: int) -> list[tuple[int, int, str]]:
        """(slot, partition, key) of at most `limit` timers due by `now`, none of the partitions in `skip`; each
        taken out (the rest stay for next time)."""
        taken, skipped = [], []
        while self.slots and self.slots[0][0] <= now * SLOTS_PER_S and len(taken) < limit:
            slot, partition = heapq.heappop(self.slots)
            if partition in skip:
                skipped.append((slot, partition))
                continue
            keys, room = self.keys.pop((slot, partition)), limit - len(taken)
            taken += [(slot, partition, key) for key in keys[:room]]
            for key in keys[room:]:
                self.add(slot, partition, key)
        for slot, partition in skipped:
            heapq.heappush(self.slots, (slot, partition))
        return taken
