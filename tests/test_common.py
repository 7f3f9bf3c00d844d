"""Envelope and schema validation: what parse() accepts, and the reason it gives for what it does not."""

import json

import pytest

from common import MAX_MESSAGE_BYTES, DeadLetter, Envelope, Pacer, Seen, dead_letter, handle_batch, new_event, parse

pytestmark = pytest.mark.no_broker  # runs in `make check`


def good_detection() -> Envelope:
    return new_event("security_detection", {"sensor_id": "s-1", "zone": "z-1", "kind": "smoke", "severity": 2}, "t")


def test_a_valid_message_round_trips():
    event = good_detection()
    assert parse(event.to_bytes()) == event
    assert event.workflow_id == event.id


@pytest.mark.parametrize("raw,reason", [
    (None, "empty message"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b'{"id": "x", "type": ', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "over the"),
    (b"[" * 20_000 + b"]" * 20_000, "not valid JSON"),
    (b'"just a string"', "invalid envelope"),
    (b'{"id": "x"}', "invalid envelope: type: Field required"),
    (b'x' * (MAX_MESSAGE_BYTES + 1), "over the 65536-byte limit"),
])
def test_bad_bytes_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(DeadLetter, match=reason):
        parse(raw)


def test_a_wrong_payload_names_the_field():
    data = json.loads(good_detection().to_bytes())
    data["payload"]["severity"] = "very"
    with pytest.raises(DeadLetter, match="invalid security_detection payload: severity"):
        parse(json.dumps(data).encode())


def test_a_missing_workflow_id_is_rejected():
    data = json.loads(good_detection().to_bytes())
    del data["workflow_id"]
    with pytest.raises(DeadLetter, match="workflow_id: Field required"):
        parse(json.dumps(data).encode())


def test_an_unknown_type_parses_so_the_orchestrator_can_say_no_route():
    data = json.loads(good_detection().to_bytes())
    data["type"], data["payload"] = "weather_report", {"rain": True}
    assert parse(json.dumps(data).encode()).type == "weather_report"


def test_a_dead_letter_keeps_the_original_bytes_and_where_they_came_from():
    class Record:
        topic, partition, offset, key = "p_message_stream", 0, 41, b"sensor-1"
    letter = dead_letter(b"\x00bad", "not valid JSON", "orchestrator", Record())
    assert letter.type == "dead_letter"
    assert letter.payload["original_b64"] == "AGJhZA=="
    assert (letter.payload["topic"], letter.payload["offset"], letter.payload["key"]) == ("p_message_stream", 41,
                                                                                           "sensor-1")
    assert letter.payload["reason"] == "not valid JSON" and letter.payload["service"] == "orchestrator"


def test_seen_remembers_ids_up_to_its_capacity():
    seen = Seen(capacity=2)
    assert seen.add("a") and not seen.add("a")
    assert seen.add("b") and seen.add("c")
    assert seen.add("a")  # forgotten: the oldest went when "c" arrived


def test_pacer_never_exceeds_the_count():
    pacer = Pacer(rate=1_000_000, count=5)
    assert sum(pacer.due() for _ in range(3)) == 5 and pacer.finished


def test_parse_gives_handlers_the_payload_as_the_schema_reads_it():
    data = json.loads(good_detection().to_bytes())
    data["payload"]["severity"] = "4"
    assert parse(json.dumps(data).encode()).payload["severity"] == 4
    outcome = json.loads(good_detection().to_bytes())
    outcome["type"], outcome["payload"] = "security_action_failed", {"action": "lock_zone", "zone": "z-1"}
    assert parse(json.dumps(outcome).encode()).payload["detail"] == ""


class Record:
    """Just enough of a Kafka record for the loop's batch handling."""
    topic, partition, key = "t_sec_command", 0, b"k"

    def __init__(self, offset: int, value: bytes):
        self.offset, self.value = offset, value


def test_a_message_that_is_dead_lettered_is_not_remembered_as_handled():
    # so that replaying it once its cause is fixed is handled, not skipped as a repeat
    seen, event, calls = Seen(), good_detection(), []

    def handle(message):
        calls.append(message.id)
        if len(calls) == 1:
            raise DeadLetter("not yet")
        return []
    outputs, _, ids = handle_batch("svc", {"tp": [Record(0, event.to_bytes())]}, handle, seen)
    assert [t for t, _, _ in outputs] == ["dead_letter"] and ids == []
    _, _, ids = handle_batch("svc", {"tp": [Record(1, event.to_bytes())]}, handle, seen)
    assert ids == [event.id] and len(calls) == 2


def test_a_handler_bug_is_dead_lettered_at_once_and_a_transient_failure_is_retried():
    calls = []

    def buggy(message):
        calls.append(1)
        return {}["missing"]
    outputs, _, _ = handle_batch("svc", {"tp": [Record(0, good_detection().to_bytes())]}, buggy, None)
    assert len(calls) == 1
    assert outputs[0][1].payload["reason"] == "handler failed: KeyError: 'missing'"

    def flaky(message):
        calls.append(1)
        if len(calls) < 3:
            raise OSError("busy")
        return []
    calls.clear()
    outputs, _, ids = handle_batch("svc", {"tp": [Record(0, good_detection().to_bytes())]}, flaky, None)
    assert len(calls) == 3 and outputs == [] and len(ids) == 1
