"""Bad input, fuzzed with hypothesis and hand-picked: no service crashes, each bad message is dead-lettered once with a
reason, and the good messages sent in between are all handled."""

import json

import pytest
from helpers import detection, ids_of
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common import MESSAGE_STREAM, DeadLetter, parse
from contracts import NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND

INPUT_TOPICS = [MESSAGE_STREAM, SEC_COMMAND, NOTIFICATION_COMMAND, REPORT_DATA, UNIT_COMMAND]


def good() -> dict:
    return json.loads(detection().to_bytes())


def mutated(change) -> bytes:
    data = good()
    change(data)
    return json.dumps(data).encode()


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def with_surrogate(field: str) -> bytes:
    """A payload field holding a lone UTF-16 surrogate escape: valid JSON that no output can hold."""
    data = good()
    data["payload"][field] = "SURROGATE"
    return json.dumps(data).encode().replace(b'"SURROGATE"', b'"x\\ud800"')


HAND_PICKED = [
    b"\x00\xff\xfe binary garbage",
    json.dumps(good()).encode()[:57],                                          # truncated JSON
    nested(50_000),                                                            # deeply nested JSON
    mutated(lambda d: d["payload"].update(sensor_id="x" * 200_000)),           # huge string
    mutated(lambda d: d["payload"].update(severity="very")),                   # wrong type
    mutated(lambda d: d.update(type="weather_report")),                        # unknown type
    mutated(lambda d: d.pop("workflow_id")),                                   # missing workflow_id
    b"",
    with_surrogate("zone"),                                                    # lone surrogate
    mutated(lambda d: d.update(id="i" * 201)),                                 # overlong id
]

bad_messages = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 200).map(lambda n: json.dumps(good()).encode()[:n]),
    st.integers(500, 60_000).map(nested),
    st.integers(1, 300_000).map(lambda n: mutated(lambda d: d["payload"].update(zone="z" * n)) if n > 64
                                 else mutated(lambda d: d["payload"].update(zone=n))),
    st.sampled_from(["id", "type", "workflow_id", "source", "created_at", "payload"]).map(
        lambda field: mutated(lambda d: d.pop(field))),
    st.sampled_from([None, 7, [], "", {"x": 1}]).map(lambda v: mutated(lambda d: d["payload"].update(severity=v))),
    st.text(min_size=1, max_size=30).map(lambda t: mutated(lambda d: d.update(type=t + "_unknown"))),
    st.sampled_from(["zone", "sensor_id", "kind"]).map(with_surrogate),
    st.integers(201, 5000).map(lambda n: mutated(lambda d: d.update(id="i" * n))),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children,
                                                                                     max_size=4),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
)


@given(st.one_of(st.binary(max_size=500), bad_messages))
@settings(max_examples=400, deadline=None)
def test_parse_accepts_or_rejects_with_a_reason_and_never_crashes(raw):
    try:
        parse(raw)
    except DeadLetter as reason:
        assert str(reason)


keys = st.one_of(st.none(), st.binary(max_size=64), st.integers(257, 400_000).map(lambda n: b"k" * n))  # and oversized


@given(st.lists(st.tuples(bad_messages, st.sampled_from(INPUT_TOPICS), keys), min_size=1, max_size=8))
@example([(raw, INPUT_TOPICS[i % len(INPUT_TOPICS)], None) for i, raw in enumerate(HAND_PICKED)]
         + [(b"8 bytes!", name, b"\x00" * 300_000) for name in INPUT_TOPICS])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_bad_input_is_dead_lettered_once_and_good_input_still_flows(running_system, producer, bad):
    # Given every service running; When bad messages arrive on their input topics, each followed by a good detection
    dead, stream, third_party = running_system
    sent_bad, sent_good = set(), set()
    for raw, name, key in bad:
        meta = producer(name, raw, key=key)
        sent_bad.add((meta.topic, meta.offset))
        good_event = detection()
        producer(MESSAGE_STREAM, good_event)
        sent_good.add(good_event.workflow_id)
    # Then each bad message is in dead_letter exactly once, with a reason
    letters = dead.read_until(lambda ms: sent_bad <= {(m.payload["topic"], m.payload["offset"]) for m in ms}, timeout=90)
    mine = [m for m in letters if (m.payload["topic"], m.payload["offset"]) in sent_bad]
    assert len(mine) == len(sent_bad) and all(m.payload["reason"] for m in mine)
    TOTALS["bad"] += len(sent_bad)
    TOTALS["good"] += len(sent_good)
    # And every good detection sent in between completes its workflow
    stream.read_until(lambda ms: sent_good <= ids_of(ms, "security_action_completed"), timeout=90)
    third_party.read_until(lambda ms: sent_good <= ids_of(ms, "notification_delivered"), timeout=90)


TOTALS = {"bad": 0, "good": 0}


@pytest.fixture
def running_system(scripts, topics):
    """All services at Example 3, and readers of dead_letter, message_stream and third_party. Function-scoped fixtures
    are made once per test, so every hypothesis example of a test runs against the same system."""
    processes = [scripts.start(name) for name in ("orchestrator.py", "security_service.py", "notification_service.py",
                                                  "reporting_service.py")]
    processes.append(scripts.start("unit_event_producer.py", "--count", "0"))
    yield topics("dead_letter"), topics(MESSAGE_STREAM), topics(THIRD_PARTY)
    assert all(p.poll() is None for p in processes), "a service exited on bad input"
    print(f"fuzz: bad messages sent={TOTALS['bad']} each dead-lettered once; good detections={TOTALS['good']} all completed")
