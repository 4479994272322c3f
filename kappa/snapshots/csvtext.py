"""A snapshot's CSV text, byte for byte what pandas' `to_csv` wrote before, from Arrow columns.

pandas writes CSV through Python's csv module (minimal quoting, doubled quotes, CRLF) and
formats floats as Python's `repr` does, which for a million rows takes seconds. Here whole
columns are formatted by Arrow and joined into lines without a Python object per row:

- text is quoted when it holds a comma, a quote, CR or LF, with quotes doubled;
- integers are their decimal digits;
- floats: Arrow and `repr` both print the shortest digits that read back as the same
  float, but lay them out differently (`5` against `5.0`, `1e-05` against `0.00001`). The
  layouts agree for `d.ddd` with a non-zero integer part and for `0.000ddd` down to 1e-4,
  which is nearly every sum and mean; every other float is formatted by `repr` itself. A
  missing float (NaN) is empty, as pandas writes it;
- a window start is ISO 8601 UTC text (`2024-01-31T10:00:00Z`).

tests/test_csvtext.py checks the bytes against pandas on awkward text and floats of every
magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NEEDS_QUOTES = r'[,"\r\n]'
SAME_AS_REPR = r"^-?([1-9][0-9]*\.[0-9]+|0\.0{0,3}[1-9][0-9]*)$"
LINE_END = "\r\n"


def header(names: Sequence[str]) -> bytes:
    return (",".join(_quoted(name) for name in names) + LINE_END).encode("utf-8")


def lines(table: pa.Table) -> bytes:
    """The rows of `table` as CSV lines, each ended by CRLF."""
    if table.num_rows == 0:
        return b""
    texts = [_text(column.combine_chunks()) for column in table.columns]
    rows = pc.binary_join_element_wise(pc.binary_join_element_wise(*texts, ","), LINE_END, "")
    # the lines are consecutive in the result's data buffer: the text is that buffer's span
    offsets = np.frombuffer(rows.buffers()[1], dtype=np.int32, count=len(rows) + 1, offset=rows.offset * 4)
    return memoryview(rows.buffers()[2])[offsets[0] : offsets[-1]].tobytes()


def _quoted(text: str) -> str:
    if any(mark in text for mark in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _text(column: pa.Array) -> pa.Array:
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        quoted = pc.binary_join_element_wise('"', pc.replace_substring(column, '"', '""'), '"', "")
        return pc.if_else(pc.match_substring_regex(column, NEEDS_QUOTES), quoted, column).fill_null("")
    if pa.types.is_integer(kind):
        return column.cast(pa.string()).fill_null("")
    if pa.types.is_floating(kind):
        return _float_text(column.cast(pa.float64()))
    if pa.types.is_timestamp(kind):
        return pa.array(iso_utc(column.cast(pa.int64()).to_numpy(zero_copy_only=False)), type=pa.string())
    raise TypeError(f"no CSV text for a {kind} column")


def _float_text(column: pa.Array) -> pa.Array:
    values = column.to_numpy(zero_copy_only=False)
    texts = column.cast(pa.string())
    same = pc.fill_null(pc.match_substring_regex(texts, SAME_AS_REPR), False)  # null: missing, written empty
    fixed = np.flatnonzero(~same.to_numpy(zero_copy_only=False))
    if not len(fixed):
        return texts
    mine = texts.to_numpy(zero_copy_only=False).astype(object)
    mine[fixed] = ["" if value != value else repr(value) for value in values[fixed].tolist()]
    return pa.array(mine, type=pa.string())


def iso_utc(seconds: np.ndarray) -> np.ndarray:
    """`2024-01-31T10:00:00Z` texts of epoch seconds, each distinct one formatted once (a
    snapshot has many rows per window)."""
    distinct, where = np.unique(seconds, return_inverse=True)
    texts = np.char.add(np.datetime_as_string(distinct.astype("datetime64[s]"), unit="s"), "Z")
    return texts.astype(object)[where]
