"""Live work: `kappa worker` processes tail the log and publish exact, atomic snapshots."""

from __future__ import annotations

import subprocess
import threading
import time

import orjson
import pytest

from kappa.admin import ensure_topic
from kappa.datagen import sample_frame
from tests.live import kill_group, start_worker
from tests.oracle import latest_dir, read_csv_table

KEY, VALUE = "city", "amount"


@pytest.fixture
def live(kappa, tmp_path):
    started = []

    def run(topic: str, partitions: int, processes: int = 2, interval: float = 1.0):
        ensure_topic(kappa.broker, topic, partitions)
        worker = start_worker(kappa, topic, VALUE, KEY, processes, interval)
        worker.partitions = partitions
        started.append(worker)
        return worker

    yield run
    for worker in started:
        kill_group(worker)


def load_round(kappa, worker, tmp_path, rows: int, seed: int) -> None:
    frame = sample_frame(rows, 300, seed=seed)
    path = tmp_path / f"round-{seed}.csv"
    frame.to_csv(path, index=False)
    kappa.load(path, KEY, worker.topic)
    worker.rows.append(frame)


def kcat_round(kappa, worker, rows: int, seed: int) -> None:
    """An outside producer: kcat, with its own (CRC32) partitioner, so keys span partitions."""
    frame = sample_frame(rows, 300, seed=seed)
    frame = frame[frame[KEY].notna() & ~frame[KEY].str.contains("\n|\t", regex=True, na=False)]
    lines = b"".join(row[KEY].encode() + b"\t" + orjson.dumps(row) + b"\n" for row in frame.to_dict("records"))
    subprocess.run(
        ["kcat", "-P", "-b", kappa.broker, "-t", worker.topic, "-K", "\t", "-z", "lz4"],
        input=lines, check=True, timeout=60,
    )  # fmt: skip
    worker.rows.append(frame)


def test_rounds_while_running_match_pandas_each_time(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=6)
    for seed in (1, 2, 3):
        load_round(kappa, worker, tmp_path, 4_000, seed)
        worker.assert_exact(tmp_path, KEY, VALUE)
        time.sleep(1.5)
    kcat_round(kappa, worker, 3_000, seed=4)
    worker.assert_exact(tmp_path, KEY, VALUE)
    assert {len(beat["partitions"]) for beat in worker.heartbeats()} == {3}
    assert worker.stop() == 0


def test_stop_and_restart_a_process_while_records_arrive(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=6)
    load_round(kappa, worker, tmp_path, 3_000, seed=10)
    worker.wait_caught_up()
    victim = worker.child_pids()
    assert len(victim) == 2
    stopped = sorted(victim)[0]
    for seed in range(11, 17):
        load_round(kappa, worker, tmp_path, 2_000, seed)
        if seed == 12:
            subprocess.run(["kill", "-TERM", str(stopped)], check=True)
        time.sleep(0.7)
    worker.assert_exact(tmp_path, KEY, VALUE)
    assert stopped not in worker.child_pids() and len(worker.child_pids()) == 2
    assert "restarting" in worker.log.read_text()
    assert worker.stop() == 0


def test_tight_loop_reader_never_sees_a_partial_or_mixed_snapshot(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=4, interval=0.2)
    load_round(kappa, worker, tmp_path, 2_000, seed=20)
    worker.wait_caught_up()
    reads, problems, done = [0], [], threading.Event()

    def reader() -> None:
        import json

        import pyarrow.parquet as pq

        while not done.is_set():
            directory = latest_dir(kappa.snapshot_dir, worker.topic)
            try:
                manifest = json.loads((directory / "manifest.json").read_text())
                csv_table = read_csv_table(directory / "table.csv")
                parquet_table = pq.read_table(directory / "table.parquet").to_pandas()
            except FileNotFoundError:
                continue  # pruned after we resolved it: an old cut, never a partial one
            except Exception as exc:  # a torn file would land here
                problems.append(repr(exc))
                continue
            same = csv_table["key"].tolist() == parquet_table["key"].tolist()
            same = same and csv_table["count"].tolist() == parquet_table["count"].tolist()
            if not same or len(csv_table) != manifest["keys"]:
                problems.append(f"{directory.name}: files disagree")
            if int(parquet_table["count"].sum()) != manifest["records"]["counted"]:
                problems.append(f"{directory.name}: counted differs from manifest")
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for seed in range(21, 27):
            load_round(kappa, worker, tmp_path, 1_500, seed)
            time.sleep(0.5)
        worker.assert_exact(tmp_path, KEY, VALUE)
    finally:
        done.set()
        thread.join(timeout=30)
    assert problems == []
    assert reads[0] > 20
    assert worker.stop() == 0


def test_sigterm_publishes_a_final_snapshot_and_leaves_no_child(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=3, processes=2, interval=3600)
    load_round(kappa, worker, tmp_path, 3_000, seed=30)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(b["records_seen"] for b in worker.heartbeats()) < 3_000:
        time.sleep(0.3)
    assert not (kappa.snapshot_dir / worker.topic / "latest").exists(), "nothing should publish before the stop"
    children = worker.child_pids()
    assert len(children) == 2
    assert worker.stop() == 0
    assert worker.process.returncode == 0
    leftover = subprocess.run(["pgrep", "-f", f"--topic {worker.topic}"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""
    assert not worker.heartbeats(), "stopped processes leave no heartbeat behind"
    worker.assert_exact(tmp_path, KEY, VALUE, running=False)
