"""The official Zipkin server from Maven Central, for machines without Docker: a trace UI and API on one port.

The jar (`io.zipkin:zipkin-server:3.5.1`, classifier `exec`, about 130 MB) is fetched by Maven once into ~/.m2; the
server keeps its spans in memory. Run it with `python -m local_zipkin start|stop|status [--port P] [--dir D]`.
"""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from local_kafka import LocalKafkaError, find_java, is_alive as alive

ZIPKIN_VERSION = "3.5.1"
ARTIFACT = f"io.zipkin:zipkin-server:{ZIPKIN_VERSION}:jar:exec"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".local_zipkin"


class LocalZipkinError(LocalKafkaError):
    """A failure with a one-line explanation for the user."""


@dataclass
class Zipkin:
    pid: int
    port: int
    log: str

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans_endpoint(self) -> str:
        """Where exporters send spans (OTEL_EXPORTER_ZIPKIN_ENDPOINT)."""
        return f"{self.address}/api/v2/spans"


def start(port: int = 9411, data_dir: Path | None = None, timeout: float = 120.0) -> tuple[Zipkin, bool]:
    """Start Zipkin on `port` unless the one in data_dir runs already; returns (it, whether started now)."""
    data_dir = (data_dir or DEFAULT_DIR).resolve()
    running = status(data_dir)
    if running:
        return running, False
    if healthy(port):
        raise LocalZipkinError(f"port {port} is taken by another Zipkin (or another server); give --port")
    try:
        java = find_java()
    except LocalKafkaError as error:  # (the shared check speaks of Kafka)
        raise LocalZipkinError(str(error).replace("to run Kafka", "to run Zipkin")) from None
    jar = resolve_jar()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "zipkin.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([java, "-Xms128m", "-Xmx512m", "-jar", str(jar)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, QUERY_PORT=str(port), STORAGE_TYPE="mem"))
    zipkin = Zipkin(process.pid, port, str(log_path))
    (data_dir / "zipkin.json").write_text(json.dumps(zipkin.__dict__))
    deadline = time.monotonic() + timeout
    while not healthy(port):
        if process.poll() is not None:
            raise LocalZipkinError(f"Zipkin exited with code {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            stop(data_dir)
            raise LocalZipkinError(f"Zipkin did not answer on port {port} within {timeout:.0f} s; see {log_path}")
        time.sleep(0.5)  # (a readiness probe: its health endpoint)
    return zipkin, True


def stop(data_dir: Path | None = None, timeout: float = 30.0) -> Zipkin | None:
    """Stop the Zipkin started from data_dir; returns it, or None if none ran."""
    data_dir = (data_dir or DEFAULT_DIR).resolve()
    zipkin = status(data_dir)
    if zipkin is None:
        return None
    os.kill(zipkin.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(zipkin.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(zipkin.pid):
        os.kill(zipkin.pid, signal.SIGKILL)
    (data_dir / "zipkin.json").unlink(missing_ok=True)
    return zipkin


def status(data_dir: Path | None = None) -> Zipkin | None:
    """The Zipkin started from data_dir, if its process still runs."""
    saved = (data_dir or DEFAULT_DIR).resolve() / "zipkin.json"
    if not saved.exists():
        return None
    zipkin = Zipkin(**json.loads(saved.read_text()))
    return zipkin if alive(zipkin.pid) and ours(zipkin.pid) else None


def ours(pid: int) -> bool:
    """Whether the process is a Zipkin server (a pid left in zipkin.json may since belong to another process)."""
    try:
        return b"zipkin-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def healthy(port: int) -> bool:
    """True if a Zipkin answers its health check on 127.0.0.1:port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def resolve_jar() -> Path:
    """The server jar in the local Maven repository, fetched by Maven the first time."""
    jar = Path.home() / ".m2" / "repository" / "io" / "zipkin" / "zipkin-server" / ZIPKIN_VERSION / \
        f"zipkin-server-{ZIPKIN_VERSION}-exec.jar"
    if jar.exists():
        return jar
    mvn = shutil.which("mvn")
    if not mvn:
        raise LocalZipkinError("Maven ('mvn') is needed once to fetch the Zipkin server from Maven Central, but it is "
                               "not on PATH")
    result = subprocess.run([mvn, "-B", "-q", "dependency:get", f"-Dartifact={ARTIFACT}", "-Dtransitive=false"],
                            capture_output=True, text=True)
    if result.returncode != 0 or not jar.exists():
        last = " | ".join(line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line)[:500]
        raise LocalZipkinError(f"could not fetch {ARTIFACT} with Maven: {last or 'see mvn output'}")
    return jar
