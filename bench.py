"""Benchmark: what the orchestrator costs, side by side with the peers a user would pick instead for the same job
(Quix Streams and Kafka Streams, exactly once: peers/), a raw kafka-python pipe (at least once, and exactly once),
confluent-kafka doing the same Kafka work and the broker's own ceiling (Kafka's ProducerPerformance); latency end
to end and per hop at 100 and 1 000/s against a direct hop; how soon the partitions of a killed or stopped copy are
routed again; the restart gap; what a second instance adds on a 4-partition message_stream; reading the state of
100 000 workflows back; the orchestrator with tracing on, every span exported to a real Zipkin (local_zipkin).

Runs against KAFKA_BOOTSTRAP_SERVERS if it answers, else starts local_kafka on a free port (stopped at the end).
Every run uses topic prefixes of its own. Needs requirements-bench.txt (confluent-kafka, quixstreams; matplotlib for
--plot) and, for Kafka Streams, Java and Maven (its jars come from Maven Central once, as the broker's do).
Run:   python bench.py                      # default: a 100 000-detection backlog, 10 s latency runs
       python bench.py --quick              # a smaller run (20 000 messages, shorter latency runs)
       python bench.py --json bench.json    # also write the figures as JSON
       python bench.py --sweep --plot latency.png   # latency against rate, 100 -> 5 000 msg/s, drawn
       python bench.py --profile            # the orchestrator's own handling per detection, profiled (no Kafka)
       python bench.py --peers --quick      # only the comparison with Quix Streams, Kafka Streams, a raw EOS pipe
Internal roles (run by the benchmark itself): --role raw-pipe | raw-eos-pipe | confluent-router.
"""

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import NamedTuple
from pathlib import Path

import kafka
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError
from kafka.structs import OffsetAndMetadata, TopicPartition
from rich.console import Console

import acls
import common
import contracts
import local_kafka
import local_zipkin
from common import Limits, Orchestration, Record, Store, changelog, ensure_changelog, handle_record
from views.flow import percentile
from orchestrator import WORKFLOWS, route

HERE = Path(__file__).resolve().parent
console = Console(highlight=False)
SCALE_PARTITIONS = 4  # message_stream partitions when one orchestrator instance is compared with two
DETECTIONS = common.written_by(common.MESSAGE_STREAM, "security_detector")  # where the detector writes
# Where no service answers (draining a backlog, restarts), an hour's limit keeps the orchestrator's timeouts (and the
# commands they send again) out of the figures.
NO_ANSWER = ("--step-timeout", "3600")
ROUNDS = 3  # throughput drains per system, taken in turns; the median counts


def detection_bytes(rng_seed: int) -> tuple[str, bytes, bytes]:
    sensor = rng_seed % 8
    event = common.new_event("security_detection", {"sensor_id": f"sensor-{sensor}", "zone": f"zone-{sensor % 4}",
                                                    "kind": "motion", "severity": 1 + rng_seed % 5}, "bench")
    return event.id, event.to_bytes(), f"sensor-{sensor}".encode()


class Bench:
    def __init__(self, address: str):
        self.address = address
        self.admin = KafkaAdminClient(bootstrap_servers=address)
        self.partitions: dict[str, int] = {}  # prefix -> partitions of its topics
        self.reader: KafkaConsumer | None = None  # (asks where topics end)

    def prefix(self, name: str, partitions: int = common.SETTINGS.partitions) -> str:
        """A fresh topic prefix, its topics created with `partitions` partitions each."""
        prefix = f"bench{uuid.uuid4().hex[:6]}_{name}_"
        self.admin.create_topics([NewTopic(prefix + t, partitions, 1)
                                  for t in (*common.single_writer_topics(WORKFLOWS), *acls.members())])
        self.partitions[prefix] = partitions
        return prefix

    def env(self, prefix: str, **extra: str) -> dict:
        return dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=self.address, TOPIC_PREFIX=prefix, LOG_LEVEL="WARNING",
                    COMMIT_WINDOW_MS="0",  # (the default, whatever the shell says: a run asks for another itself)
                    TOPIC_PARTITIONS=str(self.partitions[prefix]),
                    REPORT_DB=os.path.join(tempfile.gettempdir(), f"{prefix}reports.db"),
                    SECURITY_DB=os.path.join(tempfile.gettempdir(), f"{prefix}security.db"), PYTHONUNBUFFERED="1") | extra

    def start(self, prefix: str, *args: str, log: Path | None = None, argv: list[str] | None = None,
              **extra: str) -> subprocess.Popen:
        """A script on this prefix's topics (or any command: `argv`); `log`: a file for what it prints (else nothing
        is kept); `extra`: environment variables of its own (e.g. INSTANCE_ID)."""
        with open(log or os.devnull, "w") as out:
            return subprocess.Popen(argv or [sys.executable, *args], cwd=HERE, env=self.env(prefix, **extra),
                                    stdout=out, stderr=subprocess.STDOUT)

    def backlog(self, prefix: str, n: int) -> list[int]:
        """n detections waiting in message_stream; returns how many landed in each partition."""
        producer = KafkaProducer(bootstrap_servers=self.address, linger_ms=20, batch_size=512 * 1024)
        futures = []
        for i in range(n):
            _, value, key = detection_bytes(i)
            futures.append(producer.send(prefix + DETECTIONS, value=value, key=key))
        producer.flush()
        producer.close()
        landed = Counter(future.get().partition for future in futures)
        return [landed[p] for p in range(self.partitions[prefix])]

    def written(self, topic: str) -> int:
        """Records written to a topic so far, committed or not (a router that commits seldom has begun once its
        first command is there)."""
        if self.reader is None:
            self.reader = KafkaConsumer(bootstrap_servers=self.address)
        partitions = [TopicPartition(topic, p) for p in self.reader.partitions_for_topic(topic) or ()]
        return sum(self.reader.end_offsets(partitions).values()) if partitions else 0

    def committed_records(self, topic: str) -> int:
        """How many records a read_committed reader finds on a topic now (transaction markers and aborted records
        not counted)."""
        reader = KafkaConsumer(bootstrap_servers=self.address, isolation_level="read_committed",
                               enable_auto_commit=False, max_partition_fetch_bytes=8 * 1024 * 1024)
        try:
            return len(common.read_from(reader, dict.fromkeys(TopicPartition(topic, p) for p in
                                                              reader.partitions_for_topic(topic) or ()), topic))
        finally:
            reader.close()

    def committed(self, group: str) -> int:
        """The group's committed offsets on message_stream, summed over partitions (0 while its coordinator is not
        ready: a fresh broker creates __consumer_offsets on first use)."""
        try:
            offsets = self.admin.list_group_offsets({group: None}).get(group) or {}
        except (CoordinatorLoadInProgressError, CoordinatorNotAvailableError):
            return 0
        return sum(meta.offset for tp, meta in offsets.items() if tp.topic.endswith(DETECTIONS))

    def drain(self, label: str, n: int, group: str, prefix: str, *args: str, envs: tuple[dict, ...] = ({},),
              argv: list[str] | None = None) -> "Drained":
        """Start a router on a backlog of n (a script and its `args`, or any command: `argv`), one process per entry
        of `envs` (its own environment variables), all at once in `group`; returns input messages per second once
        they run, the largest peak RSS of one (MB), and their CPU time per message (µs, start-up excluded)."""
        processes = [self.start(prefix, *args, argv=argv, **env) for env in envs]
        first, cpu_first = None, 0.0
        try:
            with console.status(f"{label}: routing {n} detections"):
                while True:
                    done = self.committed(group)
                    if first is None and (done or self.written(prefix + contracts.SEC_COMMAND)):  # (begun: from here)
                        first, cpu_first = (time.monotonic(), done), sum(map(cpu_seconds, processes))
                    if done >= n:
                        break
                    if any(process.poll() is not None for process in processes):
                        raise SystemExit(f"bench: {label} exited with code {[p.returncode for p in processes]}")
                    time.sleep(0.05)  # sampling progress for a measurement, not synchronising a test
            elapsed, cpu = time.monotonic() - first[0], sum(map(cpu_seconds, processes)) - cpu_first
            rate = (n - first[1]) / elapsed if elapsed > 0 else float("inf")
            hwm = max(peak_rss_mb(process.pid) for process in processes)
            cpu_us = cpu / max(1, n - first[1]) * 1e6
            console.print(f"{label}: {rate:,.0f} msg/s, {cpu_us:,.0f} µs CPU per message (peak RSS {hwm:.0f} MB)")
            return Drained(rate, hwm, cpu_us)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=60)

    def scale_out(self, n: int, partitions: int) -> tuple[dict[int, float], list[int]]:
        """The exactly-once orchestrator draining a backlog of n on `partitions` partitions: one instance, then (on a
        fresh prefix) two started together with INSTANCE_ID 1 and 2. Returns ({instances: msg/s}, detections per partition)."""
        rates, spread = {}, []
        for count in (1, 2):
            prefix = self.prefix(f"scale{count}", partitions)
            with console.status(f"{count} orchestrators on {partitions} partitions: producing a backlog of {n}"):
                spread = self.backlog(prefix, n)
            label = f"orchestrator exactly-once, {count} instance{'s' if count > 1 else ''}, {partitions} partitions"
            rates[count] = self.drain(label, n, prefix + "orchestrator", prefix, "orchestrator.py", "--example", "2",
                                      *NO_ANSWER,
                                      envs=tuple({"INSTANCE_ID": str(i)} for i in range(1, count + 1)))[0]
        return rates, spread

    def restore(self, workflows: int, stop: bool = True) -> dict:
        """An orchestrator starting on the state of `workflows` open workflows (each with its handled detection, as
        it writes them): how long it takes to read them back, and its resident memory then."""
        prefix = self.prefix("restore")
        settings = common.Settings(bootstrap_servers=self.address, topic_prefix=prefix)
        topic = settings.topic(changelog("orchestrator"))
        ensure_changelog(self.admin, "orchestrator", settings)
        producer = KafkaProducer(bootstrap_servers=self.address, linger_ms=20, batch_size=512 * 1024)
        memory = Store("orchestrator", settings, durable=False)
        orchestration = Orchestration(WORKFLOWS, route, 2, Limits(step_timeout=3600))
        with console.status(f"state restore: writing the state of {workflows} open workflows"):
            for i in range(workflows):  # (each entry as the orchestrator writes it, made by the same code)
                state = memory.view(0, f"sensor-{i % 8}".encode())
                orchestration.decide(common.parse(detection_bytes(i)[1]), state)
                for change in state.changes:
                    producer.send(topic, key=change.key.encode(), value=change.stored, partition=0)
            producer.flush()
            producer.close()
        log_path = Path(tempfile.gettempdir()) / f"{prefix}orchestrator.log"
        process = self.start(prefix, "orchestrator.py", "--example", "2", log=log_path, LOG_LEVEL="INFO")
        try:
            with console.status(f"state restore: an orchestrator reading back {workflows} workflows"):
                while "read back" not in log_path.read_text():
                    if process.poll() is not None:
                        raise SystemExit(f"bench: the orchestrator exited:\n{log_path.read_text()[-2000:]}")
                    time.sleep(0.1)  # sampling a log for a measurement, not synchronising a test
            line = next(line for line in log_path.read_text().splitlines() if "read back" in line)
            seconds = float(line.rsplit(" in ", 1)[1].split()[0])
            rss = rss_mb(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        console.print(f"state restore: {workflows} open workflows read back in {seconds:.2f} s "
                      f"({line.split('(')[1].split(' in ')[0]}); orchestrator RSS then {rss:.0f} MB")
        stop_s = self.stop_during_restore(prefix) if stop else None
        return {"seconds": seconds, "rss_mb": round(rss, 1), "stop_s": stop_s}

    def stop_during_restore(self, prefix: str) -> float:
        """Seconds from SIGTERM to exit for an orchestrator in the middle of reading its state back."""
        log_path = Path(tempfile.gettempdir()) / f"{prefix}orchestrator-stopped.log"
        process = self.start(prefix, "orchestrator.py", "--example", "2", log=log_path, LOG_LEVEL="INFO")
        while "reading the state" not in log_path.read_text() and process.poll() is None:
            time.sleep(0.01)  # sampling a log for a measurement, not synchronising a test
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        seconds = time.monotonic() - began
        finished = "read back (" in log_path.read_text()
        console.print(f"state restore: SIGTERM during the read-back: exited {seconds:.2f} s later "
                      f"({'after' if finished else 'before'} the read-back ended)")
        return round(seconds, 2)

    def latency(self, rate: float, seconds: float, system: bool) -> dict:
        """p50/p95/p99 ms at `rate`/s: detection -> notification delivered (system) or produce -> consume (direct).
        The system's figures add `hops`: where each detection's time went, read off when each hop's output became
        visible to a read_committed reader and when its writer sent it (the record's timestamp)."""
        prefix = self.prefix("e2e" if system else "hop")
        processes = [self.start(prefix, name) for name in ("orchestrator.py", "security_service.py",
                                                           "notification_service.py")] if system else []
        path = [DETECTIONS, contracts.NOTIFICATION_COMMAND, contracts.THIRD_PARTY] if system else [DETECTIONS]
        consumer = KafkaConsumer(*(prefix + name for name in path), bootstrap_servers=self.address,
                                 auto_offset_reset="latest", isolation_level="read_committed", fetch_max_wait_ms=5,
                                 reconnect_backoff_max_ms=1000)
        while len(consumer.assignment()) < len(path):
            consumer.poll(timeout_ms=100)
        sent: dict[str, float] = {}
        seen: dict[str, dict[str, tuple[float, float]]] = {prefix + name: {} for name in path}  # id -> (visible, sent)
        last, stop = seen[prefix + path[-1]], threading.Event()

        def receive():
            while not stop.is_set():
                for tp, records in consumer.poll(timeout_ms=20).items():
                    now = time.time()
                    for record in records:
                        key = json.loads(record.value)["workflow_id"] if system else record.key.decode()
                        seen[tp.topic].setdefault(key, (now, record.timestamp / 1000))

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        producer = KafkaProducer(bootstrap_servers=self.address, linger_ms=0, acks="all")
        if system:  # warm up: the services must be in their groups before timing starts
            warm_id, value, key = detection_bytes(0)
            producer.send(prefix + DETECTIONS, value=value, key=key)
            deadline = time.monotonic() + 60
            while warm_id not in last and time.monotonic() < deadline:
                time.sleep(0.05)
        pacer, count = common.Pacer(rate, int(rate * seconds)), 0
        while not pacer.finished:
            for _ in range(pacer.due()):
                event_id, value, key = detection_bytes(count + 1)
                sent[event_id] = time.time()
                producer.send(prefix + DETECTIONS, value=value, key=event_id.encode() if not system else key)
                count += 1
            time.sleep(pacer.pause())
        producer.flush()
        deadline = time.monotonic() + 30
        while any(i not in last for i in sent) and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for a measurement's last answers, not synchronising a test
        stop.set()
        receiver.join()
        consumer.close()
        producer.close()
        for process in processes:
            process.terminate()
            process.wait(timeout=60)
        done = [i for i in sent if i in last]
        figures = spread([(last[i][0] - sent[i]) * 1000 for i in done])
        figures["received"], figures["sent"] = len(done), count
        if system:
            figures["hops"] = hops(prefix, path, sent, seen, done)
        return figures

    def hop(self, label: str, key: str, command: list[str], rate: float, seconds: float, **env: str) -> dict:
        """One system (a peer_systems() command) routing `rate` detections/s for `seconds`, after a warm-up one:
        p50/p95/p99 ms from a detection produced to its security command visible to a read_committed reader, and the
        share of a core the system used meanwhile (`cpu_share`)."""
        prefix, scratch = self.prefix(key.replace("_", "")[:12] + "hop"), tempfile.mkdtemp(prefix="bench-peer-")
        process = self.start(prefix, argv=filled(command, prefix, prefix + GROUPS[key], scratch), **env)
        consumer = KafkaConsumer(prefix + contracts.SEC_COMMAND, bootstrap_servers=self.address, fetch_max_wait_ms=5,
                                 auto_offset_reset="earliest", isolation_level="read_committed")
        seen, stop, sent = {}, threading.Event(), {}

        def receive():
            while not stop.is_set():
                for records in consumer.poll(timeout_ms=20).values():
                    now = time.time()
                    for record in records:
                        seen.setdefault(json.loads(record.value)["workflow_id"], now)

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        producer = KafkaProducer(bootstrap_servers=self.address, linger_ms=0, acks="all")
        try:
            warm_id, value, key_ = detection_bytes(0)
            producer.send(prefix + DETECTIONS, value=value, key=key_)
            deadline = time.monotonic() + 120  # (a JVM, a Quix app: start-up is not timed)
            while warm_id not in seen and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.05)
            if warm_id not in seen:
                raise SystemExit(f"bench: {label} routed nothing within 120 s (exit code {process.poll()}): "
                                 f"run {' '.join(command)} by hand to see why")
            cpu_before, began = cpu_seconds(process), time.monotonic()
            pacer, count = common.Pacer(rate, int(rate * seconds)), 0
            while not pacer.finished:
                for _ in range(pacer.due()):
                    event_id, value, key_ = detection_bytes(count + 1)
                    sent[event_id] = time.time()
                    producer.send(prefix + DETECTIONS, value=value, key=key_)
                    count += 1
                time.sleep(pacer.pause())
            share = (cpu_seconds(process) - cpu_before) / (time.monotonic() - began)
            producer.flush()
            deadline = time.monotonic() + 30
            while any(i not in seen for i in sent) and time.monotonic() < deadline:
                time.sleep(0.05)  # waiting for a measurement's last answers, not synchronising a test
        finally:
            stop.set()
            receiver.join()
            consumer.close()
            producer.close()
            process.terminate()
            process.wait(timeout=60)
            shutil.rmtree(scratch, ignore_errors=True)
        done = [i for i in sent if i in seen]
        if len(done) < len(sent):
            raise SystemExit(f"bench: {label} routed {len(done)} of {len(sent)} detections at {rate:g}/s: no figure")
        figures = spread([(seen[i] - sent[i]) * 1000 for i in done])
        figures.update(cpu_share=round(share, 3), received=len(done), sent=len(sent))
        console.print(f"{label} at {rate:g}/s: hop {without(figures, 'cpu_share')} ms, {share:.0%} of a core")
        return figures

    def failover(self, kill: bool, instances: int = 3, partitions: int = 6, rate: float = 100) -> dict:
        """`instances` exactly-once orchestrators share `partitions` partitions under `rate` detections/s; one is
        SIGKILLed (kill) or stopped with SIGTERM (a scale-down). Returns the seconds from then until every partition's
        detections are routed again (the slowest partition's first command for a detection sent after the signal,
        visible to a read_committed reader), and lost/duplicated workflows over the whole run."""
        prefix = self.prefix("kill" if kill else "stop", partitions)
        copies = [self.start(prefix, "orchestrator.py", "--example", "2", *NO_ANSWER, INSTANCE_ID=str(i))
                  for i in range(1, instances + 1)]
        commands = KafkaConsumer(prefix + contracts.SEC_COMMAND, bootstrap_servers=self.address,
                                 auto_offset_reset="earliest", isolation_level="read_committed", fetch_max_wait_ms=5,
                                 reconnect_backoff_max_ms=1000)
        routed: dict[str, list[float]] = {}  # workflow id -> times its command was seen (more than one: a duplicate)
        detections: list[tuple[float, int, str]] = []  # (sent, partition, id)
        stop, stop_watching = threading.Event(), threading.Event()

        def watch():
            while not stop_watching.is_set():
                for records in commands.poll(timeout_ms=20).values():
                    now = time.time()
                    for record in records:
                        routed.setdefault(json.loads(record.value)["workflow_id"], []).append(now)

        def traffic():
            producer, i = KafkaProducer(bootstrap_servers=self.address, linger_ms=0), 0
            pacer = common.Pacer(rate, None)
            while not stop.is_set():
                for _ in range(pacer.due()):
                    event_id, value, key = detection_bytes(i)
                    detections.append((time.time(), i % partitions, event_id))
                    producer.send(prefix + DETECTIONS, value=value, key=key, partition=i % partitions)
                    i += 1
                time.sleep(pacer.pause())
            producer.flush()
            producer.close()

        threads = [threading.Thread(target=watch, daemon=True), threading.Thread(target=traffic, daemon=True)]
        for thread in threads:
            thread.start()
        group, how = prefix + "orchestrator", "SIGKILL" if kill else "SIGTERM"
        with console.status(f"failover: {instances} orchestrators on {partitions} partitions, one gets {how}"):
            while not self.steady(group, instances, detections, routed):
                time.sleep(0.2)  # sampling a measurement's warm-up, not synchronising a test
            signalled = time.time()
            copies[-1].send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(self.resumed(signalled, detections, routed)) < partitions:
                time.sleep(0.02)
            resumed = self.resumed(signalled, detections, routed)
            copies[-1].wait(timeout=60)
            stop.set()
            threads[1].join()
            deadline = time.monotonic() + 60
            while any(d[2] not in routed for d in detections) and time.monotonic() < deadline:
                time.sleep(0.1)
        stop_watching.set()
        threads[0].join()
        for copy in copies[:-1]:
            copy.terminate()
        for copy in copies[:-1]:
            copy.wait(timeout=60)
        commands.close()
        seconds = max(resumed.values()) - signalled if len(resumed) == partitions else float("inf")
        lost = sum(d[2] not in routed for d in detections)
        duplicates = sum(len(times) - 1 for times in routed.values())
        console.print(f"failover after {how}: every partition routed again {seconds:.2f} s later "
                      f"({instances} orchestrators, {partitions} partitions, {rate:g} detections/s); "
                      f"{len(detections)} detections, lost {lost}, duplicates {duplicates}")
        return {"seconds": round(seconds, 2), "lost": lost, "duplicates": duplicates}

    def steady(self, group: str, members: int, detections: list, routed: dict) -> bool:
        """All copies in the group and, for two seconds, every detection routed within half a second."""
        description = self.admin.describe_groups([group]).get(group, {})
        if len(description.get("members") or ()) != members or description.get("group_state") != "Stable":
            return False
        now = time.time()
        recent = [d for d in detections if now - 2.5 < d[0] < now - 0.5]
        return len(recent) > 100 and all(d[2] in routed and routed[d[2]][0] - d[0] < 0.5 for d in recent)

    @staticmethod
    def resumed(since: float, detections: list, routed: dict) -> dict[int, float]:
        """Per partition: when the first detection sent after `since` was routed (partitions not yet: absent)."""
        first: dict[int, float] = {}
        for sent, partition, event_id in list(detections):
            if sent >= since and partition not in first and event_id in routed:
                first[partition] = routed[event_id][0]
        return first

    def traced(self, n: int) -> float | None:
        """The exactly-once orchestrator draining a backlog of n with tracing on, exporting every span to a real
        Zipkin (python -m local_zipkin, started here on a free port): messages per second, or None where Zipkin
        cannot run (no Java, or Maven cannot fetch it)."""
        where = Path(tempfile.mkdtemp(prefix="bench-zipkin-"))
        try:
            with console.status("tracing: starting Zipkin"):
                zipkin, _ = local_zipkin.start(local_kafka.free_port(), where)
        except local_kafka.LocalKafkaError as error:
            console.print(f"tracing: not measured ({error})")
            return None
        try:
            prefix = self.prefix("traced")
            with console.status(f"tracing: producing a backlog of {n}"):
                self.backlog(prefix, n)
            return self.drain("orchestrator exactly-once, traced (Zipkin)", n, prefix + "orchestrator", prefix,
                              "orchestrator.py", "--example", "2", *NO_ANSWER,
                              envs=({"OTEL_TRACES_EXPORTER": "zipkin",
                                     "OTEL_EXPORTER_ZIPKIN_ENDPOINT": zipkin.spans_endpoint},))[0]
        finally:
            local_zipkin.stop(where)

    def ceiling(self, records: int) -> float:
        """Kafka's own producer performance tool on this broker: records/s of detection-sized records, acks=all,
        idempotent, to a topic with as many partitions as the orchestrator's input. What the broker can take here."""
        prefix = self.prefix("ceiling")
        size = len(detection_bytes(0)[1])
        command = [local_kafka.find_java(), "-Xmx512m", "-cp", local_kafka.resolve_classpath(),
                   "org.apache.kafka.tools.ProducerPerformance", "--topic", prefix + DETECTIONS,
                   "--num-records", str(records), "--record-size", str(size), "--throughput", "-1",
                   "--producer-props", f"bootstrap.servers={self.address}", "acks=all"]
        with console.status(f"broker ceiling: Kafka's producer performance tool, {records} records of {size} bytes"):
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        summary = [line for line in result.stdout.splitlines() if f"{records} records sent" in line]
        if result.returncode != 0 or not summary:
            raise SystemExit(f"bench: the producer performance tool failed:\n{(result.stdout + result.stderr)[-2000:]}")
        rate = float(summary[-1].split(",")[1].split()[0])
        console.print(f"broker ceiling (Kafka's ProducerPerformance, {size}-byte records, acks=all): "
                      f"{rate:,.0f} records/s; {summary[-1].split(',', 1)[1].strip()}")
        return rate

    def restarts(self, times: int, rate: float) -> dict:
        """Stop and start the orchestrator while traffic flows; gap = process start -> first waiting message routed."""
        prefix = self.prefix("restart")
        orchestrator = self.start(prefix, "orchestrator.py", *NO_ANSWER)
        commands = KafkaConsumer(prefix + contracts.SEC_COMMAND, bootstrap_servers=self.address,
                                 auto_offset_reset="earliest", isolation_level="read_committed",
                                 reconnect_backoff_max_ms=1000)
        routed, detections, stop, stop_watching = [], [], threading.Event(), threading.Event()

        def watch():
            while not stop_watching.is_set():
                for records in commands.poll(timeout_ms=50).values():
                    routed.extend((time.time(), json.loads(r.value)["workflow_id"]) for r in records)

        def traffic():
            producer, i = KafkaProducer(bootstrap_servers=self.address), 0
            while not stop.is_set():
                event_id, value, key = detection_bytes(i)
                producer.send(prefix + DETECTIONS, value=value, key=key)
                detections.append(event_id)
                i += 1
                time.sleep(1 / rate)
            producer.flush()
            producer.close()

        threads = [threading.Thread(target=watch, daemon=True), threading.Thread(target=traffic, daemon=True)]
        for thread in threads:
            thread.start()
        gaps = []
        with console.status(f"restart gap: {times} orchestrator restarts under {rate:g} msg/s"):
            while len(routed) < 10:
                time.sleep(0.05)
            for _ in range(times):
                orchestrator.send_signal(signal.SIGTERM)
                orchestrator.wait(timeout=60)
                time.sleep(1.0)  # let a backlog build while it is down
                before = len(routed)
                started = time.time()
                orchestrator = self.start(prefix, "orchestrator.py", *NO_ANSWER)
                while len(routed) == before:
                    time.sleep(0.01)
                gaps.append(routed[before][0] - started)
        stop.set()
        threads[1].join()
        deadline = time.monotonic() + 60
        while len({w for _, w in routed}) < len(detections) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop_watching.set()
        threads[0].join()
        orchestrator.terminate()
        orchestrator.wait(timeout=60)
        commands.close()
        ids = [w for _, w in routed]
        lost, duplicates = len(set(detections) - set(ids)), len(ids) - len(set(ids))
        console.print(f"restart gap: median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s over {times} restarts; "
                      f"{len(detections)} detections, lost {lost}, duplicates {duplicates}")
        return {"median": round(statistics.median(gaps), 2), "max": round(max(gaps), 2), "lost": lost,
                "duplicates": duplicates}


def spread(latencies: list[float]) -> dict:
    """p50/p95/p99 of latencies (ms)."""
    return {f"p{p}": round(percentile(latencies, p), 1) for p in (50, 95, 99)} if latencies else {}


HOP_NAMES = {contracts.NOTIFICATION_COMMAND: "orchestrator", contracts.THIRD_PARTY: "notification service"}


def hops(prefix: str, path: list[str], sent: dict, seen: dict, done: list[str]) -> dict:
    """Each detection's way, hop by hop (ms, p50/p95/p99): the detection becoming visible, then per service the time
    until it sent its output (fetching and handling the input) and until that output was visible (its transaction
    committed, markers written)."""
    first = seen[prefix + path[0]]
    parts = {"detection visible": [(first[i][0] - sent[i]) * 1000 for i in done if i in first]}
    for before, after in itertools.pairwise(path):
        inputs, outputs, name = seen[prefix + before], seen[prefix + after], HOP_NAMES[after]
        both = [i for i in done if i in inputs and i in outputs]
        parts[f"{name}: fetched and handled"] = [max(0.0, outputs[i][1] - inputs[i][0]) * 1000 for i in both]
        parts[f"{name}: committed and visible"] = [max(0.0, outputs[i][0] - outputs[i][1]) * 1000 for i in both]
    return {part: spread(values) for part, values in parts.items()}


class Drained(NamedTuple):
    rate: float      # messages per second
    rss_mb: float    # the largest peak RSS of one process
    cpu_us: float    # CPU time per message, all processes together


def cpu_seconds(process: subprocess.Popen) -> float:
    """The CPU time (user and system, every thread) a process has used so far."""
    with open(f"/proc/{process.pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """VmRSS: a process's resident memory now."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def peak_rss_mb(pid: int) -> float:
    """VmHWM: a process's peak resident memory."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def raw_pipe() -> None:
    """No logic: every message_stream record is copied as it is to the three topics the Example 2 table sends to
    (the same fan-out as the orchestrator), with the loop's producer, batching and commit policy: the Kafka work of
    the at-least-once orchestrator, which keeps its state in memory."""
    stop = common.Stopper()
    consumer = common.make_consumer("raw", [DETECTIONS])
    producer = common.make_producer()
    while not stop:
        batch = consumer.poll(timeout_ms=500)
        futures = [producer.send(common.topic(name), value=r.value, key=r.key)
                   for records in batch.values() for r in records
                   for name in (contracts.SEC_COMMAND, contracts.NOTIFICATION_COMMAND, contracts.REPORT_DATA)]
        common.wait_for_acks(producer, futures)
        if batch:
            consumer.commit({tp: OffsetAndMetadata(rs[-1].offset + 1, "", -1) for tp, rs in batch.items()})
    consumer.close(autocommit=False)
    producer.close()


def confluent_router() -> None:
    """The exactly-once orchestrator's Kafka work done by confluent-kafka: per poll batch one transaction with the
    same records (the commands of the Example 2 table and the same state records, made by the same handling code)
    and the batch's offsets. What the client library costs, side by side with kafka-python."""
    from confluent_kafka import Consumer, KafkaException, Producer

    stop, settings = common.Stopper(), common.SETTINGS
    orchestration = Orchestration(WORKFLOWS, route, 2, Limits(step_timeout=3600))
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": common.topic("confluent"),
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "isolation.level": "read_committed"})
    consumer.subscribe([common.topic(DETECTIONS)])
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "transactional.id": common.topic("confluent"),
                         "linger.ms": 20})
    producer.init_transactions()
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    ensure_changelog(admin, "confluent", settings)
    admin.close()
    store = Store("confluent", settings, durable=True)  # (like the orchestrator: decide() skips repeats)
    store.entries = defaultdict(dict)  # (a fresh group: nothing to read back)
    while not stop:
        messages = [m for m in consumer.consume(500, timeout=0.5) if not m.error()]
        if not messages:
            continue
        producer.begin_transaction()
        changes = []
        for message in messages:
            record = Record(message.topic(), message.partition(), message.offset(), message.key(), message.value())
            handled = handle_record("confluent", record, orchestration.decide, store, stop)
            for out in handled.outputs:
                producer.produce(common.topic(out.topic), value=out.value, key=out.key,
                                 **({} if out.partition is None else {"partition": out.partition}))
            changes += handled.changes
        try:
            producer.send_offsets_to_transaction(consumer.position(consumer.assignment()),
                                                 consumer.consumer_group_metadata())
            producer.commit_transaction()
        except KafkaException as error:  # (a benchmark role: no recovery; the figure would be void)
            raise SystemExit(f"confluent router: {error}") from None
        store.commit(changes)
    consumer.close()




PEER_DIR = HERE / "peers"
STREAMS_VERSION = re.search(r"<kafka.version>(.+)</kafka.version>", (PEER_DIR / "pom.xml").read_text()).group(1)
GROUPS = {"orchestrator": "orchestrator", "raw_eos": "raweos", "quix": "quix", "quix_defaults": "quix",
          "kafka_streams": "streams", "kafka_streams_defaults": "streams"}  # system -> its group, under the prefix


def raw_eos_pipe() -> None:
    """No logic, exactly once: each detection copied as it is to the three command topics of the Example 2 table,
    and a record of a workflow entry's size (740 bytes) to a state topic, in one transaction per poll batch with the
    batch's offsets. The Kafka work of the exactly-once orchestrator with nothing else: the floor kafka-python
    allows for this job."""
    stop, settings = common.Stopper(), common.SETTINGS
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    ensure_changelog(admin, "raweos", settings)
    admin.close()
    consumer = common.make_consumer("raweos", [DETECTIONS])
    producer = common.make_producer(transactional_id=common.topic("raweos"))
    entry, state = b"x" * 740, common.topic(changelog("raweos"))
    while not stop:
        batch = consumer.poll(timeout_ms=500)
        if not batch:
            continue
        producer.begin_transaction()
        for records in batch.values():
            for r in records:
                for name in (contracts.SEC_COMMAND, contracts.NOTIFICATION_COMMAND, contracts.REPORT_DATA):
                    producer.send(common.topic(name), value=r.value, key=r.key)
                producer.send(state, value=entry, key=b"workflow/" + r.key + str(r.offset).encode(), partition=r.partition)
        producer.send_offsets_to_transaction({tp: OffsetAndMetadata(rs[-1].offset + 1, "", -1) for tp, rs in batch.items()},
                                             consumer.group_metadata())
        producer.commit_transaction()
    consumer.close(autocommit=False)
    producer.close()


def streams_classpath() -> str:
    """The Kafka Streams peer's classpath: its jars (peers/pom.xml, resolved by Maven once) and peers/Router.java
    compiled against them (once per version of the source)."""
    jars = local_kafka.resolve_classpath(PEER_DIR / "pom.xml")
    source = PEER_DIR / "Router.java"
    build = local_kafka.CACHE_DIR / f"streams-router-{hashlib.sha256(source.read_bytes() + jars.encode()).hexdigest()[:12]}"
    if not (build / "Router.class").exists():
        build.mkdir(parents=True, exist_ok=True)
        javac = Path(local_kafka.find_java()).with_name("javac")
        compiled = subprocess.run([str(javac) if javac.exists() else "javac", "-cp", jars, "-d", str(build),
                                   str(source)], capture_output=True, text=True)
        if compiled.returncode != 0:
            raise SystemExit(f"bench: javac could not compile {source}: {compiled.stderr.strip()[-1000:]}")
    return f"{build}{os.pathsep}{jars}"


def peer_systems(address: str) -> list[tuple[str, str, list[str] | None]]:
    """(key, label, command) of each system the peer comparison runs, in turn; a command's PREFIX, GROUP and
    SCRATCH are filled in per run (the orchestrator and the raw pipe take theirs from the environment)."""
    python, java, streams = sys.executable, local_kafka.find_java(), streams_classpath()
    quix = [python, str(PEER_DIR / "quix_router.py"), address, "PREFIX", "GROUP", "SCRATCH"]
    kafka_streams = [java, "-Xmx512m", "-cp", streams, "Router", address, "PREFIX", "GROUP", "SCRATCH"]
    return [("orchestrator", "this orchestrator, exactly once, --example 2",
             [python, "orchestrator.py", "--example", "2", *NO_ANSWER]),
            ("raw_eos", "raw exactly-once kafka-python pipe", [python, "bench.py", "--role", "raw-eos-pipe"]),
            ("quix_defaults", f"Quix Streams {quixstreams_version()}, exactly once, defaults (commit every 5 s)",
             [*quix, "0"]),
            ("quix", "Quix Streams, exactly once, commit_interval=0.05", [*quix, "0.05"]),
            ("kafka_streams_defaults", f"Kafka Streams {STREAMS_VERSION}, exactly_once_v2, defaults "
                                       "(commit every 100 ms)", [*kafka_streams, "0"]),
            ("kafka_streams", "Kafka Streams, exactly_once_v2, commit.interval.ms=10", [*kafka_streams, "10"])]


def quixstreams_version() -> str:
    try:
        from importlib.metadata import version
        return version("quixstreams")
    except ImportError:
        return "(not installed)"


def filled(command: list[str], prefix: str, group: str, scratch: str) -> list[str]:
    return [{"PREFIX": prefix, "GROUP": group, "SCRATCH": scratch}.get(part, part) for part in command]


def peers(bench: "Bench", n: int, seconds: float, rounds: int = ROUNDS) -> dict:
    """Each system drains the same backlog of n detections and then routes 100 detections/s for `seconds`, the
    systems taking turns, `rounds` times each: per system the medians of its drain rate, CPU per detection, hop
    latency at 100/s (p50/p95/p99) and share of a core at 100/s."""
    systems = peer_systems(bench.address)
    drains: dict[str, list[Drained]] = defaultdict(list)
    hop_runs: dict[str, list[dict]] = defaultdict(list)
    for _, (key, label, command) in itertools.product(range(rounds), systems):
        prefix, scratch = bench.prefix(key.replace("_", "")[:12]), tempfile.mkdtemp(prefix="bench-peer-")
        with console.status(f"{label}: producing a backlog of {n}"):
            bench.backlog(prefix, n)
        drains[key].append(bench.drain(label, n, prefix + GROUPS[key], prefix,
                                       argv=filled(command, prefix, prefix + GROUPS[key], scratch)))
        if (commands := bench.committed_records(prefix + contracts.SEC_COMMAND)) != n:  # (exactly once, or no figure)
            raise SystemExit(f"bench: {label} wrote {commands} security commands for {n} detections")
        hop_runs[key].append(bench.hop(label, key, command, 100, seconds))
        shutil.rmtree(scratch, ignore_errors=True)
    median = statistics.median
    return {key: {"label": label, "msgs_per_s": round(median(d.rate for d in drains[key])),
                  "cpu_us_per_detection": round(median(d.cpu_us for d in drains[key])),
                  "latency_100_ms": {p: round(median(h[p] for h in hop_runs[key]), 1) for p in ("p50", "p95", "p99")},
                  "cpu_share_100": round(median(h["cpu_share"] for h in hop_runs[key]), 3)}
            for key, label, _ in systems}


def peer_figures(found: dict) -> dict:
    """bench.py --json's keys for the peer comparison, and the ratios the performance goals are stated in."""
    orchestrator, raw, quix, streams = found["orchestrator"], found["raw_eos"], found["quix"], found["kafka_streams"]
    ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
    best_p99 = min(quix["latency_100_ms"]["p99"], streams["latency_100_ms"]["p99"])
    return {"peers": found,  # (quix, quix_defaults, kafka_streams, kafka_streams_defaults; orchestrator, raw_eos)
            "raw_eos_msgs_per_s": raw["msgs_per_s"], "raw_eos_hop_100_ms": raw["latency_100_ms"],
            "orchestrator_cpu_us_per_detection": orchestrator["cpu_us_per_detection"],
            "orchestrator_hop_100_ms": orchestrator["latency_100_ms"],
            "orchestrator_cpu_share_100": orchestrator["cpu_share_100"],
            "ratios": {
                "cpu_per_detection_over_quix": ratio(orchestrator["cpu_us_per_detection"], quix["cpu_us_per_detection"]),
                "drain_over_quix": ratio(orchestrator["msgs_per_s"], quix["msgs_per_s"]),
                "hop_p99_over_better_peer_p99": ratio(orchestrator["latency_100_ms"]["p99"], best_p99),
                "hop_p50_over_raw_eos_p50": ratio(orchestrator["latency_100_ms"]["p50"], raw["latency_100_ms"]["p50"]),
                "cpu_share_100_over_quix": ratio(orchestrator["cpu_share_100"], quix["cpu_share_100"])}}


def profile(count: int = 20_000) -> dict:
    """The orchestrator's own handling of `count` detections, without Kafka: what the loop does between poll and
    send for each (check, parse, route, build and serialise the envelopes, keep the workflow's state), under
    cProfile. Returns microseconds per detection, timed apart from the profile."""
    import cProfile
    import pstats

    records = [Record(common.topic(DETECTIONS), 0, i, key, value)
               for i, (_, value, key) in enumerate(map(detection_bytes, range(2 * count)))]
    store, stop = Store("orchestrator", durable=True), common.Stopper()
    orchestration = Orchestration(WORKFLOWS, route, 2, Limits(step_timeout=3600))

    def handle(batch):
        for record in batch:
            handled = handle_record("orchestrator", record, orchestration.decide, store, stop)
            store.commit(handled.changes)
    store.entries = defaultdict(dict)  # (no state to read back)
    began = time.perf_counter()
    handle(records[:count])
    micros = (time.perf_counter() - began) / count * 1e6
    profiler = cProfile.Profile()
    profiler.runcall(handle, records[count:])
    console.print(f"the orchestrator's handling: {micros:.1f} µs per detection ({count} detections, no Kafka); "
                  "where it goes (cProfile, by own time):")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)
    return {"handling_us_per_detection": round(micros, 1)}


def views(count: int = 100_000) -> dict:
    """The console's list and search over `count` workflows, without Kafka: entries made by the engine from
    detections (a tenth failed), then what a look at the list does (the state as views.workflows.located reads it,
    the index brought up to date, a search, one page of rows), each the median of three; and the memory a workflow
    takes in the views (its entry as followed, and its facts in the index)."""
    import tracemalloc

    from views.search import Filter, Index, paged
    from views.workflows import located, stuck_of, summary

    engine, now = Orchestration(WORKFLOWS, route, 2, Limits(step_timeout=3600)), time.time()
    store = Store("orchestrator", durable=False)
    store.restore({0})
    made = []
    for i in range(count):  # (each workflow's entry as the engine makes it for its detection; none committed)
        event = common.Envelope.model_validate_json(detection_bytes(i)[1])
        view = store.view(0, b"s")
        engine.decide(event, view, now - count + i)
        made.append((event.workflow_id, view.get(common.WORKFLOW + event.workflow_id)))
    tracemalloc.start()
    entries = {}
    for i, (workflow_id, made_) in enumerate(made):
        workflow = json.loads(json.dumps(made_))  # (as followed: its own copy, read from its bytes)
        if i % 10 == 0:
            workflow["state"] = "failed"
        key = (common.WORKFLOW + workflow_id).encode()
        entries[(i % 3, key)] = (now, "orchestrator", json.dumps(workflow).encode(), workflow)
    held = tracemalloc.get_traced_memory()[0]
    checked = {}  # (kept between looks, as the console keeps it)
    found = located(common.Settings(), quiet=True, entries=entries, checked=checked)
    index = Index()
    index.update(found)
    indexed = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    some = next(iter(found))

    def timed(function) -> float:
        runs = []
        for _ in range(3):
            began = time.perf_counter()
            function()
            runs.append((time.perf_counter() - began) * 1000)
        return round(statistics.median(runs), 1)

    def look(wanted: Filter) -> None:  # (what the console's GET /api/workflows does)
        state = located(common.Settings(), quiet=True, entries=entries, checked=checked)
        index.update(state)
        ids, _ = paged(index.find(wanted, lambda w: stuck_of(state[w].workflow, 5.0, now) is not None), 1)
        [summary(state[w].workflow) for w in ids]
    figures = {"workflows": count,
               "list_page_ms": timed(lambda: look(Filter())),
               "find_by_id_ms": timed(lambda: look(Filter(id=some[:8]))),
               "find_by_entity_and_state_ms": timed(lambda: look(Filter(entity="sensor-3", state="failed"))),
               "index_update_unchanged_ms": timed(lambda: index.update(found)),
               "memory_per_workflow_bytes": {"entry_followed": round(held / count),
                                             "index": round((indexed - held) / count)}}
    console.print(f"views over {count} workflows: {figures}")
    return figures


def broker() -> tuple[str, Path | None]:
    """A broker address: KAFKA_BOOTSTRAP_SERVERS if it answers, else a local_kafka started here."""
    address = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    if local_kafka.metadata_ok(address.split(",")[0]):
        return address, None
    data_dir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    started, _ = local_kafka.start(local_kafka.free_port(), data_dir)
    return started.address, data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--messages", type=int, help="backlog size (default 100 000, --quick 20 000)")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    parser.add_argument("--sweep", action="store_true", help="latency against rate, 100 -> 5 000 msg/s")
    parser.add_argument("--plot", metavar="FILE.png", help="with --sweep: draw latency against rate")
    parser.add_argument("--profile", action="store_true", help="only the orchestrator's own handling, profiled (no Kafka)")
    parser.add_argument("--peers", action="store_true", help="only the comparison with Quix Streams, Kafka Streams "
                                                             "and a raw exactly-once pipe")
    parser.add_argument("--views", type=int, metavar="N", help="only the console's list and search over N workflows "
                                                                "(no Kafka)")
    parser.add_argument("--role", choices=["raw-pipe", "raw-eos-pipe", "confluent-router"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        common.setup_logging()
        return {"raw-pipe": raw_pipe, "raw-eos-pipe": raw_eos_pipe, "confluent-router": confluent_router}[args.role]()
    if args.profile:
        return not profile()
    if args.views:
        figures = views(args.views)
        if args.json:
            Path(args.json).write_text(json.dumps({"views": figures}, indent=2) + "\n")
        return 0
    n = args.messages or (20_000 if args.quick else 100_000)
    address, data_dir = broker()
    bench = Bench(address)
    console.print(f"bench: Kafka {local_kafka.KAFKA_VERSION} at {address}, kafka-python {kafka.__version__}, "
                  f"{n} messages, {os.cpu_count()} cores")
    try:
        seconds = 5 if args.quick else 10
        figures = peer_figures(peers(bench, n, seconds)) if args.peers else \
            measure(bench, n, seconds, restarts=3 if args.quick else 5)
        if args.sweep:
            figures["sweep"] = sweep(bench, seconds=5 if args.quick else 10)
            if args.plot:
                plot(figures["sweep"], args.plot)
        console.print_json(json.dumps(figures))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        bench.admin.close()
        if bench.reader is not None:
            bench.reader.close()
        if data_dir:
            local_kafka.stop(data_dir)
    return 0


def throughputs(bench: Bench, n: int, rounds: int = ROUNDS) -> dict[str, tuple[float, float]]:
    """Each system drains the same backlog of n detections, in turn, `rounds` times (a run varies by ±20% on a busy
    machine; taking turns spreads that over all of them): label -> (the median of its messages per second, its
    largest peak RSS in MB)."""
    systems = (("orchestrator exactly-once", "orchestrator", ["orchestrator.py", "--example", "2", *NO_ANSWER]),
               ("orchestrator at-least-once", "orchestrator", ["orchestrator.py", "--example", "2",
                                                               "--no-transactions", *NO_ANSWER]),
               ("raw kafka-python pipe", "raw", ["bench.py", "--role", "raw-pipe"]),
               ("confluent-kafka router, exactly once", "confluent", ["bench.py", "--role", "confluent-router"]))
    runs: dict[str, list[tuple[float, float]]] = {}
    for _, (label, role, args_) in itertools.product(range(rounds), systems):
        prefix = bench.prefix(role)
        with console.status(f"{label}: producing a backlog of {n}"):
            bench.backlog(prefix, n)
        runs.setdefault(label, []).append(bench.drain(label, n, prefix + role, prefix, *args_))
    return {label: (statistics.median(r.rate for r in results), max(r.rss_mb for r in results))
            for label, results in runs.items()}


def measure(bench: Bench, n: int, seconds: float, restarts: int) -> dict:
    """Every figure of one run, side by side: throughput, scale-out, latency, restart gap, memory."""
    rates = throughputs(bench, n)
    compared = peer_figures(peers(bench, n, seconds))
    scale, spread = bench.scale_out(n, SCALE_PARTITIONS)
    speedup = scale[2] / scale[1]
    console.print(f"{SCALE_PARTITIONS} partitions (detections per partition {spread}): exactly-once "
                  f"orchestrator 1 instance {scale[1]:,.0f} msg/s, 2 instances {scale[2]:,.0f} msg/s, "
                  f"speedup {speedup:.2f}x")
    console.print(f"  on this {os.cpu_count()}-core machine the two instances compete for the same CPUs as the broker, "
                  "so this speedup is bounded by cores, not by the design")
    latency = {rate: (bench.latency(rate, seconds, system=True), bench.latency(rate, seconds, system=False))
               for rate in (100, 1000)}
    for rate, (e2e, direct) in latency.items():
        console.print(f"latency at {rate}/s: end to end {without(e2e, 'hops')}, direct single hop {direct} (ms)")
        for part, figures in e2e.get("hops", {}).items():
            console.print(f"  {part}: {figures}")
    gap = bench.restarts(restarts, 100)
    kill, stop = bench.failover(kill=True), bench.failover(kill=False)
    restore, restore_200k = bench.restore(100_000, stop=False), bench.restore(200_000)
    ceiling = bench.ceiling(n * 10)
    traced = bench.traced(n)
    eos, alo = rates["orchestrator exactly-once"][0], rates["orchestrator at-least-once"][0]
    raw, ck = rates["raw kafka-python pipe"][0], rates["confluent-kafka router, exactly once"][0]
    (e2e, direct), (e2e_100, direct_100) = latency[1000], latency[100]
    figures = lambda f: {k: f.get(k) for k in ("p50", "p95", "p99")}  # noqa: E731
    ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
    return {"kafka_version": local_kafka.KAFKA_VERSION, "kafka_python_version": kafka.__version__, "messages": n,
            "orchestrator_eos_msgs_per_s": round(eos), "orchestrator_alo_msgs_per_s": round(alo),
            "orchestrator_eos_traced_msgs_per_s": round(traced) if traced else None,
            "raw_pipe_msgs_per_s": round(raw), "confluent_router_msgs_per_s": round(ck),
            "broker_ceiling_msgs_per_s": round(ceiling),
            "e2e_latency_ms": figures(e2e), "direct_latency_ms": figures(direct),
            "e2e_latency_100_ms": figures(e2e_100), "direct_latency_100_ms": figures(direct_100),
            "e2e_hops_100_ms": e2e_100.get("hops"), "e2e_hops_ms": e2e.get("hops"),
            "restart_gap_s": {"median": gap["median"], "max": gap["max"]},
            "failover_kill_s": kill["seconds"], "failover_stop_s": stop["seconds"],
            "orchestrator_peak_rss_mb": round(rates["orchestrator exactly-once"][1], 1),
            f"orchestrator_eos_1_instance_{SCALE_PARTITIONS}_partitions_msgs_per_s": round(scale[1]),
            f"orchestrator_eos_2_instances_{SCALE_PARTITIONS}_partitions_msgs_per_s": round(scale[2]),
            "two_instances_speedup": round(speedup, 2),
            f"detections_per_partition_{SCALE_PARTITIONS}_partitions": spread,
            "state_restore_s": restore["seconds"], "stop_during_restore_s": restore_200k["stop_s"],
            "orchestrator_rss_100k_open_workflows_mb": restore["rss_mb"],
            "state_200k_rss_mb": restore_200k["rss_mb"], "state_200k_restore_s": restore_200k["seconds"],
            "lost": gap["lost"] + kill["lost"] + stop["lost"],
            "duplicates": gap["duplicates"] + kill["duplicates"] + stop["duplicates"],
            **{key: value for key, value in compared.items() if key != "ratios"},
            "ratios": {**compared["ratios"], "alo_over_raw": ratio(alo, raw), "eos_over_alo": ratio(eos, alo),
                       "eos_over_confluent": ratio(eos, ck), "eos_over_broker_ceiling": ratio(eos, ceiling),
                       "traced_over_untraced": ratio(traced, eos),
                       "e2e_p99_over_direct_p99": ratio(e2e.get("p99"), direct.get("p99")),
                       "e2e_p99_over_direct_p99_100": ratio(e2e_100.get("p99"), direct_100.get("p99")),
                       "e2e_p50_over_direct_p50_100": ratio(e2e_100.get("p50"), direct_100.get("p50"))}}


def without(figures: dict, key: str) -> dict:
    return {k: v for k, v in figures.items() if k != key}


def sweep(bench: Bench, seconds: float) -> list[dict]:
    """Latency against rate, end to end and direct."""
    rows = []
    for rate in (100, 500, 1000, 2000, 5000):
        rows.append({"rate": rate, "e2e": bench.latency(rate, seconds, True), "direct": bench.latency(rate, seconds, False)})
        console.print(f"sweep {rate}/s: e2e {without(rows[-1]['e2e'], 'hops')} direct {rows[-1]['direct']}")
    return rows


def plot(sweep: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = [row["rate"] for row in sweep]
    for key, label in (("e2e", "detection -> notification delivered"), ("direct", "direct produce -> consume")):
        for p, style in (("p50", "-"), ("p99", "--")):
            plt.plot(rates, [row[key].get(p) for row in sweep], style, marker="o", label=f"{label} {p}")
    plt.xscale("log")
    plt.yscale("log")
    plt.xlabel("detections per second")
    plt.ylabel("latency (ms)")
    plt.legend()
    plt.title("Latency against rate")
    plt.savefig(path, dpi=100, bbox_inches="tight")
    console.print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
