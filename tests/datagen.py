"""Deterministic sample data with the awkward cases a grouped mean must survive.

Keys include unicode, spaces, commas, quotes, a newline and numeric-looking strings; values
include NaN, negatives and 1e12 magnitudes; some rows have no key at all.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

AWKWARD_KEYS = [
    "São Paulo",
    "東京",
    "new york",
    "a,b",
    'say "hi"',
    "line\nbreak",
    "007",
    "7",
    "1e3",
    "emoji 🎉",
    " padded ",
    'comma, and "quote"',
]


def keys_for(count: int) -> list[str]:
    plain = [f"key-{i:06d}" for i in range(max(count - len(AWKWARD_KEYS), 0))]
    return (AWKWARD_KEYS + plain)[:count]


def sample_frame(rows: int, keys: int, seed: int = 7, key: str = "city", value: str = "amount") -> pd.DataFrame:
    """`rows` rows over `keys` keys; 1% keyless rows, 5% NaN values, 1% of 1e12 magnitude."""
    rng = np.random.default_rng(seed)
    names = np.array(keys_for(keys), dtype=object)
    chosen = names[rng.integers(0, len(names), size=rows)]
    chosen[: min(len(names), rows)] = names[: min(len(names), rows)]  # every key appears
    chosen[rng.random(rows) < 0.01] = None
    amounts = rng.normal(100.0, 250.0, size=rows).round(4)
    huge = rng.random(rows) < 0.01
    amounts[huge] = rng.normal(0.0, 1e12, size=int(huge.sum()))
    amounts[rng.random(rows) < 0.05] = np.nan
    return pd.DataFrame(
        {key: chosen, value: amounts, "note": rng.choice(["ok", "late", "x,y"], size=rows), "seq": np.arange(rows)}
    )


def pandas_expectation(path: str, key: str, value: str) -> pd.DataFrame:
    """The README's pandas oracle, verbatim: what a user would compute to check kappa."""
    df = pd.read_csv(path, dtype={key: str}).dropna(subset=[key])
    df[value] = pd.to_numeric(df[value]).replace([np.inf, -np.inf], np.nan)
    return df.groupby(key)[value].agg(["count", "sum", "mean"])
