"""The two event sources against a real broker: security_detector and unit_event_producer."""

import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, unit_event

from common import MESSAGE_STREAM
from contracts import UNIT_COMMAND
from orchestrator import route
from security_detector import SEVERITY, detection
from unit_event_producer import Field


def test_the_detector_produces_count_valid_detections_keyed_by_sensor(scripts, topics):
    # When the detector runs with --count 5
    scripts.run("security_detector.py", "--count", "5", "--rate", "50", "--seed", "7")
    # Then exactly five detections are on message_stream, each its own workflow, keyed by its sensor
    reader = topics(MESSAGE_STREAM)
    detections = reader.read_count(5)
    assert [d.type for d in detections] == ["security_detection"] * 5
    assert len({d.workflow_id for d in detections}) == 5
    assert [r.key.decode() for r in reader.raw] == [d.payload["sensor_id"] for d in detections]


def test_the_unit_producer_emits_events_and_applies_commands(scripts, topics, producer):
    # Given the unit producer with --count 3
    scripts.start("unit_event_producer.py", "--count", "3", "--rate", "50", "--units", "2")
    stream = topics(MESSAGE_STREAM)
    assert len(stream.read_count(3, type_="unit_event")) == 3
    # When a command for one of its units arrives
    command = route(unit_event("offline"), stage=3)[0][1]
    producer(UNIT_COMMAND, command)
    # Then it applies it and says so on message_stream, for the same workflow
    [applied] = stream.read_count(1, type_="unit_command_applied")
    assert applied.workflow_id == command.workflow_id
    assert applied.payload == {"unit_id": "unit-1", "command": "reboot", "state": "rebooting"}


def test_the_unit_producer_makes_no_event_once_it_is_asked_to_stop(scripts, topics):
    # Given the unit producer making 20 events a second
    units = scripts.start("unit_event_producer.py", "--rate", "20")
    stream = topics(MESSAGE_STREAM)
    stream.read_count(5, type_="unit_event")
    # When it gets Ctrl-C
    asked = time.time()
    units.send_signal(signal.SIGINT)
    assert units.wait(timeout=30) == 0
    # Then every event it made was made before (an event made after the signal would never get its command applied)
    made = [m.created_at.timestamp() for m in stream.read_count(1, type_="unit_event")]
    assert made and max(made) <= asked + 0.02


@pytest.mark.no_broker
def test_simulated_units_drain_and_recharge_smoothly_and_report_battery_low_only_when_low():
    field, last, statuses = Field(random.Random(3), 5), {}, []
    for _ in range(3000):
        _, event, unit = field.event()
        battery, status = event.payload["battery"], event.payload["status"]
        assert abs(battery - last.get(unit, battery)) <= 9  # (no 15 -> 78 jumps)
        assert (status == "battery_low") == (battery < 20) or status in ("offline", "tamper")
        last[unit] = battery
        statuses.append(status)
    assert statuses.count("battery_low") > 0 and statuses.count("offline") + statuses.count("tamper") < 0.05 * 3000


@pytest.mark.no_broker
def test_each_simulated_sensor_detects_its_own_kind_with_a_severity_that_fits_it():
    rng, kinds = random.Random(4), {}
    for _ in range(500):
        _, event, sensor = detection(rng)
        kinds.setdefault(sensor, set()).add(event.payload["kind"])
        low, high = SEVERITY[event.payload["kind"]]
        assert low <= event.payload["severity"] <= high
    assert all(len(found) == 1 for found in kinds.values()) and len(kinds) == 8


def test_an_event_of_a_type_no_contract_knows_ends_its_source_in_one_line(env, tmp_path):
    # Given an event source whose message type has no schema in the contracts (a slip: a typo, a schema not added)
    source = tmp_path / "typo_source.py"
    source.write_text("import contracts  # noqa: F401\nfrom common import new_event, run_producer\n"
                      "run_producer('typo_source', lambda: ('message_stream', new_event('maintenance_du', {}, "
                      "'typo_source'), 'k'), 1, 1.0)\n")
    # When it runs
    ended = subprocess.run([sys.executable, str(source)], env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True,
                           text=True, timeout=60)
    # Then it ends with one line that names the type and where its schema goes, having sent nothing
    assert ended.returncode == 1 and ended.stderr.splitlines()[-1] == (
        "typo_source: no schema for message type 'maintenance_du': add one to the application's contracts "
        "(contracts.py, MESSAGES)")
    assert "Traceback" not in ended.stderr
