"""What stands between a command and its effect: a service acts on no command whose workflow a person cancelled (the
orchestrator's revocations, read to their end before each batch is handled) and on none read after its deadline
(its attempt's time limit: the orchestrator has tried again, or given up, by then). A command so stopped is said in
the service's log and changes nothing; one past its deadline is also reported to the orchestrator (command_expired,
to the service's member of message_stream, when it writes there), which keeps it beside its step. A handler raises
Expired where the deadline passes at the moment of the effect itself (common/effects.py)."""

import contextlib
import logging
import time
from datetime import timezone

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from common.messages import DeadLetter, Envelope, Output, caused_by, parse
from common.settings import MESSAGE_STREAM, REVOKED, Settings
from common.workflow import EXPIRED

log = logging.getLogger("common")
FRESH_S = 0.2  # revocations read longer ago than this are read again before a command is acted on


class Expired(Exception):
    """A command's deadline passed before its effect: it is not acted on (the text says when)."""


class Revoked(Exception):
    """A command of a workflow a person cancelled: it is not acted on (the text says who and why)."""


class Revocations:
    """The workflows a person cancelled, as the orchestrator said on the revoked topic: workflow id -> who and why.
    Read from where the last read ended to the end now (the topic keeps the last record of each workflow)."""

    def __init__(self, settings: Settings):
        self.settings, self.topic, self.consumer, self.revoked = settings, settings.topic(REVOKED), None, {}
        self.next: dict[TopicPartition, int] = {}

    def read(self) -> None:
        """Everything revoked until now; KafkaError if that cannot be read now (then no command may be acted on).
        After a failure the next read starts with a new consumer, from where the last read ended (a consumer whose
        leader was killed can keep failing after the cluster has moved on: tests/test_cluster.py)."""
        try:
            self.read_to_end()
        except KafkaError:
            with contextlib.suppress(KafkaError):
                self.close()
            self.consumer = None
            raise

    def read_to_end(self) -> None:
        if self.consumer is None:
            self.consumer = KafkaConsumer(**self.settings.kafka_config(), enable_auto_commit=False,
                                          isolation_level="read_committed",
                                          allow_auto_create_topics=False)  # (the orchestrator makes it, compacted)
        partitions = {TopicPartition(self.topic, p) for p in self.consumer.partitions_for_topic(self.topic) or ()}
        if not partitions:  # (no cancel yet: the orchestrator makes the topic)
            return
        if partitions != self.consumer.assignment():
            self.consumer.assign(list(partitions))
            for tp in partitions:
                self.consumer.seek(tp, self.next.get(tp, 0))
        end, until = self.consumer.end_offsets(list(partitions), timeout_ms=5000), time.monotonic() + 10
        while any(self.consumer.position(tp) < end[tp] for tp in partitions):
            if time.monotonic() > until:
                raise KafkaError(f"reading {self.topic} made no progress for 10 s")
            for tp, records in self.consumer.poll(timeout_ms=200).items():
                self.keep(records)
                self.next[tp] = records[-1].offset + 1

    def keep(self, records: list) -> None:
        for record in records:
            try:  # (checked as every message is: its size, its envelope, its payload's schema)
                said = parse(record.value)
            except DeadLetter:  # (anything but the orchestrator's revocation is none: said, and passed over)
                said = None
            if said is None or said.type != "workflow_revoked" or said.source != "orchestrator" or \
                    record.key != said.workflow_id.encode():
                log.warning("%s:%d:%d is not a revocation of the orchestrator's; ignored", record.topic,
                            record.partition, record.offset)
                continue
            self.revoked[said.workflow_id] = f"by {said.payload['by']}: {said.payload['reason']}"

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)


class Gate:
    """The checks a service's command passes before its handler acts on it. `reports`: the service writes
    message_stream, so the orchestrator is told of a command it did not act on in time. `applied`: whether a
    command's effect was applied already (a copy acted, then died before it could say so): then its handler is
    called all the same, past the deadline, to say what was done (common/effects.py)."""

    def __init__(self, name: str, settings: Settings, reports: bool, applied=None):
        self.name, self.reports, self.applied, self.revocations = name, reports, applied, Revocations(settings)
        self.read_at = float("-inf")

    @classmethod
    def of(cls, service, settings: Settings) -> "Gate":
        """A declared service's gate (common/service.py's Service)."""
        return cls(service.name, settings, MESSAGE_STREAM in service.writes, service.effects and service.effects.applied)

    def read(self) -> None:
        self.revocations.read()
        self.read_at = time.monotonic()

    def check(self, command: Envelope, now: float | None = None) -> None:
        """Revoked if its workflow was cancelled (the revocations read again if the last read is older than FRESH_S:
        a slow handler's batch outlasts a cancel), Expired if its deadline has passed and its effect was not applied
        already; nothing if it may be acted on. KafkaError if the revocations cannot be read now."""
        if time.monotonic() - self.read_at > FRESH_S:
            self.read()
        if (why := self.revocations.revoked.get(command.workflow_id)) is not None:
            raise Revoked(f"its workflow was cancelled ({why})")
        try:
            refuse_if_expired(command, now)
        except Expired:
            if self.applied is None or not self.applied(command):
                raise

    def not_acted(self, command: Envelope, why: Expired | Revoked) -> list[Output]:
        """What is said of a command not acted on: a line; and for one read after its deadline, the orchestrator
        told (if it can be)."""
        log.warning("%s: %s %s not acted on: %s (workflow %s)", self.name, command.type, command.id[:8], why,
                    command.workflow_id[:8])
        if isinstance(why, Revoked) or not self.reports or command.deadline is None:
            return []
        deadline = command.deadline
        return [(MESSAGE_STREAM, caused_by(command, f"expired-{int(deadline.timestamp() * 1000)}", EXPIRED, {
            "command": command.type, "deadline": deadline, "service": self.name}, self.name))]

    def close(self) -> None:
        self.revocations.close()


def refuse_if_expired(command: Envelope, now: float | None = None) -> None:
    """Expired if a command's deadline has passed (a command without one may be acted on at any time)."""
    late = (time.time() if now is None else now) - command.deadline.timestamp() if command.deadline else 0.0
    if late > 0:  # (a deadline is checked for its range as the envelope is read: messages.py)
        at = command.deadline.astimezone(timezone.utc)
        raise Expired(f"read {late:.1f} s after its deadline ({at:%H:%M:%S}.{at.microsecond // 1000:03d} UTC)")
