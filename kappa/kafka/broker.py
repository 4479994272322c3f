"""The embedded broker: a real Apache Kafka (KRaft) on 127.0.0.1, one node or a cluster.

None of the Java code is ours. Maven resolves the pinned broker jars from Maven Central
(scripts/kafka/pom.xml) into a per-user cache; the broker's data, config, log and pid live
under <data-dir>/kafka so that `start` is idempotent and `stop` finds what it started.

A cluster (`nodes` > 1) is that many combined broker+controller nodes from the same jars,
one directory each under <data-dir>/kafka/node-<id>, with client listeners on consecutive
ports from the first one and controller listeners right after them. It replicates like a
production cluster: every topic's default replication factor is the node count, and a write
with acks=all needs all but one replica (at three nodes or more), so one node can die.
"""

from __future__ import annotations

import base64
import hashlib
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
REPO_ROOT = Path(__file__).resolve().parents[2]  # kappa/kafka/broker.py -> the checkout


def _env_path(name: str) -> Path | None:
    """A path from the environment; set but empty counts as unset (not as the current directory)."""
    value = os.environ.get(name)
    return Path(value) if value else None


POM = _env_path("KAPPA_KAFKA_POM") or REPO_ROOT / "scripts" / "kafka" / "pom.xml"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
MAX_NODES = 9
SINGLE_NODE_HEAP = "-Xmx1g"
# three cluster JVMs must fit beside everything else on a laptop
CLUSTER_NODE_HEAP = "-Xmx768m"

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

    @property
    def temp(self) -> Path:
        """The JVM's java.io.tmpdir. It unpacks native libraries there (lz4's, for the compressed
        batches kappa sends) and removes them only on a clean exit: in /tmp, every kill -9 of a
        broker left its copies behind for good. Here the next start of this node clears them."""
        return self.home / "tmp"


def kafka_home(data_dir: Path) -> Path:
    return data_dir / "kafka"


def _cluster_marker(data_dir: Path) -> Path:
    """Present only in a cluster's home; holds the node count."""
    return kafka_home(data_dir) / "cluster.nodes"


def recorded_nodes(data_dir: Path) -> int:
    """How many nodes the broker of `data_dir` was made with (1 unless it is a cluster)."""
    return _read_int(_cluster_marker(data_dir)) or 1


def node_paths(data_dir: Path) -> list[BrokerPaths]:
    """Every node's paths, node 1 first. A single node lives in <data-dir>/kafka itself, as it
    always has, so existing data dirs keep working."""
    count = recorded_nodes(data_dir)
    if count == 1:
        return [BrokerPaths(kafka_home(data_dir))]
    return [BrokerPaths(kafka_home(data_dir) / f"node-{node}") for node in range(1, count + 1)]


def jar_cache() -> Path:
    """Where the broker's jars are kept ($KAPPA_KAFKA_LIBS, else the user's cache): named after
    the Kafka version and the pom's digest, so that a changed pom (another log4j, say) resolves
    into a directory of its own instead of reusing the old jars, or mixing with them."""
    explicit = _env_path("KAPPA_KAFKA_LIBS")
    if explicit is not None:
        return explicit
    base = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return base / "kappa" / f"kafka-{KAFKA_VERSION}-{hashlib.sha256(_pom().read_bytes()).hexdigest()[:12]}"


def _pom() -> Path:
    if not POM.is_file():
        raise KappaError(
            f"the embedded broker's pom is not at {POM}: kappa runs from its checkout (make venv installs it "
            "editable there); set KAPPA_KAFKA_POM to scripts/kafka/pom.xml of a checkout, or KAPPA_KAFKA_LIBS to a "
            "directory of jars already resolved"
        )
    return POM


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
    pom = _pom()
    libs.mkdir(parents=True, exist_ok=True)
    print(f"resolving Apache Kafka {KAFKA_VERSION} jars with Maven (first start only)...", flush=True)
    result = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={libs}"],
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
    from kappa.kafka.admin import wait_until_reachable

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


@dataclass(frozen=True)
class Topology:
    """Where one node listens and whom it votes with; its own `node_id` among `nodes`."""

    node_id: int
    nodes: int
    port: int
    controller_port: int
    voters: str

    @classmethod
    def single(cls, port: int, controller_port: int) -> "Topology":
        return cls(1, 1, port, controller_port, f"1@127.0.0.1:{controller_port}")

    @classmethod
    def cluster(cls, node_id: int, nodes: int, base_port: int) -> "Topology":
        """Client ports base .. base+n-1, controller ports base+n .. base+2n-1."""
        voters = ",".join(f"{n}@127.0.0.1:{base_port + nodes + n - 1}" for n in range(1, nodes + 1))
        return cls(node_id, nodes, base_port + node_id - 1, base_port + nodes + node_id - 1, voters)


def replication_properties(nodes: int) -> list[str]:
    """Replicate everything on every node, and let one node be down at three or more.

    min.insync.replicas = RF - 1 keeps acks=all writes going with one replica down while a
    write still lands on two brokers; below three nodes that would be one copy, so it is 1.
    """
    min_insync = nodes - 1 if nodes >= 3 else 1
    return [
        f"default.replication.factor={nodes}",
        f"min.insync.replicas={min_insync}",
        f"offsets.topic.replication.factor={nodes}",
        f"transaction.state.log.replication.factor={nodes}",
        f"transaction.state.log.min.isr={min_insync}",
        f"share.coordinator.state.topic.replication.factor={nodes}",
        f"share.coordinator.state.topic.min.isr={min_insync}",
    ]


def _server_properties(paths: BrokerPaths, topology: Topology, protocol: str) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            f"node.id={topology.node_id}",
            f"controller.quorum.voters={topology.voters}",
            *_listener_properties(protocol, topology.port, topology.controller_port),
            f"log.dirs={paths.logs}",
            "num.partitions=8",
            "offsets.topic.num.partitions=8",
            *replication_properties(topology.nodes),
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "message.max.bytes=10485760",
            "",
        ]
    )


def _alive(pid: int) -> bool:
    """pid_alive, after reaping it if it is our own exited child (a zombie still has a pid)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return pid_alive(pid)


@dataclass(frozen=True)
class NodeState:
    """One node as its files and the process table tell it: what `status` shows and tests kill."""

    node_id: int
    home: Path
    port: int | None
    pid: int | None
    running: bool

    @property
    def address(self) -> str | None:
        return f"127.0.0.1:{self.port}" if self.port else None


def nodes(data_dir: Path) -> list[NodeState]:
    """Every node of the broker made in `data_dir` (stopped ones too), node 1 first."""
    states = []
    for node_id, paths in enumerate(node_paths(data_dir), start=1):
        pid = _read_int(paths.pid)
        running = pid is not None and _alive(pid)
        states.append(NodeState(node_id, paths.home, _read_int(paths.port), pid if running else None, running))
    return states


def running_port(data_dir: Path) -> int | None:
    """The client port of a live broker started from `data_dir` (a cluster's first live node), else None."""
    return next((node.port for node in nodes(data_dir) if node.running), None)


def bootstrap(data_dir: Path) -> str:
    """Every node's client address: clients still find the cluster while any one node is up."""
    return ",".join(node.address for node in nodes(data_dir) if node.address)


def _check_layout(data_dir: Path, port: int | None, count: int | None) -> None:
    """Refuse a start whose --port or --nodes disagrees with what already runs from `data_dir`.

    Starting is idempotent, so a running broker answers `start`; but when it runs on another
    port or with another node count than asked, saying "up" would hide that the request was
    ignored.
    """
    running = [node for node in nodes(data_dir) if node.running]
    home = kafka_home(data_dir)
    recorded = recorded_nodes(data_dir)
    formatted = any((paths.logs / "meta.properties").exists() for paths in node_paths(data_dir))
    if count is not None and count != recorded and (running or formatted):
        raise KappaError(
            f"the broker in {home} was made with {recorded} node(s), not {count}: use another --data-dir "
            f"for a {count}-node broker, or stop it and delete {home} to remake it"
        )
    if port is not None and running:
        first = nodes(data_dir)[0].port
        if first is not None and first != port:
            raise KappaError(
                f"kafka from {home} already runs on 127.0.0.1:{first}, not on port {port}: leave out --port to "
                f"use it, or run `kappa kafka stop` first to restart it on {port}"
            )


def start(data_dir: Path, port: int | None = None, sasl: bool = False, nodes: int | None = None) -> str:
    """Start the broker (every node of a cluster) unless it runs; return its bootstrap address
    once it answers metadata with every node registered.

    `port` is the (first) client port: 9092 unless the data dir already has a broker, whose
    port is kept. `nodes` is 1 unless the data dir already holds a cluster. Nodes that died
    are started again, so `start` also repairs a cluster after a node was killed.

    With `sasl`, the client listener requires SASL/PLAIN (the user from KAPPA_SASL_USERNAME
    and KAPPA_SASL_PASSWORD); the controller listener is internal. Both bind 127.0.0.1 only.
    """
    if nodes is not None and not 1 <= nodes <= MAX_NODES:
        raise KappaError(f"--nodes must be between 1 and {MAX_NODES}, got {nodes}")
    _check_layout(data_dir, port, nodes)
    count = nodes if nodes is not None else recorded_nodes(data_dir)
    if count == 1:
        return _start_single(data_dir, port, sasl)
    return _start_cluster(data_dir, port, sasl, count)


def _start_single(data_dir: Path, port: int | None, sasl: bool) -> str:
    paths = BrokerPaths(kafka_home(data_dir))
    protocol = "SASL_PLAINTEXT" if sasl else "PLAINTEXT"
    current = running_port(data_dir)
    if current is not None:
        if _answers(current, timeout=15, protocol=_running_protocol(paths)):
            return f"127.0.0.1:{current}"
        raise KappaError(
            f"a broker process from {paths.home} is running (pid file {paths.pid}) but does not answer on "
            f"127.0.0.1:{current}: run `kappa kafka stop` and start again; its log is {paths.output}"
        )
    port = port if port is not None else (_read_int(paths.port) or DEFAULT_PORT)  # a stopped broker keeps its port
    java = _java()
    if not _port_free(port):
        raise KappaError(f"port {port} on 127.0.0.1 is already in use: pass --port P, or stop what listens there")
    libs = resolve_jars()
    topology = Topology.single(port, _free_port())
    process = _launch(java, libs, paths, topology, protocol, SINGLE_NODE_HEAP, cluster_id=None)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        _fail_if_exited(process, paths)
        if _answers(port, timeout=2, protocol=protocol):
            return f"127.0.0.1:{port}"
        time.sleep(0.3)
    _terminate(process.pid)
    paths.pid.unlink(missing_ok=True)
    raise KappaError(f"the Kafka broker did not answer within {START_TIMEOUT_S:g}s; see {paths.output}")


DEFAULT_PORT = 9092


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise KappaError("java not found: the embedded Kafka broker needs Java 17+; install openjdk-17-jre-headless")
    return java


def _cluster_id(data_dir: Path) -> str:
    """One id for every node of a cluster, made once: nodes formatted with different ids
    refuse to form a quorum."""
    path = kafka_home(data_dir) / "cluster.id"
    try:
        return path.read_text().strip()
    except OSError:
        pass
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cluster_id)
    return cluster_id


def _start_cluster(data_dir: Path, port: int | None, sasl: bool, count: int) -> str:
    protocol = "SASL_PLAINTEXT" if sasl else "PLAINTEXT"
    states = nodes(data_dir) if recorded_nodes(data_dir) == count else []
    known = states[0].port if states and states[0].port else None
    base = port if port is not None else (known or DEFAULT_PORT)
    home = kafka_home(data_dir)
    home.mkdir(parents=True, exist_ok=True)
    _cluster_marker(data_dir).write_text(str(count))
    running = {state.node_id for state in nodes(data_dir) if state.running}
    if running:
        protocol = _running_protocol(node_paths(data_dir)[min(running) - 1])
    to_start = [node for node in range(1, count + 1) if node not in running]
    if to_start:
        java, libs = _java(), resolve_jars()
        taken = [
            p
            for node in to_start
            for p in (Topology.cluster(node, count, base).port, Topology.cluster(node, count, base).controller_port)
            if not _port_free(p)
        ]
        if taken:
            raise KappaError(
                f"port(s) {', '.join(map(str, taken))} on 127.0.0.1 are already in use; a {count}-node cluster "
                f"on --port {base} needs ports {base}-{base + 2 * count - 1}: pass another --port P"
            )
        cluster_id = _cluster_id(data_dir)
        launched = {
            node: _launch(
                java,
                libs,
                node_paths(data_dir)[node - 1],
                Topology.cluster(node, count, base),
                protocol,
                CLUSTER_NODE_HEAP,
                cluster_id,
            )
            for node in to_start
        }
    else:
        launched = {}
    address = bootstrap(data_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    registered: int | None = None
    while time.monotonic() < deadline:
        for node, process in launched.items():
            _fail_if_exited(process, node_paths(data_dir)[node - 1])
        registered = registered_brokers(address, protocol, timeout=2)
        if registered == count:
            return address
        time.sleep(0.3)
    for node, process in launched.items():
        _terminate(process.pid)
        node_paths(data_dir)[node - 1].pid.unlink(missing_ok=True)
    raise KappaError(
        f"the {count}-node Kafka cluster did not register every node within {START_TIMEOUT_S:g}s "
        f"({registered or 0} answered); see the broker.log files under {home}"
    )


def registered_brokers(address: str, protocol: str = "PLAINTEXT", timeout: float = 5.0) -> int | None:
    """How many brokers the cluster at `address` lists, or None when it does not answer."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from kappa.kafka.admin import client_config

    overrides: dict[str, str] = {"security.protocol": protocol}
    if protocol == "SASL_PLAINTEXT":
        username, password = sasl_credentials()
        overrides.update({"sasl.mechanism": "PLAIN", "sasl.username": username, "sasl.password": password})
    try:
        return len(AdminClient(client_config(address, **overrides)).list_topics(timeout=timeout).brokers)
    except KafkaException:
        return None


def _launch(
    java: str, libs: Path, paths: BrokerPaths, topology: Topology, protocol: str, heap: str, cluster_id: str | None
) -> subprocess.Popen:
    """Write one node's config, format its storage on first use, and start its JVM."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    (paths.home / "log4j2.yaml").write_text(LOG4J2)
    paths.config.write_text(_server_properties(paths, topology, protocol))
    paths.config.chmod(0o600)  # it may hold the SASL password
    paths.protocol.write_text(protocol)
    shutil.rmtree(paths.temp, ignore_errors=True)  # what a JVM of this node killed outright left
    paths.temp.mkdir()
    jvm = [
        java,
        "-Xms256m",
        heap,
        "-XX:+UseG1GC",
        f"-Djava.io.tmpdir={paths.temp}",
        f"-Dlog4j2.configurationFile={paths.home / 'log4j2.yaml'}",
        "-cp",
        f"{libs}/*",
    ]
    if not (paths.logs / "meta.properties").exists():
        cluster_id = cluster_id or base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
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
    paths.port.write_text(str(topology.port))
    return process


def _fail_if_exited(process: subprocess.Popen, paths: BrokerPaths) -> None:
    if process.poll() is not None:
        paths.pid.unlink(missing_ok=True)
        raise KappaError(
            f"the Kafka broker in {paths.home} exited with code {process.returncode} while starting: "
            f"{_tail(paths.output)}"
        )


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
    """Stop every node started from `data_dir`; False when none was running.

    All nodes get SIGTERM at once: stopped one by one, the last nodes of a cluster would
    wait for a quorum that is already gone.
    """
    live = [node for node in nodes(data_dir) if node.running and node.pid is not None]
    for paths in node_paths(data_dir):
        if not any(node.home == paths.home for node in live):
            paths.pid.unlink(missing_ok=True)
    if not live:
        return False
    _terminate_all([node.pid for node in live if node.pid is not None])
    for node in live:
        BrokerPaths(node.home).pid.unlink(missing_ok=True)
    return True


def _terminate_all(pids: list[int], timeout: float = STOP_TIMEOUT_S) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _running_protocol(paths: BrokerPaths) -> str:
    try:
        return paths.protocol.read_text().strip() or "PLAINTEXT"
    except OSError:
        return "PLAINTEXT"


def status(data_dir: Path) -> dict:
    states = nodes(data_dir)
    paths = BrokerPaths(states[0].home)
    protocol = _running_protocol(paths)
    live = [node for node in states if node.running]
    address = ",".join(node.address for node in live if node.address) or None
    if len(states) == 1:
        answers = bool(address) and live[0].port is not None and _answers(live[0].port, timeout=3, protocol=protocol)
        registered = 1 if answers else 0
    else:
        registered = (registered_brokers(address, protocol, timeout=3) or 0) if address else 0
        answers = registered > 0
    return {
        "running": bool(live),
        "address": address,
        "protocol": protocol,
        "answers": answers,
        "pid": live[0].pid if live else None,
        "home": str(kafka_home(data_dir)),
        "version": KAFKA_VERSION,
        "registered": registered,
        "nodes": [
            {"node": node.node_id, "address": node.address, "pid": node.pid, "running": node.running} for node in states
        ],
    }
