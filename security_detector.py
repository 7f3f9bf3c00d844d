"""Security detector: simulates sensors and produces security detections.

Produces: message_stream.security_detector (type security_detection, keyed by sensor id)
Run:      python security_detector.py                      # one detection a second, until Ctrl-C
          python security_detector.py --count 10 --rate 5  # ten detections, five a second, then exit
"""

import argparse
import logging
import random

from common import new_event, run_producer, setup_logging, metrics
from contracts import MESSAGE_STREAM

log = logging.getLogger("security_detector")
# The sensors of a site: what each one detects (motion sensors fire most), and how severe that kind is.
SENSORS = ["motion", "motion", "motion", "motion", "door_forced", "door_forced", "glass_break", "smoke"]
WEIGHTS = {"motion": 6, "door_forced": 2, "glass_break": 1, "smoke": 1}
SEVERITY = {"motion": (1, 3), "door_forced": (3, 5), "glass_break": (3, 4), "smoke": (4, 5)}


def detection(rng: random.Random, sensors: int = len(SENSORS)):
    """One simulated detection from one of the site's sensors: (topic, message, key)."""
    sensor = rng.choices(range(sensors), weights=[WEIGHTS[SENSORS[n % len(SENSORS)]] for n in range(sensors)])[0]
    kind = SENSORS[sensor % len(SENSORS)]
    event = new_event("security_detection", {
        "sensor_id": f"sensor-{sensor}", "zone": f"zone-{sensor % 4}", "kind": kind,
        "severity": rng.randint(*SEVERITY[kind])}, "security_detector")
    log.info("detected %s in %s (severity %s) workflow %s", event.payload["kind"], event.payload["zone"],
             event.payload["severity"], event.workflow_id[:8])
    return MESSAGE_STREAM, event, event.payload["sensor_id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--count", type=int, help="detections to produce, then exit (default: forever)")
    parser.add_argument("--rate", type=float, default=1.0, help="detections per second (default 1)")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable runs")
    metrics.flag(parser)
    args = parser.parse_args()
    if args.rate <= 0 or (args.count is not None and args.count < 0):
        parser.error("--rate must be above 0 and --count not negative")
    setup_logging()
    rng = random.Random(args.seed)
    run_producer("security_detector", lambda: detection(rng), args.count, args.rate, metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()
