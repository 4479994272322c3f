"""Comparing a published snapshot with SPEC.md's pandas expectation."""

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
