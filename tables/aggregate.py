"""The aggregate a table keeps per key: the one place that knows what a partial holds.

A table entry is one key's *partial* aggregate within one source partition (see
tables.grouped_mean for why there are partials). Everything that stores, ships, merges or
prints partials goes through an `Aggregate`:

- a partial in memory: one `MeanState` per value field, with `add_all` (a batch of
  values), `merge` and the offset after the last record applied to it;
- `encode`/`decode`: the stored form, in RocksDB and on the changelog. It carries a version
  byte, so a later aggregate can read entries an older kappa wrote, or refuse them with a
  clear error, instead of misreading them. Version 2 is fixed-width binary, so a whole batch
  or table of entries is read and written as one numpy buffer; versions 1 (JSON) and the
  unversioned JSON before it are still read, and never written;
- `add_batches`: a batch's per-key sums added to many stored entries at once, column-wise
  (the agent's hot path: no MeanState per key);
- `partial_fields` and `decode_many`: partials as Arrow columns (snapshot parts, merges),
  decoded in bulk without a Python object per key; `next_offsets`: the offset after the last
  record each entry includes, and `records_held`: the records per value a table's partials
  hold (with the stats entry's counts, a part checks it is an exact image of its partition);
- `merge_groups` and `output`: partials of equal keys added up, and the snapshot columns.

To add an aggregate, implement this protocol beside `Mean` and choose it where the
pipeline's table is defined; snapshot and part schemas and the test oracle's columns follow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import ClassVar, Protocol, cast

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from tables.keys import PLAIN, KeyLayout

# The first byte of every encoded entry. Entries before versioning were bare JSON arrays,
# which start with "[" (0x5b), so they are told apart from every version.
MEAN_V1 = 1  # then `[next_offset, total, compensation, count, ...]` as JSON (read, no longer written)
MEAN_V2 = 2  # then little-endian int64 next_offset and, per value, float64 total, compensation, int64 count
LEGACY_JSON = ord("[")
PARTIALS_CHUNK = 65_536  # entries decoded at once when a table is read for a snapshot


class Aggregate(Protocol):
    """What a table keeps per key and how partials become snapshot columns."""

    name: ClassVar[str]
    width: int  # the value fields it aggregates
    partial_fields: tuple[tuple[str, pa.DataType], ...]
    output_fields: tuple[tuple[str, pa.DataType], ...]

    def new(self) -> list[MeanState]: ...
    def decode(self, raw: bytes | None) -> list[MeanState]: ...
    def encode(self, states: Sequence[MeanState]) -> bytes: ...
    def decode_many(self, entries: Sequence[bytes]) -> dict[str, np.ndarray]: ...
    def next_offsets(self, entries: Sequence[bytes]) -> np.ndarray: ...
    def next_offset(self, raw: bytes) -> int: ...
    def add_batches(self, stored: Sequence[bytes | None], batches: BatchSums) -> list[bytes | None]: ...
    def merge_groups(self, columns: dict[str, np.ndarray], starts: np.ndarray) -> dict[str, np.ndarray]: ...
    def output(self, merged: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def records_held(self, partials: pa.Table | pa.RecordBatch) -> list[int]: ...


@dataclass(slots=True)
class MeanState:
    """A partial sum and count of one key within one source partition.

    Sums use Neumaier compensation, and a batch enters as its exact sum split in two floats
    (`exact_sum`): so 1e12 magnitudes and small values together still agree with pandas to
    far better than 1e-9, and the sum does not depend on how the records were batched (the
    same log gives the same bits, batch or live, however the consumer fetched it).
    """

    total: float = 0.0
    compensation: float = 0.0
    count: int = 0
    next_offset: int = 0

    def _accumulate(self, value: float) -> None:
        total = self.total + value
        if not math.isfinite(total):  # past float's range the sum is infinite (or NaN), as pandas has it
            self.compensation = 0.0  # and a compensation would be inf - inf: NaN
        elif abs(self.total) >= abs(value):
            self.compensation += (self.total - total) + value
        else:
            self.compensation += (value - total) + self.total
        self.total = total

    def add(self, value: float) -> None:
        self._accumulate(value)
        self.count += 1

    def add_all(self, values: list[float]) -> None:
        """A batch's values at once, as two C calls instead of a Python step per value."""
        if values:
            high, low = exact_sum(values)
            self._accumulate(high)
            if low:
                self._accumulate(low)
            self.count += len(values)

    @property
    def sum(self) -> float:
        return self.total + self.compensation

    def merge(self, other: MeanState) -> None:
        self._accumulate(other.total)
        self._accumulate(other.compensation)
        self.count += other.count


def exact_sum(values: list[float]) -> tuple[float, float]:
    """The sum of `values` as its correctly rounded float and the rest (the exact sum minus
    that float, rounded): fsum gives both. Partial sums beyond 1.8e308 are infinite, as
    pandas has them."""
    try:
        high = math.fsum(values)
    except OverflowError:
        return sum(values), 0.0
    if len(values) < 2:
        return high, 0.0
    return high, math.fsum([*values, -high])


@dataclass(slots=True)
class BatchSums:
    """One batch's contribution per key (row) and value field (column): the exact sum and
    the count of its values, and the offsets of the key's first record in the batch and
    after its last."""

    sums: np.ndarray  # keys x values, float64: exact_sum's high part
    rests: np.ndarray  # keys x values, float64: exact_sum's low part
    counts: np.ndarray  # keys x values, int64
    first_offsets: np.ndarray  # keys, int64: the key's first record in the batch
    next_offsets: np.ndarray  # keys, int64


class Mean:
    """count, sum and mean of each value field, as pandas' `agg(["count", "sum", "mean"])`.

    A partial is one MeanState per value field (they share the next offset). With one
    value the columns are `count, sum, mean`; with several, `<value>_count` and so on.
    """

    name: ClassVar[str] = "mean"

    partial_fields: tuple[tuple[str, pa.DataType], ...]
    output_fields: tuple[tuple[str, pa.DataType], ...]

    def __init__(self, values: Sequence[str] = ("value",)) -> None:
        self.values = tuple(values)
        self.width = len(self.values)
        if self.width == 1:
            self.partial_fields = (("total", pa.float64()), ("compensation", pa.float64()), ("count", pa.int64()))
            self.output_fields = (("count", pa.int64()), ("sum", pa.float64()), ("mean", pa.float64()))
        else:
            self.partial_fields = tuple(
                (f"{part}_{i}", kind)
                for i in range(self.width)
                for part, kind in (("total", pa.float64()), ("compensation", pa.float64()), ("count", pa.int64()))
            )
            self.output_fields = tuple(
                (f"{value}_{part}", kind)
                for value in self.values
                for part, kind in (("count", pa.int64()), ("sum", pa.float64()), ("mean", pa.float64()))
            )

    @functools.cached_property
    def entry_dtype(self) -> np.dtype:
        """A version 2 entry: packed, little-endian, 9 + 24 bytes per value."""
        fields = [("version", "u1"), ("next_offset", "<i8")]
        for i in range(self.width):
            fields += [(f"total_{i}", "<f8"), (f"compensation_{i}", "<f8"), (f"count_{i}", "<i8")]
        return np.dtype(fields)

    def _names(self, i: int) -> tuple[str, str, str]:
        if self.width == 1:
            return "total", "compensation", "count"
        return f"total_{i}", f"compensation_{i}", f"count_{i}"

    def new(self) -> list[MeanState]:
        return [MeanState() for _ in range(self.width)]

    def records_held(self, partials: pa.Table | pa.RecordBatch) -> list[int]:
        """Per value, how many records the partials hold: each record counted adds one to one
        key's count of each value it has, and nothing removes a key."""
        return [int(pc.sum(partials.column(self._names(i)[2])).as_py() or 0) for i in range(self.width)]

    def encode(self, states: Sequence[MeanState]) -> bytes:
        """Version 2: the version byte, then next_offset and a (total, compensation, count) triple
        per value, little-endian and fixed-width (`entry_dtype`). Infinities and NaN are floats
        like any other (JSON, in version 1, had to spell them as text)."""
        return self._encode_rows(np.array([self._row_of(states)], dtype=np.float64))[0]

    def decode(self, raw: bytes | None) -> list[MeanState]:
        if raw is None:
            return self.new()
        version = raw[0]
        if version == MEAN_V2:
            if len(raw) != self.entry_dtype.itemsize:
                raise self._other_width(1 + 3 * ((len(raw) - 9) // 24))
            return self._states_of(self._rows_of(np.frombuffer(raw, dtype=self.entry_dtype))[0])
        if version == MEAN_V1:
            fields = orjson.loads(raw[1:])
            next_offset = fields[0]
        elif version == LEGACY_JSON:  # written before entries were versioned: one value, offset last
            total, compensation, count, next_offset = orjson.loads(raw)
            fields = [next_offset, total, compensation, count]
        else:
            raise unknown_version(self.name, version)
        if len(fields) != 1 + 3 * self.width:
            raise self._other_width(len(fields))
        return [
            MeanState(float(fields[1 + 3 * i]), float(fields[2 + 3 * i]), fields[3 + 3 * i], next_offset)
            for i in range(self.width)
        ]

    def add_batches(self, stored: Sequence[bytes | None], batches: BatchSums) -> list[bytes | None]:
        """The entries of many keys after adding a batch to each: `stored` (None: a new key)
        with `batches`' row of the same index, column-wise, with `MeanState.add_all`'s
        arithmetic (a value with no records in the batch is left as it is). None for an
        entry that has applied part of its batch already (a re-delivery): the caller applies
        the rest record by record."""
        if not stored:
            return []
        rows = self._rows(stored)
        stored_offsets = rows[:, 0].copy()
        for i in range(self.width):
            totals, compensations = rows[:, 1 + 3 * i], rows[:, 2 + 3 * i]
            added, compensated = neumaier_add(totals, compensations, batches.sums[:, i])
            rest = batches.rests[:, i]
            with_rest = neumaier_add(added, compensated, rest)
            added, compensated = (
                np.where(rest != 0, with_rest[0], added),
                np.where(rest != 0, with_rest[1], compensated),
            )
            touched = batches.counts[:, i] > 0
            rows[:, 1 + 3 * i] = np.where(touched, added, totals)
            rows[:, 2 + 3 * i] = np.where(touched, compensated, compensations)
            rows[:, 3 + 3 * i] += batches.counts[:, i]
        rows[:, 0] = batches.next_offsets
        entries: list[bytes | None] = list(self._encode_rows(rows))
        for index in np.flatnonzero(batches.first_offsets < stored_offsets).tolist():
            entries[index] = None
        return entries

    def _encode_rows(self, rows: np.ndarray) -> list[bytes]:
        """Rows of `[next_offset, total, compensation, count, ...]` as version 2 entries: one
        buffer, cut into fixed-width pieces."""
        entries = np.zeros(len(rows), dtype=self.entry_dtype)
        entries["version"], entries["next_offset"] = MEAN_V2, rows[:, 0]
        for i in range(self.width):
            entries[f"total_{i}"] = rows[:, 1 + 3 * i]
            entries[f"compensation_{i}"] = rows[:, 2 + 3 * i]
            entries[f"count_{i}"] = rows[:, 3 + 3 * i]
        return entries.view(f"V{self.entry_dtype.itemsize}").tolist()

    def _rows(self, stored: Sequence[bytes | None]) -> np.ndarray:
        """`[next_offset, total, compensation, count, ...]` per entry as float64 (zeros where None)."""
        rows = np.zeros((len(stored), 1 + 3 * self.width), dtype=np.float64)
        present = [index for index, entry in enumerate(stored) if entry is not None]
        if not present:
            return rows
        rows[present] = self._entry_rows([cast(bytes, stored[index]) for index in present])
        return rows

    def _entry_rows(self, entries: Sequence[bytes]) -> np.ndarray:
        """`[next_offset, total, compensation, count, ...]` of each entry as rows of float64: one
        numpy view of the joined entries when all are version 2 of this width (the rest go
        through `decode`). Counts and offsets are exact in float64 up to 2**53."""
        size = self.entry_dtype.itemsize
        joined = b"".join(entries)
        if len(joined) == size * len(entries):
            found = np.frombuffer(joined, dtype=self.entry_dtype)
            if (found["version"] == MEAN_V2).all():
                return self._rows_of(found)
        return np.array([self._row_of(self.decode(entry)) for entry in entries], dtype=np.float64)

    @staticmethod
    def _row_of(states: Sequence[MeanState]) -> list[float]:
        """The row form (see `_entry_rows`) of one key's states."""
        return [states[0].next_offset, *(x for state in states for x in (state.total, state.compensation, state.count))]

    def _states_of(self, row: np.ndarray) -> list[MeanState]:
        return [
            MeanState(float(row[1 + 3 * i]), float(row[2 + 3 * i]), int(row[3 + 3 * i]), int(row[0]))
            for i in range(self.width)
        ]

    def _rows_of(self, entries: np.ndarray) -> np.ndarray:
        rows = np.empty((len(entries), 1 + 3 * self.width), dtype=np.float64)
        rows[:, 0] = entries["next_offset"]
        for i in range(self.width):
            rows[:, 1 + 3 * i] = entries[f"total_{i}"]
            rows[:, 2 + 3 * i] = entries[f"compensation_{i}"]
            rows[:, 3 + 3 * i] = entries[f"count_{i}"]
        return rows

    def _other_width(self, fields: int) -> UnreadableEntry:
        return UnreadableEntry(
            f"a stored {self.name} entry holds {(fields - 1) // 3} value(s), the pipeline has {self.width}: "
            "the table belongs to another definition; replay the pipeline into a new generation"
        )

    def decode_many(self, entries: Sequence[bytes]) -> dict[str, np.ndarray]:
        """The partial columns of many entries, read as one numpy buffer (no object per key)."""
        if not entries:
            return {name: np.empty(0, dtype=kind.to_pandas_dtype()) for name, kind in self.partial_fields}
        rows = self._entry_rows(entries)
        columns = {}
        for i in range(self.width):
            total, compensation, count = self._names(i)
            columns[total] = np.ascontiguousarray(rows[:, 1 + 3 * i])
            columns[compensation] = np.ascontiguousarray(rows[:, 2 + 3 * i])
            columns[count] = rows[:, 3 + 3 * i].astype(np.int64)
        return columns

    def next_offset(self, raw: bytes) -> int:
        """One entry's next offset, whatever its version and number of values (a changelog's
        restore compares entries of one key by it)."""
        version = raw[0]
        if version == MEAN_V2:
            return int.from_bytes(raw[1:9], "little", signed=True)
        if version == MEAN_V1:
            return int(orjson.loads(raw[1:])[0])
        if version == LEGACY_JSON:
            return int(orjson.loads(raw)[3])
        raise unknown_version(self.name, version)

    def next_offsets(self, entries: Sequence[bytes]) -> np.ndarray:
        """Each entry's next offset: the offset after the last record of its partition it includes."""
        if not entries:
            return np.empty(0, dtype=np.int64)
        return self._entry_rows(entries)[:, 0].astype(np.int64)

    def merge_groups(self, columns: dict[str, np.ndarray], starts: np.ndarray) -> dict[str, np.ndarray]:
        """Add up the partials of each group of equal keys (rows `starts[i]` up to the next).

        Most keys live on one partition, so most groups have one row; the sums of groups with
        several are redone with math.fsum over every partial's total and compensation:
        correctly rounded, however the partials cancel."""
        merged = {}
        for i in range(self.width):
            total, compensation, count = self._names(i)
            counts, sums = _merge_one(columns[total], columns[compensation], columns[count], starts)
            merged[f"count_{i}"], merged[f"sum_{i}"] = counts, sums
        return merged

    def output(self, merged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The snapshot columns; a mean is left empty where nothing was counted, as pandas."""
        columns = {}
        for i, value in enumerate(self.values):
            counts, sums = merged[f"count_{i}"], merged[f"sum_{i}"]
            with np.errstate(divide="ignore", invalid="ignore"):
                means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            prefix = "" if self.width == 1 else f"{value}_"
            columns.update({f"{prefix}count": counts, f"{prefix}sum": sums, f"{prefix}mean": means})
        return columns


def neumaier_add(totals: np.ndarray, compensations: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`MeanState._accumulate` for whole columns (values added to compensated totals): the same
    operations, so the same bits."""
    with np.errstate(invalid="ignore", over="ignore"):
        added = totals + values
        larger = np.abs(totals) >= np.abs(values)
        error = np.where(larger, (totals - added) + values, (values - added) + totals)
        return added, np.where(np.isfinite(added), compensations + error, 0.0)


def _merge_one(
    totals: np.ndarray, compensations: np.ndarray, counts: np.ndarray, starts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    rows = len(totals)
    if rows == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    merged_counts = np.add.reduceat(counts, starts)
    sums = totals[starts] + compensations[starts]
    ends = np.append(starts[1:], rows)
    for group in np.flatnonzero(ends - starts > 1):
        first, last = starts[group], ends[group]
        sums[group] = _sum_partials([*totals[first:last], *compensations[first:last]])
    return merged_counts, sums


def _sum_partials(parts: list[float]) -> float:
    """fsum of the partials; past float's range infinite, and NaN for inf - inf, as pandas has
    them (fsum raises for both)."""
    try:
        return math.fsum(parts)
    except OverflowError:
        return sum(float(part) for part in parts)  # Python floats: inf, without numpy's overflow warning
    except ValueError:
        return math.nan


class UnreadableEntry(ValueError):
    """A stored entry in an encoding this version of kappa does not know."""


def unknown_version(name: str, version: int) -> UnreadableEntry:
    return UnreadableEntry(
        f"a stored {name} entry has encoding version {version}, which this kappa cannot read (it reads "
        f"{MEAN_V2}, {MEAN_V1} and unversioned entries): it was written by a newer kappa; upgrade, or replay the "
        "pipeline into a new generation"
    )


MEAN = Mean()


def partial_schema(layout: KeyLayout = PLAIN, aggregate: Aggregate = MEAN) -> pa.Schema:
    """The columns of a part file: the stored key, then the aggregate's partial columns."""
    return pa.schema([("key", layout.key_type()), *aggregate.partial_fields])


def output_schema(layout: KeyLayout = PLAIN, aggregate: Aggregate = MEAN) -> pa.Schema:
    """The columns of a snapshot: key columns (and window start), then the aggregate's columns."""
    return pa.schema([*layout.output_fields(), *aggregate.output_fields])


def partials_table(
    pairs: Iterable[tuple[bytes, bytes]],
    aggregate: Aggregate = MEAN,
    layout: KeyLayout = PLAIN,
    chunk: int = PARTIALS_CHUNK,
) -> pa.Table:
    """(stored key, encoded entry) pairs as an Arrow table of partials."""
    return partials_setting_aside(pairs, frozenset(), aggregate, layout, chunk)[0]


def partials_setting_aside(
    pairs: Iterable[tuple[bytes, bytes]],
    set_aside: frozenset[bytes],
    aggregate: Aggregate = MEAN,
    layout: KeyLayout = PLAIN,
    chunk: int = PARTIALS_CHUNK,
    newest: list[int] | None = None,
) -> tuple[pa.Table, dict[bytes, bytes]]:
    """(stored key, encoded entry) pairs as an Arrow table of partials, without the keys in
    `set_aside` (bookkeeping entries that share the store); and the set-aside entries found.
    `newest`: see `partial_batches`."""
    found: dict[bytes, bytes] = {}
    batches = list(partial_batches(pairs, set_aside, found, aggregate, layout, chunk, newest))
    return pa.Table.from_batches(batches, schema=partial_schema(layout, aggregate)), found


def partial_batches(
    pairs: Iterable[tuple[bytes, bytes]],
    set_aside: frozenset[bytes],
    found: dict[bytes, bytes],
    aggregate: Aggregate = MEAN,
    layout: KeyLayout = PLAIN,
    chunk: int = PARTIALS_CHUNK,
    newest: list[int] | None = None,
) -> Iterator[pa.RecordBatch]:
    """(stored key, encoded entry) pairs as Arrow record batches of partials, in their order,
    read as they are asked for; the entries of keys in `set_aside` go into `found` instead.
    With `newest`, each chunk's highest next offset is appended to it.

    Decoded in bulk a chunk at a time: the Python objects of a chunk are all that is held beside
    the batches. Chunks are taken and split with C-level calls (islice, itemgetter), so a store's
    own iterator is read with no Python step per entry: at 1M keys a generator in between, and
    `zip(*chunk)`, cost a second."""
    schema = partial_schema(layout, aggregate)
    pairs = iter(pairs)
    while pairs_chunk := list(islice(pairs, chunk)):
        keys, entries = list(map(_FIRST, pairs_chunk)), list(map(_SECOND, pairs_chunk))
        for key in set_aside.intersection(keys):
            index = keys.index(key)
            found[key] = entries.pop(index)
            del keys[index]
        if not keys:
            continue
        columns = aggregate.decode_many(entries)
        if newest is not None:
            newest.append(int(aggregate.next_offsets(entries).max()))
        key_column = _binary_array(keys).cast(layout.key_type())
        yield pa.record_batch({"key": key_column, **columns}, schema=schema)


_FIRST, _SECOND = itemgetter(0), itemgetter(1)


def _binary_array(values: list[bytes]) -> pa.Array:
    """`pa.array(values, pa.binary())` from one joined buffer and the offsets: a third of the time."""
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=len(values)), out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))]
    ).cast(pa.binary())
