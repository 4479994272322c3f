"""kappa: one code path for batch and live results over a Kafka log.

The log is the system of record; a batch result is a replay of it from offset 0 and a live
result is tailing it, both through the same Faust agent and RocksDB table.
"""

from kappa.snapshots.snapshot import read_snapshot

__all__ = ["read_snapshot"]
__version__ = "0.1.0"
