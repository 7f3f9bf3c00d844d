"""A person's request about one workflow (cancel, retry), sent as the orchestrator reads it: to message_stream.operator,
in the partition of the workflow's state, and its answer awaited. workflows.py and the console send it."""

import json
import os
import time
from dataclasses import replace

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition
from pydantic import ValidationError

from common import MESSAGE_STREAM, OPERATOR, SETTINGS, Envelope, Settings, about, derived_id, make_producer, refused, written_by
from views.workflows import Located, located, one, trace_of


class BadRequest(ValueError):
    """A request that cannot be sent as asked: an empty or overlong reason or name (the text says which)."""


def request(kind: str, wanted: str, reason: str, by: str, wait_s: float = 5.0, settings: Settings = SETTINGS,
            found: dict[str, Located] | None = None) -> tuple[bool, str]:
    """Ask the orchestrator to cancel or retry one workflow (its id, or a beginning only it has): (granted, its
    answer said in a line) once it answers, or (False, why not) after `wait_s` seconds (the request waits in Kafka
    all the same). `found`: the workflows, if read already."""
    located_ = located(settings) if found is None else found
    [(_, granted, said)] = requests(kind, [one(located_, wanted)], reason, by, wait_s, settings, located_)
    return granted, said


def requests(kind: str, ids: list[str], reason: str, by: str, wait_s: float, settings: Settings,
             found: dict[str, Located]) -> list[tuple[str, bool, str]]:
    """One request per workflow, each to message_stream.operator in the partition of the workflow's state (so to the
    orchestrator that holds it), all sent before any answer is awaited: (workflow id, granted, its answer said in a
    line) for each, in the order asked; one not answered within `wait_s` seconds says so (it waits in Kafka)."""
    events = {workflow_id: asked(kind, workflow_id, found[workflow_id].workflow["type"], reason, by) for workflow_id in ids}
    answers = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, isolation_level="read_committed")
    producer = make_producer(settings=operator_settings(settings))
    try:
        inbox = settings.topic(written_by(MESSAGE_STREAM, "orchestrator"))
        partitions = [TopicPartition(inbox, p) for p in answers.partitions_for_topic(inbox) or ()]
        answers.assign(partitions)
        answers.seek_to_end(*partitions)
        for partition in partitions:
            answers.position(partition)  # (from here: their answers come after the requests)
        topic, sent = settings.topic(written_by(MESSAGE_STREAM, OPERATOR)), []
        for workflow_id, event in events.items():
            state_partition, workflow, raw = found[workflow_id]
            key = (workflow.get("key") or "").encode(errors="surrogateescape") or None
            trace = trace_of(raw)
            headers = [("traceparent", trace.encode())] if trace else None  # (tracing on: the request joins its trace)
            sent.append(producer.send(topic, event.to_bytes(), key=key, partition=state_partition, headers=headers))
        for future in sent:
            future.get(timeout=30)
        said = awaited(answers, {derived_id(event.id, "answer"): workflow_id for workflow_id, event in events.items()},
                       wait_s)
    except KafkaError as error:
        raise refused(f"asking the orchestrator to {kind} {', '.join(ids[:3])}{' ...' * (len(ids) > 3)}", error,
                      settings) from None
    finally:
        producer.close(timeout=5)
        answers.close(autocommit=False)
    return [(workflow_id, *said.get(workflow_id, (False, (
        f"workflow {workflow_id}: the request was sent, but the orchestrator did not answer within {wait_s:.0f} s (is "
        f"it running?); it waits in Kafka and is answered when the orchestrator reads it")))) for workflow_id in ids]


def asked(kind: str, workflow_id: str, type_: str, reason: str, by: str) -> Envelope:
    """A request event; BadRequest if its reason or name cannot be sent (empty, overlong)."""
    try:
        return about(workflow_id, f"workflow_{kind}_requested", {"reason": reason, "by": by, "workflow": type_}, OPERATOR)
    except ValidationError as error:
        wrong = error.errors()[0]
        said = "give one (it is kept in the workflow's history)" if wrong["type"] == "string_too_short" else wrong["msg"]
        raise BadRequest(f"{wrong['loc'][0]}: {said}; nothing was sent") from None


def awaited(answers: KafkaConsumer, wanted: dict[str, str], wait_s: float) -> dict[str, tuple[bool, str]]:
    """The orchestrator's answers to requests (`wanted`: answer id -> workflow id), each said in a line: workflow id
    -> (granted, the line), for those answered within `wait_s` seconds."""
    until, said = time.monotonic() + wait_s, {}
    while time.monotonic() < until and len(said) < len(wanted):
        for records in answers.poll(timeout_ms=200).values():
            for record in records:
                answer = json.loads(record.value)
                if (workflow_id := wanted.get(answer.get("id"))) is not None:
                    payload = answer["payload"]
                    granted = answer["type"] != "operator_request_refused"
                    said[workflow_id] = granted, (f"workflow {workflow_id}: {'done' if granted else 'refused'}: "
                                                  f"{payload['detail']} (asked by {payload['by']}: {payload['reason']})")
    return said


def operator_settings(settings: Settings = SETTINGS) -> Settings:
    """Settings to send a person's request with: as the operator user where KAFKA_OPERATOR_USERNAME says so."""
    user = os.environ.get("KAFKA_OPERATOR_USERNAME")
    if not user:
        return settings
    return replace(settings, sign_in={**settings.sign_in, "sasl_plain_username": user,
                                       "sasl_plain_password": os.environ.get("KAFKA_OPERATOR_PASSWORD", "")})
