"""The grouped-mean table: a sum and a count per group key, in RocksDB, with a changelog.

Layout. Faust keeps one RocksDB database and one changelog partition per source partition,
and a write lands in the partition of the event being processed. So each source partition
holds *partial* aggregates for the keys it has seen; a key spread over several partitions
has several entries, and a snapshot adds them up (sum and count are additive).

Idempotence. Every entry carries the offset after the last record applied to it, and each
partition keeps a stats entry with its own next offset. A record whose offset is below its
key's stored offset has already been applied and is skipped. Nothing has to be atomic
across keys, so a crash between two writes, a changelog restore or a re-delivered batch can
never count a record twice (the Quix Streams recovery idea, without Kafka transactions).

Sums use Neumaier compensation so that 1e12 magnitudes and small values together still
agree with pandas to far better than the 1e-9 the product promises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

TABLE_NAME = "grouped_mean"
# A key that is not valid UTF-8 can never be a group key, so it is free for bookkeeping.
STATS_KEY = b"\xff\x00kappa-partition-stats"


@dataclass(slots=True)
class MeanState:
    """Partial aggregate of one key within one source partition."""

    total: float = 0.0
    compensation: float = 0.0
    count: int = 0
    next_offset: int = 0

    def _accumulate(self, value: float) -> None:
        total = self.total + value
        if abs(self.total) >= abs(value):
            self.compensation += (self.total - total) + value
        else:
            self.compensation += (value - total) + self.total
        self.total = total

    def add(self, value: float) -> None:
        self._accumulate(value)
        self.count += 1

    def add_all(self, values: list[float]) -> None:
        """A batch's values at once: fsum is exact, so the batch enters as one correctly
        rounded term, and this costs one C call instead of a Python step per value."""
        if values:
            try:
                batch_sum = math.fsum(values)
            except OverflowError:  # partial sums beyond 1.8e308: infinite, as pandas has it
                batch_sum = sum(values)
            self._accumulate(batch_sum)
            self.count += len(values)

    @property
    def sum(self) -> float:
        return self.total + self.compensation

    def merge(self, other: "MeanState") -> None:
        self._accumulate(other.total)
        self._accumulate(other.compensation)
        self.count += other.count

    def encode(self) -> bytes:
        return orjson.dumps([self.total, self.compensation, self.count, self.next_offset])

    @classmethod
    def decode(cls, raw: bytes | None) -> "MeanState":
        if raw is None:
            return cls()
        total, compensation, count, next_offset = orjson.loads(raw)
        return cls(total, compensation, count, next_offset)


def decode_sums_and_counts(entries: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of many encoded MeanStates at once, for snapshots of large tables.

    One orjson call over the joined entries replaces a MeanState object per key; joining is
    safe because every entry is a JSON array this module encoded.
    """
    if not entries:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64)
    fields = np.array(orjson.loads(b"[" + b",".join(entries) + b"]"), dtype=np.float64)
    return fields[:, 0] + fields[:, 1], fields[:, 2].astype(np.int64)


@dataclass(slots=True)
class PartitionStats:
    """Record counts of one source partition, kept beside its aggregates."""

    counted: int = 0
    skipped: int = 0
    rejected: int = 0
    next_offset: int = 0

    def encode(self) -> bytes:
        return orjson.dumps([self.counted, self.skipped, self.rejected, self.next_offset])

    @classmethod
    def decode(cls, raw: bytes | None) -> "PartitionStats":
        if raw is None:
            return cls()
        return cls(*orjson.loads(raw))


def define_table(app, partitions: int, changelog_config: dict[str, str] | None = None):
    """The table as Faust sees it: raw bytes in and out (bytes types select Faust's raw
    codec), so our own compact encoding stays in charge. `changelog_config` is added to the
    changelog topic's config when Faust creates it."""
    return app.Table(
        TABLE_NAME,
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        help="sum and count per group key, per source partition",
        extra_topic_configs=dict(changelog_config or {}),
    )


def partition_items(table, partition: int):
    """(key, raw value) pairs of one source partition's RocksDB database.

    Faust exposes iteration over all active partitions only; a per-partition image is what
    lets several processes each publish the partitions they own. Faust's own bookkeeping key
    (its changelog offset) is left out.
    """
    from kappa.engine.faust_internals import partition_db, store_offset_key  # not at import: Faust is heavy

    offset_key = store_offset_key(table)
    for key, value in partition_db(table, partition).items():
        if key != offset_key:
            yield key, value


def read_partition(table, partition: int) -> tuple[list[tuple[bytes, MeanState]], PartitionStats]:
    """One partition's partial aggregates and stats, read in one pass."""
    partials: list[tuple[bytes, MeanState]] = []
    stats = PartitionStats()
    for key, value in partition_items(table, partition):
        if key == STATS_KEY:
            stats = PartitionStats.decode(value)
        else:
            partials.append((key, MeanState.decode(value)))
    return partials, stats


def read_stats(table, partition: int) -> PartitionStats:
    from kappa.engine.faust_internals import partition_db  # not at import: snapshot readers need no Faust

    return PartitionStats.decode(partition_db(table, partition).get(STATS_KEY))


def stored_next_offset(table, partition: int) -> int:
    """The offset after the last record this partition's state has applied."""
    return read_stats(table, partition).next_offset
