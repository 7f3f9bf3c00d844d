"""What the orchestrator remembers of each workflow, without Kafka: steps pending until their report, time limits
that try again and then escalate, and events that arrive too late to change anything."""

import logging
import sys
from dataclasses import replace

import pytest
from helpers import detection, unit_event

import orchestrator
from common import (MESSAGE_STREAM, OPERATOR, WORKFLOW, DeadLetter, Limits, Orchestration, Settings, Store, about,
                    caused_by, problems)
from contracts import NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, UNIT_COMMAND
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
    steps = workflow(store, event)["steps"]
    assert {name: step["state"] for name, step in steps.items()} == {"applied": "pending", "reported": "sent"}
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


def test_an_outcome_of_no_known_workflow_sends_nothing_now_or_when_it_comes_again(store, caplog):
    # Given a failed action of a workflow this orchestrator does not know (it expired, say)
    caplog.set_level(logging.INFO)
    failed = outcome(detection(), "security_action_failed")
    # Then nothing follows (no step of no workflow can follow it), it is said, and the same event again is a repeat
    assert handled(store, failed, T0) == [] and "its workflow is unknown here" in caplog.text
    assert handled(store, failed, T0 + 1) == [] and "already handled" in caplog.text


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
    table = {"left": WORKFLOWS["security"], "right": WORKFLOWS["unit"]}  # (two workflows, whatever the demo's are)
    others = overlapping(table, set(table))
    # While only the split left orchestrator runs, the single one may be run for the right workflow instead
    one = overlap_refusal(set(table), others, {"orchestrator-left": ["a"]})
    assert one == ("orchestrator: group orchestrator-left (workflows left) is running (1 copy), and both would "
                   "route left. Stop it first (Ctrl-C in its terminal), then start this one: it starts where that "
                   "one left off; or run this one with --workflows right")
    # While both split ones run, nothing but stopping them would start cleanly
    both = overlap_refusal(set(table), others, {"orchestrator-left": ["a"], "orchestrator-right": ["b"]})
    assert both == ("orchestrator: groups orchestrator-left (workflows left) and orchestrator-right (workflows "
                    "right) are running (2 copies), and each would route left,right. Stop them first (Ctrl-C in "
                    "their terminals), then start this one: it starts where they left off")


# Steps that follow steps (Example 4: a guard dispatched, then the zone unlocked; or, if the guard's action fails,
# the zone locked down and the supervisor paged), and what the engine does with any table.

def answered(command, type_="security_action_completed", detail="zone guard_dispatched"):
    """The security service's answer to one of the orchestrator's commands."""
    return caused_by(command, "done", type_, {"action": command.payload["action"], "zone": command.payload["zone"],
                                              "detail": detail}, "security_service")


def states(store, event):
    return {name: step["state"] for name, step in workflow(store, event)["steps"].items()}


def test_example_4_a_guards_report_is_followed_by_the_zones_unlocking_and_the_workflow_ends_after_it(store):
    # Given a severity-5 detection routed at Example 4: a guard is dispatched
    event = detection(severity=5)
    [(_, guard), *_] = handled(store, event, T0, stage=4)
    assert guard.payload["action"] == "dispatch_guard"
    # When the guard reports the zone clear: the zone is unlocked and the on-duty person told, each a step
    outputs = handled(store, answered(guard), T0 + 1)
    assert [(t, m.type) for t, m in outputs] == [(SEC_COMMAND, "security_command"), (NOTIFICATION_COMMAND,
                                                                                     "notification_command")]
    unlock, told = outputs[0][1], outputs[1][1]
    assert unlock.payload["action"] == "unlock_zone" and told.payload["recipient"] == "on-duty-zone-1"
    assert states(store, event) == {"acted": "done", "notified": "sent", "reported": "sent", "unlocked": "pending",
                                    "told": "sent"}
    assert workflow(store, event)["steps"]["unlocked"]["deadline"] == T0 + 1 + 2.0  # (a step's own time limit)
    # Then the workflow ends only when the unlocking is done
    assert [m.type for _, m in handled(store, answered(unlock, detail="zone normal"), T0 + 2)] == ["workflow_completed"]
    steps = workflow(store, event)["steps"]
    assert [(name, step["sent_at"], step["finished_at"]) for name, step in steps.items()] == [
        ("acted", T0, T0 + 1), ("notified", T0, T0), ("reported", T0, T0), ("unlocked", T0 + 1, T0 + 2),
        ("told", T0 + 1, T0 + 1)]


def test_example_4_a_failed_guard_is_compensated_the_zone_locked_down_and_the_supervisor_paged(store):
    # Given a guard dispatched at Example 4, whose action fails
    event = detection(severity=5)
    [(_, guard), *_] = handled(store, event, T0, stage=4)
    outputs = handled(store, answered(guard, "security_action_failed", "no guard available"), T0 + 1)
    # Then the compensation locks the zone down, and the supervisor is paged
    [(_, lock), (_, page)] = outputs
    assert (lock.payload["action"], page.payload["recipient"]) == ("lock_zone", "security-supervisor")
    assert states(store, event) | {} == {"acted": "failed", "notified": "sent", "reported": "sent",
                                         "locked_down": "pending", "escalated": "sent"}
    # And the workflow ends failed once the zone is locked down, saying which step failed
    [(_, end)] = handled(store, answered(lock, detail="zone locked"), T0 + 2)
    assert (end.type, end.payload["detail"]) == ("workflow_failed", "acted failed")


def test_a_step_that_follows_has_its_time_limit_and_attempts_and_then_its_failure_is_followed_too(store):
    # Given the zone's unlocking sent after a guard's report, and never answered
    event = detection(severity=5)
    [(_, guard), *_] = handled(store, event, T0, stage=4)
    [(_, unlock), _] = handled(store, answered(guard), T0 + 1)
    # When its limit passes: the same command again (same id); then once more: the supervisor paged, the workflow failed
    assert [(t, m.id) for t, m, _ in fire(store, T0 + 3)][1:] == [(SEC_COMMAND, unlock.id)]
    last = fire(store, T0 + 5)
    assert [(t, m.type) for t, m, _ in last][1:] == [(NOTIFICATION_COMMAND, "notification_command"),
                                                     (MESSAGE_STREAM, "workflow_failed")]
    assert states(store, event)["unlocked"] == "timed_out" and states(store, event)["escalated"] == "sent"


@pytest.mark.parametrize("started, now", [(3, 4), (4, 3)])
def test_a_workflow_in_flight_follows_the_routing_of_the_stage_it_started_under(store, started, now):
    # Given a guard dispatched by an orchestrator at one stage, which is then restarted at another
    event = detection(severity=5)
    [(_, guard), *_] = handled(store, event, T0, stage=started)
    # When the guard reports, the path is the one of the stage the workflow started under
    outputs = handled(store, answered(guard), T0 + 1, stage=now)
    assert [m.type for _, m in outputs] == (["workflow_completed"] if started < 4 else
                                            ["security_command", "notification_command"])


def test_a_late_success_of_the_command_a_retry_repeats_ends_the_retried_step_and_no_page_follows(store):
    # Given a workflow whose action got no answer in time, retried by a person: the step is sent again, a new id
    event = detection()
    [(_, first), *_] = handled(store, event, T0)
    fire(store, T0 + 2), fire(store, T0 + 4)
    retry = about(event.workflow_id, "workflow_retry_requested", {"reason": "fixed", "by": "me", "workflow": "security"},
                  OPERATOR)
    [(_, again), _] = handled(store, retry, T0 + 5)
    assert again.id != first.id and again.retry_of == first.id and states(store, event)["acted"] == "pending"
    # When the first command's success comes after all (the service was slow): the services apply both commands
    # under one key, so that action is the retry's: the step is done and the workflow completes, no timer left
    assert [m.type for _, m in handled(store, answered(first), T0 + 6)] == ["workflow_completed"]
    assert fire(store, T0 + 100) == []
    # Then the retry's own answer, when it comes (its service saw the action done), changes nothing
    assert handled(store, answered(again), T0 + 7) == [] and states(store, event)["acted"] == "done"
    # And an earlier command's failure never ends a retried step
    other = detection()
    [(_, sent), *_] = handled(store, other, T0)
    fire(store, T0 + 2), fire(store, T0 + 4)
    handled(store, about(other.workflow_id, "workflow_retry_requested", {"reason": "x", "by": "me",
                                                                         "workflow": "security"}, OPERATOR), T0 + 5)
    assert handled(store, answered(sent, "security_action_failed"), T0 + 6) == []
    assert states(store, other)["acted"] == "pending"


def test_a_command_the_table_has_no_step_for_is_a_dead_letter_that_says_what_to_declare(store, monkeypatch):
    # Given a table without the escalation step (route() still escalates a failed action)
    security = WORKFLOWS["security"]
    monkeypatch.setitem(WORKFLOWS, "security", replace(security, steps=tuple(
        step for step in security.steps if step.name != "escalated")))
    event = detection()
    [(_, command), *_] = handled(store, event, T0)
    # When the action fails, the outcome is a dead letter saying which step to add, and nothing is sent or changed
    with pytest.raises(DeadLetter, match=r"has no step that sends it then: add Step\(NAME, 'notification_command', "
                                         r"'notification_command', SERVICE, after='acted', when='failed'\)"):
        handled(store, answered(command, "security_action_failed"), T0 + 1)
    assert states(store, event)["acted"] == "pending"


@pytest.mark.parametrize("change, problem", [
    (lambda steps: (replace(steps[0], done=("security_action_done",)), *steps[1:]),
     "the report of step 'acted' is 'security_action_done', which no contract has a schema for: add one to contracts.py "
     "(MESSAGES)"),
    (lambda steps: (*steps, replace(steps[1], name="acted")),
     "two steps are called 'acted': each step has a name of its own"),
    (lambda steps: (*steps, replace(steps[2], name="summed", after="notified")),
     "step 'summed' follows 'notified', which reports nothing back: nothing can follow it"),
    (lambda steps: (*steps, replace(steps[2], name="summed", after="nowhere")),
     "step 'summed' follows 'nowhere', which is no step of it"),
    (lambda steps: (*steps, replace(steps[4], name="unlocked2")),
     "steps 'unlocked' and 'unlocked2' both send 'security_command' at the same moment, so a command could be either: "
     "give one another command type, or make them follow different steps or outcomes"),
    (lambda steps: tuple(replace(step, after="acted") for step in steps),
     "no step starts it (each step names a step it follows)"),
])
def test_a_table_the_engine_cannot_follow_is_said_a_problem_at_a_time_and_refused_at_start(change, problem, monkeypatch):
    security = WORKFLOWS["security"]
    broken = {"security": replace(security, steps=change(security.steps))}
    assert f"WORKFLOWS['security']: {problem}" in problems(broken)
    # And the orchestrator refuses to start on it, in one line
    monkeypatch.setattr(sys, "argv", ["orchestrator.py"])
    monkeypatch.setattr(orchestrator, "WORKFLOWS", broken)
    with pytest.raises(SystemExit, match="^orchestrator: WORKFLOWS\\['security'\\]: "):
        orchestrator.main()
