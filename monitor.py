"""Monitor: every workflow's path through the topics, live, built only from what is on the topics.

Reads: every project topic from the beginning (joins no group, commits nothing)
Run:   python monitor.py                    # live view, refreshed every second; Ctrl-C to leave
       python monitor.py --once             # one snapshot of everything on the topics now, then exit
       python monitor.py --once --json      # the counts only, as one JSON object
       python monitor.py --once --json --workflows   # each workflow in the window: one JSON object a line
       python monitor.py --sla-report       # per workflow type: count, failed, p50/p95/p99 latency, SLA breaches
       python monitor.py --workflow ID      # one workflow's messages in order: time, topic, type, service, repeats
A workflow is STUCK when it is still running past its SLA (--sla seconds): the view names the missing step and the
service that should have done it. The steps come from the orchestrator's WORKFLOWS table; a workflow ends when the
orchestrator says so (workflow_completed, workflow_failed). Times are Kafka's record times, not the writers' clocks: a
message whose created_at is over a minute from its record time is counted as clock skew, and its workflow is left out
of the latency percentiles.
"""

import argparse
import json
import signal
import sys
import time
from datetime import datetime

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)
from rich.console import Console
from rich.live import Live

from common import SETTINGS, Settings, Stopper, setup_logging, wait_for_kafka
from views.board import fitting, render
from views.flow import Flow, Tail, messages_of























def print_sla_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, sort_keys=True))
        return
    for kind, r in report.items():
        p50, p95, p99 = ("-" if r[p] is None else f"{r[p]:.3f}" for p in ("p50", "p95", "p99"))
        print(f"{kind:<9} count {r['count']:>5}  completed {r['completed']:>5}  failed {r['failed']:>4}  p50 {p50} s  "
              f"p95 {p95} s  p99 {p99} s  SLA {r['sla_s']:g} s breaches {r['breaches']}")




def timeline(wanted: str, settings: Settings = SETTINGS) -> int:
    """Print every message of one workflow on the topics in the order Kafka got them, a repeat (an id seen before
    on that topic: a re-sent command, a replayed event) marked; 1 if no single workflow has an id starting so."""
    workflows, rows = messages_of(wanted, settings)
    if len(workflows) != 1:
        print(f"monitor: {len(workflows) or 'no'} workflows have an id starting {wanted!r}", file=sys.stderr)
        return 1
    print(f"workflow {workflows.pop()}: {len(rows)} messages")
    for at, topic, message, repeat in rows:
        when = datetime.fromtimestamp(at / 1000).strftime("%H:%M:%S.%f")[:-3]
        print(f"  {when}  {topic:<36} {message.type:<26} {message.source}{'  repeat (same id again)' * repeat}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--sla-report", action="store_true", help="print latency percentiles and SLA breaches, exit")
    parser.add_argument("--json", action="store_true", help="with --once or --sla-report: one JSON object")
    parser.add_argument("--workflows", action="store_true", help="with --once --json: each workflow's state (and why "
                                                                     "it is stuck), one JSON object a line")
    parser.add_argument("--workflow", metavar="ID", help="print one workflow's timeline (a unique beginning of its id)")
    parser.add_argument("--sla", type=float, default=5.0, help="seconds a workflow may take (default 5)")
    parser.add_argument("--window", type=float, help="with --sla-report: only workflows started in the last N s")
    parser.add_argument("--rows", type=int, default=15, help="workflows shown (default 15; live, no more than fit the terminal)")
    parser.add_argument("--keep", type=int, default=50_000, help="workflows kept in full; older finished ones are "
                                                                 "only counted, so memory stays bounded (default 50 000)")
    args = parser.parse_args()
    if args.json and not (args.once or args.sla_report):
        parser.error("--json goes with --once or --sla-report")
    if args.workflows and not (args.once and args.json):
        parser.error("--workflows goes with --once --json")
    if args.sla <= 0 or (args.window is not None and args.window <= 0) or args.keep < 10:
        parser.error("--sla and --window must be above 0, --keep at least 10")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # (`monitor.py --once --json --workflows | head` ends quietly)
    setup_logging()
    stop = Stopper()
    admin = wait_for_kafka(stop, "monitor")
    if admin is None:
        return
    if args.workflow:
        admin.close()
        raise SystemExit(timeline(args.workflow))
    flow, console = Flow(args.sla, window=args.keep), Console(width=None if sys.stdout.isatty() else 200)
    tail = Tail(flow)
    try:
        if (args.sla_report or args.once) and not tail.read_to_end(stop):
            raise SystemExit("monitor: stopped before reading to the end of the topics; no figures printed")
        if args.sla_report:
            print_sla_report(flow.sla_report(args.window), args.json)
        elif args.once and args.json and args.workflows:
            now = time.time()
            for workflow, kind in flow.kind.items():
                state, stuck = flow.status(workflow, now)
                print(json.dumps({"workflow_id": workflow, "type": kind, "state": state, "stuck": stuck}))
        elif args.once and args.json:
            print(json.dumps(flow.figures(), sort_keys=True))
        elif args.once:
            console.print(render(flow, tail.lag(admin), args.rows))
        else:
            # (a screen of its own: a view taller than the terminal, say after an outage's longer lines, leaves no
            # stale lines behind)
            with Live(render(flow, None, args.rows, True), console=console, refresh_per_second=2, screen=True,
                      vertical_overflow="crop") as live:
                while not stop:
                    deadline = time.monotonic() + 1.0
                    while time.monotonic() < deadline and not stop:
                        tail.poll()
                    live.update(render(flow, tail.lag(admin), fitting(console, args.rows), True))
    finally:
        tail.close()
        admin.close()


if __name__ == "__main__":
    main()
