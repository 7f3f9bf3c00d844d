"""The routing table, without Kafka: every event type at every stage, and who owns what when split."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
from helpers import ROOT, detection, unit_event
from walk import example, walk

import acls
import orchestrator
from common import orchestrator_cli
from common import MESSAGE_STREAM, DeadLetter, caused_by, new_event
from contracts import NOTIFICATION_COMMAND, REPORT_DATA, SEC_COMMAND, UNIT_COMMAND
from common import OPERATOR, REQUESTS, owns, problems, senders, written_by
from common import stages
from orchestrator import WORKFLOWS, route

pytestmark = pytest.mark.no_broker  # runs in `make check`


def topics_of(commands):
    return [name for name, _ in commands]


def test_example_1_sends_a_detection_to_security_and_notification():
    commands = route(detection(), stage=1)
    assert topics_of(commands) == [SEC_COMMAND, NOTIFICATION_COMMAND]


@pytest.mark.parametrize("stage", [2, 3])
def test_from_example_2_the_security_workflow_also_reports(stage):
    commands = route(detection(), stage=stage)
    assert topics_of(commands) == [SEC_COMMAND, NOTIFICATION_COMMAND, REPORT_DATA]
    report = commands[2][1]
    assert report.payload == {"workflow": "security", "category": "motion", "entity": "sensor-1", "zone": "zone-1"}


def test_commands_carry_the_workflow_id_of_the_detection_and_are_typed():
    event = detection()
    commands = route(event, stage=3)
    assert {m.workflow_id for _, m in commands} == {event.id}
    assert [m.type for _, m in commands] == ["security_command", "notification_command", "report_data"]


def test_routing_the_same_event_twice_gives_the_same_command_ids():
    # so a re-routed event is recognised downstream as a repeat
    event = detection()
    assert [m.id for _, m in route(event)] == [m.id for _, m in route(event)]
    assert len({m.id for _, m in route(event)}) == 3


@pytest.mark.parametrize("severity,action,channel", [(1, "inspect", "sms"), (3, "lock_zone", "sms"),
                                                     (5, "dispatch_guard", "pager")])
def test_severity_picks_the_security_action_and_the_channel(severity, action, channel):
    sec, note = route(detection(severity), stage=1)
    assert sec[1].payload["action"] == action and note[1].payload["channel"] == channel


@pytest.mark.parametrize("stage", [1, 2])
def test_a_unit_event_before_example_3_has_no_route(stage):
    with pytest.raises(DeadLetter, match="no route for 'unit_event' at example"):
        route(unit_event(), stage=stage)


@pytest.mark.parametrize("status,command", [("heartbeat", "acknowledge"), ("battery_low", "power_save"),
                                            ("offline", "reboot"), ("tamper", "lockdown")])
def test_example_3_routes_a_unit_event_to_the_unit_and_to_reporting(status, command):
    commands = route(unit_event(status), stage=3)
    assert topics_of(commands) == [UNIT_COMMAND, REPORT_DATA]
    assert commands[0][1].payload == {"unit_id": "unit-1", "command": command}
    assert commands[1][1].payload["workflow"] == "unit" and commands[1][1].payload["category"] == status


def test_a_failed_security_action_is_escalated_by_notification():
    failed = caused_by(detection(), "done", "security_action_failed",
                       {"action": "lock_zone", "zone": "zone-1", "detail": "door jammed"}, "test")
    commands = route(failed, stage=1)
    assert topics_of(commands) == [NOTIFICATION_COMMAND]
    assert commands[0][1].payload["recipient"] == "security-supervisor"
    assert "door jammed" in commands[0][1].payload["text"]


@pytest.mark.parametrize("type_,payload", [
    ("security_action_completed", {"action": "inspect", "zone": "zone-1", "detail": ""}),
    ("unit_command_applied", {"unit_id": "unit-1", "command": "reboot", "state": "rebooting"})])
def test_a_completed_step_ends_its_workflow_with_no_command(type_, payload):
    assert route(caused_by(detection(), "done", type_, payload, "test")) == []


def test_an_unknown_type_has_no_route():
    stranger = new_event("security_detection", {"sensor_id": "s", "zone": "z", "kind": "smoke", "severity": 1}, "t")
    stranger = stranger.model_copy(update={"type": "weather_report"})
    with pytest.raises(DeadLetter, match="no route for 'weather_report'"):
        route(stranger)


def test_split_orchestrators_own_disjoint_workflows_and_an_unknown_type_is_never_skipped():
    assert owns(WORKFLOWS, "security_detection", {"security"}) and not owns(WORKFLOWS, "security_detection", {"unit"})
    assert owns(WORKFLOWS, "unit_event", {"unit"}) and not owns(WORKFLOWS, "unit_event", {"security"})
    assert owns(WORKFLOWS, "unit_command_applied", {"unit"}) and owns(WORKFLOWS, "security_action_failed", {"security"})
    # (route() says "no route")
    assert owns(WORKFLOWS, "weather_report", {"security"}) and owns(WORKFLOWS, "weather_report", {"unit"})
    assert all(owns(WORKFLOWS, t, {"security", "unit"}) for t in ["security_detection", "unit_event", "weather_report"])
    # (dead-lettered first)
    assert not any("weather_report" in types for types in senders(WORKFLOWS, {"security", "unit"}).values())


def test_the_longest_failure_detail_still_makes_a_valid_escalation():
    failed = caused_by(detection(), "done", "security_action_failed",
                       {"action": "dispatch_guard", "zone": "z" * 64, "detail": "d" * 200}, "test")
    [(_, escalation)] = route(failed)
    assert len(escalation.payload["text"]) <= 500


@pytest.mark.parametrize("stage", stages(WORKFLOWS))
@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_every_path_of_every_workflow_sends_only_the_steps_it_declares_and_ends(name, stage):
    # (every payload the contracts make of its starting event, each awaited step answered done, failed or not at
    # all: route() never fails on a valid event, every command it sends is a step WORKFLOWS declares for that moment,
    # and the workflow ends; a test that fails names the path and what to declare)
    workflow = WORKFLOWS[name]
    if stage < workflow.from_stage:
        with pytest.raises(DeadLetter, match="no route"):
            route(new_event(workflow.starts_with, example(workflow.starts_with), "t"), stage)
        return
    paths = walk(name, stage)
    for path in paths:
        assert path.entry["state"] in ("completed", "failed"), f"a path that does not end: {path}"
    # And every step the table has at this stage is sent on some path (else route() never sends it, or it follows a
    # moment that never comes)
    sent, declared = set().union(*(path.sent for path in paths)), {s.name for s in workflow.steps if s.from_stage <= stage}
    assert sent == declared, (f"WORKFLOWS[{name!r}] declares steps that no path sends at example {stage}: "
                              f"{sorted(declared - sent)}: does route() send them, in a branch before any that takes "
                              "the same event first (the branch of steps reported done, say)?")


def test_the_table_has_no_problem_the_orchestrator_would_refuse_to_start_on():
    assert problems(WORKFLOWS) == []


def test_each_step_report_is_owned_by_its_workflow_and_each_service_may_read_its_step_topic():
    for name, workflow in WORKFLOWS.items():
        for step in workflow.steps:
            assert all(owns(WORKFLOWS, t, {name}) for t in step.done + step.failed + (workflow.starts_with,))
            assert step.topic in acls.ACCESS[step.service].reads, f"acls.py: {step.service} cannot read {step.topic}"
            assert step.topic in acls.ACCESS["orchestrator"].writes


def test_each_writer_to_the_orchestrator_serves_one_workflow_and_may_write_its_own_member():
    # (so split orchestrators read disjoint topics, and each bad record is dead-lettered by exactly one of them; but
    # every orchestrator reads a person's requests, and answers those about its own workflows)
    operator = written_by(MESSAGE_STREAM, OPERATOR)
    members = [set(senders(WORKFLOWS, {name})) - {operator} for name in WORKFLOWS]
    assert sum(map(len, members)) == len(set().union(*members))
    assert all(senders(WORKFLOWS, {name})[operator] == set(REQUESTS) for name in WORKFLOWS)
    for member in senders(WORKFLOWS, set(WORKFLOWS)):
        writer = member.removeprefix(MESSAGE_STREAM + ".")
        assert MESSAGE_STREAM in acls.ACCESS[writer].writes, f"acls.py: {writer} may not write {member}"


@pytest.mark.parametrize("args, error", [
    (["--since", "2026-11-27T18:00"], "--since is for --dry-run only; nothing was started"),
    (["--compare", "2", "--json"], "--compare, --json are for --dry-run only; nothing was started"),
    (["--dry-run", "--attempts", "2"], "--attempts is not for --dry-run; nothing was started"),
    (["--dry-run", "--since", "04:20"], "--since takes a date and time, e.g. 2026-11-27T18:00 (local time), not '04:20'"),
    (["--dry-run", "--since", "yesterday"], "--since takes a date and time, e.g. 2026-11-27T18:00 (local time), not "
                                            "'yesterday'"),
    (["--workflows", "unit", "--example", "2"], "no workflow of unit runs at example 2 (unit starts at 3); give "
                                                "--example 3 or more"),
])
def test_a_flag_that_means_nothing_or_cannot_be_read_ends_the_orchestrator_in_one_line_before_it_starts(
        args, error, monkeypatch, capsys):
    # (in this process, for speed: a SystemExit with a text is what Python prints as one line, exiting 1)
    monkeypatch.setattr(sys, "argv", ["orchestrator.py", *args])
    with pytest.raises(SystemExit) as ended:
        orchestrator.main()
    assert (ended.value.code, capsys.readouterr().out) == (f"orchestrator: {error}", "")


def test_the_orchestrators_one_line_refusal_is_all_a_user_sees():
    result = subprocess.run([sys.executable, "orchestrator.py", "--since", "2026-11-27T18:00"], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1"),
                            timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", "orchestrator: --since is for --dry-run only; nothing was started\n")


def test_a_state_retention_shorter_than_a_workflow_may_run_is_refused_in_one_line_before_it_starts(monkeypatch):
    # (a workflow's state would expire while it still waits: no retry, no escalation, no word)
    monkeypatch.setattr(orchestrator_cli, "SETTINGS", replace(orchestrator_cli.SETTINGS, state_retention_s=60))
    monkeypatch.setattr(orchestrator, "WORKFLOWS", {"security": WORKFLOWS["security"]})  # (at example 3: one step)
    monkeypatch.setattr(sys, "argv", ["orchestrator.py", "--step-timeout", "30", "--attempts", "3"])
    with pytest.raises(SystemExit) as ended:
        orchestrator.main()
    assert ended.value.code.startswith("orchestrator: STATE_RETENTION_S=60 is shorter than a workflow may run here (90 s")
    assert "Give STATE_RETENTION_S=150 or more" in ended.value.code
