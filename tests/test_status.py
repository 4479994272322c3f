"""`kappa status` with the broker down still shows what is on disk: generations, processes and the latest
snapshot's age, marks the broker part unreachable, and exits non-zero."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess

from kappa.engine.names import app_id
from kappa.kafka.admin import group_members
from tests.datagen import sample_frame
from tests.helpers import free_port, high_watermarks, start_load, wait_for, wait_for_progress
from tests.live import load_round

KEY, VALUE = "city", "amount"


def test_status_with_the_broker_down_shows_what_is_on_disk(kappa, live, tmp_path):
    worker = live(kappa.topic(), partitions=2, processes=1)
    load_round(kappa, worker, tmp_path, 2_000, seed=5)
    worker.wait_caught_up()
    pids = sorted(worker.child_pids())
    assert pids

    # the same data and snapshot dirs, but nothing listens at the broker address
    down = dataclasses.replace(kappa, broker=f"127.0.0.1:{free_port()}")

    result = down.run("status", "--json", "--pipeline", worker.topic, check=False, timeout=120)
    assert result.returncode != 0, result.stdout.decode()
    assert "cannot reach the Kafka broker" in result.stderr.decode()
    status = json.loads(result.stdout)
    assert status["broker_reachable"] is False
    assert "cannot reach the Kafka broker" in status["broker_error"]
    [pipeline] = status["pipelines"]
    assert pipeline["pipeline"] == worker.topic and pipeline["topic"] == worker.topic
    assert pipeline["partitions"] is None and pipeline["end_offsets"] is None
    assert pipeline["current_generation"] == 1
    [generation] = pipeline["generations"]
    assert generation["generation"] == 1 and generation["state"] and generation["definition"]["value"] == "amount"
    assert generation["committed"] is None and generation["lag"] is None and generation["total_lag"] is None
    assert sorted(process["pid"] for process in generation["processes"]) == pids
    snapshot = pipeline["latest_snapshot"]
    assert snapshot["generation"] == 1 and snapshot["age_s"] >= 0 and snapshot["keys"] > 0

    text = down.run("status", check=False, timeout=120)
    assert text.returncode != 0
    out = text.stdout.decode()
    assert f"broker {down.broker}: unreachable" in out
    assert f"pipeline {worker.topic}: topic {worker.topic!r}" in out
    assert "generation 1 [" in out and "--value amount --key city, lag unknown" in out
    for pid in pids:
        assert f"process pid {pid} " in out
    assert "latest snapshot: generation 1," in out
    assert len(text.stderr.decode().strip().splitlines()) == 1
    assert worker.stop() == 0


def test_status_shows_a_worker_process_that_keeps_failing(kappa, live, tmp_path):
    """Status showed only the lag of a worker whose processes were restarted every two seconds."""
    worker = live(kappa.topic(), partitions=2, processes=1)
    load_round(kappa, worker, tmp_path, 1_000, seed=6)
    worker.wait_caught_up()
    killed: list[int] = []
    for _ in range(3):  # a process that dies soon after each start, as one failing at every start does
        (child,) = wait_for(lambda: worker.child_pids() - set(killed), 120, "a new worker process")
        os.kill(child, signal.SIGKILL)
        killed.append(child)
    wait_for(lambda: worker.child_pids() - set(killed), 120, "a new worker process")

    status = json.loads(kappa.run("status", "--json", "--pipeline", worker.topic, timeout=120).stdout)
    running = status["pipelines"][0]["worker"]
    assert running["pid"] == worker.process.pid and running["processes"] == 1 and running["generation"] == 1
    assert running["restart_count"] == 3
    assert [restart["pid"] for restart in running["restarts"]] == killed
    assert running["crash_looping"] == [{"index": 0, "restarts": 3, "last_code": -signal.SIGKILL}]
    assert [w for w in status["pipelines"][0]["warnings"] if w.startswith("worker process 0 exited 3 times")]
    out = kappa.run("status", "--pipeline", worker.topic, timeout=120).stdout.decode()
    assert f"worker: supervisor pid {worker.process.pid} on " in out and ", 3 restart(s) (the last " in out, out
    assert "warning: worker process 0 exited 3 times in the last 60s (last exit code -9)" in out, out

    assert worker.stop() == 0
    status = json.loads(kappa.run("status", "--json", "--pipeline", worker.topic, timeout=120).stdout)
    assert status["pipelines"][0]["worker"] is None


def test_a_killed_workers_files_do_not_name_the_processes_that_got_their_pids(kappa, live, tmp_path):
    """A worker killed with SIGKILL leaves its supervisor record and its process's heartbeat;
    status read them as running for as long as any process had their pids, and `kappa drop`
    was refused for them. Linux gives the pids to a `sleep` here: the files are rewritten to
    name it, as reused pids would."""
    worker = live(kappa.topic(), partitions=2, processes=1)
    load_round(kappa, worker, tmp_path, 500, seed=7)
    worker.wait_caught_up()
    run_dir = kappa.data_dir / "run" / worker.topic
    (child,) = worker.child_pids()
    os.kill(worker.process.pid, signal.SIGSTOP)  # no restart of its process, nor a clean stop of it
    os.kill(child, signal.SIGKILL)
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=60)
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        for path in [run_dir / "supervisor.json", *run_dir.glob("g1/process-*.json")]:
            path.write_text(json.dumps({**json.loads(path.read_text()), "pid": stranger.pid}))
        assert len(list(run_dir.glob("g1/process-*.json"))) == 1
        status = json.loads(kappa.run("status", "--json", "--pipeline", worker.topic, timeout=120).stdout)
        assert status["pipelines"][0]["worker"] is None, status["pipelines"][0]["worker"]
        assert status["pipelines"][0]["generations"][0]["processes"] == []
        wait_for(lambda: not group_members(kappa.broker, app_id(worker.topic, 1)), 120, "its member to leave")
        dropped = kappa.run("drop", worker.topic, timeout=120).stdout.decode()
        assert "deleted generation 1" in dropped, dropped
    finally:
        stranger.kill()
        stranger.wait()


def test_status_says_when_no_worker_runs_a_live_generation_and_what_its_snapshot_misses(kappa, live, tmp_path):
    """Once its worker stopped, a live generation read `[live, live]` as if it ran, and the
    snapshot's `complete=True` sat beside a growing lag with nothing saying they disagree."""
    worker = live(kappa.topic(), partitions=2, processes=1)
    load_round(kappa, worker, tmp_path, 2_000, seed=5)
    worker.wait_caught_up()
    running = kappa.run("status", "--pipeline", worker.topic, timeout=120).stdout.decode()
    assert "generation 1 [live, live] " in running and "does not cover" not in running, running
    assert worker.stop() == 0
    covered = sum(high_watermarks(kappa.broker, worker.topic).values())
    load_round(kappa, worker, tmp_path, 1_500, seed=6)
    lag = sum(high_watermarks(kappa.broker, worker.topic).values()) - covered  # 1,500 rows and the commit markers

    stopped = kappa.run("status", "--pipeline", worker.topic, timeout=120).stdout.decode()
    assert "generation 1 [live, live, no worker runs it: `kappa worker` continues it] " in stopped, stopped
    assert f"lag {lag:,} " in stopped, stopped
    assert "complete=True" in stopped and f"the log has {lag:,} records it does not cover yet" in stopped, stopped


def test_status_names_a_load_killed_outright_until_the_same_load_finishes_it(kappa, tmp_path):
    """A load killed with SIGKILL leaves its open transaction on the log, and every reader of
    the topic waits at it (found in helper-38's trial): status showed a lag and nothing else."""
    topic, first, second = kappa.topic(), tmp_path / "first.csv", tmp_path / "second.csv"
    sample_frame(2_000, 50, seed=147).to_csv(first, index=False)
    sample_frame(600_000, 50, seed=148).to_csv(second, index=False)
    kappa.load(first, KEY, topic, partitions=2)
    kappa.replay_batch(topic, VALUE, KEY)
    load = start_load(kappa, second, topic, KEY)
    try:
        wait_for_progress(load)
    finally:
        load.kill()
        load.communicate(timeout=30)
    assert load.returncode == -signal.SIGKILL, "the load finished before it was killed"

    status = json.loads(kappa.run("status", "--json", "--pipeline", topic, timeout=120).stdout)
    [unfinished] = status["pipelines"][0]["unfinished_loads"]  # the completed first load is not named
    assert (unfinished["file"], unfinished["key"]) == (str(second), KEY)
    text = kappa.run("status", "--pipeline", topic, timeout=120).stdout.decode()
    assert (
        f"load of {second} (--key {KEY}) into {topic!r}, begun {unfinished['started_at']}, has not completed: "
        "it is still running, or it was interrupted and the same `kappa load` finishes it"
    ) in text, text

    kappa.load(second, KEY, topic, partitions=2)
    status = json.loads(kappa.run("status", "--json", "--pipeline", topic, timeout=120).stdout)
    assert status["pipelines"][0]["unfinished_loads"] == []
    assert "has not completed" not in kappa.run("status", "--pipeline", topic, timeout=120).stdout.decode()
