"""Metrics an operator's tools can scrape: each long-running script serves Prometheus metrics (prometheus-client)
on METRICS_PORT, or --metrics-port, at /metrics. Off unless a port is given; then the shared loop counts what every
service does, and the orchestrator what only it does (commands routed, open workflows, timeouts fired).

    messages_handled_total{service,type}        records handled by the handler, counted once their batch is committed
    dead_letters_total{service,reason}          records dead-lettered, by the kind of reason (its first words)
    redeliveries_ignored_total{service}         messages handled before, skipped
    commands_revoked_total{service,type}        commands not acted on: a person cancelled their workflow
    commands_expired_total{service,type}        commands not acted on: read after their deadline
    handler_seconds{service}                    the handler's time per message (histogram)
    commit_seconds{service}                     a batch's delivery: its transaction, or acks and commit (histogram)
    consumer_lag{service,topic,partition}       records not yet handled, per assigned partition
    commands_routed_total{topic,workflow}       the orchestrator's commands, per topic and workflow
    open_workflows                              workflows the orchestrator has running
    timeouts_fired_total{workflow}              steps whose time limit passed
    operator_requests_total{request,outcome}    a person's requests (cancel, retry), granted or refused
    state_entries_set_aside_total{service}      state records read back that are not entries (dead-lettered)
    state_entries_removed_total{service}        state entries a tombstone removed (written by someone else)
    outcomes_of_unknown_workflows_total{type}   outcomes of workflows the orchestrator has no state of
    messages_produced_total{service}            events an event source sent, acknowledged
"""

import argparse
import logging
import os
import re
import time

from kafka.structs import TopicPartition

log = logging.getLogger("common")
ON = False
_metrics: dict = {}
OPEN_EVERY_S = 5  # how often the open workflows are counted (a scan of the state)
_open_counted_at = float("-inf")


def flag(parser: argparse.ArgumentParser) -> None:
    """Add --metrics-port to a script's arguments (its default: METRICS_PORT, or none: no metrics)."""
    default = os.environ.get("METRICS_PORT")
    parser.add_argument("--metrics-port", type=int, default=int(default) if default else None, metavar="PORT",
                        help="serve Prometheus metrics on this port at /metrics (default: METRICS_PORT, else none)")


def start(name: str, port: int | None) -> None:
    """Serve the metrics of the script `name` on `port` (nothing if None)."""
    global ON
    if port is None or ON:
        return
    from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

    disable_created_metrics()  # (no *_created series: nothing here reads when a counter was made)
    buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    _metrics.update(
        handled=Counter("messages_handled", "Records handled", ["service", "type"]),
        dead=Counter("dead_letters", "Records dead-lettered, by the kind of reason", ["service", "reason"]),
        repeats=Counter("redeliveries_ignored", "Messages handled before, skipped", ["service"]),
        revoked=Counter("commands_revoked", "Commands not acted on: their workflow was cancelled", ["service", "type"]),
        expired=Counter("commands_expired", "Commands not acted on: read after their deadline", ["service", "type"]),
        handler=Histogram("handler_seconds", "The handler's time per message", ["service"], buckets=buckets),
        commit=Histogram("commit_seconds", "A batch's delivery (transaction, or acks and commit)", ["service"],
                         buckets=buckets),
        lag=Gauge("consumer_lag", "Records not yet handled, per assigned partition", ["service", "topic", "partition"]),
        routed=Counter("commands_routed", "The orchestrator's commands", ["topic", "workflow"]),
        open=Gauge("open_workflows", "Workflows the orchestrator has running"),
        timeouts=Counter("timeouts_fired", "Steps whose time limit passed", ["workflow"]),
        operator=Counter("operator_requests", "A person's requests (cancel, retry), granted or refused",
                         ["request", "outcome"]),
        unknown=Counter("outcomes_of_unknown_workflows", "Outcomes of workflows with no state here, changing nothing",
                        ["type"]),
        set_aside=Counter("state_entries_set_aside", "State records read back that are not entries, dead-lettered",
                          ["service"]),
        removed=Counter("state_entries_removed", "State entries a tombstone removed, written by someone else",
                        ["service"]),
        produced=Counter("messages_produced", "Events an event source sent (acknowledged)", ["service"]))
    try:
        start_http_server(port)
    except OSError as error:
        raise SystemExit(f"{name}: cannot serve metrics on port {port}: {error.strerror or error}") from None
    ON = True
    log.info("%s: metrics at http://127.0.0.1:%d/metrics", name, port)


def count(metric: str, amount: float = 1, **labels: str) -> None:
    if ON:
        _metrics[metric].labels(**labels).inc(amount)


def observe(metric: str, seconds: float, **labels: str) -> None:
    if ON:
        _metrics[metric].labels(**labels).observe(seconds)


def gauge(metric: str, value: float, **labels: str) -> None:
    if ON:
        (_metrics[metric].labels(**labels) if labels else _metrics[metric]).set(value)


def dropped(metric: str, **labels: str) -> None:
    """Remove one series (a partition this copy no longer reads)."""
    if ON:
        try:
            _metrics[metric].remove(*labels.values())
        except KeyError:
            pass


def batch_committed(service: str, consumer, done: list, store=None, open_count=None) -> None:
    """Count a batch's committed records: how each ended, the lag of each partition it read, and (`open_count`,
    given the service's state) how many workflows run. A failure here is logged, never more: metrics must not stop
    the work."""
    global _open_counted_at
    if not ON:
        return
    try:
        for item in done:
            metric, label = item.counted
            count(metric, service=service, **({"reason": label} if metric == "dead" else
                                              {} if metric == "repeats" else {"type": label}))
        for tp in {TopicPartition(item.record.topic, item.record.partition) for item in done}:
            # (the partitions just handled, whose position is known: past their last record and any commit marker
            # after it, which the high watermark counts too)
            gauge("lag", max(0, (consumer.highwater(tp) or 0) - consumer.position(tp)), service=service, topic=tp.topic,
                  partition=str(tp.partition))
        if open_count is not None and store is not None and time.monotonic() - _open_counted_at > OPEN_EVERY_S:
            _open_counted_at = time.monotonic()
            gauge("open", open_count(store))
    except Exception as error:  # noqa: BLE001 -- see the docstring
        log.warning("%s: metrics not updated: %s: %s", service, type(error).__name__, error)


def reason_kind(reason: str) -> str:
    """A dead letter's reason, cut to its kind, a label with few values: its first three words before any colon,
    with what it quotes left out ("no route for", "invalid envelope", "id was handled", ...)."""
    unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", " ", reason.split(":", 1)[0])
    return " ".join(re.findall(r"[a-zA-Z_-]+", unquoted)[:3]).lower() or "other"
