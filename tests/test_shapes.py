"""Pipelines of every shape: composite keys, several values, event-time windows, kappa.toml.

For each, the snapshot equals the pandas oracle over the input files, in batch and live,
whatever the order in which records arrive (late records update their window).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import orjson
import pandas as pd
import pyarrow.parquet as pq
import pytest

from kappa.codec import event_second
from tests.datagen import AWKWARD_KEYS
from tests.helpers import REPO
from tests.live import kill_group, start_worker
from tests.oracle import assert_shape_matches, latest_dir, shape_expectation

KEYS, VALUES = ["city", "vendor"], ["fare", "tip"]
SHAPE = ["--key", "city,vendor", "--value", "fare,tip", "--window", "1h", "--time", "pickup_at"]
VENDORS = ["007", "7", "a,b", 'say "hi"', "V1", "V2", "line\nbreak"]
START = pd.Timestamp("2024-03-01T00:00:00")


def trips(rows: int, seed: int, hours: int = 48) -> pd.DataFrame:
    """Trips over `hours` hours: awkward keys in both key fields, NaN fares and (other) NaN
    tips, some rows without a key field or a time."""
    rng = np.random.default_rng(seed)
    city = np.array(AWKWARD_KEYS[:8], dtype=object)[rng.integers(0, 8, rows)]
    vendor = np.array(VENDORS, dtype=object)[rng.integers(0, len(VENDORS), rows)]
    city[rng.random(rows) < 0.01] = None
    vendor[rng.random(rows) < 0.01] = None
    fare = rng.normal(20, 8, rows).round(2)
    fare[rng.random(rows) < 0.05] = np.nan
    tip = rng.normal(3, 1, rows).round(2)
    tip[rng.random(rows) < 0.1] = np.nan
    seconds = rng.integers(0, hours * 3600, rows)
    stamps = (START + pd.to_timedelta(seconds, unit="s")).strftime("%Y-%m-%dT%H:%M:%S").to_numpy(dtype=object)
    stamps[rng.random(rows) < 0.01] = None
    return pd.DataFrame({"city": city, "vendor": vendor, "fare": fare, "tip": tip, "pickup_at": stamps})


def start_kappa(kappa, *args: str) -> subprocess.Popen:
    """A long-running `kappa` command in its own session (the test kills the group)."""
    command = [sys.executable, "-m", "kappa", *args, *kappa.args()]
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO
    )


def latest_table(kappa, pipeline: str) -> tuple[pd.DataFrame, dict]:
    directory = latest_dir(kappa.snapshot_dir, pipeline)
    return pq.read_table(directory / "table.parquet").to_pandas(), json.loads((directory / "manifest.json").read_text())


def oracle(tmp_path, frames: list[pd.DataFrame], name: str = "all.csv", **shape) -> pd.DataFrame:
    path = tmp_path / name
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return shape_expectation(str(path), **shape)


def test_composite_keys_values_and_windows_in_batch(kappa, tmp_path):
    frame = trips(20_000, seed=1)
    path = tmp_path / "trips.csv"
    frame.to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, "city", topic, partitions=4)
    kappa.run("replay", "--topic", topic, *SHAPE, "--batch")

    table, manifest = latest_table(kappa, topic)
    expected = shape_expectation(str(path), KEYS, VALUES, "1h", "pickup_at")
    assert_shape_matches(table, expected)
    assert str(table["window_start"].dtype) == "datetime64[s, UTC]" or "UTC" in str(table["window_start"].dtype)
    csv = (latest_dir(kappa.snapshot_dir, topic) / "table.csv").read_text().splitlines()
    assert csv[0] == "city,vendor,window_start,fare_count,fare_sum,fare_mean,tip_count,tip_sum,tip_mean"
    assert "2024-03-01T00:00:00Z" in (latest_dir(kappa.snapshot_dir, topic) / "table.csv").read_text()
    values = manifest["records"]["values"]
    assert values["fare"]["counted"] == int(expected["fare_count"].sum())
    assert values["tip"]["counted"] == int(expected["tip_count"].sum())
    assert manifest["keys"] == len(expected)

    # one key and one value of the same log keep today's columns
    kappa.run("replay", "--topic", topic, "--key", "vendor", "--value", "tip", "--batch")
    table, _ = latest_table(kappa, topic)
    assert_shape_matches(table.rename(columns={"key": "vendor"}), shape_expectation(str(path), ["vendor"], ["tip"]))


def test_epoch_times_record_timestamps_and_unparseable_times(kappa, tmp_path):
    rows = [
        {"k": "a", "v": 1, "t": 1_700_000_000_000},
        {"k": "a", "v": 2, "t": 1_700_003_700_500},
        {"k": "b", "v": 3, "t": None},
        {"k": "b", "v": 4, "t": "yesterday"},
        {"k": "b", "v": 5, "t": 1_700_000_000_001},
    ]
    topic = kappa.topic()
    lines = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    kappa.run("load", "-", "--key", "k", "--topic", topic, "--partitions", "1", stdin=lines)
    kappa.run("replay", "--topic", topic, "--key", "k", "--value", "v", "--window", "1h", "--time", "t",
              "--time-unit", "ms", "--batch")  # fmt: skip
    table, manifest = latest_table(kappa, topic)
    got = {(r.key, r.window_start.isoformat()): (r["count"], r["sum"]) for _, r in table.iterrows()}
    assert got == {
        ("a", "2023-11-14T22:00:00+00:00"): (1, 1.0),
        ("a", "2023-11-14T23:00:00+00:00"): (1, 2.0),
        ("b", "2023-11-14T22:00:00+00:00"): (1, 5.0),
    }
    assert manifest["records"] == {"counted": 3, "skipped": 1, "rejected": 1}
    # the record timestamp: every row was produced just now
    kappa.run("replay", "--topic", topic, "--key", "k", "--value", "v", "--window", "1d", "--time", "@timestamp",
              "--batch", "--pipeline", f"{topic}-ts")  # fmt: skip
    table, manifest = latest_table(kappa, f"{topic}-ts")
    assert table["count"].sum() == 5 and manifest["records"]["rejected"] == 0
    assert set(table["window_start"].dt.date) == {pd.Timestamp.now(tz="UTC").floor("1d").date()}


def test_event_time_parsing_rules():
    assert event_second("2024-03-01T10:59:59", "s") == event_second("2024-03-01T10:59:59Z", "s")
    assert event_second("2024-03-01T12:00:00+02:00", "s") == event_second("2024-03-01T10:00:00", "s")
    assert event_second("2024-03-01T10:00:00.999", "s") == event_second("2024-03-01T10:00:00", "s")
    assert event_second(-0.5, "s") == -1 and event_second(1500, "ms") == 1
    assert event_second(None, "s") is None and event_second("  ", "s") is None
    assert isinstance(event_second("03/01/2024", "s"), str) and isinstance(event_second(True, "s"), str)


@pytest.mark.parametrize(
    "text",
    ["2024", "2024-03", " 2024-03 ", "2024-03-01", "20240301", "2024-03-01T10", "2024-03-01T10:00Z",
     "2024-03-01t10:00:00", "2024-03-01T10:00:00z", "2024-03-01T10:00:00.5z", "2024-03-01 10:00:00+01",
     "2024-03-01T10:00:00-05:30", "1969-12-31T23:59:59.999999", "2024-12-31T23:59:59.123456789"],
)  # fmt: skip
def test_every_iso_8601_text_pandas_reads_falls_in_the_second_pandas_gives(text):
    """A reduced precision (`2024`, `2024-03`) or a lowercase `z` was rejected, where pandas reads
    both: a window over such a column lost every row to the dead-letter topic."""
    expected = pd.to_datetime(pd.Series([text]), utc=True)[0].floor("s")
    assert event_second(text, "s") == int(expected.timestamp())


@pytest.mark.parametrize("text", ["2024-13", "2024-00", "202", "20241", "2024-03-01T10:00:00zz", "2024-03-01z"])
def test_a_text_that_only_looks_like_a_reduced_iso_date_is_rejected(text):
    assert "is not ISO 8601" in event_second(text, "s")


@pytest.mark.slow
def test_live_equals_batch_with_late_records_from_an_outside_producer(kappa, tmp_path):
    topic = kappa.topic()
    config = tmp_path / "kappa.toml"
    config.write_text(
        f'[pipelines.trips]\ntopic = "{topic}"\nkey = ["city", "vendor"]\nvalue = ["fare", "tip"]\n'
        'window = "1h"\ntime = "pickup_at"\n'
    )
    first = trips(5_000, seed=2)
    path = tmp_path / "first.csv"
    first.to_csv(path, index=False)
    kappa.load(path, "city", topic, partitions=4)
    worker = start_kappa(
        kappa, "worker", "trips", "--config", str(config), "--processes", "2", "--snapshot-interval", "0.5"
    )
    frames = [first]
    try:
        for seed in (3, 4):
            late = trips(2_000, seed=seed, hours=48).sample(frac=1.0, random_state=seed)  # hours out of order
            late = late[late["city"].notna() & ~late["city"].str.contains("\n", na=False)]
            lines = b"".join(
                (row["city"] or "").encode() + b"\t" + orjson.dumps(row) + b"\n" for row in late.to_dict("records")
            )
            subprocess.run(["kcat", "-P", "-b", kappa.broker, "-t", topic, "-K", "\t"], input=lines, check=True)
            frames.append(late)
            expected = oracle(tmp_path, frames, keys=KEYS, values=VALUES, window="1h", time="pickup_at")
            table = wait_for_records(kappa, "trips", sum(len(f) for f in frames))
            assert_shape_matches(table, expected)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=90)
    kappa.run("replay", "trips", "--config", str(config), "--batch")
    batch, manifest = latest_table(kappa, "trips")
    assert manifest["generation"] == 2
    assert_shape_matches(batch, expected)


def worker_processes(supervisor: int, timeout: float = 60) -> list[int]:
    """The pids of a supervisor's worker processes, once it has started them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout
        if listing.split():
            return [int(pid) for pid in listing.split()]
        time.sleep(0.2)
    raise AssertionError(f"supervisor {supervisor} started no worker process within {timeout}s")


def wait_for_records(kappa, pipeline: str, records: int, timeout: float = 180) -> pd.DataFrame:
    """The latest table once its manifest covers `records` records with lag 0."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            table, manifest = latest_table(kappa, pipeline)
            seen = sum(manifest["records"][kind] for kind in ("counted", "skipped", "rejected"))
            if manifest["complete"] and seen == records:
                return table
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"no complete snapshot of {records} records within {timeout}s")


@pytest.mark.slow
def test_kill_9_of_a_worker_process_on_a_windowed_composite_pipeline(kappa, tmp_path):
    topic = kappa.topic()
    frames = [trips(30_000, seed=5)]
    path = tmp_path / "a.csv"
    frames[0].to_csv(path, index=False)
    kappa.load(path, "city", topic, partitions=4)
    worker = start_kappa(kappa, "worker", "--topic", topic, *SHAPE, "--processes", "2", "--snapshot-interval", "0.5")
    try:
        for seed in (6, 7):
            time.sleep(2.0)
            children = worker_processes(worker.pid)
            os.kill(children[0], signal.SIGKILL)
            more = trips(5_000, seed=seed)
            more_path = tmp_path / f"{seed}.csv"
            more.to_csv(more_path, index=False)
            kappa.load(more_path, "city", topic)
            frames.append(more)
        expected = oracle(tmp_path, frames, keys=KEYS, values=VALUES, window="1h", time="pickup_at")
        table = wait_for_records(kappa, topic, sum(len(f) for f in frames))
        assert_shape_matches(table, expected)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)


@pytest.mark.slow
def test_a_replay_of_a_changed_definition_in_kappa_toml_switches_without_mixed_snapshots(kappa, tmp_path):
    topic = kappa.topic()
    config = tmp_path / "kappa.toml"
    frame = trips(20_000, seed=8)
    path = tmp_path / "trips.csv"
    frame.to_csv(path, index=False)
    kappa.load(path, "city", topic, partitions=4)
    worker = start_worker(kappa, topic, "fare", "city", processes=2, interval=0.5)
    worker.partitions = 4
    seen: list[tuple[list[str], dict]] = []
    stop = threading.Event()

    def watch() -> None:
        last = None
        while not stop.is_set():
            try:
                directory = latest_dir(kappa.snapshot_dir, topic)
                if directory != last:
                    columns = (directory / "table.csv").read_text().splitlines()[0].split(",")
                    seen.append((columns, json.loads((directory / "manifest.json").read_text())))
                    last = directory
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        worker.wait_caught_up(timeout=180)
        config.write_text(
            f'[pipelines.{topic}]\ntopic = "{topic}"\nkey = "city"\nvalue = ["fare", "tip"]\n'
            'window = "1h"\ntime = "pickup_at"\n'
        )
        replay = kappa.run("replay", topic, "--config", str(config), timeout=300)
        assert "is current" in replay.stdout.decode()
        time.sleep(2)
    finally:
        stop.set()
        watcher.join()
        kill_group(worker)
    table, manifest = latest_table(kappa, topic)
    assert manifest["generation"] == 2
    assert_shape_matches(
        table.rename(columns={"key": "city"}),
        shape_expectation(str(path), ["city"], VALUES, "1h", "pickup_at"),
    )
    for columns, manifest in seen:  # every snapshot a reader saw is one definition, whole
        if manifest["generation"] == 1:
            assert columns == ["key", "count", "sum", "mean"]
        else:
            assert columns[:2] == ["key", "window_start"] and "tip_mean" in columns
    assert {m["generation"] for _, m in seen} == {1, 2}


def test_key_fields_keep_their_text_as_written_in_the_csv(kappa, tmp_path):
    """The load guessed each CSV column's type, chunk by chunk: an integer column with a field
    missing in its second chunk gave keys `1` and `1.0` for one vendor, and `01` became `1`.
    Every field is now on the log as written; the oracle reads the key fields with dtype=str."""
    rows = 150_000  # two of the loader's chunks
    rng = np.random.default_rng(31)
    vendor = rng.integers(1, 4, rows).astype(str).astype(object)
    vendor[100_000:][rng.random(rows - 100_000) < 0.05] = None  # missing only in the second chunk
    frame = pd.DataFrame(
        {
            "city": np.array(["A", "B"], dtype=object)[rng.integers(0, 2, rows)],
            "vendor": vendor,
            "zip": np.array(["01", "02", "10", "+3", "4.50", "1e3"], dtype=object)[rng.integers(0, 6, rows)],
            "fare": [f"{fare:.2f}" for fare in rng.normal(20, 8, rows)],  # `12.50`: text a float would not give back
        }
    )
    path = tmp_path / "trips.csv"
    frame.to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, "city", topic, partitions=4)

    kappa.run("replay", "--topic", topic, "--key", "city,vendor,zip", "--value", "fare", "--batch")
    table, manifest = latest_table(kappa, topic)
    expected = shape_expectation(str(path), ["city", "vendor", "zip"], ["fare"])
    assert sorted(set(table["zip"])) == ["+3", "01", "02", "10", "1e3", "4.50"]
    assert_shape_matches(table, expected)
    assert manifest["records"]["counted"] == int(expected["count"].sum())

    kappa.run("replay", "--topic", topic, "--key", "fare", "--value", "vendor", "--batch")
    table, _ = latest_table(kappa, topic)
    assert_shape_matches(table.rename(columns={"key": "fare"}), shape_expectation(str(path), ["fare"], ["vendor"]))


def replay_parquet_as_its_csv(kappa, tmp_path, frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Load `frame` as Parquet (message key: its last key field), replay it by `keys`, and check
    the table against the oracle over the same rows written as CSV and read with dtype=str."""
    path = tmp_path / "rows.parquet"
    frame.to_parquet(path, index=False)
    frame.to_csv(tmp_path / "rows.csv", index=False)
    topic = kappa.topic()
    kappa.load(path, keys[-1], topic, partitions=2)
    kappa.run("replay", "--topic", topic, "--key", ",".join(keys), "--value", value, "--batch")
    table, _ = latest_table(kappa, topic)
    assert_shape_matches(table, shape_expectation(str(tmp_path / "rows.csv"), keys, [value]))
    return table


def test_parquet_integer_keys_with_missing_values_stay_integers(kappa, tmp_path):
    """Parquet's integer column with a missing value was read as floats: every vendor `1` became
    the key `1.0`. The oracle reads the same rows from their CSV with dtype=str."""
    rows = 30_000
    rng = np.random.default_rng(32)
    vendor = pd.array(rng.integers(1, 4, rows), dtype="Int64")
    vendor[rng.random(rows) < 0.05] = pd.NA
    frame = pd.DataFrame(
        {
            "city": np.array(["A", "B"], dtype=object)[rng.integers(0, 2, rows)],
            "vendor": vendor,
            "fare": rng.normal(20, 8, rows).round(2),
        }  # fmt: skip
    )
    table = replay_parquet_as_its_csv(kappa, tmp_path, frame, ["city", "vendor"], "fare")
    assert sorted(set(table["vendor"])) == ["1", "2", "3"]


def test_an_infinite_parquet_float_is_a_key_as_its_text_is_in_a_csv(kappa, tmp_path):
    """A Parquet float column wrote ±inf as null, so a row keyed by it was skipped, where pandas
    groups it under `inf` (and a CSV's `inf` stays a key). As a value it is still skipped."""
    rows = 6_000
    rng = np.random.default_rng(33)
    frame = pd.DataFrame(
        {
            "city": np.array(["A", "B"], dtype=object)[rng.integers(0, 2, rows)],
            "grade": np.array([1.5, np.inf, -np.inf, 2.0, np.nan])[rng.integers(0, 5, rows)],
            "fare": np.where(rng.random(rows) < 0.1, np.inf, rng.normal(20, 8, rows).round(2)),
        }
    )
    table = replay_parquet_as_its_csv(kappa, tmp_path, frame, ["city", "grade"], "fare")
    assert sorted(set(table["grade"])) == ["-inf", "1.5", "2.0", "inf"]


def test_an_empty_text_key_in_parquet_or_json_lines_is_a_group_as_pandas_has_it(kappa, tmp_path):
    """A Parquet or JSON Lines key field holding "" was skipped (its rows lost), where pandas
    groups it under "" (only a missing key drops a row; a CSV's empty field is missing). Checked
    for one key field, for the message key, and as one field of a composite key."""
    rows = 3_000
    rng = np.random.default_rng(61)
    city = np.array(["A", "B", ""], dtype=object)[rng.integers(0, 3, rows)]
    city[rng.random(rows) < 0.05] = None
    region = np.array(["x", ""], dtype=object)[rng.integers(0, 2, rows)]
    frame = pd.DataFrame({"city": city, "region": region, "fare": rng.normal(20, 8, rows).round(2)})
    parquet, jsonl = tmp_path / "rows.parquet", tmp_path / "rows.jsonl"
    frame.to_parquet(parquet, index=False)
    jsonl.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in frame.to_dict("records")))
    for path in (parquet, jsonl):
        topic = kappa.topic(f"-{path.suffix[1:]}")
        kappa.load(path, "city", topic, partitions=2)
        for keys in (["city"], ["city", "region"], None):
            pipeline = f"{topic}-{len(keys) if keys else 0}"
            by = ["--key", ",".join(keys)] if keys else []
            kappa.run("replay", "--topic", topic, *by, "--value", "fare", "--batch", "--pipeline", pipeline)
            table, _ = latest_table(kappa, pipeline)
            expected = shape_expectation(str(path), keys or ["city"], ["fare"])
            if len(keys or ["city"]) == 1:
                expected.index.name = "key"
            assert_shape_matches(table, expected)
            assert "" in set(table["key" if not keys or len(keys) == 1 else "city"]), (path.name, keys)


JSON_NUMBER_KEYS = [b"1.50", b"1e3", b"1E+2", b"-0", b"-0.0", b"1e-7", b"12345678901234567890", b"7", b"true", b"[]"]
JSON_NUMBER_KEYS += [b"[1, 2]", b'{"a": 1}', b'"text"', b'""', b"null"]


def test_the_message_key_groups_as_the_key_field_does(kappa, tmp_path):
    """Without --key the message key is the group key, so the loader must write each row's key field
    as the replay by --key reads it: JSON Lines `1.50` was the message key `1.5` but the group `1.50`,
    `[]` a message key where the field is no key, and a Parquet float 1e-7 the key `1e-07` where its
    message says `1e-7`. A replay of the same topic by the message key and by the field now agree."""
    rng = np.random.default_rng(71)
    rows = [
        b'{"k": %s, "fare": %d}' % (JSON_NUMBER_KEYS[i], fare)
        for i, fare in zip(rng.integers(0, len(JSON_NUMBER_KEYS), 2_000), rng.integers(0, 100, 2_000), strict=True)
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes(b"\n".join(rows) + b"\n")
    parquet = tmp_path / "rows.parquet"
    floats = np.array([1.5, 1e-7, 1e20, 0.1 + 0.2, -0.0, np.nan, 1e16, np.inf])[rng.integers(0, 8, 2_000)]
    pd.DataFrame({"k": floats, "fare": rng.integers(0, 100, 2_000)}).to_parquet(parquet, index=False)
    for path in (jsonl, parquet):
        topic = kappa.topic(f"-{path.suffix[1:]}")
        kappa.load(path, "k", topic, partitions=2)
        tables = []
        for pipeline, by in ((f"{topic}-field", ["--key", "k"]), (f"{topic}-message", [])):
            kappa.run("replay", "--topic", topic, *by, "--value", "fare", "--batch", "--pipeline", pipeline)
            tables.append(latest_table(kappa, pipeline))
        (by_field, field_manifest), (by_message, message_manifest) = tables
        pd.testing.assert_frame_equal(by_message, by_field)
        assert message_manifest["records"] == field_manifest["records"], path.name
        assert by_field["count"].sum() > 0
