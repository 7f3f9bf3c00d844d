"""A secured broker (SASL/SCRAM users, ACLs): the examples run unchanged with each script signed in as itself, and
whoever has no right to something is refused with one clear line, with nothing written."""

import os
import socket
import subprocess
import sys
import threading
import uuid

import pytest
from helpers import ROOT, Scripts, detection, detections, ids_of, topic_readers, unit_event, wait_completed, wait_for_reports
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import TopicAuthorizationFailedError
from kafka.structs import TopicPartition

import acls
import local_kafka
from common import DEAD_LETTER, MESSAGE_STREAM, OPERATOR, Settings, about, caused_by, dead_letter, written_by
from contracts import NOTIFICATION_COMMAND, SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND
from orchestrator import route


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory):
    """A broker started with `--secure`: (its cluster, the users' passwords)."""
    data_dir = tmp_path_factory.mktemp("secure-kafka")
    cluster, _ = local_kafka.start(local_kafka.free_port(), data_dir, secure=True)
    try:
        yield cluster, local_kafka.credentials(data_dir), data_dir
    finally:
        local_kafka.stop(data_dir)


@pytest.fixture
def secure_scripts(secure_kafka, tmp_path):
    """Scripts that each sign in as their own user, on topics (prefixed for this test) that acls.py granted."""
    cluster, passwords, data_dir = secure_kafka
    env = dict(os.environ, **local_kafka.client_env(cluster.address, True, data_dir, "admin"),
               TOPIC_PREFIX=f"s{uuid.uuid4().hex[:10]}_",
               REPORT_DB=str(tmp_path / "reports.db"), LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    acls.grant(Settings.from_env(env))
    runner = Scripts(env, tmp_path, users=passwords)
    yield runner
    runner.stop_all()


@pytest.fixture
def secure_topics(secure_scripts):
    """Readers of this test's topics, signed in as admin."""
    with topic_readers(secure_scripts.env) as reader:
        yield reader


def test_examples_run_unchanged_with_each_script_signed_in_as_itself(secure_scripts, secure_topics, secure_kafka):
    # Given every script of Example 3 running as its own user with only its own rights
    for script in ("security_service.py", "notification_service.py", "orchestrator.py"):
        secure_scripts.start(script)
    secure_scripts.start("reporting_service.py", "--example", "3")
    secure_scripts.start("unit_event_producer.py", "--count", "6", "--rate", "20")
    # When detections are produced
    secure_scripts.run("security_detector.py", "--count", "10", "--rate", "50")
    stream, third_party = secure_topics(MESSAGE_STREAM), secure_topics(THIRD_PARTY)
    # Then every security workflow completes and every unit event gets its command and report
    workflows = detections(stream.read_count(10, type_="security_detection"))
    wait_completed(stream, third_party, workflows)
    units = ids_of(stream.read_count(6, type_="unit_event"), "unit_event")
    assert units <= ids_of(secure_topics(UNIT_COMMAND).read_count(6), "unit_command")
    summary = wait_for_reports(secure_scripts, 16)
    assert summary["workflows"] == {"security": 10, "unit": 6}
    # And no password appears in any script's output
    logs = "".join(secure_scripts.output(p) for p in secure_scripts.running)
    assert not [user for user, password in secure_kafka[1].items() if password in logs]


def refusal(result) -> list[str]:
    """The script's error lines (from our code), after checking it stopped without a traceback and that no other
    error line (the client's own) stands beside them."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert all(" common ERROR " in line for line in errors), errors
    return errors


def test_a_client_without_credentials_is_refused_with_one_line(secure_scripts):
    # Given no sign-in settings at all
    env = {k: v for k, v in secure_scripts.env.items() if not k.startswith(("KAFKA_SASL", "KAFKA_SECURITY"))}
    # When a producer tries to connect
    result = secure_scripts.run("security_detector.py", "--count", "1", env=env, check=False)
    # Then it stops at once with one line saying the broker wants sign-in
    assert result.returncode == 2
    assert [line.split(" common ERROR ")[1] for line in refusal(result)] == [
        f"security_detector: Kafka at {env['KAFKA_BOOTSTRAP_SERVERS']} accepts connections but closes ours: it wants "
        f"clients to sign in; set KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and "
        f"KAFKA_SASL_PASSWORD"]


def test_a_wrong_password_is_refused_with_one_line_that_does_not_show_it(secure_scripts):
    # Given the orchestrator's user name with a wrong password
    env = dict(secure_scripts.env, KAFKA_SASL_USERNAME="orchestrator", KAFKA_SASL_PASSWORD="not-the-password-42")
    # When the orchestrator starts
    result = secure_scripts.run("orchestrator.py", env=env, check=False)
    # Then it stops with one line naming the user and the broker's reason, and never the password
    assert result.returncode == 2
    [line] = refusal(result)
    assert "refused to sign in user 'orchestrator'" in line and "invalid credentials" in line
    assert "not-the-password-42" not in result.stdout + result.stderr


def test_writing_a_topic_it_does_not_own_is_refused_and_nothing_is_written(secure_scripts):
    # Given the detector run as the reporting service's user, which may not write message_stream
    env = secure_scripts.env_for("reporting_service.py")
    # When it produces a detection
    result = secure_scripts.run("security_detector.py", "--count", "3", "--rate", "50", env=env, check=False)
    # Then it stops with one line naming the user and the topic
    assert result.returncode == 3
    [line] = refusal(result)
    assert "does not allow user 'reporting_service'" in line and "TopicAuthorizationFailedError" in line
    assert line.rstrip().endswith("ask the cluster's admin")
    # And nothing reached message_stream
    assert committed_records(secure_scripts.env, written_by(MESSAGE_STREAM, "security_detector")) == []


def committed_records(env: dict, name: str) -> list:
    """Every committed record of the test's topic `name`, read to its end as admin."""
    consumer = KafkaConsumer(**Settings.from_env(env).kafka_config(), isolation_level="read_committed", enable_auto_commit=False)
    try:
        topic = env["TOPIC_PREFIX"] + name
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        end, records = consumer.end_offsets(partitions), []
        while any(consumer.position(p) < end[p] for p in partitions):
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def test_an_exactly_once_script_writing_a_topic_it_does_not_own_is_refused_and_commits_nothing(secure_scripts):
    # Given a user with the orchestrator's rights except writing sec_command, and a detection waiting
    env, prefix = secure_scripts.env, secure_scripts.env["TOPIC_PREFIX"]
    acls.create_users(Settings.from_env(env), {"half_orchestrator": "half-orchestrator-password"})
    admin = KafkaAdminClient(**Settings.from_env(env).kafka_config())
    access = acls.Access(reads=[MESSAGE_STREAM], writes=[NOTIFICATION_COMMAND, DEAD_LETTER], group="orchestrator",
                         transactional_id="orchestrator", keeps_state=True)
    admin.create_acls(acls.acls_for("half_orchestrator", access, prefix))
    admin.close()
    secure_scripts.run("security_detector.py", "--count", "1")
    # When the orchestrator runs as that user and routes the detection (a transaction over both command topics)
    as_half = dict(env, KAFKA_SASL_USERNAME="half_orchestrator", KAFKA_SASL_PASSWORD="half-orchestrator-password")
    result = secure_scripts.run("orchestrator.py", "--example", "1", env=as_half, check=False)
    # Then it stops with one line naming the user and the refused topic
    assert result.returncode == 3
    [line] = refusal(result)
    assert "does not allow user 'half_orchestrator'" in line and "TopicAuthorizationFailedError" in line
    # And its transaction committed nothing, not even the notification it was allowed to write
    assert committed_records(env, NOTIFICATION_COMMAND) == committed_records(env, SEC_COMMAND) == []


def test_a_service_may_not_read_another_services_commands(secure_scripts):
    # Given the notification service run as the security service's user
    env = secure_scripts.env_for("security_service.py")
    # When it starts
    result = secure_scripts.run("notification_service.py", env=env, check=False)
    # Then it is refused reading notification_command (or joining its group), in one line
    assert result.returncode == 3
    [line] = refusal(result)
    assert "does not allow user 'security_service'" in line


def test_a_service_may_not_read_another_services_state_but_reads_its_own(secure_scripts):
    # Given the security service's user, and the state topics acls.py made
    settings = Settings.from_env(secure_scripts.env_for("security_service.py"))
    consumer = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False)
    try:
        # When it asks for the orchestrator's state (the workflows) and for its own (the ids it handled)
        # Then the first is refused and the second answered
        with pytest.raises(TopicAuthorizationFailedError):
            consumer.end_offsets([TopicPartition(settings.topic("state.orchestrator"), 0)])
        assert consumer.end_offsets([TopicPartition(settings.topic("state.security_service"), 0)])
    finally:
        consumer.close()


def test_a_user_made_by_acls_py_signs_in_but_may_do_nothing_it_was_not_granted(secure_scripts, tmp_path):
    # Given a user created with `python acls.py --users FILE` (run as admin), which no ACL mentions
    users = tmp_path / "users.json"
    users.write_text('{"visitor": "a-visitor-password"}')
    secure_scripts.run("acls.py", "--users", str(users))  # (acls.py has no user of its own: it runs as admin)
    # When a script signs in as that user and produces
    env = dict(secure_scripts.env, KAFKA_SASL_USERNAME="visitor", KAFKA_SASL_PASSWORD="a-visitor-password")
    result = secure_scripts.run("security_detector.py", "--count", "1", env=env, check=False)
    # Then sign-in works but the write is refused: whatever is not granted is denied
    assert result.returncode == 3
    [line] = refusal(result)
    assert "does not allow user 'visitor'" in line and "TopicAuthorizationFailedError" in line


def test_no_log_line_shows_the_password_even_at_debug(secure_scripts, secure_kafka):
    # Given the detector signed in as itself, logging everything kafka-python says (its configuration included)
    env = secure_scripts.env_for("security_detector.py", LOG_LEVEL="DEBUG")
    # When it produces
    result = secure_scripts.run("security_detector.py", "--count", "2", "--rate", "20", env=env, check=False)
    # Then it worked, and its password appears nowhere in what it printed
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sasl_plain_password" in result.stdout + result.stderr  # (the configuration line was logged)
    assert secure_kafka[1]["security_detector"] not in result.stdout + result.stderr


def test_a_port_that_closes_connections_before_kafka_is_up_is_waited_for_not_refused(secure_scripts):
    # Given a port that accepts connections and closes them at once, as a Docker port proxy does while the broker
    # behind it is still starting
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Semaphore(0)

    def close_each():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.close()
            accepted.release()
    threading.Thread(target=close_each, daemon=True).start()
    env = {k: v for k, v in secure_scripts.env.items() if not k.startswith(("KAFKA_SASL", "KAFKA_SECURITY"))}
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{listener.getsockname()[1]}"
    # When a script connects there and has been closed on ten times
    process = subprocess.Popen([sys.executable, str(ROOT / "security_detector.py"), "--count", "1"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(10):
            assert accepted.acquire(timeout=60)
        # Then it is still waiting for Kafka, not stopped with "it wants clients to sign in"
        assert process.poll() is None
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
        listener.close()
    assert "waiting for Kafka" in output and "sign in" not in output


def test_reading_a_topic_without_the_right_is_refused_with_one_line(secure_scripts):
    # Given a detection on message_stream, and the security service's user, which may not read it
    secure_scripts.run("security_detector.py", "--count", "1")
    env = secure_scripts.env_for("security_service.py")
    # When the orchestrator's dry run (which reads message_stream without a group) runs as that user
    result = secure_scripts.run("orchestrator.py", "--dry-run", env=env, check=False)
    # Then it stops with one line, instead of a traceback or an empty preview
    assert result.returncode == 3
    [line] = refusal(result)
    assert "does not allow user 'security_service'" in line and "TopicAuthorizationFailedError" in line


def as_user(scripts, user: str) -> KafkaProducer:
    """A raw producer signed in as `user` (what a compromised script could do with its own credentials)."""
    return KafkaProducer(**Settings.from_env(scripts.env_for(f"{user}.py")).kafka_config())


def test_a_producer_can_cause_only_what_its_role_allows(secure_scripts, secure_topics):
    # Given the orchestrator, and the detector's credentials in the wrong hands
    secure_scripts.start("orchestrator.py")
    prefix, forger = secure_scripts.env["TOPIC_PREFIX"], as_user(secure_scripts, "security_detector")
    # When they write a unit_event and a security_action_failed where the detector may write
    tamper = unit_event("tamper")
    failed = caused_by(detection(), "done", "security_action_failed", {"action": "lock_zone", "zone": "zone-1",
                                                                        "detail": "forged"}, "security_service")
    for message in (tamper, failed):
        forger.send(prefix + written_by(MESSAGE_STREAM, "security_detector"), message.to_bytes()).get(timeout=30)
    # And try the unit producer's own topic
    with pytest.raises(TopicAuthorizationFailedError):
        forger.send(prefix + written_by(MESSAGE_STREAM, "unit_event_producer"), tamper.to_bytes()).get(timeout=30)
    forger.close()
    # Then the orchestrator dead-letters both, as types the detector may not send, and commands nothing
    letters = secure_topics(DEAD_LETTER).read_count(2)
    assert sorted(m.payload["reason"].split(";")[0] for m in letters) == [
        "security_detector may not send 'security_action_failed'", "security_detector may not send 'unit_event'"]
    assert committed_records(secure_scripts.env, UNIT_COMMAND) == []
    assert committed_records(secure_scripts.env, NOTIFICATION_COMMAND) == []


def test_a_service_cannot_have_commands_replayed_in_its_name(secure_scripts, secure_topics):
    # Given the reporting service's credentials in the wrong hands, writing a forged dead letter naming sec_command
    prefix, forger = secure_scripts.env["TOPIC_PREFIX"], as_user(secure_scripts, "reporting_service")
    command = route(detection(5), stage=1)[0][1].model_copy(update={"workflow_id": "forged-4"})

    class Original:
        topic, partition, offset, key = prefix + SEC_COMMAND, 0, 0, b"sensor-1"
    forged = dead_letter(command.to_bytes(), "no route", "security_service", Original())
    forger.send(prefix + written_by(DEAD_LETTER, "reporting_service"), forged.to_bytes()).get(timeout=30)
    # (the shared or another service's dead_letter it may not write at all)
    with pytest.raises(TopicAuthorizationFailedError):
        forger.send(prefix + written_by(DEAD_LETTER, "security_service"), forged.to_bytes()).get(timeout=30)
    forger.close()
    # When the admin replays dead letters by reason, as the README says
    result = secure_scripts.run("dead_letters.py", "replay", "--reason", "no route", env=secure_scripts.env, check=False)
    # Then the forged letter is not replayed: the reporting service does not consume sec_command
    assert result.returncode == 1 and "names " + prefix + "sec_command, which reporting_service does not consume" in (
        result.stdout + result.stderr)
    assert committed_records(secure_scripts.env, SEC_COMMAND) == []


def test_the_monitor_without_read_rights_is_refused_with_one_line(secure_scripts):
    secure_scripts.run("security_detector.py", "--count", "1")  # (something to read)
    result = secure_scripts.run("monitor.py", "--once", env=secure_scripts.env_for("security_detector.py"), check=False)
    assert result.returncode == 3
    [line] = refusal(result)
    assert "monitor: Kafka does not allow user 'security_detector'" in line and "TopicAuthorizationFailedError" in line


def test_dead_letters_with_a_wrong_password_is_refused_with_one_line(secure_scripts):
    env = dict(secure_scripts.env, KAFKA_SASL_PASSWORD="not-the-password-42")
    result = secure_scripts.run("dead_letters.py", "list", env=env, check=False)
    assert result.returncode == 2
    [line] = refusal(result)
    assert "dead_letters: Kafka at" in line and "refused to sign in user 'admin'" in line


def test_a_script_run_as_another_user_is_refused_with_one_line_and_no_client_error(secure_scripts):
    result = secure_scripts.run("orchestrator.py", env=secure_scripts.env_for("security_detector.py"), check=False)
    assert result.returncode == 3
    [line] = refusal(result)
    assert "orchestrator: Kafka does not allow user 'security_detector'" in line


def test_only_the_operator_may_ask_for_a_workflow_to_be_cancelled(secure_scripts, secure_topics, secure_kafka):
    # Given a running workflow (its step waits: no security service)
    secure_scripts.start("orchestrator.py", "--step-timeout", "300")
    secure_scripts.run("security_detector.py", "--count", "1")
    stream = secure_topics(MESSAGE_STREAM)
    [workflow_id] = detections(stream.read_count(1, type_="security_detection"))
    secure_topics(SEC_COMMAND).read_count(1)
    # When the detector's credentials, in the wrong hands, ask for it to be cancelled in its own member and the
    # operator's
    prefix, forger = secure_scripts.env["TOPIC_PREFIX"], as_user(secure_scripts, "security_detector")
    forged = about(workflow_id, "workflow_cancel_requested",
                   {"reason": "forged", "by": "x", "workflow": "security"}, "security_detector")
    forger.send(prefix + written_by(MESSAGE_STREAM, "security_detector"), forged.to_bytes(), key=b"sensor").get(30)
    with pytest.raises(TopicAuthorizationFailedError):
        forger.send(prefix + written_by(MESSAGE_STREAM, OPERATOR), forged.to_bytes()).get(timeout=30)
    forger.close()
    # Then the orchestrator dead-letters the forged request, and the workflow still runs
    [letter] = secure_topics(DEAD_LETTER).read_count(1)
    assert letter.payload["reason"].startswith("security_detector may not send 'workflow_cancel_requested'")
    # And when a person asks, reading as the monitor and asking as the operator, the workflow is cancelled
    env = dict(secure_scripts.env_for("monitor.py"), KAFKA_OPERATOR_USERNAME="operator",
               KAFKA_OPERATOR_PASSWORD=secure_kafka[1]["operator"])
    done = secure_scripts.run("workflows.py", "cancel", workflow_id, "--reason", "drill", env=env)
    assert "done: cancelled" in done.stdout
    assert [m.type for m in stream.read_until(lambda ms: workflow_id in ids_of(ms, "workflow_cancelled"))
            if m.workflow_id == workflow_id and m.source == "orchestrator"] == ["workflow_cancelled"]
    # And the monitor alone may read the workflows, but not ask
    env = secure_scripts.env_for("monitor.py")
    assert "cancelled" in secure_scripts.run("workflows.py", "show", workflow_id, env=env).stdout
    refused = secure_scripts.run("workflows.py", "retry", workflow_id, "--reason", "x", env=env, check=False)
    assert refused.returncode == 3 and "does not allow user 'monitor'" in refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
