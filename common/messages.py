"""The contract every script shares: one JSON envelope for every message, a pydantic schema per message type (the
engine's own here; the application's come from its contracts, contracts.py, through contract()), and how messages
are made, read back and rejected. Nothing here talks to Kafka, so it is the first thing to read."""

import base64
import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

MAX_MESSAGE_BYTES = 64 * 1024  # larger inputs are dead-lettered, not parsed
MAX_KEY_BYTES = 256            # a key is an entity id (what a workflow is about): anything longer is not one
MAX_ID = 200                   # characters of a message id; derived ids stay within it (see caused_by)
EPOCH, LAST = datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(9998, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


def within_reach(deadline: datetime) -> datetime:
    """A deadline a clock can be compared with: from 1970 to the end of 9998 (UTC), so anywhere on Earth."""
    if not (EPOCH <= deadline <= LAST):
        raise ValueError(f"a deadline from 1970 to 9998 (UTC), not {deadline.isoformat()}")
    return deadline


Deadline = Annotated[AwareDatetime, AfterValidator(within_reach)]


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepTimedOut(Schema):  # the orchestrator's own event: a step's time limit passed without its outcome
    workflow: str = Field(min_length=1, max_length=64)  # which workflow (its name in the routing table)
    step: str = Field(min_length=1, max_length=64)
    attempt: int = Field(ge=1)       # the attempt that got no answer
    attempts: int = Field(ge=1)      # how many tries the step has
    topic: str = Field(min_length=1, max_length=64)  # where its command goes
    command: dict[str, Any]          # the command as it was sent (sent again as it is: same id)


class WorkflowFinished(Schema):  # the orchestrator's own event: a workflow completed or failed
    workflow: str = Field(min_length=1, max_length=64)
    detail: str = Field(default="", max_length=200)


class CommandExpired(Schema):  # a service's word that it read a command after its deadline, and did not act on it
    command: str = Field(min_length=1, max_length=64)  # its type
    deadline: Deadline
    service: str = Field(min_length=1, max_length=64)


class WorkflowRevoked(Schema):  # the orchestrator's word to the services: a person cancelled the workflow
    by: str = Field(max_length=64)
    reason: str = Field(max_length=500)


class OperatorRequest(Schema):  # a person's request about one workflow (workflows.py cancel/retry, the console)
    reason: str = Field(min_length=1, max_length=500)  # why: it stays in the workflow's history
    by: str = Field(min_length=1, max_length=64)        # who asked
    workflow: str = Field(min_length=1, max_length=64)  # its workflow's name (each split orchestrator answers its own)
    step: str = Field(default="", max_length=64)  # (a retry as route() sees it: the engine adds step, topic, command)
    topic: str = Field(default="", max_length=64)
    command: dict[str, Any] = Field(default_factory=dict)


class OperatorAnswer(Schema):  # the orchestrator's answer to a request: done (workflow_cancelled, _retried) or refused
    workflow: str = Field(max_length=64)
    request: str = Field(max_length=64)   # the request's type
    by: str = Field(max_length=64)
    reason: str = Field(max_length=500)   # the request's reason
    detail: str = Field(default="", max_length=500)  # what was done, or why it was refused
    step: str = Field(default="", max_length=64)     # the step tried again (a retry)


SCHEMAS: dict[str, type[Schema]] = {  # message type -> its schema: the engine's own, then the application's
    "step_timed_out": StepTimedOut,
    "command_expired": CommandExpired,
    "workflow_revoked": WorkflowRevoked,
    "workflow_completed": WorkflowFinished,
    "workflow_failed": WorkflowFinished,
    "workflow_cancel_requested": OperatorRequest,
    "workflow_retry_requested": OperatorRequest,
    "workflow_cancelled": OperatorAnswer,
    "workflow_retried": OperatorAnswer,
    "operator_request_refused": OperatorAnswer,
}
ENGINE_TYPES = frozenset(SCHEMAS) | {"dead_letter"}
TYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


class UnknownType(ValueError):
    """A message of a type no contract has a schema for (a slip in the application's code: its text says where)."""


def contract(schemas: dict[str, type[Schema]]) -> dict[str, type[Schema]]:
    """The application's message types and their schemas (contracts.py's MESSAGES), known from now on to every
    function here; the engine's own types cannot be taken. Returns them, as given."""
    for name, schema in schemas.items():
        if not TYPE_NAME.fullmatch(name) or name in ENGINE_TYPES:
            raise ValueError(f"message type {name!r}: " + ("the engine's own; name yours otherwise" if name in
                             ENGINE_TYPES else "a type is lower-case letters, digits and _, 64 at most"))
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise TypeError(f"message type {name!r}: its schema is a pydantic model (a Schema), not {schema!r}")
    SCHEMAS.update(schemas)
    return dict(schemas)


def schema_of(type_: str) -> type[Schema]:
    """The schema of a message type, or UnknownType naming it."""
    try:
        return SCHEMAS[type_]
    except KeyError:
        raise UnknownType(f"no schema for message type {type_!r}: add one to the application's contracts "
                          "(contracts.py, MESSAGES)") from None


class Envelope(BaseModel):
    """Every message on every topic: who, what, which workflow, when, and the typed payload."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, max_length=MAX_ID)    # unique; the dedupe key
    type: str = Field(min_length=1, max_length=64)
    workflow_id: str = Field(min_length=1, max_length=64)  # id of the event that started the workflow
    source: str = Field(min_length=1, max_length=64)    # the script that wrote it
    created_at: datetime
    payload: dict[str, Any]
    cause_id: str | None = Field(default=None, max_length=MAX_ID)  # the message it answers or follows from, if any
    deadline: Deadline | None = None  # a command: no service acts on it after this (its attempt's time limit)
    retry_of: str | None = Field(default=None, max_length=MAX_ID)  # a retried command: the one it sends again (an
    # effect applied for that one counts for this one: see effect_key)

    def effect_key(self) -> str:
        """The key a service applies this command's effect under, once: its id, or a retry's first command's."""
        return self.retry_of or self.id

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Output(NamedTuple):
    """A message to send: (topic name, message), as a handler returns it (a plain pair does too; it keeps the input's
    key), with a key of its own where nothing was consumed (a tick's event, a timer's)."""
    topic: str
    message: Envelope
    key: bytes | str | None = None


class DeadLetter(Exception):
    """Raised while handling a message that must go to dead_letter; the text is the reason."""


def new_event(type_: str, payload: dict, source: str) -> Envelope:
    """A message that starts a workflow: its own id is the workflow id."""
    event_id = str(uuid.uuid4())
    return _make(event_id, type_, payload, source, event_id, None)


def about(workflow_id: str, type_: str, payload: dict, source: str) -> Envelope:
    """A message about a workflow from outside it (a person's request): an id of its own, the workflow's id."""
    return _make(str(uuid.uuid4()), type_, payload, source, workflow_id, None)


def caused_by(cause: Envelope, step: str, type_: str, payload: dict, source: str) -> Envelope:
    """A message caused by another: same workflow, and an id derived from the cause and the step, so that
    handling the same cause twice yields the same id and receivers can drop the repeat. It names its cause (cause_id):
    an outcome so says which command, and so which step, it reports on."""
    return _make(derived_id(cause.id, step), type_, payload, source, cause.workflow_id, cause.id)


def derived_id(cause_id: str, step: str) -> str:
    """The cause's id, a dot and the step; past MAX_ID characters, the cause id's head and a hash of all of it, so
    that a derived id is never what rejects a message (its handler would already have acted on it)."""
    derived = f"{cause_id}.{step}"
    if len(derived) <= MAX_ID:
        return derived
    digest = hashlib.blake2b(cause_id.encode(errors="surrogatepass"), digest_size=12).hexdigest()
    return f"{cause_id[:MAX_ID - len(step) - 27]}~{digest}.{step}"


def _make(id_: str, type_: str, payload: dict, source: str, workflow_id: str, cause_id: str | None) -> Envelope:
    payload = schema_of(type_).model_validate(payload).model_dump()
    return Envelope(id=id_, type=type_, workflow_id=workflow_id, source=source,
                    created_at=datetime.now(timezone.utc), payload=payload, cause_id=cause_id)


def parse(raw: bytes | None) -> Envelope:
    """Bytes from Kafka -> a validated Envelope, or DeadLetter saying what is wrong with them."""
    if raw is None:
        raise DeadLetter("empty message (null value)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise DeadLetter(f"message of {len(raw)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    try:  # (read and checked at once, from the bytes; what is wrong is said by checked_envelope's slower steps)
        envelope = None if LONE_SURROGATE.search(raw) else Envelope.model_validate_json(raw)
    except ValidationError:
        envelope = None
    if envelope is None:
        envelope = checked_envelope(raw)
    schema = SCHEMAS.get(envelope.type)
    if schema is None:  # a type no schema knows: the orchestrator says "no route", a service "unexpected type"
        return envelope
    try:  # handlers get the payload as the schema reads it: defaults filled in, "4" read as 4
        return envelope.model_copy(update={"payload": schema.model_validate(envelope.payload).model_dump()})
    except ValidationError as error:
        raise DeadLetter(f"invalid {envelope.type} payload: {problems(error)}") from None


def checked_envelope(raw: bytes) -> Envelope:
    """The envelope of bytes that need a closer look, step by step, or DeadLetter saying which step failed."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError; RecursionError: absurd nesting
        raise DeadLetter(f"not valid JSON: {str(error)[:200]}") from None
    if LONE_SURROGATE.search(raw) and not writable(data):
        raise DeadLetter("text that cannot be written back out: a lone UTF-16 surrogate escape (\\ud800-\\udfff)")
    try:
        return Envelope.model_validate(data)
    except ValidationError as error:
        raise DeadLetter(f"invalid envelope: {problems(error)}") from None


# A JSON escape of a UTF-16 surrogate. Paired ones decode to one character; a lone one decodes to a str that no
# UTF-8 output can hold, so a handler would act on it and then fail to write its outcome.
LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def writable(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode()
        return True
    except UnicodeEncodeError:
        return False


def check_key(key: bytes | None) -> None:
    """A Kafka key is an entity id; a longer one is a dead letter (and is not copied onto the outputs)."""
    if key is not None and len(key) > MAX_KEY_BYTES:
        raise DeadLetter(f"key of {len(key)} bytes is over the {MAX_KEY_BYTES}-byte limit")


def digest(message: Envelope) -> bytes:
    """What a message says (type, workflow and payload; not its time): the same id with another digest is a conflict."""
    content = json.dumps([message.type, message.workflow_id, message.payload], sort_keys=True, default=str)
    return hashlib.blake2b(content.encode(), digest_size=8).digest()


def problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors()[:5])


def expect(event: Envelope, *types: str) -> None:
    """Services call this first: a command of another type on their topic is a dead letter, not a guess."""
    if event.type not in types:
        raise DeadLetter(f"unexpected type {event.type!r}; this service handles {', '.join(types)}")


class DeadLetterPayload(Schema):
    """What a dead letter says: why, which service, where the input came from, and the input itself."""
    reason: str
    service: str
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    key_b64: str | None = None
    key_truncated: bool = False
    original_b64: str = ""
    original_truncated: bool = False
    original_null: bool = False
    excerpt: str = ""


MAX_KEPT_BYTES = 4 * MAX_MESSAGE_BYTES  # of an original kept in its dead letter: every dead letter fits in a record


def dead_letter(raw: bytes | None, reason: str, service: str, record=None) -> Envelope:
    """A dead_letter message: the reason, where the input came from (a Kafka record), and the original bytes
    (base64) and key, cut to a size that always fits in a Kafka record (and then marked as truncated)."""
    original, key = raw or b"", getattr(record, "key", None) or b""
    payload = {
        "reason": reason[:1000], "service": service,
        "topic": getattr(record, "topic", None), "partition": getattr(record, "partition", None),
        "offset": getattr(record, "offset", None),
        "key": key[:MAX_KEY_BYTES].decode(errors="replace") if record is not None else None,  # to read
        "key_b64": base64.b64encode(key[:MAX_KEPT_BYTES]).decode() if key else None,  # to replay
        "key_truncated": len(key) > MAX_KEPT_BYTES,
        "original_b64": base64.b64encode(original[:MAX_KEPT_BYTES]).decode(),
        "original_truncated": len(original) > MAX_KEPT_BYTES,
        "original_null": raw is None,  # a null value is replayed as null, not as empty bytes
        "excerpt": original[:200].decode(errors="replace"),
    }
    where = f"{payload['topic']}:{payload['partition']}:{payload['offset']}"
    dead_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dead/{service}/{where}"))
    return Envelope(id=dead_id, type="dead_letter", workflow_id=dead_id, source=service,
                    created_at=datetime.now(timezone.utc), payload=payload)
