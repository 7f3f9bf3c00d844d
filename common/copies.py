"""The copies of a service in one consumer group, as far as handing partitions over goes: leaving the group when
stopped while others run, and ending the open transaction of a copy that is gone (common/loop.py uses them)."""

import logging
import threading
import time

from kafka import KafkaAdminClient
from kafka.admin import MemberToRemove
from kafka.errors import KafkaError, NoError

from common.clients import SESSION_TIMEOUT_MS, make_producer
from common.settings import SETTINGS, Settings
from common.workarounds import Stuck, in_background

log = logging.getLogger("common")


def described(admin: KafkaAdminClient, group: str, settings: Settings = SETTINGS) -> list[dict]:
    """The members of a consumer group now, as the coordinator describes them (member id, static member id, the
    topics each subscribes to). KafkaError if the coordinator did not say (kafka-python returns its error beside an
    empty member list, which must not read as "nobody")."""
    found = admin.describe_groups([settings.group(group)]).get(settings.group(group)) or {}
    if found.get("error"):
        raise KafkaError(f"describing group {settings.group(group)}: {found['error']}")
    return list(found.get("members") or ())


def members(admin: KafkaAdminClient, group: str, settings: Settings = SETTINGS) -> set[str]:
    """The static member ids of the copies in a consumer group now."""
    return {member["group_instance_id"] for member in described(admin, group, settings) if member.get("group_instance_id")}


def ours(admin: KafkaAdminClient, group: str, settings: Settings = SETTINGS) -> list[dict]:
    """The member holding this copy's place (its INSTANCE_ID) in its group now: this process, an earlier run of it
    within its session, or another process started with the same INSTANCE_ID."""
    return [member for member in described(admin, group, settings)
            if member.get("group_instance_id") == settings.member(group)]


def holds_our_place(admin: KafkaAdminClient, group: str, member_id: str, settings: Settings = SETTINGS) -> bool:
    """Whether another process holds this copy's place in its group now (not known while this copy has no member
    id: then False)."""
    return bool(member_id) and any(member.get("member_id") != member_id for member in ours(admin, group, settings))


def leave(admin: KafkaAdminClient, group: str, settings: Settings = SETTINGS) -> None:
    """Take this copy out of its group at once. A static member's close() does not leave (so that a restart finds
    its partitions waiting); a copy stopped for good while others run hands its partitions over this way instead of
    after the session timeout. KafkaError if the coordinator refused."""
    answers = admin.remove_group_members(settings.group(group), [MemberToRemove(group_instance_id=settings.member(group))])
    refused_with = [error for error in answers.values() if error is not NoError]
    if refused_with:
        raise KafkaError(", ".join(error.__name__ for error in refused_with))


def fence(transactional_id: str, settings: Settings = SETTINGS) -> None:
    """End whatever transaction a gone copy left open (a producer starting with its transactional id aborts it at
    once, and fences that copy off should it still be alive) instead of waiting for Kafka's transaction timeout."""
    make_producer(transactional_id=transactional_id, settings=settings).close(timeout=5)



class Copies:
    """The other copies of a service in its group, as far as handing partitions over goes.

    - A copy stopped while others of its group run leaves the group, so they take its partitions at once; the last
      one keeps its place for the session timeout, so that a restart of it finds them waiting (the restart gap).
    - A copy given partitions by a rebalance ends the open transaction of any copy gone from the group since the last
      one (it may have died in the middle of one): until Kafka aborts it (its transaction timeout, 10 s, and its next
      check), every read_committed reader of what it wrote waits behind it, this copy's state read included."""

    def __init__(self, name: str, group: str, settings: Settings):
        self.name, self.group, self.settings = name, group, settings
        self.admin: KafkaAdminClient | None = None
        self.making = threading.Lock()  # (the first rebalance asks in the background)
        self.known: set[str] | None = None  # the group's members at the last rebalance (None: not asked yet)
        self.rebalanced = False  # set by the rebalance listener (Forget), looked at by the loop

    def learn(self) -> None:
        """Ask who is in the group now, in the background (the batch does not wait for it)."""
        in_background(self._learn)

    def end_departed(self) -> None:
        """After a rebalance that gave this copy partitions: end what copies gone from the group since the last one
        left open. The first time, it only learns who is there (a restart's first batch does not wait for that).
        Each step is bounded (10 s): a slow broker delays the batch, it does not hold the loop."""
        if self.known is None:
            return self.learn()
        try:
            now = in_background(lambda: members(self._admin(), self.group, self.settings))(10)
        except Stuck as error:
            raise KafkaError(f"the group's members: {error}") from None
        if self.settings.member(self.group) not in now:  # (an answer from before this copy joined: not to act on)
            return
        for gone in sorted(self.known - now):
            try:
                in_background(fence, transactional_id=gone, settings=self.settings)(10)
                log.info("%s: ended what %s, gone from the group, left open", self.name, gone)
            except (KafkaError, Stuck) as error:
                log.warning("%s: could not end what %s left open (%s); Kafka aborts it after its timeout", self.name,
                            gone, error)
        self.known = now

    def _learn(self) -> None:
        for attempt in range(5):  # (a coordinator still loading answers with an error: ask again shortly)
            try:
                self.known = members(self._admin(), self.group, self.settings)
                return
            except KafkaError:
                time.sleep(0.5 * (attempt + 1))

    def replaced(self, member_id: str, stop, within: float = 3.0) -> bool:
        """Whether another process took this copy's place (started with its INSTANCE_ID): asked for up to `within`
        seconds, since it may join its group a moment after its producer fenced ours."""
        deadline = time.monotonic() + within
        while True:
            try:
                if in_background(lambda: holds_our_place(self._admin(), self.group, member_id, self.settings))(3):
                    return True
            except (KafkaError, Stuck):
                pass
            if time.monotonic() > deadline or stop.wait(0.5):
                return False

    def others(self) -> set[str]:
        """The other copies in the group now (none if Kafka does not answer within 3 s)."""
        try:
            return in_background(lambda: members(self._admin(), self.group, self.settings))(3) - \
                {self.settings.member(self.group)}
        except (KafkaError, Stuck):
            return set()

    def leave(self, others: int) -> None:
        try:
            in_background(lambda: leave(self._admin(), self.group, self.settings))(5)
            log.info("%s: left group %s to the other cop%s", self.name, self.group, "ies" if others > 1 else "y")
        except (KafkaError, Stuck) as error:
            log.warning("%s: could not leave group %s (%s); the others take over after %d s", self.name, self.group,
                        error, SESSION_TIMEOUT_MS // 1000)

    def _admin(self) -> KafkaAdminClient:
        with self.making:
            if self.admin is None:
                self.admin = KafkaAdminClient(**self.settings.kafka_config(), bootstrap_timeout_ms=3000,
                                              client_id=self.settings.group(self.group))
        return self.admin

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()
