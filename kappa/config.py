"""Where kappa finds its broker and keeps its files.

Every command shares these three settings so that a worker, a replay and a reader started
from the same directory agree without further flags.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kappa.errors import KappaError

DEFAULT_BROKER = "localhost:9092"
PIPELINE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class Settings:
    broker: str
    data_dir: Path
    snapshot_dir: Path
    # replicas of the topics kappa creates; None = what the cluster gives (kappa.kafka.admin.replication)
    replication_factor: int | None = None

    @classmethod
    def from_args(
        cls,
        broker: str | None,
        data_dir: str | os.PathLike | None,
        snapshot_dir: str | os.PathLike | None,
        replication_factor: int | None = None,
    ) -> "Settings":
        return cls(
            broker=broker or os.environ.get("KAPPA_BROKER") or DEFAULT_BROKER,
            data_dir=Path(data_dir or os.environ.get("KAPPA_DATA_DIR") or ".kappa").absolute(),
            snapshot_dir=Path(snapshot_dir or os.environ.get("KAPPA_SNAPSHOT_DIR") or "snapshots").absolute(),
            replication_factor=_replication_factor(replication_factor),
        )

    def require_usable_dirs(self, snapshots: bool = True) -> None:
        """Refuse, before anything is built, a --data-dir or (with `snapshots`) --snapshot-dir that
        cannot be made or written: a replay given a file as its snapshot dir failed with a
        traceback, and recorded a generation as running that never ran."""
        dirs = [("--data-dir", self.data_dir)] + ([("--snapshot-dir", self.snapshot_dir)] if snapshots else [])
        for option, directory in dirs:
            if directory.is_symlink() and not directory.exists():
                raise KappaError(f"{option} {directory} is a symlink to {os.readlink(directory)}, which does not exist")
            existing = next(path for path in (directory, *directory.parents) if path.exists())
            if not existing.is_dir():
                raise KappaError(f"{option} {directory} cannot be made: {existing} is a file, not a directory")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise KappaError(f"{option} {directory} cannot be written: {existing} does not let this user write")

    def state_dir(self, pipeline: str, generation: int) -> Path:
        """One RocksDB home per (pipeline, generation): generations never share state."""
        return self.data_dir / "state" / pipeline / f"g{generation}"

    def run_dir(self, pipeline: str, generation: int) -> Path:
        """Heartbeat files of live processes, read by `kappa status`."""
        return self.data_dir / "run" / pipeline / f"g{generation}"


def _replication_factor(given: int | None) -> int | None:
    """--replication-factor, else $KAPPA_REPLICATION_FACTOR, else None (the cluster decides)."""
    raw = given if given is not None else os.environ.get("KAPPA_REPLICATION_FACTOR")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise KappaError(
            f"the replication factor must be a whole number >= 1, not {raw!r}: fix --replication-factor "
            "or KAPPA_REPLICATION_FACTOR"
        )
    return value


def validate_pipeline_name(name: str) -> str:
    """Pipeline names become directory, app-id and topic-name parts, so keep them plain."""
    if not PIPELINE_NAME.match(name):
        raise KappaError(
            f"pipeline name {name!r} is not usable: expected letters, digits, '.', '_' or '-'; pass --pipeline NAME"
        )
    return name


DEFAULT_FETCH_PARTITION_BYTES = 16 * 1024 * 1024


def fetch_partition_bytes() -> int:
    """Bytes fetched per partition per request ($KAPPA_FETCH_PARTITION_BYTES).

    Large fetches keep a replay's consumer busy between round trips; a smaller value bounds
    memory on very wide topics, and with a broker quota it paces a replay for drills.
    """
    raw = os.environ.get("KAPPA_FETCH_PARTITION_BYTES")
    if raw is None:
        return DEFAULT_FETCH_PARTITION_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1024:
        raise KappaError(f"KAPPA_FETCH_PARTITION_BYTES must be a whole number of bytes >= 1024, not {raw!r}")
    return value


def format_offsets(offsets: Mapping[int, int]) -> str:
    """`{0: 10, 1: 0}` as the command-line text `0:10,1:0` (read back by `parse_offsets`)."""
    return ",".join(f"{partition}:{offset}" for partition, offset in sorted(offsets.items()))


def parse_offsets(text: str) -> dict[int, int]:
    """`0:10,1:0` as `{0: 10, 1: 0}`; a malformed text is a ValueError."""
    pairs = (item.split(":") for item in text.split(",") if item)
    return {int(partition): int(offset) for partition, offset in pairs}
