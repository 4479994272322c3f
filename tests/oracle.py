"""Comparing a published snapshot with the pandas expectation (tests/datagen.pandas_expectation): the same
keys in order and the same counts; sums and means equal within RTOL (relative)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tables.aggregate import output_schema

RTOL = 1e-9


def read_csv_table(path: Path) -> pd.DataFrame:
    """table.csv as a user reads it: keys are strings, an empty mean is missing."""
    return pd.read_csv(path, dtype={"key": str}, keep_default_na=False, na_values={"mean": [""]})


def latest_dir(snapshot_dir: Path, pipeline: str) -> Path:
    link = snapshot_dir / pipeline / "latest"
    return link.parent / link.readlink()


def read_latest(snapshot_dir: Path, pipeline: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    directory = latest_dir(snapshot_dir, pipeline)
    manifest = json.loads((directory / "manifest.json").read_text())
    return read_csv_table(directory / "table.csv"), pq.read_table(directory / "table.parquet").to_pandas(), manifest


def assert_matches(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Counts exactly; sums and means to a relative 1e-9; the same keys, sorted."""
    assert list(table.columns) == output_schema().names
    assert table["key"].tolist() == sorted(table["key"].tolist()), "rows are not sorted by key"
    expected = expected.sort_index()
    got = table.set_index("key").sort_index()
    assert got.index.tolist() == expected.index.tolist()
    count_diff = got["count"].astype("int64") - expected["count"].astype("int64")
    wrong = count_diff[count_diff != 0]
    assert wrong.empty, f"{len(wrong)} keys have wrong counts (got - expected): {wrong.head(10).to_dict()}"
    np.testing.assert_allclose(got["sum"].to_numpy(float), expected["sum"].to_numpy(float), rtol=RTOL, atol=1e-6)
    got_mean, want_mean = got["mean"].to_numpy(float), expected["mean"].to_numpy(float)
    assert np.array_equal(np.isnan(got_mean), np.isnan(want_mean)), "empty means differ"
    np.testing.assert_allclose(got_mean, want_mean, rtol=RTOL, atol=1e-9, equal_nan=True)


def assert_tables_identical(left: pd.DataFrame, right: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        left.reset_index(drop=True), right.reset_index(drop=True), check_exact=False, rtol=RTOL
    )


def shape_expectation(
    path: str, keys: list[str], values: list[str], window: str | None = None, time: str | None = None, unit=None
) -> pd.DataFrame:
    """The pandas oracle for any pipeline shape, over the input file:
    `df.groupby([*keys, floor(time, window)])[values].agg(["count", "sum", "mean"])`. A CSV's key
    fields are read as text (dtype=str); a Parquet or JSON Lines file is read as pandas reads it."""
    df = read_input(path, keys).dropna(subset=keys)
    groups: list = list(keys)
    for value in values:
        df[value] = pd.to_numeric(df[value]).replace([np.inf, -np.inf], np.nan)
    if window is not None:
        stamps = pd.to_datetime(df[time], utc=True, unit=unit) if unit else pd.to_datetime(df[time], utc=True)
        df["window_start"] = stamps.dt.floor(pd.Timedelta(window))
        groups.append("window_start")
    expected = df.groupby(groups)[values].agg(["count", "sum", "mean"])
    if len(values) == 1:
        expected.columns = ["count", "sum", "mean"]
    else:
        expected.columns = [f"{value}_{agg}" for value, agg in expected.columns]
    return expected


def read_input(path: str, keys: list[str]) -> pd.DataFrame:
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    if path.endswith(".jsonl"):
        return pd.read_json(path, lines=True, dtype=False)  # dtype=str would make null the text "None"
    return pd.read_csv(path, dtype={key: str for key in keys})


def assert_shape_matches(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    """A snapshot table (Parquet) against `shape_expectation`: same groups in the same order
    (key columns, then window start), counts exact, sums and means to a relative 1e-9."""
    groups = list(expected.index.names)
    assert list(table.columns) == [*groups, *expected.columns], list(table.columns)
    got = table.set_index(groups)
    if "window_start" in groups:
        got.index = got.index.set_levels(pd.to_datetime(got.index.levels[-1], utc=True), level="window_start")
    assert list(got.index) == sorted(got.index), "rows are not sorted by key, then window"
    expected = expected.sort_index()
    assert list(got.index) == list(expected.index)
    for column in expected.columns:
        want, have = expected[column].to_numpy(float), got[column].to_numpy(float)
        if column.endswith("count"):
            assert np.array_equal(want, have), f"{column}: counts differ"
        else:
            assert np.array_equal(np.isnan(want), np.isnan(have)), f"{column}: empty values differ"
            np.testing.assert_allclose(have, want, rtol=RTOL, atol=1e-6, equal_nan=True, err_msg=column)
