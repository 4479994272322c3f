"""The embedded broker: a real single-node Apache Kafka (KRaft) on 127.0.0.1.

None of the Java code is ours. Maven resolves the pinned broker jars from Maven Central
(scripts/kafka/pom.xml) into a per-user cache; the broker's data, config, log and pid live
under <data-dir>/kafka so that `start` is idempotent and `stop` finds what it started.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kappa.errors import KappaError
from kappa.processes import pid_alive

KAFKA_VERSION = "4.1.0"
REPO_ROOT = Path(__file__).resolve().parents[1]
POM = Path(os.environ.get("KAPPA_KAFKA_POM", REPO_ROOT / "scripts" / "kafka" / "pom.xml"))
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0

LOG4J2 = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaServer
        level: INFO
      - name: kafka.server.BrokerServer
        level: INFO
"""


@dataclass(frozen=True)
class BrokerPaths:
    home: Path

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def config(self) -> Path:
        return self.home / "server.properties"

    @property
    def pid(self) -> Path:
        return self.home / "broker.pid"

    @property
    def port(self) -> Path:
        return self.home / "broker.port"

    @property
    def output(self) -> Path:
        return self.home / "broker.log"

    @property
    def protocol(self) -> Path:
        return self.home / "broker.protocol"


def jar_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("KAPPA_KAFKA_LIBS", base / "kappa" / f"kafka-{KAFKA_VERSION}"))


def resolve_jars() -> Path:
    """Copy the broker's jars out of Maven's repository once; later starts reuse them."""
    libs = jar_cache()
    done = libs / ".resolved"
    if done.exists():
        return libs
    if shutil.which("mvn") is None:
        raise KappaError(
            "mvn not found: the embedded broker's jars come from Maven Central; install Maven (apt-get install maven)"
        )
    if not POM.exists():
        raise KappaError(f"broker pom not found at {POM}: run from a kappa checkout or set KAPPA_KAFKA_POM")
    libs.mkdir(parents=True, exist_ok=True)
    print(f"resolving Apache Kafka {KAFKA_VERSION} jars with Maven (first start only)...", flush=True)
    result = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={libs}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line] or ["(no output)"]
        raise KappaError(f"Maven could not resolve the Kafka {KAFKA_VERSION} jars: {lines[0].strip()[:300]}")
    done.touch()
    return libs


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int, timeout: float, protocol: str = "PLAINTEXT") -> bool:
    from kappa.admin import wait_until_reachable

    overrides: dict[str, str] = {"security.protocol": protocol}
    if protocol == "SASL_PLAINTEXT":
        username, password = sasl_credentials()
        overrides.update({"sasl.mechanism": "PLAIN", "sasl.username": username, "sasl.password": password})
    try:
        wait_until_reachable(f"127.0.0.1:{port}", timeout=timeout, **overrides)
    except KappaError:
        return False
    return True


def sasl_credentials() -> tuple[str, str]:
    """The one SASL/PLAIN user of the embedded broker: the same variables clients use."""
    username, password = os.environ.get("KAPPA_SASL_USERNAME"), os.environ.get("KAPPA_SASL_PASSWORD")
    if not username or not password:
        raise KappaError("--sasl needs KAPPA_SASL_USERNAME and KAPPA_SASL_PASSWORD in the environment")
    if any(c in username + password for c in '"\\\n'):
        raise KappaError("KAPPA_SASL_USERNAME and KAPPA_SASL_PASSWORD may not contain quotes, backslashes or newlines")
    if not username.replace("-", "").replace("_", "").isalnum():
        raise KappaError("KAPPA_SASL_USERNAME may hold letters, digits, '-' and '_' only")
    return username, password


def _listener_properties(protocol: str, port: int, controller_port: int) -> list[str]:
    lines = [
        f"listeners={protocol}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners={protocol}://127.0.0.1:{port}",
        "controller.listener.names=CONTROLLER",
        f"inter.broker.listener.name={protocol}",
        f"listener.security.protocol.map={protocol}:{protocol},CONTROLLER:PLAINTEXT",
    ]
    if protocol == "SASL_PLAINTEXT":
        username, password = sasl_credentials()
        lines += [
            "sasl.enabled.mechanisms=PLAIN",
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config="
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{username}" password="{password}" user_{username}="{password}";',
        ]
    return lines


def _server_properties(paths: BrokerPaths, port: int, controller_port: int, protocol: str) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            *_listener_properties(protocol, port, controller_port),
            f"log.dirs={paths.logs}",
            "num.partitions=8",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "message.max.bytes=10485760",
            "",
        ]
    )


def running_port(data_dir: Path) -> int | None:
    """The port of a live broker started from `data_dir`, else None."""
    paths = BrokerPaths(data_dir / "kafka")
    pid = _read_int(paths.pid)
    if pid is None or not pid_alive(pid):
        return None
    return _read_int(paths.port)


def start(data_dir: Path, port: int = 9092, sasl: bool = False) -> str:
    """Start the broker unless it already runs; return its address once it answers metadata.

    With `sasl`, the client listener requires SASL/PLAIN (the user from KAPPA_SASL_USERNAME
    and KAPPA_SASL_PASSWORD); the controller listener is internal. Both bind 127.0.0.1 only.
    """
    paths = BrokerPaths(data_dir / "kafka")
    protocol = "SASL_PLAINTEXT" if sasl else "PLAINTEXT"
    current = running_port(data_dir)
    if current is not None:
        if _answers(current, timeout=15, protocol=_running_protocol(paths)):
            return f"127.0.0.1:{current}"
        raise KappaError(
            f"a broker process from {paths.home} is running (pid file {paths.pid}) but does not answer on "
            f"127.0.0.1:{current}: run `kappa kafka stop` and start again; its log is {paths.output}"
        )
    java = shutil.which("java")
    if java is None:
        raise KappaError("java not found: the embedded Kafka broker needs Java 17+; install openjdk-17-jre-headless")
    if not _port_free(port):
        raise KappaError(f"port {port} on 127.0.0.1 is already in use: pass --port P, or stop what listens there")
    libs = resolve_jars()
    paths.logs.mkdir(parents=True, exist_ok=True)
    (paths.home / "log4j2.yaml").write_text(LOG4J2)
    paths.config.write_text(_server_properties(paths, port, _free_port(), protocol))
    paths.config.chmod(0o600)  # it may hold the SASL password
    paths.protocol.write_text(protocol)
    classpath = f"{libs}/*"
    jvm = [
        java,
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseG1GC",
        f"-Dlog4j2.configurationFile={paths.home / 'log4j2.yaml'}",
        "-cp",
        classpath,
    ]
    if not (paths.logs / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        formatted = subprocess.run(
            # `=` form: a base64 id may start with "-", which argparse would take for an option
            [*jvm, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(paths.config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if formatted.returncode != 0:
            reason = (formatted.stderr or formatted.stdout).strip()[-300:]
            raise KappaError(f"formatting Kafka storage in {paths.logs} failed: {reason}")
    with open(paths.output, "ab") as log:
        process = subprocess.Popen(
            [*jvm, "kafka.Kafka", str(paths.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    paths.pid.write_text(str(process.pid))
    paths.port.write_text(str(port))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            paths.pid.unlink(missing_ok=True)
            raise KappaError(
                f"the Kafka broker exited with code {process.returncode} while starting: {_tail(paths.output)}"
            )
        if _answers(port, timeout=2, protocol=protocol):
            return f"127.0.0.1:{port}"
        time.sleep(0.3)
    _terminate(process.pid)
    paths.pid.unlink(missing_ok=True)
    raise KappaError(f"the Kafka broker did not answer within {START_TIMEOUT_S:g}s; see {paths.output}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:])[-600:]


def _terminate(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM lets Kafka shut down cleanly; SIGKILL only if it will not."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(data_dir: Path) -> bool:
    """Stop the broker started from `data_dir`; False when none was running."""
    paths = BrokerPaths(data_dir / "kafka")
    pid = _read_int(paths.pid)
    if pid is None or not pid_alive(pid):
        paths.pid.unlink(missing_ok=True)
        return False
    _terminate(pid)
    paths.pid.unlink(missing_ok=True)
    return True


def _running_protocol(paths: BrokerPaths) -> str:
    try:
        return paths.protocol.read_text().strip() or "PLAINTEXT"
    except OSError:
        return "PLAINTEXT"


def status(data_dir: Path) -> dict:
    paths = BrokerPaths(data_dir / "kafka")
    port = running_port(data_dir)
    return {
        "running": port is not None,
        "address": f"127.0.0.1:{port}" if port else None,
        "protocol": _running_protocol(paths),
        "answers": bool(port) and _answers(port, timeout=3, protocol=_running_protocol(paths)),
        "pid": _read_int(paths.pid) if port else None,
        "home": str(paths.home),
        "version": KAFKA_VERSION,
    }
