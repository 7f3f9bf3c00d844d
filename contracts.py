"""The application's contracts, beside its routing table (orchestrator.py): the topics, which script writes and
which reads each, and a schema for every message type the scripts send. A new workflow's topics and message types go
here, never into the engine: common/ knows only its own (the envelope, a step's time-out, a workflow's end, a
person's requests and their answers, dead letters).

Every script imports the names it uses from here; importing this file is what tells the engine these types, so a
message of a type named nowhere is a clear error, not a guess.
"""

from typing import Literal

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)
from pydantic import Field

from common import DEAD_LETTER, MESSAGE_STREAM, Schema, contract  # noqa: F401 -- (the two families: named here too)

# Topics. Each has one writer, so that what a topic carries is bound to who may write it (acls.py grants exactly
# what orchestrator.py's WORKFLOWS says). Events and the services' outcomes go to MESSAGE_STREAM, one member per
# writer (message_stream.security_detector, ...); whatever cannot be handled goes to DEAD_LETTER: both families are
# the engine's (common/), named here too so that a script finds every topic in one place.
SEC_COMMAND = "sec_command"                    # orchestrator -> security_service
NOTIFICATION_COMMAND = "notification_command"  # orchestrator -> notification_service
REPORT_DATA = "report_data"                    # orchestrator -> reporting_service
UNIT_COMMAND = "unit_command"                  # orchestrator -> unit_event_producer
THIRD_PARTY = "third_party"                    # notification_service -> external systems (the outbound feed)


class SecurityDetection(Schema):  # security_detector -> message_stream: starts the security workflow
    sensor_id: str = Field(min_length=1, max_length=64)
    zone: str = Field(min_length=1, max_length=64)
    kind: Literal["motion", "door_forced", "glass_break", "smoke"]
    severity: int = Field(ge=1, le=5)


class SecurityCommand(Schema):  # orchestrator -> sec_command
    action: Literal["inspect", "lock_zone", "dispatch_guard", "unlock_zone"]
    zone: str = Field(min_length=1, max_length=64)
    sensor_id: str | None = Field(default=None, min_length=1, max_length=64)  # the detection's (none: a later step's)
    severity: int | None = Field(default=None, ge=1, le=5)


class SecurityOutcome(Schema):  # security_service -> message_stream: the action done, or failed
    action: str = Field(max_length=32)
    zone: str = Field(max_length=64)
    detail: str = Field(default="", max_length=200)


class NotificationCommand(Schema):  # orchestrator -> notification_command
    channel: Literal["sms", "email", "pager"]
    recipient: str = Field(min_length=1, max_length=96)  # e.g. "on-duty-" and a zone
    text: str = Field(max_length=500)


class NotificationDelivered(Schema):  # notification_service -> third_party
    channel: str = Field(max_length=16)
    recipient: str = Field(max_length=96)
    text: str = Field(max_length=500)


class ReportData(Schema):  # orchestrator -> report_data
    workflow: Literal["security", "unit"]
    category: str = Field(min_length=1, max_length=32)  # detection kind or unit status
    entity: str = Field(min_length=1, max_length=64)    # sensor or unit id
    zone: str = Field(default="", max_length=64)


class UnitEvent(Schema):  # unit_event_producer -> message_stream: starts the unit workflow
    unit_id: str = Field(min_length=1, max_length=64)
    status: Literal["heartbeat", "battery_low", "offline", "tamper"]
    battery: int = Field(ge=0, le=100)


class UnitCommand(Schema):  # orchestrator -> unit_command
    unit_id: str = Field(min_length=1, max_length=64)
    command: Literal["acknowledge", "power_save", "reboot", "lockdown"]


class UnitCommandApplied(Schema):  # unit_event_producer -> message_stream
    unit_id: str = Field(max_length=64)
    command: str = Field(max_length=32)
    state: str = Field(max_length=32)


MESSAGES = contract({  # message type -> its schema
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
})
