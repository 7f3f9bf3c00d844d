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
import signal
import sys

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)

from common import STATES, Stopper, setup_logging, wait_for_kafka
from views.requests import BadRequest, request
from views.workflows import NotFound, stamp, summary, workflows

log = logging.getLogger("workflows")




















def login_name() -> str:
    """Who runs this, as the system knows them (someone, where it does not: a container's user without a name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "someone"












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
