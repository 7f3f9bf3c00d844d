"""docker-compose-expose.yml cannot be started without a Docker engine, so check what Docker users will get."""

import pytest
import yaml
from helpers import KAFKA_IMAGE, ROOT

import acls
import local_kafka
from common import family_of, single_writer_topics
from local_kafka import KAFKA_VERSION
from orchestrator import WORKFLOWS

pytestmark = pytest.mark.no_broker  # runs in `make check`

SEED_TOPICS = {"message_stream", "sec_command", "unit_command", "notification_command", "report_data", "third_party"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose-expose.yml").read_text())


def test_compose_runs_the_official_kraft_image_of_the_tested_version_on_localhost_9092():
    kafka = compose()["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}" == KAFKA_IMAGE
    assert "9092:9092" in kafka["ports"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "PLAINTEXT://localhost:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == 0
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert "healthcheck" in kafka


def test_compose_creates_the_seed_topics_and_each_writers_members_after_the_broker_is_healthy():
    init = compose()["services"]["init-topics"]
    assert init["image"].startswith("apache/kafka:")  # the native image has no bin/*.sh
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = init["command"][0]
    created = set(script.split("for t in ")[1].split(";")[0].split())
    # (the seed's topics and the members of the table's writers; a workflow added later needs no line here: every
    # script creates the topics it uses)
    assert {family_of(topic) for topic in created} == SEED_TOPICS | {"dead_letter"}
    assert created <= {*single_writer_topics(WORKFLOWS), *acls.members()}


def properties(path) -> dict[str, str]:
    """A local_kafka properties file as a dict (continuation lines joined)."""
    text = path.read_text().replace("\\\n", "")
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def as_property(env_name: str) -> str:
    """The apache/kafka image's reading of an environment variable: "___" is "-", "__" is "_", "_" is "."."""
    name = env_name.removeprefix("KAFKA_").lower()
    return name.replace("___", "\0").replace("__", "\1").replace("_", ".").replace("\0", "-").replace("\1", "_")


def test_secure_compose_signs_in_and_authorizes_like_local_kafka_secure():
    secure = yaml.safe_load((ROOT / "docker-compose-secure.yml").read_text())["services"]
    env = {as_property(k): str(v) for k, v in secure["kafka"]["environment"].items()}
    local = properties(ROOT / "local_kafka" / "listeners-secure.properties")
    for setting in ("authorizer.class.name", "super.users", "allow.everyone.if.no.acl.found", "sasl.enabled.mechanisms",
                    "sasl.mechanism.controller.protocol"):
        assert env[setting].lower() == local[setting].lower(), setting
    assert "PLAINTEXT:PLAINTEXT" not in env["listener.security.protocol.map"]  # no listener without sign-in
    # every listener has a login module for each mechanism it offers (else the broker does not start)
    for listener in (entry.split(":")[0].lower() for entry in env["listener.security.protocol.map"].split(",")):
        for mechanism in env.get(f"listener.name.{listener}.sasl.enabled.mechanisms", env["sasl.enabled.mechanisms"]).split(","):
            assert f"listener.name.{listener}.{mechanism.lower()}.sasl.jaas.config" in env, (listener, mechanism)
    assert secure["kafka"]["image"] == KAFKA_IMAGE
    # and the users, topics and ACLs come from this repository's acls.py, as admin, once the broker is healthy
    init = secure["init-users"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "python acls.py --users" in init["command"][-1]
    assert init["environment"]["KAFKA_SASL_USERNAME"] == "admin"


def test_cluster_compose_runs_three_nodes_with_three_replicas_and_min_isr_two_like_local_kafka(tmp_path):
    services = yaml.safe_load((ROOT / "docker-compose-cluster.yml").read_text())["services"]
    nodes = [services[f"kafka-{i}"] for i in (1, 2, 3)]
    assert [n["environment"]["KAFKA_NODE_ID"] for n in nodes] == [1, 2, 3]
    assert [n["ports"] for n in nodes] == [["9092:9092"], ["9093:9092"], ["9094:9092"]]
    assert len({n["environment"]["CLUSTER_ID"] for n in nodes}) == 1
    env = nodes[0]["environment"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].count("@") == 3
    assert (env["KAFKA_DEFAULT_REPLICATION_FACTOR"], env["KAFKA_MIN_INSYNC_REPLICAS"]) == (3, 2)
    assert (env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"], env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == (3, 2)
    config = tmp_path / "server.properties"
    local_kafka.write_config(config, node_id=1, port=1, controller_port=2, voters="", nodes=3, log_dirs=tmp_path,
                             admin_password=None)
    local = properties(config)
    for setting in ("default.replication.factor", "min.insync.replicas", "offsets.topic.replication.factor",
                    "transaction.state.log.replication.factor", "transaction.state.log.min.isr",
                    "broker.session.timeout.ms", "group.initial.rebalance.delay.ms"):
        assert str(env["KAFKA_" + setting.upper().replace(".", "_")]) == local[setting], setting
    assert "--replication-factor 3" in services["init-topics"]["command"][0]
