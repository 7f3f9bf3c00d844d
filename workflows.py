"""What each workflow is doing, read from the orchestrator's state: its steps, attempts, times, and the stage it
started under. Reads the state topics (state.orchestrator, and a split orchestrator's state.orchestrator-security...)
from the beginning; joins no group and commits nothing, so it never disturbs the orchestrator.

Run:  python workflows.py list                      # every workflow the orchestrator remembers, newest last
      python workflows.py list --state failed --json
      python workflows.py show WORKFLOW_ID [--json]  # one workflow, step by step (a unique beginning of the id will do)
"""

import argparse
import json
import logging
import signal
import sys
import time
from datetime import datetime

from common import (SETTINGS, STATES, WORKFLOW, Stopper, is_workflow, latest_entries, orchestrator_groups, setup_logging,
                    wait_for_kafka)
from orchestrator import WORKFLOWS

log = logging.getLogger("workflows")


def workflows(settings=SETTINGS) -> dict[str, dict]:
    """Every workflow in the orchestrators' state (the single one's and each split one's), by id: the last entry
    written for it (a later one wins); those past the retention are gone."""
    cutoff = time.time() - settings.state_retention_s
    found = {key.decode(errors="replace").removeprefix(WORKFLOW): value
             for (_, key), (at, _, _, value) in latest_entries(orchestrator_groups(WORKFLOWS), settings).items()
             if key.startswith(WORKFLOW.encode()) and at >= cutoff}
    if unreadable := [id_ for id_, value in found.items() if not is_workflow(WORKFLOWS, value)]:
        print(f"workflows: {len(unreadable)} entr{'y' if len(unreadable) == 1 else 'ies'} of the state set aside as "
              f"unreadable, e.g. {unreadable[0]}: what each held is lost (the orchestrator dead-letters it, or else the next "
              f"event of its workflow; see dead_letters.py list)",
              file=sys.stderr)
    return {id_: value for id_, value in found.items() if id_ not in unreadable}


def summary(workflow: dict) -> dict:
    """One workflow as show --json prints it."""
    return {"workflow_id": workflow["workflow_id"], "type": workflow["type"], "state": workflow["state"],
            "stage": workflow["stage"], "started_at": stamp(workflow["started_at"]),
            "finished_at": stamp(workflow["finished_at"]),
            "steps": [{"name": name, "state": step["state"], "attempts": step["attempts"],
                       "sent_at": stamp(step["sent_at"]), "finished_at": stamp(step["finished_at"]),
                       "deadline": stamp(step["deadline"])} for name, step in workflow["steps"].items()]}


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
    print(f"workflow {workflow['workflow_id']}: {workflow['type']}, {workflow['state']}, started "
          f"{clock(workflow['started_at'])} under example {workflow['stage']}"
          f"{'' if workflow['finished_at'] is None else ', finished ' + clock(workflow['finished_at'])}")
    for step in workflow["steps"]:
        print(f"  {step['name']:<10} {step['state']:<10} attempts {step['attempts']}  sent {clock(step['sent_at'])}  "
              f"finished {clock(step['finished_at'])}  deadline {clock(step['deadline'])}")
    if not workflow["steps"]:
        print("  (no step that reports back: done once its commands were sent)")
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
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # (`workflows.py list | head` ends quietly, as other commands do)
    setup_logging()
    wait_for_kafka(Stopper(), "workflows", wait=False).close()
    found = workflows()
    if args.command == "show":
        return show(found, args.workflow_id, args.json)
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
