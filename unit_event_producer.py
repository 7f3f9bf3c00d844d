"""Unit event producer: simulates field units. Produces their events and obeys the commands sent back to them.

Produces: message_stream.unit_event_producer (unit_event keyed by unit id; unit_command_applied, same workflow_id)
Consumes: unit_command
Run:      python unit_event_producer.py                         # one event a second from 5 units, until Ctrl-C
          python unit_event_producer.py --count 20 --rate 10    # 20 events, then keep obeying commands
Joins in Example 3.
"""

import argparse
import logging
import random

from common import Envelope, Output, Pacer, caused_by, expect, new_event, run_service, setup_logging, metrics
from contracts import MESSAGE_STREAM, UNIT_COMMAND

log = logging.getLogger("unit_event_producer")
STATE_AFTER = {"acknowledge": "ok", "power_save": "power_saving", "reboot": "rebooting", "lockdown": "locked_down"}
LOW, CHARGED = 20, 95  # battery_low below LOW %; a unit recharges from just under 15 % up to CHARGED %
units: dict[str, str] = {}  # unit id -> state after the last command applied


class Field:
    """Simulated units as they behave in the field: each battery drains a little with every report and, once low,
    recharges step by step; battery_low only below 20 %; a unit goes offline or is tampered with rarely."""

    def __init__(self, rng: random.Random, count: int):
        self.rng = rng
        self.battery = {f"unit-{n}": rng.uniform(40, 100) for n in range(count)}
        self.charging: set[str] = set()

    def event(self) -> tuple[str, Envelope, str]:
        """One unit's report: (topic, message, key)."""
        unit = self.rng.choice(sorted(self.battery))
        self.battery[unit] = self.drained(unit)
        battery, chance = round(self.battery[unit]), self.rng.random()
        status = ("battery_low" if battery < LOW else "offline" if chance < 0.02
                  else "tamper" if chance < 0.03 else "heartbeat")
        event = new_event("unit_event", {"unit_id": unit, "status": status, "battery": battery}, "unit_event_producer")
        log.info("%s reports %s (battery %s%%) workflow %s", unit, status, event.payload["battery"],
                 event.workflow_id[:8])
        return MESSAGE_STREAM, event, unit

    def drained(self, unit: str) -> float:
        level = self.battery[unit]
        if unit in self.charging:
            level = min(100.0, level + self.rng.uniform(4, 8))
            if level >= CHARGED:
                self.charging.discard(unit)
            return level
        level = max(0.0, level - self.rng.uniform(0.5, 3))
        if level < 15:
            self.charging.add(unit)
        return level


def apply(command: Envelope) -> list[Output]:
    """Apply a command to the simulated unit and report that it was applied."""
    expect(command, "unit_command")
    unit, what = command.payload["unit_id"], command.payload["command"]
    applied = caused_by(command, "applied", "unit_command_applied",  # (built before acting: it can reject the command)
                        {"unit_id": unit, "command": what, "state": STATE_AFTER[what]}, "unit_event_producer")
    units[unit] = STATE_AFTER[what]
    log.info("%s: %s applied -> %s (workflow %s)", unit, what, units[unit], command.workflow_id[:8])
    return [(MESSAGE_STREAM, applied)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--count", type=int, help="unit events to produce (default: forever); commands are obeyed after")
    parser.add_argument("--rate", type=float, default=1.0, help="unit events per second (default 1)")
    parser.add_argument("--units", type=int, default=5, help="number of simulated units (default 5)")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable runs")
    metrics.flag(parser)
    args = parser.parse_args()
    if args.rate <= 0 or args.units < 1 or (args.count is not None and args.count < 0):
        parser.error("--rate and --units must be above 0 and --count not negative")
    setup_logging()
    field, pacer = Field(random.Random(args.seed), args.units), Pacer(args.rate, args.count)
    run_service("unit_event_producer", [UNIT_COMMAND], apply, writes=(MESSAGE_STREAM,), exactly_once=True,
                tick=lambda: [field.event() for _ in range(pacer.due())], metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()
