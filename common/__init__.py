"""What every script shares, one concern a module; this file only hands the names on, so scripts write
`from common import ...` and never reach inside. Read them in this order:

  messages     the envelope, the engine's own schemas and contract() for the application's (contracts.py),
               new_event / caused_by / about / parse / dead_letter (no Kafka)
  settings     one frozen Settings from the environment; the engine's topics; group and transactional-id naming; logging
  clients      kafka-python producers, consumers and admin made the project's way; topics; read_all; refusals
  service      a consuming service declared (run_service, Service) and started
  loop         its loop, a batch at a time: poll -> handle -> deliver -> commit
  firing       its timers, fired after a batch is handled (a step's time limit)
  handling     one poll batch: parse, skip repeats (dedupe), call the handler with retries, dead-letter what fails
  delivery     a batch's outputs and offsets, in one transaction or acknowledged then committed, and recovery
  state        state that survives a restart: a keyed store per group, its changes committed with the work
  changelog    the Kafka side of that state: the compacted state.<group> topic, made and read back
  copies       the copies of a service in its group: leave when stopped, end a gone copy's transaction
  waiting      the stop signal, a poll that outlives an outage, a pause that says what it waits for
  gate         what stands between a command and its effect: its workflow cancelled, its deadline passed
  effects      an action outside Kafka, applied once per command (a SQLite file of the effects applied)
  producing    run_producer, the event sources' loop
  workflow     the workflow table's shape (Workflow, Step: which step follows which) and what can be asked of it
  orchestration  a workflow's life: routed events at the stage it started under, its timers; late answers
  progress     a workflow's entry after each event: the step reported on, the steps sent, attempts, its end
  takeover     one orchestrator split in two or joined back: the overlap refusal, offsets and state taken over
  dry_run      the orchestrator's preview of a routing change on the recorded message_stream
  orchestrator_cli  the orchestrator's flags and what it runs, handed the table and route()
  workarounds  every workaround of a kafka-python behaviour, each saying which and why
  tracing      OpenTelemetry: a trace per workflow, its context in the record headers (off unless asked)
  metrics      Prometheus metrics on METRICS_PORT (off unless a port is given)
  installed    the requirements asked for first: outside the virtual environment, one line instead of a traceback
"""

from common import installed  # noqa: F401 -- (first: outside the virtual environment, one line, not a traceback)

from common.changelog import Latest, Record, changelog, ensure_changelog, latest_entries
from common.clients import (SESSION_TIMEOUT_MS, answers_kafka, ensure_topics, make_consumer, make_producer, read_all,
                            read_from, refused, send, wait_for_acks, wait_for_kafka)
from common.effects import Effects
from common.gate import Expired, Gate, Revocations
from common.handling import Handler, Unavailable, handle_batch, handle_record
from common.messages import (MAX_MESSAGE_BYTES, SCHEMAS, DeadLetter, DeadLetterPayload, Envelope, Output, Schema,
                             UnknownType, about, caused_by, contract, dead_letter, derived_id, expect, new_event, parse)
from common.operating import not_retriable
from common.orchestration import STATES, WORKFLOW, Limits, Orchestration, is_workflow
from common.orchestrator_cli import run_orchestrator
from common.producing import Pacer, run_producer
from common.service import Service, run_service, serve
from common.settings import (DEAD_LETTER, FAMILIES, MESSAGE_STREAM, REVOKED, SETTINGS, Settings, family_of,
                             setup_logging, topic, written_by)
from common.state import State, Store
from common.takeover import replaced
from common.waiting import Stopper
from common.workarounds import discard, resumed
from common.workflow import (ANSWERS, FINISHED, OPERATOR, REQUESTS, Step, Workflow, command_topics, first_steps,
                             group_for, orchestrator_groups, owns, problems, readers_and_writers, reports_done,
                             senders, services, single_writer_topics, stages, step_sent, topics)

__all__ = ["Effects", "Expired", "Gate", "Revocations", "Latest", "Record", "changelog", "ensure_changelog",
           "latest_entries", "SESSION_TIMEOUT_MS", "answers_kafka",
           "ensure_topics", "make_consumer", "make_producer", "read_all", "read_from", "refused", "send", "wait_for_acks",
           "wait_for_kafka", "Handler", "Unavailable", "handle_batch", "handle_record", "MAX_MESSAGE_BYTES",
           "SCHEMAS", "DeadLetter", "DeadLetterPayload", "Envelope", "Output", "Schema", "UnknownType", "about",
           "caused_by", "contract", "derived_id", "dead_letter", "expect",
           "new_event", "parse", "not_retriable", "STATES", "WORKFLOW", "Limits", "Orchestration", "is_workflow",
           "run_orchestrator",
           "Pacer", "run_producer", "Service", "run_service", "serve", "DEAD_LETTER", "FAMILIES",
           "MESSAGE_STREAM", "REVOKED", "SETTINGS", "Settings", "family_of", "setup_logging", "topic", "written_by", "State",
           "Store", "replaced", "Stopper", "discard", "resumed", "Step", "Workflow", "command_topics", "first_steps", "group_for",
           "orchestrator_groups", "owns", "problems", "readers_and_writers", "reports_done", "senders", "services",
           "single_writer_topics", "stages", "step_sent", "topics", "FINISHED", "ANSWERS", "OPERATOR", "REQUESTS"]
