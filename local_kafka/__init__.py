"""A real Apache Kafka broker (KRaft, one node) from Maven Central jars, for machines without Docker.

The broker version is pinned in pom.xml; Maven resolves the jars once into ~/.m2 and the classpath is cached here.
Run it with `python -m local_kafka start|stop|status [--port P] [--dir D]`.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE.parent / ".local_kafka"
CACHE_DIR = HERE / ".cache"
KAFKA_VERSION = re.search(r"<kafka.version>(.+)</kafka.version>", (HERE / "pom.xml").read_text()).group(1)


class LocalKafkaError(Exception):
    """A failure with a one-line explanation for the user."""


@dataclass
class Broker:
    pid: int
    port: int
    controller_port: int
    log: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start(port: int = 9092, data_dir: Path = DEFAULT_DIR, timeout: float = 60.0) -> tuple[Broker, bool]:
    """Start a broker (or find the one already running in data_dir); returns it and whether it was started now."""
    data_dir = Path(data_dir).resolve()
    running = status(data_dir)
    if running:
        if running.port != port:
            raise LocalKafkaError(f"a broker from {data_dir} already runs on port {running.port}, not {port}")
        return running, False
    java = find_java()
    if not port_is_free(port):
        raise LocalKafkaError(f"port {port} is already in use by another process; pick another with --port")
    classpath = resolve_classpath()

    data_dir.mkdir(parents=True, exist_ok=True)
    controller_port = free_port()
    config = data_dir / "server.properties"
    template = string.Template((HERE / "server.properties").read_text())
    config.write_text(template.substitute(
        PORT=port, CONTROLLER_PORT=controller_port, LOG_DIRS=data_dir / "data"))
    if not (data_dir / "data" / "meta.properties").exists():
        format_storage(java, classpath, config)

    log = data_dir / "broker.log"
    command = [java, "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={HERE / 'log4j2.yaml'}",
               "-cp", classpath, "kafka.Kafka", str(config)]
    with open(log, "ab") as out:
        # A session of its own, so the broker outlives this command and Ctrl-C in the caller's terminal.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    broker = Broker(process.pid, port, controller_port, str(log))
    (data_dir / "broker.json").write_text(json.dumps(broker.__dict__))
    try:
        wait_until_ready(broker, process, timeout)
    except LocalKafkaError:
        stop(data_dir)
        raise
    return broker, True


def stop(data_dir: Path = DEFAULT_DIR, timeout: float = 30.0) -> Broker | None:
    """Stop the broker started from data_dir (and nothing else); returns it, or None if none was running."""
    state = Path(data_dir).resolve() / "broker.json"
    broker = read_state(state)
    if broker is None:
        return None
    if is_our_broker(broker.pid):
        os.killpg(broker.pid, signal.SIGTERM)
        if not wait_for(lambda: not is_alive(broker.pid), timeout):
            os.killpg(broker.pid, signal.SIGKILL)
            wait_for(lambda: not is_alive(broker.pid), 10)
    wait_for(lambda: port_is_free(broker.port), 10)
    state.unlink(missing_ok=True)
    return broker


def status(data_dir: Path = DEFAULT_DIR) -> Broker | None:
    """The broker running from data_dir, or None."""
    broker = read_state(Path(data_dir).resolve() / "broker.json")
    return broker if broker and is_our_broker(broker.pid) else None


def find_java() -> str:
    """The java executable (JAVA_HOME first, then PATH), checked to be version 17 or newer."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise LocalKafkaError("Java 17 or newer is needed to run Kafka, but no 'java' was found on PATH or in JAVA_HOME")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(found.group(1)) if found else 0
    if major == 1 and found.group(2):  # "1.8.0" style
        major = int(found.group(2))
    if major < 17:
        raise LocalKafkaError(f"Java 17 or newer is needed to run Kafka; {java} is version {major or 'unknown'}")
    return java


def resolve_classpath() -> str:
    """The broker's classpath, resolved from pom.xml by Maven once and cached."""
    pom = HERE / "pom.xml"
    cached = CACHE_DIR / f"classpath-{hashlib.sha256(pom.read_bytes()).hexdigest()[:12]}.txt"
    if cached.exists():
        classpath = cached.read_text().strip()
        if all(Path(jar).exists() for jar in classpath.split(os.pathsep)):
            return classpath
    mvn = shutil.which("mvn")
    if not mvn:
        raise LocalKafkaError("Maven ('mvn') is needed once to fetch the Kafka jars from Maven Central, but it is not on PATH")
    CACHE_DIR.mkdir(exist_ok=True)
    result = subprocess.run([mvn, "-B", "-q", "-f", str(pom), "dependency:build-classpath",
                             f"-Dmdep.outputFile={cached}"], capture_output=True, text=True)
    if result.returncode != 0 or not cached.exists():
        last = " | ".join(line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line)[:500]
        raise LocalKafkaError(f"could not resolve Kafka {KAFKA_VERSION} jars with Maven: {last or 'see mvn output'}")
    return cached.read_text().strip()


def format_storage(java: str, classpath: str, config: Path) -> None:
    """Format the KRaft metadata log once, with a fresh cluster id."""
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    result = subprocess.run([java, "-cp", classpath, f"-Dlog4j2.configurationFile={HERE / 'log4j2.yaml'}",
                             "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config),
                             "--ignore-formatted"], capture_output=True, text=True)
    if result.returncode != 0:
        raise LocalKafkaError(f"formatting Kafka storage failed: {result.stderr.strip().splitlines()[-1:]}")


def wait_until_ready(broker: Broker, process: subprocess.Popen, timeout: float) -> None:
    """Return once a metadata request succeeds; raise with the log's last lines if the broker dies or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalKafkaError(f"the broker exited with code {process.returncode} while starting; "
                                  f"last lines of {broker.log}:\n{tail(broker.log)}")
        if metadata_ok(broker.address):
            return
        time.sleep(0.2)  # polling a readiness probe, not synchronising on a guess
    raise LocalKafkaError(f"the broker was not ready within {timeout:.0f} s; last lines of {broker.log}:\n{tail(broker.log)}")


def metadata_ok(address: str) -> bool:
    """True when the broker answers a metadata request."""
    try:
        with socket.create_connection(address.split(":"), timeout=0.5):
            pass
    except OSError:
        return False
    from kafka import KafkaAdminClient  # imported late: start/stop/status work without it
    from kafka.errors import KafkaError
    try:
        admin = KafkaAdminClient(bootstrap_servers=address, bootstrap_timeout_ms=2000, request_timeout_ms=2000)
    except KafkaError:
        return False
    try:
        admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


def tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_state(path: Path) -> Broker | None:
    try:
        return Broker(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A zombie child (kill -0 succeeds) is as good as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def is_our_broker(pid: int) -> bool:
    """True if pid is alive and is a Kafka JVM (so a recycled pid is never signalled)."""
    if not is_alive(pid):
        return False
    try:
        return "kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return sys.platform != "linux"


def port_is_free(port: int) -> bool:
    """True if a server could listen on the port now (as the broker does, ignoring old TIME_WAIT connections)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()
