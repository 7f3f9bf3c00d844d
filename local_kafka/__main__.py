"""python -m local_kafka start|stop|status [--port P] [--dir D]: run a real Kafka broker without Docker."""

import argparse
import sys
import time
from pathlib import Path

import local_kafka


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m local_kafka", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=9092, help="broker port on 127.0.0.1 (default 9092)")
    parser.add_argument("--dir", type=Path, default=local_kafka.DEFAULT_DIR, help="data, log and pid directory")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker to be ready")
    args = parser.parse_args()
    try:
        if args.command == "start":
            began = time.monotonic()
            broker, started = local_kafka.start(args.port, args.dir, args.timeout)
            if started:
                print(f"Kafka {local_kafka.KAFKA_VERSION} ready at {broker.address} in {time.monotonic() - began:.1f} s "
                      f"(pid {broker.pid}); log: {broker.log}")
            else:
                print(f"Kafka already running at {broker.address} (pid {broker.pid}); log: {broker.log}")
        elif args.command == "stop":
            broker = local_kafka.stop(args.dir)
            print(f"Kafka at {broker.address} stopped" if broker else f"no Kafka running from {args.dir.resolve()}")
        else:
            broker = local_kafka.status(args.dir)
            print(f"running at {broker.address} (pid {broker.pid})" if broker else "not running")
            return 0 if broker else 1
    except local_kafka.LocalKafkaError as error:
        print(f"local_kafka: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
