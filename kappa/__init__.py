"""kappa: one code path for batch and live results over a Kafka log.

The log is the system of record; a batch result is a replay of it from offset 0 and a live
result is tailing it, both through the same Faust agent and RocksDB table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kappa.snapshots.snapshot import read_snapshot

__all__ = ["read_snapshot"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`kappa.read_snapshot` on first use: every command starts by importing this package, and
    most do not read snapshots (pyarrow and numpy cost 0.2 s to import)."""
    if name == "read_snapshot":
        from kappa.snapshots.snapshot import read_snapshot

        return read_snapshot
    raise AttributeError(f"module 'kappa' has no attribute {name!r}")
