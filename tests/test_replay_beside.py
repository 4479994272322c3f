"""Replay beside live work: generation N+1 from offset 0, atomic switch-over, retirement of N."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewPartitions, NewTopic

from kappa.engine.names import app_id, changelog_topic
from kappa.kafka.admin import admin, committed_offsets, ensure_topic, partition_count
from tests.datagen import pandas_expectation, sample_frame
from tests.helpers import REPO, imported_modules, kappa_command, kill_tree, wait_for
from tests.live import kill_group, start_worker
from tests.oracle import assert_matches, latest_dir, read_latest

KEY = "city"


def replay_command(kappa, topic: str, value: str, *extra: str) -> list[str]:
    return [str(REPO / "scripts" / "replay"), "--topic", topic, "--value", value, "--key", KEY, *extra, *kappa.args()]


def run_env() -> dict:
    return {**os.environ, "KAPPA_PYTHON": sys.executable}


def load_frame(kappa, tmp_path, topic: str, frame: pd.DataFrame, name: str) -> None:
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    kappa.load(path, KEY, topic)


def oracle(tmp_path, frames: list[pd.DataFrame], value: str) -> pd.DataFrame:
    path = tmp_path / "all.csv"
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return pandas_expectation(str(path), KEY, value)


def consumer_groups(broker: str) -> set[str]:
    listing = admin(broker).list_consumer_groups(request_timeout=10).result()
    return {group.group_id for group in listing.valid}


def test_replay_during_live_traffic_switches_to_the_new_definition(kappa, tmp_path):
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 4)
    worker = start_worker(kappa, topic, "amount", KEY, processes=2, interval=0.5)
    worker.partitions = 4
    frames = [sample_frame(200_000, 200, seed=40)]  # a catch-up long enough for loads to land during it
    seen: list[tuple[int, int]] = []
    covered: dict[str, int] = {}  # the highest offset any snapshot seen so far covers, per partition
    problems: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                directory = latest_dir(kappa.snapshot_dir, topic)
                manifest = json.loads((directory / "manifest.json").read_text())
            except (FileNotFoundError, OSError):
                continue
            except ValueError as exc:
                problems.append(f"unreadable manifest: {exc!r}")
                continue
            generation, sequence = (int(part) for part in directory.name[1:].split("-"))
            if manifest["generation"] != generation:
                problems.append(f"{directory.name} holds generation {manifest['generation']}")
            if seen and (generation, sequence) < seen[-1]:
                problems.append(f"went backwards: {seen[-1]} -> {(generation, sequence)}")
            if not seen or seen[-1] != (generation, sequence):
                seen.append((generation, sequence))
                # guarantee 6: across the switch too, `latest` never covers fewer records of a
                # partition (the switch came once the new generation reached the end offsets it
                # started at, behind what the live one had published meanwhile: found by helper-26)
                behind = {p: (covered[p], o) for p, o in manifest["offsets"].items() if o < covered.get(p, 0)}
                if behind:
                    problems.append(f"{directory.name} covers fewer records than before: {behind}")
                covered.update({p: max(o, covered.get(p, 0)) for p, o in manifest["offsets"].items()})

    try:
        load_frame(kappa, tmp_path, topic, frames[0], "r0")
        worker.rows = list(frames)
        worker.wait_caught_up()
        thread = threading.Thread(target=reader)
        thread.start()
        replay = subprocess.Popen(
            replay_command(kappa, topic, "seq", "--processes", "2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=run_env(),
            start_new_session=True,
        )
        for seed in range(41, 81):  # loads go on while the replay catches up and switches
            frame = sample_frame(1_000, 200, seed=seed)
            load_frame(kappa, tmp_path, topic, frame, f"r{seed}")
            frames.append(frame)
            if replay.poll() is not None and seed >= 43:
                break
        out, err = replay.communicate(timeout=300)
        assert replay.returncode == 0, err.decode()
        assert "generation 2" in out.decode() and "replacing generation 1" in out.decode()
        assert "p0:" in err.decode(), "the replay shows per-partition progress"

        expected = oracle(tmp_path, frames, "seq")

        def caught_up():
            _, table, manifest = read_latest(kappa.snapshot_dir, topic)
            ends = {str(p): o for p, o in worker_ends(kappa.broker, topic).items()}
            return (table, manifest) if manifest["generation"] == 2 and manifest["offsets"] == ends else None

        table, manifest = wait_for(caught_up, 180, "generation 2 to catch up with lag 0")
        assert_matches(table, expected)
        assert manifest["definition"]["value"] == "seq"
        time.sleep(1.5)  # a retired generation that still published would show up now
    finally:
        done.set()
        kill_after = worker.stop() if worker.process.poll() is None else worker.process.returncode
        kill_group(worker)
    thread.join(timeout=30)
    assert kill_after == 0
    assert problems == []
    generations = [generation for generation, _ in seen]
    assert generations[0] == 1 and generations[-1] == 2 and generations == sorted(generations)
    assert not (kappa.data_dir / "state" / topic / "g1").exists()
    assert not (kappa.snapshot_dir / topic / ".parts" / "g1").exists()
    assert app_id(topic, 1) not in consumer_groups(kappa.broker)
    assert partition_count(kappa.broker, changelog_topic(topic, 1)) is None
    registry = json.loads((kappa.snapshot_dir / topic / "generations.json").read_text())
    assert registry["current"] == 2 and registry["generations"]["1"]["state"] == "retired"


def worker_ends(broker: str, topic: str) -> dict[int, int]:
    from kappa.kafka.admin import end_offsets

    return end_offsets(broker, topic, partition_count(broker, topic))


def assert_first_generation_matches(kappa, topic: str, path) -> None:
    """The latest snapshot is generation 1's, complete, and both files match pandas over `path`."""
    csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    expected = pandas_expectation(str(path), KEY, "amount")
    assert_matches(csv_table, expected)
    assert_matches(parquet_table, expected)
    assert manifest["generation"] == 1 and manifest["complete"] is True


def test_killed_replay_resumes_exactly_and_a_second_replay_is_refused(kappa, tmp_path):
    topic = kappa.topic()
    frame = sample_frame(60_000, 400, seed=50)
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=4)
    paced = kappa.paced_replay_env(app_id(topic, 1), 100_000)  # about 15 s per pass, so "midway" exists
    first = subprocess.Popen(
        replay_command(kappa, topic, "amount"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=paced,
        start_new_session=True,
    )
    try:

        def midway():
            committed = committed_offsets(kappa.broker, app_id(topic, 1), topic, 4)
            total = sum(offset or 0 for offset in committed.values())
            return total if 0 < total < 60_000 else None

        wait_for(midway, 120, "the replay to be midway")
        second = subprocess.run(
            replay_command(kappa, topic, "amount"), capture_output=True, text=True, env=run_env(), timeout=60
        )
        assert second.returncode != 0
        assert "already being built" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        kill_tree(first)  # the replay and anything it started
    resumed = subprocess.run(
        replay_command(kappa, topic, "amount"), capture_output=True, text=True, env=run_env(), timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming generation 1 from the offsets it committed (" in resumed.stderr, resumed.stderr
    assert_first_generation_matches(kappa, topic, path)


def test_a_replay_beside_live_does_not_switch_to_a_generation_whose_log_gained_a_partition(kappa, tmp_path):
    """The replay read the partitions it started with and replaced the current generation with
    counts that left out the new partition, complete by its manifest; the live worker could
    then never run the new generation, and the old one's state was deleted."""
    topic = kappa.topic()
    path, later = tmp_path / "rows.csv", tmp_path / "later.csv"
    sample_frame(40_000, 300, seed=52).to_csv(path, index=False)
    sample_frame(2_000, 300, seed=53).to_csv(later, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    kappa.replay_batch(topic, "amount", KEY)
    paced = kappa.paced_replay_env(app_id(topic, 2), 100_000)  # about 10 s, so "midway" exists
    replay = subprocess.Popen(
        replay_command(kappa, topic, "amount"), stderr=subprocess.PIPE, text=True, env=paced, start_new_session=True
    )
    try:

        def midway():
            committed = committed_offsets(kappa.broker, app_id(topic, 2), topic, 2)
            return sum(offset or 0 for offset in committed.values()) or None

        wait_for(midway, 120, "the replay to be midway")
        admin(kappa.broker).create_partitions([NewPartitions(topic, 3)])[topic].result(timeout=30)
        kappa.load(later, KEY, topic)
        _, stderr = replay.communicate(timeout=300)
    finally:
        kill_tree(replay)
    last = stderr.strip().splitlines()[-1]
    assert replay.returncode == 2, stderr
    assert "has 3 partitions, but generation 2" in last and "run `kappa replay`" in last, last
    assert json.loads((kappa.snapshot_dir / topic / "generations.json").read_text())["current"] == 1
    assert_first_generation_matches(kappa, topic, path)
    assert partition_count(kappa.broker, changelog_topic(topic, 2)) is None


def test_a_replay_gives_up_on_a_process_that_keeps_exiting(kappa, tmp_path):
    """A process that failed at every start was restarted every second, with its traceback,
    until the user stopped the replay."""
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(60_000, 300, seed=54).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    paced = kappa.paced_replay_env(app_id(topic, 1), 50_000)  # about 30 s: the kills come well before the end
    command = kappa_command("replay", "--topic", topic, "--value", "amount", "--key", KEY, *kappa.args())
    replay = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=paced, cwd=REPO, start_new_session=True)
    try:
        killed: set[int] = set()
        for _ in range(5):

            def fresh_child() -> set[int]:
                found = subprocess.run(["pgrep", "-P", str(replay.pid)], capture_output=True, text=True).stdout
                return ({int(pid) for pid in found.split()} - killed) if replay.poll() is None else {-1}

            (child,) = wait_for(fresh_child, 120, "a worker process of the replay")
            if child == -1:
                break
            os.kill(child, signal.SIGKILL)
            killed.add(child)
        _, stderr = replay.communicate(timeout=120)
    finally:
        kill_tree(replay)
    last = stderr.strip().splitlines()[-1]
    assert replay.returncode == 2 and len(killed) == 5, stderr
    assert "process 0 of the replay exited 5 times within 60s (last exit code -9)" in last, last
    assert "run the same replay again to resume it" in last, last
    assert json.loads((kappa.snapshot_dir / topic / "generations.json").read_text())["current"] is None


@pytest.mark.parametrize("batch", [True, False])
def test_truncated_log_is_refused_unless_allowed(kappa, tmp_path, batch):
    topic = kappa.topic()
    client = admin(kappa.broker)
    futures = client.create_topics([NewTopic(topic, 1, 1, config={"retention.ms": "86400000"})])
    futures[topic].result(timeout=30)
    frame = sample_frame(1_000, 20, seed=60)
    load_frame(kappa, tmp_path, topic, frame, "rows")
    deleted = client.delete_records([TopicPartition(topic, 0, 100)], request_timeout=30)
    list(deleted.values())[0].result(timeout=30)
    mode = ["--batch"] if batch else []
    refused = subprocess.run(
        replay_command(kappa, topic, "amount", *mode), capture_output=True, text=True, env=run_env(), timeout=120
    )
    assert refused.returncode != 0
    assert "no longer starts at offset 0" in refused.stderr and "--allow-truncated" in refused.stderr
    assert "finite retention" in refused.stderr
    allowed = subprocess.run(
        replay_command(kappa, topic, "amount", *mode, "--allow-truncated"),
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=300,
    )
    assert allowed.returncode == 0, allowed.stderr
    _, table, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["records"]["counted"] + manifest["records"]["skipped"] == 900


def test_a_replays_processes_write_their_parts_on_reaching_its_end_offsets(kappa, tmp_path):
    """With a snapshot interval longer than any test, the parts the replay publishes from can
    only come from its processes noticing they reached the end offsets; before, they waited
    for the interval and the replay for them."""
    topic = kappa.topic()
    frame = sample_frame(20_000, 300, seed=61)
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=4)
    done = subprocess.run(
        replay_command(kappa, topic, "amount", "--processes", "2", "--snapshot-interval", "3600"),
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert_first_generation_matches(kappa, topic, path)


def test_no_process_of_a_replay_imports_pandas(kappa, tmp_path):
    """pyarrow imports pandas the first time it builds an array, only to ask whether its input
    is a pandas object: 0.2 s of CPU in every process. The workers refused it already; the
    supervisor imported it for its first publish."""
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(5_000, 100, seed=63).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=4)
    done = subprocess.run(
        replay_command(kappa, topic, "amount", "--processes", "2"),
        capture_output=True,
        text=True,
        env={**run_env(), "PYTHONPROFILEIMPORTTIME": "1"},
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = imported_modules(done.stderr)
    assert imported.count("kappa.lifecycle.switchover") == 1, "the supervisor's imports were not listed"
    assert imported.count("faust.app.base") == 2, "the workers' imports were not listed"
    # a refused import is listed too, as `pandas` alone; an import that happens brings pandas.core and the rest
    assert [module for module in imported if module.startswith("pandas.")] == []
    assert_first_generation_matches(kappa, topic, path)


def test_a_finished_replays_group_has_committed_its_end_offsets(kappa, tmp_path):
    """A replay stops its processes right after their last record; each commits what its table
    reached before it stops, so the group shows no lag that is not there. Paced by a broker
    quota, whose throttling holds the periodic commits back for seconds."""
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(60_000, 300, seed=62).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=4)
    paced = kappa.paced_replay_env(app_id(topic, 1), 400_000)
    done = subprocess.run(
        replay_command(kappa, topic, "amount"), capture_output=True, text=True, env=paced, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert_first_generation_matches(kappa, topic, path)
    assert committed_offsets(kappa.broker, app_id(topic, 1), topic, 4) == worker_ends(kappa.broker, topic)
    # paced, the records take seconds to apply: that span is reported, and lies within the replay's time
    found = re.search(r"caught up in ([0-9.]+)s, applying records for ([0-9.]+)s", done.stdout)
    assert found, done.stdout
    caught_up, applying = float(found.group(1)), float(found.group(2))
    assert 0 < applying <= caught_up
