"""A snapshot's CSV text, byte for byte what pandas' `to_csv(lineterminator="\r\n")` wrote before,
from Arrow columns.

pandas writes CSV through Python's csv module (minimal quoting, doubled quotes; CRLF line
ends, as RFC 4180 has them and kappa asked for) and
formats floats as Python's `repr` does, which for a million rows takes seconds. Here whole
columns are formatted by Arrow and joined into lines without a Python object per row:

- text is quoted when it holds a comma, a quote, CR or LF, with quotes doubled;
- integers are their decimal digits;
- floats: Arrow and `repr` both print the shortest digits that read back as the same
  float, but lay them out differently (`5` against `5.0`, `1e-05` against `0.00001`). The
  layouts agree for `d.ddd` from 1 up to 1e10 and for `0.000ddd` down to 1e-4, which is
  nearly every sum and mean; a whole number below 1e10 is Arrow's digits and `.0`
  (every sum of whole-number values); every other float is formatted by `repr` itself. Which
  layout applies is decided from the values with numpy, not by reading the texts. A missing
  float (NaN) is empty, as pandas writes it;
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
QUOTE_MARKS = (b",", b'"', b"\r", b"\n")
FIXED_BELOW = 1e10  # from here on Arrow writes an exponent (1e+10; `repr` only from 1e16)
LINE_END = "\r\n"


def header(names: Sequence[str]) -> bytes:
    return (",".join(_quoted(name) for name in names) + LINE_END).encode("utf-8")


def lines(table: pa.Table) -> bytes:
    """The rows of `table` as CSV lines, each ended by CRLF."""
    if table.num_rows == 0:
        return b""
    texts = [_text(column.combine_chunks()) for column in table.columns]
    pieces: list[pa.Array | str] = []
    for text in texts:
        pieces += [text, ","]
    pieces[-1] = LINE_END
    rows = pc.binary_join_element_wise(*pieces, "")  # one pass: `a,b,c\r\n` per row
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
        if not _may_need_quotes(column):  # nearly always: the text as it is
            return column.fill_null("")
        needs_quotes = pc.match_substring_regex(column, NEEDS_QUOTES)
        quoted = pc.binary_join_element_wise('"', pc.replace_substring(column, '"', '""'), '"', "")
        return pc.if_else(needs_quotes, quoted, column).fill_null("")
    if pa.types.is_integer(kind):
        return column.cast(pa.string()).fill_null("")
    if pa.types.is_floating(kind):
        return _float_text(column.cast(pa.float64()))
    if pa.types.is_timestamp(kind):
        return pa.array(iso_utc(column.cast(pa.int64()).to_numpy(zero_copy_only=False)), type=pa.string())
    raise TypeError(f"no CSV text for a {kind} column")


def _may_need_quotes(column: pa.Array) -> bool:
    """False when no text in the column holds a comma, quote, CR or LF: a memchr-speed scan of
    the character data (which may hold bytes beyond a slice: then True, which only costs the
    exact check)."""
    data = column.buffers()[2]
    raw = data.to_pybytes() if data is not None else b""
    return any(mark in raw for mark in QUOTE_MARKS)


def _float_text(column: pa.Array) -> pa.Array:
    values = column.to_numpy(zero_copy_only=False)  # a missing float is NaN here
    texts = column.cast(pa.string())
    magnitude = np.abs(values)
    with np.errstate(invalid="ignore"):
        whole = (values == np.floor(values)) & (magnitude < FIXED_BELOW)
        same = ((magnitude >= 1) & ~whole & (magnitude < FIXED_BELOW)) | ((magnitude >= 1e-4) & (magnitude < 1))
    if whole.any():
        texts = pc.if_else(pa.array(whole), pc.binary_join_element_wise(texts, ".0", ""), texts)
    rest = ~(same | whole)
    if not rest.any():
        return texts
    # only the rest become Python objects: missing, infinite, tiny and huge floats
    replacements = ["" if value != value else repr(value) for value in values[rest].tolist()]
    return pc.replace_with_mask(texts, pa.array(rest), pa.array(replacements, type=pa.string()))


def iso_utc(seconds: np.ndarray) -> np.ndarray:
    """`2024-01-31T10:00:00Z` texts of epoch seconds, each distinct one formatted once (a
    snapshot has many rows per window)."""
    distinct, where = np.unique(seconds, return_inverse=True)
    texts = np.char.add(np.datetime_as_string(distinct.astype("datetime64[s]"), unit="s"), "Z")
    return texts.astype(object)[where]
