"""Snapshot files: build, publish atomically, prune, and read back.

A snapshot directory is fully written and fsynced under a temporary name, renamed into
place, and only then does `latest` (a relative symlink) move to it by an atomic rename. A
reader that resolves `latest` once therefore sees one complete, consistent cut.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kappa.errors import KappaError
from kappa.snapshots import csvtext
from tables.aggregate import MEAN, Aggregate, output_schema, partial_schema
from tables.keys import PLAIN, KeyLayout

if TYPE_CHECKING:  # pandas is imported by read_snapshot's caller, not by every kappa command
    import pandas as pd

KEEP_SNAPSHOTS = 5
SNAPSHOT_DIR = re.compile(r"^g(\d+)-(\d+)$")
CHUNK_ROWS = 65_536
CSV_THREADS = 2  # chunks of CSV text formatted at once (Arrow's kernels run without the GIL)


@dataclass
class SnapshotRows:
    """A snapshot's rows: consecutive Arrow tables in key order, and the table's schema."""

    schema: pa.Schema
    chunks: Iterable[pa.Table]


def merge_partials(
    runs: Sequence[Iterable[pa.RecordBatch]],
    aggregate: Aggregate = MEAN,
    layout: KeyLayout = PLAIN,
    size: int = CHUNK_ROWS,
) -> SnapshotRows:
    """Snapshot rows in key order, in chunks of at most `size`, from sorted runs of partials;
    a key's partials are merged.

    The one merge behind every snapshot, batch and live. A run is one partition's partials in
    key order, each key once: a RocksDB partition read in its own order, or a part written
    from one. The runs are merged a slice at a time, so a snapshot holds a slice of every run
    and one chunk, never the whole table (a 1M-key snapshot read whole took 150 MB more).
    Each run is read `read_ahead_rows` ahead; the rows up to the smallest last key read of any
    run that has more are merged now, since no later row of any run can hold such a key.
    Arrow sorts a slice's rows (bytewise, the order of the stored keys: tables.keys) without a
    Python object per row, and the aggregate merges each run of equal keys, now adjacent, with
    numpy. A run found out of order is refused: merging it would split a key over two rows."""
    return SnapshotRows(output_schema(layout, aggregate), _merged_chunks(runs, aggregate, layout, size))


def read_ahead_rows(runs: int, size: int = CHUNK_ROWS) -> int:
    """Rows read ahead in each of `runs` runs: one chunk's worth between them all."""
    return max(size // max(runs, 1), 1)


class SortedRun:
    """One run of partials, read `rows` ahead, each batch checked to continue its key order."""

    def __init__(self, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> None:
        self._batches = iter(batches)
        self._schema = schema
        self._buffered: list[pa.RecordBatch] = []
        self.rows = 0
        self.exhausted = False
        self.last_key: str | bytes | None = None  # of the last row read

    def read_ahead(self, rows: int) -> None:
        while not self.exhausted and self.rows < rows:
            batch = next(self._batches, None)
            if batch is None:
                self.exhausted = True
            elif batch.num_rows:
                self._check_order(batch.column(0))
                self._buffered.append(batch)
                self.rows += batch.num_rows

    def take_through(self, last: str | bytes | None) -> pa.Table:
        """The buffered rows whose key is at most `last` (all of them when None)."""
        buffered = pa.Table.from_batches(self._buffered, schema=self._schema)
        count = len(buffered)
        if last is not None and count:
            keys = buffered.column(0)
            count = pc.sum(pc.less_equal(keys, pa.scalar(last, keys.type))).as_py() or 0
        taken, rest = buffered.slice(0, count), buffered.slice(count)
        self._buffered, self.rows = rest.to_batches(), len(rest)
        return taken

    def _check_order(self, keys: pa.Array) -> None:
        first = keys[0].as_py()
        ordered = self.last_key is None or self.last_key < first
        if ordered and len(keys) > 1:
            ordered = pc.all(pc.less(keys.slice(0, len(keys) - 1), keys.slice(1))).as_py()
        if not ordered:
            raise KappaError(
                "a partition's partials are not in key order (expected each key once, ascending): "
                "the state or part file was not written by kappa; replay the pipeline into a new generation"
            )
        self.last_key = keys[len(keys) - 1].as_py()


def _merged_chunks(
    runs: Sequence[Iterable[pa.RecordBatch]], aggregate: Aggregate, layout: KeyLayout, size: int
) -> Iterator[pa.Table]:
    schema = partial_schema(layout, aggregate)
    readers = [SortedRun(run, schema) for run in runs]
    ahead = read_ahead_rows(len(readers), size)
    while True:
        for reader in readers:
            reader.read_ahead(ahead)
        readers = [reader for reader in readers if reader.rows or not reader.exhausted]
        if not readers:
            return
        more = [reader.last_key for reader in readers if not reader.exhausted]
        through = min(more) if more else None  # type: ignore[type-var]  # one key type per run
        slice_rows = pa.concat_tables([reader.take_through(through) for reader in readers])
        yield from _merged_slice(slice_rows, aggregate, layout, size)


def _merged_slice(rows: pa.Table, aggregate: Aggregate, layout: KeyLayout, size: int) -> Iterator[pa.Table]:
    """Rows that hold every partial of their keys, merged, in key order, `size` at a time."""
    if not len(rows):
        return
    rows = rows.sort_by("key")
    keys = rows.column("key")
    starts = np.arange(len(rows))
    if len(rows) > 1:
        repeats = pc.equal(keys.slice(1), keys.slice(0, len(rows) - 1)).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.concatenate(([True], ~repeats)))
    columns = {name: rows.column(name).to_numpy() for name, _ in aggregate.partial_fields}
    output = aggregate.output(aggregate.merge_groups(columns, starts))
    if len(starts) < len(rows):
        keys = keys.take(pa.array(starts))
    schema = output_schema(layout, aggregate)
    for start in range(0, len(starts), size):
        columns = {**layout.columns(keys.slice(start, size))}
        # NaN (a mean of nothing) is null in Parquet, as SPEC.md has it
        columns.update(
            {name: pa.array(values[start : start + size], from_pandas=True) for name, values in output.items()}
        )
        yield pa.table(columns, schema=schema)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _next_sequence(pipeline_dir: Path, generation: int) -> int:
    sequences = [
        int(match.group(2))
        for entry in pipeline_dir.iterdir()
        if (match := SNAPSHOT_DIR.match(entry.name)) and int(match.group(1)) == generation
    ]
    return max(sequences, default=0) + 1


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def publish(
    snapshot_dir: Path,
    pipeline: str,
    generation: int,
    table: SnapshotRows,
    manifest: dict,
    allowed: Callable[[], bool] | None = None,
) -> Path | None:
    """Write one snapshot and point `latest` at it; returns the snapshot's directory.

    `table`'s chunks are the rows sorted by key, as consecutive Arrow tables written as they come; the
    manifest's `keys` is set to the number of rows written.
    `allowed` is checked under the publish lock: a generation that has been switched away
    from gets None back and never moves `latest` again, so readers never go backwards.
    Within a generation `latest` is monotonic: a cut that covers fewer records of any
    partition than the published one (parts of a process that has just started or
    restarted) gets None back too, and the publisher tries again later.
    """
    pipeline_dir = snapshot_dir / pipeline
    try:
        pipeline_dir.mkdir(parents=True, exist_ok=True)
        with publish_lock(pipeline_dir):
            if steps_back(pipeline_dir, generation, manifest["offsets"]):
                return None
            final = _write_and_link(pipeline_dir, generation, table, manifest, allowed)
    except OSError as exc:
        raise KappaError(f"could not publish a snapshot under {pipeline_dir}: {exc.strerror or exc}") from exc
    prune(pipeline_dir)
    return final


def steps_back(pipeline_dir: Path, generation: int | None, offsets: Mapping[int, int] | Mapping[str, int]) -> bool:
    """True when the cut `offsets` (partition -> next offset, as a manifest or as numbers) is
    behind the published snapshot in some partition: the one of the same generation, or with
    `generation` None, whatever generation it is (a switch-over)."""
    try:
        published = manifest_in(pipeline_dir / "latest")
    except (OSError, ValueError):
        return False
    if generation is not None and published.get("generation") != generation:
        return False
    cut = {int(p): o for p, o in offsets.items()}
    return any(cut.get(int(p), 0) < o for p, o in published.get("offsets", {}).items())


@contextmanager
def publish_lock(pipeline_dir: Path) -> Iterator[None]:
    """One publisher at a time allocates snapshot names and moves `latest`."""
    pipeline_dir.mkdir(parents=True, exist_ok=True)
    with open(pipeline_dir / ".publish.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_table_files(directory: Path, table: SnapshotRows) -> int:
    """table.csv and table.parquet from consecutive chunks of rows; returns the row count.

    In CSV a window start is ISO 8601 UTC text (`2024-01-31T10:00:00Z`); in Parquet a
    timestamp with the UTC zone. The CSV bytes are pandas' (kappa.snapshots.csvtext)."""
    rows, schema = 0, table.schema
    with (
        open(directory / "table.csv", "wb") as csv_file,
        # no dictionary pages: a snapshot has one row per key, so the attempt only costs (a 1M-key
        # table: 0.21 s and 23 MB with them, 0.10 s and 17.7 MB without)
        pq.ParquetWriter(directory / "table.parquet", schema, use_dictionary=False) as parquet,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet") as parquet_thread,
        ThreadPoolExecutor(max_workers=CSV_THREADS, thread_name_prefix="csv") as csv_threads,
    ):
        # Arrow encodes Parquet and formats CSV text in C++ without the GIL, so threads do both
        # while this one takes the next chunk: a 1M-key snapshot keeps every core busy. One
        # Parquet thread keeps its chunks in order; CSV chunks are formatted CSV_THREADS at a
        # time and written in order. At most CSV_THREADS + 1 chunks are in flight.
        parquet_written: Future[None] | None = None
        formatted: deque[Future[bytes]] = deque()
        csv_file.write(csvtext.header(schema.names))
        for chunk in table.chunks:
            if parquet_written is not None:
                parquet_written.result()
            parquet_written = parquet_thread.submit(parquet.write_table, chunk)
            formatted.append(csv_threads.submit(csvtext.lines, chunk))
            if len(formatted) > CSV_THREADS:
                csv_file.write(formatted.popleft().result())
            rows += chunk.num_rows
        while formatted:
            csv_file.write(formatted.popleft().result())
        if parquet_written is not None:
            parquet_written.result()
        if rows == 0:  # still a schema
            parquet.write_table(schema.empty_table())
    return rows


def _write_and_link(
    pipeline_dir: Path,
    generation: int,
    table: SnapshotRows,
    manifest: dict,
    allowed: Callable[[], bool] | None,
) -> Path | None:
    """Stage the files, then ask `allowed` (which may switch generations): a table streamed
    from state can still fail while it is written, and must fail before any switch."""
    name = f"g{generation}-{_next_sequence(pipeline_dir, generation):06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=pipeline_dir))
    try:
        manifest["keys"] = write_table_files(staging, table)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for part in ("table.csv", "table.parquet", "manifest.json"):
            _fsync_file(staging / part)
        os.chmod(staging, 0o755)
        if allowed is not None and not allowed():
            shutil.rmtree(staging, ignore_errors=True)
            return None
        final = pipeline_dir / name
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    link = pipeline_dir / f".latest.{os.getpid()}"
    link.unlink(missing_ok=True)
    os.symlink(name, link)
    os.replace(link, pipeline_dir / "latest")
    _fsync_dir(pipeline_dir)
    return final


def prune(pipeline_dir: Path, keep: int = KEEP_SNAPSHOTS) -> None:
    """Drop old snapshot directories; never the one `latest` points at, nor the newest few."""
    current = os.readlink(pipeline_dir / "latest") if (pipeline_dir / "latest").is_symlink() else None
    entries = sorted(
        (entry for entry in pipeline_dir.iterdir() if SNAPSHOT_DIR.match(entry.name)),
        key=lambda entry: entry.stat().st_mtime_ns,
    )
    for entry in entries[:-keep]:
        if entry.name != current:
            shutil.rmtree(entry, ignore_errors=True)


def build_manifest(
    *,
    pipeline: str,
    topic: str,
    generation: int,
    definition: Mapping[str, str],
    offsets: Mapping[int, int],
    end_offsets: Mapping[int, int],
    records: Mapping[str, int],
) -> dict:
    """Everything a snapshot says about itself but its row count, which publish() fills in."""
    lag = sum(max(end - offsets.get(p, 0), 0) for p, end in end_offsets.items())
    return {
        "pipeline": pipeline,
        "topic": topic,
        "generation": generation,
        "definition": dict(definition),
        "created_at": utc_now(),
        "offsets": {str(p): int(o) for p, o in sorted(offsets.items())},
        "end_offsets": {str(p): int(o) for p, o in sorted(end_offsets.items())},
        "complete": lag == 0,
        "lag": lag,
        "records": dict(records),
    }


def resolve_latest(snapshot_dir: str | os.PathLike, pipeline: str) -> Path:
    link = Path(snapshot_dir) / pipeline / "latest"
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        raise KappaError(
            f"no snapshot for pipeline {pipeline!r} under {Path(snapshot_dir).absolute()}: "
            "run `scripts/replay --batch` or `kappa worker` first, or pass --snapshot-dir"
        ) from None
    return link.parent / target


def read_manifest(snapshot_dir: str | os.PathLike, pipeline: str) -> dict:
    """The latest snapshot's manifest alone: what it covers, without reading its table."""
    return manifest_in(resolve_latest(snapshot_dir, pipeline))


def manifest_in(directory: Path) -> dict:
    """The manifest of one snapshot directory."""
    return json.loads((directory / "manifest.json").read_text())


def read_snapshot(snapshot_dir: str | os.PathLike, pipeline: str) -> tuple[pd.DataFrame, dict]:
    """The latest snapshot as (DataFrame sorted by key, manifest), read from one resolved cut.

    A snapshot published while the pipeline still had lag is valid but not complete: check
    `manifest["complete"]` (also `frame.attrs["complete"]`; `manifest["lag"]` is the number of
    records of the log it did not cover yet)."""
    directory = resolve_latest(snapshot_dir, pipeline)
    manifest = manifest_in(directory)
    frame = pq.read_table(directory / "table.parquet").to_pandas()
    frame.attrs["complete"] = bool(manifest.get("complete"))
    frame.attrs["lag"] = manifest.get("lag")
    return frame, manifest
