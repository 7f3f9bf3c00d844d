"""What the orchestrator remembers of each workflow, without Kafka: steps pending until their report, time limits
that try again and then escalate, and events that arrive too late to change anything."""

from dataclasses import replace

import pytest
from helpers import detection, unit_event

from common import (MESSAGE_STREAM, NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, UNIT_COMMAND, WORKFLOW, DeadLetter,
                    Limits, Orchestration, Settings, Store, caused_by)
from common.handling import serialised
from common.takeover import overlap_refusal
from common.workflow import overlapping
from orchestrator import WORKFLOWS, route

pytestmark = pytest.mark.no_broker  # runs in `make check`
T0 = 1_000_000.0
LIMITS = Limits(step_timeout=2.0, attempts=2)


@pytest.fixture
def store():
    store = Store("orchestrator", Settings(), durable=False)
    store.restore({0})
    return store


def handled(store, event, now, stage=3):
    """The event routed as the orchestrator's handler does it, its state change committed."""
    state = store.view(0, b"sensor-1")
    outputs = Orchestration(WORKFLOWS, route, stage, LIMITS).decide(event, state, now) or []  # (None: changes nothing)
    store.commit(state.changes)
    return outputs


def fire(store, now):
    """Every timer due at `now`, as the loop fires them: what each sends, its changes committed."""
    sent = []
    for partition, key in store.due(now):
        state = store.view(partition)
        sent += Orchestration(WORKFLOWS, route, 3, LIMITS).timer(state, key, now)
        store.commit(state.changes)
    return sent


def workflow(store, event):
    return store.view(0).get(WORKFLOW + event.workflow_id)


def outcome(event, type_="security_action_completed"):
    command = route(event, 3)[0][1]
    return caused_by(command, "done", type_, {"action": "lock_zone", "zone": "zone-1"}, "security_service")


def test_a_workflow_is_running_until_its_reporting_step_is_done_then_completed_once(store):
    # Given a detection routed at stage 2
    event = detection()
    handled(store, event, T0, stage=2)
    state = workflow(store, event)
    assert state["type"] == "security" and state["stage"] == 2 and state["state"] == "running"
    assert state["steps"]["acted"] | {"command": None} == {"state": "pending", "attempts": 1, "sent_at": T0,
                                                           "finished_at": None, "deadline": T0 + 2.0,
                                                           "topic": SEC_COMMAND, "command": None}
    # When the security service reports the action done
    outputs = handled(store, outcome(event), T0 + 1)
    # Then the workflow is completed, said once on message_stream, and its timer never fires
    assert [(t, m.type) for t, m in outputs] == [(MESSAGE_STREAM, "workflow_completed")]
    assert workflow(store, event)["state"] == "completed" and fire(store, T0 + 100) == []


def test_a_step_without_answer_is_tried_again_with_the_same_id_then_escalated_and_the_workflow_failed(store):
    # Given a detection whose command gets no answer
    event = detection()
    [(_, command), *_] = handled(store, event, T0)
    # When its limit passes: a step_timed_out, and the same command again (same id)
    first = fire(store, T0 + 2)
    assert [(t, m.type) for t, m, _ in first] == [(MESSAGE_STREAM, "step_timed_out"), (SEC_COMMAND, "security_command")]
    assert first[1][1].id == command.id and first[0][2] == "sensor-1" and first[0][1].payload["attempt"] == 1
    assert fire(store, T0 + 3.9) == []  # (a new limit from the resend)
    # When the last attempt's limit passes too: escalation to a person, and the workflow failed
    last = fire(store, T0 + 4)
    assert [(t, m.type) for t, m, _ in last] == [(MESSAGE_STREAM, "step_timed_out"),
                                                 (NOTIFICATION_COMMAND, "notification_command"),
                                                 (MESSAGE_STREAM, "workflow_failed")]
    assert last[1][1].payload["recipient"] == "security-supervisor" and "2 attempts" in last[1][1].payload["text"]
    state = workflow(store, event)
    assert state["state"] == "failed" and state["steps"]["acted"]["state"] == "timed_out"
    assert state["steps"]["acted"]["attempts"] == 2 and fire(store, T0 + 100) == []
    # And an answer that comes after that changes nothing
    assert handled(store, outcome(event), T0 + 5) == [] and workflow(store, event)["state"] == "failed"


def test_an_answer_after_a_resend_completes_the_workflow_and_a_failed_action_fails_it(store):
    # Given a workflow whose first attempt timed out
    event, failing = detection(), detection()
    handled(store, event, T0)
    fire(store, T0 + 2)
    # When the action is then done: completed, no escalation
    assert [m.type for _, m in handled(store, outcome(event), T0 + 2.5)] == ["workflow_completed"]
    # And a failed action escalates (route) and fails the workflow (state)
    handled(store, failing, T0)
    outputs = handled(store, outcome(failing, "security_action_failed"), T0 + 1)
    assert [m.type for _, m in outputs] == ["notification_command", "workflow_failed"]
    assert outputs[1][1].payload == {"workflow": "security", "detail": "acted failed"}


def test_the_unit_workflow_waits_for_its_command_to_be_applied(store):
    event = unit_event()
    handled(store, event, T0)
    assert list(workflow(store, event)["steps"]) == ["applied"]
    [_, (topic, command, key)] = fire(store, T0 + 2)
    assert topic == UNIT_COMMAND and command.type == "unit_command" and key == "sensor-1"


def test_a_timer_sends_to_the_workflows_own_key_even_one_that_is_not_text(store):
    event = detection()
    state = store.view(0, b"\xffsensor")
    Orchestration(WORKFLOWS, route, 3, LIMITS).decide(event, state, T0)
    store.commit(state.changes)
    [(topic, message, key), *_] = fire(store, T0 + 2)
    assert serialised(topic, message, key).key == b"\xffsensor"


def test_a_step_renamed_in_the_table_since_a_workflow_started_is_left_alone(store, monkeypatch):
    # Given a workflow started while the security action was called "acted"
    event = detection()
    handled(store, event, T0)
    # When the step is renamed, and the action then reports done
    security = WORKFLOWS["security"]
    renamed = (replace(security.steps[0], name="secured"), *security.steps[1:])
    monkeypatch.setitem(WORKFLOWS, "security", replace(security, steps=renamed))
    assert fire(store, T0 + 2) == []  # (its old limit sends nothing)
    outputs = handled(store, outcome(event), T0 + 3)
    # Then nothing fails: the old step is left alone, and the workflow waits for nothing else
    assert [m.type for _, m in outputs] == ["workflow_completed"]
    assert workflow(store, event)["steps"]["acted"]["state"] == "removed"


def test_a_split_orchestrator_leaves_the_timers_of_another_ones_workflows_alone(store):
    # Given a security workflow in the state (taken over from the single orchestrator) whose limit passed
    handled(store, detection(), T0)
    # When the unit orchestrator's timer fires for it
    [(partition, key)] = store.due(T0 + 2)
    # Then it sends nothing: the security orchestrator's own copy of the state acts on it
    assert Orchestration(WORKFLOWS, route, 3, LIMITS, owned={"unit"}).timer(store.view(partition), key, T0 + 2) == []


def test_an_event_handled_before_is_not_routed_again_and_its_id_saying_something_else_is_a_dead_letter(store):
    # Given a detection routed, and its step's outcome
    event = detection()
    assert [topic for topic, _ in handled(store, event, T0)] == [SEC_COMMAND, NOTIFICATION_COMMAND, REPORT_DATA]
    handled(store, outcome(event), T0 + 1)
    # When both come again (a producer's retry, a replayed dead letter), nothing is routed and nothing changes
    before = workflow(store, event)
    assert handled(store, event, T0 + 2) == [] and handled(store, outcome(event), T0 + 3) == []
    assert workflow(store, event) == before
    # And the same id saying something else is a dead letter (the workflow's entry keeps what each id said)
    with pytest.raises(DeadLetter, match="handled before with different content"):
        handled(store, event.model_copy(update={"payload": {**event.payload, "severity": 5}}), T0 + 4)


def test_a_repeat_of_an_event_of_no_known_workflow_is_skipped_too(store):
    # Given a failed action of a workflow this orchestrator does not know (it expired, say): it escalates once
    failed = outcome(detection(), "security_action_failed")
    assert [topic for topic, _ in handled(store, failed, T0)] == [NOTIFICATION_COMMAND]
    # Then the same event again escalates nothing more
    assert handled(store, failed, T0 + 1) == []


def test_an_outcome_of_a_workflow_with_no_state_changes_nothing_and_says_so(store, caplog):
    # Given no state of a workflow (never started here, expired, or its entry removed)
    event = detection()
    # When its step's outcome comes
    outputs = handled(store, outcome(event), T0)
    # Then nothing follows, no workflow is made up for it, and the orchestrator says why
    assert outputs == [] and workflow(store, event) is None
    assert "its workflow is unknown here" in caplog.text


@pytest.mark.no_broker
def test_the_overlap_refusal_advises_only_what_would_start_cleanly_now():
    others = overlapping(WORKFLOWS, set(WORKFLOWS))
    # While only the split security orchestrator runs, the single one may be run for the unit workflow instead
    one = overlap_refusal(set(WORKFLOWS), others, {"orchestrator-security": ["a"]})
    assert one == ("orchestrator: group orchestrator-security (workflows security) is running (1 copy), and both would "
                   "route security. Stop it first (Ctrl-C in its terminal), then start this one: it starts where that "
                   "one left off; or run this one with --workflows unit")
    # While both split ones run, nothing but stopping them would start cleanly
    both = overlap_refusal(set(WORKFLOWS), others, {"orchestrator-security": ["a"], "orchestrator-unit": ["b"]})
    assert both == ("orchestrator: groups orchestrator-security (workflows security) and orchestrator-unit (workflows "
                    "unit) are running (2 copies), and each would route security,unit. Stop them first (Ctrl-C in "
                    "their terminals), then start this one: it starts where they left off")
