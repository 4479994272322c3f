"""One real Kafka broker for the whole session (and a 3-node cluster for the tests that ask
for it); every test gets its own topics and dirs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from kappa import broker as embedded

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, scanning up from $KAPPA_TEST_PORT_BASE
    (default 19300) so that test brokers stay in one known range."""
    base = int(os.environ.get("KAPPA_TEST_PORT_BASE", "19300"))
    for first in range(base, base + 2000, count):
        if all(embedded._port_free(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports from {base}")


@dataclass
class Cluster:
    """The session's 3-node cluster: its address, and node control for fault tests."""

    address: str
    data_dir: Path

    def nodes(self) -> list[embedded.NodeState]:
        return embedded.nodes(self.data_dir)

    def kill(self, node_id: int) -> None:
        """kill -9 of one node's JVM, as a crash would."""
        node = next(node for node in self.nodes() if node.node_id == node_id)
        assert node.running and node.pid is not None, f"node {node_id} is not running"
        os.kill(node.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(n.node_id == node_id and n.running for n in self.nodes()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        """Start every node that is down; returns once all are registered again."""
        embedded.start(self.data_dir)

    def leaders(self, topics: list[str]) -> dict[int, int]:
        """How many partitions of `topics` each broker leads."""
        from kappa.admin import admin

        metadata = admin(self.address).list_topics(timeout=10)
        counts = {node.node_id: 0 for node in self.nodes()}
        for topic in topics:
            for partition in metadata.topics[topic].partitions.values():
                counts[partition.leader] = counts.get(partition.leader, 0) + 1
        return counts

    def busiest_leader(self, topics: list[str]) -> int:
        counts = self.leaders(topics)
        return max(counts, key=lambda node: (counts[node], -node))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    """A 3-node KRaft cluster (RF 3, min.insync.replicas 2) for the whole session; tests that
    kill nodes restart them before they end."""
    data_dir = tmp_path_factory.mktemp("cluster")
    address = embedded.start(data_dir, free_port_block(6), nodes=3)
    try:
        yield Cluster(address, data_dir)
    finally:
        embedded.stop(data_dir)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> str:
    """The broker address: $KAPPA_TEST_BROKER if set, else an embedded broker for this session."""
    external = os.environ.get("KAPPA_TEST_BROKER")
    if external:
        yield external
        return
    data_dir = tmp_path_factory.mktemp("broker")
    address = embedded.start(data_dir, free_port())
    try:
        yield address
    finally:
        embedded.stop(data_dir)


@dataclass
class Kappa:
    """Runs the `kappa` CLI as a user would, against the session broker, in this test's dirs."""

    broker: str
    data_dir: Path
    snapshot_dir: Path
    name: str

    def topic(self, suffix: str = "") -> str:
        return f"{self.name}{suffix}-{uuid.uuid4().hex[:6]}"

    def args(self) -> list[str]:
        return ["--broker", self.broker, "--data-dir", str(self.data_dir), "--snapshot-dir", str(self.snapshot_dir)]

    def run(self, *args: str, check: bool = True, timeout: float = 300, stdin: bytes | None = None):
        result = subprocess.run(
            [sys.executable, "-m", "kappa", *args, *self.args()],
            input=stdin,
            capture_output=True,
            timeout=timeout,
            cwd=REPO,
        )
        if check and result.returncode != 0:
            output = f"{result.stdout.decode()}\n{result.stderr.decode()}"
            raise AssertionError(f"kappa {' '.join(args)} exited {result.returncode}:\n{output}")
        return result

    def load(self, path: Path | str, key: str, topic: str, partitions: int = 8, **kwargs):
        return self.run("load", str(path), "--key", key, "--topic", topic, "--partitions", str(partitions), **kwargs)

    def paced_replay_env(self, client_id: str, bytes_per_s: int) -> dict[str, str]:
        """Pace a generation's consumer with a real broker quota, so a test can act midway through a replay.

        The quota alone would not do: one 16 MiB fetch takes a small topic whole, so the
        returned environment also makes each fetch small.
        """
        libs = embedded.resolve_jars()
        command = [
            "java", "-cp", f"{libs}/*", "kafka.admin.ConfigCommand", "--bootstrap-server", self.broker,
            "--alter", "--add-config", f"consumer_byte_rate={bytes_per_s}",
            "--entity-type", "clients", "--entity-name", client_id,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"setting the quota failed:\n{result.stdout}\n{result.stderr}"
        return {**os.environ, "KAPPA_PYTHON": sys.executable, "KAPPA_FETCH_PARTITION_BYTES": "16384"}

    def replay_batch(self, topic: str, value: str, key: str, *extra: str, **kwargs):
        return self.run("replay", "--topic", topic, "--value", value, "--key", key, "--batch", *extra, **kwargs)


@pytest.fixture
def kappa(kafka, tmp_path, request) -> Kappa:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return Kappa(kafka, tmp_path / "data", tmp_path / "snapshots", name)


@pytest.fixture
def cluster_kappa(cluster, tmp_path, request) -> Kappa:
    """Like `kappa`, against the 3-node cluster; any node a test killed is started again."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    yield Kappa(cluster.address, tmp_path / "data", tmp_path / "snapshots", name)
    if not all(node.running for node in cluster.nodes()):
        cluster.restart()


@pytest.fixture
def live(kappa):
    """Start `kappa worker` supervisors for this test; every one is killed at teardown."""
    from kappa.admin import ensure_topic
    from tests.live import kill_group, start_worker

    started = []

    def run(topic: str, partitions: int, processes: int = 2, interval: float = 1.0, value: str = "amount"):
        ensure_topic(kappa.broker, topic, partitions)
        worker = start_worker(kappa, topic, value, "city", processes, interval)
        worker.partitions = partitions
        started.append(worker)
        return worker

    yield run
    for worker in started:
        kill_group(worker)
