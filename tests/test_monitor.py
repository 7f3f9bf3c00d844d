"""monitor.py and orchestrator.py --dry-run on workflows whose steps and times are known: the monitor's bookkeeping
(Flow) without Kafka, then the scripts against a real broker."""

import json
import re
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from helpers import NO_RESENDS, TopicReader, detection, unit_event
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError
from rich.console import Console

from common import DEAD_LETTER, MESSAGE_STREAM, Envelope, Settings, caused_by, new_event
from contracts import SEC_COMMAND, THIRD_PARTY, UNIT_COMMAND
from views.board import render
from views.flow import Flow, Tail, groups
from common import Step, Workflow, owns
from orchestrator import WORKFLOWS, route


def flow_of(*messages, sla: float = 5.0) -> Flow:
    """A Flow that has read `messages` (topic, envelope) as the monitor's Tail would, without Kafka."""
    flow = Flow(sla, settings=Settings())
    for name, message in messages:
        flow.add(name, message)
    return flow


def envelope(type_: str, workflow_id: str, seconds_ago: float, step: str = "") -> Envelope:
    """A message of any type, even one no schema knows (the monitor reads only the envelope), made `seconds_ago`
    before one fixed moment, so that the gaps between a test's messages are exact however slow the machine is."""
    return Envelope(id=f"{workflow_id}{step}", type=type_, workflow_id=workflow_id, source="test",
                    created_at=MOMENT - timedelta(seconds=seconds_ago), payload={})


def routed_and_notified(workflow_id: str, seconds_ago: float) -> list[tuple[str, Envelope]]:
    """A security workflow's detection, its command and its notification delivered, all `seconds_ago`."""
    return [(MESSAGE_STREAM, envelope("security_detection", workflow_id, seconds_ago)),
            (SEC_COMMAND, envelope("security_command", workflow_id, seconds_ago, ".security")),
            (THIRD_PARTY, envelope("notification_delivered", workflow_id, seconds_ago, ".delivered"))]


def retried(workflow_id: str, seconds_ago: float, step: str) -> Envelope:
    """The orchestrator's answer to a person's retry of a workflow's step."""
    return envelope("workflow_retried", workflow_id, seconds_ago, ".retry").model_copy(update={"payload": {"step": step}})


MOMENT = datetime.now(timezone.utc)


@pytest.fixture(autouse=True)
def fresh_moment(monkeypatch):
    """Each test's fixed moment is its own start (a test's "10 s ago" must not age while others run)."""
    monkeypatch.setattr(sys.modules[__name__], "MOMENT", datetime.now(timezone.utc))


@pytest.mark.no_broker
def test_a_workflow_is_running_then_stuck_naming_the_missing_step_then_completed_with_its_latency():
    flow = flow_of((MESSAGE_STREAM, envelope("security_detection", "w1", 10)),
                   (SEC_COMMAND, envelope("security_command", "w1", 9.5, ".security")), sla=20)
    assert flow.state("w1", time.time()) == "running" and flow.latency("w1") is None
    flow.sla = 5
    assert flow.state("w1", time.time()) == "STUCK: no 'acted' from security_service"
    flow.add(MESSAGE_STREAM, envelope("security_action_completed", "w1", 9, ".done"))
    flow.add(THIRD_PARTY, envelope("notification_delivered", "w1", 8, ".delivered"))
    assert flow.state("w1", time.time()) == "STUCK: no 'ended' from orchestrator"  # (its steps done, but not said so)
    flow.add(MESSAGE_STREAM, envelope("workflow_completed", "w1", 7.9, ".completed"))
    assert flow.state("w1", time.time()) == "completed" and flow.latency("w1") == pytest.approx(2.1, abs=0.001)
    assert flow.counts() == (1, 1) and flow.duplicates == 0


@pytest.mark.no_broker
def test_a_retried_workflow_completes_even_when_its_new_outcome_is_read_before_the_retrys_answer():
    # Given a failed workflow, retried; the monitor reads the topics side by side, so the retried step's outcome and
    # the workflow's end are read before the orchestrator's answer to the retry (an earlier record time)
    flow = flow_of(*routed_and_notified("w1", 9),
                   (MESSAGE_STREAM, envelope("step_timed_out", "w1", 8, ".timeout-1")),
                   (MESSAGE_STREAM, envelope("workflow_failed", "w1", 8, ".failed")),
                   (SEC_COMMAND, envelope("security_command", "w1", 2, ".acted.retry-1")),
                   (MESSAGE_STREAM, envelope("security_action_completed", "w1", 1, ".retry-1.done")),
                   (MESSAGE_STREAM, envelope("workflow_completed", "w1", 1, ".completed")))
    flow.add(MESSAGE_STREAM, retried("w1", 2, "acted"))
    # Then it is completed, as the orchestrator says, and not stuck waiting for an outcome already read
    assert flow.state("w1", time.time()) == "completed"


@pytest.mark.no_broker
def test_a_retry_read_before_its_workflows_first_event_still_counts():
    # (the topics are read side by side: the orchestrator's answer may be read before the detection it is about)
    flow = flow_of((MESSAGE_STREAM, retried("w1", 2, "acted")), *routed_and_notified("w1", 9),
                   (MESSAGE_STREAM, envelope("workflow_failed", "w1", 8, ".failed")),
                   (MESSAGE_STREAM, envelope("security_action_completed", "w1", 1, ".retry-1.done")),
                   (MESSAGE_STREAM, envelope("workflow_completed", "w1", 1, ".completed")))
    assert flow.state("w1", time.time()) == "completed"


@pytest.mark.no_broker
def test_a_later_steps_retry_keeps_the_report_an_earlier_step_shares_with_it():
    # Given Example 4's guard reported (acted done), the unlocking after it failed, and the unlocking retried
    flow = flow_of(*routed_and_notified("w1", 9),
                   (MESSAGE_STREAM, envelope("security_action_completed", "w1", 8, ".security.done")),
                   (SEC_COMMAND, envelope("security_command", "w1", 8, ".unlock")),
                   (MESSAGE_STREAM, envelope("security_action_failed", "w1", 7, ".unlock.done")),
                   (MESSAGE_STREAM, envelope("workflow_failed", "w1", 7, ".failed")))
    flow.add(MESSAGE_STREAM, retried("w1", 5, "unlocked"))
    # When the retried unlocking is done and the workflow completes
    flow.add(MESSAGE_STREAM, envelope("workflow_completed", "w1", 3, ".completed"))
    # Then it is completed: the guard's report (the same type as the unlocking's) still counts for acted
    assert flow.state("w1", time.time()) == "completed"


@pytest.mark.no_broker
def test_a_writers_clock_is_not_trusted_for_latency_and_a_skewed_workflow_is_left_out_of_the_percentiles():
    # Given a workflow whose writer's clock is decades off, read with Kafka's record times 1.5 s apart
    flow = Flow(settings=Settings())
    now = time.time()
    flow.add(MESSAGE_STREAM, envelope("unit_event", "w1", 2e9), at=now - 2)
    for type_, step, at in (("unit_command", ".unit", now - 1.9), ("unit_command_applied", ".applied", now - 0.6),
                            ("workflow_completed", ".completed", now - 0.5)):
        flow.add(MESSAGE_STREAM, envelope(type_, "w1", 0, step), at=at)
    # Then its latency is Kafka's, it is completed, the skew is counted and shown, and no percentile counts it
    assert flow.latency("w1") == pytest.approx(1.5) and flow.state("w1", time.time()) == "completed"
    assert flow.skew == 1 and flow.figures()["clock_skew"] == 1
    assert flow.sla_report()["unit"] == {"count": 1, "completed": 1, "failed": 0, "p50": None, "p95": None,
                                         "p99": None, "sla_s": 5.0, "breaches": 0}
    screen = Console(width=300, record=True)
    screen.print(render(flow, None))
    text = screen.export_text()
    assert "completed (clock skew)" in text and "clock skew: 1 message with a created_at" in text
    # And a message sent again much later (a replay, a command re-sent) is no skew: it was written long before
    flow.add(MESSAGE_STREAM, envelope("unit_command", "w1", 0, ".unit"), at=now + 300)
    assert flow.skew == 1


@pytest.mark.no_broker
def test_a_failed_step_fails_its_workflow_and_counts_as_an_sla_breach():
    flow = flow_of((MESSAGE_STREAM, envelope("security_detection", "w1", 10)),
                   (MESSAGE_STREAM, envelope("security_action_failed", "w1", 9, ".done")))
    assert flow.state("w1", time.time()) == "failed"
    assert flow.sla_report()["security"] == {"count": 1, "completed": 0, "failed": 1, "p50": None, "p95": None,
                                             "p99": None, "sla_s": 5.0, "breaches": 1}
    assert flow.figures()["workflows"] == {"started": 1, "completed": 0, "failed": 1, "cancelled": 0, "stuck": 0, "running": 0,
        "dead_lettered": 0}


@pytest.mark.no_broker
def test_the_same_effect_twice_is_a_duplicate_but_a_replayed_event_is_not():
    flow = flow_of(*[(MESSAGE_STREAM, envelope("security_detection", "w1", 3))] * 2,
                   *[(THIRD_PARTY, envelope("notification_delivered", "w1", 2, ".delivered"))] * 2)
    assert flow.duplicates == 1


@pytest.mark.no_broker
def test_a_cancelled_workflow_is_cancelled_not_stuck_and_a_retried_one_runs_again_until_it_completes():
    flow = flow_of((MESSAGE_STREAM, envelope("security_detection", "w1", 9)),
                   (SEC_COMMAND, envelope("security_command", "w1", 9, ".security")),
                   (MESSAGE_STREAM, envelope("workflow_cancelled", "w1", 8, ".cancel")),
                   (MESSAGE_STREAM, envelope("security_detection", "w2", 9)),
                   (SEC_COMMAND, envelope("security_command", "w2", 9, ".security")),
                   (MESSAGE_STREAM, envelope("security_action_failed", "w2", 8, ".failed")),
                   (THIRD_PARTY, envelope("notification_delivered", "w2", 8, ".delivered")),
                   (MESSAGE_STREAM, envelope("workflow_failed", "w2", 8, ".security.failed")))
    retried = envelope("workflow_retried", "w2", 2, ".retry").model_copy(update={"payload": {"step": "acted"}})
    flow.add(MESSAGE_STREAM, retried)
    assert (flow.state("w1", time.time()), flow.state("w2", time.time())) == ("cancelled", "running")
    # (the retried step reports again, and the workflow ends again; its notification was delivered before)
    flow.add(SEC_COMMAND, envelope("security_command", "w2", 2, ".acted.retry-1"))
    flow.add(MESSAGE_STREAM, envelope("security_action_completed", "w2", 1, ".done"))
    flow.add(MESSAGE_STREAM, envelope("workflow_completed", "w2", 1, ".completed"))
    assert flow.state("w2", time.time()) == "completed"
    assert flow.figures()["workflows"] == {"started": 2, "completed": 1, "failed": 0, "cancelled": 1, "stuck": 0,
                                           "running": 0, "dead_lettered": 0}


@pytest.mark.no_broker
def test_a_workflow_retried_that_fails_again_is_failed_as_the_orchestrator_says_not_stuck():
    flow = flow_of((MESSAGE_STREAM, envelope("security_detection", "w1", 30)),
                   (SEC_COMMAND, envelope("security_command", "w1", 30, ".security")),
                   (MESSAGE_STREAM, envelope("workflow_failed", "w1", 25, ".security.timeout-1.failed")),
                   (MESSAGE_STREAM, retried("w1", 20, "acted")),
                   (SEC_COMMAND, envelope("security_command", "w1", 20, ".acted.retry-1")),
                   (MESSAGE_STREAM, envelope("workflow_failed", "w1", 15, ".acted.retry-1.timeout-1.failed")))
    assert flow.status("w1", time.time()) == ("failed", None)


@pytest.mark.no_broker
def test_the_orchestrators_word_on_how_a_workflow_ended_is_its_state_and_a_dead_lettered_event_is_not_waiting():
    from common import dead_letter
    # (its end is read before the step's report, as a monitor reading the topics side by side may)
    flow = flow_of((MESSAGE_STREAM, envelope("security_detection", "w1", 9)),
                   (MESSAGE_STREAM, envelope("workflow_completed", "w1", 8, ".completed")))
    assert flow.status("w1", time.time()) == ("completed", None)
    bad = envelope("security_detection", "w2", 9)
    flow.add(MESSAGE_STREAM, bad)
    state, stuck = flow.status("w2", time.time())
    assert (state, stuck["step"], stuck["service"]) == ("waiting", "routed", "orchestrator")
    assert stuck["why"].startswith("no 'routed' from orchestrator since ")
    flow.add("dead_letter.orchestrator", dead_letter(bad.to_bytes(), "payload: sensor_id missing", "orchestrator"))
    assert flow.status("w2", time.time()) == ("dead_lettered", None)
    assert flow.figures()["workflows"]["dead_lettered"] == 1


@pytest.mark.no_broker
def test_a_command_sent_again_after_a_timeout_is_a_resend_and_a_failed_workflow_is_failed():
    command = envelope("security_command", "w1", 2, ".security")
    flow = flow_of((MESSAGE_STREAM, envelope("security_detection", "w1", 3)), (SEC_COMMAND, command),
                   (MESSAGE_STREAM, envelope("step_timed_out", "w1", 1, ".security.timeout-1")), (SEC_COMMAND, command),
                   (MESSAGE_STREAM, envelope("workflow_failed", "w1", 0, ".security.timeout-1.failed")))
    assert (flow.resent, flow.duplicates, flow.timeouts["w1"]) == (1, 0, 1)
    assert flow.state("w1", time.time()) == "failed"
    screen = Console(width=200, record=True)
    screen.print(render(flow, None))
    text = screen.export_text()
    assert "failed (1 timed out)" in text and "commands re-sent 1" in text and "steps timed out 1" in text
    assert flow.figures() == {"workflows": {"started": 1, "completed": 0, "failed": 1, "cancelled": 0, "stuck": 0, "running": 0,
        "dead_lettered": 0},
                              "duplicate_effects": 0, "resent_ignored": 1, "steps_timed_out": 1, "steps_followed": 0,
                              "dead_letters": 0, "clock_skew": 0}


@pytest.mark.no_broker
def test_a_workflow_added_to_the_orchestrators_definition_alone_is_followed_by_the_monitor(monkeypatch):
    # Given a fourth workflow written only in the orchestrator's WORKFLOWS table
    monkeypatch.setitem(WORKFLOWS, "repair", Workflow("fault_reported", "fault_sensor", started="reported", steps=(
        Step("repaired", "repair_command", "repair_command", "repair_service", done=("repair_done",)),)))
    # When its messages appear on the topics
    flow = flow_of((MESSAGE_STREAM, envelope("fault_reported", "r1", 30)),
                   (MESSAGE_STREAM, envelope("fault_reported", "r2", 30)),
                   ("repair_command", envelope("repair_command", "r1", 29, ".repair")),
                   ("repair_command", envelope("repair_command", "r2", 29, ".repair")),
                   (MESSAGE_STREAM, envelope("repair_done", "r1", 27, ".done")),
                   (MESSAGE_STREAM, envelope("workflow_completed", "r1", 27, ".completed")))
    # Then the monitor knows its type, its steps, who should act, its latency and its SLA figures
    now = time.time()
    assert flow.kind == {"r1": "repair", "r2": "repair"}
    assert flow.state("r1", now) == "completed" and flow.latency("r1") == pytest.approx(3.0, abs=0.001)
    assert flow.state("r2", now) == "STUCK: no 'repaired' from repair_service"
    assert flow.sla_report()["repair"]["count"] == 2 and flow.sla_report()["repair"]["breaches"] == 1
    assert "orchestrator-repair" in groups() and "repair_service" in groups()
    screen = Console(width=200, record=True)
    screen.print(render(flow, None))
    assert "reported 0.00 → routed 1.00 → repaired 3.00" in screen.export_text()
    # And an orchestrator split off for it owns its events, and its step's report ends the step (no dead letter)
    assert owns(WORKFLOWS, "repair_done", {"repair"}) and not owns(WORKFLOWS, "repair_done", {"security"})
    assert route(envelope("repair_done", "r1", 0, ".done")) == []


def at(message, seconds_ago: float):
    """The message as if created `seconds_ago` seconds ago."""
    return message.model_copy(update={"created_at": datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)})


def outcome(command, type_, **payload):
    return caused_by(command, "done", type_, {"action": "lock_zone", "zone": "zone-1", "detail": "", **payload}, "t")


def test_once_shows_completed_failed_and_stuck_workflows(scripts, producer):
    def aged(name, message, seconds_ago):  # (on the topic, and by its own clock, `seconds_ago` s ago)
        producer(name, at(message, seconds_ago), at=time.time() - seconds_ago)
    # Given three security workflows on the topics: one completed, one whose action failed, one stuck after routing
    done, failed, stuck = detection(), detection(), detection()
    for event, age in ((done, 10), (failed, 10), (stuck, 60)):
        aged(MESSAGE_STREAM, event, age)
        for name, command in route(event, stage=1):
            aged(name, command, age - 0.5)
    aged(MESSAGE_STREAM, outcome(route(done, 1)[0][1], "security_action_completed"), 9)
    aged(THIRD_PARTY, caused_by(route(done, 1)[1][1], "delivered", "notification_delivered",
                                route(done, 1)[1][1].payload, "t"), 9)
    aged(MESSAGE_STREAM, caused_by(done, "completed", "workflow_completed", {"workflow": "security", "detail": ""},
                                   "orchestrator"), 8.9)
    aged(MESSAGE_STREAM, outcome(route(failed, 1)[0][1], "security_action_failed", detail="jammed"), 9)
    # When the monitor takes one snapshot with a 5 s SLA
    screen = scripts.run("monitor.py", "--once", "--sla", "5").stdout
    rows = {line.split("│")[1].strip(): line for line in screen.splitlines() if line.count("│") > 4}
    # Then each workflow shows its state, and the stuck one names the missing step and its service
    assert "completed" in rows[done.id[:8]] and re.search(r"│ \d+\.\d\d s +│", rows[done.id[:8]])  # its latency
    assert not re.search(r"│ \d+\.\d\d s +│", rows[stuck.id[:8]])  # none while a step is missing
    assert "failed" in rows[failed.id[:8]]
    assert "STUCK: no 'acted' from security_service" in rows[stuck.id[:8]]
    assert "workflows: 3 started, 1 completed, 1 failed, 0 cancelled, 1 stuck, 0 running" in screen
    # And --json gives those figures as one object
    figures = json.loads(scripts.run("monitor.py", "--once", "--json", "--sla", "5").stdout)
    assert figures["workflows"] == {"started": 3, "completed": 1, "failed": 1, "cancelled": 0, "stuck": 1, "running": 0,
        "dead_lettered": 0}
    assert (figures["duplicate_effects"], figures["resent_ignored"]) == (0, 0)


def test_sla_report_gives_percentiles_and_breaches_of_known_latencies_by_kafkas_clock(scripts, producer):
    def sent(name, message, when, written=None):
        """`message` on the topic at record time `when`, its created_at saying `written` (default: the same)."""
        stamp = datetime.fromtimestamp(when if written is None else written, timezone.utc)
        producer(name, message.model_copy(update={"created_at": stamp}), at=when)

    def unit_workflow(latency, written=None):
        event = unit_event("offline")
        command = route(event, stage=3)[0][1]
        applied = caused_by(command, "applied", "unit_command_applied",
                            {"unit_id": "unit-1", "command": "reboot", "state": "rebooting"}, "t")
        sent(MESSAGE_STREAM, event, began, written)
        sent(UNIT_COMMAND, command, began + 0.5)
        sent(MESSAGE_STREAM, applied, began + latency - 0.1)
        sent(MESSAGE_STREAM, caused_by(applied, "completed", "workflow_completed", {"workflow": "unit", "detail": ""},
                                       "orchestrator"), began + latency)
    # Given ten unit workflows that took 1, 2, ... 10 s end to end by Kafka's record times
    began = time.time() - 100
    for latency in range(1, 11):
        unit_workflow(latency)
    # And two whose writer's clock said 1970 and 9999 (they took 0.7 s by Kafka's)
    unit_workflow(0.7, written=0.0)
    unit_workflow(0.7, written=datetime(9999, 1, 1, tzinfo=timezone.utc).timestamp())
    # When the SLA report is asked for with a 5 s SLA
    report = json.loads(scripts.run("monitor.py", "--sla-report", "--json", "--sla", "5").stdout)
    # Then the nearest-rank percentiles and the five late workflows are reported; the skewed ones are counted
    # completed and left out of the percentiles
    assert report["unit"] == {"count": 12, "completed": 12, "failed": 0, "p50": 5.0, "p95": 10.0, "p99": 10.0,
                              "sla_s": 5.0, "breaches": 5}
    assert report["security"]["count"] == 0 and report["security"]["p50"] is None
    # And the snapshot shows the skew
    assert json.loads(scripts.run("monitor.py", "--once", "--json").stdout)["clock_skew"] == 2
    assert "clock skew: 2 messages" in scripts.run("monitor.py", "--once").stdout
    # And a window that excludes them counts none
    recent = json.loads(scripts.run("monitor.py", "--sla-report", "--json", "--window", "30").stdout)
    assert recent["unit"]["count"] == 0


@pytest.mark.no_broker
def test_dry_run_says_a_services_word_that_it_did_not_act_in_time_is_kept_and_not_dead_lettered():
    from common.dry_run import preview
    sent = route(detection(), 1)[0][1]
    said = caused_by(sent, "expired-1", "command_expired", {"command": sent.type, "deadline": sent.created_at,
                                                           "service": "security_service"}, "security_service")
    record = type("Record", (), {"topic": "message_stream.security_service", "value": said.to_bytes()})()
    emitted = preview([record], WORKFLOWS, route, 1, {"security"})
    assert dict(emitted["command_expired"]) == {"(a command not acted on in time: kept beside its step)": 1}


def test_dry_run_previews_a_routing_change_and_produces_and_commits_nothing(env, scripts, producer):
    # Given recorded traffic: three detections, two unit events and one junk message
    events = [detection() for _ in range(3)] + [unit_event() for _ in range(2)]
    for event in events:
        producer(MESSAGE_STREAM, event)
    producer(MESSAGE_STREAM, b"junk")
    # When the Example 2 table is previewed against Example 3
    preview = json.loads(scripts.run("orchestrator.py", "--dry-run", "--example", "2", "--compare", "3", "--json").stdout)
    # Then its counts are those of route() for each stage
    assert preview["example 2"] == {"security_detection": {"sec_command": 3, "notification_command": 3, "report_data": 3},
                                    "unit_event": {"(waits in Kafka: read from a later example)": 2},
                                    "(invalid)": {"dead_letter": 1}}
    assert preview["example 3"]["unit_event"] == {"unit_command": 2, "report_data": 2}
    assert sum(len(route(e, 3)) for e in events) == sum(sum(c.values()) for t, c in preview["example 3"].items()
                                                         if t != "(invalid)")
    # And nothing was produced or committed
    consumer = KafkaConsumer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    partition = TopicPartition(env["TOPIC_PREFIX"] + SEC_COMMAND, 0)
    assert consumer.end_offsets([partition])[partition] == 0
    consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    group = env["TOPIC_PREFIX"] + "orchestrator"
    assert not admin.list_group_offsets({group: None}).get(group)
    admin.close()


def test_the_dry_run_says_which_workflows_in_flight_a_restart_would_meet(scripts, topics, producer):
    # Given two security workflows still waiting for their action (no security service), routed at Example 3
    orchestrator = scripts.start("orchestrator.py", "--example", "3", *NO_RESENDS)
    waiting = [detection(), detection()]
    for event in waiting:
        producer(MESSAGE_STREAM, event)
    topics(SEC_COMMAND).read_count(2)
    scripts.stop(orchestrator)
    # When a change to Example 4 is previewed
    preview = json.loads(scripts.run("orchestrator.py", "--dry-run", "--example", "4", "--json").stdout)
    said = scripts.run("orchestrator.py", "--dry-run", "--example", "4").stdout
    # Then it counts them, by the stage each started under: they keep that stage's routing
    assert preview["in_flight"] == [{"workflow": "security", "stage": 3, "count": 2}]
    assert "in flight: 2 running workflows, each routed on at the stage it started under (a restart at example 4 " \
           "changes the path of new workflows only):\n  security                     2 started under example 3" in said


def test_a_failed_security_action_is_escalated_end_to_end(scripts, topics, producer):
    # Given services where every action in zone-1 fails
    security = scripts.start("security_service.py", "--fail-zones", "zone-1")
    scripts.start("notification_service.py")
    scripts.start("orchestrator.py", "--example", "1")
    # When a detection in zone-1 arrives
    event = new_event("security_detection", {"sensor_id": "sensor-1", "zone": "zone-1", "kind": "smoke",
                                              "severity": 5}, "test")
    producer(MESSAGE_STREAM, event)
    # Then the on-duty notification and an escalation to the supervisor are both delivered, in the same workflow
    delivered = topics(THIRD_PARTY).read_count(2)
    assert sorted(m.payload["recipient"] for m in delivered) == ["on-duty-zone-1", "security-supervisor"]
    assert {m.workflow_id for m in delivered} == {event.id}
    escalation = next(m for m in delivered if m.payload["recipient"] == "security-supervisor")
    assert escalation.payload["text"] == "ESCALATION: dispatch_guard failed at zone-1: actuator not responding"
    assert "dispatch_guard in zone-1 FAILED: actuator not responding (a simulated fault: --fail-zones zone-1)" in \
        scripts.output(security)


@pytest.mark.no_broker
def test_memory_is_a_window_of_recent_workflows_and_the_rest_are_counted_not_kept():
    # Given a monitor that keeps 100 workflows in full
    flow = Flow(settings=Settings(), window=100)
    # When 1,000 unit workflows, each taking 1 s, pass through it
    for i in range(1000):
        flow.add(MESSAGE_STREAM, envelope("unit_event", f"w{i}", 20))
        flow.add(UNIT_COMMAND, envelope("unit_command", f"w{i}", 19.5, ".unit"))
        flow.add(MESSAGE_STREAM, envelope("unit_command_applied", f"w{i}", 19, ".applied"))
        flow.add(MESSAGE_STREAM, envelope("workflow_completed", f"w{i}", 19, ".completed"))
    # Then it holds about a window of them, yet every figure counts all 1,000
    assert len(flow.times) <= 120 and len(flow.kind) <= 120 and len(flow.seen) <= 800
    assert flow.counts() == (1000, 1000) and flow.unknown_fate == 0
    report = flow.sla_report()["unit"]
    assert (report["count"], report["completed"], report["breaches"]) == (1000, 1000, 0)
    assert report["p50"] == pytest.approx(1.0, abs=0.001) and report["p99"] == pytest.approx(1.0, abs=0.001)


@pytest.mark.no_broker
def test_workflows_leaving_the_window_before_their_commands_are_read_count_as_the_orchestrator_says():
    # (the monitor reads the topics side by side: all of message_stream may come before unit_command)
    flow, ids = Flow(5.0, settings=Settings(), window=10), [f"w{n}" for n in range(60)]
    for w in ids:
        for type_, step in (("unit_event", ""), ("unit_command_applied", ".applied"), ("workflow_completed", ".end")):
            flow.add(MESSAGE_STREAM, envelope(type_, w, 1, step))
    for w in ids:
        flow.add(UNIT_COMMAND, envelope("unit_command", w, 1, ".unit"))
    assert flow.figures()["workflows"] == {"started": 60, "completed": 60, "failed": 0, "cancelled": 0, "stuck": 0,
                                           "running": 0, "dead_lettered": 0}
    assert len(flow.times) <= 2 * 10


@pytest.mark.no_broker
def test_a_dead_letter_without_a_reason_is_counted_and_shown_not_fatal():
    flow = flow_of((DEAD_LETTER, envelope("dead_letter", "d1", 1)))
    screen = Console(width=200, record=True)
    screen.print(render(flow, None))
    assert flow.dead_letters == 1 and "dead letters: 1 (last: (no reason given))" in screen.export_text()


def test_once_counts_every_workflow_when_most_have_left_the_monitors_window(scripts):
    # Given 300 completed unit workflows on the topics, read by a monitor that keeps only 50 in full
    scripts.start("orchestrator.py")
    scripts.start("unit_event_producer.py", "--count", "300", "--rate", "60", "--units", "50")
    reader = TopicReader(scripts.env, MESSAGE_STREAM)
    reader.read_count(300, type_="workflow_completed", timeout=120)
    reader.close()
    # When it takes one snapshot
    screen = scripts.run("monitor.py", "--once", "--keep", "50", timeout=120).stdout
    # Then its totals count all of them, and it says none left the window unfinished
    assert "workflows: 300 started, 300 completed, 0 failed, 0 cancelled, 0 stuck, 0 running" in screen
    assert "left the monitor's window" not in screen
    # And with nothing pending, no group has a lag (a transaction's commit marker is no message)
    lag = next(line for line in screen.splitlines() if line.startswith("consumer lag: "))
    assert re.fullmatch(r"consumer lag: (\S+ 0\s*)+", lag) and "orchestrator 0" in lag, lag


@pytest.mark.no_broker
def test_the_live_view_goes_on_when_the_broker_does_not_answer_and_says_the_lag_is_not_known():
    # (found by hand: the broker stopped under `python monitor.py` ended it with a traceback from end_offsets)
    class Unanswered:
        def assignment(self):
            return set()

        def end_offsets(self, partitions, timeout_ms=None):
            raise KafkaTimeoutError("Failed to get offsets by timestamps in 2000 ms")
    tail = Tail.__new__(Tail)
    tail.flow, tail.consumer = flow_of((MESSAGE_STREAM, envelope("security_detection", "w1", 10))), Unanswered()
    lag = tail.lag(admin=None)
    screen = Console(width=200, record=True)
    screen.print(render(tail.flow, lag))
    assert "consumer lag: not known now: Kafka does not answer (KafkaTimeoutError)" in screen.export_text()


@pytest.mark.no_broker
def test_the_live_view_in_a_small_terminal_shows_its_figures_and_as_many_workflows_as_fit():
    # (found by hand: in an 80x24 tmux window the table's wrapped rows pushed every figure off the screen)
    from views.board import fitting
    small = Console(width=80, height=24, record=True)
    flow = flow_of(*[(MESSAGE_STREAM, envelope("security_detection", f"w{i}", 1)) for i in range(15)])
    small.print(render(flow, None, fitting(small, 15), figures_first=True))
    shown = small.export_text().splitlines()
    assert len(shown) <= 24 and shown[0].startswith("messages per second") and any(
        line.startswith("workflows: 15 started") for line in shown)
