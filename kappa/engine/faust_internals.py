"""Faust's per-record hot path, trimmed: what py-spy showed costs most in a replay.

1. Records of the pipeline's source topic reach the agent as the batches Faust's consumer
fetched them in, not one event at a time. Faust delivers every record through
`Service.wait_first(callback(message), suspend_flow.wait())` (four asyncio tasks per
record), then the Conductor builds an Event, a queue carries it to the stream, and the
stream acks it: on a 1M-record replay py-spy put the task race alone at 40% of the CPU
and the rest of that path at most of what was left. Faust still does everything else:
group membership, assignment, fetching, table recovery, changelogs and seeks.

Each fetched batch is delivered inside one `wait_first` race against flow suspension, so a
rebalance cancels the rest of a batch; its records were not applied and their read offsets
did not move, and Faust seeks back to the committed offsets after the rebalance. Records
of other topics (table changelogs during recovery) take Faust's own path.

The batch is taken from Faust's fetcher before its `getmany` turns it into a stream: that
async generator looked up the highwater mark and built a Faust message for every record,
about a quarter of the CPU left after the change above. The agent reads aiokafka's records
as they are, and no Faust message or event is made for them at all (the agent writes the
table in bulk, tables.writer, which needs no event context).

2. aiokafka hands the source topic's records over as it parsed them. Its fetcher wraps
every record in a Python `ConsumerRecord` dataclass (eleven fields, sizes and a headers
tuple), 17% of a 1M-record replay's CPU in py-spy and more than the agent's own JSON parse.
For the topics with a batch handler the record the batch parser built (aiokafka's C
`DefaultRecord`, with `offset`, `key`, `value` and `headers`) is passed on as it is; other
topics (changelogs, Faust's own) still get ConsumerRecords.

3. The monitor keeps no per-record statistics. Faust's Monitor feeds its web view (off
here) with per-event timings, at about 5% of the replay's CPU; kappa reports progress from
the table's own offsets instead (kappa.status).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.consumer.fetcher import PartitionRecords
from faust.sensors.monitor import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP

YIELD_EVERY = 100


class Record(Protocol):
    """What the agent reads of a record: aiokafka's parsed record, its ConsumerRecord and
    Faust's Message all fit."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


# a partition's records from one fetch, in offset order, as aiokafka parsed them
BatchHandler = Callable[[dict[TP, Sequence[Record]]], Awaitable[None]]


class BatchDeliveryConsumer(AIOKafkaConsumer):
    """Bind with `for_topics`; the handlers get every fetched batch of their topics."""

    handlers: Mapping[str, BatchHandler] = {}

    @classmethod
    def for_topics(cls, handlers: Mapping[str, BatchHandler]) -> type[BatchDeliveryConsumer]:
        PassThroughRecords.install(handlers)
        return type("BatchDeliveryConsumer", (cls,), {"handlers": dict(handlers)})

    async def _drain_messages(self, fetcher: Any) -> None:
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.wait_first(self._fetch_and_deliver(), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _fetch_and_deliver(self) -> None:
        """Faust's `getmany`, per fetched batch instead of per record.

        The same guards apply: nothing is delivered once flow is suspended or the consumer
        generation changed (a rebalance), and only active partitions are delivered.
        """
        records, active = await self._wait_next_records(1.0)
        await self.sleep(0)
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            await self._seek_back_while_suspended()
            return
        generation_id = self.app.consumer_generation_id
        batches: dict[str, dict[TP, Sequence[Record]]] = {}
        others: list[tuple[TP, list]] = []
        for tp, fetched in records.items():
            if active is not None and tp not in active and tp not in self._buffered_partitions:
                continue
            fresh = self._unread(tp, fetched)
            if not fresh:
                continue
            if tp.topic in self.handlers:
                batches.setdefault(tp.topic, {})[tp] = fresh
            else:
                others.append((tp, fresh))
        for topic, mine in batches.items():
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                return
            await self.handlers[topic](mine)
            for tp, records in mine.items():
                self._read_offset[tp] = records[-1].offset
        for tp, fresh in others:
            await self._deliver_one_by_one(tp, fresh, generation_id)

    def _unread(self, tp: TP, fetched: list) -> list:
        """Faust's rule: a record at or after the read offset is delivered. (After a seek the
        read offset is the next offset to read; after a delivery, the last one delivered.)"""
        read_offset = self._read_offset[tp]
        if read_offset is None or fetched[0].offset >= read_offset:
            return fetched
        return [record for record in fetched if record.offset >= read_offset]

    async def _deliver_one_by_one(self, tp: TP, fetched: list, generation_id: int) -> None:
        """Faust's own per-record path, for topics without a batch handler (changelogs)."""
        acks_enabled = self.app.topics.acks_enabled_for(tp.topic)
        for position, record in enumerate(fetched):
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                return
            if position % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            read_offset = self._read_offset[tp]
            offset = record.offset
            if read_offset and offset - read_offset > 1 and acks_enabled:
                await self._add_gap(tp, read_offset + 1, offset)
            if self._commit_every is not None and self._n_acked >= self._commit_every:
                self._n_acked = 0
                await self.commit()
            await self.callback(self._to_message(tp, record))
            self._read_offset[tp] = offset

    async def _seek_back_while_suspended(self) -> None:
        try:
            await self.perform_seek()
        except Exception as exc:  # Faust's getmany logs and carries on here too
            self.log.warning(f"exception performing seek when flow not active {exc}")


class PassThroughRecords(PartitionRecords):
    """aiokafka's per-partition record iterator, minus the ConsumerRecord for chosen topics."""

    topics: ClassVar[set[str]] = set()
    _wrap = PartitionRecords._consumer_record

    @classmethod
    def install(cls, topics: Iterable[str]) -> None:
        """aiokafka builds its iterator by the module-global name; rebinding it is the only
        seam it has. Topics not named here keep aiokafka's own behaviour."""
        cls.topics.update(topics)
        aiokafka_fetcher.PartitionRecords = cls

    def _consumer_record(self, tp: Any, record: Any) -> Any:
        if tp.topic in self.topics:
            return record
        return self._wrap(tp, record)


class PerRecordQuietMonitor(Monitor):
    """Faust's monitor minus its four per-record hooks; the rest (commits, rebalances) stays."""

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None


async def commit_offsets(consumer: Any, offsets: Mapping[TP, int]) -> bool:
    """Commit `offsets` of the partitions this consumer still owns; False when none is left.

    Offsets gathered before a rebalance can all belong to revoked partitions. Faust's driver
    drops those and would hand aiokafka an empty map, which it refuses with `ValueError({})`,
    crashing the worker; a partition's new owner commits for it instead.
    """
    assigned = consumer.assignment()
    owned = {tp: offset for tp, offset in offsets.items() if tp in assigned}
    if not owned:
        return False
    return bool(await consumer._commit(owned))
