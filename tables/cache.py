"""A batch replay's write-back cache in front of the table, the idea of Kafka Streams' record cache.

Without it every delivery (`DELIVERY_RECORDS` records) reads, writes and changelogs each
group it touches. A shape with many groups (the bench's 190k key x region x hour groups
over 1M rows) then writes about one entry per record. Held here across deliveries, a group
is written once per flush instead.

Invariants, and why they keep every record counted exactly once:

- The cache holds whole partition states only: every changed entry of a partition *and*
  its stats entry, whose next offset says which records they include. A flush writes them
  in one transaction (tables.transaction), so RocksDB and the changelog always hold a
  state and the offset it reached, never one without the other.
- Nothing in the cache is durable. It is never reported as applied (`Progress`) nor
  committed before its flush is durable. A crash or a stop loses it, and the replay
  resumes from the table's own offsets, re-reading exactly those records.
- It belongs to one consumer generation. After a rebalance Faust seeks each partition to
  what its table holds (kappa.engine.app), so the cache is dropped: the records it held
  come again and are applied to the table's state, not on top of the cache's.
- It is bounded in bytes (`limit_bytes`), and a delivery that finds it older than `max_age_s`
  flushes it, so a long replay shows progress; so does a timer between deliveries, when
  fetches stall (GroupedMeanAgent.flush_stalled_cache). A write-through cache (`limit_bytes` 0)
  flushes every delivery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# a Python bytes key and value in a dict: about this much beside their own lengths
ENTRY_OVERHEAD_BYTES = 150


@dataclass(slots=True)
class CachedPartition:
    entries: dict[bytes, bytes] = field(default_factory=dict)
    next_offset: int = 0


class WriteBackCache:
    def __init__(self, limit_bytes: int, max_age_s: float) -> None:
        self.limit_bytes = limit_bytes
        self.max_age_s = max_age_s
        self.generation: int | None = None
        self._partitions: dict[int, CachedPartition] = {}
        self._bytes = 0
        self._since: float | None = None

    def __len__(self) -> int:
        return sum(len(cached.entries) for cached in self._partitions.values())

    def belong_to(self, generation: int) -> None:
        """Drop everything cached under another consumer generation (see the module's note)."""
        if generation != self.generation:
            self.take()
            self.generation = generation

    def get_many(
        self, partition: int, keys: Sequence[bytes], read: Callable[[int, Sequence[bytes]], list[bytes | None]]
    ) -> list[bytes | None]:
        """Each key's entry: the cached one, else what `read` finds in the table."""
        cached = self._partitions.get(partition)
        if cached is None or not cached.entries:
            return read(partition, keys)
        entries = cached.entries
        found = [entries.get(key) for key in keys]
        missing = [index for index, entry in enumerate(found) if entry is None]
        if missing:
            for index, entry in zip(missing, read(partition, [keys[index] for index in missing]), strict=True):
                found[index] = entry
        return found

    def get(self, partition: int, key: bytes) -> bytes | None:
        cached = self._partitions.get(partition)
        return None if cached is None else cached.entries.get(key)

    def put(self, partition: int, entries: Mapping[bytes, bytes], next_offset: int) -> None:
        """A partition's changed entries (its stats entry among them) after records up to `next_offset`."""
        cached = self._partitions.setdefault(partition, CachedPartition())
        held = cached.entries
        for key, value in entries.items():
            previous = held.get(key)
            self._bytes += len(value) - (len(previous) if previous is not None else -len(key) - ENTRY_OVERHEAD_BYTES)
            held[key] = value
        cached.next_offset = max(cached.next_offset, next_offset)
        if self._since is None:
            self._since = time.monotonic()

    def due(self, stop_at: Mapping[int, int] | None, durable: Mapping[int, int]) -> bool:
        """Flush now: the cache is full or old, or with what is `durable` already (partition ->
        next offset) it holds every partition up to where the replay stops."""
        if not self._partitions:
            return False
        if self._bytes >= self.limit_bytes or self.aged():
            return True
        if stop_at is None:
            return False
        cached = self._partitions
        return all(
            max(cached[partition].next_offset if partition in cached else 0, durable.get(partition, 0)) >= end
            for partition, end in stop_at.items()
            if end > 0
        )

    def aged(self) -> bool:
        """It holds records put more than `max_age_s` ago."""
        return self._since is not None and time.monotonic() - self._since >= self.max_age_s

    def take(self) -> dict[int, CachedPartition]:
        """Everything cached, which the cache no longer holds."""
        taken, self._partitions = self._partitions, {}
        self._bytes, self._since = 0, None
        return taken
