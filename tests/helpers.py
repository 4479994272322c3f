"""Helpers the tests share: ports, processes, the CLI runner, heartbeats and waiting.

Fixtures live in conftest.py; tests import helpers from here, never from conftest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from confluent_kafka import Message

from kappa.kafka import broker as embedded
from kappa.processes import pid_alive

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")

__all__ = ["REPO", "pid_alive"]  # pid_alive is kappa's own: a zombie is not alive


# --- ports ---------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on now (also a closed port for "unreachable broker" tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, scanning up from $KAPPA_TEST_PORT_BASE
    (default 19300) so that test brokers stay in one known range; each pytest-xdist worker
    scans a range of its own, so two cannot pick one block before either binds it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    base = int(os.environ.get("KAPPA_TEST_PORT_BASE", "19300")) + 500 * (int(worker) if worker.isdigit() else 0)
    for first in range(base, base + 500 - count, count):
        if all(embedded._port_free(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports from {base}")


# --- waiting -------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def wait_for(produce: Callable[[], T | None], timeout: float, what: str, interval: float = 0.3) -> T:
    """Poll `produce` until it returns something truthy, and return that; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = produce()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


# --- processes -----------------------------------------------------------------------------------


def start_load(
    kappa, path: Path, topic: str, key: str, *extra: str, temp_dir: Path | None = None, stdin: bool = False
) -> subprocess.Popen:
    """A `kappa load` of `path` (fed on stdin when `stdin`) left running, its output piped; its
    temporary files in `temp_dir` when given."""
    env = {**os.environ, "TMPDIR": str(temp_dir)} if temp_dir is not None else None
    with open(path, "rb") if stdin else open(os.devnull, "rb") as feed:
        return subprocess.Popen(
            kappa_command("load", "-" if stdin else str(path), "--key", key, "--topic", topic, *extra, *kappa.args()),
            stdin=feed,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )


def wait_for_progress(load: subprocess.Popen) -> list[str]:
    """Block until the loader's progress shows rows on their way; returns the stderr lines so far."""
    lines = []
    while True:
        line = load.stderr.readline().decode()
        assert line, f"the load ended before showing progress (exit {load.wait()}): {''.join(lines)}"
        lines.append(line)
        if re.search(r"load \S+ \[#*\s*\]", line):
            return lines


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@contextlib.contextmanager
def reaped(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """The process, killed on the way out if it still runs (a failed wait must not leave it behind)."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def kill_tree(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL a process started with `start_new_session=True`, its process group and every
    descendant (even one that left the group), and wait until they are gone."""
    below = descendants(process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=timeout)
    wait_until(lambda: not any(pid_alive(pid) for pid in below), timeout)


# --- the CLI -------------------------------------------------------------------------------------


def kappa_command(*args: str) -> list[str]:
    """argv that runs the `kappa` CLI of this checkout with this interpreter."""
    return [sys.executable, "-m", "kappa", *args]


def run_kappa(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    stdin: bytes | None = None,
    text: bool = False,
) -> subprocess.CompletedProcess:
    """Run the CLI to its end and capture its output (bytes unless `text`)."""
    return subprocess.run(
        kappa_command(*args), input=stdin, capture_output=True, env=env, timeout=timeout, cwd=REPO, text=text
    )


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
        result = run_kappa([*args, *self.args()], timeout=timeout, stdin=stdin)
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
        quota = ["--alter", "--add-config", f"consumer_byte_rate={bytes_per_s}"]
        entity = ["--entity-type", "clients", "--entity-name", client_id]
        command = ["java", "-cp", f"{libs}/*", "kafka.admin.ConfigCommand", "--bootstrap-server", self.broker]
        result = subprocess.run([*command, *quota, *entity], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"setting the quota failed:\n{result.stdout}\n{result.stderr}"
        return {**os.environ, "KAPPA_PYTHON": sys.executable, "KAPPA_FETCH_PARTITION_BYTES": "16384"}

    def replay_batch(self, topic: str, value: str, key: str, *extra: str, **kwargs):
        return self.run("replay", "--topic", topic, "--value", value, "--key", key, "--batch", *extra, **kwargs)


# --- the 3-node cluster -------------------------------------------------------------------------


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
        wait_until(lambda: not any(n.node_id == node_id and n.running for n in self.nodes()), 10, interval=0.05)

    def restart(self) -> None:
        """Start every node that is down; returns once all are registered again."""
        embedded.start(self.data_dir)

    def leaders(self, topics: list[str]) -> dict[int, int]:
        """How many partitions of `topics` each broker leads."""
        from kappa.kafka.admin import admin

        metadata = admin(self.address).list_topics(timeout=10)
        counts = {node.node_id: 0 for node in self.nodes()}
        for topic in topics:
            for partition in metadata.topics[topic].partitions.values():
                counts[partition.leader] = counts.get(partition.leader, 0) + 1
        return counts

    def busiest_leader(self, topics: list[str]) -> int:
        counts = self.leaders(topics)
        return max(counts, key=lambda node: (counts[node], -node))

    @contextlib.contextmanager
    def frozen(self, node_id: int) -> Iterator[None]:
        """`kill -STOP` of one node's JVM for the block (a stalled broker that still holds its
        connections and stays in the ISR until the controller fences it), `kill -CONT` after it."""
        node = next(node for node in self.nodes() if node.node_id == node_id)
        assert node.running and node.pid is not None, f"node {node_id} is not running"
        os.kill(node.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(node.pid, signal.SIGCONT)

    def transaction_coordinator(self, transactional_id: str) -> int | None:
        """The node that coordinates `transactional_id`'s transactions: the leader of its partition of
        `__transaction_state` (Java's String.hashCode, made non-negative as Kafka's Utils.abs does,
        modulo the partitions); None before any transaction made that topic."""
        from kappa.kafka.admin import admin, partition_count

        partitions = partition_count(self.address, "__transaction_state")
        if partitions is None:
            return None
        code = 0
        chars = transactional_id.encode("utf-16-be")  # Java's chars
        for at in range(0, len(chars), 2):
            code = (31 * code + int.from_bytes(chars[at : at + 2], "big")) & 0xFFFFFFFF
        signed = code - (1 << 32) if code >= 1 << 31 else code
        partition = 0 if signed == -(1 << 31) else abs(signed) % partitions
        metadata = admin(self.address).list_topics("__transaction_state", timeout=10)
        return metadata.topics["__transaction_state"].partitions[partition].leader

    def log_bytes(self, node_id: int, topic: str) -> int:
        """The bytes of `topic`'s log segments in one node's log dir: what that node has appended,
        committed or not (a consumer reads only below the high watermark)."""
        logs = embedded.node_paths(self.data_dir)[node_id - 1].logs
        return sum(segment.stat().st_size for segment in logs.glob(f"{topic}-*/*.log"))


def high_watermarks(broker: str, topic: str) -> dict[int, int]:
    """Each partition's high watermark: every record and marker the partition has committed,
    whether or not its transaction is (kappa.kafka.admin.high_watermarks)."""
    from kappa.kafka.admin import high_watermarks as of_partitions
    from kappa.kafka.admin import partition_count

    return of_partitions(broker, topic, partition_count(broker, topic) or 0)


def read_log(broker: str, topic: str, timeout: float = 120, stable: bool = False) -> list[Message]:
    """Every record of `topic` as a `read_committed` consumer (kcat, kappa's workers) reads it,
    up to each partition's high watermark when called: records of aborted transactions and the
    commit and abort markers are not records. Waits for a transaction still open below it
    (one a load killed outright left open: until the load runs again or the broker aborts it);
    `stable` reads only to the last stable offset, what is readable at once."""
    from kappa.kafka.admin import end_offsets, partition_count
    from kappa.kafka.reader import read_ranges

    ends = end_offsets(broker, topic, partition_count(broker, topic) or 0) if stable else high_watermarks(broker, topic)
    records: list[Message] = []
    ranges = {p: (0, end) for p, end in ends.items()}
    read_ranges(broker, topic, ranges, records.append, group="kappa-tests-read-log", stall_s=timeout, to_end=not stable)
    return records


# --- worker heartbeats ---------------------------------------------------------------------------


def read_heartbeats(run_dir: Path) -> list[dict]:
    """The heartbeat files a generation's worker processes keep under <data-dir>/run/<pipeline>/g<N>."""
    beats = []
    for path in sorted(run_dir.glob("process-*.json")):
        try:
            beats.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return beats


def imported_modules(stderr: str) -> list[str]:
    """The modules a process run with PYTHONPROFILEIMPORTTIME=1 imported, in order, from its stderr
    (an import refused by a finder is listed too, without its submodules)."""
    return [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
