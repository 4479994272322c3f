"""Exactness under fire (no record lost or counted twice, and `latest` never replaced by a partial or
older result): kill -9, lost state, rebalance storms, shared dirs, outside producers and an unwritable
snapshot directory. The verdict is always the pandas oracle."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import time

import orjson
import pytest

from kappa.engine.names import app_id
from kappa.kafka import broker as embedded
from kappa.kafka.admin import committed_offsets, ensure_topic
from tests.datagen import pandas_expectation, sample_frame
from tests.helpers import REPO, free_port, read_heartbeats, wait_until
from tests.live import kill_group, load_round, start_worker
from tests.oracle import assert_matches, read_latest

KEY, VALUE = "city", "amount"
pytestmark = pytest.mark.slow


def test_sigkill_live_processes_at_random_moments(kappa, live, tmp_path):
    rng = random.Random(5)
    worker = live(kappa.topic(), partitions=4, processes=2, interval=0.5)
    load_round(kappa, worker, tmp_path, 3_000, seed=100)
    worker.wait_caught_up()
    kills = 0
    for seed in range(101, 107):
        load_round(kappa, worker, tmp_path, 2_500, seed)
        time.sleep(rng.uniform(0.0, 1.2))
        victims = sorted(worker.child_pids())
        if victims:
            os.kill(rng.choice(victims), signal.SIGKILL)
            kills += 1
        time.sleep(rng.uniform(0.0, 0.8))
    assert kills >= 5
    worker.assert_exact(tmp_path, KEY, VALUE)
    assert worker.log.read_text().count("restarting") >= 5
    assert worker.stop() == 0


def test_sigkill_a_replay_repeatedly_then_resume(kappa, tmp_path):
    """Kill -9 at up to five random points of progress, then finish; the result is exact.

    Progress is what the replay's processes report in their heartbeats (the group's commits
    lag by seconds under the test's broker quota). The quota lets a fetch burst through
    before it throttles, so one burst may carry a replay past the later points to its end: a
    replay that ends on its own is the finish, and at least three kills must have come first.
    """
    rng = random.Random(9)
    topic, rows, partitions = kappa.topic(), 200_000, 4
    path = tmp_path / "rows.csv"
    sample_frame(rows, 500, seed=110).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=partitions)
    env = kappa.paced_replay_env(app_id(topic, 1), 400_000)  # about 15 s per pass
    command = [str(REPO / "scripts" / "replay"), "--topic", topic, "--value", VALUE, "--key", KEY, *kappa.args()]
    run_dir = kappa.data_dir / "run" / topic / "g1"
    kills, ended = 0, None
    for fraction in sorted(rng.uniform(0.05, 0.85) for _ in range(5)):
        replay = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True, text=True
        )

        def reached(fraction: float = fraction, replay: subprocess.Popen = replay) -> bool:
            applied = sum(sum(beat["next_offsets"].values()) for beat in read_heartbeats(run_dir))
            return replay.poll() is not None or applied >= fraction * rows

        try:
            wait_until(reached, 120, interval=0.05)
        finally:
            if replay.poll() is None:
                os.killpg(replay.pid, signal.SIGKILL)
                kills += 1
            _, stderr = replay.communicate(timeout=30)
        if replay.returncode >= 0:  # it ended on its own
            ended = (replay.returncode, stderr)
            break
        assert not (kappa.snapshot_dir / topic / "latest").exists()
    assert kills >= 3
    if ended is None:
        finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        ended = (finished.returncode, finished.stderr)
    assert ended[0] == 0, ended[1]
    csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    expected = pandas_expectation(str(path), KEY, VALUE)
    assert_matches(csv_table, expected)
    assert_matches(parquet_table, expected)
    assert manifest["generation"] == 1 and manifest["records"]["counted"] == int(expected["count"].sum())


def test_wiped_local_state_is_rebuilt_from_the_changelog(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=3, processes=1, interval=0.5)
    load_round(kappa, worker, tmp_path, 5_000, seed=120)
    worker.assert_exact(tmp_path, KEY, VALUE)
    assert worker.stop() == 0
    state = kappa.data_dir / "state" / worker.topic
    assert any(state.rglob("*.db")), "the worker kept RocksDB state"
    shutil.rmtree(state)
    restarted = live(worker.topic, partitions=3, processes=1, interval=0.5)
    restarted.rows = worker.rows
    load_round(kappa, restarted, tmp_path, 2_000, seed=121)
    restarted.assert_exact(tmp_path, KEY, VALUE)
    assert restarted.stop() == 0


def test_rebalance_storm_of_a_second_worker(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=6, processes=1, interval=0.5)
    load_round(kappa, worker, tmp_path, 2_000, seed=130)
    for seed in range(131, 136):
        # a second host: its own data dir, the shared snapshot dir
        second_host = dataclasses.replace(kappa, data_dir=kappa.data_dir.parent / "second-host")
        second = start_worker(second_host, worker.topic, VALUE, KEY, processes=1, interval=0.5)
        try:
            load_round(kappa, worker, tmp_path, 1_500, seed)
            time.sleep(2.0)
        finally:
            second.process.send_signal(signal.SIGTERM)
            assert second.process.wait(timeout=90) == 0
    worker.assert_exact(tmp_path, KEY, VALUE)
    assert worker.stop() == 0


def test_a_second_worker_on_one_data_dir_is_refused_at_once(kappa, live, tmp_path):
    first = live(kappa.topic(), partitions=4, processes=2, interval=0.5)
    load_round(kappa, first, tmp_path, 4_000, seed=140)
    first.wait_caught_up()
    second = live(first.topic, partitions=4, processes=1, interval=0.5)
    assert second.process.wait(timeout=30) == 2, "the second worker must stop, not hang"
    error = second.log.read_text()
    assert f"data dir {kappa.data_dir} is already used by a kappa worker" in error
    assert f"pid {first.process.pid}" in error and "--data-dir" in error
    load_round(kappa, first, tmp_path, 2_000, seed=141)
    first.assert_exact(tmp_path, KEY, VALUE)
    assert first.stop() == 0
    assert "LOCK" not in first.log.read_text()


def test_kcat_with_every_codec_and_its_own_partitioner(kappa, tmp_path):
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 4)
    frame = sample_frame(4_000, 150, seed=150)
    frame = frame[frame[KEY].notna() & ~frame[KEY].str.contains("\n|\t", regex=True, na=False)]
    chunks = [frame.iloc[i::4] for i in range(4)]
    for codec, chunk in zip(["gzip", "snappy", "lz4", "zstd"], chunks, strict=True):
        lines = b"".join(row[KEY].encode() + b"\t" + orjson.dumps(row) + b"\n" for row in chunk.to_dict("records"))
        subprocess.run(
            ["kcat", "-P", "-b", kappa.broker, "-t", topic, "-K", "\t", "-z", codec],
            input=lines,
            check=True,
            timeout=60,
        )
    kappa.replay_batch(topic, VALUE, KEY)
    path = tmp_path / "all.csv"
    frame.to_csv(path, index=False)
    _, table, manifest = read_latest(kappa.snapshot_dir, topic)
    assert_matches(table, pandas_expectation(str(path), KEY, VALUE))
    assert manifest["records"]["rejected"] == 0


def test_unwritable_snapshot_dir_keeps_latest_and_recovers(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=2, processes=1, interval=0.5)
    load_round(kappa, worker, tmp_path, 2_000, seed=160)
    worker.wait_caught_up()
    pipeline_dir = kappa.snapshot_dir / worker.topic
    before = os.readlink(pipeline_dir / "latest")
    subprocess.run(["chattr", "+i", str(pipeline_dir)], check=True)
    try:
        load_round(kappa, worker, tmp_path, 1_000, seed=161)
        wait_until(lambda: "could not publish" in worker.log.read_text(), 60, interval=0.3)
        assert "could not publish" in worker.log.read_text()
        assert os.readlink(pipeline_dir / "latest") == before
        assert json.loads((pipeline_dir / "latest" / "manifest.json").read_text())["keys"] > 0
        assert worker.process.poll() is None, "the worker keeps running"
    finally:
        subprocess.run(["chattr", "-i", str(pipeline_dir)], check=True)
    worker.assert_exact(tmp_path, KEY, VALUE)
    assert os.readlink(pipeline_dir / "latest") != before
    assert worker.stop() == 0


def test_broker_stopped_for_30s_during_live_tailing_and_a_replay_beside_it(kappa, tmp_path):
    """A private broker, so stopping it cannot disturb other tests; same port on restart. A replay
    beside live, paced to be midway when the broker goes, says why it waits and then switches."""
    broker_dir = tmp_path / "private-broker"
    port = free_port()
    private = dataclasses.replace(kappa, broker=embedded.start(broker_dir, port))
    replay: subprocess.Popen | None = None
    try:
        topic = private.topic()
        ensure_topic(private.broker, topic, 4)
        worker = start_worker(private, topic, VALUE, KEY, processes=2, interval=0.5)
        worker.partitions = 4
        try:
            load_round(private, worker, tmp_path, 3_000, seed=150)
            worker.wait_caught_up()
            load_round(private, worker, tmp_path, 3_000, seed=151)  # still in flight when the broker goes
            paced = private.paced_replay_env(app_id(topic, 2), 40_000)  # about 10 s for the log's 6,000 rows
            replay_log = tmp_path / "replay.log"
            with open(replay_log, "wb") as output:
                command = ["scripts/replay", "--topic", topic, "--value", VALUE, "--key", KEY, "--processes", "1"]
                replay = subprocess.Popen([*command, *private.args()], stdout=output, stderr=subprocess.STDOUT,
                                          env=paced, cwd=REPO, start_new_session=True)  # fmt: skip

            def midway() -> bool:
                committed = committed_offsets(private.broker, app_id(topic, 2), topic, 4)
                return replay.poll() is not None or sum(offset or 0 for offset in committed.values()) >= 500

            assert wait_until(midway, 120, interval=0.1) and replay.poll() is None, replay_log.read_text()
            embedded.stop(broker_dir)
            time.sleep(30)
            assert worker.process.poll() is None, f"the worker gave up:\n{worker.log.read_text()}"
            assert replay.poll() is None, f"the replay gave up:\n{replay_log.read_text()}"
            embedded.start(broker_dir, port)
            assert replay.wait(timeout=240) == 0, replay_log.read_text()
            said = replay_log.read_text()
            assert "replay: no Kafka broker answers" in said and "generation 2 of" in said, said
            load_round(private, worker, tmp_path, 2_000, seed=152)
            worker.assert_exact(tmp_path, KEY, VALUE, generation=2)  # the worker followed the replay's switch
            restarts = worker.log.read_text().count("restarting")
            assert restarts <= 2, f"{restarts} process restarts: a crash loop\n{worker.log.read_text()}"
            assert worker.log.read_text().count("Unable connect") < 100, "client errors are folded, not spammed"
            assert worker.stop() == 0
        finally:
            kill_group(worker)
            if replay is not None and replay.poll() is None:
                os.killpg(replay.pid, signal.SIGKILL)
                replay.wait()
    finally:
        embedded.stop(broker_dir)
