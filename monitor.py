"""Monitor: every workflow's path through the topics, live, built only from what is on the topics.

Reads: every project topic from the beginning (joins no group, commits nothing)
Run:   python monitor.py                    # live view, refreshed every second; Ctrl-C to leave
       python monitor.py --once             # one snapshot of everything on the topics now, then exit
       python monitor.py --sla-report       # per workflow type: count, p50/p95/p99 latency, SLA breaches
A workflow is STUCK when it is still running past its SLA (--sla seconds): the view names the missing step and the
service that should have done it.
"""

import argparse
import json
import math
import sys
import time
from collections import defaultdict, deque

from kafka import KafkaAdminClient, KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

import common

# Each workflow's steps: (step name, message types that mark it done, the service that should do it).
STEPS = {
    "security": [("detected", {"security_detection"}, "security_detector"),
                 ("routed", {"security_command"}, "orchestrator"),
                 ("acted", {"security_action_completed", "security_action_failed"}, "security_service"),
                 ("notified", {"notification_delivered"}, "notification_service")],
    "unit": [("event", {"unit_event"}, "unit_event_producer"),
             ("commanded", {"unit_command"}, "orchestrator"),
             ("applied", {"unit_command_applied"}, "unit_event_producer")],
}
STARTS = {"security_detection": "security", "unit_event": "unit"}
GROUPS = ["orchestrator", "orchestrator-security", "orchestrator-unit", "security_service", "notification_service",
          "reporting_service", "unit_event_producer"]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Flow:
    """What the topics say about each workflow: when each message type of it appeared (created_at, epoch seconds)."""

    def __init__(self, sla: float = 5.0):
        self.sla = sla
        admin = KafkaAdminClient(**common.kafka_config())
        common.ensure_topics(admin)
        admin.close()
        self.consumer = KafkaConsumer(**common.kafka_config(), enable_auto_commit=False,
                                      isolation_level="read_committed")
        deadline = time.monotonic() + 30  # topics just created take a moment to show in metadata
        while not all(self.consumer.partitions_for_topic(common.topic(n)) for n in common.ALL_TOPICS):
            if time.monotonic() > deadline:
                raise SystemExit("monitor: the project's topics did not appear in the cluster metadata within 30 s")
            time.sleep(0.1)
        partitions = [TopicPartition(common.topic(name), p) for name in common.ALL_TOPICS
                      for p in self.consumer.partitions_for_topic(common.topic(name))]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning()
        self.partitions = partitions
        self.kind: dict[str, str] = {}                       # workflow id -> "security" | "unit"
        self.times: dict[str, dict[str, float]] = defaultdict(dict)  # workflow id -> message type -> first seen
        self.seen: set[tuple[str, str]] = set()
        self.duplicates = 0                                   # the same command or effect twice
        self.arrivals: dict[str, deque] = defaultdict(deque)  # topic -> recent arrival times, for rates
        self.dead_letters: list[common.Envelope] = []

    def poll(self, timeout_ms: int = 200) -> None:
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                self.arrivals[record.topic].append(record.timestamp / 1000)  # when Kafka got it
                try:
                    message = common.Envelope.model_validate_json(record.value)
                except ValidationError:  # junk on an input topic: the service reading it dead-letters it
                    continue
                self.add(record.topic, message)

    def add(self, topic_name: str, message: common.Envelope) -> None:
        if topic_name == common.topic(common.DEAD_LETTER):
            self.dead_letters.append(message)
            return
        if (topic_name, message.id) in self.seen and topic_name != common.topic(common.MESSAGE_STREAM):
            self.duplicates += 1  # (a replayed event on message_stream is not a duplicate effect)
        self.seen.add((topic_name, message.id))
        if message.type in STARTS:
            self.kind[message.workflow_id] = STARTS[message.type]
        self.times[message.workflow_id].setdefault(message.type, message.created_at.timestamp())

    def read_to_end(self, timeout: float = 30.0) -> None:
        """Read everything on the topics now (for --once and reports)."""
        end = self.consumer.end_offsets(self.partitions)
        deadline = time.monotonic() + timeout
        while any(self.consumer.position(p) < end[p] for p in self.partitions) and time.monotonic() < deadline:
            self.poll()

    def step_times(self, workflow: str) -> list[tuple[str, float | None, str]]:
        times = self.times[workflow]
        return [(step, min((times[t] for t in types if t in times), default=None), service)
                for step, types, service in STEPS[self.kind[workflow]]]

    def state(self, workflow: str, now: float) -> str:
        times, steps = self.times[workflow], self.step_times(workflow)
        if "security_action_failed" in times:
            return "failed"
        missing = [(step, service) for step, at, service in steps if at is None]
        if not missing:
            return "completed"
        if now - steps[0][1] > self.sla:
            step, service = missing[0]
            return f"STUCK: no '{step}' from {service}"
        return "running"

    def completed(self, workflow: str) -> bool:
        return self.state(workflow, time.time()) == "completed"

    def latency(self, workflow: str) -> float | None:
        """End-to-end seconds from the starting event to its last step, once every step is done."""
        steps = self.step_times(workflow)
        if any(at is None for _, at, _ in steps):
            return None
        return max(at for _, at, _ in steps) - steps[0][1]

    def counts(self) -> tuple[int, int]:
        """(workflows started, workflows completed)."""
        return len(self.kind), sum(self.completed(w) for w in self.kind)

    def sla_report(self, window: float | None = None) -> dict:
        """Per workflow type: completed count, p50/p95/p99 latency (s) and breaches (late, stuck or failed)."""
        now, report = time.time(), {}
        for kind in STEPS:
            workflows = [w for w, k in self.kind.items() if k == kind
                         and (window is None or self.times[w][next(iter(STEPS[kind][0][1]))] >= now - window)]
            latencies = [lat for w in workflows if (lat := self.latency(w)) is not None]
            late = sum(lat > self.sla for lat in latencies)
            unfinished = sum(self.state(w, now) != "running" and self.latency(w) is None for w in workflows)
            report[kind] = {"count": len(workflows), "completed": len(latencies),
                            **{f"p{p}": round(percentile(latencies, p), 3) if latencies else None for p in (50, 95, 99)},
                            "sla_s": self.sla, "breaches": late + unfinished}
        return report

    def rates(self, seconds: float = 10.0) -> dict[str, float]:
        since = time.time() - seconds
        for arrivals in self.arrivals.values():
            while arrivals and arrivals[0] < since:
                arrivals.popleft()
        return {name: sum(t >= since for t in self.arrivals[common.topic(name)]) / seconds for name in common.ALL_TOPICS}

    def wait(self, condition, timeout: float) -> bool:
        """Keep reading until condition() holds or timeout seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if condition():
                return True
        return condition()

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def consumer_lag(admin: KafkaAdminClient, flow: Flow) -> dict[str, int]:
    """Messages each known group still has to read, summed over its partitions."""
    end = flow.consumer.end_offsets(flow.partitions)
    try:
        offsets = admin.list_group_offsets({common.topic(group): None for group in GROUPS})
    except KafkaError:  # no group coordinator yet (a brand-new cluster): no lag to show
        return {}
    return {group: sum(max(0, end.get(tp, 0) - meta.offset) for tp, meta in offsets[common.topic(group)].items())
            for group in GROUPS if offsets.get(common.topic(group))}


def render(flow: Flow, lag: dict[str, int] | None, rows: int = 15) -> Group:
    """The view: a row per recent workflow, then traffic, consumer lag (if given), dead letters and totals."""
    now = time.time()
    workflows = sorted(flow.kind, key=lambda w: flow.step_times(w)[0][1] or 0, reverse=True)[:rows]
    table = Table(title=f"Workflows (newest {len(workflows)} of {len(flow.kind)}; SLA {flow.sla:g} s)", expand=False)
    for column in ("workflow", "type", "steps (s after start)", "latency", "state"):
        table.add_column(column)
    for workflow in workflows:
        steps = flow.step_times(workflow)
        start = steps[0][1]
        path = " → ".join(f"{step} {at - start:.2f}" if at is not None else f"[dim]{step} …[/]" for step, at, _ in steps)
        if "report_data" in flow.times[workflow]:
            path += f" → reported {flow.times[workflow]['report_data'] - start:.2f}"
        latency = flow.latency(workflow)
        state = flow.state(workflow, now)
        colour = {"completed": "green", "running": "yellow", "failed": "red"}.get(state, "bold red")
        table.add_row(workflow[:8], flow.kind[workflow], path, f"{latency:.2f} s" if latency is not None else "",
                      f"[{colour}]{state}[/]")
    rates = flow.rates()
    traffic = "  ".join(f"{name} {rate:.1f}/s" for name, rate in rates.items())
    lags = "  ".join(f"{group} {n}" for group, n in (lag or {}).items()) or "(no groups yet)"
    lags += "  (a transaction's commit marker also counts as one)" if lag else ""
    last = flow.dead_letters[-1].payload["reason"] if flow.dead_letters else "-"
    started, completed = flow.counts()
    lines = [f"messages per second (last 10 s): {traffic}"] + ([f"consumer lag: {lags}"] if lag is not None else [])
    return Group(table, *lines, f"dead letters: {len(flow.dead_letters)} (last: {last})",
                 f"workflows: {started} started, {completed} completed, duplicates {flow.duplicates}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--sla-report", action="store_true", help="print latency percentiles and SLA breaches, exit")
    parser.add_argument("--json", action="store_true", help="with --sla-report: one JSON object")
    parser.add_argument("--sla", type=float, default=5.0, help="seconds a workflow may take (default 5)")
    parser.add_argument("--window", type=float, help="with --sla-report: only workflows started in the last N s")
    parser.add_argument("--rows", type=int, default=15, help="workflows shown (default 15)")
    args = parser.parse_args()
    if args.sla <= 0 or (args.window is not None and args.window <= 0):
        parser.error("--sla and --window must be above 0")
    common.setup_logging()
    stop = common.Stopper()
    admin = common.wait_for_kafka(stop, "monitor")
    if admin is None:
        return
    flow, console = Flow(args.sla), Console(width=None if sys.stdout.isatty() else 200)
    try:
        if args.sla_report:
            flow.read_to_end()
            report = flow.sla_report(args.window)
            if args.json:
                print(json.dumps(report, sort_keys=True))
            else:
                for kind, r in report.items():
                    print(f"{kind:<9} count {r['count']:>5}  completed {r['completed']:>5}  p50 {r['p50']} s  "
                          f"p95 {r['p95']} s  p99 {r['p99']} s  SLA {r['sla_s']:g} s breaches {r['breaches']}")
        elif args.once:
            flow.read_to_end()
            console.print(render(flow, consumer_lag(admin, flow), args.rows))
        else:
            with Live(render(flow, None, args.rows), console=console, refresh_per_second=2) as live:
                while not stop:
                    deadline = time.monotonic() + 1.0
                    while time.monotonic() < deadline and not stop:
                        flow.poll()
                    live.update(render(flow, consumer_lag(admin, flow), args.rows))
    finally:
        flow.close()
        admin.close()


if __name__ == "__main__":
    main()
