"""Demo: walks Examples 1 -> 2 -> 3 -> 4 as the README tells a user to do by hand, every service a child process.

Reads:  every project topic (to follow each workflow)   Needs: a broker (`make kafka-up`; `make demo` does it)
Run:    python demo.py            # about a minute; Ctrl-C stops everything it started
        python demo.py --quick    # shorter stages (used by the tests)
        python demo.py --tmux     # the examples by hand: a tmux session, one window per script (`make walkthrough`)
        python demo.py --reset    # start the walkthrough over: delete its topics, consumer groups, state,
                                  # reports.db and security.db (those of TOPIC_PREFIX; `make reset`)
Ends with one line: demo: workflows=N completed=N lost=0 duplicates=0 reports=N restart_gap_s=X.X followed=N (the
steps Example 4 sent after another step; exit 1 if anything was lost).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)
from rich.console import Console

from kafka import KafkaAdminClient
from kafka.errors import NonEmptyGroupError, KafkaError

from common import (MESSAGE_STREAM, SESSION_TIMEOUT_MS, SETTINGS, Settings, changelog, read_all, tracing,
                    written_by)
from local_kafka import free_port, port_is_free
from views.board import render
from views.flow import TOPICS, Flow, Tail, groups

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


class Walkthrough:
    """Examples 1 -> 2 -> 3 -> 4, one method a stage, each doing what the README tells a user to do by hand."""

    def __init__(self, children: Children, tail: Tail, env: dict, stage: float):
        self.children, self.tail, self.flow, self.env, self.stage = children, tail, tail.flow, env, stage

    def example_1(self) -> None:
        say("Example 1: a detection goes to the security service and the notification service")
        port = CONSOLE_PORT if port_is_free(CONSOLE_PORT) else free_port()
        for name, script, *args in (("security", "security_service.py"), ("notification", "notification_service.py"),
                                    ("orchestrator", "orchestrator.py", "--example", "1"),
                                    ("detector", "security_detector.py", "--rate", "3", "--seed", "1"),
                                    ("console", "console.py", "--port", str(port))):
            self.children.start(name, script, *args)
        console.print(f"Watch it in a browser: http://127.0.0.1:{port} (the web console, python console.py)", soft_wrap=True)
        self.tail.wait(lambda: self.flow.counts()[1] >= 3 * self.stage, timeout=60 + self.stage)
        console.print(render(self.flow, None, rows=4))

    def example_2(self) -> float:
        """Returns the restart gap: seconds from the orchestrator's start to the first message of its backlog routed."""
        say("Example 2: the reporting service starts; only the orchestrator changes (stop, then start at --example 2)")
        self.children.start("reporting", "reporting_service.py", "--example", "2", "--every", str(self.stage))
        self.children.stop("orchestrator")
        stopped_at = time.time()
        console.print(f"[bold]orchestrator stopped; detections keep arriving and wait in "
                      f"{self.env['TOPIC_PREFIX']}message_stream")
        self.tail.wait(lambda: False, timeout=self.stage / 2)  # let a backlog build while it is down
        restarted_at = time.time()
        self.children.start("orchestrator", "orchestrator.py", "--example", "2")
        times = self.flow.times
        backlog = [w for w, k in self.flow.kind.items() if k == "security"
                   and stopped_at < times[w]["security_detection"] < restarted_at]
        self.tail.wait(lambda: any("security_command" in times[w] for w in backlog), timeout=60)
        routed = [times[w]["security_command"] for w in backlog if "security_command" in times[w]]
        gap = (min(routed) - restarted_at) if routed else float("nan")
        console.print(f"[bold]restart gap: first message of the backlog routed {gap:.1f} s after the orchestrator started")
        self.tail.wait(lambda: False, timeout=self.stage)
        console.print(render(self.flow, None, rows=6))
        return gap

    def example_3(self) -> None:
        say("Example 3: the unit producer starts; reporting gains its unit section; the orchestrator gains the unit workflow")
        # A fixed count, so it stops producing by itself but goes on obeying the commands still on their way.
        self.children.start("units", "unit_event_producer.py", "--rate", "2", "--count", str(int(4 * self.stage)),
                            "--seed", "2")
        self.tail.wait(lambda: False, timeout=self.stage / 2)
        self.children.stop("reporting")
        self.children.start("reporting", "reporting_service.py", "--example", "3", "--every", str(self.stage))
        self.children.stop("orchestrator")
        self.children.start("orchestrator", "orchestrator.py", "--example", "3")
        routed = self.tail.wait(lambda: any(k == "unit" and self.flow.completed(w) for w, k in self.flow.kind.items()),
                                timeout=60)
        console.print("[bold]the unit events that waited in Kafka were routed as soon as the orchestrator looked for them"
                      if routed else "[bold red]no unit workflow completed within 60 s of the orchestrator's restart")
        self.tail.wait(lambda: False, timeout=self.stage)

    def example_4(self) -> None:
        say("Example 4 (beyond the seed): steps that follow steps; only the orchestrator changes (stop, then start at "
            "--example 4): a guard's report is followed by the zone's unlocking and a word to the on-duty person")
        self.children.stop("orchestrator")
        self.children.start("orchestrator", "orchestrator.py", "--example", "4")
        followed = self.tail.wait(lambda: any(self.flow.completed(w) for w in self.flow.followed), timeout=60)
        console.print("[bold]a guard dispatched, then the zone unlocked: a workflow of steps one after another completed"
                      if followed else "[bold red]no workflow with a step that followed another completed within 60 s")
        self.tail.wait(lambda: False, timeout=self.stage)

    def finish(self, gap: float) -> int:
        """Stop the producers, let every workflow finish, count; 1 if anything was lost or doubled."""
        say("Stopping the producers and letting every workflow finish")
        flow = self.flow
        self.children.stop("detector")
        self.tail.wait(lambda: flow.counts()[0] == flow.counts()[1], timeout=60)
        self.children.stop_all()
        summary = subprocess.run([sys.executable, str(HERE / "reporting_service.py"), "--summary", "--json"],
                                 env=self.env, capture_output=True, text=True, check=True).stdout
        console.print(f"report store: {summary.strip()}")
        reports = json.loads(summary)["reports"]
        console.print(render(flow, None, rows=8))
        routed_reports = sum("report_data" in types for types in flow.times.values())
        started, completed = flow.counts()
        for workflow in (w for w in flow.kind if not flow.completed(w)):
            console.print(f"[red]incomplete {flow.kind[workflow]} workflow {workflow}: {sorted(flow.times[workflow])}")
        lost = started - completed + max(0, routed_reports - reports)
        print(f"demo: workflows={started} completed={completed} lost={lost} duplicates={flow.duplicates} "
              f"reports={reports} restart_gap_s={gap:.1f} followed={flow.followed_total}", flush=True)
        if tracing.EXPORTER == "zipkin":  # (OTEL_TRACES_EXPORTER=zipkin: one workflow, as Zipkin shows it)
            first = next(iter(read_all(written_by(MESSAGE_STREAM, "security_detector"), settings=self.flow.settings)),
                         None)
            link = tracing.zipkin_link(first.headers if first else None)
            console.print(f"one workflow's trace in Zipkin: {link}" if link else "no traced workflow found")
        return 1 if lost or flow.duplicates else 0


# The walkthrough's windows: (name, command, whether it runs at once). Example 1 runs; Examples 2 and 3 are typed,
# ready: press Enter in their window when the README's step says so.
WINDOWS = [("security", "python security_service.py", True),
           ("notification", "python notification_service.py", True),
           ("orchestrator", "python orchestrator.py --example 1", True),
           ("detector", "python security_detector.py", True),
           ("monitor", "python monitor.py", True),
           ("console", "python console.py", True),
           ("reporting", "python reporting_service.py --example 2", False),
           ("units", "python unit_event_producer.py", False)]
SESSION = "walkthrough"
CONSOLE_PORT = 8080  # console.py's own default


def walkthrough(attach: bool) -> int:
    """Open the tmux session of the examples by hand (or say how to reach the one already open)."""
    if shutil.which("tmux") is None:
        raise SystemExit("demo: tmux is not installed (apt-get install tmux, brew install tmux); or open one terminal "
                         "per script as the README shows")
    if subprocess.run(["tmux", "has-session", "-t", SESSION], capture_output=True).returncode != 0:
        for number, (name, command, run) in enumerate(WINDOWS):
            subprocess.run(["tmux", "new-session", "-d", "-s", SESSION, "-n", name, "-c", str(HERE)] if number == 0
                           else ["tmux", "new-window", "-t", SESSION, "-n", name, "-c", str(HERE)], check=True)
            keys = [f". {shlex.quote(str(HERE / '.venv/bin/activate'))} && {command}"] + (["Enter"] if run else [])
            subprocess.run(["tmux", "send-keys", "-t", f"{SESSION}:{name}", *keys], check=True)
        subprocess.run(["tmux", "select-window", "-t", f"{SESSION}:orchestrator"], check=True)
        print(f"tmux session {SESSION!r}: Example 1 runs in windows {', '.join(n for n, _, run in WINDOWS if run)}; "
              f"{', '.join(n for n, _, run in WINDOWS if not run)} are typed, ready for Examples 2 and 3 "
              f"(Ctrl-b n: next window; Ctrl-b d: leave it running; `tmux kill-session -t {SESSION}`: end it); the web "
              f"console: http://127.0.0.1:{CONSOLE_PORT}")
    else:
        print(f"tmux session {SESSION!r} is open already, its scripts as you left them (`tmux kill-session -t "
              f"{SESSION}` ends it, for a fresh one)")
    if not attach:
        print(f"attach with: tmux attach -t {SESSION}")
        return 0
    inside = "switch-client" if os.environ.get("TMUX") else "attach"  # (tmux refuses to attach inside tmux)
    return subprocess.run(["tmux", inside, "-t", SESSION]).returncode


def reset(settings: Settings, stores: tuple[str, ...] = (), patient: bool = True) -> list[str]:
    """Delete the walkthrough's topics (every project topic and family member of settings.topic_prefix, the
    revocations, and the state topics of its groups), its consumer groups and its SQLite files (`stores`: the report
    store, the zones); returns the topics deleted. patient=False: a group whose scripts stopped just now (still
    members until their session ends) is left, not waited for."""
    admin = KafkaAdminClient(**settings.kafka_config(), client_id="reset", bootstrap_timeout_ms=10_000)
    try:
        ours = re.compile(settings.pattern(TOPICS)[:-2] + "|" + "|".join(
            re.escape(changelog(group)) for group in groups()) + ")$")
        busy, until = [settings.group(group) for group in groups()], time.monotonic() + SESSION_TIMEOUT_MS / 1000 + 2
        while busy:  # (groups first: while a script runs nothing is deleted; one stopped just now is waited out)
            busy = [group for group, error in admin.delete_groups(busy).items()  # (kafka-python 3.0.12 names the
                    if NonEmptyGroupError.__name__ in str(error)]                 # error of each group)
            if busy and not patient:
                break
            if busy and time.monotonic() > until:
                raise SystemExit(f"demo: {', '.join(busy)} still {'has' if len(busy) == 1 else 'have'} members: "
                                 f"stop every script first (Ctrl-C in each terminal), then reset again")
            time.sleep(0.5 if busy else 0)
        topics = sorted(t for t in admin.list_topics() if ours.match(t))
        answer = admin.delete_topics(topics, raise_errors=False) if topics else {"topics": []}
        if failed := {t["name"]: t["error_message"] for t in answer["topics"] if t["error_code"]}:
            raise SystemExit(f"demo: could not delete {', '.join(sorted(failed))}: {next(iter(failed.values()))}")
    finally:
        admin.close()
    for store in stores:
        if os.path.exists(store):
            os.remove(store)
    return topics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="short stages (for tests)")
    parser.add_argument("--keep", action="store_true", help="keep the demo's report store and topics")
    parser.add_argument("--tmux", action="store_true", help="open a tmux session with a window per script of the "
                                                            "examples by hand, then exit")
    parser.add_argument("--reset", action="store_true", help="delete the walkthrough's topics, groups, state, "
                                                             "report store and zones (those of TOPIC_PREFIX), then exit")
    args = parser.parse_args()
    if args.tmux:
        return walkthrough(attach=sys.stdout.isatty())
    if args.reset:
        try:
            topics = reset(SETTINGS, (os.environ.get("REPORT_DB", "reports.db"), os.environ.get("SECURITY_DB", "security.db")))
        except KafkaError as error:
            raise SystemExit(f"demo: could not reset at {SETTINGS.bootstrap_servers}: {error}") from None
        prefixed = f" prefixed {SETTINGS.topic_prefix!r}" if SETTINGS.topic_prefix else ""
        print(f"reset: deleted {len(topics)} topics{prefixed}, the consumer groups, the report store and the zones; the "
              "walkthrough starts over")
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too stops everything the demo started
    own_prefix = not os.environ.get("TOPIC_PREFIX")
    prefix = os.environ.get("TOPIC_PREFIX") or f"demo{uuid.uuid4().hex[:6]}_"
    workdir = tempfile.mkdtemp(prefix="orchestration-demo-")
    env = dict(os.environ, TOPIC_PREFIX=prefix, REPORT_DB=os.path.join(workdir, "reports.db"),
               SECURITY_DB=os.path.join(workdir, "security.db"), PYTHONUNBUFFERED="1")
    settings = Settings.from_env(env)
    children, tail = Children(env), None
    console.print(f"Demo on Kafka at {settings.bootstrap_servers}, topics prefixed {prefix!r}, reports in {workdir}"
                  f"{'' if args.keep else ' (deleted at the end; --keep keeps it)'}")
    try:
        tail = Tail(Flow(settings=settings))  # (creates the topics, as every script does)
        walk = Walkthrough(children, tail, env, stage=3.0 if args.quick else 12.0)  # seconds each stage runs
        walk.example_1()
        gap = walk.example_2()
        walk.example_3()
        walk.example_4()
        return walk.finish(gap)
    except KeyboardInterrupt:
        console.print("[bold]Ctrl-C: stopping every process the demo started")
        return 130
    finally:
        children.stop_all()
        if tail:
            tail.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        if not args.keep and own_prefix:  # (topics it made under a prefix of its own: nobody needs them after)
            clean_up(settings)


def clean_up(settings: Settings) -> None:
    """Delete what the demo made under a prefix of its own; a broker gone meanwhile is said in one line."""
    try:
        reset(settings, patient=False)
    except KafkaError as error:
        console.print(f"demo: could not delete its topics prefixed {settings.topic_prefix!r}: Kafka at "
                      f"{settings.bootstrap_servers} does not answer ({type(error).__name__}); once it is back, "
                      f"`TOPIC_PREFIX={settings.topic_prefix} make reset` deletes them", soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
