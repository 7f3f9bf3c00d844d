"""The contract every script shares: one JSON envelope for every message, a pydantic schema per message type, and how
messages are made, read back and rejected. Nothing here talks to Kafka, so it is the first thing to read."""

import base64
import json
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_MESSAGE_BYTES = 64 * 1024  # larger inputs are dead-lettered, not parsed


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


Output = tuple[str, Envelope]  # (topic name, message): what a handler returns for each message it sends


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
    """A dead_letter message: the reason, where the input came from (a Kafka record), and the original bytes
    (base64)."""
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
