"""One fetched batch's writes, made durable together before its offsets may be committed.

The durability order of the hot path, in one place (the idea of Quix Streams'
`PartitionTransaction` and Kafka Streams' change-logging store):

1. `write`, per source partition: the changed group entries are queued on the changelog;
   the partition's stats entry, whose next offset says which records they include, is held;
2. `make_durable`: the dead letters this batch produced and the group entries are on the
   broker; only then the stats entries are sent, and once they are on the broker too,
   every entry is stored in its partition's RocksDB database and each changelog
   partition's last offset is stored for recovery;
3. `committable`: only now the source offsets this batch reached may be committed, so a
   committed offset is never ahead of what a restore from the changelog would give back.

Why this order. A stop (Ctrl-C, a rebalance's cancel, kill -9, a broker that never
acknowledges) can cut it anywhere, and afterwards the records come again from where the
table's stats say, each group skipping those its own offsets say it holds:

- the changelog never holds a stats entry ahead of the groups it covers: a batch replay's
  write-back cache kept the stats entry before the groups of later deliveries, and a stop
  between two record batches left the changelog with stats that said records were applied
  whose groups it never got (lost with exit 0). Sending the stats entry only once the
  groups are acknowledged also covers a record batch that fails while a later one lands;
- the local database is never ahead of the changelog: stored before the broker had the
  entries, a stop left RocksDB with entries the changelog never got, lost once a process
  restores the partition from the changelog (another worker process, or a wiped store).
  Behind is safe: Faust's recovery applies the changelog's tail to it.

The states are checked: a write after step 2 began, or a commit of a batch that is not
durable, raises instead of silently breaking the order. Any error or cancel marks the
transaction failed; the agent then starts the next batch with a new one, and the records
are re-delivered and skipped per key where they were already applied.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from enum import Enum

from tables.grouped_mean import STATS_KEY
from tables.writer import TableWriter


class TransactionState(Enum):
    OPEN = "open"  # entries may be written
    FLUSHING = "flushing"  # waiting for the broker to acknowledge everything written
    DURABLE = "durable"  # everything written is on the broker and stored: its offsets may be committed
    FAILED = "failed"  # interrupted by an error or a cancel; the batch will be re-delivered


class TransactionError(RuntimeError):
    """A step taken out of order: a bug in the caller, never a data condition."""


class BatchTransaction:
    def __init__(self, writer: TableWriter, flush_dead_letters: Callable[[], Awaitable[None]]) -> None:
        self.writer = writer
        self.flush_dead_letters = flush_dead_letters
        self.state = TransactionState.OPEN
        self.next_offsets: dict[int, int] = {}
        self._written: dict[int, Mapping[bytes, bytes]] = {}  # partition -> its entries, stored once durable

    def _require(self, state: TransactionState, step: str) -> None:
        if self.state is not state:
            raise TransactionError(f"cannot {step} a batch transaction that is {self.state.value}")

    async def write(self, partition: int, entries: Mapping[bytes, bytes], next_offset: int) -> None:
        """Queue a partition's changed group entries; `next_offset` is where its source stands
        after them. The stats entry among `entries` waits for `make_durable`."""
        self._require(TransactionState.OPEN, "write to")
        if partition in self._written:
            raise TransactionError(f"partition {partition} is written twice in one batch transaction")
        self._written[partition] = entries
        try:
            await self.writer.send(partition, ((key, value) for key, value in entries.items() if key != STATS_KEY))
        except BaseException:
            self.state = TransactionState.FAILED
            raise
        self.next_offsets[partition] = max(next_offset, self.next_offsets.get(partition, 0))

    async def make_durable(self) -> None:
        """Put the dead letters and group entries on the broker, then the stats entries, then
        store everything locally (the module's note says why in this order)."""
        self._require(TransactionState.OPEN, "flush")
        self.state = TransactionState.FLUSHING
        try:
            await self.flush_dead_letters()
            await self.writer.acknowledged()
            for partition, entries in self._written.items():
                if STATS_KEY in entries:
                    await self.writer.send(partition, [(STATS_KEY, entries[STATS_KEY])])
            await self.writer.acknowledged()
            for partition, entries in self._written.items():
                self.writer.store(partition, entries)
            self.writer.persist_offsets()
        except BaseException:
            self.state = TransactionState.FAILED
            raise
        self.state = TransactionState.DURABLE

    def committable(self) -> dict[int, int]:
        """Source partition -> next offset, safe to commit now that the batch is durable."""
        self._require(TransactionState.DURABLE, "commit")
        return dict(self.next_offsets)
