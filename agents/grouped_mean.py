"""The grouped-mean agent: log records in, one table write per touched key per batch out.

Faust's per-event table writes are its usual bottleneck (one changelog record and one
RocksDB put each). This agent gets each batch the consumer fetched (kappa.engine), folds
each source partition's records (agents.fold), and writes every touched key once, with
the partition's stats entry, in one bulk write (tables.writer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agents.fold import fold
from kappa.engine import deadletters
from kappa.engine.faust_internals import TP, commit_offsets, drain_producer_buffer
from kappa.pipeline import Definition, Delivered, Progress, Record
from tables.cache import WriteBackCache
from tables.grouped_mean import STATS_KEY, PartitionStats, read_stats
from tables.transaction import BatchTransaction
from tables.writer import TableWriter

log = logging.getLogger("kappa.agent")
COMMIT_EVERY_S = 1.0
# A batch replay's write-back cache (tables.cache): the bench's 190k-group shape wrote about
# one entry per record with write-through, and a third of that with this; its bytes are an
# estimate, so a 1M-key replay's peak memory grows by about this much
CACHE_LIMIT_BYTES = 16 * 1024 * 1024
CACHE_MAX_AGE_S = 2.0
REWIND_PATIENCE_S = 10.0


@dataclass
class DeadLetters:
    """Where this generation's rejects go, and what its definition already wrote there."""

    pipeline: str
    generation: int
    definition_id: str
    source_topic_id: str  # the id of the topic the rejects come from (see deadletters.written_up_to)
    written_up_to: dict[int, int] = field(default_factory=dict)
    message_limit: int = deadletters.DEFAULT_MESSAGE_BYTES  # the dead-letter topic's max.message.bytes

    def headers(self, error: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
        return deadletters.headers(
            error, topic, self.source_topic_id, partition, offset, self.pipeline, self.generation, self.definition_id
        )

    def message(self, record: Record, error: str, topic: str, partition: int) -> tuple[bytes | None, list]:
        """The value and headers the reject is written with (kappa.engine.deadletters.fitting)."""
        headers = self.headers(error, topic, partition, record.offset)
        return deadletters.fitting(record.key, record.value, headers, self.message_limit)

    def already_written(self, partition: int, offset: int) -> bool:
        return offset <= self.written_up_to.get(partition, -1)

    def mark_written(self, partition: int, offset: int) -> None:
        self.written_up_to[partition] = max(offset, self.written_up_to.get(partition, -1))


def passed_to(records: Sequence[Record], stop: int | None) -> int:
    """The offset a delivery's reading reached, past markers after its last record (0 when it
    cannot tell), never beyond `stop`: records from there on are not folded (agents.fold), so
    the partition's next offset must not pass them."""
    if not isinstance(records, Delivered):
        return 0
    return records.read_to if stop is None else min(records.read_to, stop)


class GroupedMeanAgent:
    """Applies batches of records to the table; idempotent per key (see tables.grouped_mean)."""

    def __init__(
        self, table: Any, definition: Definition, dlq: Any, progress: Progress, dead_letters: DeadLetters
    ) -> None:
        self.table = table
        self.writer = TableWriter(table)
        self.definition = definition
        self.dlq = dlq
        self.dead_letters = dead_letters
        self.aggregate = definition.aggregate()
        self.shape = definition.row_shape()
        self.layout = definition.layout()
        self.progress = progress
        self._rewinds: dict[int, tuple[int, float]] = {}
        self._next_commit = 0.0
        self._applying = asyncio.Lock()  # a delivery, or the timer's flush (flush_stalled_cache)
        self._uncommitted: dict[TP, int] = {}
        # only a batch replay (one process, to fixed end offsets) holds state across deliveries:
        # a live worker's snapshot parts must see each delivery as soon as it is applied
        batch = progress.stop_at is not None
        self.cache = WriteBackCache(CACHE_LIMIT_BYTES if batch else 0, CACHE_MAX_AGE_S)

    async def on_batch(self, batches: Mapping[TP, Sequence[Record]]) -> None:
        """One fetched batch: fold each partition's records into the cache; when it is due,
        write what it holds in one transaction, make that durable, then commit what it reached
        (tables.transaction has the order, tables.cache why nothing before that counts)."""
        async with self._applying:
            if self.progress.first_applied_at is None:
                self.progress.first_applied_at = time.time()
            generation = self.table.app.consumer_generation_id
            self.cache.belong_to(generation)
            for tp, records in batches.items():
                await self._apply_partition(tp.partition, records)
                self.progress.records_seen += len(records)
            if self.cache.due(self.progress.stop_at, self.progress.next_offsets):
                await self._flush_cache(generation)

    async def flush_stalled_cache(self) -> None:
        """Timer: write the cache once it is older than `CACHE_MAX_AGE_S`, also when no delivery
        comes to do it. A replay's fetches can stall for seconds (a broker quota, a slow or
        distant broker); what the cache held meanwhile was neither durable nor committed, so
        progress looked stuck and a stop lost it. Never during a delivery (the lock: a delivery
        reads the cache and the table as one state), nor while flow is stopped for a rebalance,
        nor for a cache of an earlier consumer generation (`WriteBackCache.belong_to`)."""
        if self._applying.locked() or not self.cache.aged():
            return
        async with self._applying:
            generation = self.table.app.consumer_generation_id
            stale = self.cache.generation != generation or not self.table.app.consumer.flow_active
            if not stale and self.cache.aged():
                await self._flush_cache(generation)

    async def _flush_cache(self, generation: int) -> None:
        transaction = BatchTransaction(self.writer, self._flush_dead_letters)
        for partition, cached in self.cache.take().items():
            await transaction.write(partition, cached.entries, cached.next_offset)
        self.progress.last_applied_at = time.time()  # the last records applied (AppliedSpan), as they go out
        await transaction.make_durable()
        # only now: a part is read from RocksDB, which holds the batch once it is durable
        for partition, next_offset in transaction.next_offsets.items():
            self.progress.next_offsets[partition] = max(next_offset, self.progress.next_offsets.get(partition, 0))
            self.progress.dirty.add(partition)
        if self.table.app.consumer_generation_id != generation:
            # A rebalance completed while this batch was applied: the new assignment has already
            # committed what its tables hold, and a commit from here could run ahead of that.
            return
        await self._commit_applied(transaction.committable())
        self.progress.check_reached()

    async def _commit_applied(self, offsets: Mapping[int, int]) -> None:
        """Commit what the table holds, so the group's offsets track it (for `kappa status`
        and outside tools); resuming never relies on them (kappa.engine.app.resume_from_table_offsets)."""
        topic = self.definition.topic
        self._uncommitted.update({TP(topic, partition): offset for partition, offset in offsets.items()})
        if time.monotonic() >= self._next_commit:
            await self.commit_pending()

    async def commit_pending(self) -> None:
        """Also run on a timer: the last batch before the log goes quiet must be committed too,
        or the group would show lag that is not there."""
        self._next_commit = time.monotonic() + COMMIT_EVERY_S
        pending, self._uncommitted = self._uncommitted, {}
        if pending:
            await commit_offsets(self.table.app.consumer, pending)

    async def _flush_dead_letters(self) -> None:
        """Wait until the dead letters sent through Faust's producer are on the broker."""
        await drain_producer_buffer(self.table.app)

    async def _skip_for_rewind(self, partition: int, messages: Sequence[Record], stored: int) -> Sequence[Record]:
        """Last line of defence: the consumer is ahead of what the table holds.

        Resuming from the table's offsets on every assignment (kappa.engine.app) should make this
        impossible; if it happens anyway, seek back so nothing is skipped, and drop the
        records already fetched from beyond that point until the re-delivery arrives. A hole
        that never fills (transaction markers, compaction) is accepted after a while.

        A partition with nothing applied yet may start where the log starts, and only there
        (retention may have removed the head): a 4-process replay under CPU quotas once
        resumed an empty partition at offset 100,000, after a rebalance raced a commit, and
        silently lost the first 100,000 records with exit 0.
        """
        pending = self._rewinds.get(partition)
        # where the delivery's reading began: its first record, or before it when the offsets
        # between hold none (a transaction's marker, a record that compaction removed)
        first = messages.start if isinstance(messages, Delivered) else messages[0].offset
        if pending is None:
            if first <= stored or (stored == 0 and first <= await self._log_start(partition)):
                return messages
            log.warning(
                "partition %s resumed at offset %s but the table holds records up to %s; seeking back",
                partition,
                first,
                stored,
            )
            self._rewinds[partition] = (stored, time.monotonic() + REWIND_PATIENCE_S)
            await self.table.app.consumer.seek(TP(self.definition.topic, partition), stored)
            return ()
        target, deadline = pending
        if first <= target:
            del self._rewinds[partition]
            return messages
        if time.monotonic() < deadline:
            return ()
        log.warning(
            "partition %s: no record at offsets %s..%s; accepting the hole", partition, target, messages[0].offset
        )
        del self._rewinds[partition]
        return messages

    async def _log_start(self, partition: int) -> int:
        """The partition's first offset still on the log (0 unless retention removed records)."""
        tp = TP(self.definition.topic, partition)
        return (await self.table.app.consumer.earliest_offsets(tp)).get(tp, 0)

    def _stats(self, partition: int) -> PartitionStats:
        cached = self.cache.get(partition, STATS_KEY)
        return PartitionStats.decode(cached) if cached is not None else read_stats(self.table, partition)

    async def _apply_partition(self, partition: int, records: Sequence[Record]) -> None:
        """Fold the records and put each touched group's new entry, and the partition's stats, in the cache."""
        definition, aggregate = self.definition, self.aggregate
        stats = self._stats(partition)
        stop = self.progress.stop_at.get(partition) if self.progress.stop_at is not None else None
        read_to = passed_to(records, stop)
        if not records:
            follows = isinstance(records, Delivered) and records.start <= stats.next_offset
            if follows and read_to > stats.next_offset and partition not in self._rewinds:
                stats.next_offset = read_to  # markers alone, right after what the table holds
                self.cache.put(partition, {STATS_KEY: stats.encode()}, read_to)
                self.progress.folded(partition, read_to)
            return
        records = await self._skip_for_rewind(partition, records, stats.next_offset)
        if not records:
            return
        folded = fold(records, self.shape, self.layout, counted_from=stats.next_offset, stop=stop)
        for record, error in folded.rejected:
            if self.dead_letters.already_written(partition, record.offset):
                continue
            value, headers = self.dead_letters.message(record, error, definition.topic, partition)
            await self.dlq.send(key=record.key, value=value, partition=partition, headers=headers)
            # a re-delivery (after a rebalance dropped the cache, or a rewind) must not send it again
            self.dead_letters.mark_written(partition, record.offset)
        groups = folded.groups
        stored = self.cache.get_many(partition, groups.keys, self.writer.get_many)
        updated = aggregate.add_batches(stored, groups.batch_sums())
        entries = {key: entry for key, entry in zip(groups.keys, updated, strict=True) if entry is not None}
        for group in [group for group, entry in enumerate(updated) if entry is None]:  # re-delivered in part
            states = aggregate.decode(stored[group])
            if groups.apply_to(group, states):
                entries[groups.keys[group]] = aggregate.encode(states)
        stats.counted += folded.counted
        stats.skipped += folded.skipped
        stats.rejected += len(folded.rejected)
        if not definition.plain:  # a plain pipeline's stats have no per-value counts (it has one value)
            stats.add_value_counts(folded.value_counts)
        # past the markers fetched after the last record, too: a transactional log ends with one
        stats.next_offset = max(stats.next_offset, folded.last_offset + 1, read_to)
        entries[STATS_KEY] = stats.encode()
        self.cache.put(partition, entries, stats.next_offset)
        self.progress.folded(partition, stats.next_offset)
