"""python -m local_kafka start|stop|status|env: run real Kafka without Docker.

  start [--secure] [--nodes 3]  one node (default) or a three-node cluster on ports --port, +1, +2; --secure adds
                                SCRAM users and ACLs (each script signs in as itself and may do only its own job)
  stop / status                 the cluster in --dir (default: every cluster started from the default dirs)
  env USER                      the export lines that make a script in this shell connect as USER, e.g.
                                eval "$(python -m local_kafka env orchestrator)"
"""

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import local_kafka


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m local_kafka", allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("user", nargs="?", help="with env: the user to connect as (one per script, or admin)")
    parser.add_argument("--port", type=int, default=9092, help="first broker port on 127.0.0.1 (default 9092)")
    parser.add_argument("--nodes", type=int, default=1, help="1 (default) or 3: a cluster that survives losing a node")
    parser.add_argument("--secure", action="store_true", help="SASL/SCRAM sign-in and ACLs")
    parser.add_argument("--dir", type=Path, help="data, log and pid directory (default .local_kafka[-secure][-3nodes])")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the brokers to be ready")
    args = parser.parse_args()
    try:
        if args.command == "start":
            return start(args)
        dirs = [args.dir] if args.dir else local_kafka.running_default_dirs()
        if args.command == "stop":
            stopped = [c for c in map(local_kafka.stop, dirs) if c]
            for cluster in stopped:
                print(f"Kafka at {cluster.address} stopped")
            if not stopped:
                print(f"no Kafka running from {args.dir.resolve() if args.dir else 'the default dirs'}")
        elif args.command == "status":
            return status(dirs)
        else:
            return env(args, dirs)
    except local_kafka.LocalKafkaError as error:
        print(f"local_kafka: {error}", file=sys.stderr)
        return 2
    return 0


def status(dirs: list[Path]) -> int:
    """Each running cluster, and whether its group coordinator answers: 0 healthy, 1 not running, 3 unhealthy."""
    clusters = [(d, c) for d, c in ((d, local_kafka.status(d)) for d in dirs) if c]
    healthy = True
    for data_dir, cluster in clusters:
        password = local_kafka.credentials(data_dir).get("admin") if cluster.secure else None
        trouble = local_kafka.coordinator_trouble(cluster.address, password)
        healthy = healthy and trouble is None
        print(f"running at {cluster.address} (pid {', '.join(str(n.pid) for n in cluster.nodes)})"
              f"{' secure' if cluster.secure else ''}; " + (f"UNHEALTHY: {trouble}" if trouble else "group coordinator answers"))
    if not clusters:
        print("not running")
    return 1 if not clusters else 0 if healthy else 3


def start(args) -> int:
    began = time.monotonic()
    cluster, started = local_kafka.start(args.port, args.dir, args.timeout, nodes=args.nodes, secure=args.secure)
    data_dir = (args.dir or local_kafka.default_dir(args.nodes, args.secure)).resolve()
    kind = f"Kafka {local_kafka.KAFKA_VERSION}" + (f", {args.nodes} nodes," if args.nodes > 1 else "")
    if started:
        print(f"{kind} ready at {cluster.address} in {time.monotonic() - began:.1f} s "
              f"(pid {', '.join(str(n.pid) for n in cluster.nodes)}); log: {cluster.log}")
    else:
        print(f"Kafka already running at {cluster.address} (pid {', '.join(str(n.pid) for n in cluster.nodes)}); "
              f"log: {cluster.log}")
    if args.secure:
        import acls  # the project's access rules: needs kafka-python, so only imported here
        from common import Settings
        prefix = os.environ.get("TOPIC_PREFIX", "")
        acls.grant(Settings.from_env({**os.environ, **local_kafka.client_env(cluster.address, True, data_dir, "admin")}))
        print(f"users {', '.join(local_kafka.credentials(data_dir))} may each do only their own job on topics prefixed "
              f"{prefix!r} (acls.py); passwords in {data_dir / 'credentials.json'}")
        print('connect a script as its user:  eval "$(python -m local_kafka env orchestrator)"')
    return 0


def env(args, dirs: list[Path]) -> int:
    """Print the export lines for a user of the running cluster (or, for a Docker compose cluster that
    `acls.py --users` set up, of the credentials file in --dir, at KAFKA_BOOTSTRAP_SERVERS or localhost:9092)."""
    if not args.user:
        raise local_kafka.LocalKafkaError("env needs a user, e.g. python -m local_kafka env orchestrator")
    clusters = [(d, c) for d, c in ((d, local_kafka.status(d)) for d in dirs) if c]
    if clusters:
        data_dir, cluster = next(((d, c) for d, c in clusters if c.secure), clusters[0])
    elif args.dir and (args.dir / "credentials.json").exists():
        data_dir, cluster = args.dir, None
    else:
        raise local_kafka.LocalKafkaError("no Kafka running (start one with python -m local_kafka start --secure)")
    address = cluster.address if cluster else os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    for name, value in local_kafka.client_env(address, cluster.secure if cluster else True, data_dir.resolve(),
                                              args.user).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
