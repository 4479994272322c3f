"""Partition parts: how several worker processes build one complete snapshot.

Each process writes, for every source partition it owns, a *part*: that partition's partial
aggregates and record counts at one next-offset, as a Parquet file renamed into place
atomically. The publisher merges the newest part of every partition into a snapshot whose
cut is the per-partition offsets of those parts. Every part is an exact image of its
partition at its offset, so the newest part per partition always makes a valid cut, even
while partitions move between processes (a stale owner's part simply has a lower offset).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kappa.snapshot import CHUNK_ROWS, rows_frame
from tables.grouped_mean import MeanState, PartitionStats

PART_NAME = re.compile(r"^p(\d+)-o(\d+)\.parquet$")
PART_SCHEMA = pa.schema(
    [("key", pa.string()), ("total", pa.float64()), ("compensation", pa.float64()), ("count", pa.int64())]
)
KEEP_PARTS = 3


def parts_dir(snapshot_dir: Path, pipeline: str, generation: int) -> Path:
    return snapshot_dir / pipeline / ".parts" / f"g{generation}"


def write_part(directory: Path, partition: int, partials: list[tuple[bytes, MeanState]], stats: PartitionStats) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "key": [key.decode("utf-8") for key, _ in partials],
            "total": [state.total for _, state in partials],
            "compensation": [state.compensation for _, state in partials],
            "count": [state.count for _, state in partials],
        },
        schema=PART_SCHEMA,
    )
    meta = {"partition": partition, "next_offset": stats.next_offset, "records": _records(stats)}
    table = table.replace_schema_metadata({"kappa": json.dumps(meta)})
    final = directory / f"p{partition}-o{stats.next_offset}.parquet"
    staging = directory / f".{final.name}.{os.getpid()}.tmp"
    pq.write_table(table, staging)
    os.replace(staging, final)
    _prune_partition(directory, partition)
    return final


def _records(stats: PartitionStats) -> dict[str, int]:
    return {"counted": stats.counted, "skipped": stats.skipped, "rejected": stats.rejected}


def newest_parts(directory: Path) -> dict[int, tuple[int, Path]]:
    """partition -> (next offset, path) of its newest part."""
    newest: dict[int, tuple[int, Path]] = {}
    if not directory.is_dir():
        return newest
    for entry in directory.iterdir():
        match = PART_NAME.match(entry.name)
        if match:
            partition, offset = int(match.group(1)), int(match.group(2))
            if partition not in newest or offset > newest[partition][0]:
                newest[partition] = (offset, entry)
    return newest


def _prune_partition(directory: Path, partition: int) -> None:
    mine = sorted(
        (int(m.group(2)), entry)
        for entry in directory.iterdir()
        if (m := PART_NAME.match(entry.name)) and int(m.group(1)) == partition
    )
    for _, entry in mine[:-KEEP_PARTS]:
        entry.unlink(missing_ok=True)


@dataclass
class MergedParts:
    """The newest part of every partition: their rows (one per key and partition) and cut."""

    table: pa.Table
    offsets: dict[int, int]
    records: dict[str, int]

    def snapshot_chunks(self, size: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
        return snapshot_chunks(self.table, size)


def cut_of(newest: Mapping[int, tuple[int, Path]], partitions: int) -> dict[int, int]:
    """The per-partition offsets a merge of these parts stands for (0 where none exists yet);
    known from the file names alone, so an unchanged cut costs no read."""
    offsets = {p: 0 for p in range(partitions)}
    offsets.update({partition: offset for partition, (offset, _) in newest.items()})
    return offsets


def read_parts(newest: Mapping[int, tuple[int, Path]], partitions: int) -> MergedParts:
    """The given parts, read as Arrow (no Python object per row)."""
    tables = []
    records = {"counted": 0, "skipped": 0, "rejected": 0}
    for _, (_, path) in sorted(newest.items()):
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"kappa"])
        for kind, count in meta["records"].items():
            records[kind] += count
        tables.append(table.replace_schema_metadata(None))
    combined = pa.concat_tables(tables) if tables else PART_SCHEMA.empty_table()
    return MergedParts(table=combined, offsets=cut_of(newest, partitions), records=records)


def merge_parts(directory: Path, partitions: int) -> MergedParts:
    """The newest part of every partition."""
    return read_parts(newest_parts(directory), partitions)


def snapshot_chunks(rows: pa.Table, size: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Snapshot rows in key order from part rows, in chunks; a key's partials are added up.

    Arrow sorts the rows (bytewise, which is code-point order for UTF-8) without a Python
    object per row, and equal keys, now adjacent, are added up with numpy. A key on several
    partitions is the rare case (the loader partitions by key; only outside partitioners
    spread one), and only those keys' sums are redone with math.fsum over every partial's
    total and compensation: correctly rounded, however the partials cancel.
    """
    rows = rows.sort_by("key")
    keys = rows.column("key")
    totals = rows.column("total").to_numpy()
    compensations = rows.column("compensation").to_numpy()
    starts = np.arange(len(rows))
    if len(rows) > 1:
        repeats = pc.equal(keys.slice(1), keys.slice(0, len(rows) - 1)).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.concatenate(([True], ~repeats)))
    counts = np.add.reduceat(rows.column("count").to_numpy(), starts) if len(rows) else np.empty(0, np.int64)
    sums = totals[starts] + compensations[starts]
    if len(starts) < len(rows):
        ends = np.append(starts[1:], len(rows))
        for group in np.flatnonzero(ends - starts > 1):
            first, last = starts[group], ends[group]
            sums[group] = math.fsum([*totals[first:last], *compensations[first:last]])
        keys = keys.take(pa.array(starts))
    for start in range(0, len(sums), size):
        end = start + size
        yield rows_frame(keys.slice(start, size).to_pylist(), counts[start:end], sums[start:end])
