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
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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
    frame: pd.DataFrame
    offsets: dict[int, int]
    records: dict[str, int]


def merge_parts(directory: Path, partitions: int) -> MergedParts:
    """The newest part of every partition, added up per key into snapshot rows."""
    newest = newest_parts(directory)
    frames, offsets = [], {p: 0 for p in range(partitions)}
    records = {"counted": 0, "skipped": 0, "rejected": 0}
    for partition, (offset, path) in sorted(newest.items()):
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"kappa"])
        offsets[partition] = offset
        for kind, count in meta["records"].items():
            records[kind] += count
        frames.append(table.to_pandas())
    if frames:
        combined = pd.concat(frames, ignore_index=True)
        grouped = combined.groupby("key", sort=True).agg(
            total=("total", "sum"), compensation=("compensation", "sum"), count=("count", "sum")
        )
    else:
        grouped = pd.DataFrame({"total": [], "compensation": [], "count": []}, index=pd.Index([], name="key"))
    counts = grouped["count"].to_numpy(np.int64)
    sums = grouped["total"].to_numpy(np.float64) + grouped["compensation"].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    frame = pd.DataFrame({"key": grouped.index.to_numpy(dtype=object), "count": counts, "sum": sums, "mean": means})
    return MergedParts(frame=frame, offsets=offsets, records=records)
