"""Demo: walks Examples 1 -> 2 -> 3 as the README tells a user to do by hand, with every service as a child process.

Reads:  every project topic (to follow each workflow)   Needs: a broker (`make kafka-up`; `make demo` does it)
Run:    python demo.py            # about a minute; Ctrl-C stops everything it started
        python demo.py --quick    # shorter stages (used by the tests)
Ends with one line: demo: workflows=N completed=N lost=0 duplicates=0 reports=N restart_gap_s=X.X (exit 1 if anything
was lost).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from rich.console import Console

import common
from monitor import Flow, render

HERE = Path(__file__).resolve().parent
COLOURS = ["cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_green"]
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)

class Children:
    """The services, each a child process whose output is shown with a coloured prefix."""

    def __init__(self, env: dict):
        self.env, self.running = env, {}

    def start(self, name: str, script: str, *args: str) -> None:
        colour = COLOURS[len(self.running) % len(COLOURS)] if name not in self.running else self.running[name][1]
        process = subprocess.Popen([sys.executable, str(HERE / script), *args], env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.running[name] = (process, colour)
        threading.Thread(target=self._show, args=(name, process, colour), daemon=True).start()

    def _show(self, name: str, process: subprocess.Popen, colour: str) -> None:
        for line in process.stdout:
            console.print(f"[{colour}]{name:>13} |[/] {line.rstrip()}", markup=True, soft_wrap=True)

    def stop(self, name: str) -> None:
        process, _ = self.running[name]
        process.terminate()
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process, _ in self.running.values():
            if process.poll() is None:
                process.terminate()
        for process, _ in self.running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def say(text: str) -> None:
    console.rule(f"[bold]{text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short stages (for tests)")
    parser.add_argument("--keep", action="store_true", help="keep the demo's report store instead of deleting it")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too stops everything the demo started
    stage = 3.0 if args.quick else 12.0  # seconds each stage runs before the next change
    prefix = os.environ.get("TOPIC_PREFIX") or f"demo{uuid.uuid4().hex[:6]}_"
    os.environ["TOPIC_PREFIX"] = common.TOPIC_PREFIX = prefix
    workdir = tempfile.mkdtemp(prefix="orchestration-demo-")
    env = dict(os.environ, REPORT_DB=os.path.join(workdir, "reports.db"), PYTHONUNBUFFERED="1")
    children, flow = Children(env), None
    console.print(f"Demo on Kafka at {common.BOOTSTRAP_SERVERS}, topics prefixed {prefix!r}, reports in {workdir}"
                  f"{'' if args.keep else ' (deleted at the end; --keep keeps it)'}")
    try:
        say("Example 1: a detection goes to the security service and the notification service")
        children.start("security", "security_service.py")
        children.start("notification", "notification_service.py")
        children.start("orchestrator", "orchestrator.py", "--example", "1")
        children.start("detector", "security_detector.py", "--rate", "3", "--seed", "1")
        flow = Flow()
        flow.wait(lambda: flow.counts()[1] >= 3 * stage, timeout=60 + stage)
        console.print(render(flow, None, rows=4))

        say("Example 2: the reporting service starts; only the orchestrator changes (stop, then start at --example 2)")
        children.start("reporting", "reporting_service.py", "--example", "2", "--every", str(stage))
        children.stop("orchestrator")
        stopped_at = time.time()
        console.print(f"[bold]orchestrator stopped; detections keep arriving and wait in {prefix}message_stream")
        flow.wait(lambda: False, timeout=stage / 2)  # let a backlog build while it is down
        restarted_at = time.time()
        children.start("orchestrator", "orchestrator.py", "--example", "2")
        backlog = [w for w, k in flow.kind.items() if k == "security"
                   and stopped_at < flow.times[w]["security_detection"] < restarted_at]
        flow.wait(lambda: any("security_command" in flow.times[w] for w in backlog), timeout=60)
        routed = [flow.times[w]["security_command"] for w in backlog if "security_command" in flow.times[w]]
        gap = (min(routed) - restarted_at) if routed else float("nan")
        console.print(f"[bold]restart gap: first message of the backlog routed {gap:.1f} s after the orchestrator started")
        flow.wait(lambda: False, timeout=stage)
        console.print(render(flow, None, rows=6))

        say("Example 3: the unit producer starts; reporting gains its unit section; the orchestrator gains the unit workflow")
        # A fixed count, so it stops producing by itself but goes on obeying the commands still on their way.
        children.start("units", "unit_event_producer.py", "--rate", "2", "--count", str(int(4 * stage)), "--seed", "2")
        flow.wait(lambda: False, timeout=stage / 2)
        children.stop("reporting")
        children.start("reporting", "reporting_service.py", "--example", "3", "--every", str(stage))
        children.stop("orchestrator")
        children.start("orchestrator", "orchestrator.py", "--example", "3")
        flow.wait(lambda: any(k == "unit" and flow.completed(w) for w, k in flow.kind.items()), timeout=60)
        console.print("[bold]replaying the unit events the Example 2 table had no route for")
        subprocess.run([sys.executable, str(HERE / "dead_letters.py"), "replay", "--reason", "no route for 'unit_event'"],
                       env=env, check=False)
        flow.wait(lambda: False, timeout=stage)

        say("Stopping the producers and letting every workflow finish")
        children.stop("detector")
        flow.wait(lambda: flow.counts()[0] == flow.counts()[1], timeout=60)
        children.stop_all()
        summary = subprocess.run([sys.executable, str(HERE / "reporting_service.py"), "--summary", "--json"],
                                 env=env, capture_output=True, text=True, check=True).stdout
        console.print(f"report store: {summary.strip()}")
        reports = json.loads(summary)["reports"]
        console.print(render(flow, None, rows=8))
        routed_reports = sum("report_data" in types for types in flow.times.values())
        started, completed = flow.counts()
        for workflow in (w for w in flow.kind if not flow.completed(w)):
            console.print(f"[red]incomplete {flow.kind[workflow]} workflow {workflow}: {sorted(flow.times[workflow])}")
        lost = started - completed + max(0, routed_reports - reports)
        print(f"demo: workflows={started} completed={completed} lost={lost} duplicates={flow.duplicates} "
              f"reports={reports} restart_gap_s={gap:.1f}", flush=True)
        return 1 if lost or flow.duplicates else 0
    except KeyboardInterrupt:
        console.print("[bold]Ctrl-C: stopping every process the demo started")
        return 130
    finally:
        children.stop_all()
        if flow:
            flow.consumer.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
