"""reporting_service against a real broker: stores each report once; the unit section exists only from Example 3."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, detection, unit_event, wait_for_reports

from contracts import REPORT_DATA
from orchestrator import route
from reporting_service import SCHEMA


def security_report():
    return route(detection(), stage=2)[2][1]


def unit_report(status):
    return route(unit_event(status), stage=3)[1][1]


def test_a_report_delivered_twice_is_stored_once(scripts, producer):
    # Given the reporting service at Example 2
    scripts.start("reporting_service.py", "--example", "2")
    repeated, other = security_report(), security_report()
    # When one report arrives twice and another once
    for report in (repeated, repeated, other):
        producer(REPORT_DATA, report)
    # Then the store counts two reports
    summary = wait_for_reports(scripts, 2)
    assert summary["reports"] == 2 and summary["workflows"] == {"security": 2}
    assert summary["categories"] == {"security": {"motion": 2}}


def test_before_example_3_a_unit_report_is_dead_lettered_not_dropped(scripts, topics, producer):
    scripts.start("reporting_service.py", "--example", "2")
    producer(REPORT_DATA, unit_report("tamper"))
    producer(REPORT_DATA, security_report())
    [letter] = topics("dead_letter").read_count(1)
    assert letter.payload["reason"] == "no report section for 'unit' reports at example 2"
    assert wait_for_reports(scripts, 1)["workflows"] == {"security": 1}


def test_the_example_3_unit_section_tracks_units_needing_attention(scripts, producer):
    scripts.start("reporting_service.py", "--example", "3")
    for status in ("tamper", "heartbeat", "offline"):
        producer(REPORT_DATA, unit_report(status))
    summary = wait_for_reports(scripts, 3)
    assert summary["workflows"] == {"unit": 3}
    assert summary["categories"]["unit"] == {"tamper": 1, "heartbeat": 1, "offline": 1}
    assert summary["units_needing_attention"] == ["unit-1"]  # its last status was "offline"


def test_a_report_id_stored_before_with_other_content_is_a_dead_letter(scripts, topics, producer):
    scripts.start("reporting_service.py", "--example", "2")
    report = security_report()
    changed = report.model_copy(update={"payload": {**report.payload, "category": "smoke"}})
    producer(REPORT_DATA, report)
    producer(REPORT_DATA, changed)
    [letter] = topics("dead_letter").read_count(1)
    assert letter.payload["reason"] == f"report id {report.id!r} was stored before with different content; not stored again"
    assert wait_for_reports(scripts, 1)["categories"] == {"security": {"motion": 1}}


@pytest.fixture
def store_env(tmp_path):
    """An environment with its own report store and no broker: --summary reads only SQLite."""
    return dict(os.environ, REPORT_DB=str(tmp_path / "reports.db"), KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")


def summary_of(store_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "reporting_service.py", "--summary", "--json"], cwd=ROOT, env=store_env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.no_broker
def test_summary_of_a_missing_store_says_so_and_creates_nothing(store_env):
    result = summary_of(store_env)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"reporting_service: cannot open the report store {store_env['REPORT_DB']!r}")
    assert not Path(store_env["REPORT_DB"]).exists()


@pytest.mark.no_broker
def test_summary_of_an_empty_store_is_all_zero(store_env):
    sqlite3.connect(store_env["REPORT_DB"]).executescript(SCHEMA)
    result = summary_of(store_env)
    assert result.returncode == 0 and json.loads(result.stdout) == {
        "reports": 0, "workflows": {}, "categories": {}, "units_needing_attention": []}
