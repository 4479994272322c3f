"""The benchmark's rows and the oracle every contender is checked against."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

KEY, VALUE = "key", "amount"
# the composite shape: two key fields, two values, one-hour windows over two days of event times
SHAPE_KEYS, SHAPE_VALUES, SHAPE_TIME, SHAPE_WINDOW = (KEY, "region"), (VALUE, "tip"), "at", "1h"
SHAPE_START = pd.Timestamp("2024-03-01T00:00:00")


def bench_frame(rows: int, keys: int, seed: int = 7, shaped: bool = False) -> pd.DataFrame:
    """Clean rows, so every contender counts every row and differences are speed alone.

    Every key appears at least once (when rows >= keys), so --keys is the distinct key count.
    `shaped` adds a second key field, a second value and an event time (the composite shape).
    """
    rng = np.random.default_rng(seed)
    key_ids = rng.integers(0, keys, size=rows)
    every = min(keys, rows)
    key_ids[:every] = rng.permutation(every)
    names = np.char.add("k", key_ids.astype("U8"))
    frame = pd.DataFrame({KEY: names, VALUE: rng.normal(100.0, 30.0, size=rows).round(2)})
    if shaped:
        frame["region"] = np.char.add("r", rng.integers(0, 4, size=rows).astype("U1"))
        frame["tip"] = rng.normal(5.0, 2.0, size=rows).round(2)
        seconds = pd.to_timedelta(rng.integers(0, 48 * 3600, size=rows), unit="s")
        frame[SHAPE_TIME] = (SHAPE_START + seconds).strftime("%Y-%m-%dT%H:%M:%S")
    return frame


def shape_oracle(frame: pd.DataFrame) -> pd.DataFrame:
    """The composite shape's groups: count and sum of each value per (key, region, window)."""
    window = pd.to_datetime(frame[SHAPE_TIME], utc=True).dt.floor(SHAPE_WINDOW).rename("window_start")
    grouped = frame.groupby([*SHAPE_KEYS, window])[list(SHAPE_VALUES)].agg(["count", "sum"])
    grouped.columns = [f"{value}_{agg}" for value, agg in grouped.columns]
    return grouped.sort_index()


def check_shape(table: pd.DataFrame, expected: pd.DataFrame) -> str | None:
    """None when a composite-shape snapshot has the oracle's groups, counts and sums."""
    got = table.set_index([*SHAPE_KEYS, "window_start"]).sort_index()
    if len(got) != len(expected) or list(got.index) != list(expected.index):
        return f"{len(got)} groups, expected {len(expected)}"
    for column in expected.columns:
        mine, theirs = got[column].to_numpy(float), expected[column].to_numpy(float)
        if not np.allclose(mine, theirs, rtol=1e-9, atol=1e-6):
            return f"{column} differs"
    return None


def oracle(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby(KEY, sort=True)[VALUE].agg(["sum", "count"])
    return grouped.reset_index().rename(columns={KEY: "key"})


def write_result(path: Path, sums: dict, counts: dict) -> None:
    """A contender's answer: one row per key with its sum and count."""
    keys = sorted(counts)
    frame = pd.DataFrame({"key": keys, "sum": [float(sums[k]) for k in keys], "count": [int(counts[k]) for k in keys]})
    frame.to_parquet(path, index=False)


def check(result: pd.DataFrame, expected: pd.DataFrame) -> str | None:
    """None when the result is the oracle's (exact counts, sums to 1e-9); else why not."""
    got = result[["key", "sum", "count"]].sort_values("key").reset_index(drop=True)
    want = expected.sort_values("key").reset_index(drop=True)
    if len(got) != len(want) or not (got["key"].astype(str).to_numpy() == want["key"].to_numpy()).all():
        return f"{len(got)} keys, expected {len(want)}"
    if not (got["count"].to_numpy() == want["count"].to_numpy()).all():
        return f"counts differ: {int(got['count'].sum())} counted, expected {int(want['count'].sum())}"
    for mine, theirs in zip(got["sum"].to_numpy(), want["sum"].to_numpy(), strict=True):
        if not math.isclose(mine, theirs, rel_tol=1e-9, abs_tol=1e-6):
            return f"a sum differs: {mine!r} against {theirs!r}"
    return None
