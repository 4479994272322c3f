"""Input files as numbered rows: (message key, JSON value) pairs in file order.

A row's number is its position among the file's rows, and reading the same bytes again yields
the same rows in the same order: that is what lets a re-run of a load tell which rows the log
already holds. One value has one text whatever the input format: Parquet dates become
`2024-01-31`, timestamps `2024-01-31T10:00:00` (UTC with `Z` when the column has a time zone),
in the message key and in the JSON row alike; CSV and JSON Lines text stays as written.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import lzma
import math
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kappa.codec import json_object, key_field_text
from kappa.errors import KappaError
from kappa.load.json_rows import (
    arrow_text,
    joined_objects,
    json_objects,
    json_values,
    written_texts,
    written_values,
)

CHUNK_ROWS = 100_000
SAMPLE_LINES = 1_000  # the JSON Lines read to check that rows hold the key field
ARROW_BLOCK_BYTES = 4 << 20  # Arrow's CSV reader yields a batch per block: about 100,000 short rows
# the strings pandas reads as missing by default (pandas._libs.parsers.STR_NA_VALUES)
PANDAS_NA_TEXTS = sorted(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
     "NULL", "NaN", "None", "n/a", "nan", "null"]
)  # fmt: skip
ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
WHITESPACE = b" \t\x0b\x0c"
UTF8_BOM = b"\xef\xbb\xbf"
SCAN_BLOCK_BYTES = 4 << 20  # `_scan_text` reads the file in blocks this long
WHITESPACE_BYTES, NEWLINE = np.frombuffer(WHITESPACE, dtype=np.uint8), ord("\n")
COMPRESSED_TEXT = (".gz", ".bz2", ".xz", ".zst", ".zip")  # pandas reads these for CSV and TSV


def _sha256(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while block := handle.read(1 << 22):
        digest.update(block)
    return digest.hexdigest()


@contextmanager
def _decompressed(path: Path) -> Iterator[IO[bytes]]:
    """The bytes pandas reads from `path`: decompressed by its suffix as pandas infers it (a
    `.zip` of one member), else as they are (`.zst` too: pandas reads it only with zstandard)."""
    suffix = path.suffix.lower()
    if suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            if len(members) == 1:
                with archive.open(members[0]) as member:
                    yield member
                return
    opener: Callable[[Path], IO[bytes]] = {".gz": gzip.GzipFile, ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}.get(
        suffix, lambda name: open(name, "rb")
    )
    with opener(path) as handle:
        yield handle


def split_name(name: str) -> tuple[str, str] | None:
    """(stem, format) of a file name with a known extension, else None.

    Only a known extension is cut off (`sales.2024.csv` -> `sales.2024`), so files that differ
    before it never share a stem."""
    lowered = name.lower()
    for compression in ("", *COMPRESSED_TEXT):
        for suffix, kind in FORMATS.items():
            ending = suffix + compression
            if lowered.endswith(ending) and (not compression or kind in ("csv", "tsv")):
                return name[: -len(ending)], kind
    return None


def _message_key(row: dict | str, value: bytes, key: str) -> bytes | None:
    """The message key of a row as written: the key field as a replay by `--key` reads it from the
    message (`kappa.codec.key_field_text`: JSON `1.50` is `1.50`, a list no key), so a replay
    grouped by the message key (no --key) groups exactly as one by the field. A lone surrogate is
    kept (as invalid UTF-8, which both replays reject)."""
    if isinstance(row, str):  # not a JSON object: the workers reject it, it has no key
        return None
    text = key_field_text(row, value, key)
    return None if text is None else text.encode("utf-8", "surrogatepass")


def _json_default(value: object) -> object:
    """Missing values pandas keeps as objects are null; bytes (in a Parquet list or struct) their
    UTF-8 text, else hex, as a bytes column's (`_as_text`); anything else orjson does not know is its text."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    return None if value is pd.NA or value is pd.NaT else str(value)


@dataclass(slots=True)
class Chunk:
    """Consecutive rows as messages: each row's message key (None: no key) and JSON value, and
    `longest`, the bytes of the longest value plus those of the longest key: no message of the
    chunk is longer, so the loader checks row by row only a chunk that may hold one too large."""

    keys: list[bytes | None]
    values: list[bytes]
    longest: int


def _frame_chunk(frame: pd.DataFrame, key: str, as_written: bool = False) -> Chunk:
    """One message per row. Columns are written as JSON at once (kappa.load.json_rows; with
    `as_written`, text columns keep each field as written, see `written_values`); a frame with
    a column that cannot be goes row by row, each row one dict for orjson."""
    objects = json_objects(frame, written_values if as_written else None)
    if objects is not None:
        values = objects.to_pylist()
        longest_value = _longest(objects)
    else:
        names = list(frame.columns)
        columns = [_infinities_as_text(frame[name].tolist()) for name in names]
        dumps, options = orjson.dumps, ORJSON_OPTIONS
        values = [
            dumps(dict(zip(names, row, strict=True)), default=_json_default, option=options)
            for row in zip(*columns, strict=True)
        ]
        longest_value = max(map(len, values), default=0)
    keys, longest_key = _message_keys(frame[key], values, key)
    return Chunk(keys, values, longest_value + longest_key)


def _batch_chunk(batch: pa.RecordBatch, key: str) -> Chunk:
    """`_frame_chunk(frame, key, as_written=True)` of a batch of CSV text read by Arrow."""
    texts = [written_texts(column) for column in batch.columns]
    if any(column is None for column in texts):
        return _frame_chunk(batch.to_pandas(), key, as_written=True)
    objects = joined_objects(batch.schema.names, texts, batch.num_rows)
    keys, longest_key = _text_keys(batch.column(batch.schema.get_field_index(key)))
    return Chunk(keys, objects.to_pylist(), _longest(objects) + longest_key)


def _infinities_as_text(values: list) -> list:
    """±inf as the text json_rows writes for it column-wise (`"inf"`), where orjson writes null."""
    if not any(type(value) is float and math.isinf(value) for value in values):
        return values
    return [str(value) if type(value) is float and math.isinf(value) else value for value in values]


def _listed_chunk(keys: list[bytes | None], values: list[bytes]) -> Chunk:
    return Chunk(keys, values, max(map(len, values), default=0) + _longest_key(keys))


def _longest(texts: pa.Array) -> int:
    return pc.max(pc.binary_length(texts)).as_py() or 0


def _longest_key(keys: list[bytes | None]) -> int:
    return max(map(len, filter(None, keys)), default=0)


def _message_keys(column: pd.Series, values: list[bytes], key: str) -> tuple[list[bytes | None], int]:
    """Each row's message key (`_message_key`), and the longest one's bytes. Text and integer
    columns at once: JSON writes their fields as `str` does and a replay reads them back so
    (`-0` is no integer's text). Any other column message by message."""
    texts = arrow_text(column)
    if texts is None and pd.api.types.is_integer_dtype(column.dtype):
        texts = pa.array(column.astype("string"), pa.string())
    if texts is not None:
        return _text_keys(texts)
    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "fb":
        keys = [SCALAR_KEYS.get(text, text) for text in json_values(column).to_pylist()]  # type: ignore[union-attr]
    else:
        keys = [_message_key(json_object(value), value, key) for value in values]
    return keys, _longest_key(keys)


# A float or bool column's JSON texts (kappa.load.json_rows.json_values) as the keys a replay
# reads from them: a number is its text as written, NaN (null) no key, ±inf the text json_values
# writes for it, a bool Python's text (kappa.codec._key_from_row)
SCALAR_KEYS: dict[bytes, bytes | None] = {
    b"null": None, b'"inf"': b"inf", b'"-inf"': b"-inf", b"true": b"True", b"false": b"False"
}  # fmt: skip


def _text_keys(texts: pa.Array) -> tuple[list[bytes | None], int]:
    """Arrow text as message keys, None where missing; and the longest one's bytes."""
    keys = texts.cast(pa.binary())
    return keys.to_pylist(), _longest(keys)


def _timestamp_text(column: pa.Array) -> pa.Array:
    """ISO 8601 with a `T`, the fraction only as long as it is non-zero, and `Z` for a zoned
    column (its instants are UTC), so one instant has one text whatever the column's unit."""
    zoned = column.type.tz is not None
    text = column.cast(pa.timestamp(column.type.unit)).cast(pa.string())
    text = pc.replace_substring(text, " ", "T", max_replacements=1)
    text = pc.replace_substring_regex(text, r"(\.\d*[1-9])0+$", r"\1")
    text = pc.replace_substring_regex(text, r"\.0+$", "")
    return pc.binary_join_element_wise(text, pa.scalar("Z"), "") if zoned else text


# Parquet's integer columns as pandas' nullable integers (a `types_mapper`): numpy's would make a
# column with a missing value floats, and its `1` the key `1.0`
NULLABLE_INTEGERS = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
}


def _is_bytes(kind: pa.DataType) -> bool:
    """A Parquet BYTE_ARRAY without the UTF-8 annotation (Spark and Hive write text so), or a
    dictionary of them."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def _plain_bytes(column: pa.Array) -> pa.Array:
    """A bytes column as binary or large binary: a dictionary decoded, fixed-size widened."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column.cast(pa.binary()) if pa.types.is_fixed_size_binary(column.type) else column


def _text_type(binary: pa.DataType) -> pa.DataType:
    return pa.large_string() if pa.types.is_large_binary(binary) else pa.string()


def _as_text(column: pa.Array, as_hex: bool) -> pa.Array:
    """Bytes as the UTF-8 text they hold, or, for a column that holds other bytes anywhere
    (`_check_parquet`), as lowercase hex (UUIDs and hashes are shown so)."""
    column = _plain_bytes(column)
    if as_hex:
        return pa.array([None if value is None else value.hex() for value in column.to_pylist()], pa.string())
    return column.cast(_text_type(column.type))


def _iso_batch(batch: pa.RecordBatch, hex_columns: frozenset[str] = frozenset()) -> pa.RecordBatch:
    """A Parquet batch with the columns JSON has no type for as text: dates and timestamps in
    ISO 8601, bytes as their UTF-8 text or hex (pandas would give `bytes`, whose repr is no value)."""
    columns = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_date(column.type):
            column = column.cast(pa.string())
        elif pa.types.is_timestamp(column.type):
            column = _timestamp_text(column)
        elif _is_bytes(column.type):
            column = _as_text(column, name in hex_columns)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _check_parquet(parquet: Any, name: str) -> frozenset[str]:
    """Refuse, before anything is made, a Parquet file whose rows cannot be JSON objects (two
    columns of one name: an object has one field per name); and return its bytes columns that
    hold bytes other than UTF-8 text somewhere, which are loaded as hex, whole (decided before any
    row is sent: a column that turned to hex at row 900,000 would hold two spellings of a value)."""
    names = parquet.schema_arrow.names
    for column in dict.fromkeys(names):
        if names.count(column) > 1:
            raise KappaError(
                f"{name} has {names.count(column)} columns named {column!r}: a row is loaded as a JSON object, "
                "one field per name; rename them and load again"
            )
    binary = [field.name for field in parquet.schema_arrow if _is_bytes(field.type)]
    not_text: set[str] = set()
    for batch in parquet.iter_batches(columns=binary) if binary else ():
        for column_name, column in zip(binary, batch.columns, strict=True):
            if column_name not in not_text and not _utf8_text(column):
                not_text.add(column_name)
    return frozenset(not_text)


def _utf8_text(column: pa.Array) -> bool:
    texts = _plain_bytes(column)
    try:
        texts.view(_text_type(texts.type)).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


@dataclass
class Source:
    """One input file (stdin is spooled to a file first) and how to read its rows."""

    path: Path
    name: str
    kind: str
    key: str
    separator: str = ","
    estimated_rows: int | None = None
    notes: list[str] = field(default_factory=list)
    not_objects: int = 0
    plain_text: bool = False  # a CSV or TSV that Arrow reads as pandas does (`_scan_text`)
    checked_rows: int | None = None  # the rows `check` read
    hex_columns: frozenset[str] = frozenset()  # Parquet bytes columns loaded as hex (`_check_parquet`)

    def fingerprint(self) -> str:
        """sha256 of the file's content: the same content is the same load, whatever its name,
        and whether or not it is compressed (a CSV loaded again as `.csv.gz` sent every row twice)."""
        with _decompressed(self.path) as handle:
            return _sha256(handle)

    def earlier_fingerprint(self) -> str | None:
        """What a load before 2026-12-07 recorded for a compressed file (sha256 of its bytes as
        they are), so that one is still known as loaded; None for a file that is not compressed."""
        if not self.path.name.lower().endswith(COMPRESSED_TEXT):
            return None
        with open(self.path, "rb") as handle:
            return _sha256(handle)

    def chunks(self) -> Iterator[Chunk]:
        """Every row in file order, in chunks; the n-th row is row n on every read."""
        if self.kind == "jsonl":
            return self._jsonl_chunks()
        if self.kind == "parquet":
            return self._parquet_chunks()
        return self._csv_chunks()

    def check(self) -> None:
        """Read a CSV or TSV whole once before any of its rows is sent, and refuse it if pandas
        would: a row with more fields than the header, an open quote, bytes that are not UTF-8.

        A load refused at row 900,000 left the rows before it on the log; loaded again once
        fixed (another file to the ledger), they were counted twice. A plain file is checked by
        Arrow, reading its key column alone (0.03-0.13 s a million rows), any other by pandas.
        The rows counted make the progress line exact."""
        if self.kind not in ("csv", "tsv"):
            return
        rows = self._arrow_rows() if self.plain_text else None
        if rows is None:
            rows = sum(len(frame) for frame in self._csv_frames())
        self.estimated_rows = self.checked_rows = rows

    def _arrow_rows(self) -> int | None:
        """The rows Arrow reads, or None when it refuses one (pandas may not: a short row)."""
        try:
            return sum(batch.num_rows for batch in self._arrow_batches(only_key=True))
        except pa.ArrowInvalid:
            return None

    def count_rows(self) -> int:
        """The exact number of rows `chunks` yields (it reads the whole file)."""
        if self.checked_rows is not None:
            return self.checked_rows
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        if self.kind == "jsonl":
            with open(self.path, "rb") as handle:
                return sum(1 for line in handle if line.strip())
        return sum(len(chunk) for chunk in self._csv_frames(usecols=[self.key]))

    def _jsonl_chunks(self) -> Iterator[Chunk]:
        """Each non-blank line is loaded unchanged; lines that are not JSON objects still go to
        the log (it is the system of record) and are counted, since workers will reject them."""
        keys: list[bytes | None] = []
        values: list[bytes] = []
        with open(self.path, "rb") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                row = json_object(line)  # the workers' rule: NaN, 1e400 and a BOM are objects to them too
                self.not_objects += isinstance(row, str)
                keys.append(_message_key(row, line, self.key))
                values.append(line)
                if len(values) == CHUNK_ROWS:
                    yield _listed_chunk(keys, values)
                    keys, values = [], []
        if values:
            yield _listed_chunk(keys, values)

    def _parquet_chunks(self) -> Iterator[Chunk]:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=CHUNK_ROWS):
            yield _frame_chunk(
                _iso_batch(batch, self.hex_columns).to_pandas(types_mapper=NULLABLE_INTEGERS.get), self.key
            )

    def _csv_frames(self, usecols: list[str] | None = None) -> Iterator[pd.DataFrame]:
        try:
            yield from pd.read_csv(self.path, sep=self.separator, dtype=str, usecols=usecols, chunksize=CHUNK_ROWS)
        except pd.errors.EmptyDataError:
            return
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise _not_valid(self.name, self.separator, exc) from None

    def _csv_chunks(self) -> Iterator[Chunk]:
        """A plain-text file is read by Arrow, several times faster than pandas and with no Python
        object per field; on any row Arrow refuses (a short or long row, bytes that are not
        UTF-8), pandas reads the rest, from the first row not yet yielded, as it would have
        read the whole file."""
        yielded = 0
        if self.plain_text:
            batches = self._arrow_batches()
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except pa.ArrowInvalid:
                    break
                for start in range(0, batch.num_rows, CHUNK_ROWS):  # a block of short rows holds more
                    piece = batch.slice(start, CHUNK_ROWS)
                    yield _batch_chunk(piece, self.key)
                    yielded += piece.num_rows
        for frame in self._csv_frames():
            if yielded:
                skip = min(yielded, len(frame))
                frame, yielded = frame.iloc[skip:], yielded - skip
                if frame.empty:
                    continue
            yield _frame_chunk(frame, self.key, as_written=True)

    def _arrow_batches(self, only_key: bool = False) -> Iterator[pa.RecordBatch]:
        """The rows after the header, as text, with pandas' column names (duplicates renamed
        `a.1`, empty ones `Unnamed: 2`) and its missing-value strings as null; `only_key`: the
        key column alone (every row is still split into all its fields)."""
        from pyarrow import csv

        names = _header(self.path, self.separator, self.name)
        reader = csv.open_csv(
            self.path,
            read_options=csv.ReadOptions(column_names=names, skip_rows=1, block_size=ARROW_BLOCK_BYTES),
            parse_options=csv.ParseOptions(delimiter=self.separator, newlines_in_values=True),
            convert_options=csv.ConvertOptions(
                include_columns=[self.key] if only_key else None,
                column_types={name: pa.string() for name in names},
                null_values=PANDAS_NA_TEXTS,
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        yield from reader


def _require_column(columns: list, key: str, source: str) -> None:
    if key not in columns:
        several = (
            "; `kappa load --key` names one column (the message key): group by several fields when you "
            "replay (`--key city,vendor`)"
            if "," in key and all(name in columns for name in key.split(","))
            else ""
        )
        raise KappaError(
            f"key column {key!r} not found in {source}; its columns are: {', '.join(map(str, columns))}{several}"
        )


def _header(path: Path, separator: str, name: str) -> list:
    try:
        return list(pd.read_csv(path, sep=separator, nrows=0).columns)
    except pd.errors.EmptyDataError:
        raise KappaError(f"{name} is empty: expected a header line naming the columns") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise _not_valid(name, separator, exc) from None


def _not_valid(name: str, separator: str, error: Exception) -> KappaError:
    kind = "TSV" if separator == "\t" else "CSV"
    if isinstance(error, UnicodeDecodeError):  # a compressed file (a plain one is checked by `_scan_text`)
        return KappaError(f"{name} is not UTF-8 text ({error.reason}): convert it to UTF-8 and load that")
    return KappaError(f"{name} is not valid {kind}: {error}")


def _open_text_table(source: Source) -> Source:
    """Read the header with the separator the extension implies; a `.csv` whose only column
    name holds tabs is a tab-separated file, read as TSV with a note saying so."""
    source.separator = "\t" if source.kind == "tsv" else ","
    scan = _scan_text(source.path) if source.path.suffix.lower() in FORMATS else None  # None: compressed
    if scan is not None and scan.not_utf8_line is not None:
        raise KappaError(
            f"{source.name} is not UTF-8 text (line {scan.not_utf8_line:,} is not): convert it, for example "
            f"with `iconv -f latin1 -t utf-8 {source.name} > utf8.{source.kind}`, and load that"
        )
    columns = _header(source.path, source.separator, source.name)
    if source.key not in columns and source.kind == "csv" and len(columns) == 1 and "\t" in str(columns[0]):
        source.separator, source.kind = "\t", "tsv"
        columns = _header(source.path, "\t", source.name)
        source.notes.append(f"{source.name} is tab-separated, not comma-separated: reading it as TSV")
    _require_column(columns, source.key, source.name)
    if scan is not None:
        source.plain_text = scan.plain
        source.estimated_rows = max(scan.lines - 1, 0)
    return source


def _count_lines(path: Path) -> int:
    lines = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            lines += block.count(b"\n")
    return lines


def _header_on_first_line(block: bytes) -> bool:
    """Whether the file's first block starts with a line that is not blank (after a BOM)."""
    return bool(block.removeprefix(UTF8_BOM).split(b"\n", 1)[0].strip(WHITESPACE + b"\r"))


def _lone_returns(seen: bytes, block: bytes) -> bool:
    """A `\r` not followed by `\n` (one that ends `block` is judged with the next block)."""
    if b"\r" not in seen:
        return False
    return seen.count(b"\r") - seen.count(b"\r\n") - block.endswith(b"\r") > 0


def _a_line_starts_with_whitespace(seen: bytes) -> bool:
    text = np.frombuffer(seen, dtype=np.uint8)
    starts = text[np.flatnonzero(text[:-1] == NEWLINE) + 1]
    return bool(np.isin(starts, WHITESPACE_BYTES).any())


@dataclass(frozen=True)
class TextScan:
    """One pass over a text file: its lines, whether Arrow reads it as pandas does, and the
    line of its first byte that is not UTF-8 (None when it all is)."""

    lines: int
    plain: bool
    not_utf8_line: int | None = None


def _scan_text(path: Path) -> TextScan:
    """The file's lines, whether Arrow's CSV reader reads it exactly as pandas does, and where
    it first stops being UTF-8.

    They agree on a file with no quote character, no NUL, no carriage return outside `\r\n`,
    a header on its first line, and no line after it that starts with a space or tab (pandas
    skips a line of whitespace alone, Arrow reads it as a row). A short or long row Arrow
    refuses; the reader then goes on with pandas (`_csv_chunks`). tests/test_loader.py
    compares the two readers on random files of such pieces."""
    lines, plain, tail = 0, True, b""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        while block := handle.read(SCAN_BLOCK_BYTES):
            pending = len(decoder.getstate()[0])  # a character cut by the previous block
            if pending or not block.isascii():
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    return TextScan(lines, False, lines + block[: max(exc.start - pending, 0)].count(b"\n") + 1)
            lines += block.count(b"\n")
            if plain:
                seen = tail + block  # a line start or `\r\n` may straddle two blocks
                plain = not (
                    (not tail and not _header_on_first_line(block))
                    or b'"' in block
                    or b"\x00" in block
                    or _lone_returns(seen, block)
                    or _a_line_starts_with_whitespace(seen)
                )
            tail = block[-1:]
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return TextScan(lines, False, lines + 1)
    return TextScan(lines, plain and tail != b"\r")


def spool_stdin(directory: Path) -> Path:
    """Copy stdin to a file, so that it can be fingerprinted and re-read like any file."""
    spooled = directory / "stdin.jsonl"
    with open(spooled, "wb") as handle:
        shutil.copyfileobj(sys.stdin.buffer, handle, 1 << 22)
    return spooled


@contextmanager
def opened_source(path: str, key: str) -> Iterator[Source]:
    """The input named on the command line, checked, for as long as the load reads it.

    Only stdin needs a temporary directory (its spooled copy), removed on leaving; a file gets
    none, so a load that is killed outright leaves nothing behind when it reads a file."""
    if path != "-":
        yield open_source(path, key)
        return
    with tempfile.TemporaryDirectory(prefix="kappa-load-") as spool:
        yield _jsonl_source(spool_stdin(Path(spool)), "stdin", key)


def _jsonl_source(file: Path, name: str, key: str) -> Source:
    _check_json_lines(file, name, key)
    source = Source(file, name, "jsonl", key)
    source.estimated_rows = _count_lines(file)  # for the progress line's share done
    return source


def _check_json_lines(file: Path, name: str, key: str) -> None:
    """Refuse, before anything is made, a JSON array (it would be one message, its rows never
    counted) and JSON Lines whose first rows never hold the key field (as a CSV without the
    key column is refused)."""
    fields: dict[str, None] = {}
    lines = objects = 0
    with open(file, "rb") as handle:
        for line in islice(filter(None, map(bytes.strip, handle)), SAMPLE_LINES):
            if not fields and line.removeprefix(UTF8_BOM).startswith(b"["):
                raise KappaError(
                    f"{name} holds a JSON array, not JSON Lines (one object per line): convert it, for example "
                    f"with `jq -c '.[]' {name} > rows.jsonl`, and load that"
                )
            row = json_object(line)
            if isinstance(row, dict):
                objects += 1
                if key in row:
                    return
                fields.update(dict.fromkeys(map(str, row)))
            lines += 1
    if lines and not objects:
        raise KappaError(
            f"{name} holds no JSON object in its first {lines:,} lines: kappa loads JSON Lines (one object per "
            "line) from .jsonl files and stdin; load a CSV, TSV or Parquet file by its path"
        )
    if fields and not _holds_text(file, orjson.dumps(key)):  # a later row may hold it (or a value: let it be)
        shown = ", ".join(list(fields)[:20])
        raise KappaError(f"key field {key!r} is in none of the rows of {name}; their fields are: {shown}")


def _holds_text(file: Path, text: bytes) -> bool:
    """Whether the file's bytes hold `text` anywhere (blocks overlap by its length)."""
    tail = b""
    with open(file, "rb") as handle:
        while block := handle.read(SCAN_BLOCK_BYTES):
            if text in tail + block:
                return True
            tail = block[-len(text) :]
    return False


def open_source(path: str, key: str) -> Source:
    """An input file, checked: it exists, has a known format and the key column."""
    split = split_name(Path(path).name)
    if split is None:
        known = ", ".join(FORMATS)
        raise KappaError(f"cannot tell the format of {path!r}: expected one of {known}, or - for JSON Lines on stdin")
    file = Path(path)
    if not file.is_file():
        raise KappaError(f"input file {path!r} not found")
    if split[1] == "jsonl":
        return _jsonl_source(file, path, key)
    source = Source(file, path, split[1], key)
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise KappaError(f"{path} is not a Parquet file Arrow can read: {exc}") from None
        _require_column(parquet.schema_arrow.names, key, path)
        source.hex_columns = _check_parquet(parquet, path)
        for column in sorted(source.hex_columns):
            source.notes.append(f"column {column!r} of {path} holds bytes that are not UTF-8 text: loading it as hex")
        source.estimated_rows = parquet.metadata.num_rows
        return source
    return _open_text_table(source)
