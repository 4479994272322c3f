"""Helpers for tests that run `kappa worker`: start it, wait for a caught-up snapshot, stop it."""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pandas as pd

from kappa.kafka.admin import end_offsets
from tests.datagen import pandas_expectation, sample_frame
from tests.helpers import REPO, Kappa, kappa_command, kill_tree, pid_alive, read_heartbeats
from tests.oracle import assert_matches, read_latest


@dataclass
class LiveWorker:
    kappa: Kappa
    topic: str
    process: subprocess.Popen
    log: Path
    partitions: int
    rows: list[pd.DataFrame] = field(default_factory=list)

    def heartbeats(self) -> list[dict]:
        return read_heartbeats(self.kappa.data_dir / "run" / self.topic / "g1")

    def child_pids(self) -> set[int]:
        listing = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return {int(pid) for pid in listing.split()}

    def wait_caught_up(self, timeout: float = 180, running: bool = True) -> dict:
        """The latest manifest once its offsets equal the log's end offsets (lag 0)."""
        deadline = time.monotonic() + timeout
        ends = {str(p): o for p, o in end_offsets(self.kappa.broker, self.topic, self.partitions).items()}
        manifest: dict = {}
        while time.monotonic() < deadline:
            assert not running or self.process.poll() is None, f"worker exited early:\n{self.log.read_text()}"
            try:
                _, _, manifest = read_latest(self.kappa.snapshot_dir, self.topic)
            except (FileNotFoundError, OSError, ValueError):
                manifest = {}
            if manifest.get("offsets") == ends:
                return manifest
            time.sleep(0.3)
        raise AssertionError(f"snapshot never caught up to {ends}; last manifest {manifest}\n{self.log.read_text()}")

    def assert_exact(self, tmp_path: Path, key: str, value: str, running: bool = True, generation: int = 1) -> None:
        manifest = self.wait_caught_up(timeout=180 if running else 5, running=running)
        everything = tmp_path / "so-far.csv"
        pd.concat(self.rows, ignore_index=True).to_csv(everything, index=False)
        expected = pandas_expectation(str(everything), key, value)
        csv_table, parquet_table, latest = read_latest(self.kappa.snapshot_dir, self.topic)
        assert latest["complete"] is True
        assert_matches(csv_table, expected)
        assert_matches(parquet_table, expected)
        assert latest["records"]["counted"] == int(expected["count"].sum())
        assert manifest["generation"] == generation

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM, as an operator would; returns the exit code and checks no child is left."""
        children = self.child_pids()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        for pid in children:
            assert not pid_alive(pid), f"child {pid} outlived the worker"
        return code


_worker_numbers = itertools.count(1)


def start_worker(kappa: Kappa, topic: str, value: str, key: str, processes: int, interval: float) -> LiveWorker:
    log = kappa.data_dir.parent / f"worker-{topic}-{next(_worker_numbers)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "wb")
    tuning = ["--processes", str(processes), "--snapshot-interval", str(interval)]
    process = subprocess.Popen(
        kappa_command("worker", "--topic", topic, "--value", value, "--key", key, *kappa.args(), *tuning),
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    handle.close()
    return LiveWorker(kappa, topic, process, log, partitions=0)


def kill_group(worker: LiveWorker) -> None:
    """Teardown for any outcome: nothing the test started survives it."""
    kill_tree(worker.process)


def load_round(kappa, worker, tmp_path, rows: int, seed: int) -> None:
    frame = sample_frame(rows, 300, seed=seed)
    path = tmp_path / f"round-{seed}.csv"
    frame.to_csv(path, index=False)
    kappa.load(path, "city", worker.topic)
    worker.rows.append(frame)


def kcat_round(kappa, worker, rows: int, seed: int) -> None:
    """An outside producer: kcat, with its own (CRC32) partitioner, so keys span partitions."""
    frame = sample_frame(rows, 300, seed=seed)
    frame = frame[frame["city"].notna() & ~frame["city"].str.contains("\n|\t", regex=True, na=False)]
    lines = b"".join(row["city"].encode() + b"\t" + orjson.dumps(row) + b"\n" for row in frame.to_dict("records"))
    subprocess.run(
        ["kcat", "-P", "-b", kappa.broker, "-t", worker.topic, "-K", "\t", "-z", "lz4"],
        input=lines,
        check=True,
        timeout=60,
    )
    worker.rows.append(frame)
