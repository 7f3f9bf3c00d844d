"""The fixtures: a real Kafka for the tests, each test's own environment, and the helpers of helpers.py bound to it.

The broker: KAFKA_BOOTSTRAP_SERVERS if set; else a throwaway apache/kafka container where a Docker engine answers;
else `local_kafka` on a free port in a temp dir, stopped when the session ends. Every test gets its own topic
prefix (so its own topics) and its own report store, so tests never see each other's messages.
Tests marked `no_broker` (run by `make check`) may not ask for the broker, nor reach one: the `kafka` fixture fails
them, and so does any Kafka client they make (a broker a user runs on localhost:9092 would otherwise answer it, and
the test would pass there and fail where none runs).
"""

import os
import uuid

import pytest
from helpers import KAFKA_IMAGE, Scripts, topic_readers, writer_of
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.net.manager import KafkaConnectionManager

import acls
import local_kafka
from common import Envelope, single_writer_topics
from orchestrator import WORKFLOWS


def docker_engine_answers() -> bool:
    try:
        import docker
        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 -- any failure here just means "no Docker engine": fall back to local_kafka
        return False


@pytest.fixture(autouse=True)
def no_kafka_client_without_a_broker(request, monkeypatch):
    """A test marked no_broker fails at once if anything it runs makes a Kafka client (producer, consumer, admin)."""
    if request.node.get_closest_marker("no_broker"):
        def refused(*args, **kwargs):
            pytest.fail("a test marked no_broker made a Kafka client: give it what it would read instead")
        monkeypatch.setattr(KafkaConnectionManager, "__init__", refused)


@pytest.fixture
def kafka(request, session_kafka):
    """The bootstrap address of the session's real broker (refused to tests marked no_broker)."""
    if request.node.get_closest_marker("no_broker"):
        pytest.fail("a test marked no_broker asked for the broker")
    return session_kafka


@pytest.fixture(scope="session")
def session_kafka(tmp_path_factory):
    """The bootstrap address of a real broker, started once for the whole session."""
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
    """Environment for scripts run by this test: the session broker, a unique topic prefix, its own report store and
    zones."""
    return dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka, TOPIC_PREFIX=f"t{uuid.uuid4().hex[:10]}_",
                REPORT_DB=str(tmp_path / "reports.db"), SECURITY_DB=str(tmp_path / "security.db"), LOG_LEVEL="INFO",
                PYTHONUNBUFFERED="1")


@pytest.fixture
def scripts(env, tmp_path):
    runner = Scripts(env, tmp_path)
    yield runner
    runner.stop_all()


@pytest.fixture
def topics(env):
    """topics(name) -> a TopicReader of this test's topic `name`."""
    with topic_readers(env) as reader:
        yield reader


@pytest.fixture
def producer(env):
    """A raw producer, for writing test input (good or bad) straight to this test's topics (created here)."""
    admin = KafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    for name in [*single_writer_topics(WORKFLOWS), *acls.members()]:
        try:
            admin.create_topics([NewTopic(env["TOPIC_PREFIX"] + name, 1, 1)])
        except TopicAlreadyExistsError:  # a script of this test got there first
            pass
    admin.close()
    p = KafkaProducer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])

    def send(name: str, value: bytes | Envelope | None, key: bytes | None = None, at: float | None = None):
        """Write to topic `name` (in a family: the member of the script that would send `value`); `at`: the record's
        time (epoch seconds; default now)."""
        real = env["TOPIC_PREFIX"] + writer_of(name, value)
        return p.send(real, value=value.to_bytes() if isinstance(value, Envelope) else value, key=key,
                      timestamp_ms=None if at is None else int(at * 1000)).get(timeout=30)
    yield send
    p.close()


