"""What each workflow is doing, read from the orchestrator's state: its steps, attempts, times, and the stage it
started under. Reads the state topics (state.orchestrator, and a split orchestrator's state.orchestrator-security...)
from the beginning; joins no group and commits nothing, so it never disturbs the orchestrator.

Run:  python workflows.py list                      # every workflow the orchestrator remembers, newest last
      python workflows.py list --state failed --json
      python workflows.py show WORKFLOW_ID [--json]  # one workflow, step by step (a unique beginning of the id will do)
      python workflows.py cancel WORKFLOW_ID --reason "sensor replaced"   # a running one ends, cancelled
      python workflows.py retry WORKFLOW_ID --reason "actuator fixed"     # a failed one tries its failed step again
cancel and retry send a request (an event, written to message_stream.operator) that the orchestrator routes like any
other, and print its answer. The id: the whole id, or a beginning of 8 or more characters that only it has. On a
secured cluster the request is sent as the user in KAFKA_OPERATOR_USERNAME/_PASSWORD (else as KAFKA_SASL_USERNAME).
"""

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from datetime import datetime
from typing import NamedTuple

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)
from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition
from pydantic import ValidationError

from common import (MESSAGE_STREAM, OPERATOR, SETTINGS, STATES, WORKFLOW, Settings, Stopper, about, derived_id,
                    is_workflow, latest_entries, make_producer, not_retriable, orchestrator_groups, refused,
                    setup_logging, wait_for_kafka, written_by)
from orchestrator import WORKFLOWS

log = logging.getLogger("workflows")


def workflows(settings=SETTINGS) -> dict[str, dict]:
    """Every workflow in the orchestrators' state (the single one's and each split one's), by id: the last entry
    written for it (a later one wins); those past the retention are gone."""
    return {id_: found.workflow for id_, found in located(settings).items()}


class Located(NamedTuple):
    partition: int        # of the state topic that holds it (and of the topics its events come on)
    workflow: dict        # the workflow, as its state entry holds it
    raw: bytes            # its entry as stored (the trace context of the record that wrote it last: trace_of)


def located(settings=SETTINGS, quiet: bool = False, entries: dict | None = None) -> dict[str, Located]:
    """Every workflow, by id, with where its state is (quiet: entries set aside are not said). `entries`: the state
    as latest_entries gives it, if read already (the console follows it)."""
    cutoff = time.time() - settings.state_retention_s
    entries = latest_entries(orchestrator_groups(WORKFLOWS), settings) if entries is None else entries
    found = {key.decode(errors="replace").removeprefix(WORKFLOW): Located(partition, value, raw)
             for (partition, key), (at, _, raw, value) in entries.items()
             if key.startswith(WORKFLOW.encode()) and at >= cutoff}
    unreadable = [id_ for id_, found_ in found.items() if not is_workflow(WORKFLOWS, found_.workflow)]
    if unreadable and not quiet:
        print(f"workflows: {len(unreadable)} entr{'y' if len(unreadable) == 1 else 'ies'} of the state set aside as "
              f"unreadable, e.g. {unreadable[0]}: what each held is lost (the orchestrator dead-letters it, or else the next "
              f"event of its workflow; see dead_letters.py list)",
              file=sys.stderr)
    return {id_: found[id_] for id_ in found if id_ not in unreadable}


def trace_of(raw: bytes) -> str | None:
    """The trace context a stored entry keeps (tracing on), or None."""
    trace = json.loads(raw).get("trace")
    return trace if isinstance(trace, str) else None


class NotFound(LookupError):
    """No workflow, or more than one, has the id asked for (the text says which)."""


class BadRequest(ValueError):
    """A request that cannot be sent as asked: an empty or overlong reason or name (the text says which)."""


def one(found: dict, wanted: str) -> str:
    """The id of the one workflow `wanted` names (its id, or a beginning of 8 or more characters only it has)."""
    matches = [w for w in found if w == wanted or (len(wanted) >= 8 and w.startswith(wanted))]
    if len(matches) != 1:
        raise NotFound(f"{len(matches) or 'no'} workflows have an id {wanted!r}"
                         f"{' or starting so' if len(wanted) >= 8 else ' (give the whole id, or 8 characters or more)'}"
                         f"{': ' + ', '.join(sorted(matches)[:5]) if matches else ''}")
    return matches[0]


def request(kind: str, wanted: str, reason: str, by: str, wait_s: float = 5.0, settings: Settings = SETTINGS,
            found: dict[str, Located] | None = None) -> tuple[bool, str]:
    """Ask the orchestrator to cancel or retry one workflow: the request goes to message_stream.operator, in the
    partition of the workflow's state (so to the orchestrator that holds it); (granted, its answer said in a line)
    once it answers, or (False, why not) after `wait_s` seconds (the request waits in Kafka all the same). `found`:
    the workflows, if read already."""
    located_ = located(settings) if found is None else found
    workflow_id = one(located_, wanted)
    state_partition, workflow, raw = located_[workflow_id]
    trace = trace_of(raw)
    try:
        event = about(workflow_id, f"workflow_{kind}_requested", {"reason": reason, "by": by, "workflow": workflow["type"]},
                      OPERATOR)
    except ValidationError as error:  # (an empty or overlong reason, say)
        wrong = error.errors()[0]
        raise BadRequest(f"{wrong['loc'][0]}: {wrong['msg']}; nothing was sent") from None
    answers = KafkaConsumer(**settings.kafka_config(), enable_auto_commit=False, isolation_level="read_committed")
    producer = make_producer(settings=operator_settings(settings))
    try:
        inbox = settings.topic(written_by(MESSAGE_STREAM, "orchestrator"))
        partitions = [TopicPartition(inbox, p) for p in answers.partitions_for_topic(inbox) or ()]
        answers.assign(partitions)
        answers.seek_to_end(*partitions)
        for partition in partitions:
            answers.position(partition)  # (from here: its answer comes after the request)
        topic = settings.topic(written_by(MESSAGE_STREAM, OPERATOR))
        key = (workflow.get("key") or "").encode(errors="surrogateescape") or None
        headers = [("traceparent", trace.encode())] if trace else None  # (tracing on: the request joins its trace)
        producer.send(topic, event.to_bytes(), key=key, partition=state_partition, headers=headers).get(timeout=30)
        return awaited(answers, derived_id(event.id, "answer"), workflow_id, wait_s)
    except KafkaError as error:
        raise refused(f"asking the orchestrator to {kind} {workflow_id}", error, settings) from None
    finally:
        producer.close(timeout=5)
        answers.close(autocommit=False)


def awaited(answers: KafkaConsumer, answer_id: str, workflow_id: str, wait_s: float) -> tuple[bool, str]:
    """The orchestrator's answer to a request, said in a line: (granted, the line)."""
    until = time.monotonic() + wait_s
    while time.monotonic() < until:
        for records in answers.poll(timeout_ms=200).values():
            for record in records:
                answer = json.loads(record.value)
                if answer.get("id") == answer_id:
                    said = answer["payload"]
                    granted = answer["type"] != "operator_request_refused"
                    return granted, (f"workflow {workflow_id}: {'done' if granted else 'refused'}: {said['detail']} "
                                     f"(asked by {said['by']}: {said['reason']})")
    return False, (f"workflow {workflow_id}: the request was sent, but the orchestrator did not answer within "
                   f"{wait_s:.0f} s (is it running?); it waits in Kafka and is answered when the orchestrator reads it")


def login_name() -> str:
    """Who runs this, as the system knows them (someone, where it does not: a container's user without a name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "someone"


def operator_settings(settings: Settings = SETTINGS) -> Settings:
    """Settings to send a person's request with: as the operator user where KAFKA_OPERATOR_USERNAME says so."""
    user = os.environ.get("KAFKA_OPERATOR_USERNAME")
    if not user:
        return settings
    return replace(settings, sign_in={**settings.sign_in, "sasl_plain_username": user,
                                       "sasl_plain_password": os.environ.get("KAFKA_OPERATOR_PASSWORD", "")})


def summary(workflow: dict) -> dict:
    """One workflow as show --json prints it: its steps in the order they were sent, each with what it follows and
    the answers that came too late to change it (an outcome after its time limit; a service's word that it did not
    act on a command read after its deadline); and why it cannot be retried now, if it cannot."""
    defined = {step.name: step for step in WORKFLOWS[workflow["type"]].steps}
    return {"workflow_id": workflow["workflow_id"], "type": workflow["type"], "state": workflow["state"],
            "retries": workflow.get("retries", 0), "stage": workflow["stage"], "started_at": stamp(workflow["started_at"]),
            "finished_at": stamp(workflow["finished_at"]), "retry_refused": not_retriable(workflow, defined),
            "steps": [{"name": name, "state": step["state"], "attempts": step["attempts"],
                       "sent_at": stamp(step["sent_at"]), "finished_at": stamp(step["finished_at"]),
                       "deadline": stamp(step["deadline"]), "follows": step.get("after") or follows(defined.get(name)),
                       "late": [{"type": type_, "at": stamp(at), "meaning": meaning(type_, defined.get(name))}
                                for type_, at in step.get("late", ())]}
                      for name, step in workflow["steps"].items()]}


def meaning(type_: str, step) -> str:
    """What an answer that came late says of its step's action."""
    if type_ == "command_expired":
        return "not acted on: its service read it after its deadline"
    return "done after all" if step is not None and type_ in step.done else "answered late"


def follows(step) -> str:
    """What a step follows, said: "" for one sent as its workflow starts (or one the table no longer has)."""
    if step is None or not step.after:
        return ""
    return f"{' or '.join(step.after)} {step.when}"


def stamp(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="milliseconds")


def clock(iso: str | None) -> str:
    return "-" if iso is None else iso[11:23]


def show(found: dict[str, dict], wanted: str, as_json: bool) -> int:
    matches = [w for w in found if w.startswith(wanted)]
    if len(matches) != 1:
        print(f"workflows: {'no' if not matches else len(matches)} workflow{'s' * (len(matches) != 1)} "
              f"{'has' if len(matches) == 1 else 'have'} an id starting {wanted!r}"
              f"{'' if matches else ' (the orchestrator keeps state only for workflows it routed)'}", file=sys.stderr)
        return 1
    workflow = summary(found[matches[0]])
    if as_json:
        print(json.dumps(workflow))
        return 0
    retries = workflow["retries"]
    print(f"workflow {workflow['workflow_id']}: {workflow['type']}, {workflow['state']}, started "
          f"{clock(workflow['started_at'])} under example {workflow['stage']}"
          f"{'' if workflow['finished_at'] is None else ', finished ' + clock(workflow['finished_at'])}"
          f"{f', retried {retries} time' + 's' * (retries > 1) if retries else ''}")
    width = max((len(step["name"]) for step in workflow["steps"]), default=0) + 1
    for step in workflow["steps"]:  # (in the order they were sent)
        ended = {"done": "answered", "failed": "answered", "sent": None}.get(step["state"], "ended")
        print(f"  {step['name']:<{width}} {step['state']:<10} attempts {step['attempts']}  sent {clock(step['sent_at'])}"
              + (f"  {ended} {clock(step['finished_at'])}" if ended else "") + f"  deadline {clock(step['deadline'])}"
              + (f"  (after {step['follows']})" if step["follows"] else ""))
        for late in step["late"]:  # (answers that changed nothing, when they came: before a retry, say)
            print(f"  {'':<{width}} · {clock(late['at'])} {late['type']}: {late['meaning']}")
    if workflow["state"] == "failed" and workflow["retry_refused"]:
        print(f"  not to be retried: {workflow['retry_refused']}")
    if not workflow["steps"]:
        print("  (no step: nothing was sent)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", allow_abbrev=False, help="every workflow the orchestrator remembers")
    listing.add_argument("--state", choices=STATES, help="only workflows in this state")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    showing = commands.add_parser("show", allow_abbrev=False, help="one workflow, step by step")
    showing.add_argument("workflow_id")
    showing.add_argument("--json", action="store_true", help="one JSON object")
    for kind, what in (("cancel", "end a running workflow, cancelled"),
                       ("retry", "try a failed workflow's failed step again")):
        acting = commands.add_parser(kind, allow_abbrev=False, help=what)
        acting.add_argument("workflow_id")
        acting.add_argument("--reason", required=True, help="why (kept in the workflow's history)")
        acting.add_argument("--by", help="who asks (default: your login name)")
        acting.add_argument("--wait", type=float, default=5.0, metavar="S", help="seconds to wait for the answer")
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # (`workflows.py list | head` ends quietly, as other commands do)
    setup_logging()
    wait_for_kafka(Stopper(), "workflows", wait=False).close()
    try:
        if args.command in ("cancel", "retry"):
            granted, said = request(args.command, args.workflow_id, args.reason, args.by or login_name(), args.wait)
            print(said)
            return 0 if granted else 1
        found = workflows()
        if args.command == "show":
            return show(found, args.workflow_id, args.json)
    except BadRequest as error:  # (said as the flags say it)
        raise SystemExit(f"workflows: --{error}") from None
    except NotFound as error:
        raise SystemExit(f"workflows: {error}") from None
    chosen = sorted((w for w in found.values() if args.state in (None, w["state"])), key=lambda w: w["started_at"])
    for workflow in chosen:
        if args.json:
            print(json.dumps(summary(workflow)))
            continue
        steps = ", ".join(f"{name} {step['state']}" + (f" ({step['attempts']} attempts)" if step["attempts"] > 1 else "")
                          for name, step in workflow["steps"].items())
        print(f"{workflow['workflow_id']}  {workflow['type']:<8} {workflow['state']:<9} started "
              f"{clock(stamp(workflow['started_at']))} (example {workflow['stage']})  {steps or '-'}")
    if not args.json:
        print(f"{len(chosen)} workflow{'s' * (len(chosen) != 1)}" + (f" {args.state}" if args.state else "") +
              f" (of {len(found)} in the orchestrator's state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
