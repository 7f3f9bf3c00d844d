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

from common import MESSAGE_STREAM, OPERATOR, SETTINGS, Settings, about, derived_id, make_producer, refused, written_by
from views.workflows import Located, located, one, trace_of


class BadRequest(ValueError):
    """A request that cannot be sent as asked: an empty or overlong reason or name (the text says which)."""


def request(kind: str, wanted: str, reason: str, by: str, wait_s: float = 5.0, settings: Settings = SETTINGS,
            found: dict[str, Located] | None = None) -> tuple[bool, str]:
    """Ask the orchestrator to cancel or retry one workflow: the request goes to message_stream.operator, in the
    partition of the workflow's state (so to the orchestrator that holds it); (granted, its answer said in a line)
    once it answers, or (False, why not) after `wait_s` seconds (the request waits in Kafka all the same). `found`:
    the workflows, if read already."""
    located_ = located(settings) if found is None else found
    workflow_id = one(located_, wanted)
    state_partition, workflow, raw = located_[workflow_id]
    trace = trace_of(raw)
    try:
        event = about(workflow_id, f"workflow_{kind}_requested", {"reason": reason, "by": by, "workflow": workflow["type"]},
                      OPERATOR)
    except ValidationError as error:  # (an empty or overlong reason, say)
        wrong = error.errors()[0]
        raise BadRequest(f"{wrong['loc'][0]}: {wrong['msg']}; nothing was sent") from None
    answers = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, isolation_level="read_committed")
    producer = make_producer(settings=operator_settings(settings))
    try:
        inbox = settings.topic(written_by(MESSAGE_STREAM, "orchestrator"))
        partitions = [TopicPartition(inbox, p) for p in answers.partitions_for_topic(inbox) or ()]
        answers.assign(partitions)
        answers.seek_to_end(*partitions)
        for partition in partitions:
            answers.position(partition)  # (from here: its answer comes after the request)
        topic = settings.topic(written_by(MESSAGE_STREAM, OPERATOR))
        key = (workflow.get("key") or "").encode(errors="surrogateescape") or None
        headers = [("traceparent", trace.encode())] if trace else None  # (tracing on: the request joins its trace)
        producer.send(topic, event.to_bytes(), key=key, partition=state_partition, headers=headers).get(timeout=30)
        return awaited(answers, derived_id(event.id, "answer"), workflow_id, wait_s)
    except KafkaError as error:
        raise refused(f"asking the orchestrator to {kind} {workflow_id}", error, settings) from None
    finally:
        producer.close(timeout=5)
        answers.close(autocommit=False)


def awaited(answers: KafkaConsumer, answer_id: str, workflow_id: str, wait_s: float) -> tuple[bool, str]:
    """The orchestrator's answer to a request, said in a line: (granted, the line)."""
    until = time.monotonic() + wait_s
    while time.monotonic() < until:
        for records in answers.poll(timeout_ms=200).values():
            for record in records:
                answer = json.loads(record.value)
                if answer.get("id") == answer_id:
                    said = answer["payload"]
                    granted = answer["type"] != "operator_request_refused"
                    return granted, (f"workflow {workflow_id}: {'done' if granted else 'refused'}: {said['detail']} "
                                     f"(asked by {said['by']}: {said['reason']})")
    return False, (f"workflow {workflow_id}: the request was sent, but the orchestrator did not answer within "
                   f"{wait_s:.0f} s (is it running?); it waits in Kafka and is answered when the orchestrator reads it")


def operator_settings(settings: Settings = SETTINGS) -> Settings:
    """Settings to send a person's request with: as the operator user where KAFKA_OPERATOR_USERNAME says so."""
    user = os.environ.get("KAFKA_OPERATOR_USERNAME")
    if not user:
        return settings
    return replace(settings, sign_in={**settings.sign_in, "sasl_plain_username": user,
                                       "sasl_plain_password": os.environ.get("KAFKA_OPERATOR_PASSWORD", "")})
