"""Notification service: delivers notifications and publishes each delivery to the outbound feed for external systems.

Consumes: notification_command  Produces: third_party (notification_delivered, same workflow_id)
Run:      python notification_service.py
"""

import argparse
import logging

from common import Envelope, Output, caused_by, expect, run_service, setup_logging, metrics
from contracts import NOTIFICATION_COMMAND, THIRD_PARTY

log = logging.getLogger("notification_service")


def notify(command: Envelope) -> list[Output]:
    """'Send' the notification (a log line here) and tell the outside world it went out."""
    expect(command, "notification_command")
    note = command.payload
    delivered = caused_by(command, "delivered", "notification_delivered", note, "notification_service")  # (before acting)
    log.info("NOTIFY %s %s: %s (workflow %s)", note["channel"], note["recipient"], note["text"], command.workflow_id[:8])
    return [(THIRD_PARTY, delivered)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    metrics.flag(parser)
    args = parser.parse_args()
    setup_logging()
    run_service("notification_service", [NOTIFICATION_COMMAND], notify, writes=(THIRD_PARTY,), exactly_once=True,
                metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()
