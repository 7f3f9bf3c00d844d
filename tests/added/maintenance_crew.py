"""Maintenance crew: carries out maintenance tasks and reports each one done. Knows nothing of other services.

Consumes: maintenance_command   Produces: message_stream.maintenance_crew (maintenance_done, same workflow_id)
Run:      python maintenance_crew.py
"""

import logging

from common import Envelope, Output, caused_by, expect, run_service, setup_logging
from contracts import MAINTENANCE_COMMAND, MESSAGE_STREAM

log = logging.getLogger("maintenance_crew")


def carry_out(command: Envelope) -> list[Output]:
    """Do the task on the asset, and say it is done."""
    expect(command, "maintenance_command")
    done = caused_by(command, "done", "maintenance_done", dict(command.payload), "maintenance_crew")
    log.info("%s %s: done (workflow %s)", command.payload["task"], command.payload["asset"], command.workflow_id[:8])
    return [(MESSAGE_STREAM, done)]


def main() -> None:
    setup_logging()
    run_service("maintenance_crew", [MAINTENANCE_COMMAND], carry_out, writes=(MESSAGE_STREAM,), exactly_once=True)


if __name__ == "__main__":
    main()
