"""What every script shares: config, topic names, the message envelope and schemas, Kafka clients, and the one
consume -> handle -> produce loop. It lives here once so that each service file holds only its own decision."""

import base64
import json
import logging
import os
import signal
import socket
import sqlite3
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (AuthorizationError, FencedInstanceIdError, KafkaError, KafkaTimeoutError, NoError,
                          ProducerFencedError, SaslAuthenticationFailedError, TopicAlreadyExistsError)
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("common")

# ---------------------------------------------------------------------------------------------------------------
# Config: everything that differs between a laptop, CI and a real cluster comes from the environment.

BOOTSTRAP_SERVERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
TOPIC_PREFIX = os.environ.get("TOPIC_PREFIX", "")
TOPIC_PARTITIONS = int(os.environ.get("TOPIC_PARTITIONS", "1"))
TOPIC_REPLICATION_FACTOR = int(os.environ.get("TOPIC_REPLICATION_FACTOR", "-1"))  # -1: the cluster's default
MAX_MESSAGE_BYTES = 64 * 1024  # larger inputs are dead-lettered, not parsed

SECURITY_SETTINGS = {  # kafka-python argument <- environment variable
    "security_protocol": "KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "sasl_plain_username": "KAFKA_SASL_USERNAME",
    "sasl_plain_password": "KAFKA_SASL_PASSWORD",
    "ssl_cafile": "KAFKA_SSL_CAFILE",
}


def kafka_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Connection settings for every client: bootstrap address plus any SASL/TLS settings set in the environment
    (or in `environ`)."""
    environ = os.environ if environ is None else environ
    config = {"bootstrap_servers": environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092").split(","),
              "reconnect_backoff_max_ms": 1000}
    config.update({arg: environ[env] for arg, env in SECURITY_SETTINGS.items() if environ.get(env)})
    return config


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("kafka").setLevel(logging.WARNING)  # the client's own chatter hides the flow
        logging.getLogger("kafka.net.sasl").setLevel(logging.ERROR)  # "credentials in the clear": README says so
    for handler in logging.getLogger().handlers:
        handler.addFilter(ClientWarningsOncePer(30.0))
        handler.addFilter(HidePassword(os.environ.get("KAFKA_SASL_PASSWORD")))


class HidePassword(logging.Filter):
    """No log line shows the password (kafka-python logs its whole configuration at DEBUG)."""

    def __init__(self, password: str | None):
        super().__init__()
        self.password = password

    def filter(self, record: logging.LogRecord) -> bool:
        if self.password and self.password in record.getMessage():
            record.msg, record.args = record.getMessage().replace(self.password, "********"), None
        return True


class ClientWarningsOncePer(logging.Filter):
    """Lets through one kafka-python warning per `seconds`: while the broker is down it logs several a second."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.last, self.hidden = seconds, float("-inf"), 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kafka") or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        if record.created - self.last < self.seconds:
            self.hidden += 1
            return False
        if self.hidden:
            record.msg = f"{record.msg} (and {self.hidden} more client warnings in the last {self.seconds:.0f} s)"
        self.last, self.hidden = record.created, 0
        return True


# ---------------------------------------------------------------------------------------------------------------
# Topics: each has a single writer (the orchestrator writes the commands; services write their outcomes).

MESSAGE_STREAM = "message_stream"        # events in: detections, unit events, service outcomes
SEC_COMMAND = "sec_command"              # orchestrator -> security_service
NOTIFICATION_COMMAND = "notification_command"  # orchestrator -> notification_service
REPORT_DATA = "report_data"              # orchestrator -> reporting_service
UNIT_COMMAND = "unit_command"            # orchestrator -> unit_event_producer
THIRD_PARTY = "third_party"              # notification_service -> external systems
DEAD_LETTER = "dead_letter"              # anything that could not be handled, with the reason
ALL_TOPICS = [MESSAGE_STREAM, SEC_COMMAND, NOTIFICATION_COMMAND, REPORT_DATA, UNIT_COMMAND, THIRD_PARTY, DEAD_LETTER]


def topic(name: str) -> str:
    """The real topic name: TOPIC_PREFIX isolates tests and tenants on one cluster."""
    return TOPIC_PREFIX + name


# ---------------------------------------------------------------------------------------------------------------
# Messages: one envelope for everything, and a schema per type for the payload.

class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecurityDetection(Schema):
    sensor_id: str = Field(min_length=1, max_length=64)
    zone: str = Field(min_length=1, max_length=64)
    kind: Literal["motion", "door_forced", "glass_break", "smoke"]
    severity: int = Field(ge=1, le=5)


class SecurityCommand(Schema):
    action: Literal["inspect", "lock_zone", "dispatch_guard"]
    zone: str
    sensor_id: str
    severity: int = Field(ge=1, le=5)


class SecurityOutcome(Schema):
    action: str = Field(max_length=32)
    zone: str = Field(max_length=64)
    detail: str = Field(default="", max_length=200)


class NotificationCommand(Schema):
    channel: Literal["sms", "email", "pager"]
    recipient: str
    text: str = Field(max_length=500)


class NotificationDelivered(Schema):
    channel: str
    recipient: str
    text: str


class ReportData(Schema):
    workflow: Literal["security", "unit"]
    category: str  # detection kind or unit status
    entity: str    # sensor or unit id
    zone: str = ""


class UnitEvent(Schema):
    unit_id: str = Field(min_length=1, max_length=64)
    status: Literal["heartbeat", "battery_low", "offline", "tamper"]
    battery: int = Field(ge=0, le=100)


class UnitCommand(Schema):
    unit_id: str
    command: Literal["acknowledge", "power_save", "reboot", "lockdown"]


class UnitCommandApplied(Schema):
    unit_id: str
    command: str
    state: str


SCHEMAS: dict[str, type[Schema]] = {
    "security_detection": SecurityDetection,
    "security_command": SecurityCommand,
    "security_action_completed": SecurityOutcome,
    "security_action_failed": SecurityOutcome,
    "notification_command": NotificationCommand,
    "notification_delivered": NotificationDelivered,
    "report_data": ReportData,
    "unit_event": UnitEvent,
    "unit_command": UnitCommand,
    "unit_command_applied": UnitCommandApplied,
}


class Envelope(BaseModel):
    """Every message on every topic: who, what, which workflow, when, and the typed payload."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, max_length=200)       # unique; the dedupe key
    type: str = Field(min_length=1, max_length=64)
    workflow_id: str = Field(min_length=1, max_length=64)  # id of the event that started the workflow
    source: str = Field(min_length=1, max_length=64)    # the script that wrote it
    created_at: datetime
    payload: dict[str, Any]

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class DeadLetter(Exception):
    """Raised while handling a message that must go to dead_letter; the text is the reason."""


def new_event(type_: str, payload: dict, source: str) -> Envelope:
    """A message that starts a workflow: its own id is the workflow id."""
    event_id = str(uuid.uuid4())
    return _make(event_id, type_, payload, source, event_id)


def caused_by(cause: Envelope, step: str, type_: str, payload: dict, source: str) -> Envelope:
    """A message caused by another: same workflow, and an id derived from the cause and the step, so that
    handling the same cause twice yields the same id and receivers can drop the repeat."""
    return _make(f"{cause.id}.{step}", type_, payload, source, cause.workflow_id)  # e.g. "<event id>.notify"


def _make(id_: str, type_: str, payload: dict, source: str, workflow_id: str) -> Envelope:
    payload = SCHEMAS[type_].model_validate(payload).model_dump()
    return Envelope(id=id_, type=type_, workflow_id=workflow_id, source=source,
                    created_at=datetime.now(timezone.utc), payload=payload)


def parse(raw: bytes | None) -> Envelope:
    """Bytes from Kafka -> a validated Envelope, or DeadLetter saying what is wrong with them."""
    if raw is None:
        raise DeadLetter("empty message (null value)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise DeadLetter(f"message of {len(raw)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError; RecursionError: absurd nesting
        raise DeadLetter(f"not valid JSON: {str(error)[:200]}") from None
    try:
        envelope = Envelope.model_validate(data)
    except ValidationError as error:
        raise DeadLetter(f"invalid envelope: {problems(error)}") from None
    schema = SCHEMAS.get(envelope.type)
    if schema is None:  # a type no schema knows: the orchestrator says "no route", a service "unexpected type"
        return envelope
    try:  # handlers get the payload as the schema reads it: defaults filled in, "4" read as 4
        return envelope.model_copy(update={"payload": schema.model_validate(envelope.payload).model_dump()})
    except ValidationError as error:
        raise DeadLetter(f"invalid {envelope.type} payload: {problems(error)}") from None


def problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors()[:5])


def expect(event: Envelope, *types: str) -> None:
    """Services call this first: a command of another type on their topic is a dead letter, not a guess."""
    if event.type not in types:
        raise DeadLetter(f"unexpected type {event.type!r}; this service handles {', '.join(types)}")


def dead_letter(raw: bytes | None, reason: str, service: str, record=None) -> Envelope:
    """A dead_letter message: the reason, where the input came from, and the original bytes (base64)."""
    original = raw or b""
    payload = {
        "reason": reason, "service": service,
        "topic": getattr(record, "topic", None), "partition": getattr(record, "partition", None),
        "offset": getattr(record, "offset", None),
        "key": (record.key or b"").decode(errors="replace") if record is not None else None,  # to read
        "key_b64": base64.b64encode(record.key).decode() if record is not None and record.key else None,  # to replay
        "original_b64": base64.b64encode(original[:MAX_MESSAGE_BYTES * 4]).decode(),
        "original_truncated": len(original) > MAX_MESSAGE_BYTES * 4,
        "excerpt": original[:200].decode(errors="replace"),
    }
    where = f"{payload['topic']}:{payload['partition']}:{payload['offset']}"
    dead_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dead/{service}/{where}"))
    return Envelope(id=dead_id, type="dead_letter", workflow_id=dead_id, source=service,
                    created_at=datetime.now(timezone.utc), payload=payload)


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


# ---------------------------------------------------------------------------------------------------------------
# Kafka clients.

def wait_for_kafka(stop: "Stopper", what: str) -> KafkaAdminClient | None:
    """Connect an admin client (saying clearly that we wait if the broker is not up yet) and create any missing
    project topic; returns the client, or None if stopped meanwhile. A broker that refuses us (wrong password, or
    sign-in needed) or forbids a topic ends the script with one clear line: waiting would not help."""
    waiting_since, watch = None, ConnectionWatch.install()
    try:
        while not stop:
            try:
                admin = KafkaAdminClient(**kafka_config(), bootstrap_timeout_ms=2000, client_id=what)
                if waiting_since is not None:
                    log.info("%s: Kafka is up after %.0f s of waiting", what, time.monotonic() - waiting_since)
                ensure_topics(admin)
                return admin
            except KafkaTimeoutError:
                if reason := watch.refused():
                    log.error("%s: %s", what, reason)
                    raise SystemExit(2) from None
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.warning("%s: waiting for Kafka at %s (start it with 'make kafka-up')", what, BOOTSTRAP_SERVERS)
            except AuthorizationError as error:
                raise refused(what, error) from None
    finally:
        watch.remove()
    return None


class ConnectionWatch(logging.Handler):
    """kafka-python logs why a connection failed and retries for ever; this listens to those records so that a
    sign-in failure is reported as such instead of as "waiting for Kafka"."""

    @classmethod
    def install(cls) -> "ConnectionWatch":
        watch = cls()
        logging.getLogger("kafka").addHandler(watch)
        return watch

    def __init__(self):
        super().__init__(logging.ERROR)
        self.sign_in_error, self.disconnects = None, 0

    def emit(self, record: logging.LogRecord) -> None:
        error = next((a for a in record.args or () if isinstance(a, SaslAuthenticationFailedError)), None) \
            if isinstance(record.args, tuple) else None
        if error is not None:
            self.sign_in_error = str(error).split(": ", 1)[-1]  # the broker's reason; never the password
        elif "socket disconnected" in record.getMessage():
            self.disconnects += 1

    def refused(self) -> str | None:
        """Why Kafka refuses us, if it does."""
        user = os.environ.get("KAFKA_SASL_USERNAME")
        if self.sign_in_error:
            return (f"Kafka at {BOOTSTRAP_SERVERS} refused to sign in user {user!r} ({self.sign_in_error}); "
                    f"check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        if not os.environ.get("KAFKA_SECURITY_PROTOCOL") and self.disconnects >= 2 and answers_kafka(BOOTSTRAP_SERVERS):
            return (f"Kafka at {BOOTSTRAP_SERVERS} accepts connections but closes ours: it wants clients to sign in; "
                    f"set KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        return None

    def remove(self) -> None:
        logging.getLogger("kafka").removeHandler(self)


def answers_kafka(servers: str) -> bool:
    """True if the first bootstrap server answers a Kafka ApiVersions request (v0, sent by hand). A broker that wants
    sign-in answers it and then closes the connection on the next request; a port that is open while the broker
    behind it is still starting (a Docker port proxy, say) does not answer at all."""
    host, _, port = servers.split(",")[0].rpartition(":")
    client_id = b"probe"
    request = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id  # ApiVersions v0, correlation id 1
    try:
        with socket.create_connection((host, int(port)), timeout=2) as connection:
            connection.sendall(struct.pack(">i", len(request)) + request)
            reply = connection.recv(8)
    except (OSError, ValueError):
        return False
    return len(reply) == 8 and struct.unpack(">ii", reply)[1] == 1


def refused(what: str, error: KafkaError) -> SystemExit:
    """An authorization error ends the script with one line: retrying cannot grant a right."""
    user = os.environ.get("KAFKA_SASL_USERNAME", "(anonymous)")
    log.error("%s: Kafka does not allow user %r to do this (%s). Each user may only do its own script's job "
              "(see acls.py); run the script as its own user or ask the cluster's admin", what, user, error)
    return SystemExit(3)


def ensure_topics(admin: KafkaAdminClient, names: Iterable[str] = ALL_TOPICS, prefix: str | None = None) -> None:
    """Create whichever of the project's topics are missing, so every script runs against any cluster."""
    wanted = {(TOPIC_PREFIX if prefix is None else prefix) + name for name in names}
    missing = wanted - set(admin.list_topics())
    if not missing:
        return
    try:
        admin.create_topics([NewTopic(name, TOPIC_PARTITIONS, TOPIC_REPLICATION_FACTOR) for name in sorted(missing)])
        log.info("created topics %s", ", ".join(sorted(missing)))
    except TopicAlreadyExistsError:  # another script created them at the same moment
        pass


def make_producer(transactional_id: str | None = None, **overrides) -> KafkaProducer:
    """Idempotent, acks=all producer that keeps retrying through a broker outage rather than failing records;
    transactional (and initialised) when given a transactional id. It lingers up to 20 ms to fill large batches
    (the loop flushes at the end of each batch, so no message waits for that): about +35% throughput."""
    config = dict(kafka_config(), acks="all", enable_idempotence=True, linger_ms=20, batch_size=256 * 1024,
                  delivery_timeout_ms=300_000, max_block_ms=120_000, transactional_id=transactional_id,
                  retry_backoff_ms=20,  # 100 ms by default: the first transaction after a restart waits on it
                  # A batch's transaction takes well under a second. If its process dies, the broker aborts it after
                  # this long (default 60 s), and until then readers (read_committed) wait behind it.
                  transaction_timeout_ms=10_000)
    config.update(overrides)
    producer = KafkaProducer(**config)
    if transactional_id:
        try:
            producer.init_transactions()  # fences any earlier producer with this id, finishing its open transaction
        except KafkaError:
            producer.close(timeout=1)
            raise
    return producer


def make_consumer(group: str, topics: list[str], instance: str | None = None, **overrides) -> KafkaConsumer:
    """At-least-once consumer: manual commits, start from the beginning when the group is new.
    A static member (group_instance_id) restarted within the session timeout rejoins without waiting out a
    rebalance, which is what keeps an orchestrator restart short."""
    group = TOPIC_PREFIX + group  # a prefix isolates groups as it isolates topics
    config = dict(kafka_config(), group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
                  isolation_level="read_committed",
                  session_timeout_ms=10_000, max_poll_records=500, client_id=group, fetch_max_wait_ms=50)
    if instance:
        config["group_instance_id"] = f"{group}-{instance}"
    config.update(overrides)
    return KafkaConsumer(*[topic(name) for name in topics], **config)


class Stopper:
    """SIGINT and SIGTERM take the same clean path: finish the batch, commit, close. A second signal exits at once."""

    def __init__(self):
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.event.is_set():
            os._exit(128 + signum)
        self.event.set()  # (no logging here: a log call inside a signal handler can collide with one in progress)

    def __bool__(self):
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)


def read_all(name: str, timeout: float = 30.0) -> list:
    """Every record now in a project topic (all partitions, committed only), without joining a group."""
    consumer = KafkaConsumer(**kafka_config(), enable_auto_commit=False, isolation_level="read_committed")
    try:
        partitions = [TopicPartition(topic(name), p) for p in consumer.partitions_for_topic(topic(name)) or ()]
        if not partitions:  # no such topic (yet): nothing in it
            return []
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(partitions)
        records, deadline = [], time.monotonic() + timeout
        while any(consumer.position(p) < end[p] for p in partitions):
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"could not read {topic(name)} to its end within {timeout:.0f} s")
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    except AuthorizationError as error:
        raise refused(f"reading {topic(name)}", error) from None
    finally:
        consumer.close(autocommit=False)


def send(producer: KafkaProducer, name: str, message: Envelope, key: bytes | str | None = None):
    """Produce one envelope to a project topic; returns the future."""
    if isinstance(key, str):
        key = key.encode()
    return producer.send(topic(name), value=message.to_bytes(), key=key)


# ---------------------------------------------------------------------------------------------------------------
# The one loop: every consuming service is run_service(name, inputs, handle).

Output = tuple[str, Envelope]               # (topic name, message)
Triple = tuple[str, Envelope, bytes | str | None]  # (topic name, message, key)
Handler = Callable[[Envelope], list[Output]]


def run_service(name: str, inputs: list[str], handle: Handler, *, group: str | None = None,
                instance: str | None = None, tick: Callable[[], list[Triple]] | None = None,
                transactional: bool = False, dedupe: bool = False, start_like: str | None = None) -> None:
    """Consume inputs, handle each message, produce what it returns, then commit.

    At least once (default): a batch's offsets are committed only after Kafka acknowledged everything the batch
    produced, so a crash re-delivers the batch rather than losing it. Exactly once (transactional=True): what a
    batch produced and its offsets commit in one Kafka transaction, so a crash yields neither loss nor duplicates;
    the transactional id is stable per group and INSTANCE_ID. If delivering a batch fails (the broker is down),
    the batch is handled again once it is back. dedupe=True skips messages whose id was already handled.
    A message the handler rejects (DeadLetter), or that keeps failing, goes to dead_letter with its original bytes
    and the reason, and is committed like any other. Outputs keep the input's key, so one entity stays in order.
    `tick`, if given, is called every loop and returns (topic, message, key) triples to send as well.
    `start_like`: a new group starts from that group's committed offsets instead of the beginning.
    """
    group = group or name
    instance = instance or os.environ.get("INSTANCE_ID", "1")
    stop = Stopper()
    admin = wait_for_kafka(stop, name)
    if admin is None:
        return
    while start_like and not stop:
        try:
            inherit_offsets(admin, group, start_like)
            break
        except AuthorizationError as error:
            raise refused(name, error) from None
        except KafkaError as error:  # e.g. the group coordinator is still loading on a fresh or failing-over cluster
            if not error.retriable:
                raise
            stop.wait(0.5)
    admin.close()
    # The producer is made (and its transactional id fenced) while the consumer joins its group: that takes about
    # 0.15 s off the orchestrator's restart gap.
    transactional_id = f"{TOPIC_PREFIX}{group}-{instance}" if transactional else None
    starting = in_background(make_producer, transactional_id=transactional_id)
    consumer = make_consumer(group, inputs, instance=instance)
    # Join the group only once the input topics' partitions are in the client's metadata: a member that joins
    # right after the topics were created can be assigned nothing, and is not told when they appear.
    while not stop and not all(consumer.partitions_for_topic(topic(name)) for name in inputs):
        stop.wait(0.1)
    producer, seen, unsent, handled = None, Seen() if dedupe else None, [], 0
    log.info("%s: started; consuming %s as group %s%s from %s", name, ", ".join(map(topic, inputs)), group,
             f", exactly once as transactional id {transactional_id}" if transactional else ", at least once",
             BOOTSTRAP_SERVERS)
    last_warning = fenced_at = float("-inf")
    try:
        while not stop:
            try:
                batch = consumer.poll(timeout_ms=100 if tick else 500)
            except AuthorizationError as error:  # may not read an input or use the group: say so and stop
                raise refused(name, error) from None
            except KafkaError as error:  # the broker or group coordinator is away: wait for it, do not crash
                if not error.retriable:
                    raise
                if time.monotonic() - last_warning > 10:
                    log.warning("%s: Kafka unavailable (%s); carrying on when it is back", name, error)
                    last_warning = time.monotonic()
                stop.wait(0.5)
                continue
            unsent += tick() if tick else []
            if not batch and not unsent:
                continue
            outputs, offsets, ids = handle_batch(name, batch, handle, seen)
            try:
                if producer is None:
                    pending, starting = starting, None  # a failed start is not kept: the next try makes a new one
                    producer = pending() if pending else make_producer(transactional_id=transactional_id)
                deliver(producer, consumer, unsent + outputs, offsets, transactional)
            except FencedInstanceIdError:
                raise
            except KafkaError as error:  # includes a transaction the broker aborted (timed out): a new producer
                cause = underlying(error, producer)
                if isinstance(cause, AuthorizationError):  # e.g. writing a topic this user does not own
                    raise refused(name, cause) from None
                if isinstance(cause, ProducerFencedError):  # another producer took this transactional id: once can
                    if time.monotonic() - fenced_at < 30:   # be a timed-out transaction, twice is another copy
                        raise FencedInstanceIdError(str(cause)) from None
                    fenced_at = time.monotonic()
                producer = abandon(producer, transactional, error)
                if producer is None and transactional:  # whether the transaction committed is known once a new
                    producer = settle(stop, name, transactional_id)  # producer with its id has finished or aborted it
                    if producer is None:
                        break
                if not (transactional and offsets and committed_after_all(consumer, offsets)):
                    log.warning("%s: could not deliver a batch (%s); handling it again", name, error)
                    for partition, records in batch.items():
                        if partition in consumer.assignment():  # (a partition taken away goes to its new owner)
                            consumer.seek(partition, records[0].offset)
                    stop.wait(1.0)
                    continue
                log.info("%s: a batch whose commit seemed to fail (%s) had been committed; going on", name, error)
            unsent, handled = [], handled + sum(len(records) for records in batch.values())
            if seen is not None:
                for message_id in ids:
                    seen.add(message_id)
    except FencedInstanceIdError:
        log.error("%s: another process joined group %s as INSTANCE_ID=%s and took over; give each copy its own "
                  "INSTANCE_ID. This one stops (its last batch will be handled again by the other).", name, group, instance)
        raise SystemExit(1) from None
    finally:
        log.info("%s: stopping after %d messages", name, handled)
        consumer.close(autocommit=False)
        if producer:
            discard(producer, timeout=10)


def underlying(error: KafkaError, producer: KafkaProducer | None) -> Exception:
    """The error behind a failed delivery. Inside a transaction kafka-python may report a plain KafkaError
    ("... error state: TopicAuthorizationFailedError"), keeping the real one as the transaction's last error."""
    last = getattr(getattr(producer, "_transaction_manager", None), "last_error", None)
    return last if type(error) is KafkaError and isinstance(last, Exception) else error


def settle(stop: Stopper, name: str, transactional_id: str) -> KafkaProducer | None:
    """A new transactional producer (its start finishes or aborts the old one's open transaction); None if stopped."""
    while not stop:
        try:
            return make_producer(transactional_id=transactional_id)
        except AuthorizationError as error:
            raise refused(name, error) from None
        except KafkaError as error:
            log.warning("could not start a producer as %s (%s); trying again", transactional_id, error)
            stop.wait(1.0)
    return None


def committed_after_all(consumer: KafkaConsumer, offsets: dict) -> bool:
    """True if the group's committed offsets already cover the batch (read once its transaction is settled)."""
    try:
        return all((consumer.committed(tp) or -1) >= meta.offset for tp, meta in offsets.items())
    except KafkaError:
        return False


def inherit_offsets(admin: KafkaAdminClient, group: str, start_like: str) -> None:
    """Give a group that has never committed the committed offsets of another, so that it takes over where that
    group left off rather than re-reading the topic from the beginning (e.g. when one orchestrator is split in two)."""
    group, start_like = TOPIC_PREFIX + group, TOPIC_PREFIX + start_like
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


# Failures worth retrying (a busy database, a network blip); anything else is a bug or bad data: dead-letter it at once.
TRANSIENT = (OSError, sqlite3.OperationalError, KafkaError)
HANDLER_ATTEMPTS = 5
RETRY_BUDGET_S = 30.0  # retries in one poll batch stop after this, well inside the group's max.poll.interval


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


def deliver(producer: KafkaProducer, consumer: KafkaConsumer, outputs: list[Triple], offsets: dict,
            transactional: bool) -> None:
    """Produce a batch's outputs and commit its offsets: in one transaction, or acknowledged first, then committed."""
    if transactional:
        producer.begin_transaction()
        for t, m, key in outputs:
            send(producer, t, m, key)
        if offsets:
            bounded(producer.send_offsets_to_transaction, offsets, consumer.group_metadata())
        bounded(producer.commit_transaction)
        return
    wait_for_acks(producer, [send(producer, t, m, key) for t, m, key in outputs], "batch")
    if offsets:
        consumer.commit(offsets)


def in_background(function: Callable, **kwargs) -> Callable[[], Any]:
    """Start function(**kwargs) in a daemon thread, which never holds up the process's exit; returns a function
    that waits for its result (re-raising its error)."""
    outcome: dict[str, Any] = {}

    def run():
        try:
            outcome["result"] = function(**kwargs)
        except Exception as error:  # noqa: BLE001 -- handed over to whoever waits for the result
            outcome["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result(timeout: float | None = None):
        thread.join(timeout)
        if thread.is_alive():
            raise Stuck(f"did not finish within {timeout:.0f} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
    return result


class Stuck(KafkaTimeoutError):
    """A transaction step that did not finish in time: the producer is given up, not reused."""


# kafka-python 3.0.12 can wait for ever on a transaction step whose coordinator broker died (its sender keeps
# retrying without finding the new coordinator). A step taking longer than this gives up the producer: a new one
# finds the new coordinator and fences the old one, whose open transaction is aborted (or finished, if its commit
# had begun; run_service then checks the committed offsets before handling the batch again).
TRANSACTION_STEP_TIMEOUT_S = 6.0


def bounded(step: Callable, *args) -> None:
    """step(*args), raising Stuck if it takes longer than TRANSACTION_STEP_TIMEOUT_S."""
    try:
        in_background(lambda: step(*args))(timeout=TRANSACTION_STEP_TIMEOUT_S)
    except Stuck as error:
        raise Stuck(f"{step.__name__} {error.args[0]}") from None


def wait_for_acks(producer: KafkaProducer, futures: list, name: str = "") -> None:
    """Send what is batched now and wait until Kafka acknowledged every record (raise if one failed), saying so
    while the broker is away. The producer lingers to build big batches; flushing here adds no latency."""
    while True:
        try:
            producer.flush(timeout=10)
            break
        except KafkaTimeoutError:
            log.warning("%s: Kafka has not acknowledged %d messages for 10 s; still trying (is it up?)", name,
                        sum(not f.is_done for f in futures))
    for future in futures:
        future.get()  # flush() does not raise for a failed record; get() does


def abandon(producer: KafkaProducer | None, transactional: bool, error: Exception) -> KafkaProducer | None:
    """After a failed batch: abort its transaction; if that fails too, or the producer is stuck, drop it so that a
    fresh one is made (which fences this one, aborting its transaction)."""
    if not (producer and transactional):
        return producer
    try:
        if not isinstance(error, Stuck):
            bounded(producer.abort_transaction)
            return producer
    except KafkaError:  # cannot abort now (broker gone, producer fenced)
        pass
    discard(producer)
    return None


def discard(producer: KafkaProducer, timeout: float = 1) -> None:
    """Close a producer without waiting for what it still holds. kafka-python's close() flushes first and, if that
    times out, raises before stopping its sender thread; so stop that thread here (no public call does)."""
    try:
        producer.close(timeout=timeout)
    except KafkaError:
        producer._sender.force_close()  # what close() would have done next


def run_producer(name: str, make: Callable[[], tuple[str, Envelope, str]], count: int | None, rate: float) -> int:
    """Produce make()'s messages at `rate` per second until `count` are sent (None: until stopped)."""
    stop = Stopper()
    admin = wait_for_kafka(stop, name)
    if admin is None:
        return 0
    admin.close()
    producer = make_producer()
    pacer, delivered = Pacer(rate, count), 0
    log.info("%s: producing %s at %s/s to %s", name, "forever" if count is None else count, rate, BOOTSTRAP_SERVERS)
    try:
        while not stop and not pacer.finished:
            futures = [send(producer, *make()) for _ in range(pacer.due())]
            try:
                wait_for_acks(producer, futures, name)
                delivered += len(futures)
            except AuthorizationError as error:  # this user may not write there: nothing was written
                raise refused(name, error) from None
            except KafkaError as error:  # delivery_timeout_ms (5 min) passed: these messages are not in Kafka
                log.error("%s: %d messages could not be delivered: %s", name, len(futures), error)
            stop.wait(pacer.pause())
    finally:
        discard(producer, timeout=10)
        log.info("%s: produced %d messages", name, delivered)
    return delivered


class Pacer:
    """How many messages are due now to keep `rate` per second, up to `count` in all."""

    def __init__(self, rate: float, count: int | None):
        self.rate, self.count, self.sent, self.began = rate, count, 0, time.monotonic()

    @property
    def finished(self) -> bool:
        return self.count is not None and self.sent >= self.count

    def due(self) -> int:
        behind = (time.monotonic() - self.began) * self.rate - self.sent
        if behind > self.rate:  # stalled (Kafka was down): carry on at the rate instead of bursting to catch up
            self.began += (behind - self.rate) / self.rate
        target = int((time.monotonic() - self.began) * self.rate) + 1
        if self.count is not None:
            target = min(target, self.count)
        due, self.sent = max(0, target - self.sent), max(self.sent, target)
        return due

    def pause(self) -> float:
        """Seconds until the next message is due (at most 0.1, so a stop is prompt)."""
        return 0.0 if self.finished else min(0.1, max(0.0, (self.sent / self.rate) - (time.monotonic() - self.began)))
