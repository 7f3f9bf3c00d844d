"""One trace per workflow, across every script, in a real Zipkin (python -m local_zipkin, from Maven Central): the
span tree of a detection, as the API gives it and as the UI shows it in a real browser; a dead letter marked as an
error, its replay in the same trace, and a step's timeout in its workflow's trace."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import NO_RESENDS, ROOT, detections, unit_event, wait_completed, wait_for_reports

import local_kafka
import local_zipkin
from common import MESSAGE_STREAM, tracing
from contracts import THIRD_PARTY


@pytest.fixture(scope="module")
def zipkin(tmp_path_factory):
    where = tmp_path_factory.mktemp("zipkin")
    server, _ = local_zipkin.start(local_kafka.free_port(), where)
    server.dir = where
    yield server
    local_zipkin.stop(where)


@pytest.fixture
def traced(env, zipkin):
    """This test's scripts export their spans to the Zipkin (within 0.2 s of each span's end)."""
    env.update(OTEL_TRACES_EXPORTER="zipkin", OTEL_EXPORTER_ZIPKIN_ENDPOINT=zipkin.spans_endpoint,
               OTEL_BSP_SCHEDULE_DELAY="200")
    return zipkin


def trace_of(zipkin, workflow_id: str, services: set[str], spans: int = 1, timeout: float = 60) -> list[dict]:
    """The spans of the one trace tagged with this workflow id, once every one of `services` has sent its spans
    and there are at least `spans` of them (spans arrive in batches, each script's on its own)."""
    query = urllib.parse.urlencode({"annotationQuery": f"workflow.id={workflow_id}", "limit": 10, "lookback": 3_600_000})
    deadline, traces = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{zipkin.address}/api/v2/traces?{query}", timeout=10) as response:
            traces = json.load(response)
        if len(traces) == 1 and services <= {s["localEndpoint"]["serviceName"] for s in traces[0]} \
                and len(traces[0]) >= spans:
            return traces[0]
        time.sleep(0.5)  # (polling Zipkin's API: spans arrive in batches)
    pytest.fail(f"no single trace of workflow {workflow_id} with {services}: {json.dumps(traces)[:3000]}")


def browser_dom(url: str) -> str:
    """The page as headless Chromium renders it (Debian's `chromium`; .ci/run installs it where it is missing)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser test needs Chromium: apt-get install chromium"
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                             "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return result.stdout


def parent_service(spans: list[dict], span: dict) -> str | None:
    by_id = {s["id"]: s for s in spans}
    return by_id[span["parentId"]]["localEndpoint"]["serviceName"] if span.get("parentId") else None


def test_a_detection_is_one_trace_from_the_detector_through_every_service(scripts, topics, traced):
    # Given Example 2 running with tracing on
    for script in ("security_service.py", "notification_service.py", "reporting_service.py"):
        scripts.start(script)
    scripts.start("orchestrator.py", "--example", "2", *NO_RESENDS)
    # When one detection is made and its workflow completes
    scripts.run("security_detector.py", "--count", "1")
    stream, third_party = topics(MESSAGE_STREAM), topics(THIRD_PARTY)
    [workflow] = detections(stream.read_count(1, type_="security_detection"))
    wait_completed(stream, third_party, {workflow})
    # Then Zipkin has one trace of it, with a span from every script it went through
    spans = trace_of(traced, workflow, {"security_detector", "orchestrator", "security_service",
                                        "notification_service", "reporting_service"}, spans=6)
    # And each span has the right parent: the detector's send starts it, the orchestrator routes it to the services,
    # and the security service's outcome goes back to the orchestrator
    edges = {(parent_service(spans, s), s["localEndpoint"]["serviceName"], s["name"]) for s in spans}
    prefix = scripts.env["TOPIC_PREFIX"]
    # (each span named for what happened; its topic an attribute)
    assert {(None, "security_detector", "send security_detection"),
            ("security_detector", "orchestrator", "route security_detection"),
            ("orchestrator", "security_service", "act on security_command"),
            ("orchestrator", "notification_service", "act on notification_command"),
            ("orchestrator", "reporting_service", "act on report_data"),
            ("security_service", "orchestrator", "route security_action_completed")} <= edges
    routed = next(s for s in spans if s["name"] == "route security_detection")
    assert routed["tags"]["messaging.destination.name"] == f"{prefix}message_stream.security_detector"
    # And every span is of this workflow, in one trace, and none is an error
    assert {s["tags"].get("workflow.id") for s in spans} == {workflow}
    assert len({s["traceId"] for s in spans}) == 1 and not any("error" in s["tags"] for s in spans)
    assert {s["tags"]["messaging.system"] for s in spans} == {"kafka"}
    # And Zipkin's UI, opened in a real browser (headless Chromium) where `make demo` points, shows every service
    page = browser_dom(f"{traced.address}/zipkin/traces/{spans[0]['traceId']}")
    for service in ("security_detector", "orchestrator", "security_service", "notification_service", "reporting_service"):
        assert f"{service}: " in page, f"{service} is not on the trace's page"


def test_a_dead_letter_is_an_error_its_replay_and_a_timeout_stay_in_the_workflows_trace(scripts, topics, producer,
                                                                                       traced):
    # Given a unit event, an Example 3 orchestrator (nobody applies unit commands: the step times out) and a
    # reporting service left at Example 2 (no unit section: it dead-letters the unit report)
    unit = unit_event("offline")
    producer(MESSAGE_STREAM, unit, key=b"unit-1")
    reporting = scripts.start("reporting_service.py", "--example", "2")
    scripts.start("orchestrator.py", "--example", "3", "--step-timeout", "1", "--attempts", "1")
    topics("dead_letter").read_count(1)
    # When the reporting service comes back at Example 3 and the dead letter is replayed
    scripts.stop(reporting)
    scripts.start("reporting_service.py", "--example", "3")
    scripts.run("dead_letters.py", "replay", "--all")
    wait_for_reports(scripts, 1, workflow="unit")
    # Then its unit command times out and the workflow fails (escalated)
    stream = topics(MESSAGE_STREAM)
    stream.read_until(lambda ms: any(m.type == "workflow_failed" and m.workflow_id == unit.workflow_id for m in ms))
    # And all of it is one trace: the routing, the timer firing, the report first dead-lettered (an error), then stored
    spans = trace_of(traced, unit.workflow_id, {"orchestrator", "reporting_service"}, spans=4)
    names = sorted((s["localEndpoint"]["serviceName"], s["name"], "error" in s["tags"]) for s in spans
                   if s["localEndpoint"]["serviceName"] in ("orchestrator", "reporting_service"))
    assert names == [("orchestrator", "fire step_timed_out", False), ("orchestrator", "route unit_event", False),
                     ("reporting_service", "act on report_data", False), ("reporting_service", "act on report_data", True)]
    assert len({s["traceId"] for s in spans}) == 1 and {s["tags"].get("workflow.id") for s in spans} == {unit.workflow_id}
    # And a person's retry of the failed workflow joins its trace
    assert "done: applied sent again" in scripts.run("workflows.py", "retry", unit.workflow_id, "--reason", "unit back",
                                                     "--wait", "30").stdout
    spans = trace_of(traced, unit.workflow_id, {"orchestrator"}, spans=len(spans) + 1)
    assert ("orchestrator", "route workflow_retry_requested") in {(s["localEndpoint"]["serviceName"], s["name"])
                                                                  for s in spans}


@pytest.mark.no_broker
def test_the_demo_links_a_records_trace_in_zipkins_ui(monkeypatch):
    # Given tracing to a Zipkin, and a record carrying a trace context
    monkeypatch.setattr(tracing, "EXPORTER", "zipkin")
    monkeypatch.setenv("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://127.0.0.1:9411/api/v2/spans")
    headers = [("traceparent", b"00-f73b32b4f688d2d5f4dab518491c8957-a65f330ff53b8626-01")]
    # Then the link is that trace's page in the UI; a record without one, or tracing elsewhere, gives none
    assert tracing.zipkin_link(headers) == "http://127.0.0.1:9411/zipkin/traces/f73b32b4f688d2d5f4dab518491c8957"
    assert tracing.zipkin_link([("traceparent", b"junk")]) is None and tracing.zipkin_link(None) is None
    monkeypatch.setattr(tracing, "EXPORTER", "otlp")
    assert tracing.zipkin_link(headers) is None


def test_local_zipkin_starts_once_says_where_it_runs_and_keeps_a_log(zipkin):
    # Starting it again where it runs changes nothing; status says where it runs; it writes a log
    again = subprocess.run([sys.executable, "-m", "local_zipkin", "start", "--port", str(zipkin.port), "--dir",
                            str(zipkin.dir)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.startswith(f"Zipkin 3.5.1 already running at {zipkin.address}")
    status = subprocess.run([sys.executable, "-m", "local_zipkin", "status", "--dir", str(zipkin.dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.startswith(f"running at {zipkin.address} (pid {zipkin.pid})")
    assert "Serving HTTP at" in Path(zipkin.log).read_text()


@pytest.mark.no_broker
def test_local_zipkin_without_java_is_a_one_line_error(tmp_path):
    # (on a free port: a user may run the tests beside their own Zipkin on 9411)
    result = subprocess.run([sys.executable, "-m", "local_zipkin", "start", "--port", str(local_kafka.free_port()),
                             "--dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, JAVA_HOME=str(tmp_path / "no-java"), PATH="/nonexistent"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["local_zipkin: Java 17 or newer is needed to run Zipkin, but no "
                                                  "'java' was found on PATH or in JAVA_HOME"]
