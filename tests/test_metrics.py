"""Prometheus metrics: each long-running script serves them on its METRICS_PORT, and the counters agree with what
was sent; the scrape config and the Grafana dashboard for Docker users fit the metrics the scripts serve."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from helpers import NO_RESENDS, ROOT, detections, wait_completed, wait_for_reports
from prometheus_client.parser import text_string_to_metric_families

import local_kafka
from common import MESSAGE_STREAM
from contracts import THIRD_PARTY

# The ports docs/observability.md, the Prometheus scrape config and the Docker setup give the demo's scripts
# (METRICS_PORT=...).
PORTS = {"orchestrator": 9101, "security_service": 9102, "notification_service": 9103, "reporting_service": 9104,
         "unit_event_producer": 9105, "security_detector": 9106}

DOCUMENTED = {"messages_handled", "dead_letters", "redeliveries_ignored", "handler_seconds", "commit_seconds",
              "consumer_lag", "commands_routed", "open_workflows", "timeouts_fired", "messages_produced"}


def scrape(port: int) -> dict[tuple, float]:
    """(sample name, labels as sorted pairs) -> value, from a script's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_each_script_serves_metrics_that_agree_with_what_was_sent(scripts, topics):
    # Given Example 3 running, each script serving metrics on a port of its own
    ports = {name: local_kafka.free_port() for name in PORTS}
    for script in ("security_service", "notification_service"):
        scripts.start(f"{script}.py", METRICS_PORT=str(ports[script]))
    scripts.start("reporting_service.py", "--example", "3", METRICS_PORT=str(ports["reporting_service"]))
    scripts.start("orchestrator.py", "--example", "3", *NO_RESENDS, "--metrics-port", str(ports["orchestrator"]))
    # When detections (6 or more) and 2 unit events are made, and every workflow completes
    scripts.start("unit_event_producer.py", "--count", "2", "--seed", "5", "--metrics-port",
                  str(ports["unit_event_producer"]))
    detector = scripts.start("security_detector.py", "--rate", "10", "--seed", "5", METRICS_PORT=str(ports["security_detector"]))
    stream, third_party = topics(MESSAGE_STREAM), topics(THIRD_PARTY)
    stream.read_count(6, type_="security_detection")
    deadline = time.monotonic() + 10  # (acknowledged a moment after a reader may see them: read until counted)
    while (produced := value(scrape(ports["security_detector"]), "messages_produced_total",
                             service="security_detector")) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)  # (polling the endpoint)
    scripts.stop(detector)
    n = int(re.search(r"produced (\d+) messages", scripts.output(detector))[1])  # (its last line, as it stops)
    workflows = detections(stream.read_count(n, type_="security_detection"))
    assert 6 <= produced <= n == len(workflows)
    wait_completed(stream, third_party, workflows)
    stream.read_count(2, type_="unit_command_applied")
    wait_for_reports(scripts, n + 2)
    # Then each script's counters say so (a scrape may come just before the last batch's: read until they agree)
    expected = {
        "orchestrator": [("messages_handled_total", {"service": "orchestrator", "type": "security_detection"}, n),
                         ("messages_handled_total", {"service": "orchestrator", "type": "security_action_completed"}, n),
                         ("commands_routed_total", {"topic": "sec_command", "workflow": "security"}, n),
                         ("commands_routed_total", {"topic": "notification_command", "workflow": "security"}, n),
                         ("commands_routed_total", {"topic": "report_data", "workflow": "security"}, n),
                         ("messages_handled_total", {"service": "orchestrator", "type": "unit_event"}, 2),
                         ("messages_handled_total", {"service": "orchestrator", "type": "unit_command_applied"}, 2),
                         ("commands_routed_total", {"topic": "unit_command", "workflow": "unit"}, 2),
                         ("commands_routed_total", {"topic": "report_data", "workflow": "unit"}, 2),
                         ("handler_seconds_count", {"service": "orchestrator"}, 2 * n + 4),
                         ("open_workflows", {}, 0)],
        "unit_event_producer": [("messages_handled_total", {"service": "unit_event_producer", "type": "unit_command"},
                                 2)],
        "security_service": [("messages_handled_total", {"service": "security_service", "type": "security_command"}, n)],
        "notification_service": [("messages_handled_total", {"service": "notification_service",
                                                             "type": "notification_command"}, n)],
        "reporting_service": [("messages_handled_total", {"service": "reporting_service", "type": "report_data"}, n + 2)]}
    deadline = time.monotonic() + 30
    while True:
        found = {script: {(name, tuple(labels.items())): value(scrape(ports[script]), name, **labels)
                          for name, labels, _ in wanted} for script, wanted in expected.items()}
        want = {script: {(name, tuple(labels.items())): count for name, labels, count in wanted}
                for script, wanted in expected.items()}
        if found == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # (polling the endpoints)
    assert found == want
    # And the lag of each partition and the commit times are there
    orchestrator = scrape(ports["orchestrator"])
    assert any(name == "consumer_lag" and dict(labels)["service"] == "orchestrator" for name, labels in orchestrator)
    assert value(orchestrator, "commit_seconds_count", service="orchestrator") >= 1
    assert ("open_workflows", ()) in orchestrator  # (0, as checked above, and there)
    # And no series nobody asked for (prometheus-client's *_created)
    assert not [name for name, _ in orchestrator if name.endswith("_created")]


@pytest.mark.no_broker
def test_a_port_that_is_taken_is_a_one_line_error():
    # Given a port already in use
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # When a script is asked to serve its metrics there, it says so in one line and stops (before any Kafka)
        result = subprocess.run([sys.executable, str(ROOT / "security_service.py"), "--metrics-port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"security_service: cannot serve metrics on port {port}")


@pytest.mark.no_broker
def test_the_scrape_config_and_the_dashboard_fit_the_metrics_the_scripts_serve():
    # The scrape config has a target per script, on the port docs/observability.md gives it
    config = yaml.safe_load((ROOT / "observability" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    targets = {group["labels"]["script"]: group["targets"] for group in job["static_configs"]}
    assert targets == {name: [f"host.docker.internal:{port}"] for name, port in PORTS.items()}
    # The dashboard is valid JSON whose every query names metrics the scripts serve, and shows each of them
    dashboard = json.loads((ROOT / "observability" / "grafana" / "dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {re.sub(r"_(total|bucket|count|sum)$", "", word) for expr in exprs
             for word in re.findall(r"\b([a-z_]+)\b(?=\[|\)|$|\s*\))", expr)} - {"le", "service", "type", "topic",
                                                                                 "workflow", "partition", "reason"}
    assert named == DOCUMENTED
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(panel["datasource"]["uid"] == "prometheus" for panel in dashboard["panels"])
    # And the Docker setup mounts them where Prometheus and Grafana read them
    compose = yaml.safe_load((ROOT / "docker-compose-observability.yml").read_text())["services"]
    assert "./observability/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["prometheus"]["volumes"]
    assert any(volume.startswith("./observability/grafana/dashboard.json:") for volume in compose["grafana"]["volumes"])
    assert compose["zipkin"]["image"] == "openzipkin/zipkin:3.5.1" and "9411:9411" in compose["zipkin"]["ports"]
