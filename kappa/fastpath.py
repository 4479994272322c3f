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

2. The monitor keeps no per-record statistics. Faust's Monitor feeds its web view (off
here) with per-event timings, at about 5% of the replay's CPU; kappa reports progress from
the table's own offsets instead (kappa.status).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from faust.sensors.monitor import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP, Message

YIELD_EVERY = 100


BatchHandler = Callable[[dict[TP, list[Message]]], Awaitable[None]]


class BatchDeliveryConsumer(AIOKafkaConsumer):
    """Bind with `for_topics`; the handlers get every fetched batch of their topics."""

    handlers: Mapping[str, BatchHandler] = {}

    @classmethod
    def for_topics(cls, handlers: Mapping[str, BatchHandler]) -> type[BatchDeliveryConsumer]:
        return type("BatchDeliveryConsumer", (cls,), {"handlers": dict(handlers)})

    async def _drain_messages(self, fetcher: Any) -> None:
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                records = self.getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    await self.wait_first(self._deliver(records), self.suspend_flow.wait())
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

    async def _deliver(self, records: AsyncIterator) -> None:
        """Batch topics to their handler; others one by one, with Faust's bookkeeping."""
        callback: Callable = self.callback
        handlers = self.handlers
        read_offsets = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        batches: dict[TP, list[Message]] = {}
        since_yield = 0
        async for tp, message in records:
            offset = message.offset
            read_offset = read_offsets[tp]
            if read_offset is not None and offset < read_offset:
                continue
            if tp.topic in handlers:
                batches.setdefault(tp, []).append(message)
                continue
            since_yield += 1
            if since_yield > YIELD_EVERY:
                await asyncio.sleep(0)
                since_yield = 0
            if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
                await self._add_gap(tp, read_offset + 1, offset)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            await callback(message)
            read_offsets[tp] = offset
        for topic, handler in handlers.items():
            mine = {tp: messages for tp, messages in batches.items() if tp.topic == topic}
            if mine:
                await handler(mine)
                for tp, messages in mine.items():
                    read_offsets[tp] = messages[-1].offset


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
