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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kappa.snapshots.snapshot import CHUNK_ROWS, SnapshotRows, merge_partials
from tables.aggregate import MEAN, Aggregate
from tables.grouped_mean import PartitionStats
from tables.keys import PLAIN, KeyLayout

PART_NAME = re.compile(r"^p(\d+)-o(\d+)\.parquet$")
KEEP_PARTS = 3


def parts_dir(snapshot_dir: Path, pipeline: str, generation: int) -> Path:
    return snapshot_dir / pipeline / ".parts" / f"g{generation}"


def write_part(directory: Path, partition: int, partials: pa.Table, stats: PartitionStats) -> Path:
    """One partition's partials (tables.grouped_mean.read_partition) at its next offset."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"partition": partition, "next_offset": stats.next_offset, "records": _records(stats)}
    table = partials.replace_schema_metadata({"kappa": json.dumps(meta)})
    final = directory / f"p{partition}-o{stats.next_offset}.parquet"
    staging = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        pq.write_table(table, staging)
        os.replace(staging, final)
    except BaseException:
        staging.unlink(missing_ok=True)  # a part written halfway (a full disk) is never left behind
        raise
    _prune_partition(directory, partition)
    return final


def _records(stats: PartitionStats) -> dict:
    found: dict = {"counted": stats.counted, "skipped": stats.skipped, "rejected": stats.rejected}
    if stats.values is not None:
        found["values"] = stats.values
    return found


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
    """The newest part of every partition: their rows (a table per part, each in key order) and cut."""

    runs: list[pa.Table]
    offsets: dict[int, int]
    stats: PartitionStats

    def snapshot_rows(
        self, aggregate: Aggregate = MEAN, layout: KeyLayout = PLAIN, size: int = CHUNK_ROWS
    ) -> SnapshotRows:
        return merge_partials([run.to_batches() for run in self.runs], aggregate, layout, size)


def cut_of(newest: Mapping[int, tuple[int, Path]], partitions: int) -> dict[int, int]:
    """The per-partition offsets a merge of these parts stands for (0 where none exists yet);
    known from the file names alone, so an unchanged cut costs no read."""
    offsets = {p: 0 for p in range(partitions)}
    offsets.update({partition: offset for partition, (offset, _) in newest.items()})
    return offsets


def read_parts(newest: Mapping[int, tuple[int, Path]], partitions: int) -> MergedParts:
    """The given parts, read as Arrow (no Python object per row)."""
    tables = []
    stats = PartitionStats()
    for _, (_, path) in sorted(newest.items()):
        table = pq.ParquetFile(path).read()  # not read_table: its dataset layer imports pandas and costs 0.4 s once
        records = json.loads(table.schema.metadata[b"kappa"])["records"]
        stats.merge(
            PartitionStats(records["counted"], records["skipped"], records["rejected"], values=records.get("values"))
        )
        tables.append(table.replace_schema_metadata(None))
    return MergedParts(runs=tables, offsets=cut_of(newest, partitions), stats=stats)


def merge_parts(directory: Path, partitions: int) -> MergedParts:
    """The newest part of every partition."""
    return read_parts(newest_parts(directory), partitions)
