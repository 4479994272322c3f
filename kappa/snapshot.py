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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kappa.errors import KappaError
from tables.grouped_mean import MeanState

KEEP_SNAPSHOTS = 5
SNAPSHOT_DIR = re.compile(r"^g(\d+)-(\d+)$")
SCHEMA = pa.schema([("key", pa.string()), ("count", pa.int64()), ("sum", pa.float64()), ("mean", pa.float64())])


def merge_partials(partials: Iterable[tuple[bytes, MeanState]]) -> dict[str, MeanState]:
    """Add up one key's partial aggregates from every partition it appeared on."""
    merged: dict[str, MeanState] = {}
    for raw_key, state in partials:
        key = raw_key.decode("utf-8")
        current = merged.get(key)
        if current is None:
            merged[key] = MeanState(state.total, state.compensation, state.count)
        else:
            current.merge(state)
    return merged


def to_frame(aggregates: Mapping[str, MeanState]) -> pd.DataFrame:
    """Rows sorted by key, with the mean left empty where nothing was counted (as pandas)."""
    keys = sorted(aggregates)
    counts = np.fromiter((aggregates[k].count for k in keys), dtype=np.int64, count=len(keys))
    sums = np.fromiter((aggregates[k].sum for k in keys), dtype=np.float64, count=len(keys))
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return pd.DataFrame({"key": pd.Series(keys, dtype=object), "count": counts, "sum": sums, "mean": means})


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
    frame: pd.DataFrame,
    manifest: dict,
    allowed: Callable[[], bool] | None = None,
) -> Path | None:
    """Write one snapshot and point `latest` at it; returns the snapshot's directory.

    `allowed` is checked under the publish lock: a generation that has been switched away
    from gets None back and never moves `latest` again, so readers never go backwards.
    """
    pipeline_dir = snapshot_dir / pipeline
    try:
        pipeline_dir.mkdir(parents=True, exist_ok=True)
        with publish_lock(pipeline_dir):
            if allowed is not None and not allowed():
                return None
            final = _write_and_link(pipeline_dir, generation, frame, manifest)
    except OSError as exc:
        raise KappaError(f"could not publish a snapshot under {pipeline_dir}: {exc.strerror or exc}") from exc
    prune(pipeline_dir)
    return final


@contextmanager
def publish_lock(pipeline_dir: Path) -> Iterator[None]:
    """One publisher at a time allocates snapshot names and moves `latest`."""
    pipeline_dir.mkdir(parents=True, exist_ok=True)
    with open(pipeline_dir / ".publish.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_and_link(pipeline_dir: Path, generation: int, frame: pd.DataFrame, manifest: dict) -> Path:
    name = f"g{generation}-{_next_sequence(pipeline_dir, generation):06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=pipeline_dir))
    try:
        frame.to_csv(staging / "table.csv", index=False, lineterminator="\r\n", encoding="utf-8")
        pq.write_table(pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False), staging / "table.parquet")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for part in ("table.csv", "table.parquet", "manifest.json"):
            _fsync_file(staging / part)
        os.chmod(staging, 0o755)
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
    keys: int,
) -> dict:
    return {
        "pipeline": pipeline,
        "topic": topic,
        "generation": generation,
        "definition": dict(definition),
        "created_at": utc_now(),
        "offsets": {str(p): int(o) for p, o in sorted(offsets.items())},
        "end_offsets": {str(p): int(o) for p, o in sorted(end_offsets.items())},
        "complete": all(offsets.get(p, 0) >= end for p, end in end_offsets.items()),
        "records": dict(records),
        "keys": keys,
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


def read_snapshot(snapshot_dir: str | os.PathLike, pipeline: str) -> tuple[pd.DataFrame, dict]:
    """The latest snapshot as (DataFrame sorted by key, manifest), read from one resolved cut."""
    directory = resolve_latest(snapshot_dir, pipeline)
    manifest = json.loads((directory / "manifest.json").read_text())
    frame = pq.read_table(directory / "table.parquet").to_pandas()
    return frame, manifest
