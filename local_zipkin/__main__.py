"""python -m local_zipkin start|stop|status: the Zipkin trace UI and API without Docker (in-memory storage).

  start    Zipkin on --port (default 9411); running it again while it runs changes nothing
  stop     the one started from --dir
  status   whether it runs (exit 0) or not (exit 1)

Then run the scripts with OTEL_TRACES_EXPORTER=zipkin (see docs/observability.md).
"""

import argparse
import sys
import time
from pathlib import Path

import local_zipkin


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m local_zipkin", allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=9411, help="the UI and API port (default 9411)")
    parser.add_argument("--dir", type=Path, help="log and pid directory (default .local_zipkin)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for it to answer")
    args = parser.parse_args()
    try:
        if args.command == "start":
            began = time.monotonic()
            zipkin, started = local_zipkin.start(args.port, args.dir, args.timeout)
            print(f"Zipkin {local_zipkin.ZIPKIN_VERSION} {'ready' if started else 'already running'} at "
                  f"{zipkin.address}" + (f" in {time.monotonic() - began:.1f} s" if started else "") +
                  f" (pid {zipkin.pid}); log: {zipkin.log}")
            print(f"  trace the scripts: export OTEL_TRACES_EXPORTER=zipkin "
                  f"OTEL_EXPORTER_ZIPKIN_ENDPOINT={zipkin.spans_endpoint}")
        elif args.command == "stop":
            zipkin = local_zipkin.stop(args.dir)
            print(f"Zipkin at {zipkin.address} stopped" if zipkin else "no Zipkin running from "
                  f"{(args.dir or local_zipkin.DEFAULT_DIR).resolve()}")
        else:
            zipkin = local_zipkin.status(args.dir)
            print(f"running at {zipkin.address} (pid {zipkin.pid}); log: {zipkin.log}" if zipkin else "not running")
            return 0 if zipkin else 1
    except local_zipkin.LocalKafkaError as error:  # (its own, and Java missing or too old: the shared check's)
        print(f"local_zipkin: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
