"""A real Kafka for the tests, and helpers to run the scripts as users do and read what they wrote.

The broker: KAFKA_BOOTSTRAP_SERVERS if set; else a throwaway apache/kafka container where a Docker engine answers;
else `local_kafka` on a free port in a temp dir, stopped when the session ends. Every test gets its own topic
prefix (so its own topics) and its own report store, so tests never see each other's messages.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from pydantic import ValidationError

import common
import local_kafka

ROOT = Path(__file__).resolve().parent.parent
KAFKA_IMAGE = "apache/kafka:4.1.1"


def docker_engine_answers() -> bool:
    try:
        import docker
        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 -- any failure here just means "no Docker engine": fall back to local_kafka
        return False


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """The bootstrap address of a real broker for the whole session."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif docker_engine_answers():
        yield from kafka_container()
    else:
        data_dir = tmp_path_factory.mktemp("kafka")
        broker, _ = local_kafka.start(local_kafka.free_port(), data_dir)
        try:
            yield broker.address
        finally:
            local_kafka.stop(data_dir)


def kafka_container():
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs
    port = local_kafka.free_port()
    container = (DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, port).with_envs(
        KAFKA_NODE_ID="1", KAFKA_PROCESS_ROLES="broker,controller",
        KAFKA_LISTENERS="PLAINTEXT://:9092,CONTROLLER://:9093",
        KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://localhost:{port}",
        KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER", KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
        KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1", KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1", KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR="1", KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0"))
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield f"localhost:{port}"


@pytest.fixture
def env(kafka, tmp_path):
    """Environment for scripts run by this test: the session broker, a unique topic prefix, its own report store."""
    return dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka, TOPIC_PREFIX=f"t{uuid.uuid4().hex[:10]}_",
                REPORT_DB=str(tmp_path / "reports.db"), LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")


class Scripts:
    """Runs the project's scripts as subprocesses, each with its log file; ends them all when the test ends.
    On a secure cluster (`users` set: user -> password) each script signs in as the user named after it."""

    def __init__(self, env: dict, logs: Path, users: dict[str, str] | None = None):
        self.env, self.logs, self.running, self.users = env, logs, [], users

    def env_for(self, script: str, **extra: str) -> dict:
        user = Path(script).stem
        if self.users and user in self.users:
            return dict(self.env, KAFKA_SASL_USERNAME=user, KAFKA_SASL_PASSWORD=self.users[user], **extra)
        return dict(self.env, **extra)

    def start(self, script: str, *args: str, **extra_env: str) -> subprocess.Popen:
        log = open(self.logs / f"{script}-{len(self.running)}.log", "w")
        process = subprocess.Popen([sys.executable, str(ROOT / script), *args], env=self.env_for(script, **extra_env),
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        process.log_path = log.name
        self.running.append(process)
        return process

    def run(self, script: str, *args: str, timeout: float = 60, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run a script to completion (a producer with --count, a summary); check: fail the test unless it exits 0.
        `env`: instead of the script's own environment."""
        result = subprocess.run([sys.executable, str(ROOT / script), *args], env=env or self.env_for(script), cwd=ROOT,
                                capture_output=True, text=True, timeout=timeout)
        assert not check or result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def restart(self, process: subprocess.Popen, sig: int = signal.SIGTERM) -> subprocess.Popen:
        """Stop a script (SIGKILL for a crash) and start it again with the same arguments."""
        self.stop(process, sig)
        return self.start(*[Path(arg).name if i == 0 else arg for i, arg in enumerate(process.args[1:])])

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


@pytest.fixture
def scripts(env, tmp_path):
    runner = Scripts(env, tmp_path)
    yield runner
    runner.stop_all()


class TopicReader:
    """Reads one of this test's topics from the beginning, keeping what it has read (committed messages only)."""

    def __init__(self, env: dict, name: str):
        self.consumer = KafkaConsumer(env["TOPIC_PREFIX"] + name, **common.kafka_config(env),
                                      auto_offset_reset="earliest", enable_auto_commit=False,
                                      isolation_level="read_committed", consumer_timeout_ms=200)
        self.raw: list = []

    def messages(self) -> list[common.Envelope]:
        """The valid envelopes read so far (a test may have written junk to the topic on purpose)."""
        messages = []
        for record in self.raw:
            try:
                messages.append(common.Envelope.model_validate_json(record.value))
            except ValidationError:
                pass
        return messages

    def read_until(self, predicate, timeout: float = 60) -> list[common.Envelope]:
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

    def read_count(self, count: int, timeout: float = 60, type_: str | None = None) -> list[common.Envelope]:
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


@pytest.fixture
def topics(env):
    """topics(name) -> a TopicReader of this test's topic `name`."""
    with topic_readers(env) as reader:
        yield reader


@pytest.fixture
def producer(env):
    """A raw producer, for writing test input (good or bad) straight to this test's topics (created here)."""
    admin = KafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    try:
        admin.create_topics([NewTopic(env["TOPIC_PREFIX"] + name, 1, 1) for name in common.ALL_TOPICS])
    except TopicAlreadyExistsError:  # a script of this test got there first
        pass
    admin.close()
    p = KafkaProducer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])

    def send(name: str, value: bytes | common.Envelope, key: bytes | None = None):
        if isinstance(value, common.Envelope):
            value = value.to_bytes()
        return p.send(env["TOPIC_PREFIX"] + name, value=value, key=key).get(timeout=30)  # RecordMetadata
    yield send
    p.close()


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
