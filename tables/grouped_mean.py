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

What a partial holds, and how it is encoded, is the aggregate's business (tables.aggregate);
this module is the table's layout: one partials entry per key, one stats entry per partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import orjson
import pyarrow as pa
import rocksdict

from kappa.errors import KappaError
from tables.aggregate import (
    LEGACY_JSON,
    MEAN,
    PARTIALS_CHUNK,
    Aggregate,
    UnreadableEntry,
    partial_batches,
    partials_setting_aside,
)
from tables.keys import PLAIN, KeyLayout

TABLE_NAME = "grouped_mean"
# A key that is not valid UTF-8 can never be a group key, so it is free for bookkeeping.
STATS_KEY = b"\xff\x00kappa-partition-stats"
STATS_V1 = 1
# Faust's default memtable is 64 MB per partition, and a partition's whole state fits in it
# up to about 1M keys: a 1M-key replay of 8 partitions held 67 MB of memtables until it
# ended. With 4 MB each partition flushes a few sorted files instead (a flush takes about
# 15 ms on RocksDB's own thread), and a replay's memory stops growing with its keys.
WRITE_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class PartitionStats:
    """Record counts of one source partition, kept beside its aggregates."""

    counted: int = 0
    skipped: int = 0
    rejected: int = 0
    next_offset: int = 0
    values: list[list[int]] | None = None  # [counted, skipped] per value, for several values

    def add_value_counts(self, counts: list[list[int]]) -> None:
        if self.values is None:
            self.values = [[0, 0] for _ in counts]
        for mine, more in zip(self.values, counts, strict=True):
            mine[0] += more[0]
            mine[1] += more[1]

    def records(self, value_names: tuple[str, ...] = ()) -> dict:
        """The manifest's `records`: counted, skipped, rejected, and per value when several."""
        found: dict = {"counted": self.counted, "skipped": self.skipped, "rejected": self.rejected}
        if len(value_names) > 1:
            pairs = self.values or [[0, 0] for _ in value_names]
            found["values"] = {
                name: {"counted": c, "skipped": s} for name, (c, s) in zip(value_names, pairs, strict=True)
            }
        return found

    def counted_per_value(self, width: int) -> list[int]:
        """Per value field, the records counted (`counted` itself when there is one value)."""
        if width > 1 and self.values is not None:
            return [counted for counted, _ in self.values]
        return [self.counted] if width == 1 else [0] * width

    def merge(self, other: PartitionStats) -> None:
        self.counted += other.counted
        self.skipped += other.skipped
        self.rejected += other.rejected
        if other.values is not None:
            self.add_value_counts(other.values)

    def encode(self) -> bytes:
        """Version byte, then `[counted, skipped, rejected, next_offset]` (and the per-value
        counts when there are several values) as JSON."""
        fields: list = [self.counted, self.skipped, self.rejected, self.next_offset]
        if self.values is not None:
            fields.append(self.values)
        return bytes((STATS_V1,)) + orjson.dumps(fields)

    @classmethod
    def decode(cls, raw: bytes | None) -> PartitionStats:
        if raw is None:
            return cls()
        if raw[0] == STATS_V1:
            return cls(*orjson.loads(raw[1:]))
        if raw[0] == LEGACY_JSON:  # written before entries were versioned
            return cls(*orjson.loads(raw))
        raise UnreadableEntry(
            f"a stored partition stats entry has encoding version {raw[0]}, which this kappa cannot read: "
            "it was written by a newer kappa; upgrade, or replay the pipeline into a new generation"
        )


def define_table(app, partitions: int, changelog_config: dict[str, str] | None = None, aggregate: Aggregate = MEAN):
    """The table as Faust sees it: raw bytes in and out (bytes types select Faust's raw
    codec), so our own compact encoding stays in charge. `changelog_config` is added to the
    changelog topic's config when Faust creates it. Each partition's RocksDB database takes
    `WRITE_BUFFER_BYTES` of writes in memory before it flushes them to a file. A restore from
    the changelog keeps each key's newest entry (`entry_next_offset`), not its last one."""
    from kappa.engine.faust_internals import keep_newest_on_restore  # not at import: Faust is heavy

    table = app.Table(
        TABLE_NAME,
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=partitions,
        help="sum and count per group key, per source partition",
        extra_topic_configs=dict(changelog_config or {}),
        options={"write_buffer_size": WRITE_BUFFER_BYTES},
    )
    keep_newest_on_restore(table, lambda key, raw: entry_next_offset(aggregate, key, raw))
    return table


def entry_next_offset(aggregate: Aggregate, key: bytes, raw: bytes) -> int:
    """Which of a partition's records a stored entry includes: those below this offset.

    Entries of one key are the same function of the log at the same offset (sums are exact,
    however records were batched), so the entry with the higher next offset includes more.
    A changelog may hold an older entry after a newer one: a worker process paused past its
    session (SIGSTOP, a long stall) resumes and writes what it computed before the pause,
    after the process that took its partitions over wrote newer entries. Restored last-wins,
    the older entry replaced the newer one under newer stats, and records were lost."""
    if key == STATS_KEY:
        return PartitionStats.decode(raw).next_offset
    return aggregate.next_offset(raw)


def partition_items(table, partition: int) -> Iterator[tuple[bytes, bytes]]:
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


def read_partition(
    table, partition: int, aggregate: Aggregate = MEAN, layout: KeyLayout = PLAIN
) -> tuple[pa.Table, PartitionStats] | None:
    """One partition's partial aggregates (as Arrow, in key order) and stats, in one pass; None
    when they are not an exact image of the partition at the stats' next offset.

    A group then holds records the stats entry does not count. tables.transaction sends a
    batch's groups to the changelog before its stats entry, and a stop between the two is
    allowed: the groups skip re-delivered records by their own offsets. So a partition restored
    from its changelog may hold groups ahead of its stats, during the restore and after it,
    until the agent has applied those records again. A snapshot of it would show records its
    manifest does not count (found by a trial and a review: a table holding every record under
    a manifest that counted none).

    Groups can also hold fewer records than the stats entry counts: halfway through a restore,
    a group whose older entries compaction removed is missing until its newer entry is read;
    and a state that lost records (a restore that skipped part of a changelog, F1) stays so.
    Such a part would publish a table short of records under a manifest that counts them, so
    it is not written either, and a partition that stays so is reported (PartWriter.write).
    (Groups may hold more than the stats count for good, with no newer offset: groups restored
    ahead of their stats whose records retention removed before they came again, a hole the
    agent accepts. That table holds every record; only its counts are short.)"""
    entries, bookkeeping = _scan_with_bookkeeping(table, partition)
    newest: list[int] = []
    rows, found = partials_setting_aside(entries, bookkeeping, aggregate, layout, newest=newest)
    stats = PartitionStats.decode(found.get(STATS_KEY))
    if newest and max(newest) > stats.next_offset:
        return None
    if short_of_records(aggregate.records_held(rows), stats.counted_per_value(aggregate.width)):
        return None
    return rows, stats


def partition_batches(
    table, partition: int, aggregate: Aggregate = MEAN, layout: KeyLayout = PLAIN, chunk: int = PARTIALS_CHUNK
) -> Iterator[pa.RecordBatch]:
    """One partition's partial aggregates in key order, `chunk` keys at a time, read from
    RocksDB as they are asked for (the store must stay open until the last one is taken).
    After the last one, raises `RecordsLost` if they held fewer records than the partition's
    stats entry counts (see `read_partition`): the snapshot being written from them is then
    not published."""
    entries, bookkeeping = _scan_with_bookkeeping(table, partition)
    found: dict[bytes, bytes] = {}
    held = [0] * aggregate.width
    for batch in partial_batches(entries, bookkeeping, found, aggregate, layout, chunk):
        held = [total + more for total, more in zip(held, aggregate.records_held(batch), strict=True)]
        yield batch
    counted = PartitionStats.decode(found.get(STATS_KEY)).counted_per_value(aggregate.width)
    if short_of_records(held, counted):
        raise RecordsLost(partition, held, counted)


def short_of_records(held: list[int], counted: list[int]) -> bool:
    """Whether groups holding `held` records per value lack some of the `counted` ones."""
    return any(have < expected for have, expected in zip(held, counted, strict=True))


class RecordsLost(KappaError):
    def __init__(self, partition: int, held: list[int], counted: list[int]) -> None:
        super().__init__(
            f"partition {partition}'s table holds {sum(held):,} records in its groups where its stats entry counts "
            f"{sum(counted):,}: its state is damaged, so nothing is published from it; delete this generation "
            "(kappa gc) and replay again"
        )


def _scan_with_bookkeeping(table, partition: int) -> tuple[Iterator[tuple[bytes, bytes]], frozenset[bytes]]:
    """A partition's entries in key order (`scan`), and the keys among them that are
    bookkeeping, not partials: the stats entry and Faust's changelog offset."""
    from kappa.engine.faust_internals import partition_db, store_offset_key  # not at import: Faust is heavy

    return scan(partition_db(table, partition)), frozenset((STATS_KEY, store_offset_key(table)))


def scan(db: rocksdict.Rdict) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of a partition's database in key order, read past its block cache.

    A scan reads every block once: cached, they stayed in memory after it (a 1M-key
    snapshot's scan of 8 partitions kept 46 MB, whatever the cache's capacity), and they
    would push out the blocks the agent's point reads use."""
    options = rocksdict.ReadOptions()
    options.fill_cache(False)  # type: ignore[call-arg]  # the stub omits the flag; the binding takes it
    return iter(cast(Iterable[tuple[bytes, bytes]], db.items(read_opt=options)))


def read_stats(table, partition: int) -> PartitionStats:
    from kappa.engine.faust_internals import partition_db  # not at import: snapshot readers need no Faust

    return PartitionStats.decode(partition_db(table, partition).get(STATS_KEY))


def stored_next_offset(table, partition: int) -> int:
    """The offset after the last record this partition's state has applied."""
    return read_stats(table, partition).next_offset
