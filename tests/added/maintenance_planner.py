"""Maintenance planner: says when an asset is due for maintenance.

Produces: message_stream.maintenance_planner (maintenance_due, keyed by asset)
Run:      python maintenance_planner.py --count 3
"""

import argparse

from common import new_event, run_producer, setup_logging
from contracts import MESSAGE_STREAM


def due(number: int):
    """The next asset due: (topic, message, key)."""
    asset = f"pump-{number % 3}"
    return MESSAGE_STREAM, new_event("maintenance_due", {"asset": asset}, "maintenance_planner"), asset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--count", type=int, default=3, help="assets due, then exit (default 3)")
    args = parser.parse_args()
    setup_logging()
    numbers = iter(range(args.count))
    run_producer("maintenance_planner", lambda: due(next(numbers)), args.count, rate=10.0)


if __name__ == "__main__":
    main()
