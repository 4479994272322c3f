"""A broker-free driver for the agent (in the spirit of Kafka Streams' TopologyTestDriver).

It feeds `GroupedMeanAgent.on_batch` parsed records and exposes what came out: the table
(real RocksDB databases of a real Faust table, on local disk), the changelog records the
writer sent, the dead letters, and the offsets the agent committed. Only the Kafka side is
recorded instead of sent: the changelog producer, the dead-letter producer and the consumer's
commits and seeks, each reached through the one engine seam (`kappa.engine.faust_internals`).
The end-to-end tests against the real broker stay the reference; this one checks the
durability order step by step, which timing-based tests cannot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
from faust.types import TP

import agents.grouped_mean as agent_module
import tables.writer as writer_module
from agents.grouped_mean import DeadLetters, GroupedMeanAgent
from kappa.pipeline import Definition, Progress
from tables.grouped_mean import STATS_KEY, PartitionStats, define_table, partition_items, read_stats


@dataclass
class ParsedRecord:
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None
    headers: list = field(default_factory=list)


class RecordBatch:
    """What aiokafka's BatchBuilder offers the writer: appends until full, then closes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes, bytes]] = []

    def append(self, *, timestamp: Any, key: bytes, value: bytes) -> object | None:
        if len(self.records) >= self.capacity:
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        pass


class RecordingProducer:
    """Stands in for the changelog producer: keeps each partition's records in order.

    `cancel_at` cancels the n-th `send_batch` (1-based), as a rebalance cancels the agent's
    task while it waits to queue a record batch; `rebalance_at` lets a rebalance complete
    during the n-th (the app's consumer generation moves on)."""

    def __init__(self, batch_capacity: int) -> None:
        self.batch_capacity = batch_capacity
        self.changelog: dict[int, list[tuple[bytes, bytes]]] = {}
        self.sends = 0
        self.cancel_at: int | None = None
        self.rebalance_at: int | None = None  # the n-th send_batch happens during a rebalance
        self.unacknowledged = False  # a broker that never acknowledges: records queued are never on it
        self.fail_at: int | None = None  # the n-th send_batch fails on the broker (it expired, say); later ones land
        self.on_send: Callable[[int], None] | None = None  # called with each send_batch's number (a rebalance, say)
        self.app: Any = None

    def create_batch(self) -> RecordBatch:
        return RecordBatch(self.batch_capacity)

    async def send_batch(self, batch: RecordBatch, topic: str, *, partition: int) -> asyncio.Future:
        self.sends += 1
        if self.on_send is not None:
            self.on_send(self.sends)
        if self.cancel_at == self.sends:
            raise asyncio.CancelledError()
        if self.rebalance_at == self.sends:
            self.app.consumer_generation_id += 1
        if self.unacknowledged:
            return asyncio.get_running_loop().create_future()  # never done: a stop comes first
        if self.fail_at == self.sends:
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(RuntimeError("the record batch expired"))
            return failed
        records = self.changelog.setdefault(partition, [])
        base = len(records)
        records.extend(batch.records)
        acked = asyncio.get_running_loop().create_future()  # acknowledged at once
        acked.set_result(SimpleNamespace(offset=base))
        return acked


class RecordingDeadLetters:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, **message: Any) -> None:
        self.sent.append(message)


class RecordingConsumer:
    def __init__(self) -> None:
        self.seeks: list[tuple[TP, int]] = []
        self.log_starts: dict[TP, int] = {}  # where retention has cut each partition (0 if absent)
        self.assigned: set[TP] = set()
        self.flow_active = True  # False while Faust has stopped flow for a rebalance

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def earliest_offsets(self, *partitions: TP) -> dict[TP, int]:
        return {tp: self.log_starts.get(tp, 0) for tp in partitions}

    def assignment(self) -> set[TP]:
        return set(self.assigned)


class AgentDriver:
    """One agent over a fresh table in `directory`; `feed` runs one fetched batch."""

    def __init__(
        self,
        directory: Path,
        definition: Definition,
        partitions: int,
        monkeypatch,
        batch_capacity: int = 4,
        stop_at: dict[int, int] | None = None,
    ):
        """`stop_at` makes it a batch replay's agent (to those offsets), with its write-back cache."""
        self.definition = definition
        self.app = faust.App(
            "driver", broker="kafka://127.0.0.1:1", store="rocksdb://", datadir=str(directory),
            autodiscover=False, web_enabled=False, topic_partitions=partitions,
        )  # fmt: skip
        self.table = define_table(self.app, partitions)
        self.consumer = RecordingConsumer()
        self.app.consumer = self.consumer
        self.producer = RecordingProducer(batch_capacity)
        self.producer.app = self.app
        self.dead = RecordingDeadLetters()
        self.commits: list[dict[TP, int]] = []
        self.app.recording_producer = self.producer  # each driver's app writes through its own
        monkeypatch.setattr(writer_module, "raw_producer", lambda app: app.recording_producer)
        monkeypatch.setattr(agent_module, "drain_producer_buffer", _nothing)
        monkeypatch.setattr(agent_module, "commit_offsets", self._record_commit)
        monkeypatch.setattr(agent_module, "COMMIT_EVERY_S", 0.0)
        self.loop = asyncio.new_event_loop()  # one loop for the agent's life, as in a worker
        self._restored: dict[int, int] = {}  # changelog records restored so far, during a recovery
        self.progress = Progress(stop_at=stop_at)
        self.agent = GroupedMeanAgent(
            self.table, definition, self.dead, self.progress, DeadLetters("driver", 1, "test", "driver-topic-id", {})
        )

    async def _record_commit(self, consumer: Any, offsets: dict[TP, int]) -> bool:
        self.commits.append(dict(offsets))
        return True

    def feed(self, partition: int, records: list[ParsedRecord]) -> None:
        self.loop.run_until_complete(self.agent.on_batch({TP(self.definition.topic, partition): records}))

    def tick(self) -> None:
        """One tick of the agent's timer that writes a cache no delivery came to write."""
        self.loop.run_until_complete(self.agent.flush_stalled_cache())

    def feed_then_stop(self, partition: int, records: list[ParsedRecord], after_s: float = 0.2) -> None:
        """Feed a batch and stop the agent's task if it has not finished within `after_s` (as a
        stop cancels it while it waits on the broker)."""
        batch = self.agent.on_batch({TP(self.definition.topic, partition): records})
        self.loop.run_until_complete(asyncio.wait_for(batch, after_s))

    def close(self) -> None:
        self.loop.close()

    def entries(self, partition: int) -> dict[bytes, bytes]:
        return {key: value for key, value in partition_items(self.table, partition) if key != STATS_KEY}

    def stats(self, partition: int) -> PartitionStats:
        return read_stats(self.table, partition)

    def restore_through_faust(self, partition: int, restoring: bool = True) -> None:
        """Faust's recovery of a partition this process gets (back): the changelog records after
        the offset its local store persisted, applied by the table's store in order (kappa keeps
        each key's newest entry: tables.grouped_mean.define_table). With `restoring` False, the
        recovery does not restore the partition (it is not among its active ones) but hands its
        records over anyway, as Faust's does with a record fetched before a rebalance."""
        changelog = self.table.changelog_topic.get_topic_name()
        tp = TP(changelog, partition)
        if restoring:
            self.app.tables.recovery.active_tps.add(tp)
        persisted = self.table.data.persisted_offset(tp)
        start = 0 if persisted is None else persisted + 1
        events = [
            SimpleNamespace(message=SimpleNamespace(tp=tp, partition=partition, offset=offset, key=key, value=value))
            for offset, (key, value) in enumerate(self.producer.changelog.get(partition, []))
            if offset >= start
        ]
        if events:
            self.table.data.apply_changelog_batch(events, None, None)

    def persisted_offset(self, partition: int) -> int | None:
        return self.table.data.persisted_offset(TP(self.table.changelog_topic.get_topic_name(), partition))

    def restore_from_changelog(self, partition: int, records: int | None = None) -> None:
        """What Faust's recovery does for a partition that moved: its changelog, replayed in
        order into an empty database (the last record per key wins). With `records`, only that
        many, and the app stays in recovery, as Faust's is between two reads of the changelog
        (`app.in_recovery`, which Faust's Recovery sets while it applies them)."""
        from kappa.engine.faust_internals import partition_db

        db = partition_db(self.table, partition)
        if not self.app.in_recovery:  # a recovery starts
            for key, _ in list(db.items()):
                del db[key]
            self._restored[partition] = 0
        changelog = self.producer.changelog.get(partition, [])
        done = self._restored[partition]
        upto = len(changelog) if records is None else min(done + records, len(changelog))
        for key, value in changelog[done:upto]:
            db[key] = value
        self._restored[partition] = upto
        self.app.in_recovery = upto < len(changelog)


async def _nothing(app: Any) -> None:
    return None
