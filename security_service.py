"""Security service: carries out security commands and reports the outcome. Knows nothing of other services.

Consumes: sec_command           Produces: message_stream.security_service (security_action_completed or _failed, same
                                          workflow_id); the zones, in a SQLite file (SECURITY_DB or --db)
Run:      python security_service.py
          python security_service.py --fail-zones zone-3   # actions there fail (to see the escalation route)
          python security_service.py --fail-actions dispatch_guard  # no guard can be sent (Example 4's compensation)
The zones are the world it acts on: each command's action is applied to them once, in the same SQLite transaction as
the record of its command (a command handled again, by this copy or another, changes nothing), and none after its
command's deadline.
"""

import argparse
import logging
import os
import sqlite3
import time

from common import Effects, Envelope, Output, caused_by, expect, metrics, run_service, setup_logging
from contracts import MESSAGE_STREAM, SEC_COMMAND

log = logging.getLogger("security_service")
ZONES = "CREATE TABLE IF NOT EXISTS zones (zone TEXT PRIMARY KEY, state TEXT, actions INTEGER);"
STATE_AFTER = {"lock_zone": "locked", "dispatch_guard": "guard_dispatched", "unlock_zone": "normal"}  # inspect: as is


def act(db: sqlite3.Connection, action: str, zone: str) -> str:
    """Apply an action to a zone (inside the caller's transaction): the zone's state after it."""
    row = db.execute("SELECT state FROM zones WHERE zone = ?", (zone,)).fetchone()
    state = STATE_AFTER.get(action, row[0] if row else "normal")
    db.execute("INSERT INTO zones VALUES (?, ?, 1) ON CONFLICT(zone) DO UPDATE SET state = excluded.state, "
               "actions = actions + 1", (zone, state))
    return state


def carry_out(command: Envelope, zones: Effects, fail_zones: frozenset = frozenset(),
              fail_actions: frozenset = frozenset(), confirm_after: float = 0.0) -> list[Output]:
    """Apply the command to its zone, once, and report back to the orchestrator."""
    expect(command, "security_command")
    action, where = command.payload["action"], command.payload["zone"]
    if where in fail_zones or action in fail_actions:  # a simulated fault: the orchestrator escalates it
        log.warning("%s in %s FAILED: actuator not responding (a simulated fault: %s) (workflow %s)", action, where,
                    f"--fail-zones {where}" if where in fail_zones else f"--fail-actions {action}", command.workflow_id[:8])
        return [(MESSAGE_STREAM, caused_by(command, "done", "security_action_failed", {
            "action": action, "zone": where, "detail": "actuator not responding"}, "security_service"))]
    state, now = zones.once(command, lambda db: act(db, action, where))
    if now:
        log.info("%s in %s -> zone now %s (workflow %s)", action, where, state, command.workflow_id[:8])
    else:
        log.info("%s in %s was done before under %s: not again (zone %s) (workflow %s)", action, where,
                 command.effect_key()[:8], state, command.workflow_id[:8])
    time.sleep(confirm_after)  # (a simulated slow actuator: the action is done, its confirmation comes late)
    return [(MESSAGE_STREAM, caused_by(command, "done", "security_action_completed", {
        "action": action, "zone": where, "detail": f"zone {state}"}, "security_service"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--db", default=os.environ.get("SECURITY_DB", "security.db"),
                        help="the SQLite file of the zones and the actions applied (default SECURITY_DB, or security.db)")
    parser.add_argument("--fail-zones", default="", help="comma-separated zones whose actions fail (a simulated fault)")
    parser.add_argument("--fail-actions", default="", help="comma-separated actions that fail (a simulated fault)")
    parser.add_argument("--confirm-after", type=float, default=0.0, metavar="SECONDS",
                        help="confirm each action this late (a simulated slow actuator; default 0)")
    metrics.flag(parser)
    args = parser.parse_args()
    setup_logging()
    zones = Effects(args.db, ZONES)
    fail_zones, fail_actions = (frozenset(filter(None, flag.split(","))) for flag in (args.fail_zones, args.fail_actions))
    run_service("security_service", [SEC_COMMAND],
                lambda command: carry_out(command, zones, fail_zones, fail_actions, args.confirm_after),
                writes=(MESSAGE_STREAM,), exactly_once=True, metrics_port=args.metrics_port, effects=zones)


if __name__ == "__main__":
    main()
