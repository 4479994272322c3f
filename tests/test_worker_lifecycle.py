"""Worker processes over their life: first start, continuing a batch generation, the
supervisor dying, and what `latest` shows meanwhile."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import threading
import time

import pytest
from confluent_kafka.admin import NewPartitions

from kappa.config import Settings
from kappa.errors import KappaError
from kappa.kafka.admin import admin, delete_topics, ensure_topic, partition_count
from tests.datagen import sample_frame
from tests.helpers import pid_alive, run_kappa, wait_until
from tests.live import kill_group, load_round, start_worker
from tests.oracle import latest_dir

KEY, VALUE = "city", "amount"


class LatestWatcher(threading.Thread):
    """Reads every manifest `latest` points at, as fast as a reader could, until stopped."""

    def __init__(self, snapshot_dir, pipeline: str) -> None:
        super().__init__(daemon=True)
        self.link = snapshot_dir / pipeline / "latest"
        self.seen: list[dict] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        last = None
        while not self.stopped.is_set():
            try:
                target = os.readlink(self.link)
                if target != last:
                    manifest = json.loads((self.link.parent / target / "manifest.json").read_text())
                    self.seen.append(manifest)
                    last = target
            except (OSError, ValueError):
                pass
            time.sleep(0.01)

    def steps_back(self) -> list[str]:
        problems = []
        for before, after in zip(self.seen, self.seen[1:], strict=False):
            if before["generation"] != after["generation"]:
                continue
            behind = {p: (o, after["offsets"].get(p, 0)) for p, o in before["offsets"].items()}
            behind = {p: pair for p, pair in behind.items() if pair[1] < pair[0]}
            if behind:
                problems.append(f"{before['created_at']} -> {after['created_at']}: {behind}")
        return problems


def test_latest_never_steps_back_when_workers_continue_a_batch_generation(kappa, tmp_path):
    path = tmp_path / "rows.csv"
    sample_frame(200_000, 5_000).to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, KEY, topic, partitions=8)
    kappa.replay_batch(topic, VALUE, KEY)
    batch_snapshot = latest_dir(kappa.snapshot_dir, topic)

    watcher = LatestWatcher(kappa.snapshot_dir, topic)
    watcher.start()
    worker = start_worker(kappa, topic, VALUE, KEY, processes=2, interval=0.3)
    worker.partitions = 8
    try:
        more = tmp_path / "more.csv"
        sample_frame(2_000, 100, seed=9).to_csv(more, index=False)
        kappa.load(more, KEY, topic)
        worker.wait_caught_up(timeout=180)
        time.sleep(2)
        # status said [complete, batch] of the generation the worker was tailing
        shown = kappa.run("status", "--pipeline", topic, timeout=120).stdout.decode()
        assert "generation 1 [complete, batch, continued by a live worker] " in shown, shown
    finally:
        watcher.stopped.set()
        watcher.join()
        kill_group(worker)
    assert watcher.seen[0]["offsets"] == json.loads((batch_snapshot / "manifest.json").read_text())["offsets"]
    assert len(watcher.seen) >= 2, "the worker never published"
    assert watcher.steps_back() == []
    assert all(not m["complete"] or m["lag"] == 0 for m in watcher.seen)


def test_a_brand_new_pipeline_starts_without_a_crash(kappa, tmp_path):
    """Two processes joining a new group: revoked partitions must never reach a commit."""
    path = tmp_path / "rows.csv"
    sample_frame(60_000, 2_000).to_csv(path, index=False)
    for attempt in range(3):
        topic = kappa.topic(f"-{attempt}")
        kappa.load(path, KEY, topic, partitions=8)
        worker = start_worker(kappa, topic, VALUE, KEY, processes=2, interval=0.5)
        worker.partitions = 8
        try:
            worker.wait_caught_up(timeout=180)
            assert worker.stop() == 0
        finally:
            kill_group(worker)
        log = worker.log.read_text()
        for sign in ("Traceback", "crash", "ValueError"):
            assert sign not in log, f"attempt {attempt}: {sign!r} in the worker's output:\n{log}"


def test_worker_processes_die_with_their_supervisor(kappa, tmp_path):
    path = tmp_path / "rows.csv"
    sample_frame(5_000, 100).to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, KEY, topic, partitions=4)
    worker = start_worker(kappa, topic, VALUE, KEY, processes=2, interval=0.5)
    worker.partitions = 4
    try:
        worker.wait_caught_up(timeout=180)
        children = worker.child_pids()
        assert len(children) == 2
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=30)
        wait_until(lambda: not any(pid_alive(pid) for pid in children), 30)
        assert not [pid for pid in children if pid_alive(pid)], "worker processes outlived their supervisor"

        second = start_worker(kappa, topic, VALUE, KEY, processes=1, interval=0.5)
        second.partitions = 4
        try:
            more = tmp_path / "more.csv"
            sample_frame(500, 20, seed=5).to_csv(more, index=False)
            kappa.load(more, KEY, topic)
            second.wait_caught_up(timeout=180)
            assert second.stop() == 0
        finally:
            kill_group(second)
    finally:
        for pid in worker.child_pids():
            os.kill(pid, signal.SIGKILL)
        kill_group(worker)


def test_two_supervisors_starting_a_new_pipeline_together_make_one_generation(kappa, tmp_path):
    """Two hosts (own data dirs, one snapshot dir) started at the same moment."""
    path = tmp_path / "rows.csv"
    sample_frame(3_000, 50).to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, KEY, topic, partitions=4)
    other_host = dataclasses.replace(kappa, data_dir=kappa.data_dir.parent / "other-host")
    first = start_worker(kappa, topic, VALUE, KEY, processes=1, interval=0.5)
    second = start_worker(other_host, topic, VALUE, KEY, processes=1, interval=0.5)
    first.partitions = second.partitions = 4
    try:
        manifest = first.wait_caught_up(timeout=180)
        registry = json.loads((kappa.snapshot_dir / topic / "generations.json").read_text())
        assert list(registry["generations"]) == ["1"] and registry["current"] == 1
        assert manifest["generation"] == 1
    finally:
        kill_group(first)
        kill_group(second)


def start_and_catch_up(kappa, tmp_path, topic: str, rows: int, partitions: int):
    worker = start_worker(kappa, topic, VALUE, KEY, processes=1, interval=0.5)
    worker.partitions = partitions
    load_round(kappa, worker, tmp_path, rows, seed=71)
    worker.assert_exact(tmp_path, KEY, VALUE)
    return worker


def refused_start(kappa, topic: str) -> str:
    """`kappa worker` on a log its generation was not built from: refused at once, with one line."""
    again = run_kappa(["worker", "--topic", topic, "--value", VALUE, "--key", KEY, *kappa.args()], timeout=120)
    assert again.returncode == 2, again.stdout.decode() + again.stderr.decode()
    return again.stderr.decode().strip().splitlines()[-1]


def test_partitions_added_under_a_live_worker_stop_it_with_the_fix(kappa, tmp_path):
    """Its processes ignored the new partition until a restart, and the snapshots said complete
    meanwhile; then they failed on every restart ('Unrecognized partition' from the changelog),
    and the supervisor restarted them forever. No process is killed here: the running worker
    notices by itself."""
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 2)
    worker = start_and_catch_up(kappa, tmp_path, topic, 2_000, 2)
    try:
        result = admin(kappa.broker).create_partitions([NewPartitions(topic, 3)])
        result[topic].result(timeout=30)
        code = worker.process.wait(timeout=120)
    finally:
        kill_group(worker)
    last = worker.log.read_text().strip().splitlines()[-1]
    assert code == 2 and "has 3 partitions, but generation 1" in last and "was built on 2" in last, last
    assert "run `kappa replay`" in last
    assert "has 3 partitions, but generation 1" in refused_start(kappa, topic)
    # status said only the new partition's lag, beside a snapshot marked complete
    [pipeline] = json.loads(kappa.run("status", "--json", "--pipeline", topic).stdout)["pipelines"]
    assert any("has 3 partitions, but generation 1" in warning for warning in pipeline["warnings"]), pipeline


def test_a_topic_made_again_under_a_generation_stops_its_worker_and_is_refused(kappa, tmp_path):
    """On a topic deleted and made again, the worker went on from offsets the new log never had,
    and published the deleted topic's counts as complete."""
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 2)
    worker = start_and_catch_up(kappa, tmp_path, topic, 2_000, 2)
    try:
        delete_topics(kappa.broker, [topic])
        assert wait_until(lambda: partition_count(kappa.broker, topic) is None, 60)
        path = tmp_path / "after.csv"
        sample_frame(500, 50, seed=72).to_csv(path, index=False)
        kappa.load(path, KEY, topic, partitions=2)
        code = worker.process.wait(timeout=120)
    finally:
        kill_group(worker)
    last = worker.log.read_text().strip().splitlines()[-1]
    assert code == 2 and "was deleted and made again since generation 1" in last, last
    last = refused_start(kappa, topic)
    assert "was deleted and made again since generation 1" in last and "run `kappa replay`" in last, last


def test_a_topic_deleted_under_a_live_worker_stops_it(kappa, tmp_path):
    """Its processes waited for the topic without a word, and status said lag 0."""
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 2)
    worker = start_and_catch_up(kappa, tmp_path, topic, 2_000, 2)
    try:
        delete_topics(kappa.broker, [topic])
        code = worker.process.wait(timeout=120)
    finally:
        kill_group(worker)
    last = worker.log.read_text().strip().splitlines()[-1]
    assert code == 2 and "was deleted under generation 1" in last and "run `kappa replay`" in last, last


def test_a_refused_worker_leaves_nothing_in_its_data_dir(kappa):
    """A refused `kappa worker --topic nosuch` left run/nosuch/worker.lock, which no command removed."""
    topic = kappa.topic()  # never made
    refused = run_kappa(["worker", "--topic", topic, "--value", VALUE, "--key", KEY, *kappa.args()], timeout=120)
    assert refused.returncode == 2 and "does not exist" in refused.stderr.decode(), refused.stderr.decode()
    assert not (kappa.data_dir / "run").exists(), sorted((kappa.data_dir / "run").rglob("*"))


def test_a_start_racing_a_refused_one_does_not_hold_a_lock_no_one_sees(kappa, monkeypatch):
    """A refused start removes run/<pipeline>/worker.lock. A start that opened the file just
    before locked the removed file, and a third start made a new one and locked it too: two
    supervisors on one data dir. The removal is made to fall between the open and the lock."""
    from kappa.lifecycle import worker

    settings = Settings(broker=kappa.broker, data_dir=kappa.data_dir, snapshot_dir=kappa.snapshot_dir)
    refused = worker.claim_data_dir(settings, "racing")
    real_flock = fcntl.flock
    removed = []

    def refusal_lands_first(handle, operation):
        if not removed:
            removed.append(True)
            worker.release_refused_claim(settings, "racing", refused)
        return real_flock(handle, operation)

    monkeypatch.setattr(worker.fcntl, "flock", refusal_lands_first)
    second = worker.claim_data_dir(settings, "racing")
    monkeypatch.setattr(worker.fcntl, "flock", real_flock)
    try:
        assert removed
        with pytest.raises(KappaError, match="is already used by a kappa worker"):
            worker.claim_data_dir(settings, "racing")
    finally:
        second.close()
