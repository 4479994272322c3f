"""A chunk of rows as JSON objects, column by column: the bytes orjson writes for each row's dict.

`kappa load` turns every row into one message. A dict per row and an orjson call each cost
about 1 µs a row, as much as producing it. Here each column is written at once and the
objects are joined column-wise by Arrow, with no Python object per row until the messages
themselves. The text is orjson's, byte for byte:

- numbers (int, float, bool columns) are written by orjson itself, one call per column on
  the numpy array (floats in orjson's shortest form, `1.0` stays `1.0`; NaN is `null`, as
  orjson writes it; ±inf, which orjson writes as `null` too, is the string `"inf"`/`"-inf"`);
- text is quoted with `"` and `\\` escaped, and `\\n`, `\\r`, `\\t`, `\\b`, `\\f` written as
  orjson does; missing values (NaN, None) are `null`;
- anything else (other control characters, mixed or other Python objects, dates, names that
  are not text) returns None, and the caller writes those rows with orjson, row by row.

tests/test_loader.py checks the bytes against orjson's on awkward columns.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# escapes orjson writes in short form; the order matters (the backslash first)
SHORT_ESCAPES = (
    ("\\", "\\\\"),
    ('"', '\\"'),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\t", "\\t"),
    ("\b", "\\b"),
    ("\f", "\\f"),
)
OTHER_CONTROL = r"[\x00-\x07\x0b\x0e-\x1f]"  # orjson writes these as \u00XX: left to orjson
COMMA, QUOTE, BACKSLASH = ord(","), ord('"'), ord("\\")
# written_values' numbers: a JSON number with no exponent, whose integer part int64 holds
NUMBER_SHAPE = r"^-?(0|[1-9][0-9]{0,17})(\.[0-9]+)?$"


ColumnWriter = Callable[[pd.Series], "pa.Array | None"]


def json_objects(frame: pd.DataFrame, values: ColumnWriter | None = None) -> pa.BinaryArray | None:
    """Each row of `frame` as orjson writes `dict(zip(columns, row))` (or with each column's
    JSON from `values`, such as `written_values`); None when a column is not one this writes
    (the caller then uses orjson row by row)."""
    if not len(frame.columns) or not all(isinstance(name, str) for name in frame.columns):
        return None
    texts = []
    for name in frame.columns:
        column = (values or json_values)(frame[name])
        if column is None:
            return None
        texts.append(column)
    return joined_objects(list(frame.columns), texts, len(frame))


def joined_objects(names: list[str], texts: list[pa.Array], rows: int) -> pa.BinaryArray:
    """`{"name":text,...}` per row, from each column's JSON text."""
    if not rows:
        return pa.array([], pa.binary())
    pieces: list[pa.Array | pa.Scalar] = []
    for position, (name, column) in enumerate(zip(names, texts, strict=True)):
        label = (b"{" if position == 0 else b",") + orjson.dumps(name) + b":"
        pieces += [pa.scalar(label, pa.binary()), column]
    pieces.append(pa.scalar(b"}", pa.binary()))
    return pc.binary_join_element_wise(*pieces, pa.scalar(b"", pa.binary()))


def json_values(column: pd.Series) -> pa.Array | None:
    """Each value of the column as JSON text (Arrow binary), or None."""
    if isinstance(column.dtype, pd.api.extensions.ExtensionDtype) and pd.api.types.is_integer_dtype(column.dtype):
        return _nullable_integers(column)
    if not isinstance(column.dtype, np.dtype):  # pandas' other dtypes (boolean, string, category)
        return None
    kind = column.dtype.kind
    if kind in "iub":
        return _numbers(np.ascontiguousarray(column.to_numpy()))
    if kind == "f":  # orjson writes a float32 as its float64
        return _floats(np.ascontiguousarray(column.to_numpy(dtype=np.float64)))
    if kind == "O":
        return _texts(column)
    return None


def _floats(values: np.ndarray) -> pa.Array:
    """orjson's numbers, but ±inf as the strings `"inf"` and `"-inf"` where orjson writes null:
    a key field keeps the text pandas gives it (a CSV's `inf` is the same string), and a value
    is still infinite, so skipped. NaN stays null (missing)."""
    numbers = _numbers(values)
    infinite = np.isinf(values)
    if not infinite.any():
        return numbers
    signs = pa.array(np.where(values > 0, b'"inf"', b'"-inf"'), pa.binary())
    return pc.if_else(pa.array(infinite), signs, numbers)


def _nullable_integers(column: pd.Series) -> pa.Array:
    """A pandas integer column with missing values (Int64, as Parquet's are read): integers and
    null, where numpy's int64 would make every value a float (`1.0`)."""
    numbers = _numbers(column.to_numpy(dtype=column.dtype.numpy_dtype, na_value=0))
    return pc.if_else(pa.array(column.notna().to_numpy()), numbers, pa.scalar(b"null", pa.binary()))


def written_values(column: pd.Series) -> pa.Array | None:
    """A CSV column read as text (dtype=str), as JSON that keeps each field as written: a field
    whose text is a JSON number with no exponent (`12`, `-3`, `12.50`, `-0`) is that number,
    as written; any other (`007`, `+5`, `.5`, `1e3`, ` 5`, `abc`) is the text, quoted; a missing
    one (pandas' NA strings) is null.

    So a field read back as a group key is its text exactly, as pandas reads it with dtype=str
    (kappa.codec reads a number's key as the message writes it), and read as a value it is the
    number pandas makes of it: a JSON number, or a numeric string that the worker converts.
    Inferring each column's type instead wrote `1.0` for the `1` of an integer column with a
    missing field, `1` for `01`, and both `1` and `1.0` in one file, chunk by chunk. Values
    stay JSON numbers wherever they can, since the worker reads those column-wise."""
    texts = arrow_text(column)
    return None if texts is None else written_texts(texts)


def written_texts(texts: pa.Array) -> pa.Array | None:
    """`written_values` of a column already read as Arrow text (null where missing)."""
    numbers = pc.fill_null(pc.match_substring_regex(texts, NUMBER_SHAPE), False)
    if pc.all(pc.or_(numbers, pc.is_null(texts))).as_py():
        return texts.cast(pa.binary()).fill_null(b"null")
    quoted = _quoted(texts)
    if quoted is None:
        return None
    return pc.if_else(numbers, texts.cast(pa.binary()), quoted)


def _numbers(values: np.ndarray) -> pa.Array:
    """orjson writes the whole array as `[a,b,c]`; its numbers hold no comma, so each value is
    the text between two commas. The commas are dropped and the spans become Arrow offsets."""
    written = np.frombuffer(orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY), dtype=np.uint8)[1:-1]
    commas = np.flatnonzero(written == COMMA)
    data = np.delete(written, commas)
    offsets = np.empty(len(values) + 1, dtype=np.int32)
    offsets[0], offsets[-1] = 0, len(data)
    offsets[1:-1] = commas - np.arange(len(commas))
    return pa.BinaryArray.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def arrow_text(column: pd.Series) -> pa.Array | None:
    """An object column as Arrow text, NaN and None as null; None when it is not all text."""
    if column.dtype.kind != "O":
        return None
    try:
        texts = pa.array(column, from_pandas=True)
    except (pa.ArrowException, UnicodeError, OverflowError, TypeError):
        return None
    if texts.type == pa.null():  # nothing but missing values: null, not the whole chunk row by row
        return texts.cast(pa.string())
    return texts if texts.type == pa.string() else None


def _texts(column: pd.Series) -> pa.Array | None:
    """The column's text quoted as JSON strings; None when it is not text (left to orjson)."""
    texts = arrow_text(column)
    return None if texts is None else _quoted(texts)


def _quoted(texts: pa.Array) -> pa.Array | None:
    """Arrow text quoted as JSON strings; None when it holds a control character orjson writes
    as `\\u00XX`."""
    if _needs_escapes(texts):
        if pc.any(pc.match_substring_regex(texts, OTHER_CONTROL)).as_py():
            return None
        for character, escaped in SHORT_ESCAPES:
            texts = pc.replace_substring(texts, character, escaped)
    quote = pa.scalar('"', pa.string())
    quoted = pc.binary_join_element_wise(quote, texts, quote, pa.scalar("", pa.string()))
    return quoted.fill_null("null").cast(pa.binary())


def _needs_escapes(texts: pa.StringArray) -> bool:
    """Whether any text holds a control character, `"` or `\\`: one pass over the UTF-8 bytes
    (every byte of a multi-byte character is 0x80 or above, so none is mistaken for one)."""
    data = texts.buffers()[2]
    if data is None:
        return False
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int32)[texts.offset : texts.offset + len(texts) + 1]
    utf8 = np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return bool(((utf8 < 0x20) | (utf8 == QUOTE) | (utf8 == BACKSLASH)).any())
