"""Real Apache Kafka (KRaft) from Maven Central jars, for machines without Docker: one node, or a three-node
cluster (`nodes=3`), plain or secured with SASL/SCRAM users and ACLs (`secure=True`).

The broker version is pinned in pom.xml; Maven resolves the jars once into ~/.m2 and the classpath is cached here.
Run it with `python -m local_kafka start|stop|status|env [--secure] [--nodes 3] [--port P] [--dir D]`.
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
CACHE_DIR = HERE / ".cache"
KAFKA_VERSION = re.search(r"<kafka.version>(.+)</kafka.version>", (HERE / "pom.xml").read_text()).group(1)
SCRAM = "SCRAM-SHA-512"


def default_dir(nodes: int = 1, secure: bool = False) -> Path:
    """Each kind of cluster keeps its data apart: .local_kafka, .local_kafka-secure, .local_kafka-3nodes, ..."""
    return HERE.parent / (".local_kafka" + ("-secure" if secure else "") + (f"-{nodes}nodes" if nodes > 1 else ""))


DEFAULT_DIR = default_dir()


class LocalKafkaError(Exception):
    """A failure with a one-line explanation for the user."""


@dataclass
class Broker:
    """One node: broker and controller in one JVM."""
    pid: int
    port: int
    controller_port: int
    log: str
    node_id: int = 1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Cluster:
    nodes: list[Broker]
    secure: bool = False

    @property
    def address(self) -> str:
        """The bootstrap address: every node, comma-separated."""
        return ",".join(node.address for node in self.nodes)

    @property
    def pid(self) -> int:
        return self.nodes[0].pid

    @property
    def log(self) -> str:
        return self.nodes[0].log if len(self.nodes) == 1 else str(Path(self.nodes[0].log).parent.parent / "node-*/broker.log")


def start(port: int = 9092, data_dir: Path | None = None, timeout: float = 60.0, *, nodes: int = 1,
          secure: bool = False) -> tuple[Cluster, bool]:
    """Start a cluster of `nodes` nodes on ports port, port+1, ... (or find the one already running in data_dir);
    returns it and whether it was started now. secure: SASL/SCRAM sign-in and ACLs (see listeners-secure.properties)."""
    if nodes not in (1, 3):
        raise LocalKafkaError(f"--nodes takes 1 or 3, not {nodes} (a KRaft quorum wants an odd number; 3 survives one loss)")
    data_dir = Path(data_dir or default_dir(nodes, secure)).resolve()
    running = status(data_dir)
    if running:
        if running.nodes[0].port != port or len(running.nodes) != nodes or running.secure != secure:
            raise LocalKafkaError(f"a {describe(running)} from {data_dir} already runs at {running.address}; "
                                  f"stop it first (python -m local_kafka stop --dir {data_dir})")
        dead = [node.node_id for node in running.nodes if not is_our_broker(node.pid)]
        for node_id in dead:  # a node that crashed or was killed: start it again on its data
            restart_node(data_dir, node_id, timeout)
        return status(data_dir), bool(dead)
    check_layout(data_dir, nodes, secure)
    java = find_java()
    ports = [port + i for i in range(nodes)]
    for p in ports:
        if not port_is_free(p):
            raise LocalKafkaError(f"port {p} is already in use by {holder_of(p)}; pick another with --port")
    classpath = resolve_classpath()

    data_dir.mkdir(parents=True, exist_ok=True)
    passwords = credentials(data_dir, create=secure) if secure else {}
    controller_ports = [free_port() for _ in ports]
    voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, c in enumerate(controller_ports))
    cluster_id = read_or_make_cluster_id(data_dir)
    configs = []
    for i, (p, c) in enumerate(zip(ports, controller_ports, strict=True)):  # every node formatted before any starts
        node_dir = data_dir / f"node-{i + 1}"
        node_dir.mkdir(exist_ok=True)
        configs.append(node_dir / "server.properties")
        write_config(configs[-1], node_id=i + 1, port=p, controller_port=c, voters=voters, nodes=nodes,
                     log_dirs=node_dir / "data", admin_password=passwords.get("admin"))
        if not (node_dir / "data" / "meta.properties").exists():
            format_storage(java, classpath, configs[-1], cluster_id, passwords)
    (data_dir / "layout.json").write_text(json.dumps({"nodes": nodes, "secure": secure}))
    cluster = Cluster([], secure)
    try:
        for i, (config, p, c) in enumerate(zip(configs, ports, controller_ports, strict=True)):
            cluster.nodes.append(launch(java, classpath, config, i + 1, p, c))
            save_state(data_dir, cluster)  # recorded at once, so that stop finds every node that was launched
        for node in cluster.nodes:
            wait_until_ready(node, timeout, passwords.get("admin"))
    except BaseException:  # a failed start (or Ctrl-C) leaves no broker behind
        stop(data_dir)
        raise
    return cluster, True


def describe(cluster: Cluster) -> str:
    return kind(len(cluster.nodes), cluster.secure)


def kind(nodes: int, secure: bool) -> str:
    return f"{nodes}-node{' secure' if secure else ''} cluster"


def check_layout(data_dir: Path, nodes: int, secure: bool) -> None:
    """A data dir stays the kind of cluster it was made for (a plain store has no users; node counts must match)."""
    try:
        layout = json.loads((data_dir / "layout.json").read_text())
    except (OSError, ValueError):
        return
    if (data_dir / "data" / "meta.properties").exists() and not (data_dir / "node-1").exists():
        raise LocalKafkaError(f"{data_dir} holds data of an older local_kafka; delete it (or use another --dir)")
    if layout != {"nodes": nodes, "secure": secure}:
        raise LocalKafkaError(f"{data_dir} holds a {kind(layout.get('nodes'), layout.get('secure'))}; use another "
                              f"--dir (or delete it) for a {kind(nodes, secure)}")


def write_config(config: Path, *, node_id: int, port: int, controller_port: int, voters: str, nodes: int,
                 log_dirs: Path, admin_password: str | None) -> None:
    listeners = "listeners-secure.properties" if admin_password else "listeners-plain.properties"
    template = string.Template((HERE / "server.properties").read_text() + "\n" + (HERE / listeners).read_text())
    config.touch(mode=0o600)  # it holds the admin password in secure mode: readable by its owner only
    config.write_text(template.substitute(
        NODE_ID=node_id, PORT=port, CONTROLLER_PORT=controller_port, VOTERS=voters, LOG_DIRS=log_dirs,
        REPLICAS=nodes, MIN_ISR=min(nodes, 2), OFFSETS_PARTITIONS=1 if nodes == 1 else 3,
        ADMIN_PASSWORD=admin_password or ""))


def launch(java: str, classpath: str, config: Path, node_id: int, port: int, controller_port: int) -> Broker:
    log = config.parent / "broker.log"
    command = [java, "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={HERE / 'log4j2.yaml'}",
               "-cp", classpath, "kafka.Kafka", str(config)]
    with open(log, "ab") as out:
        # A session of its own, so the broker outlives this command and Ctrl-C in the caller's terminal.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    return Broker(process.pid, port, controller_port, str(log), node_id)


def kill_node(data_dir: Path, node_id: int) -> Broker:
    """SIGKILL one node of a running cluster (a crash, for failover tests); restart it with restart_node."""
    cluster = status(data_dir)
    node = next(n for n in cluster.nodes if n.node_id == node_id)
    os.killpg(node.pid, signal.SIGKILL)
    wait_for(lambda: not is_alive(node.pid), 10)
    return node


def restart_node(data_dir: Path, node_id: int, timeout: float = 60.0) -> Broker:
    """Start one node again on its old config and data, and wait until it answers."""
    data_dir = Path(data_dir).resolve()
    cluster = read_state(data_dir / "broker.json")
    old = next(n for n in cluster.nodes if n.node_id == node_id)
    if is_our_broker(old.pid):
        raise LocalKafkaError(f"node {node_id} is still running (pid {old.pid})")
    node = launch(find_java(), resolve_classpath(), Path(old.log).parent / "server.properties", node_id, old.port,
                  old.controller_port)
    cluster.nodes[cluster.nodes.index(old)] = node
    save_state(data_dir, cluster)
    wait_until_ready(node, timeout, credentials(data_dir).get("admin") if cluster.secure else None)
    return node


def stop(data_dir: Path | None = None, timeout: float = 30.0) -> Cluster | None:
    """Stop the cluster started from data_dir (and nothing else); returns it, or None if none was running."""
    data_dir = Path(data_dir or DEFAULT_DIR).resolve()
    cluster = read_state(data_dir / "broker.json")
    if cluster is None:
        return None
    for node in cluster.nodes:
        if is_our_broker(node.pid):
            os.killpg(node.pid, signal.SIGTERM)
    for node in cluster.nodes:
        if not wait_for(lambda n=node: not is_alive(n.pid), timeout) and is_our_broker(node.pid):
            os.killpg(node.pid, signal.SIGKILL)
            wait_for(lambda n=node: not is_alive(n.pid), 10)
        wait_for(lambda n=node: port_is_free(n.port), 10)
    (data_dir / "broker.json").unlink(missing_ok=True)
    return cluster


def status(data_dir: Path | None = None) -> Cluster | None:
    """The cluster running from data_dir (if any node of it runs), or None."""
    cluster = read_state(Path(data_dir or DEFAULT_DIR).resolve() / "broker.json")
    return cluster if cluster and any(is_our_broker(node.pid) for node in cluster.nodes) else None


DEFAULT_DIRS = [default_dir(n, s) for n in (1, 3) for s in (False, True)]


def holder_of(port: int) -> str:
    """Who holds a port: one of our clusters (named, so the user can stop it) or another process."""
    for data_dir in running_default_dirs():
        cluster = status(data_dir)
        if any(node.port == port for node in cluster.nodes):
            return f"the local_kafka {describe(cluster)} from {data_dir} (stop it with: python -m local_kafka stop)"
    return "another process"


def running_default_dirs() -> list[Path]:
    """The default data dirs whose cluster runs now (for `stop`/`status`/`env` without --dir)."""
    return [d for d in DEFAULT_DIRS if status(d)]


def credentials(data_dir: Path, create: bool = False) -> dict[str, str]:
    """The SCRAM users' passwords (user -> password): `admin` (the brokers and operator tools) and one per script of
    acls.py, generated once per data dir (create=True) into credentials.json, readable by its owner only."""
    path = Path(data_dir) / "credentials.json"
    if path.exists():
        return json.loads(path.read_text())
    if not create:
        raise LocalKafkaError(f"{data_dir} has no credentials: it is not a --secure cluster")
    import acls  # the project's users; needs kafka-python, which a secure start needs anyway
    return acls.passwords_file(str(path))


def client_env(address: str, secure: bool, data_dir: Path, user: str) -> dict[str, str]:
    """The environment variables a script needs to reach the cluster at `address` as `user`."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": address}
    if secure:
        passwords = credentials(data_dir)
        if user not in passwords:
            raise LocalKafkaError(f"no user {user!r}; the users are {', '.join(passwords)}")
        env.update(KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT", KAFKA_SASL_MECHANISM=SCRAM,
                   KAFKA_SASL_USERNAME=user, KAFKA_SASL_PASSWORD=passwords[user])
    return env


def save_state(data_dir: Path, cluster: Cluster) -> None:
    (data_dir / "broker.json").write_text(json.dumps({"nodes": [n.__dict__ for n in cluster.nodes],
                                                      "secure": cluster.secure}))


def read_or_make_cluster_id(data_dir: Path) -> str:
    path = data_dir / "cluster_id"
    if not path.exists():
        path.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))
    return path.read_text().strip()


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


def resolve_classpath(pom: Path = HERE / "pom.xml") -> str:
    """The broker's classpath (or another pom's: bench.py's Kafka Streams peer), resolved by Maven once and cached."""
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


def format_storage(java: str, classpath: str, config: Path, cluster_id: str, passwords: dict[str, str]) -> None:
    """Format a node's KRaft metadata log once; in secure mode this is where the SCRAM users are created."""
    users = [arg for user, password in passwords.items()
             for arg in ("--add-scram", f"{SCRAM}=[name={user},password={password}]")]
    result = subprocess.run([java, "-cp", classpath, f"-Dlog4j2.configurationFile={HERE / 'log4j2.yaml'}",
                             "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(config),
                             "--ignore-formatted", *users], capture_output=True, text=True)
    if result.returncode != 0:
        raise LocalKafkaError(f"formatting Kafka storage failed: {result.stderr.strip().splitlines()[-1:]}")


def wait_until_ready(node: Broker, timeout: float, admin_password: str | None = None) -> None:
    """Return once a metadata request to the node succeeds; raise with the log's last lines if it dies or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(node.pid):
            raise LocalKafkaError(f"the broker on port {node.port} exited while starting; "
                                  f"last lines of {node.log}:\n{tail(node.log)}")
        if metadata_ok(node.address, admin_password):
            return
        time.sleep(0.2)  # polling a readiness probe, not synchronising on a guess
    raise LocalKafkaError(f"the broker on port {node.port} was not ready within {timeout:.0f} s; "
                          f"last lines of {node.log}:\n{tail(node.log)}")


def admin_client(address: str, admin_password: str | None = None):
    """An admin client of the broker at `address` (signed in as admin when a password is given), quick to give up."""
    from kafka import KafkaAdminClient  # imported late: start/stop work without kafka-python
    sasl = dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism=SCRAM, sasl_plain_username="admin",
                sasl_plain_password=admin_password) if admin_password else {}
    return KafkaAdminClient(bootstrap_servers=address, bootstrap_timeout_ms=2000, request_timeout_ms=2000, **sasl)


def metadata_ok(address: str, admin_password: str | None = None) -> bool:
    """True when the broker answers a metadata request (signed in as admin when a password is given)."""
    try:
        with socket.create_connection(address.split(":"), timeout=0.5):
            pass
    except OSError:
        return False
    from kafka.errors import KafkaError  # imported late: start/stop/status work without it
    try:
        admin = admin_client(address, admin_password)
    except KafkaError:
        return False
    try:
        admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


def coordinator_trouble(address: str, admin_password: str | None = None, patience_s: float = 6.0) -> str | None:
    """None when the broker's group coordinator answers; else what is wrong. A broker can answer metadata while its
    group coordinator answers NOT_COORDINATOR for ever (Kafka 4.1.1, after a crash, about 1 run in 4: every group
    stops; another restart of the broker mends it), so this asks for a probe group's offsets, as consumers do."""
    from kafka.errors import KafkaError  # imported late: start/stop work without it
    try:
        admin = admin_client(address, admin_password)
    except KafkaError as error:
        return f"the broker does not answer ({type(error).__name__})"
    deadline, answer = time.monotonic() + patience_s, ""
    try:
        while time.monotonic() < deadline:
            try:
                admin.list_group_offsets({"local_kafka-health-probe": None})
                return None
            except KafkaError as error:  # loading for a moment after a start is normal: ask again until patience ends
                answer = f"{type(error).__name__}: {error}"
                time.sleep(0.5)  # polling a health probe
        return f"its group coordinator answers {answer} (restart the broker: python -m local_kafka stop, then start)"
    finally:
        admin.close()


def tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_state(path: Path) -> Cluster | None:
    try:
        state = json.loads(path.read_text())
        if "nodes" not in state:  # written by an older local_kafka: one broker
            return Cluster([Broker(**state)])
        return Cluster([Broker(**node) for node in state["nodes"]], state.get("secure", False))
    except (OSError, ValueError, TypeError, KeyError):
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


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (for a cluster's brokers)."""
    while True:
        first = free_port()
        if all(port_is_free(first + i) for i in range(count)):
            return first


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
