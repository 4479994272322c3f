"""The source topic's records reach the agent a record batch at a time (kappa.engine.faust_internals):
aiokafka's real fetcher against the broker, a fetch that starts inside a record batch, and
deliveries bounded in size, each record exactly once and in offset order."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import deque

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from confluent_kafka import Producer

from kappa.engine.faust_internals import FetchedBatch, PassThroughRecords, take_records
from kappa.kafka.admin import client_config, ensure_topic
from tests.helpers import REPO

RECORDS_PER_PARTITION = 3_000
START = 1_234  # inside a record batch: the producer sends them in batches of about a thousand


def _produce(broker: str, topic: str) -> None:
    producer = Producer(client_config(broker, **{"linger.ms": 200, "batch.num.messages": 1_000}))
    for partition in (0, 1):
        for offset in range(RECORDS_PER_PARTITION):
            producer.produce(topic, b'{"n": %d}' % offset, b"k", partition=partition)
    assert producer.flush(30) == 0


async def _fetch_from(broker: str, topic: str, start: int) -> dict[TopicPartition, list[FetchedBatch]]:
    """Every item aiokafka's fetcher yields for `topic` from `start` on, per partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in (0, 1)]
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, start)
        items: dict[TopicPartition, list[FetchedBatch]] = {tp: [] for tp in partitions}
        for _ in range(100):
            for tp, fetched in (await consumer.getmany(timeout_ms=1_000)).items():
                items[tp] += fetched
            positions = [await consumer.position(tp) for tp in partitions]
            if positions == [RECORDS_PER_PARTITION] * len(partitions):
                return items
        raise AssertionError("the fetcher did not reach the end of the topic")
    finally:
        await consumer.stop()


@pytest.fixture
def fetched(kafka) -> dict[TopicPartition, list[FetchedBatch]]:
    topic = f"fetched-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka, topic, 2)
    _produce(kafka, topic)
    PassThroughRecords.install([topic])
    return asyncio.run(_fetch_from(kafka, topic, START))


def test_the_fetcher_yields_whole_batches_and_a_batch_read_from_inside_starts_at_the_fetch_offset(fetched):
    for batches in fetched.values():
        assert all(isinstance(batch, FetchedBatch) for batch in batches)
        assert len(batches) > 1  # several record batches, so the first one was entered in its middle
        offsets = [record.offset for batch in batches for record in batch.parse()]
        assert offsets == list(range(START, RECORDS_PER_PARTITION))


def test_deliveries_are_bounded_and_hold_every_record_once_in_offset_order(fetched):
    pending = {tp: deque(batches) for tp, batches in fetched.items()}
    largest_batch = 1_000
    limit = 700
    delivered: dict[TopicPartition, list[int]] = {tp: [] for tp in fetched}
    deliveries = 0
    while pending:
        taken = take_records(pending, limit)
        assert 0 < sum(len(records) for records in taken.values()) < limit + largest_batch
        for tp, records in taken.items():
            delivered[tp] += [record.offset for record in records]
            assert all(record.value == b'{"n": %d}' % record.offset for record in records)
        deliveries += 1
    assert deliveries >= 2 * (RECORDS_PER_PARTITION - START) // (limit + largest_batch)
    for tp, offsets in delivered.items():
        assert offsets == list(range(START, RECORDS_PER_PARTITION)), tp


SEEKING_WORKER = """
import json, sys
import faust
from kappa.engine import faust_internals
from kappa.engine.faust_internals import PromptWorker, deliver_batches, request_stop

broker, topic, end, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
faust_internals.DELIVERY_RECORDS = 700  # several deliveries per fetch, each parsed while the last is applied
app = faust.App(f"{topic}-app", broker=f"kafka://{broker}", autodiscover=False, web_enabled=False,
                consumer_auto_offset_reset="earliest", store="memory://", topic_partitions=2)
source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
delivered = {0: [], 1: []}
sought = False

async def handler(batch):
    global sought
    for tp, records in batch.items():
        delivered[tp.partition] += [record.offset for record in records]
        if tp.partition == 0 and not sought and records[-1].offset >= 1500:
            sought = True
            await app.consumer.seek(tp, 500)
    if sought and all(offsets and offsets[-1] == end - 1 for offsets in delivered.values()):
        with open(out, "w") as file:
            json.dump(delivered, file)
        request_stop()

deliver_batches(app, source, {topic: handler})
worker = PromptWorker(app, loglevel="warn", quiet=True, redirect_stdouts=False)
worker.spinner = None
worker.execute_from_commandline()
"""


def test_a_handler_that_seeks_back_gets_the_partition_again_from_there_and_nothing_fetched_beyond(kafka, tmp_path):
    """The agent's rewind: once the handler seeks a partition back, the rest of what was fetched
    for it (parsed or not) is dropped, the records come again from the seek offset, and the
    other partition goes on undisturbed, each of its records once."""
    topic = f"seeking-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka, topic, 2)
    _produce(kafka, topic)
    out = tmp_path / "delivered.json"
    command = [sys.executable, "-c", SEEKING_WORKER, kafka, topic, str(RECORDS_PER_PARTITION), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    delivered = {int(p): offsets for p, offsets in json.loads(out.read_text()).items()}
    assert delivered[1] == list(range(RECORDS_PER_PARTITION))
    first_pass = delivered[0][: delivered[0].index(500, 501)]
    assert first_pass == list(range(len(first_pass))) and first_pass[-1] >= 1500
    assert delivered[0][len(first_pass) :] == list(range(500, RECORDS_PER_PARTITION))
