"""A person's requests, as the orchestrator answers them, without Kafka (common/operating.py; tests/test_operator.py
runs them against a broker): a cancel only of a running workflow, a retry only of a failed one, from its failed step,
under a new id that counts the command it repeats; every refusal says why, and changes nothing."""

import pytest
from helpers import detection

from common import OPERATOR, WORKFLOW, Limits, Orchestration, Settings, Store, about
from orchestrator import WORKFLOWS, route

pytestmark = pytest.mark.no_broker  # runs in `make check`
T0 = 1_000_000.0


class Orchestrator:
    """The orchestrator's decisions over its state, one partition, its clock given."""

    def __init__(self):
        self.store = Store("orchestrator", Settings(), durable=False)
        self.store.restore({0})
        self.engine = Orchestration(WORKFLOWS, route, 1, Limits(step_timeout=2.0, attempts=1))

    def decide(self, event, now: float) -> list:
        state = self.store.view(0, b"s")
        out = self.engine.decide(event, state, now) or []
        self.store.commit(state.changes)
        return out

    def time_out(self, now: float) -> list:
        out = []
        for partition, key in self.store.due(now):
            state = self.store.view(partition)
            out += self.engine.timer(state, key, now)
            self.store.commit(state.changes)
        return out

    def workflow(self, workflow_id: str) -> dict:
        return self.store.view(0).get(WORKFLOW + workflow_id)


def asked(workflow_id: str, kind: str, reason: str = "drill") -> object:
    return about(workflow_id, f"workflow_{kind}_requested", {"reason": reason, "by": "ann", "workflow": "security"},
                 OPERATOR)


def answered(out: list) -> tuple[str, str]:
    [said] = [message for _, message, *_ in out if message.type in ("workflow_cancelled", "workflow_retried",
                                                                       "operator_request_refused")]
    return said.type, said.payload["detail"]


@pytest.fixture
def failed():
    """An orchestrator with one security workflow whose security step ran out of its one attempt."""
    orchestrator, event = Orchestrator(), detection()
    orchestrator.decide(event, T0)
    orchestrator.time_out(T0 + 2)
    assert orchestrator.workflow(event.workflow_id)["state"] == "failed"
    return orchestrator, event.workflow_id


def test_a_running_workflow_is_cancelled_and_its_pending_steps_no_longer_awaited():
    orchestrator, event = Orchestrator(), detection()
    orchestrator.decide(event, T0)
    out = orchestrator.decide(asked(event.workflow_id, "cancel"), T0 + 1)
    assert answered(out) == ("workflow_cancelled", "cancelled; acted no longer awaited")
    assert [message.type for topic, message, *_ in out if topic == "revoked"] == ["workflow_revoked"]
    workflow = orchestrator.workflow(event.workflow_id)
    assert (workflow["state"], workflow["steps"]["acted"]["state"]) == ("cancelled", "cancelled")
    assert orchestrator.time_out(T0 + 10) == []  # (its timer stopped)


@pytest.mark.parametrize("kind, why", [("cancel", "the workflow is failed already: only a running one can be cancelled"),
                                       ("retry", None)])
def test_a_failed_workflow_may_be_retried_but_not_cancelled(failed, kind, why):
    orchestrator, workflow_id = failed
    out = orchestrator.decide(asked(workflow_id, kind), T0 + 3)
    if why:
        assert answered(out) == ("operator_request_refused", why)
        assert orchestrator.workflow(workflow_id)["state"] == "failed"
        return
    kind_, detail = answered(out)
    assert kind_ == "workflow_retried" and detail == f"acted sent again as {workflow_id}.acted.retry-1 (retry 1)"
    [command] = [message for topic, message, *_ in out if topic == "sec_command"]
    assert (command.id, command.retry_of) == (f"{workflow_id}.acted.retry-1", f"{workflow_id}.security")
    step = orchestrator.workflow(workflow_id)["steps"]["acted"]
    assert (step["state"], step["attempts"], step["earlier"]) == ("pending", 1, [f"{workflow_id}.security"])


def test_a_running_workflow_may_not_be_retried_and_an_unknown_one_is_refused():
    orchestrator, event = Orchestrator(), detection()
    orchestrator.decide(event, T0)
    assert answered(orchestrator.decide(asked(event.workflow_id, "retry"), T0 + 1)) == (
        "operator_request_refused", "the workflow is running: only a failed one can be retried")
    assert answered(orchestrator.decide(asked("nobody-knows", "cancel"), T0 + 1)) == (
        "operator_request_refused", "no such workflow here (never started, expired, or its state removed)")


def test_a_request_is_answered_once_and_a_second_retry_counts_on(failed):
    orchestrator, workflow_id = failed
    request = asked(workflow_id, "retry")
    orchestrator.decide(request, T0 + 3)
    assert orchestrator.decide(request, T0 + 3) in (None, [])  # (the same request again: a repeat, nothing said)
    orchestrator.time_out(T0 + 6)  # (the retry ran out of its attempt too)
    out = orchestrator.decide(asked(workflow_id, "retry"), T0 + 7)
    assert answered(out)[1] == f"acted sent again as {workflow_id}.acted.retry-2 (retry 2)"
    [command] = [message for topic, message, *_ in out if topic == "sec_command"]
    assert command.retry_of == f"{workflow_id}.security"  # (the first command: its effect counts for every retry)
