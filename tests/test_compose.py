"""docker-compose-expose.yml cannot be started without a Docker engine, so check what Docker users will get."""

import yaml
from conftest import KAFKA_IMAGE, ROOT

from common import ALL_TOPICS
from local_kafka import KAFKA_VERSION

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


def test_compose_creates_the_seed_topics_and_dead_letter_after_the_broker_is_healthy():
    init = compose()["services"]["init-topics"]
    assert init["image"].startswith("apache/kafka:")  # the native image has no bin/*.sh
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = init["command"][0]
    created = set(script.split("for t in ")[1].split(";")[0].split())
    assert created == SEED_TOPICS | {"dead_letter"} == set(ALL_TOPICS)
