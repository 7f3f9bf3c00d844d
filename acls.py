"""Who may do what on a secured cluster: one Kafka user per script, and ACLs that follow the single-writer rule.

Each script reads only its input topics, writes only the topics it owns (plus dead_letter, and message_stream for
the event sources: it is the orchestrator's inbox), and uses only its own consumer group and transactional id. Who
reads and writes what comes from the orchestrator's WORKFLOWS (a new workflow's scripts get their users with it).
Run:  python acls.py                  # as admin (KAFKA_SASL_* in the environment): create the topics and ACLs for
                                      # TOPIC_PREFIX; running it again changes nothing
      python acls.py --users FILE     # also create every user (SCRAM-SHA-512), passwords from FILE (a JSON object
                                      # user -> password; generated, readable by you only, if FILE does not exist)
      python acls.py --show           # print the table below
`python -m local_kafka start --secure` runs it for you. The monitor may read every topic and see group offsets;
dead_letters.py replays to any topic, so it runs as admin.
"""

import argparse
import json
import logging
import os
import secrets
from dataclasses import dataclass, field

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)
from kafka import KafkaAdminClient
from kafka.admin import (ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType,
                         UserScramCredentialUpsertion)
from kafka.errors import KafkaError

from common import (FAMILIES, MESSAGE_STREAM, SETTINGS, Settings, changelog, ensure_changelog, ensure_topics,
                    readers_and_writers, setup_logging, single_writer_topics, topics, written_by)
from orchestrator import WORKFLOWS

log = logging.getLogger("acls")


@dataclass
class Access:
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    group: str | None = None            # consumer group; "name*": every group named so (orchestrator-security, ...)
    transactional_id: str | None = None  # transactional id prefix (exactly-once producers)
    sees_groups: bool = False           # may read every group's committed offsets (the monitor's lag)
    keeps_state: bool = False           # owns its group's state topic(s), state.<group>: reads, writes, creates it
    reads_state: str | None = None      # may read the state topics of groups named so ("name*": every group so named)


def access_of(table) -> dict[str, Access]:
    """user -> what it may do: each script of the table as its WORKFLOWS say (one that consumes keeps its own group,
    transactional id and state), the monitor (reads everything, joins no group) and the operator (a person's requests:
    workflows.py cancel/retry, the console)."""
    users = {}
    for script, (reads, writes) in readers_and_writers(table).items():
        group = f"{script}*" if script == "orchestrator" else script  # (the split ones: orchestrator-security, ...)
        users[script] = Access(reads=reads, writes=writes, group=group if reads else None,
                               transactional_id=script if reads else None, keeps_state=bool(reads))
    users["monitor"] = Access(reads=topics(table), sees_groups=True,  # joins no group
                              reads_state="orchestrator*")  # the workflows (workflows.py, the console), not the services' ids
    users["operator"] = Access(writes=[MESSAGE_STREAM])
    return users


ACCESS = access_of(WORKFLOWS)


def members() -> list[str]:
    """Every member of a family that some user writes: message_stream.security_detector, dead_letter.orchestrator..."""
    return [written_by(name, user) for user, access in ACCESS.items() for name in access.writes if name in FAMILIES]


def acls_for(user: str, access: Access, prefix: str) -> list[ACL]:
    """The ACLs that give `user` exactly `access` on the topics and groups named with `prefix`."""
    principal = f"User:{user}"

    def allow(operation, resource_type, name, pattern=ACLResourcePatternType.LITERAL):
        return ACL(principal, "*", operation, ACLPermissionType.ALLOW, ResourcePattern(resource_type, name, pattern))

    def on_topics(operation, names):  # a family: every member (reading, seeing); writing: only this user's own member
        return [allow(operation, ResourceType.TOPIC, prefix + name + ".", ACLResourcePatternType.PREFIXED)
                if name in FAMILIES and operation != ACLOperation.WRITE else
                allow(operation, ResourceType.TOPIC, prefix + written_by(name, user)) for name in names]
    acls = on_topics(ACLOperation.DESCRIBE, topics(WORKFLOWS)) + on_topics(ACLOperation.READ, access.reads)  # (see
    acls += on_topics(ACLOperation.WRITE, access.writes)                                                  # they exist)
    if access.group:  # "name*" is every group whose name starts so
        pattern = ACLResourcePatternType.PREFIXED if access.group.endswith("*") else ACLResourcePatternType.LITERAL
        acls.append(allow(ACLOperation.READ, ResourceType.GROUP, prefix + access.group.removesuffix("*"), pattern))
    if access.sees_groups:  # every group of this TOPIC_PREFIX ("*", Kafka's wildcard, when there is none)
        acls.append(allow(ACLOperation.DESCRIBE, ResourceType.GROUP, prefix or "*",
                          ACLResourcePatternType.PREFIXED if prefix else ACLResourcePatternType.LITERAL))
    if access.keeps_state:  # (a split orchestrator's own, state.orchestrator-unit, is made when it first runs)
        for operation in (ACLOperation.READ, ACLOperation.WRITE, ACLOperation.DESCRIBE, ACLOperation.CREATE):
            acls.append(allow(operation, ResourceType.TOPIC, prefix + changelog(access.group.removesuffix("*")),
                              ACLResourcePatternType.PREFIXED))
    if access.reads_state:
        for operation in (ACLOperation.READ, ACLOperation.DESCRIBE):
            acls.append(allow(operation, ResourceType.TOPIC, prefix + changelog(access.reads_state.removesuffix("*")),
                              ACLResourcePatternType.PREFIXED if access.reads_state.endswith("*") else
                              ACLResourcePatternType.LITERAL))
    if access.transactional_id:
        for operation in (ACLOperation.WRITE, ACLOperation.DESCRIBE):
            acls.append(allow(operation, ResourceType.TRANSACTIONAL_ID, prefix + access.transactional_id,
                              ACLResourcePatternType.PREFIXED))
    return acls


def grant(admin_settings: Settings) -> int:
    """As the admin user of `admin_settings`: create the project's topics and every user's ACLs for its topic prefix;
    returns how many ACLs there are. Creating an ACL that exists already is a no-op."""
    admin = KafkaAdminClient(**admin_settings.kafka_config(), client_id="acls")
    try:  # (users may not create topics: every one they use, each writer's own members too, is made here)
        ensure_topics(admin, admin_settings, [*single_writer_topics(WORKFLOWS), *members()])
        for access in ACCESS.values():
            if access.keeps_state:
                ensure_changelog(admin, access.group.removesuffix("*"), admin_settings)
        acls = [acl for user, access in ACCESS.items() for acl in acls_for(user, access, admin_settings.topic_prefix)]
        result = admin.create_acls(acls)
        if result["failed"]:
            raise KafkaError(f"could not create {len(result['failed'])} ACLs: {result['failed'][0]}")
        return len(acls)
    finally:
        admin.close()


def create_users(admin_settings: Settings, passwords: dict[str, str]) -> None:
    """As the admin user of `admin_settings`: create (or reset) a SCRAM-SHA-512 user per entry of `passwords`."""
    admin = KafkaAdminClient(**admin_settings.kafka_config(), client_id="acls")
    try:
        failed = {user: error for user, error in admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(user, "SCRAM-SHA-512", password) for user, password in passwords.items()]
        ).items() if error}
        if failed:
            raise KafkaError(f"could not create users: {failed}")
    finally:
        admin.close()


def passwords_file(path: str) -> dict[str, str]:
    """The users' passwords from a JSON file, made (owner-only) with fresh random passwords if it does not exist."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            json.dump({user: secrets.token_urlsafe(18) for user in ("admin", *ACCESS)}, out, indent=1)
    with open(path) as source:
        return json.load(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--show", action="store_true", help="print who may do what, change nothing")
    parser.add_argument("--users", metavar="FILE", help="also create the users, with the passwords in FILE")
    args = parser.parse_args()
    setup_logging()
    logging.getLogger("kafka").setLevel(logging.INFO)  # at DEBUG kafka-python would log the users' salted passwords
    if args.show:
        for user, access in ACCESS.items():
            writes = ", ".join(written_by(name, user) for name in access.writes) or "-"
            print(f"{user:<21} reads {', '.join(access.reads) or '-'}; writes {writes}"
                  f"{f'; group {access.group}' if access.group else ''}{'; sees every group' if access.sees_groups else ''}"
                  f"{f'; owns {changelog(access.group)}' if access.keeps_state else ''}"
                  f"{f'; transactional id {access.transactional_id}*' if access.transactional_id else ''}")
        return
    try:
        if args.users:
            passwords = passwords_file(args.users)
            create_users(SETTINGS, passwords)
            log.info("users %s created (passwords in %s)", ", ".join(passwords), args.users)
        count = grant(SETTINGS)
    except KafkaError as error:
        raise SystemExit(f"acls: {type(error).__name__}: {error}") from None
    log.info("topics and %d ACLs in place for topic prefix %r at %s", count, SETTINGS.topic_prefix,
             SETTINGS.bootstrap_servers)


if __name__ == "__main__":
    main()
