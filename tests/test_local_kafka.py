"""The real broker: local_kafka's commands and errors, and a round trip through whichever broker the session uses."""

import os
import socket
import subprocess
import sys
import uuid

from helpers import ROOT
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

import local_kafka


def local_kafka_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "local_kafka", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_message_produced_is_consumed_through_the_real_broker(kafka):
    # Given a fresh topic on the session's broker
    name = f"roundtrip_{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    admin.create_topics([NewTopic(name, 1, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka)
    # When a message is produced and acknowledged
    producer.send(name, b"hello", key=b"k").get(timeout=30)
    producer.close()
    # Then a consumer reads exactly that message back
    consumer = KafkaConsumer(name, bootstrap_servers=kafka, auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    records = [next(consumer)]
    consumer.close()
    assert [(r.key, r.value) for r in records] == [(b"k", b"hello")]


def test_start_twice_leaves_one_broker_and_stop_frees_the_port(tmp_path):
    # Given a broker started on a free port
    port = str(local_kafka.free_port())
    first = local_kafka_cli("start", "--port", port, "--dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert f"ready at 127.0.0.1:{port}" in first.stdout and "log: " in first.stdout
    try:
        # When start is called again for the same directory
        second = local_kafka_cli("start", "--port", port, "--dir", str(tmp_path))
        # Then it reuses the running broker
        assert second.returncode == 0 and "already running" in second.stdout
        status = local_kafka_cli("status", "--dir", str(tmp_path))
        assert status.stdout.startswith(f"running at 127.0.0.1:{port}") and "; group coordinator answers" in status.stdout
    finally:
        stopped = local_kafka_cli("stop", "--dir", str(tmp_path))
    # And stop ends it and frees the port
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert local_kafka.port_is_free(int(port))
    status = local_kafka_cli("status", "--dir", str(tmp_path))
    assert status.returncode == 1 and status.stdout.strip() == "not running"


def test_start_on_a_port_taken_by_something_else_says_so(tmp_path):
    # Given a port held by another listener
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = str(other.getsockname()[1])
        # When local_kafka is asked to start there
        result = local_kafka_cli("start", "--port", port, "--dir", str(tmp_path))
    # Then it refuses with one clear line and a non-zero exit
    assert result.returncode == 2
    assert result.stderr.strip() == f"local_kafka: port {port} is already in use by another process; pick another with --port"


def test_start_without_java_says_so(tmp_path):
    # Given an environment where no java can be found
    env = dict(os.environ, PATH="/nonexistent")
    env.pop("JAVA_HOME", None)
    # When local_kafka is asked to start
    result = local_kafka_cli("start", "--port", str(local_kafka.free_port()), "--dir", str(tmp_path), env=env)
    # Then it says Java is missing, in one line
    assert result.returncode == 2
    assert result.stderr.strip().startswith("local_kafka: Java 17 or newer is needed")
    assert len(result.stderr.strip().splitlines()) == 1


def test_stop_when_nothing_runs_is_harmless(tmp_path):
    result = local_kafka_cli("stop", "--dir", str(tmp_path))
    assert result.returncode == 0 and "no Kafka running" in result.stdout
