"""A person's requests about one workflow, against a real broker: cancel and retry are events routed like any other,
answered by the orchestrator, exactly once across a repeat and a kill -9; refused with the reason where they do not
apply; and only the operator may send them."""

import json
import signal
import subprocess
import sys
import urllib.request

from helpers import NO_RESENDS, ROOT, actions, detection, ids_of
from prometheus_client.parser import text_string_to_metric_families

import local_kafka

from common import MESSAGE_STREAM, OPERATOR, caused_by, written_by
from contracts import SEC_COMMAND


def answers(stream, workflow_id: str) -> list[tuple[str, str]]:
    """(type, detail) of each answer the orchestrator gave about a workflow."""
    return answers_in(stream.messages(), workflow_id)


def answers_in(messages, workflow_id: str) -> list[tuple[str, str]]:
    return [(m.type, m.payload["detail"]) for m in messages if m.workflow_id == workflow_id and
            m.type in ("workflow_cancelled", "workflow_retried", "operator_request_refused")]


def test_a_cancelled_workflow_ends_once_its_timers_stop_and_no_service_acts_on_it_later(scripts, topics, producer):
    # Given a workflow waiting for its security action (no security service; a time limit no test step can outlast)
    port = local_kafka.free_port()
    orchestrator = scripts.start("orchestrator.py", "--example", "1", *NO_RESENDS, "--metrics-port", str(port))
    stream, commands, first = topics(MESSAGE_STREAM), topics(SEC_COMMAND), detection()
    producer(MESSAGE_STREAM, first, key=b"sensor-1")
    commands.read_until(lambda ms: first.workflow_id in {m.workflow_id for m in ms})
    # When a person cancels it by the first 8 characters of its id
    done = scripts.run("workflows.py", "cancel", first.workflow_id[:8], "--reason", "sensor replaced", "--by", "ann")
    # Then the orchestrator answered: cancelled, the step no longer awaited, and no timer of it is left
    assert done.stdout.strip() == (f"workflow {first.workflow_id}: done: cancelled; acted no longer awaited "
                                   "(asked by ann: sensor replaced)")
    shown = json.loads(scripts.run("workflows.py", "show", first.workflow_id, "--json").stdout)
    assert shown["state"] == "cancelled" and [(s["name"], s["state"], s["deadline"]) for s in shown["steps"]] == [
        ("acted", "cancelled", None), ("notified", "sent", None)]
    # And when the same request comes again (the same event), then another cancel
    request = next(m for m in topics(written_by(MESSAGE_STREAM, OPERATOR)).read_count(1))
    producer(written_by(MESSAGE_STREAM, OPERATOR), request, key=b"sensor-1")
    again = scripts.run("workflows.py", "cancel", first.workflow_id, "--reason", "twice", check=False)
    # Then the repeat had no effect, and the second cancel was refused with the reason
    assert again.returncode == 1 and "refused: the workflow is cancelled already" in again.stdout
    stream.read_until(lambda ms: len(answers_in(ms, first.workflow_id)) >= 2)
    assert answers(stream, first.workflow_id) == [
        ("workflow_cancelled", "cancelled; acted no longer awaited"),
        ("operator_request_refused", "the workflow is cancelled already: only a running one can be cancelled")]
    # And when the security service starts, it reads the command sent before the cancel and does not act on it
    security = scripts.start("security_service.py")
    scripts.wait_for_output(security, f"not acted on: its workflow was cancelled (by ann: sensor replaced) (workflow "
                                      f"{first.workflow_id[:8]})")
    assert "-> zone now" not in scripts.output(security) and actions(scripts) == 0
    # And an outcome that comes after the cancel all the same (an action already under way) changes nothing
    producer(MESSAGE_STREAM, outcome(commands.messages()[0]), key=b"sensor-1")
    scripts.wait_for_output(orchestrator, f"security_action_completed {first.workflow_id[:8]} arrived late")
    ended = [m.type for m in stream.messages() if m.workflow_id == first.workflow_id and m.type.startswith("workflow_")]
    assert ended.count("workflow_cancelled") == 1 and "workflow_completed" not in ended
    # And the orchestrator's metrics count the request granted and the one refused
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        served = {(sample.name, sample.labels.get("outcome")): sample.value for family in
                  text_string_to_metric_families(response.read().decode()) for sample in family.samples
                  if sample.labels.get("request") == "workflow_cancel_requested"}
    assert set(served) == {("operator_requests_total", "granted"), ("operator_requests_total", "refused")}
    assert all(count >= 1 for count in served.values())  # (counted as handled: a batch handled again counts again)


def outcome(command, type_="security_action_completed"):
    """The security service's answer to a command, as it would send it."""
    return caused_by(command, "done", type_, {"action": command.payload["action"], "zone": command.payload["zone"],
                                              "detail": "zone locked"}, "security_service")


def test_a_failed_workflow_retried_sends_its_step_again_under_a_new_id_and_completes(scripts, topics, producer):
    # Given a workflow that failed: the actuator of its zone did not respond
    scripts.start("orchestrator.py", "--example", "1")
    failing = scripts.start("security_service.py", "--fail-zones", "zone-1")
    stream, event = topics(MESSAGE_STREAM), detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    stream.read_until(lambda ms: event.workflow_id in ids_of(ms, "workflow_failed"))
    refused = scripts.run("workflows.py", "cancel", event.workflow_id, "--reason", "too late", check=False)
    # When the actuator is fixed and a person retries the workflow
    scripts.stop(failing)
    scripts.start("security_service.py")
    done = scripts.run("workflows.py", "retry", event.workflow_id[:12], "--reason", "actuator fixed")
    stream.read_until(lambda ms: event.workflow_id in ids_of(ms, "workflow_completed"))
    # Then the step's command went again under an id of the workflow, the step and the retry, the service acted on
    # it, and the workflow completed; cancelling it while it had failed was refused
    retried = f"{event.workflow_id}.acted.retry-1"
    assert f"workflow {event.workflow_id}: done: acted sent again as {retried} (retry 1)" in done.stdout
    assert refused.returncode == 1 and "refused: the workflow is failed already" in refused.stdout
    assert [c.id for c in topics(SEC_COMMAND).read_count(2)] == [f"{event.workflow_id}.security", retried]
    assert [m.type for m in stream.messages() if m.type.startswith("security_action_")] == [
        "security_action_failed", "security_action_completed"]
    shown = json.loads(scripts.run("workflows.py", "show", event.workflow_id, "--json").stdout)
    assert shown["state"] == "completed" and [(s["name"], s["state"], s["attempts"]) for s in shown["steps"]] == [
        ("acted", "done", 1), ("notified", "sent", 1), ("escalated", "sent", 1)]
    # And retrying a completed workflow is refused with the reason
    again = scripts.run("workflows.py", "retry", event.workflow_id, "--reason", "once more", check=False)
    assert again.returncode == 1 and "refused: the workflow is completed: only a failed one can be retried" in again.stdout


def test_a_request_survives_a_kill_of_the_orchestrator_and_is_answered_once(scripts, topics, producer):
    # Given a running workflow
    orchestrator = scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "300")
    stream, event = topics(MESSAGE_STREAM), detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    topics(SEC_COMMAND).read_until(lambda ms: event.workflow_id in {m.workflow_id for m in ms})
    # When a person cancels it and the orchestrator is killed (SIGKILL) as the request arrives, then started again
    asking = subprocess.Popen([sys.executable, str(ROOT / "workflows.py"), "cancel", event.workflow_id, "--reason",
                               "runaway", "--wait", "90"], env=scripts.env_for("workflows.py"), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    topics(written_by(MESSAGE_STREAM, OPERATOR)).read_count(1)
    scripts.restart(orchestrator, signal.SIGKILL)
    said, _ = asking.communicate(timeout=120)
    # Then the request was answered once, after the restart
    assert asking.returncode == 0 and "done: cancelled" in said
    stream.read_until(lambda ms: event.workflow_id in ids_of(ms, "workflow_cancelled"))
    assert answers(stream, event.workflow_id) == [("workflow_cancelled", "cancelled; acted no longer awaited")]


def test_a_request_from_another_writer_is_a_dead_letter_and_an_unknown_id_is_one_line(scripts, topics, producer):
    # Given a running workflow
    scripts.start("orchestrator.py", "--example", "1", "--step-timeout", "300")
    stream, event = topics(MESSAGE_STREAM), detection()
    producer(MESSAGE_STREAM, event, key=b"sensor-1")
    topics(SEC_COMMAND).read_until(lambda ms: event.workflow_id in {m.workflow_id for m in ms})
    # When the detector's member carries a cancel request for it (forged), and a person names no workflow there is
    from common import about
    forged = about(event.workflow_id, "workflow_cancel_requested",
                   {"reason": "forged", "by": "x", "workflow": "security"}, "security_detector")
    producer(written_by(MESSAGE_STREAM, "security_detector"), forged, key=b"sensor-1")
    letters = topics("dead_letter").read_count(1)
    unknown = scripts.run("workflows.py", "cancel", "ffffffff", "--reason", "x", check=False)
    short = scripts.run("workflows.py", "retry", event.workflow_id[:6], "--reason", "x", check=False)
    long = scripts.run("workflows.py", "cancel", event.workflow_id, "--reason", "x" * 501, check=False)
    # Then the forged request is a dead letter and changed nothing; the others are one line each
    assert "may not send 'workflow_cancel_requested'" in letters[0].payload["reason"]
    assert not answers(stream, event.workflow_id)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "workflows: no workflows have an id 'ffffffff' or starting so"
    assert short.returncode == 1 and "give the whole id, or 8 characters or more" in short.stderr
    assert long.returncode == 1 and long.stderr.strip() == (
        "workflows: --reason: String should have at most 500 characters; nothing was sent")
