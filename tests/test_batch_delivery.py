"""The seam's batch consumer (kappa.engine.faust_internals) in a Faust app of this process,
against the real broker: what it delivers, and what Faust's seeks make it deliver again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence

import faust
from confluent_kafka import Producer
from faust.types import TP

from kappa.engine.faust_internals import commit_offsets, deliver_batches
from kappa.kafka.admin import client_config, ensure_topic

RECORDS = 10
TIMEOUT_S = 30.0


class Deliveries:
    """The offsets a handler was given, in order, and a way to wait for more of them."""

    def __init__(self) -> None:
        self.offsets: list[int] = []
        self._arrived = asyncio.Event()

    async def handler(self, batches: Mapping[TP, Sequence]) -> None:
        for records in batches.values():
            self.offsets.extend(record.offset for record in records)
        self._arrived.set()

    async def until(self, count: int) -> list[int]:
        while len(self.offsets) < count:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), TIMEOUT_S)
        return self.offsets


def produce(broker: str, topic: str, count: int) -> None:
    producer = Producer(client_config(broker))
    for number in range(count):
        producer.produce(topic, b"%d" % number, partition=0)
    assert producer.flush(30) == 0


async def redeliveries_after_seek_to_committed_zero(broker: str, topic: str, state_dir: str) -> list[int]:
    """Read the whole partition, commit 0 for it and make Faust's seek back to the committed
    offsets (as it does after a rebalance's recovery, and when a poll comes back while flow
    is stopped); return what is delivered after that."""
    app = faust.App(
        f"{topic}-app",
        broker=f"kafka://{broker}",
        autodiscover=False,
        web_enabled=False,
        datadir=state_dir,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
    )
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    deliveries = Deliveries()
    deliver_batches(app, source, {topic: deliveries.handler})
    await app.start()
    try:
        assert await deliveries.until(RECORDS) == list(range(RECORDS))
        partition = TP(topic, 0)
        assert await commit_offsets(app.consumer, {partition: 0})
        await app.consumer.perform_seek()
        return (await deliveries.until(2 * RECORDS))[RECORDS:]
    finally:
        await app.stop()


def test_records_of_a_partition_committed_at_zero_come_again_after_faust_seeks_back(kafka, tmp_path):
    """aiokafka's seek to committed skips an offset of 0; when it did, a partition with nothing
    applied yet kept the fetch position a dropped poll had moved to its end, and a replay
    waited forever for records that had been fetched and never delivered."""
    topic = f"seek-back-{uuid.uuid4().hex[:12]}"
    ensure_topic(kafka, topic, 1)
    produce(kafka, topic, RECORDS)
    again = asyncio.run(redeliveries_after_seek_to_committed_zero(kafka, topic, str(tmp_path / "state")))
    assert again == list(range(RECORDS))
