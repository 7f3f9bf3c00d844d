"""What each workflow is doing, read from the orchestrator's state: its steps, attempts, times, and the stage it
started under. Reads the state topics (state.orchestrator, and a split orchestrator's state.orchestrator-security...)
from the beginning; joins no group and commits nothing, so it never disturbs the orchestrator.

Run:  python workflows.py list                      # every workflow the orchestrator remembers, newest last
      python workflows.py list --state failed --json
      python workflows.py list --type unit --entity unit-7 --since 2026-12-08T09:00 --page 1   # find, 50 a page
      python workflows.py show WORKFLOW_ID [--json]  # one workflow, step by step (a unique beginning of the id will do)
      python workflows.py cancel WORKFLOW_ID --reason "sensor replaced"   # a running one ends, cancelled
      python workflows.py retry WORKFLOW_ID --reason "actuator fixed"     # a failed one tries its failed step again
      python workflows.py retry --state failed --type security --reason "actuator fixed"   # every one the filter finds
cancel and retry send a request (an event, written to message_stream.operator) that the orchestrator routes like any
other, and print its answer. The id: the whole id, or a beginning of 8 or more characters that only it has. Given a
filter instead (the list's), they say how many they will ask about, ask once (--yes: do not ask), send one request per
workflow and print each answer. On a secured cluster the requests are sent as the user in
KAFKA_OPERATOR_USERNAME/_PASSWORD (else as KAFKA_SASL_USERNAME).
"""

import argparse
import getpass
import json
import logging
import signal
import sys
import time

import common  # noqa: F401 -- (first: outside the virtual environment it says so in one line, not a traceback)

from common import SETTINGS, Stopper, setup_logging, wait_for_kafka
from orchestrator import WORKFLOWS
from views.requests import BadRequest, request, requests
from views.search import SHOWN, BadFilter, Filter, Index, paged
from views.workflows import NotFound, clock, located, stamp, stuck_among, stuck_of, summary

log = logging.getLogger("workflows")


def login_name() -> str:
    """Who runs this, as the system knows them (someone, where it does not: a container's user without a name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "someone"


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
    listing = commands.add_parser("list", allow_abbrev=False, help="the workflows the orchestrator remembers")
    filters(listing)
    listing.add_argument("--page", type=int, help="only this page of the matches, newest first (50 a page)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    showing = commands.add_parser("show", allow_abbrev=False, help="one workflow, step by step")
    showing.add_argument("workflow_id")
    showing.add_argument("--json", action="store_true", help="one JSON object")
    for kind, what in (("cancel", "end a running workflow (or every one a filter finds), cancelled"),
                       ("retry", "try a failed workflow's failed step again (or every one's a filter finds)")):
        acting = commands.add_parser(kind, allow_abbrev=False, help=what)
        acting.add_argument("workflow_id", nargs="?", help="the one workflow (else: give a filter)")
        filters(acting)
        acting.add_argument("--reason", required=True, help="why (kept in the workflow's history)")
        acting.add_argument("--by", help="who asks (default: your login name)")
        acting.add_argument("--wait", type=float, default=5.0, metavar="S", help="seconds to wait for the answers")
        acting.add_argument("--yes", action="store_true", help="with a filter: do not ask before sending")
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # (`workflows.py list | head` ends quietly, as other commands do)
    setup_logging()
    try:
        wanted = Filter.of({name: getattr(args, name, None) for name in Filter.__struct_fields__}, list(WORKFLOWS))
        if args.command in ("cancel", "retry") and (args.workflow_id is None) == (wanted == Filter()):
            raise SystemExit(f"workflows: {args.command} one workflow (its id) or every one a filter finds (--id, "
                             f"--type, --state, --entity, --since, --until): {'not both' if args.workflow_id else 'which?'}")
        if getattr(args, "page", None) is not None and args.page < 1:
            raise BadFilter("page: pages count from 1")
        wait_for_kafka(Stopper(), "workflows", wait=False).close()
        if args.command in ("cancel", "retry") and args.workflow_id is not None:
            granted, said = request(args.command, args.workflow_id, args.reason, args.by or login_name(), args.wait)
            print(said)
            return 0 if granted else 1
        found = located()
        if args.command == "show":
            return show({id_: f.workflow for id_, f in found.items()}, args.workflow_id, args.json)
        index = Index()
        index.update(found)
        ids = index.find(wanted, stuck_among(found, args.sla, time.time()))
        if args.command == "list":
            return listed(found, ids, args)
        return acted_on_many(args, found, ids)
    except (BadRequest, BadFilter) as error:  # (said as the flags say it)
        raise SystemExit(f"workflows: --{error}") from None
    except NotFound as error:
        raise SystemExit(f"workflows: {error}") from None


def filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", metavar="BEGINNING", help="only workflows whose id begins so")
    parser.add_argument("--type", help=f"only workflows of this type ({', '.join(WORKFLOWS)})")
    parser.add_argument("--state", choices=SHOWN, help="only workflows in this state (stuck: running past --sla)")
    parser.add_argument("--entity", help="only workflows whose key or commands name it (sensor-3, zone-1, unit-7)")
    parser.add_argument("--since", metavar="TIME", help="only workflows started then or later (ISO 8601, UTC if no zone)")
    parser.add_argument("--until", metavar="TIME", help="only workflows started before then")
    parser.add_argument("--sla", type=float, default=5.0, help="seconds a step may wait before its workflow is stuck")


def listed(found: dict, ids: list[str], args) -> int:
    """The list: every match, newest last; or one page of them, newest first."""
    shown, pages = paged(ids, args.page) if args.page is not None else (ids[::-1], None)
    now = time.time()
    for workflow_id in shown:
        workflow = found[workflow_id].workflow
        if args.json:
            print(json.dumps(summary(workflow, args.sla, now)))
            continue
        steps = ", ".join(f"{name} {step['state']}" + (f" ({step['attempts']} attempts)" if step["attempts"] > 1 else "")
                          for name, step in workflow["steps"].items())
        stuck = stuck_of(workflow, args.sla, now)
        print(f"{workflow['workflow_id']}  {workflow['type']:<8} {'stuck' if stuck else workflow['state']:<9} started "
              f"{clock(stamp(workflow['started_at']))} (example {workflow['stage']})  {steps or '-'}"
              f"{'  (' + stuck['why'] + ')' if stuck else ''}")
    if not args.json:
        print(f"{len(ids)} workflow{'s' * (len(ids) != 1)}" + (f" {args.state}" if args.state else "") +
              f" (of {len(found)} in the orchestrator's state)" +
              (f"; page {pages['page']} of {pages['pages']}" if pages else ""))
    return 0


def acted_on_many(args, found: dict, ids: list[str]) -> int:
    """A cancel or retry of every workflow a filter found: how many, asked once, one request each, each answer."""
    if not ids:
        print("workflows: no workflow matches; nothing was sent", file=sys.stderr)
        return 1
    print(f"{args.command} {len(ids)} workflow{'s' * (len(ids) != 1)}: {', '.join(w[:8] for w in ids[:5])}"
          f"{' ...' if len(ids) > 5 else ''}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise SystemExit("workflows: not asked (no terminal to ask in): add --yes to send them")
        if input("send? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing was sent")
            return 1
    answers = requests(args.command, ids, args.reason, args.by or login_name(), args.wait, SETTINGS, found)
    for _, _, said in answers:
        print(said)
    granted = sum(granted for _, granted, _ in answers)
    print(f"{len(answers)} asked: {granted} granted, {len(answers) - granted} not")
    return 0 if granted == len(answers) else 1


if __name__ == "__main__":
    sys.exit(main())
