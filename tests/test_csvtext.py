"""Snapshot CSV text is byte for byte what pandas' `to_csv` writes for the same rows."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from kappa.snapshots import csvtext

AWKWARD_KEYS = ["a", "b,c", 'q"x', 'say "hi", then\nleave', " leading", "trailing ", "ü", "\r", "007", "#", "'", "a;b"]


def awkward_floats(rng: np.random.Generator, count: int) -> np.ndarray:
    magnitudes = 10.0 ** rng.uniform(-320, 308, count)
    floats = magnitudes * rng.choice([-1.0, 1.0], count)
    floats[::7] = np.round(floats[::7])  # integral values
    floats[::11] = rng.normal(100.0, 30.0, len(floats[::11])).round(2)  # money
    specials = [0.0, -0.0, np.nan, np.inf, -np.inf, 5.0, 1e16, 1e15, 9999999999999998.0, 0.0001, 0.00001, 1e-4 * 0.99,
                123456789012345.6, 0.1 + 0.2, 2.0**53, 5e-324, 1.7976931348623157e308, 1e22, 100.0, 0.5,
                9999999999.5, 9999999999.0, 1e10, 1e10 + 0.5, -1e10, 0.0001 * 1.01]  # fmt: skip
    floats[: len(specials)] = specials
    return floats


def pandas_csv(table: pa.Table) -> bytes:
    frame = table.to_pandas()
    if "window_start" in frame:
        frame["window_start"] = frame["window_start"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    text = io.StringIO()
    frame.to_csv(text, index=False, lineterminator="\r\n")
    return text.getvalue().encode("utf-8")


def test_csv_text_is_what_pandas_writes():
    rng = np.random.default_rng(11)
    count = 200_000
    table = pa.table(
        {
            "city": pa.array(rng.choice(AWKWARD_KEYS, count), type=pa.string()),
            "window_start": pa.array(rng.integers(-10, 10, count) * 3600, type=pa.timestamp("s", tz="UTC")),
            "count": pa.array(rng.integers(0, 1 << 40, count), type=pa.int64()),
            "sum": pa.array(awkward_floats(rng, count)),
            "mean": pa.array(rng.normal(0, 1, count) * 10.0 ** rng.integers(-6, 17, count)),
        }
    )
    mine = csvtext.header(table.column_names) + csvtext.lines(table)
    assert mine == pandas_csv(table)


def test_a_header_with_a_comma_is_quoted_as_pandas_quotes_it():
    table = pa.table({"fare,usd": pa.array([1.5]), "n": pa.array([1])})
    assert csvtext.header(table.column_names) + csvtext.lines(table) == pandas_csv(table)


def test_text_that_needs_no_quotes_is_written_as_it_is():
    """The common case, where no key holds a comma, quote or line break, takes a shorter path."""
    rng = np.random.default_rng(12)
    plain = [key for key in AWKWARD_KEYS if not any(mark in key for mark in ',"\r\n')]
    table = pa.table(
        {"key": pa.array(rng.choice(plain, 1000), type=pa.string()), "mean": pa.array(rng.normal(0, 1, 1000))}
    )
    assert csvtext.header(table.column_names) + csvtext.lines(table) == pandas_csv(table)
