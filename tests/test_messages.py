"""Envelope and schema validation: what parse() accepts, and the reason it gives for what it does not."""

import json
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from common import MAX_MESSAGE_BYTES, DeadLetter, Envelope, Pacer, Unavailable, dead_letter, handle_batch, new_event, parse
from common.settings import Settings
from common.packing import SAMPLES
from common.state import Store
from common.timers import Timers
from common.messages import derived_id

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


def memory(dedupe: bool = True) -> Store:
    """A store kept in memory only (an at-least-once service's), its partition 0 restored."""
    store = Store("svc", Settings(state_retention_s=60), durable=False, dedupe=dedupe)
    store.restore({0})
    return store


def remember(store: Store, handled: list) -> None:
    store.commit([change for item in handled for change in item.changes])


def test_state_changes_count_only_once_committed_and_uncommitted_timers_fire_again():
    store = memory()
    state = store.view(0)
    state.put("workflow/w1", {"step": "pending"}, due=100.0)
    assert state.get("workflow/w1") == {"step": "pending"} and store.due(1000.0) == []  # (not committed yet)
    store.abandon()
    assert store.view(0).get("workflow/w1") is None
    store.commit(state.changes)
    assert store.due(99.0) == [] and store.due(100.0) == [(0, "workflow/w1")] and store.due(100.0) == []
    store.abandon()  # the batch with the timer's work failed: it is due again
    assert store.due(100.0) == [(0, "workflow/w1")]
    many = store.view(0)  # (at most `limit` a time, none of a partition still catching up)
    for n in range(3):
        many.put(f"t{n}", {}, due=50.0)
    store.commit(many.changes)
    assert store.due(60.0, skip={0}) == [] and len(store.due(60.0, limit=2)) == 2 and len(store.due(60.0)) == 1
    store.commit([])
    twice = store.view(0)  # (an entry put twice in a batch with one due time has two timers: it fires once)
    twice.put("workflow/w2", {}, due=200.0)
    twice.put("workflow/w2", {}, due=200.0)
    store.commit(twice.changes)
    assert store.due(200.0) == [(0, "workflow/w2")]
    later = store.view(0)
    later.put("workflow/w1", {"step": "done"})
    store.commit(later.changes)
    assert store.due(10_000.0) == [] and store.view(0).get("workflow/w1") == {"step": "done"}


def test_entries_are_packed_in_memory_once_enough_are_seen_and_read_back_as_they_were_stored():
    store = memory()
    state = store.view(0)
    values = [{"workflow_id": f"{n:08d}-0000", "state": "running", "steps": {"acted": {"attempts": 1}}, "pad": "x" * 300}
              for n in range(SAMPLES + 3)]
    for n, value in enumerate(values):
        state.put(f"workflow/{n}", value, due=100.0 + n)
    stored = {change.key: change.stored for change in state.changes}
    store.commit(state.changes)
    kept = store.entries[0]
    assert all(kept[key] == stored[key] for key in list(kept)[:SAMPLES])  # (the first ones make the dictionary)
    assert all(len(kept[key]) < len(stored[key]) / 3 for key in list(kept)[SAMPLES:])
    assert [store.view(0).get(f"workflow/{n}") for n in range(len(values))] == values
    assert store.count("workflow/", b'"state":"running"') == len(values)
    assert store.due(100.0 + SAMPLES + 1) == [(0, f"workflow/{n}") for n in range(SAMPLES + 2)]


def test_a_timer_fires_within_a_tenth_of_a_second_after_its_time_never_before():
    timers = Timers()
    for due, key in [(10.05, "b"), (10.0, "a"), (10.1, "c"), (10.1000001, "d")]:
        timers.push(due, 0, key)
    assert not timers.any_due(9.99) and timers.take(9.99, set(), 10) == []
    assert [key for *_, key in timers.take(10.0, set(), 10)] == ["a"]
    assert [key for *_, key in timers.take(10.1, set(), 10)] == ["b", "c"]  # (b: 0.05 s late at most)
    assert timers.take(10.1, {0}, 10) == [] and [key for *_, key in timers.take(10.2, set(), 1)] == ["d"]


def test_state_entries_not_written_for_the_retention_expire_and_a_partition_taken_away_is_forgotten():
    store = memory()
    state = store.view(0)
    state.put("a", 1)
    store.commit(state.changes)
    assert store.expire(time.time()) == 0 and store.expire(time.time() + 61) == 1 and store.view(0).get("a") is None
    store.forget({0})
    assert store.loaded == set()


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
    topic, partition = "t_sec_command", 0

    def __init__(self, offset: int, value: bytes | None, key: bytes | None = b"k"):
        self.offset, self.value, self.key = offset, value, key


class Running:
    """A stop that never comes."""
    def __bool__(self):
        return False

    def wait(self, seconds):
        return False


def batch_of(*values, key=b"k") -> dict:
    return {"tp": [Record(offset, value, key) for offset, value in enumerate(values)]}


def letters(handled) -> list[dict]:
    return [json.loads(value)["payload"] for item in handled for topic, value, *_ in item.outputs if topic == "dead_letter.svc"]


def test_a_message_that_is_dead_lettered_is_not_remembered_as_handled():
    # so that replaying it once its cause is fixed is handled, not skipped as a repeat
    seen, event, calls = memory(), good_detection(), []

    def handle(message, state):
        calls.append(message.id)
        if len(calls) == 1:
            raise DeadLetter("not yet")
        return []
    handled, _ = handle_batch("svc", batch_of(event.to_bytes()), handle, seen, Running())
    assert letters(handled)[0]["reason"] == "not yet" and handled[0].changes == []
    remember(seen, handled)
    handled, _ = handle_batch("svc", batch_of(event.to_bytes()), handle, seen, Running())
    assert handled[0].changes[0].key == "seen/" + event.id and len(calls) == 2


def test_a_handler_bug_is_dead_lettered_at_once_and_a_transient_failure_is_retried():
    calls = []

    def buggy(message, state):
        calls.append(1)
        return {}["missing"]
    handled, _ = handle_batch("svc", batch_of(good_detection().to_bytes()), buggy, None, Running())
    assert len(calls) == 1 and letters(handled)[0]["reason"] == "handler failed: KeyError: 'missing'"

    def flaky(message, state):
        calls.append(1)
        if len(calls) < 3:
            raise OSError("busy")
        return []
    calls.clear()
    handled, holdup = handle_batch("svc", batch_of(good_detection().to_bytes()), flaky, memory(), Running())
    assert len(calls) == 3 and holdup is None and handled[0].outputs == [] and handled[0].changes


def test_a_resource_that_stays_unavailable_holds_the_batch_up_there_and_dead_letters_nothing():
    def store(message, state):
        if message.payload["zone"] == "z-2":
            raise Unavailable("the store is locked")
        return []
    first, second, third = (new_event("security_detection", {"sensor_id": "s", "zone": z, "kind": "smoke",
                                                             "severity": 2}, "t") for z in ("z-1", "z-2", "z-3"))
    handled, holdup = handle_batch("svc", batch_of(first.to_bytes(), second.to_bytes(), third.to_bytes()), store,
                                   None, Running())
    assert holdup == "the store is locked" and [item.record.offset for item in handled] == [0] and not letters(handled)


def test_a_repeat_is_ignored_and_the_same_id_with_other_content_is_a_dead_letter():
    seen, event = memory(), good_detection()
    changed = event.model_copy(update={"payload": {**event.payload, "zone": "z-9", "severity": 5}})
    handled, _ = handle_batch("svc", batch_of(event.to_bytes(), event.to_bytes(), changed.to_bytes()),
                              lambda message, state: [], seen, Running())
    assert [bool(item.changes) for item in handled] == [True, False, False]
    assert letters(handled)[0]["reason"] == f"id {event.id!r} was handled before with different content; not handled again"


def test_input_that_cannot_be_written_back_out_is_rejected_before_any_handler_runs():
    raw = good_detection().to_bytes().replace(b'"zone":"z-1"', b'"zone":"x\\ud800"')
    calls = []
    handled, _ = handle_batch("svc", batch_of(raw), lambda message, state: calls.append(message) or [], None,
                              Running())
    assert not calls and "lone UTF-16 surrogate" in letters(handled)[0]["reason"]


def test_an_oversized_key_is_a_dead_letter_that_fits_and_is_not_keyed_by_it():
    handled, _ = handle_batch("svc", batch_of(b"8 bytes!", key=b"k" * 300_000), lambda m, state: [], None, Running())
    [(topic, value, key, *_)] = handled[0].outputs
    letter = json.loads(value)["payload"]
    assert topic == "dead_letter.svc" and key is None and len(value) < 1_000_000  # (the service's own member)
    assert letter["reason"] == "key of 300000 bytes is over the 256-byte limit" and letter["key_truncated"]


def test_a_derived_id_never_outgrows_the_id_limit_and_stays_the_same_for_the_same_cause():
    long_id = "x" * 195
    assert len(derived_id(long_id, "delivered")) <= 200
    assert derived_id(long_id, "delivered") == derived_id(long_id, "delivered") != derived_id("y" * 195, "delivered")


def test_a_null_value_is_kept_as_null_in_its_dead_letter():
    assert dead_letter(None, "empty", "svc", Record(0, None)).payload["original_null"] is True
    assert dead_letter(b"", "empty", "svc", Record(0, b"")).payload["original_null"] is False


@pytest.mark.parametrize("script", sorted(path.name for path in ROOT.glob("*.py") if path.name != "bench.py"))
def test_a_script_run_outside_the_virtual_environment_says_so_in_one_line(script):
    # (-S: without site-packages, as a system Python without the project's requirements; bench.py has its own, make bench)
    result = subprocess.run([sys.executable, "-S", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("kafka is not installed here: run the scripts in the project's virtual environment "
                             "(`make check` makes it in .venv; then `. .venv/bin/activate`)\n")
