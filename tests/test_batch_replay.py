"""Foundation: load a file into the log, replay it in batch, and check the snapshot against pandas."""

from __future__ import annotations

import os
import shutil

import numpy as np
import orjson
import pandas as pd
import pytest

from kappa import read_snapshot
from kappa.engine.names import app_id
from kappa.kafka.admin import committed_offsets
from tests.datagen import AWKWARD_KEYS, pandas_expectation, sample_frame
from tests.helpers import high_watermarks, imported_modules, run_kappa
from tests.oracle import assert_matches, assert_tables_identical, read_latest

KEY, VALUE = "city", "amount"


@pytest.fixture(scope="module")
def generated_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "generated.csv"
    sample_frame(60_000, 600).to_csv(path, index=False)
    return path


def test_generated_data_matches_pandas(kappa, generated_csv):
    topic = kappa.topic()
    loaded = kappa.load(generated_csv, KEY, topic, partitions=8)
    assert "loaded 60,000 rows" in loaded.stdout.decode()
    kappa.replay_batch(topic, VALUE, KEY)

    expected = pandas_expectation(str(generated_csv), KEY, VALUE)
    csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    assert set(AWKWARD_KEYS) <= set(csv_table["key"])
    assert_matches(csv_table, expected)
    assert_matches(parquet_table, expected)
    assert parquet_table["count"].dtype == np.int64 and parquet_table["mean"].dtype == np.float64

    raw = pd.read_csv(generated_csv, dtype={KEY: str})
    keyless = int(raw[KEY].isna().sum())
    no_value = int((raw[KEY].notna() & raw[VALUE].isna()).sum())
    assert manifest["records"] == {
        "counted": int(expected["count"].sum()),
        "skipped": keyless + no_value,
        "rejected": 0,
    }
    assert manifest["keys"] == len(expected)
    assert manifest["complete"] is True
    assert manifest["offsets"] == manifest["end_offsets"]
    # the whole log: its 60,000 records (manifest["records"] above) and the load's commit markers
    assert manifest["end_offsets"] == {str(p): end for p, end in high_watermarks(kappa.broker, topic).items()}
    assert manifest["generation"] == 1
    # the generation's group is left at the cut, for `kappa status` and a live worker
    committed = committed_offsets(kappa.broker, app_id(topic, 1), topic, 8)
    assert {str(p): offset for p, offset in committed.items()} == manifest["end_offsets"]

    frame, api_manifest = read_snapshot(kappa.snapshot_dir, topic)
    assert api_manifest == manifest
    assert_matches(frame, expected)


def test_a_replay_imports_no_http_client(kappa, tmp_path):
    """Faust imports the HTTP client its settings name (aiohttp's, about 0.12 s of every
    process's start) unless told otherwise; kappa's apps make no HTTP calls."""
    topic, path = kappa.topic(), tmp_path / "rows.csv"
    sample_frame(2_000, 50, seed=30).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    replay = ["replay", "--topic", topic, "--value", VALUE, "--key", KEY, "--batch", *kappa.args()]
    result = run_kappa(replay, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}, timeout=300, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = imported_modules(result.stderr)
    assert "faust.app.base" in imported, "the replay's imports were not listed"
    assert [module for module in imported if module.split(".")[0] == "aiohttp"] == []
    csv_table, _, _ = read_latest(kappa.snapshot_dir, topic)
    assert_matches(csv_table, pandas_expectation(str(path), KEY, VALUE))


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_partition_counts_give_the_same_result(kappa, tmp_path, partitions):
    path = tmp_path / "rows.csv"
    sample_frame(8_000, 150, seed=partitions).to_csv(path, index=False)
    topic = kappa.topic()
    kappa.load(path, KEY, topic, partitions=partitions)
    kappa.replay_batch(topic, VALUE, KEY)
    csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    assert len(manifest["offsets"]) == partitions
    expected = pandas_expectation(str(path), KEY, VALUE)
    assert_matches(csv_table, expected)
    assert_matches(parquet_table, expected)


def test_csv_parquet_and_jsonl_inputs_give_the_same_snapshot(kappa, tmp_path):
    frame = sample_frame(6_000, 120, seed=11)
    csv_path, parquet_path, jsonl_path = tmp_path / "r.csv", tmp_path / "r.parquet", tmp_path / "r.jsonl"
    frame.to_csv(csv_path, index=False)
    frame.to_parquet(parquet_path, index=False)
    with open(jsonl_path, "wb") as handle:
        for row in frame.to_dict("records"):
            handle.write(orjson.dumps(row) + b"\n")
    tables = []
    for path in (csv_path, parquet_path, jsonl_path):
        topic = kappa.topic(path.suffix.replace(".", "-"))
        kappa.load(path, KEY, topic, partitions=4)
        kappa.replay_batch(topic, VALUE, KEY)
        csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
        assert_tables_identical(csv_table, parquet_table)
        tables.append((parquet_table, manifest["records"]))
    for table, records in tables[1:]:
        assert_tables_identical(table, tables[0][0])
        assert records == tables[0][1]
    assert_matches(tables[0][0], pandas_expectation(str(csv_path), KEY, VALUE))


def test_jsonl_on_stdin(kappa):
    topic = kappa.topic()
    lines = b"".join(orjson.dumps({"k": k, "v": v}) + b"\n" for k, v in [("a", 1), ("b", 2), ("a", 4), ("c", None)])
    kappa.run("load", "-", "--key", "k", "--topic", topic, stdin=lines)
    kappa.replay_batch(topic, "v", "k")
    frame, manifest = read_snapshot(kappa.snapshot_dir, topic)
    assert frame["key"].tolist() == ["a", "b", "c"]
    assert frame["count"].tolist() == [2, 1, 0]
    assert frame["sum"].tolist() == [5.0, 2.0, 0.0]
    assert frame["mean"].tolist()[:2] == [2.5, 2.0] and np.isnan(frame["mean"].iloc[2])
    assert manifest["records"] == {"counted": 3, "skipped": 1, "rejected": 0}


def test_repeated_replays_are_identical_and_generations_rise(kappa, generated_csv):
    topic = kappa.topic()
    kappa.load(generated_csv, KEY, topic, partitions=3)
    first = kappa.replay_batch(topic, VALUE, KEY)
    first_table, _, first_manifest = read_latest(kappa.snapshot_dir, topic)
    second = kappa.replay_batch(topic, VALUE, KEY)
    second_table, _, second_manifest = read_latest(kappa.snapshot_dir, topic)
    assert (first_manifest["generation"], second_manifest["generation"]) == (1, 2)
    assert "generation 1" in first.stdout.decode() and "generation 2" in second.stdout.decode()
    assert (kappa.snapshot_dir / topic / "latest").readlink().name.startswith("g2-")
    assert_tables_identical(first_table, second_table)
    assert first_manifest["records"] == second_manifest["records"]


def test_a_lost_registry_does_not_resurrect_an_old_generations_state(kappa, tmp_path):
    """The snapshot dir (and its registry) deleted: generation 1 is handed out again, and the
    first run's changelog, group and RocksDB dirs must not leak into it."""
    topic = kappa.topic()
    path = tmp_path / "rows.csv"
    sample_frame(5_000, 50, seed=70).to_csv(path, index=False)
    kappa.load(path, KEY, topic, partitions=2)
    kappa.replay_batch(topic, "seq", KEY)  # another definition, whose table must not survive
    shutil.rmtree(kappa.snapshot_dir)
    again = kappa.replay_batch(topic, VALUE, KEY)
    assert "earlier run left state" in again.stderr.decode()
    csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    expected = pandas_expectation(str(path), KEY, VALUE)
    assert_matches(csv_table, expected)
    assert_matches(parquet_table, expected)
    assert manifest["generation"] == 1


def test_empty_topic_gives_a_valid_empty_snapshot(kappa, tmp_path):
    topic = kappa.topic()
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    kappa.load(empty, "k", topic, partitions=2)
    kappa.replay_batch(topic, "v", "k")
    csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    assert len(csv_table) == 0 and len(parquet_table) == 0
    assert list(parquet_table.columns) == ["key", "count", "sum", "mean"]
    assert manifest["records"] == {"counted": 0, "skipped": 0, "rejected": 0}
    assert manifest["complete"] is True and manifest["keys"] == 0


def test_missing_topic_is_a_clear_error(kappa):
    result = kappa.replay_batch("no-such-topic-here", "v", "k", check=False)
    assert result.returncode != 0
    error = result.stderr.decode().strip().splitlines()
    assert len(error) == 1 and "does not exist" in error[0] and "kappa load" in error[0]
    assert not (kappa.snapshot_dir / "no-such-topic-here" / "latest").exists()
