"""Reads and writes a batch of one partition's table entries in bulk, the way Faust would.

Faust writes a table entry with `table[key] = value`: a RocksDB put, a changelog record
through its producer buffer (a FutureMessage and an aiokafka future each) and, on every
acknowledgement, one more RocksDB put of the changelog offset. With a distinct key per
record py-spy put that path at half of a replay's CPU. This writer does the same three
things once per batch: the changelog records appended straight into aiokafka record
batches (one future per record batch), one RocksDB write batch, and the changelog offset
stored once per acknowledged record batch. Topic, partition, key and value are exactly
Faust's, so Faust's recovery, standbys and `kappa.lifecycle.cleanup` treat the changelog as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rocksdict

from kappa.engine.faust_internals import (
    is_open,
    partition_db,
    persist_changelog_offset,
    persisted_changelog_offset,
    raw_producer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A changelog record batch in flight: its last record's offset is base + count - 1."""

    partition: int
    count: int
    acked: asyncio.Future


class TableWriter:
    """Bulk access to a Faust RocksDB table, one source partition at a time.

    Faust keeps one RocksDB database and one changelog partition per source partition;
    entries here always go to the partition they are read from, as Faust's own writes do
    inside an event of that partition.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.changelog = table.changelog_topic.get_topic_name()
        self._pending: list[PendingBatch] = []
        # partition -> (first, last) changelog offsets of this process's acknowledged record batches, not persisted
        self._acknowledged: dict[int, list[tuple[int, int]]] = {}

    def _db(self, partition: int) -> Any:
        return partition_db(self.table, partition)

    def get_many(self, partition: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """Each key's entry, None where it has none. One get per key: rocksdict's multi-get
        measured slower than single gets, for present and absent keys alike."""
        get = self._db(partition).get
        return [get(key) for key in keys]

    async def send(self, partition: int, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Queue the (key, value) entries, in their order, for the partition's changelog
        (`acknowledged` waits until the broker has them; tables.transaction says when to
        `store` them)."""
        producer = raw_producer(self.table.app)  # Faust's aiokafka producer
        builder, count = producer.create_batch(), 0
        for key, value in entries:
            if builder.append(timestamp=None, key=key, value=value) is None:  # full
                await self._submit(producer, builder, partition, count)
                builder, count = producer.create_batch(), 0
                builder.append(timestamp=None, key=key, value=value)  # an empty batch takes any record
            count += 1
        if count:  # no entries, no record batch
            await self._submit(producer, builder, partition, count)

    async def _submit(self, producer: Any, builder: Any, partition: int, count: int) -> None:
        builder.close()  # nothing else may join it: `count` must stay its record count
        acked = await producer.send_batch(builder, self.changelog, partition=partition)
        self._pending.append(PendingBatch(partition, count, acked))

    async def acknowledged(self) -> None:
        """Wait until every queued changelog record is on the broker; raise the first failure."""
        pending, self._pending = self._pending, []
        outcomes = await asyncio.gather(*(batch.acked for batch in pending), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for batch, metadata in zip(pending, outcomes, strict=True):
            assert not isinstance(metadata, BaseException)  # raised above
            span = (metadata.offset, metadata.offset + batch.count - 1)
            self._acknowledged.setdefault(batch.partition, []).append(span)

    def store(self, partition: int, entries: Mapping[bytes, bytes]) -> None:
        """Write the entries to the partition's local database, in one write batch; not if a
        rebalance closed it while the broker acknowledged them (it must never be reopened here:
        its next owner restores it from the changelog, which has them)."""
        if not entries or not is_open(self.table, partition):
            return
        batch = rocksdict.WriteBatch(raw_mode=True)
        for key, value in entries.items():
            batch.put(key, value)
        self._db(partition).write(batch)

    def persist_offsets(self) -> None:
        """Store where Faust's recovery of each partition resumes: the changelog offset up to
        which every record is in the local store. Only once this process's entries are stored
        locally, and only as far as they follow on from the offset stored before, record after
        record. Records between them were written by another process (one paused past its
        session resumes writing a partition another has taken over): the local store lacks
        them, and a restore must read them. Stored past them, a restore skipped them, and the
        table lost records under newer stats (found by helper-25)."""
        acknowledged, self._acknowledged = self._acknowledged, {}
        for partition, spans in acknowledged.items():
            if not is_open(self.table, partition):
                continue  # a rebalance closed it: never reopened here
            persisted = persisted_changelog_offset(self.table, self.changelog, partition)
            stored = -1 if persisted is None else persisted
            reached = contiguous_end(stored, spans)
            if reached != max(last for _, last in spans):
                log.warning(
                    "changelog partition %s holds records this process did not write (another process wrote it "
                    "while this one was paused or had lost the partition); a restore reads them again",
                    partition,
                )
            if reached > stored:
                persist_changelog_offset(self.table, self.changelog, partition, reached)


def contiguous_end(stored: int, spans: Iterable[tuple[int, int]]) -> int:
    """The last offset reached from `stored` through the (first, last) spans that follow on
    from it without a hole; `stored` when the first does not."""
    for first, last in sorted(spans):
        if first > stored + 1:
            break
        stored = max(stored, last)
    return stored
