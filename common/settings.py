"""Everything that differs between a laptop, CI and a real cluster, read once from the environment into one frozen
Settings object; the project's topic names; how groups and transactional ids are named; logging."""

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from common.workarounds import (ClientWarningsOncePer, HideClientRefusals, HidePassword, QuietClientChatter,
                                QuietOnceStopping)

# The engine's own topics, both families with one member per writer (message_stream.<script>): message_stream
# carries events and outcomes to the orchestrator (and its own time-outs and answers), dead_letter whatever could not
# be handled, with the reason. The application names its other topics in its contracts (contracts.py); a
# workflow's steps say which of them each command goes to.
MESSAGE_STREAM = "message_stream"
DEAD_LETTER = "dead_letter"
FAMILIES = [MESSAGE_STREAM, DEAD_LETTER]
REVOKED = "revoked"  # the orchestrator -> every service: the workflows a person cancelled (kept: compacted, by workflow)


def written_by(name: str, writer: str) -> str:
    """The topic `writer` writes when it writes `name`: its own member of a family, else `name` itself."""
    return f"{name}.{writer}" if name in FAMILIES else name


def family_of(topic_name: str) -> str:
    """The family a topic (name without prefix) belongs to: message_stream.<writer> -> message_stream."""
    return topic_name.split(".", 1)[0]

SIGN_IN = {  # kafka-python argument <- environment variable: how a script signs in to a secured cluster
    "security_protocol": "KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "sasl_plain_username": "KAFKA_SASL_USERNAME",
    "sasl_plain_password": "KAFKA_SASL_PASSWORD",
    "ssl_cafile": "KAFKA_SSL_CAFILE",
}


@dataclass(frozen=True)
class Settings:
    """Where Kafka is, how to sign in, and how this copy names its topics, groups and transactional ids."""
    bootstrap_servers: str = "localhost:9092"
    topic_prefix: str = ""        # isolates tests and tenants on one cluster: topics and groups get it
    partitions: int = 1           # for topics the scripts create
    replication_factor: int = -1  # -1: the cluster's default
    instance_id: str = "1"        # this copy's static member id and transactional id; one per running copy
    state_retention_s: float = 7 * 24 * 3600  # state entries (handled ids, workflows) not written for this long go
    accept_state_loss: bool = False  # start once on empty state where a group's state topic is gone (said, not silent)
    commit_window_s: float = 0.0  # a batch keeps gathering records this long before its one transaction commits
    sign_in: Mapping[str, str] = field(default_factory=dict)  # kafka-python SASL/TLS arguments (KAFKA_SASL_*, ...)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        return cls(bootstrap_servers=environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
                   topic_prefix=environ.get("TOPIC_PREFIX", ""),
                   partitions=int(environ.get("TOPIC_PARTITIONS", "1")),
                   replication_factor=int(environ.get("TOPIC_REPLICATION_FACTOR", "-1")),
                   instance_id=environ.get("INSTANCE_ID", "1"),
                   state_retention_s=float(environ.get("STATE_RETENTION_S", 7 * 24 * 3600)),
                   accept_state_loss=environ.get("ACCEPT_STATE_LOSS", "") not in ("", "0"),
                   commit_window_s=float(environ.get("COMMIT_WINDOW_MS", "0")) / 1000,
                   sign_in=MappingProxyType({arg: environ[env] for arg, env in SIGN_IN.items()
                                              if environ.get(env)}))

    def kept(self) -> dict[str, str]:
        """The config of a topic that keeps the last record of each key (a state topic, the revocations), and drops
        those not written for the state's retention."""
        retention_ms = int(self.state_retention_s * 1000)
        return {"cleanup.policy": "compact,delete", "retention.ms": str(retention_ms),
                "segment.ms": str(min(retention_ms, 24 * 3600 * 1000))}  # (a segment is deleted whole, once all expired)

    def kafka_config(self) -> dict[str, Any]:
        """Connection settings for every client: bootstrap address plus any SASL/TLS settings."""
        return {"bootstrap_servers": self.bootstrap_servers.split(","), "reconnect_backoff_max_ms": 1000,
                **self.sign_in}

    @property
    def user(self) -> str | None:
        return self.sign_in.get("sasl_plain_username")

    def topic(self, name: str) -> str:
        """The real topic name of a project topic (or of one member of a family)."""
        return self.topic_prefix + name

    def pattern(self, names: list[str]) -> str:
        """A regular expression matching the real names of `names`, a family matching each of its members."""
        alternatives = [re.escape(name) + (r"\..+" if name in FAMILIES else "") for name in names]
        return f"^{re.escape(self.topic_prefix)}({'|'.join(alternatives)})$"

    def group(self, name: str) -> str:
        """The real consumer group name: a prefix isolates groups as it isolates topics."""
        return self.topic_prefix + name

    def member(self, group: str) -> str:
        """This copy's static member id in the group; also its transactional id, so a copy that takes over from one
        that left the group knows whose open transaction to end (see Copies.end_departed in common/copies.py)."""
        return f"{self.group(group)}-{self.instance_id}"

    def transactional_id(self, group: str) -> str:
        """Stable per group and copy, so a restarted copy fences its own earlier self and nobody else."""
        return self.member(group)


SETTINGS = Settings.from_env()  # built once, at start; pass another Settings where a script needs another prefix


def topic(name: str) -> str:
    """The real topic name of a project topic under this process's settings."""
    return SETTINGS.topic(name)


def setup_logging() -> None:
    """Log lines with the time and the logger's name; kafka-python's own chatter only at DEBUG."""
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("kafka").setLevel(logging.WARNING)  # the client's own chatter hides the flow
        logging.getLogger("kafka.net.sasl").setLevel(logging.ERROR)  # "credentials in the clear": docs/operations.md says so
    for handler in logging.getLogger().handlers:
        handler.addFilter(HideClientRefusals())
        handler.addFilter(QuietClientChatter())
        handler.addFilter(QuietOnceStopping())
        handler.addFilter(ClientWarningsOncePer(30.0))
        handler.addFilter(HidePassword(SETTINGS.sign_in.get("sasl_plain_password")))
