"""Interrupted commands: what they promise is what happens, and nothing is left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from kappa.engine.names import app_id, assignor_topic, changelog_topic
from kappa.kafka.admin import committed_offsets, delete_topics, group_members, partition_count
from tests.datagen import pandas_expectation, sample_frame
from tests.helpers import REPO, high_watermarks, kappa_command, read_heartbeats, run_kappa, wait_until
from tests.live import kill_group, start_worker
from tests.oracle import assert_matches, read_latest

KEY, VALUE = "city", "amount"
# A replay paced by `paced_replay_env(..., 50_000)` gets about a quarter of these tests' rows at
# once, then a burst every 10 s or so, and commits what a burst brought within about 2 s
# (GroupedMeanAgent.flush_stalled_cache): the tests interrupt it once an eighth is committed
FIRST_BURST_PART = 8


def registry(kappa, pipeline: str) -> dict:
    return json.loads((kappa.snapshot_dir / pipeline / "generations.json").read_text())


def batch_command(kappa, topic: str, *extra: str) -> list[str]:
    return kappa_command("replay", "--topic", topic, "--value", VALUE, "--key", KEY, "--batch", *extra, *kappa.args())


def interrupt_when(
    kappa, command: list[str], env: dict, topic: str, generation: int, records: int, stop: int = signal.SIGINT
) -> str:
    """Start `command`, Ctrl-C it (or send `stop`) once its generation has committed `records`; its stderr."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=env, cwd=REPO, start_new_session=True)
    try:

        def committed_enough() -> bool:
            committed = committed_offsets(kappa.broker, app_id(topic, generation), topic, 4)
            return process.poll() is not None or sum(offset or 0 for offset in committed.values()) >= records

        wait_until(committed_enough, 120, interval=0.05)
        assert process.poll() is None, "the replay ended before it was interrupted"
        if stop == signal.SIGINT:
            os.killpg(process.pid, stop)  # as a terminal's Ctrl-C
        else:
            os.kill(process.pid, stop)  # as `kill PID`: the command stops what it started
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode != 0
    return stderr.decode()


@pytest.mark.slow
def test_an_interrupted_batch_replay_resumes_as_its_message_says(kappa, tmp_path):
    topic, rows = kappa.topic(), 24_000
    path = tmp_path / "rows.csv"
    sample_frame(rows, 500, seed=21).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=4)
    env = kappa.paced_replay_env(app_id(topic, 1), 50_000)

    message = interrupt_when(kappa, batch_command(kappa, topic), env, topic, 1, rows // FIRST_BURST_PART)
    assert "run the same replay again to resume it" in message, message
    assert registry(kappa, topic)["generations"]["1"]["state"] == "failed"
    assert (kappa.data_dir / "state" / topic / "g1").exists()
    status = kappa.run("status", "--pipeline", topic).stdout.decode()
    assert "  current generation: none yet (no replay has finished)\n" in status, status

    finished = subprocess.run(batch_command(kappa, topic), capture_output=True, env=env, cwd=REPO, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()
    assert "resuming the stopped generation 1" in finished.stderr.decode()
    said = re.search(r"from the offsets it committed \(([\d,]+) of ([\d,]+) records read", finished.stderr.decode())
    offsets = sum(high_watermarks(kappa.broker, topic).values())  # the rows and the load's commit markers
    read = int(said[1].replace(",", "")) if said else -1
    assert said and said[2] == f"{offsets:,}" and rows // FIRST_BURST_PART <= read < rows, finished.stderr
    csv_table, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert_matches(csv_table, pandas_expectation(str(path), KEY, VALUE))
    assert manifest["generation"] == 1
    assert set(registry(kappa, topic)["generations"]) == {"1"}


@pytest.mark.slow
def test_a_batch_replay_killed_outright_shows_as_stopped_and_resumes(kappa, tmp_path):
    """kill -9 leaves the generation `running` in the registry with its builder gone: status
    said `[running, batch]` until `kappa gc`; it must say the replay stopped and how to go on."""
    topic, rows = kappa.topic(), 24_000
    path = tmp_path / "rows.csv"
    sample_frame(rows, 500, seed=23).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=4)
    env = kappa.paced_replay_env(app_id(topic, 1), 50_000)

    interrupt_when(kappa, batch_command(kappa, topic), env, topic, 1, rows // FIRST_BURST_PART, stop=signal.SIGKILL)
    assert registry(kappa, topic)["generations"]["1"]["state"] == "running"
    status = kappa.run("status", "--pipeline", topic).stdout.decode()
    line = next(line for line in status.splitlines() if "generation 1 [" in line)
    assert "[running, batch, stopped: the replay that built it is gone; run it again to resume" in line, status

    finished = subprocess.run(batch_command(kappa, topic), capture_output=True, env=env, cwd=REPO, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()
    assert "resuming the stopped generation 1" in finished.stderr.decode()
    csv_table, _, _ = read_latest(kappa.snapshot_dir, topic)
    assert_matches(csv_table, pandas_expectation(str(path), KEY, VALUE))


@pytest.mark.slow
def test_a_stopped_batch_replay_on_a_topic_made_again_starts_over(kappa, tmp_path):
    """Resuming went on from generation 1's offsets and state, which belong to the deleted
    topic: the result mixed its counts with the new log's."""
    topic = kappa.topic()
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    sample_frame(60_000, 500, seed=21).to_csv(first, index=False)
    sample_frame(3_000, 40, seed=22).to_csv(second, index=False)
    kappa.load(first, KEY, topic, partitions=4)
    env = kappa.paced_replay_env(app_id(topic, 1), 50_000)
    interrupt_when(kappa, batch_command(kappa, topic), env, topic, 1, 15_000)
    assert registry(kappa, topic)["generations"]["1"]["state"] == "failed"

    delete_topics(kappa.broker, [topic])
    assert wait_until(lambda: partition_count(kappa.broker, topic) is None, 60)
    kappa.load(second, KEY, topic, partitions=4)
    finished = subprocess.run(batch_command(kappa, topic), capture_output=True, cwd=REPO, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()
    assert "deleted generation 1 instead of resuming it: topic" in finished.stderr.decode()
    csv_table, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert_matches(csv_table, pandas_expectation(str(second), KEY, VALUE))
    assert manifest["generation"] == 2
    assert partition_count(kappa.broker, changelog_topic(topic, 1)) is None


@pytest.mark.slow
def test_a_replay_beside_live_stopped_by_sigterm_stops_its_workers_and_gc_deletes_it(kappa, tmp_path):
    """SIGTERM's default ended the replay at once: its generation stayed building with no
    builder, and `kappa gc` said nothing to clean, leaving its state, changelog and group."""
    topic, rows = kappa.topic(), 24_000
    path = tmp_path / "rows.csv"
    sample_frame(rows, 500, seed=23).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=4)
    kappa.replay_batch(topic, VALUE, KEY)  # generation 1
    env = kappa.paced_replay_env(app_id(topic, 2), 50_000)
    beside = kappa_command("replay", "--topic", topic, "--value", VALUE, "--key", KEY, *kappa.args())
    message = interrupt_when(kappa, beside, env, topic, 2, rows // FIRST_BURST_PART, stop=signal.SIGTERM)
    assert message.strip().splitlines()[-1] == (
        "kappa: error: replay of generation 2 stopped before it caught up; its state is kept: run the same replay "
        f"again to resume it where it stopped, or `kappa gc --pipeline {topic}` to delete it"
    ), message
    assert wait_until(lambda: group_members(kappa.broker, app_id(topic, 2)) in (0, None), 60), "its workers run on"

    gc = kappa.run("gc", "--pipeline", topic).stdout.decode()
    assert "deleted generation 2" in gc, gc
    assert registry(kappa, topic)["generations"]["2"]["state"] == "retired"
    assert not (kappa.data_dir / "state" / topic / "g2").exists()
    for leftover in (changelog_topic(topic, 2), assignor_topic(topic, 2)):
        assert wait_until(lambda name=leftover: partition_count(kappa.broker, name) is None, 60), leftover
    csv_table, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["generation"] == 1
    assert_matches(csv_table, pandas_expectation(str(path), KEY, VALUE))


@pytest.mark.slow
def test_abandoned_and_half_retired_generations_are_cleaned_up(kappa, tmp_path):
    topic, rows = kappa.topic(), 24_000
    path = tmp_path / "rows.csv"
    sample_frame(rows, 500, seed=22).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=4)
    kappa.replay_batch(topic, VALUE, KEY)  # generation 1

    # an abandoned generation: a batch replay interrupted midway, never rerun
    env = kappa.paced_replay_env(app_id(topic, 2), 50_000)
    interrupt_when(kappa, batch_command(kappa, topic), env, topic, 2, rows // FIRST_BURST_PART)
    status = json.loads(kappa.run("status", "--json", "--pipeline", topic).stdout)
    assert {g["generation"]: g["state"] for g in status["pipelines"][0]["generations"]}[2] == "failed"
    gc = kappa.run("gc", "--pipeline", topic)
    assert "deleted generation 2" in gc.stdout.decode()
    assert not (kappa.data_dir / "state" / topic / "g2").exists()
    assert registry(kappa, topic)["generations"]["2"]["state"] == "retired"
    assert "nothing to clean" in kappa.run("gc", "--pipeline", topic).stdout.decode()

    # a half-done switch: generation 1's worker is frozen, so the replay that replaced it
    # waits for it to stop before deleting its state, and is interrupted while it waits
    worker = start_worker(kappa, topic, VALUE, KEY, processes=1, interval=0.5)
    worker.partitions = 4
    try:
        assert wait_until(worker.heartbeats, 120), "the worker never started"
        os.killpg(worker.process.pid, signal.SIGSTOP)
        replay = subprocess.Popen(batch_command(kappa, topic), stderr=subprocess.PIPE, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 180
        while registry(kappa, topic).get("current") != 3 and time.monotonic() < deadline:
            assert replay.poll() is None, replay.stderr.read().decode()
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(replay.pid, signal.SIGINT)
        replay.wait(timeout=60)
        assert registry(kappa, topic)["generations"]["1"]["state"] == "retiring"
    finally:
        kill_group(worker)
    assert (kappa.data_dir / "state" / topic / "g1").exists()
    assert "retired generation 1" in kappa.run("gc", "--pipeline", topic).stdout.decode()
    assert registry(kappa, topic)["generations"]["1"]["state"] == "retired"
    assert not (kappa.data_dir / "state" / topic / "g1").exists()
    csv_table, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["generation"] == 3
    assert_matches(csv_table, pandas_expectation(str(path), KEY, VALUE))


def test_drop_deletes_everything_kappa_made_for_a_pipeline(kappa, tmp_path):
    """Nothing kappa makes is left without a command that removes it: `kappa gc` deletes
    abandoned generations, `kappa drop` a whole pipeline (refused while it runs), with --topic
    the topic, its load ledger and its dead-letter topic too."""
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(5_000, 100, seed=24).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    kappa.replay_batch(topic, VALUE, KEY)  # generation 1
    kappa.replay_batch(topic, VALUE, KEY)  # generation 2, which retires 1
    worker = start_worker(kappa, topic, VALUE, KEY, processes=1, interval=0.5)
    worker.partitions = 2
    try:
        assert wait_until(lambda: read_heartbeats(kappa.data_dir / "run" / topic / "g2"), 120), "it never started"
        refused = run_kappa(["drop", topic, *kappa.args()], timeout=120)
        assert refused.returncode == 2 and b"has processes running" in refused.stderr, refused.stderr
        assert worker.stop() == 0
    finally:
        kill_group(worker)

    dropped = kappa.run("drop", topic, "--topic").stdout.decode()
    assert "deleted generation 2" in dropped and f"deleted topics {topic}, {topic}.loads, {topic}.dlq" in dropped
    assert "generation 1" not in dropped, "generation 1 was deleted when it was retired: the drop deleted nothing of it"
    for directory in (kappa.snapshot_dir / topic, kappa.data_dir / "state" / topic, kappa.data_dir / "run" / topic):
        assert not directory.exists(), directory
    assert not (kappa.data_dir / "state").exists() and not (kappa.data_dir / "run").exists(), "no empty dirs left"
    for generation in (1, 2):
        assert group_members(kappa.broker, app_id(topic, generation)) is None
    gone = [topic, f"{topic}.loads", f"{topic}.dlq", changelog_topic(topic, 2), assignor_topic(topic, 2)]
    for name in gone:
        assert wait_until(lambda name=name: partition_count(kappa.broker, name) is None, 60), name
    again = run_kappa(["drop", topic, *kappa.args()], timeout=60)
    assert again.returncode == 2 and b"nothing to drop" in again.stderr


def test_a_drop_does_not_say_it_kept_a_topic_that_is_gone(kappa, tmp_path):
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(1_000, 50, seed=28).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    kappa.replay_batch(topic, VALUE, KEY)
    delete_topics(kappa.broker, [topic, f"{topic}.loads", f"{topic}.dlq"])
    assert wait_until(lambda: partition_count(kappa.broker, topic) is None, 60)
    dropped = kappa.run("drop", topic).stdout.decode()
    assert "deleted generation 1" in dropped and "kept topic" not in dropped, dropped


def test_a_drop_is_refused_while_a_worker_runs_none_of_its_processes(kappa, tmp_path):
    """`kappa drop` looked only for processes: between two restarts of a worker's failed
    process, it deleted the pipeline under the worker, which then started the process again on
    what was deleted. Here the worker is paused and its only process killed, so none runs."""
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(2_000, 50, seed=25).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    worker = start_worker(kappa, topic, VALUE, KEY, processes=1, interval=0.5)
    worker.partitions = 2
    try:
        worker.wait_caught_up()
        (child,) = worker.child_pids()
        os.kill(worker.process.pid, signal.SIGSTOP)
        os.kill(child, signal.SIGKILL)
        assert wait_until(lambda: not group_members(kappa.broker, app_id(topic, 1)), 120), "its member stayed"
        refused = run_kappa(["drop", topic, *kappa.args()], timeout=120)
        expected = f"has processes running (a kappa worker: supervisor pid {worker.process.pid} on "
        assert refused.returncode == 2 and expected in refused.stderr.decode(), refused.stderr.decode()
        assert (kappa.snapshot_dir / topic / "generations.json").exists()
        os.kill(worker.process.pid, signal.SIGCONT)
        assert worker.stop() == 0
    finally:
        kill_group(worker)


def test_a_topic_a_drop_kept_is_deleted_by_a_drop_with_topic(kappa, tmp_path):
    """After `kappa drop P`, `kappa drop P --topic` found no pipeline: the topic, its load
    ledger and its dead-letter topic stayed, and no kappa command deleted them."""
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(2_000, 50, seed=26).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    kappa.replay_batch(topic, VALUE, KEY)
    kappa.replay_batch(topic, VALUE, KEY, "--pipeline", f"{topic}-other")

    dropped = kappa.run("drop", topic).stdout.decode()
    assert f"kept topic {topic!r}, which pipeline '{topic}-other' also reads" in dropped, dropped
    refused = run_kappa(["drop", topic, "--topic", *kappa.args()], timeout=120)
    assert refused.returncode == 2, refused.stderr.decode()
    assert f"pipeline '{topic}-other' also reads topic {topic!r}: drop it first" in refused.stderr.decode()
    assert partition_count(kappa.broker, topic) == 2

    dropped = kappa.run("drop", f"{topic}-other").stdout.decode()
    advice = f"kept topic {topic!r} with {topic}.loads and {topic}.dlq: `kappa drop {topic} --topic` deletes them"
    assert advice in dropped, dropped
    deleted = kappa.run("drop", topic, "--topic").stdout.decode()
    assert f"deleted topics {topic}, {topic}.loads, {topic}.dlq" in deleted, deleted
    for name in (topic, f"{topic}.loads", f"{topic}.dlq"):
        assert wait_until(lambda name=name: partition_count(kappa.broker, name) is None, 60), name
    again = run_kappa(["drop", topic, "--topic", *kappa.args()], timeout=60)
    assert again.returncode == 2 and b"nothing to drop" in again.stderr


def test_a_drop_from_another_data_dir_says_where_the_local_store_stays(kappa, tmp_path):
    """A drop run with another --data-dir than the replay's said it deleted each generation's
    'local state', while the table's store stayed where the replay kept it."""
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(1_000, 50, seed=27).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    kappa.replay_batch(topic, VALUE, KEY)
    store = kappa.data_dir / "state" / topic / "g1"
    assert store.is_dir()

    elsewhere = ["--broker", kappa.broker, "--data-dir", str(tmp_path / "other"), "--snapshot-dir"]
    dropped = run_kappa(["drop", topic, *elsewhere, str(kappa.snapshot_dir)], timeout=120)
    output = dropped.stdout.decode()
    assert dropped.returncode == 0, dropped.stderr.decode()
    assert "local state" not in output, output
    assert f"changelog and assignor topics; no local store under {tmp_path / 'other'}" in output, output
    assert store.is_dir(), "another data dir's files are not this drop's to delete"
    kappa.run("drop", topic, "--topic")
