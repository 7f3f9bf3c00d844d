"""Security service: carries out security commands and reports the outcome. Knows nothing of other services.

Consumes: sec_command           Produces: message_stream (security_action_completed, same workflow_id)
Run:      python security_service.py
"""

import argparse
import logging
from collections import defaultdict

from common import MESSAGE_STREAM, SEC_COMMAND, Envelope, Output, caused_by, expect, run_service, setup_logging

log = logging.getLogger("security_service")
zones: dict[str, dict] = defaultdict(lambda: {"state": "normal", "actions": 0})  # per-zone state, in memory


def carry_out(command: Envelope) -> list[Output]:
    """Apply the command to its zone and report back to the orchestrator."""
    expect(command, "security_command")
    action, zone = command.payload["action"], zones[command.payload["zone"]]
    zone["actions"] += 1
    zone["state"] = {"inspect": zone["state"], "lock_zone": "locked", "dispatch_guard": "guard_dispatched"}[action]
    log.info("%s in %s -> zone now %s (workflow %s)", action, command.payload["zone"], zone["state"],
             command.workflow_id[:8])
    return [(MESSAGE_STREAM, caused_by(command, "done", "security_action_completed", {
        "action": action, "zone": command.payload["zone"], "detail": f"zone {zone['state']}"}, "security_service"))]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    setup_logging()
    run_service("security_service", [SEC_COMMAND], carry_out, dedupe=True)


if __name__ == "__main__":
    main()
