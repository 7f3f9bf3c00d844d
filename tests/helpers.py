"""What the tests share: running the scripts as users do, reading what they wrote, and the test messages.
Imported by conftest.py (the fixtures) and by the test files; no test file imports another."""

import json
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from pydantic import ValidationError

from common import (FAMILIES, MESSAGE_STREAM, Envelope, Settings, changelog, ensure_changelog, new_event, senders,
                    written_by)
from orchestrator import WORKFLOWS

ROOT = Path(__file__).resolve().parent.parent
KAFKA_IMAGE = "apache/kafka:4.1.1"
# Tests of crashes and outages count one command per workflow; a long time limit keeps the orchestrator's resends
# (same id, after a step's limit passes while a copy is down) out of that count. Time limits: test_state.py.
NO_RESENDS = ("--step-timeout", "300")


def detection(severity=3):
    return new_event("security_detection", {"sensor_id": "sensor-1", "zone": "zone-1", "kind": "motion",
                                            "severity": severity}, "test")


def unit_event(status="battery_low"):
    return new_event("unit_event", {"unit_id": "unit-1", "status": status, "battery": 12}, "test")


class Scripts:
    """Runs the project's scripts as subprocesses, each with its log file; ends them all when the test ends.
    On a secure cluster (`users` set: user -> password) each script signs in as the user named after it. `root`: the
    project whose scripts they are (a copy of this one, say)."""

    def __init__(self, env: dict, logs: Path, users: dict[str, str] | None = None, root: Path = ROOT):
        self.env, self.logs, self.running, self.users, self.root = env, logs, [], users, root

    def env_for(self, script: str, **extra: str) -> dict:
        user = Path(script).stem
        if self.users and user in self.users:
            return dict(self.env, KAFKA_SASL_USERNAME=user, KAFKA_SASL_PASSWORD=self.users[user], **extra)
        return dict(self.env, **extra)

    def start(self, script: str, *args: str, **extra_env: str) -> subprocess.Popen:
        log = open(self.logs / f"{script}-{len(self.running)}.log", "w")
        process = subprocess.Popen([sys.executable, str(self.root / script), *args],
                                   env=self.env_for(script, **extra_env), cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        process.log_path, process.extra_env = log.name, extra_env
        self.running.append(process)
        return process

    def run(self, script: str, *args: str, timeout: float = 60, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run a script to completion (a producer with --count, a summary); check: fail the test unless it exits 0.
        `env`: instead of the script's own environment."""
        result = subprocess.run([sys.executable, str(self.root / script), *args], env=env or self.env_for(script),
                                cwd=self.root, capture_output=True, text=True, timeout=timeout)
        assert not check or result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def restart(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> subprocess.Popen:
        """Stop a script (SIGKILL for a crash) and start it again with the same arguments and environment."""
        self.stop(process, sig)
        return self.start(*[Path(arg).name if i == 0 else arg for i, arg in enumerate(process.args[1:])],
                          **process.extra_env)

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
        """Signal a script and wait for it to exit; returns its exit code."""
        process.send_signal(sig)
        return process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.terminate()
        for process in self.running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    def output(self, process: subprocess.Popen) -> str:
        return Path(process.log_path).read_text()

    def wait_for_output(self, process: subprocess.Popen, text: str, timeout: float = 60) -> None:
        """Poll the script's log until it contains `text` (a readiness probe); fail if it exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        while text not in self.output(process):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{process.args[1]} did not log {text!r}:\n{self.output(process)[-2000:]}")
            time.sleep(0.1)


def wait_until(probe, timeout: float = 60, what: str = "the condition"):
    """Ask `probe()` again until it answers something other than None (its answer), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while (answer := probe()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not hold within {timeout:.0f} s")
        time.sleep(0.2)
    return answer


class TopicReader:
    """Reads one of this test's topics (a family: all its members, even those made later) from the beginning,
    keeping what it has read (committed messages only)."""

    def __init__(self, env: dict, name: str):
        settings = Settings.from_env(env)
        self.consumer = KafkaConsumer(**settings.kafka_config(), auto_offset_reset="earliest", enable_auto_commit=False,
                                      isolation_level="read_committed", consumer_timeout_ms=200, metadata_max_age_ms=500)
        self.consumer.subscribe(pattern=settings.pattern([name]))
        self.raw: list = []

    def messages(self) -> list[Envelope]:
        """The valid envelopes read so far (a test may have written junk to the topic on purpose)."""
        messages = []
        for record in self.raw:
            try:
                messages.append(Envelope.model_validate_json(record.value))
            except ValidationError:
                pass
        return messages

    def read_until(self, predicate, timeout: float = 60) -> list[Envelope]:
        """Read until predicate(messages so far) holds; fail with what was read if the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.raw.extend(batch)
            messages = self.messages()
            if predicate(messages):
                return messages
            if time.monotonic() > deadline:
                types = {}
                for m in messages:
                    types[m.type] = types.get(m.type, 0) + 1
                pytest.fail(f"timed out on {self.consumer.subscription()}: read {len(messages)} {types}")

    def read_count(self, count: int, timeout: float = 60, type_: str | None = None) -> list[Envelope]:
        """Read until at least `count` messages (of `type_`, if given) are there; returns just those."""
        def matching(ms):
            return [m for m in ms if type_ is None or m.type == type_]
        return matching(self.read_until(lambda ms: len(matching(ms)) >= count, timeout))

    def close(self):
        self.consumer.close()


@contextmanager
def topic_readers(env: dict):
    """reader(name) -> a TopicReader of the topic `name` of env's TOPIC_PREFIX; all closed at the end."""
    readers = []

    def reader(name: str) -> TopicReader:
        readers.append(TopicReader(env, name))
        return readers[-1]
    try:
        yield reader
    finally:
        for r in readers:
            r.close()


def report_summary(scripts: Scripts) -> dict:
    if not Path(scripts.env["REPORT_DB"]).exists():  # the reporting service has not created its store yet
        return {"reports": 0, "workflows": {}, "categories": {}, "units_needing_attention": []}
    return json.loads(scripts.run("reporting_service.py", "--summary", "--json").stdout)


def wait_for_reports(scripts: Scripts, count: int, workflow: str | None = None, timeout: float = 60) -> dict:
    """Poll the report store (through the CLI users have) until it holds `count` reports (of `workflow`)."""
    deadline = time.monotonic() + timeout
    while True:
        summary = report_summary(scripts)
        stored = summary["workflows"].get(workflow, 0) if workflow else summary["reports"]
        if stored >= count:
            return summary
        if time.monotonic() > deadline:
            pytest.fail(f"the report store holds {stored} {workflow or ''} reports, not {count}: {summary}")


def actions(scripts: Scripts) -> int:
    """How many security actions the zones have had applied (the security service's SQLite file, SECURITY_DB)."""
    path = scripts.env["SECURITY_DB"]
    if not Path(path).exists():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM applied").fetchone()[0]


def ids_of(messages, type_):
    return {m.workflow_id for m in messages if m.type == type_}


def detections(messages):
    return ids_of(messages, "security_detection")


def exactly_one_each(workflows, *readers, timeout=90):
    """Wait until each reader holds a message of every workflow, then check it holds exactly one per workflow."""
    for reader in readers:
        reader.read_until(lambda ms: workflows <= {m.workflow_id for m in ms}, timeout)
        assert sorted(m.workflow_id for m in reader.messages()) == sorted(workflows)


def wait_completed(stream, third_party, workflows, timeout=60):
    """Wait until every workflow has its security outcome and its delivered notification."""
    stream.read_until(lambda ms: workflows <= ids_of(ms, "security_action_completed"), timeout)
    third_party.read_until(lambda ms: workflows <= ids_of(ms, "notification_delivered"), timeout)


def worst_delay(causes, cause_type: str, effects, effect_type: str) -> float:
    """The longest time, in seconds, from a cause (by its timestamp) to its effect in the same workflow: with a
    copy killed, that is how long its partitions waited for the others to take them over."""
    def stamps(reader, type_):
        return {m.workflow_id: r.timestamp for r, m in zip(reader.raw, map(envelope_of, reader.raw), strict=True)
                if m.type == type_}
    began, done = stamps(causes, cause_type), stamps(effects, effect_type)
    return max(done[w] - began[w] for w in done) / 1000


def writer_of(name: str, value) -> str:
    """The real topic a test writes `value` to for `name`: in a family, the member of the script that would send
    it (a detection: message_stream.security_detector); junk goes where the detector writes, or the orchestrator."""
    if name not in FAMILIES:
        return name
    may_send = {t: member for member, types in senders(WORKFLOWS, set(WORKFLOWS)).items() for t in types}
    if isinstance(value, Envelope) and name == MESSAGE_STREAM and value.type in may_send:
        return may_send[value.type]
    return written_by(name, "security_detector" if name == MESSAGE_STREAM else "orchestrator")


def envelope_of(record) -> Envelope:
    return Envelope.model_validate_json(record.value)


def write_raw(env, group: str, records) -> None:
    """Write (key, value) records straight to a group's state topic, partition 0, as any client on an unsecured
    cluster can."""
    settings = Settings(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"], topic_prefix=env["TOPIC_PREFIX"])
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    ensure_changelog(admin, group, settings)
    admin.close()
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=50, batch_size=1024 * 1024,
                             max_request_size=1024 * 1024)
    for key, value in records:
        producer.send(settings.topic(changelog(group)), key=key, value=value, partition=0)
    producer.flush()
    producer.close()
