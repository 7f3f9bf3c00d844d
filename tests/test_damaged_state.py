"""State that is damaged, against a real broker: a record in a state topic that is not a state entry is set aside,
dead-lettered and said, never obeyed and never fatal; what it held is said lost, not guessed."""

import json
import time

from helpers import detection, ids_of, write_raw
from kafka import KafkaAdminClient

from common import DEAD_LETTER, MESSAGE_STREAM, changelog
from contracts import SEC_COMMAND

JUNK = [  # (key, value): what a careless client can write to a state topic
    (b"not-json", b"{not json"),
    (b"other-shape", json.dumps({"foo": 1}).encode()),
    (b"bad-time", json.dumps({"at": "yesterday", "due": None, "value": {}}).encode()),
    (b"workflow/\xff\xfe", json.dumps({"at": 1.0, "due": None, "value": {}}).encode()),
]


def set_aside(letters) -> list:
    return [m for m in letters if m.payload["reason"].startswith("state record set aside")]


def test_junk_in_the_orchestrators_state_is_set_aside_and_a_workflow_it_hid_is_said_lost(env, scripts, topics,
                                                                                          producer):
    # Given a detection routed while no security service runs (its workflow is running), then the orchestrator stopped
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "3600")
    hidden = detection()
    producer(MESSAGE_STREAM, hidden)
    topics(SEC_COMMAND).read_count(1)
    scripts.stop(orchestrator)
    # And junk written over its state: the running workflow's entry, and records of no entry's shape at all
    write_raw(env, "orchestrator", [(f"workflow/{hidden.workflow_id}".encode(), b"\x00garbage"), *JUNK])
    write_raw(env, "security_service", [(b"seen/abc", b"[1, 2")])
    # When both start, the hidden workflow's outcome comes, and a new detection is routed
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "3600")
    security = scripts.start("security_service.py")
    fresh = detection()
    producer(MESSAGE_STREAM, fresh)
    stream = topics(MESSAGE_STREAM)
    stream.read_until(lambda ms: fresh.workflow_id in ids_of(ms, "workflow_completed"), timeout=90)
    # Then each junk record is a dead letter of its service, said once a partition, and both services run on
    letters = topics(DEAD_LETTER).read_until(lambda ms: len(set_aside(ms)) >= 6 and len(ms) >= 7, timeout=60)
    assert sorted(m.source for m in set_aside(letters)) == ["orchestrator"] * 5 + ["security_service"]
    assert "set aside (and 4 more of this partition)" in scripts.output(orchestrator)
    assert "set aside:" in scripts.output(security) and orchestrator.poll() is None and security.poll() is None
    # And the hidden workflow's outcome is a dead letter saying its state was unreadable, never "-> done"
    [lost] = [m for m in letters if m not in set_aside(letters)]
    assert lost.payload["reason"].startswith(f"the state of workflow {hidden.workflow_id} was unreadable")
    assert hidden.workflow_id not in ids_of(stream.messages(), "workflow_completed")
    # And started again, nothing is set aside twice (what stands for each record was written with its dead letter)
    orchestrator = scripts.restart(orchestrator)
    scripts.wait_for_output(orchestrator, "read back (")
    again = detection()
    producer(MESSAGE_STREAM, again)
    stream.read_until(lambda ms: again.workflow_id in ids_of(ms, "workflow_completed"), timeout=90)
    assert "set aside" not in scripts.output(orchestrator)
    # And the tool that reads the state shows the workflows it can read, and says how many it cannot
    listing = scripts.run("workflows.py", "list", "--json")
    assert {json.loads(line)["workflow_id"] for line in listing.stdout.splitlines()} == {fresh.workflow_id,
                                                                                          again.workflow_id}
    assert "1 entry of the state set aside as unreadable" in listing.stderr
    # And an entry of a workflow's shape that lacks its fields is counted with them, and a 900 KB one is listed
    now = time.time()
    step = {"state": "pending", "attempts": 1, "sent_at": now, "finished_at": None, "deadline": None,
            "topic": SEC_COMMAND, "command": {"note": "x" * 900_000}}
    big = {"workflow_id": "big", "type": "security", "stage": 1, "key": None, "started_at": now, "state": "running",
           "finished_at": None, "steps": {"security": step}, "handled": {}}
    write_raw(env, "orchestrator", [(b"workflow/big", json.dumps({"at": now, "due": None, "value": big}).encode()),
                                    (b"workflow/odd", json.dumps({"at": now, "due": None, "value": {
                                        "type": "security", "state": "running", "steps": {"a": {}}}}).encode())])
    listing = scripts.run("workflows.py", "list", "--json")
    assert "big" in {json.loads(line)["workflow_id"] for line in listing.stdout.splitlines()}
    assert "2 entries of the state set aside as unreadable" in listing.stderr


def test_a_removed_workflow_is_gone_for_the_orchestrator_and_for_workflows_py_alike(env, scripts, topics, producer):
    # Given a running workflow (no security service), then the orchestrator stopped and its entry removed (a tombstone)
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "3600")
    removed = detection()
    producer(MESSAGE_STREAM, removed)
    command = topics(SEC_COMMAND).read_count(1)[0]
    scripts.stop(orchestrator)
    write_raw(env, "orchestrator", [(f"workflow/{removed.workflow_id}".encode(), None)])
    # When the orchestrator starts again and the workflow's outcome comes
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "3600")
    security = scripts.start("security_service.py")
    scripts.wait_for_output(orchestrator, "security_action_completed")
    later = detection()
    producer(MESSAGE_STREAM, later)
    stream = topics(MESSAGE_STREAM)
    stream.read_until(lambda ms: later.workflow_id in ids_of(ms, "workflow_completed"), timeout=90)
    # Then it says the workflow is unknown, calls nothing done, and workflows.py does not show it running either
    assert f"key 'workflow/{removed.workflow_id}' was removed by a tombstone" in scripts.output(orchestrator)
    assert "its workflow is unknown here" in scripts.output(orchestrator)
    assert removed.workflow_id not in ids_of(stream.messages(), "workflow_completed")
    listed = [json.loads(line)["workflow_id"] for line in scripts.run("workflows.py", "list", "--json").stdout.splitlines()]
    assert listed == [later.workflow_id]
    # And a service whose memory of a handled command is removed says, when it starts, what that may cause
    scripts.stop(security)
    write_raw(env, "security_service", [(f"seen/{command.id}".encode(), None)])
    security = scripts.start("security_service.py")
    scripts.wait_for_output(security, f"key 'seen/{command.id}' was removed by a tombstone")
    assert "a message handled before is handled again if it comes again" in scripts.output(security)


def test_a_state_topic_deleted_under_a_running_orchestrator_stops_it_and_is_never_made_anew_in_silence(
        env, scripts, topics, producer):
    # Given an orchestrator that routed a detection (its state topic holds the workflow)
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "3600")
    producer(MESSAGE_STREAM, detection())
    commands = topics(SEC_COMMAND)
    commands.read_count(1)
    # When its state topic is deleted while it runs, and the next detection comes
    admin = KafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    admin.delete_topics([env["TOPIC_PREFIX"] + changelog("orchestrator")])
    admin.close()
    waiting = detection()
    producer(MESSAGE_STREAM, waiting)
    # Then it says what is lost and stops (exit 1), without routing the detection
    assert orchestrator.wait(timeout=90) == 1
    assert "its state topic" in scripts.output(orchestrator) and "is gone" in scripts.output(orchestrator)
    # And started again, it refuses in one line rather than make the topic anew on empty state
    refused = scripts.run("orchestrator.py", "--example", "1", check=False)
    assert refused.returncode == 1 and "ACCEPT_STATE_LOSS=1" in refused.stderr.strip().splitlines()[-1]
    # And told to accept the loss, it starts, says so, and routes the detection that waited
    accepting = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "3600", ACCEPT_STATE_LOSS="1")
    commands.read_until(lambda ms: waiting.workflow_id in {m.workflow_id for m in ms}, timeout=90)
    assert "starting with empty state, as ACCEPT_STATE_LOSS asks" in scripts.output(accepting)
