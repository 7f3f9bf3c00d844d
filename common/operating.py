"""A person's requests about one workflow, as the orchestrator answers them: cancel a running workflow, or retry a
failed one from its failed step. A request is an event like any other (workflow_cancel_requested,
workflow_retry_requested, written to message_stream.operator by workflows.py or the console): checked against the
workflow's state, routed by the table's route() when it is granted, and answered on message_stream.orchestrator
(workflow_cancelled, workflow_retried, or operator_request_refused with the reason), all in one transaction with the
workflow's new state: once each, whatever fails. A cancel is said to the services too (a workflow_revoked on the
revoked topic), so that none acts on a command of the workflow that it reads after the cancel. A retry is granted
only for a step whose command can no longer be acted on (it failed, or its deadline passed) and that was not done
after all (an outcome that came late). No Kafka."""

from datetime import datetime, timezone

from common.messages import Envelope, Output, caused_by, derived_id
from common.progress import done_late
from common.settings import MESSAGE_STREAM, REVOKED
from common.workflow import SOURCE, Step, pending

RETRIABLE = ("failed", "timed_out")  # a step in one of these states can be tried again


def answer(event: Envelope, workflow: dict | None, type_: str, detail: str, step: str = "") -> Output:
    """The orchestrator's answer to a request: its id is the request's and "answer" (so a request is answered once)."""
    return (MESSAGE_STREAM, caused_by(event, "answer", type_, {
        "workflow": owner(event, workflow), "request": event.type,
        "by": event.payload["by"], "reason": event.payload["reason"], "detail": detail, "step": step}, SOURCE))


def owner(event: Envelope, workflow: dict | None) -> str:
    """The workflow a request is about, by name: its state's, or else the request's word."""
    return (workflow or {}).get("type") or event.payload["workflow"]


def refusal(event: Envelope, workflow: dict | None, definitions: dict[str, Step]) -> str | None:
    """Why a request cannot be granted, or None (`definitions`: the workflow's steps by name)."""
    if workflow is None:
        return "no such workflow here (never started, expired, or its state removed)"
    if event.type == "workflow_cancel_requested" and workflow["state"] != "running":
        return f"the workflow is {workflow['state']} already: only a running one can be cancelled"
    if event.type == "workflow_retry_requested":
        return not_retriable(workflow, definitions)
    return None


def not_retriable(workflow: dict, definitions: dict[str, Step]) -> str | None:
    """Why a workflow cannot be retried now (a console greys its button with it), or None."""
    if workflow["state"] != "failed":
        return f"the workflow is {workflow['state']}: only a failed one can be retried"
    if not (name := retriable(workflow)):
        return "none of its steps failed or ran out of attempts"
    if at := done_late(workflow["steps"][name], definitions.get(name)):
        return (f"step {name} was done after all: its outcome came late, at "
                f"{datetime.fromtimestamp(at, timezone.utc):%H:%M:%S} UTC; nothing to retry")
    return None


def retriable(workflow: dict) -> str | None:
    """The first step of a workflow that failed or ran out of attempts."""
    return next((name for name, step in workflow["steps"].items() if step["state"] in RETRIABLE), None)


def revocation(event: Envelope) -> Output:
    """What the services are told of a cancel: keyed by the workflow, on the revoked topic (it keeps the last)."""
    return Output(REVOKED, caused_by(event, "revoked", "workflow_revoked", {
        "by": event.payload["by"], "reason": event.payload["reason"]}, SOURCE), event.workflow_id)


def cancel(workflow: dict, now: float) -> str:
    """A running workflow ended by a person: its pending steps wait for nothing more (their timers stop)."""
    pending = [name for name, step in workflow["steps"].items() if step["state"] == "pending"]
    for name in pending:
        workflow["steps"][name].update(state="cancelled", finished_at=now, deadline=None)
    workflow.update(state="cancelled", finished_at=now)
    return f"cancelled; {', '.join(pending) or 'no step'} no longer awaited"


def retry(event: Envelope, workflow: dict, name: str, limit: float | None, now: float) -> tuple[Envelope, str]:
    """A failed workflow running again from its failed step `name`: that step's command under a new id (derived from
    the workflow, the step and the retry count, so a service that acted on the old id acts on this one), its attempts
    started over. Returns the request as route() sees it (the step, its topic and the command added) and what was
    done."""
    retries = workflow.get("retries", 0) + 1
    step = workflow["steps"][name]
    first = step["command"].get("retry_of") or step["command"]["id"]  # (its effect, if applied, counts for the retry)
    command = Envelope.model_validate({**step["command"], "id": derived_id(workflow["workflow_id"], f"{name}.retry-{retries}"),
                                       "created_at": datetime.fromtimestamp(now, timezone.utc), "retry_of": first})
    earlier = [*step.get("earlier", ()), step["command"]["id"]]  # (an outcome of one of them is late)
    step.update(pending(now, limit, step["topic"], command.model_dump(mode="json")), earlier=earlier)
    workflow.update(state="running", finished_at=None, retries=retries)
    routed = event.model_copy(update={"payload": {**event.payload, "workflow": workflow["type"], "step": name,
                                                  "topic": step["topic"], "command": step["command"]}})
    return routed, f"{name} sent again as {command.id} (retry {retries})"
