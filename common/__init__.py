"""What every script shares, one concern a module; this file only hands the names on, so scripts keep writing
`from common import ...`. Read them in this order:

  messages    the envelope, a schema per message type, new_event / caused_by / parse / dead_letter (no Kafka)
  settings    one frozen Settings from the environment; topic names; group and transactional-id naming; logging
  clients     kafka-python producers, consumers and admin made the project's way; topics; read_all; refusals
  handling    one poll batch: parse, skip repeats, call the handler with retries, dead-letter what fails
  delivery    a batch's outputs and offsets, in one transaction or acknowledged then committed, and recovery
  service     run_service: consume -> handle -> produce, one batch at a time
  copies      the copies of a service in its group: leave when stopped, end a gone copy's transaction
  state       state that survives a restart: handled ids and workflows, kept in a changelog topic per group
  waiting     the stop signal, a poll that outlives an outage, a pause that says what it waits for
  producing   run_producer, the event sources' loop
  workarounds every workaround of a kafka-python behaviour, each saying which and why
  tracing     OpenTelemetry: a trace per workflow, its context in the record headers (off unless asked)
  metrics     Prometheus metrics on METRICS_PORT (off unless a port is given)
"""

try:
    import kafka  # noqa: F401 -- (only to say in one line what is missing, instead of a traceback)
    import pydantic  # noqa: F401
except ModuleNotFoundError as missing:
    raise SystemExit(f"{missing.name} is not installed here: run the scripts in the project's virtual environment "
                     f"(`make check` makes it in .venv; then `. .venv/bin/activate`)") from None

from common.clients import (answers_kafka, ensure_topics, make_consumer, make_producer, read_all, refused, send,
                            wait_for_acks, wait_for_kafka)
from common.handling import Handler, Triple, Unavailable, handle_batch
from common.messages import (MAX_MESSAGE_BYTES, SCHEMAS, DeadLetter, Envelope, Output, caused_by, dead_letter, expect,
                             new_event, parse)
from common.producing import Pacer, run_producer
from common.service import run_service
from common.state import State
from common.waiting import Stopper
from common.settings import (ALL_TOPICS, DEAD_LETTER, MESSAGE_STREAM, NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND,
                             SETTINGS, SINGLE_WRITER_TOPICS, THIRD_PARTY, UNIT_COMMAND, Settings, family_of, setup_logging,
                             topic, written_by)
from common.workarounds import discard

__all__ = ["answers_kafka", "ensure_topics", "make_consumer", "make_producer", "read_all", "refused", "send",
           "wait_for_acks", "wait_for_kafka", "Handler", "State", "Triple", "Unavailable", "handle_batch", "MAX_MESSAGE_BYTES",
           "SCHEMAS", "DeadLetter", "Envelope", "Output", "caused_by", "dead_letter", "expect", "new_event", "parse",
           "Pacer", "Stopper", "run_producer", "run_service", "ALL_TOPICS", "DEAD_LETTER", "MESSAGE_STREAM",
           "NOTIFICATION_COMMAND", "REPORT_DATA", "SEC_COMMAND", "SETTINGS", "THIRD_PARTY", "UNIT_COMMAND", "Settings",
           "setup_logging", "topic", "discard", "SINGLE_WRITER_TOPICS", "written_by", "family_of"]
