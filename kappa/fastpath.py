"""Faust's per-record hot path, trimmed: what py-spy showed costs most in a replay.

1. The consumer hands fetched records to the streams without four tasks per record.

Faust's drain loop (faust/transport/consumer.py, Consumer._drain_messages) delivers every
record through `Service.wait_first(callback(message), suspend_flow.wait())`, which creates
four asyncio tasks per record to race the delivery against flow suspension, stop and crash.
py-spy on a 1M-record replay put that race at 40% of the process's CPU.

This consumer runs the same race once per fetched batch instead: a batch is delivered
record by record inside one task, and a rebalance that suspends the flow cancels the rest
of the batch. Records of a cancelled batch were never delivered and their read offsets
never advanced; Faust seeks to the committed offsets after the rebalance and fetches them
again, and the agent skips per key whatever it has already applied.

2. The monitor keeps no per-record statistics. Faust's Monitor feeds its web view (off
here) with per-event timings, at about 5% of the replay's CPU; kappa reports progress from
the table's own offsets instead (kappa.status).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from faust.sensors.monitor import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

YIELD_EVERY = 100


class BatchDeliveryConsumer(AIOKafkaConsumer):
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
        """Faust's per-record bookkeeping (read offsets, gaps, commit cadence), minus the race."""
        callback: Callable = self.callback
        read_offsets = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        since_yield = 0
        async for tp, message in records:
            since_yield += 1
            if since_yield > YIELD_EVERY:
                await asyncio.sleep(0)
                since_yield = 0
            offset = message.offset
            read_offset = read_offsets[tp]
            if read_offset is not None and offset < read_offset:
                continue
            if read_offset and offset - read_offset > 1 and acks_enabled_for(message.topic):
                await self._add_gap(tp, read_offset + 1, offset)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            await callback(message)
            read_offsets[tp] = offset


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
