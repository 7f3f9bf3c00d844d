"""What stands between a command and its effect, without Kafka: no service acts on a command read after its
deadline (it says so, and tells the orchestrator) or on one of a cancelled workflow; an action outside Kafka is
applied once per command, a retry's once with the command it repeats; the orchestrator stamps each command with its
attempt's deadline and keeps what came late beside its step."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from helpers import detection

from common import WORKFLOW, Effects, Envelope, Limits, Orchestration, Settings, Store, caused_by, handle_record
from common.gate import Expired, Gate
from common.handling import SEEN
from orchestrator import WORKFLOWS, route

pytestmark = pytest.mark.no_broker  # runs in `make check`
T0 = 1_000_000.0


class Record:
    """A Kafka record as the loop hands it to handling."""

    def __init__(self, message: Envelope, offset: int = 0):
        self.topic, self.partition, self.offset, self.key, self.headers = "sec_command", 0, offset, b"s", None
        self.value = message.to_bytes()


def command(deadline: float | None, id_: str = "w.security") -> Envelope:
    return route(detection(), 1)[0][1].model_copy(update={"id": id_, "deadline": None if deadline is None else
                                                          datetime.fromtimestamp(deadline, timezone.utc)})


def gate(reports: bool = True, revoked: dict | None = None, applied=None) -> Gate:
    """A service's gate whose revocations are given, not read from Kafka (tests/test_operator.py reads them)."""
    made = Gate("svc", Settings(), reports, applied)
    made.revocations.revoked = revoked or {}
    made.revocations.read = lambda: None
    return made


class Gated:
    """A service's handling as the loop does it, its gate's revocations given, its handler counting calls."""

    def __init__(self, reports: bool = True, revoked: dict | None = None):
        self.store = Store("svc", Settings(), durable=False, dedupe=True)
        self.store.restore({0})
        self.gate = gate(reports, revoked)
        self.acted = []

    def handle(self, message: Envelope, offset: int = 0):
        handled = handle_record("svc", Record(message, offset), lambda m, _: self.acted.append(m.id) or [],
                                self.store, stop=False, gate=self.gate)
        self.store.commit(handled.changes)
        return handled


def test_a_command_read_after_its_deadline_is_not_acted_on_and_the_orchestrator_is_told():
    service = Gated()
    handled = service.handle(command(deadline=1.0))
    assert service.acted == [] and handled.counted == ("expired", "security_command")
    [said] = handled.outputs
    told = Envelope.model_validate_json(said.value)
    assert said.topic == "message_stream.svc" and (told.type, told.cause_id) == ("command_expired", "w.security")
    assert told.payload["command"] == "security_command" and told.id.startswith("w.security.expired-1000")


def test_a_resend_with_a_later_deadline_is_acted_on_after_the_first_send_expired_and_then_is_a_repeat():
    # (the first send is not marked handled: the same id sent again by a time limit, with its new deadline, is acted on)
    service = Gated()
    service.handle(command(deadline=1.0), offset=0)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    service.handle(command(deadline=later.timestamp()), offset=1)
    service.handle(command(deadline=later.timestamp()), offset=2)
    assert service.acted == ["w.security"]


def test_a_command_without_a_deadline_may_be_acted_on_at_any_time_and_a_service_not_on_message_stream_only_says_so():
    assert Gated().handle(command(deadline=None)).counted == ("handled", "security_command")
    quiet = Gated(reports=False)
    assert quiet.handle(command(deadline=1.0)).outputs == [] and quiet.acted == []


def test_a_command_of_a_cancelled_workflow_is_not_acted_on(caplog):
    order = command(deadline=None)
    service = Gated(revoked={order.workflow_id: "by ann: sensor replaced"})
    handled = service.handle(order)
    assert service.acted == [] and handled.outputs == [] and handled.counted == ("revoked", "security_command")
    assert "not acted on: its workflow was cancelled (by ann: sensor replaced)" in caplog.text
    assert service.store.view(0).get(SEEN + order.id) is None


def test_an_effect_is_applied_once_per_command_and_a_retry_counts_the_command_it_repeats(tmp_path):
    effects, applied = Effects(str(tmp_path / "effects.db")), []
    first = command(deadline=None, id_="w.security")
    retry = command(deadline=None, id_="w.acted.retry-1").model_copy(update={"retry_of": "w.security"})
    other = command(deadline=None, id_="v.security")
    said = [effects.once(c, lambda db: applied.append(1) or "locked") for c in (first, first, retry, other)]
    assert said == [("locked", True), ("locked", False), ("locked", False), ("locked", True)] and len(applied) == 2


def test_no_effect_is_applied_once_the_commands_deadline_has_passed(tmp_path):
    effects = Effects(str(tmp_path / "effects.db"))
    with pytest.raises(Expired, match="after its deadline"):
        effects.once(command(deadline=1.0), lambda db: pytest.fail("applied after its deadline"))
    assert effects.once(command(deadline=None), lambda db: "done") == ("done", True)  # (and it was not recorded)


def test_the_orchestrator_stamps_every_command_with_a_deadline_and_a_resend_with_the_next_attempts():
    store = Store("orchestrator", Settings(), durable=False)
    store.restore({0})
    engine = Orchestration(WORKFLOWS, route, 1, Limits(step_timeout=2.0, attempts=2))
    event = detection()
    state = store.view(0, b"s")
    [(_, sent), (_, note)] = engine.decide(event, state, T0)
    store.commit(state.changes)
    # (a notification has no time limit: it may be carried out as long as the state is kept, the limits' expires)
    assert sent.deadline.timestamp() == T0 + 2 and note.deadline.timestamp() == T0 + 7 * 24 * 3600
    [(partition, key)] = store.due(T0 + 2)
    state = store.view(partition)
    [_, (_, again, _)] = engine.timer(state, key, T0 + 2)
    store.commit(state.changes)
    assert (again.id, again.deadline.timestamp()) == (sent.id, T0 + 4)
    # And a service's word that it read the first send after its deadline is kept beside the step, changing nothing
    expired = caused_by(sent, "expired-1", "command_expired", {"command": sent.type, "deadline": sent.deadline,
                                                               "service": "security_service"}, "security_service")
    state = store.view(0, b"s")
    assert engine.decide(expired, state, T0 + 3) is None  # (nothing routed; its state is kept all the same)
    store.commit(state.changes)
    step = store.view(0).get(WORKFLOW + event.workflow_id)["steps"]["acted"]
    assert (step["state"], step["attempts"], step["late"]) == ("pending", 2, [["command_expired", T0 + 3]])


def revocation(workflow_id: str, source: str = "orchestrator", type_: str = "workflow_revoked", key: str | None = None):
    said = Envelope(id=f"{workflow_id}.revoked", type=type_, workflow_id=workflow_id, source=source,
                    created_at=datetime.now(timezone.utc), payload={"by": "ann", "reason": "drill"})
    return type("Record", (), {"topic": "revoked", "partition": 0, "offset": 0, "value": said.to_bytes(),
                               "key": (key or workflow_id).encode()})()


def test_only_the_orchestrators_revocation_of_its_own_workflow_counts():
    gate = Gate("svc", Settings(), True)
    gate.revocations.keep([revocation("w1"), revocation("w2", source="mallory"), revocation("w3", type_="x_y"),
                           revocation("w4", key="w5")])
    assert gate.revocations.revoked == {"w1": "by ann: drill"}


def test_a_revocation_is_checked_as_every_message_is_and_one_that_fails_is_passed_over():
    gate = Gate("svc", Settings(), True)
    unsigned, huge = revocation("w6"), revocation("w7")
    unsigned.value = unsigned.value.replace(b'"by":"ann",', b"")   # (its payload lacks who cancelled)
    huge.value = huge.value.replace(b'"drill"', b'"' + b"x" * 70_000 + b'"')  # (past the size every reader takes)
    junk = revocation("w9")
    junk.value = b"junk"
    gate.revocations.keep([unsigned, huge, revocation("w8"), junk])
    assert gate.revocations.revoked == {"w8": "by ann: drill"}


def test_the_revocations_are_read_again_before_a_command_once_the_last_read_is_stale(monkeypatch):
    # (a slow handler's batch outlasts a cancel: the next command of it must see the cancel)
    gate, reads = Gate("svc", Settings(), True), []
    monkeypatch.setattr(gate.revocations, "read", lambda: reads.append(1))
    gate.read()
    gate.check(command(deadline=None))
    gate.read_at -= 1.0  # (a second has passed: another command of the same batch)
    gate.check(command(deadline=None))
    assert len(reads) == 2


def test_a_command_past_its_deadline_whose_effect_was_applied_is_handled_to_say_what_was_done():
    # (a copy acted, then died before it could report: its successor must not say "not acted on")
    gate(applied=lambda command: True).check(command(deadline=1.0))
    with pytest.raises(Expired):
        gate(applied=lambda command: False).check(command(deadline=1.0))


@pytest.mark.parametrize("deadline, why", [("0001-01-01T00:00:00+14:00", "a deadline from 1970"),
                                           ("2026-12-08T10:00:00", "timezone"), ("tomorrow", "datetime")])
def test_a_deadline_a_clock_cannot_be_compared_with_is_a_dead_letter(deadline, why):
    from common import DeadLetter, parse
    raw = command(deadline=None).model_dump(mode="json") | {"deadline": deadline}
    with pytest.raises(DeadLetter, match=why):
        parse(json.dumps(raw).encode())


@pytest.mark.parametrize("deadline", ["0001-01-01T00:00:00+14:00", "2026-12-08T10:00:00"])
def test_a_services_word_that_a_command_expired_at_a_time_no_clock_can_compare_is_a_dead_letter(deadline):
    from common import DeadLetter, parse
    said = caused_by(command(deadline=None), "expired-x", "command_expired", {
        "command": "security_command", "deadline": datetime.now(timezone.utc), "service": "security_service"}, "svc")
    raw = said.model_dump(mode="json")
    raw["payload"]["deadline"] = deadline
    with pytest.raises(DeadLetter, match="deadline"):
        parse(json.dumps(raw).encode())


def test_a_services_word_that_a_command_expired_at_a_time_still_to_come_is_a_dead_letter():
    from common import DeadLetter
    store = Store("orchestrator", Settings(), durable=False)
    store.restore({0})
    engine, event = Orchestration(WORKFLOWS, route, 1, Limits()), detection()
    [(_, sent), _] = engine.decide(event, store.view(0, b"s"))
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    forged = caused_by(sent, "expired-x", "command_expired", {"command": sent.type, "deadline": future,
                                                             "service": "security_service"}, "security_service")
    with pytest.raises(DeadLetter, match="which is still to come"):
        engine.decide(forged, store.view(0, b"s"))
