"""The benchmark's rows and the oracle every contender is checked against."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

KEY, VALUE = "key", "amount"


def bench_frame(rows: int, keys: int, seed: int = 7) -> pd.DataFrame:
    """Clean rows, so every contender counts every row and differences are speed alone.

    Every key appears at least once (when rows >= keys), so --keys is the distinct key count.
    """
    rng = np.random.default_rng(seed)
    key_ids = rng.integers(0, keys, size=rows)
    every = min(keys, rows)
    key_ids[:every] = rng.permutation(every)
    names = np.char.add("k", key_ids.astype("U8"))
    return pd.DataFrame({KEY: names, VALUE: rng.normal(100.0, 30.0, size=rows).round(2)})


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
