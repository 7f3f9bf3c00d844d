"""An action happens once, and never after its step gave up, against a real broker, counted where it happens (the
zones the security service acts on, and its log) and on the topics: the README's time-limit try-it, a retry racing a
late success, a service down past its limit, and a copy replaced mid-action. (A cancel reaching the service:
test_operator.py; a broker stalled during commits: test_reliability.py.)"""

import json
import signal

from helpers import NO_RESENDS, actions, detection

from common import MESSAGE_STREAM
from contracts import NOTIFICATION_COMMAND, SEC_COMMAND


def pages(notes) -> int:
    return sum(n.payload["recipient"] == "security-supervisor" for n in notes.messages())


def test_the_time_limit_try_it_by_hand_acts_once(scripts, topics, producer):
    # Given the README's try-it: no security service, each try 2 s, two tries
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "2", "--attempts", "2")
    stream, notes, event = topics(MESSAGE_STREAM), topics(NOTIFICATION_COMMAND), detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    # When both tries run out: the workflow fails and the supervisor is paged
    stream.read_until(lambda ms: any(m.type == "workflow_failed" for m in ms), timeout=90)
    # (the retry's own time limit must be one no loaded machine can outlast: the orchestrator runs on with a long one)
    scripts.stop(orchestrator)
    scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS)
    # And the security service is started: it reads the command, sent twice, each after its deadline
    security = scripts.start("security_service.py")
    stream.read_until(lambda ms: sum(m.type == "command_expired" for m in ms) == 2, timeout=90)
    # Then it did not act on either, and workflows.py says so beside the step
    assert actions(scripts) == 0 and "-> zone now" not in scripts.output(security)
    shown = json.loads(scripts.run("workflows.py", "show", event.workflow_id, "--json").stdout)
    assert [late["meaning"] for late in shown["steps"][0]["late"]] == [
        "not acted on: its service read it after its deadline"] * 2
    # And the person's retry acts once: the zone is locked once, the workflow completes, the supervisor was paged once
    retried = scripts.run("workflows.py", "retry", event.workflow_id, "--reason", "service is back")
    assert "done: acted sent again" in retried.stdout
    stream.read_until(lambda ms: any(m.type == "workflow_completed" for m in ms), timeout=90)
    assert actions(scripts) == 1 and scripts.output(security).count("-> zone now") == 1
    notes.read_count(2)
    assert pages(notes) == 1


def test_a_retry_racing_a_late_success_acts_once(scripts, topics, producer):
    # Given a slow actuator: the zone is locked at once, but that is confirmed 6 s later; the step's one try has 2 s
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "2", "--attempts", "1")
    security = scripts.start("security_service.py", "--confirm-after", "6")
    stream, notes, event = topics(MESSAGE_STREAM), topics(NOTIFICATION_COMMAND), detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    # When the try runs out (the workflow fails) and a person retries it at once, the success still on its way
    stream.read_until(lambda ms: any(m.type == "workflow_failed" for m in ms), timeout=90)
    scripts.stop(orchestrator)
    scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS)
    retried = scripts.run("workflows.py", "retry", event.workflow_id, "--reason", "try again", "--wait", "30",
                          check=False)
    # Then, whichever came first, the zone was locked once: the retry was refused because the step was done after
    # all, or it was granted and the service did not act on it again (the same action, done before)
    if "refused" in retried.stdout:
        assert "was done after all" in retried.stdout
        stream.read_until(lambda ms: any(m.type == "security_action_completed" for m in ms), timeout=90)
    else:
        stream.read_until(lambda ms: any(m.type == "workflow_completed" for m in ms), timeout=90)
        scripts.wait_for_output(security, "was done before under")
    assert actions(scripts) == 1 and scripts.output(security).count("-> zone now") == 1
    notes.read_count(2)
    assert pages(notes) == 1
    print(f"retry racing a late success: the retry {'was refused' if 'refused' in retried.stdout else 'was granted'}"
          f"; actions 1, pages 1")


def test_a_service_down_past_its_limit_acts_on_nothing_when_it_comes_back(scripts, topics, producer):
    # Given five workflows whose security service is down until every try of theirs has run out
    scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "2", "--attempts", "2")
    stream = topics(MESSAGE_STREAM)
    events = [detection() for _ in range(5)]
    for event in events:
        producer(MESSAGE_STREAM, event, key=b"sensor-1")
    stream.read_until(lambda ms: sum(m.type == "workflow_failed" for m in ms) == 5, timeout=120)
    # When it comes back
    security = scripts.start("security_service.py")
    stream.read_until(lambda ms: sum(m.type == "command_expired" for m in ms) == 10, timeout=120)
    # Then it carried out none of the ten commands queued for it (each sent twice): all had expired
    assert actions(scripts) == 0 and "-> zone now" not in scripts.output(security)
    assert scripts.output(security).count("not acted on: read ") == 10


def test_a_copy_replaced_mid_action_leaves_one_effect(scripts, topics, producer):
    # Given a copy of the security service that acts, then is killed (kill -9) before its batch is committed
    scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS)
    first = scripts.start("security_service.py", "--confirm-after", "30")
    stream, event = topics(MESSAGE_STREAM), detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    scripts.wait_for_output(first, f"-> zone now locked (workflow {event.workflow_id[:8]})")
    scripts.stop(first, signal.SIGKILL)
    # When another copy takes over and handles the same command again
    second = scripts.start("security_service.py", INSTANCE_ID="2")
    stream.read_until(lambda ms: any(m.type == "workflow_completed" for m in ms), timeout=120)
    # Then the zone was locked once: the successor saw the action done and did not do it again, and said so
    assert actions(scripts) == 1 and "-> zone now" not in scripts.output(second)
    assert "lock_zone in zone-1 was done before under" in scripts.output(second)
    assert [m.type for m in topics(SEC_COMMAND).read_count(1)] == ["security_command"]


def test_a_cancel_while_the_service_is_acting_on_an_earlier_command_reaches_the_later_ones(scripts, topics, producer):
    # Given three commands queued for a slow security service (each action confirmed 15 s late), all in one batch
    scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS)
    commands, events = topics(SEC_COMMAND), [detection() for _ in range(3)]
    for event in events:
        producer(MESSAGE_STREAM, event, key=b"sensor-1")
    commands.read_count(3)
    security = scripts.start("security_service.py", "--confirm-after", "15")
    scripts.wait_for_output(security, f"-> zone now locked (workflow {events[0].workflow_id[:8]})")
    # When, as it confirms the first, the other two workflows are cancelled
    for event in events[1:]:
        assert "done: cancelled" in scripts.run("workflows.py", "cancel", event.workflow_id, "--reason", "drill").stdout
    # Then it acts on neither of them: it reads the revocations again before each command, not once a batch
    for event in events[1:]:
        scripts.wait_for_output(security, f"not acted on: its workflow was cancelled (by root: drill) (workflow "
                                          f"{event.workflow_id[:8]})", timeout=120)
    assert actions(scripts) == 1 and scripts.output(security).count("-> zone now") == 1


def test_a_successor_reading_past_its_deadline_a_command_its_predecessor_acted_on_says_it_was_done(scripts, topics,
                                                                                                 producer):
    # Given a copy that acts, then is killed (kill -9) before it can report; the step's one try has 3 s
    scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "3", "--attempts", "1")
    first = scripts.start("security_service.py", "--confirm-after", "30")
    stream, event = topics(MESSAGE_STREAM), detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    scripts.wait_for_output(first, f"-> zone now locked (workflow {event.workflow_id[:8]})")
    scripts.stop(first, signal.SIGKILL)
    stream.read_until(lambda ms: any(m.type == "workflow_failed" for m in ms), timeout=90)
    # When its successor reads the command, after its deadline (the copy's session had to end first)
    second = scripts.start("security_service.py", INSTANCE_ID="2")
    stream.read_until(lambda ms: any(m.type == "security_action_completed" for m in ms), timeout=120)
    # Then it says the action was done (it was: once), not that it was not acted on; and no retry is offered for it
    assert "was done before under" in scripts.output(second) and "not acted on" not in scripts.output(second)
    assert actions(scripts) == 1
    refused = scripts.run("workflows.py", "retry", event.workflow_id, "--reason", "x", check=False)
    assert refused.returncode == 1 and "was done after all" in refused.stdout
