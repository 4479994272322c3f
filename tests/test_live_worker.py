"""Live work: `kappa worker` processes tail the log and publish exact, atomic snapshots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time

from tests.helpers import read_log, wait_until
from tests.live import kcat_round, kill_group, load_round
from tests.oracle import latest_dir, read_csv_table

KEY, VALUE = "city", "amount"


def test_rounds_while_running_match_pandas_each_time(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=6)
    for seed in (1, 2, 3):
        load_round(kappa, worker, tmp_path, 4_000, seed)
        worker.assert_exact(tmp_path, KEY, VALUE)
        time.sleep(1.5)
    kcat_round(kappa, worker, 3_000, seed=4)
    worker.assert_exact(tmp_path, KEY, VALUE)
    assert {len(beat["partitions"]) for beat in worker.heartbeats()} == {3}
    said = worker.log.read_text()
    assert re.search(r"kappa worker: tailing: all 6 partitions held by 2 process\(es\), [\d,]+ records behind", said)
    status = wait_for_status(kappa, worker.topic, lambda s: s["generations"][0]["total_lag"] == 0)
    generation = status["generations"][0]
    assert status["current_generation"] == 1 and status["partitions"] == 6
    assert len(read_log(kappa.broker, worker.topic)) == sum(len(rows) for rows in worker.rows)  # offsets: + markers
    assert generation["committed"] == {p: int(o) for p, o in status["end_offsets"].items()}
    assert sorted(process["pid"] for process in generation["processes"]) == sorted(worker.child_pids())
    assert status["latest_snapshot"]["records"]["counted"] + status["latest_snapshot"]["records"]["skipped"] > 0
    assert worker.stop() == 0


def wait_for_status(kappa, pipeline: str, predicate, timeout: float = 60) -> dict:
    """`kappa status --json` once the predicate holds (commits follow the table within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(kappa.run("status", "--json", "--pipeline", pipeline).stdout)
        [pipeline_status] = status["pipelines"]
        if predicate(pipeline_status) or time.monotonic() > deadline:
            return pipeline_status
        time.sleep(0.5)


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
    wait_until(lambda: sum(b["records_seen"] for b in worker.heartbeats()) >= 3_000, 120, interval=0.3)
    assert not (kappa.snapshot_dir / worker.topic / "latest").exists(), "nothing should publish before the stop"
    children = worker.child_pids()
    assert len(children) == 2
    assert worker.stop() == 0
    assert worker.process.returncode == 0
    leftover = subprocess.run(["pgrep", "-f", f"--topic {worker.topic}"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""
    assert not worker.heartbeats(), "stopped processes leave no heartbeat behind"
    worker.assert_exact(tmp_path, KEY, VALUE, running=False)


def test_parts_that_could_not_be_written_are_written_once_there_is_room(kappa, live, tmp_path):
    """A full disk under the snapshots and the processes' heartbeats: the parts of records applied
    meanwhile are written, and published, once there is room again, with no new record to
    prompt them; a part that failed halfway leaves no file behind."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    for shared, where in ((kappa.snapshot_dir, disk / "snapshots"), (kappa.data_dir / "run", disk / "run")):
        where.mkdir()
        shared.parent.mkdir(parents=True, exist_ok=True)
        shared.symlink_to(where)
    filler = disk / "filler"
    worker = None
    try:
        worker = live(kappa.topic(), partitions=4, processes=1)
        load_round(kappa, worker, tmp_path, 2_000, seed=1)
        worker.assert_exact(tmp_path, KEY, VALUE)

        fill_up(filler)
        load_round(kappa, worker, tmp_path, 2_000, seed=2)
        wait_for_status(kappa, worker.topic, all_committed)  # every record applied, while nothing can be written
        assert wait_until(lambda: b"could not write snapshot parts" in worker.log.read_bytes(), timeout=60)
        time.sleep(3)  # three more ticks, all failing: no part is left to a later record
        filler.unlink()
        worker.assert_exact(tmp_path, KEY, VALUE)  # within 180 s; parts are due every second
        assert worker.stop() == 0
        assert not list(disk.rglob("*.tmp"))
    finally:
        if worker is not None:
            kill_group(worker)
        filler.unlink(missing_ok=True)
        subprocess.run(["umount", "-l", str(disk)], check=False)


def all_committed(status: dict) -> bool:
    return status["generations"][0]["committed"] == {p: int(o) for p, o in status["end_offsets"].items()}


def fill_up(filler) -> None:
    """Write `filler` until not one more byte fits on its file system."""
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (64 * 1024, 4096, 1):
            try:
                while True:
                    os.write(descriptor, bytes(size))
            except OSError:
                continue
    finally:
        os.close(descriptor)
