"""Security service: carries out security commands and reports the outcome. Knows nothing of other services.

Consumes: sec_command           Produces: message_stream.security_service (security_action_completed, same workflow_id)
Run:      python security_service.py
          python security_service.py --fail-zones zone-3   # actions there fail (to see the escalation route)
          python security_service.py --fail-actions dispatch_guard  # no guard can be sent (Example 4's compensation)
"""

import argparse
import logging
from collections import defaultdict

from common import Envelope, Output, caused_by, expect, run_service, setup_logging, metrics
from contracts import MESSAGE_STREAM, SEC_COMMAND

log = logging.getLogger("security_service")
zones: dict[str, dict] = defaultdict(lambda: {"state": "normal", "actions": 0})  # per-zone state, in memory


def carry_out(command: Envelope, fail_zones: frozenset = frozenset(), fail_actions: frozenset = frozenset()) -> list[Output]:
    """Apply the command to its zone and report back to the orchestrator."""
    expect(command, "security_command")
    action, where = command.payload["action"], command.payload["zone"]
    if where in fail_zones or action in fail_actions:  # a simulated fault: the orchestrator escalates it
        log.warning("%s in %s FAILED: actuator not responding (a simulated fault: %s) (workflow %s)", action, where,
                    f"--fail-zones {where}" if where in fail_zones else f"--fail-actions {action}", command.workflow_id[:8])
        return [(MESSAGE_STREAM, caused_by(command, "done", "security_action_failed", {
            "action": action, "zone": where, "detail": "actuator not responding"}, "security_service"))]
    zone = zones[where]
    state = {"inspect": zone["state"], "lock_zone": "locked", "dispatch_guard": "guard_dispatched",
             "unlock_zone": "normal"}[action]
    outcome = caused_by(command, "done", "security_action_completed", {  # (built before acting: it can reject)
        "action": action, "zone": command.payload["zone"], "detail": f"zone {state}"}, "security_service")
    zone["actions"], zone["state"] = zone["actions"] + 1, state
    log.info("%s in %s -> zone now %s (workflow %s)", action, command.payload["zone"], state, command.workflow_id[:8])
    return [(MESSAGE_STREAM, outcome)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--fail-zones", default="", help="comma-separated zones whose actions fail (a simulated fault)")
    parser.add_argument("--fail-actions", default="", help="comma-separated actions that fail (a simulated fault)")
    metrics.flag(parser)
    args = parser.parse_args()
    setup_logging()
    fail_zones, fail_actions = (frozenset(filter(None, flag.split(","))) for flag in (args.fail_zones, args.fail_actions))
    run_service("security_service", [SEC_COMMAND], lambda command: carry_out(command, fail_zones, fail_actions),
                writes=(MESSAGE_STREAM,), exactly_once=True, metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()
