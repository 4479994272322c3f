"""The seam's batch consumer (kappa.engine.faust_internals) against the real broker: the source
topic's records leave aiokafka's fetcher a record batch at a time, a fetch may start inside a
record batch, deliveries are bounded in size, each record comes exactly once and in offset
order, and Faust's seeks (the agent's rewind, the seek back to committed offsets) make records
come again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import threading
import uuid
from collections import deque
from collections.abc import Mapping, Sequence

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from confluent_kafka import Producer
from faust.types import TP

from kappa.engine import faust_internals
from kappa.engine.faust_internals import (
    BatchHandler,
    FetchedBatch,
    KappaConsumerThread,
    PassThroughRecords,
    commit_offsets,
    deliver_batches,
    take_records,
)
from kappa.kafka.admin import client_config, ensure_topic
from tests.helpers import REPO

RECORDS_PER_PARTITION = 3_000
START = 1_234  # inside a record batch: the producer sends them in batches of about a thousand
FEW = 10  # one small fetch
TIMEOUT_S = 30.0
SLOW_RECORDS = 600  # in record batches of 10, polled 5 batches at a time: 12 polls of 0.3 s


def _produce(
    broker: str, topic: str, partitions: int = 2, records: int = RECORDS_PER_PARTITION, batch: int = 1_000
) -> None:
    # idempotent: a retried batch keeps its place, so a record's offset is the number it carries
    settings = {"linger.ms": 200, "batch.num.messages": batch, "enable.idempotence": True}
    producer = Producer(client_config(broker, **settings))
    for partition in range(partitions):
        for offset in range(records):
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
app = faust.App(f"{topic}-app", broker=f"kafka://{broker}", autodiscover=False, web_enabled=False, datadir=sys.argv[5],
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
    state = tmp_path / "state"
    command = [sys.executable, "-c", SEEKING_WORKER, kafka, topic, str(RECORDS_PER_PARTITION), str(out), str(state)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    delivered = {int(p): offsets for p, offsets in json.loads(out.read_text()).items()}
    assert delivered[1] == list(range(RECORDS_PER_PARTITION))
    first_pass = delivered[0][: delivered[0].index(500, 501)]
    assert first_pass == list(range(len(first_pass))) and first_pass[-1] >= 1500
    assert delivered[0][len(first_pass) :] == list(range(500, RECORDS_PER_PARTITION))


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


def faust_app(broker: str, topic: str, state_dir: str, **settings: object) -> faust.App:
    """A Faust app of this test's own, reading from the start, with no recovery delay."""
    return faust.App(
        f"{topic}-app",
        broker=f"kafka://{broker}",
        autodiscover=False,
        web_enabled=False,
        datadir=state_dir,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        **settings,
    )


def app_delivering_to(broker: str, topic: str, state_dir: str, handler: BatchHandler) -> faust.App:
    """An app of this test's own whose batch consumer hands `topic`'s records to `handler`."""
    app = faust_app(broker, topic, state_dir)
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    deliver_batches(app, source, {topic: handler})
    return app


def app_reading_per_record(broker: str, topic: str, state_dir: str) -> tuple[faust.App, faust.topics.Topic]:
    """An app whose batch consumer reads `topic` record by record (the path changelogs take),
    into a queue of one (so a record's delivery waits until the test takes the one before), and
    the channel the test takes them from. `<topic>-source` is its batch-delivered source."""
    app = faust_app(broker, topic, state_dir, stream_buffer_maxsize=1)
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(f"{topic}-source", **raw)
    other = app.topic(topic, **raw).clone(is_iterator=True)  # what `async for` on a topic subscribes
    app.topics.add(other)
    deliver_batches(app, source, {source.get_topic_name(): Deliveries().handler})
    return app, other


def per_record_topic(kafka: str, name: str, partitions: int = 1, records: int = FEW) -> str:
    """A new topic for `app_reading_per_record` (and its `-source` topic), `records` in each partition."""
    topic = f"{name}-{uuid.uuid4().hex[:12]}"
    ensure_topic(kafka, topic, partitions)
    ensure_topic(kafka, f"{topic}-source", 1)
    if records:
        _produce(kafka, topic, partitions=partitions, records=records)
    return topic


async def offsets_until_quiet(channel: faust.topics.Topic, quiet_s: float = 3.0) -> list[int]:
    """The offsets taken from `channel` until none comes for `quiet_s` seconds."""
    taken: list[int] = []
    with contextlib.suppress(TimeoutError):
        while True:
            taken.append((await asyncio.wait_for(channel.get(), quiet_s)).message.offset)
    return taken


async def redeliveries_after_seek_to_committed_zero(broker: str, topic: str, state_dir: str) -> list[int]:
    """Read the whole partition, commit 0 for it and make Faust's seek back to the committed
    offsets (as it does after a rebalance's recovery, and when a poll comes back while flow
    is stopped); return what is delivered after that."""
    deliveries = Deliveries()
    app = app_delivering_to(broker, topic, state_dir, deliveries.handler)
    await app.start()
    try:
        assert await deliveries.until(FEW) == list(range(FEW))
        partition = TP(topic, 0)
        assert await commit_offsets(app.consumer, {partition: 0})
        await app.consumer.perform_seek()
        return (await deliveries.until(2 * FEW))[FEW:]
    finally:
        await app.stop()


def test_records_of_a_partition_committed_at_zero_come_again_after_faust_seeks_back(kafka, tmp_path):
    """aiokafka's seek to committed skips an offset of 0; when it did, a partition with nothing
    applied yet kept the fetch position a dropped poll had moved to its end, and a replay
    waited forever for records that had been fetched and never delivered."""
    topic = f"seek-back-{uuid.uuid4().hex[:12]}"
    ensure_topic(kafka, topic, 1)
    _produce(kafka, topic, partitions=1, records=FEW)
    again = asyncio.run(redeliveries_after_seek_to_committed_zero(kafka, topic, str(tmp_path / "state")))
    assert again == list(range(FEW))


class OffsetsByPartition:
    """A batch handler keeping the offsets it was given, per partition, in order."""

    def __init__(self) -> None:
        self.offsets: dict[int, list[int]] = {}

    async def handler(self, batches: Mapping[TP, Sequence]) -> None:
        for tp, records in batches.items():
            self.offsets.setdefault(tp.partition, []).extend(record.offset for record in records)

    async def until(self, partition: int, count: int, quiet_s: float = 3.0) -> list[int]:
        """The partition's offsets once it has `count`, or once none came for `quiet_s` seconds."""
        waited = 0.0
        seen = -1
        while len(self.offsets.get(partition, [])) < count and waited < quiet_s:
            await asyncio.sleep(0.1)
            now = len(self.offsets.get(partition, []))
            waited = 0.0 if now != seen else waited + 0.1
            seen = now
        return self.offsets.get(partition, [])


async def deliveries_across_a_slow_seek_to_committed(
    broker: str, topic: str, state_dir: str, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Deliver both partitions' first FEW records and commit FEW for each, then make Faust's seek
    back to the committed offsets (as every rebalance's recovery ends). Each partition is sought
    once its committed offset has come back from the broker. Once the first partition is sought,
    FEW more records arrive for it, and the fetch that takes them comes back while the other
    partition's committed offset is still to come (held here until the fetch is taken). Returns
    every offset the first partition sought delivered."""
    delivered = OffsetsByPartition()
    app = app_delivering_to(broker, topic, state_dir, delivered.handler)
    fetch_taken, seek_made = threading.Event(), threading.Event()
    take = faust_internals.take_records

    def take_then_hold(pending: dict, limit: int) -> dict:
        """Runs on the parser thread: the fetch with the new records was taken by the delivery
        loop; its delivery is held until the seek to committed has returned."""
        taken = take(pending, limit)
        if not fetch_taken.is_set() and any(r.offset >= FEW for records in taken.values() for r in records):
            fetch_taken.set()
            seek_made.wait(TIMEOUT_S)
        return taken

    monkeypatch.setattr(faust_internals, "take_records", take_then_hold)
    await app.start()
    try:
        assert [await delivered.until(p, FEW) for p in (0, 1)] == [list(range(FEW))] * 2
        assert await commit_offsets(app.consumer, {TP(topic, 0): FEW, TP(topic, 1): FEW})
        aiokafka_consumer = app.consumer._thread._ensure_consumer()  # noqa: SLF001
        committed = aiokafka_consumer.committed
        sought: list[TopicPartition] = []

        async def committed_holding_the_next(tp: TopicPartition) -> int | None:
            """On Faust's consumer thread: the committed offset of `tp`. The topic's first partition
            whose offset is back is sought; the other's, once back, first lets FEW records arrive
            in the sought one and waits until they are fetched."""
            offset = await committed(tp)
            if tp.topic != topic:
                return offset
            if not sought:
                sought.append(tp)
            elif len(sought) == 1:
                sought.append(sought[0])  # once
                producer = Producer(client_config(broker))
                for n in range(FEW):
                    producer.produce(topic, b'{"n": %d}' % n, b"k", partition=sought[0].partition)
                assert producer.flush(30) == 0
                for _ in range(int(TIMEOUT_S / 0.01)):
                    if fetch_taken.is_set():
                        break
                    await asyncio.sleep(0.01)
            return offset

        aiokafka_consumer.committed = committed_holding_the_next
        await app.consumer.perform_seek()
        seek_made.set()
        assert fetch_taken.is_set(), "the new records were not fetched while the seek was made"
        return await delivered.until(sought[0].partition, 2 * FEW)
    finally:
        seek_made.set()
        await app.stop()


def test_a_fetch_that_comes_back_while_the_seek_to_committed_goes_on_is_delivered(kafka, tmp_path, monkeypatch):
    """Faust counted the seek to committed offsets only when the whole seek had come back, on its
    own thread; a fetch that came back meanwhile, of a partition already sought, was then taken
    for stale and dropped, and its records, past aiokafka's position, never came again: a live
    worker restarted on wiped state stayed 2,003 records behind forever
    (test_faults.py::test_wiped_local_state_is_rebuilt_from_the_changelog, 1 run in 45)."""
    topic = f"seek-overtaken-{uuid.uuid4().hex[:12]}"
    ensure_topic(kafka, topic, 2)
    _produce(kafka, topic, partitions=2, records=FEW)
    state = str(tmp_path / "state")
    offsets = asyncio.run(deliveries_across_a_slow_seek_to_committed(kafka, topic, state, monkeypatch))
    assert offsets == list(range(2 * FEW))


async def deliveries_around_a_seek_made_as_a_fetch_comes_back(broker: str, topic: str, state_dir: str) -> list[int]:
    """Deliver the partition's first FEW records; FEW more arrive, and in the step after the fetch
    that takes them, the partition is sought to 1 on Faust's consumer thread (as a recovery's
    `seek_wait` does), before the main loop has seen the fetch (held until then). Every offset
    delivered, in order."""
    delivered = OffsetsByPartition()
    app = app_delivering_to(broker, topic, state_dir, delivered.handler)
    await app.start()
    try:
        assert await delivered.until(0, FEW) == list(range(FEW))
        main_loop = asyncio.get_running_loop()
        thread = app.consumer._thread  # noqa: SLF001
        aiokafka_consumer = thread._ensure_consumer()  # noqa: SLF001
        fetcher = aiokafka_consumer._fetcher  # noqa: SLF001
        fetched_records = fetcher.fetched_records
        sought, polling = threading.Event(), threading.Event()
        tp = TopicPartition(topic, 0)

        async def seek_then_release() -> None:
            seek = asyncio.ensure_future(thread._seek_wait(aiokafka_consumer, {tp: 1}))  # noqa: SLF001
            await asyncio.sleep(0)  # the seek's first step: the seek itself
            sought.set()
            await seek

        async def taken_then_sought(*args: object, **kwargs: object) -> dict:
            polling.set()
            records = await fetched_records(*args, **kwargs)
            if records.get(tp) and not sought.is_set():  # the new records: the first ones were delivered
                main_loop.call_soon_threadsafe(sought.wait, TIMEOUT_S)  # the main loop sees the fetch after the seek
                asyncio.ensure_future(seek_then_release())
            return records

        fetcher.fetched_records = taken_then_sought
        # the poll under way when it was replaced must be over: the new records come to one that is replaced
        assert await main_loop.run_in_executor(None, polling.wait, TIMEOUT_S)
        await main_loop.run_in_executor(None, _produce, broker, topic, 1, FEW)
        return await delivered.until(0, 3 * FEW - 1)
    finally:
        await app.stop()


def test_a_fetch_taken_before_a_seek_is_stale_however_late_it_is_seen(kafka, tmp_path):
    """A fetch was stamped with its partition's seek count when the main loop saw it, not when its
    records were taken on the consumer thread: a seek made in between passed its stale records
    for fresh, and the records from the seek's offset on were dropped as read when they came
    again. Had the fetch started past records never applied, they were lost (helper-36's review)."""
    topic = f"seek-after-take-{uuid.uuid4().hex[:12]}"
    ensure_topic(kafka, topic, 1)
    _produce(kafka, topic, partitions=1, records=FEW)
    offsets = asyncio.run(deliveries_around_a_seek_made_as_a_fetch_comes_back(kafka, topic, str(tmp_path / "state")))
    assert offsets[FEW:] == list(range(1, 2 * FEW)), offsets


async def redeliveries_after_a_seek_during_a_delivery(broker: str, topic: str, state_dir: str, to: int) -> list[int]:
    """Block the per-record path (the one changelogs take) inside a delivery, seek the partition
    to `to` meanwhile as a rebalance's recovery does (`seek_wait`, from Faust's recovery), let the
    delivery go on, and return every offset that came after the seek."""
    app, other = app_reading_per_record(broker, topic, state_dir)
    await app.start()
    try:
        before = [(await asyncio.wait_for(other.get(), TIMEOUT_S)).message.offset for _ in range(2)]
        assert before == [0, 1]
        await app.consumer.seek_wait({TP(topic, 0): to})
        after: list[int] = []
        while after[-FEW + to :] != list(range(to, FEW)) or after.count(to) == 0:
            after.append((await asyncio.wait_for(other.get(), TIMEOUT_S)).message.offset)
        return after
    finally:
        await app.stop()


@pytest.mark.parametrize("to", [0, 1])
def test_a_seek_made_while_a_record_is_being_delivered_makes_the_records_from_there_come_again(kafka, tmp_path, to):
    """The per-record path set the read offset to the delivered record's offset after its
    delivery returned, over a seek made meanwhile; every record re-fetched before that offset
    was then taken for one already read and dropped. A rebalance's recovery seeks changelog
    partitions while a changelog record waits on a full queue, so a restore skipped most of a
    changelog, and the live table lost records (F1)."""
    topic = per_record_topic(kafka, "seek-during")
    after = asyncio.run(redeliveries_after_a_seek_during_a_delivery(kafka, topic, str(tmp_path / "state"), to))
    again = after[len(after) - after[::-1].index(to) - 1 :]
    assert again == list(range(to, FEW)), after
    assert set(after[: after.index(to)]) <= {2}, f"only the record queued before the seek comes before it: {after}"


async def redeliveries_of_a_partition_sought_while_another_is_delivered(
    broker: str, topic: str, state_dir: str
) -> tuple[int, list[int]]:
    """Two partitions fetched together, the first one's delivery blocked on a full queue; the
    other partition is sought to 0 meanwhile. Returns it and its offsets that came after the seek."""
    app, other = app_reading_per_record(broker, topic, state_dir)
    await app.start()

    async def take() -> tuple[int, int]:
        message = (await asyncio.wait_for(other.get(), TIMEOUT_S)).message
        return message.partition, message.offset

    try:
        first = [await take() for _ in range(2 * FEW)]
        assert sorted(first) == [(p, o) for p in (0, 1) for o in range(FEW)], first
        both = [TP(topic, 0), TP(topic, 1)]
        app.consumer.pause_partitions(both)  # so that the next records of both come in one fetch
        await asyncio.get_running_loop().run_in_executor(None, _produce, broker, topic, 2, FEW)
        await asyncio.sleep(1.5)
        app.consumer.resume_partitions(both)
        blocked = [await take() for _ in range(2)]
        sought = 1 - blocked[0][0]
        await app.consumer.seek_wait({TP(topic, sought): 0})
        after: list[int] = []
        while after[-2 * FEW :] != list(range(2 * FEW)):
            partition, offset = await take()
            if partition == sought:
                after.append(offset)
        return sought, after
    finally:
        await app.stop()


def test_a_partition_sought_while_another_of_its_fetch_is_delivered_comes_again_from_there(kafka, tmp_path):
    """The seek was counted from when a partition's own delivery began, not from its fetch: a
    partition sought while another one of the same fetch waited on a full queue then had its
    stale records delivered, and those before them never came again (found by review)."""
    topic = per_record_topic(kafka, "seek-other", partitions=2)
    _, after = asyncio.run(redeliveries_of_a_partition_sought_while_another_is_delivered(kafka, topic, str(tmp_path)))
    assert after[-2 * FEW :] == list(range(2 * FEW))


async def offsets_after_a_rebalance_during_a_blocked_delivery(broker: str, topic: str, state_dir: str) -> list[int]:
    """A rebalance lands while a record is handed to a full queue: flow stops (which cancels the
    delivery), the partition is sought to 0 as a recovery does, and flow resumes (which clears
    the queues). The rebalance's first step is made to land as Faust puts a record into a full
    queue, if it ever does. Returns the first FEW offsets taken after the rebalance."""
    app, other = app_reading_per_record(broker, topic, state_dir)
    queue = other.queue
    put = queue.put

    def stop_flow() -> None:  # what a rebalance does first (Faust's on_partitions_revoked)
        app.consumer.stop_flow()
        app.flow_control.suspend()

    async def put_as_a_rebalance_begins(event: object) -> None:
        queue.put = put  # once
        stop_flow()
        await put(event)

    queue.put = put_as_a_rebalance_begins
    await app.start()
    try:
        while not queue.full() and app.flow_control.is_active():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # any record that is handed to the full queue has been by now
        if app.flow_control.is_active():
            stop_flow()
        await app.consumer.seek_wait({TP(topic, 0): 0})
        app.flow_control.resume()
        app.consumer.resume_flow()
        taken = [(await asyncio.wait_for(other.get(), TIMEOUT_S)).message.offset for _ in range(FEW)]
        assert queue.put is put_as_a_rebalance_begins, "Faust's callback waited on a full queue"
        return taken
    finally:
        await app.stop()


def test_a_record_whose_delivery_a_rebalance_cancelled_never_lands_after_the_recovery_seek(kafka, tmp_path):
    """Faust hands a record to a full queue in a task of its own, which outlives the delivery a
    rebalance cancels; started as flow stopped, it waited for flow to resume and put its record
    in the queue after the recovery had sought the partition back and cleared the queues.
    Faust's restore then took that record's offset for the last one read and dropped every
    re-fetched record below it: the live table lost the groups whose newest entries were
    there (F1's third path, found with scripts/drill_pauses.py)."""
    topic = per_record_topic(kafka, "rebalance-blocked")
    after = asyncio.run(offsets_after_a_rebalance_during_a_blocked_delivery(kafka, topic, str(tmp_path / "state")))
    assert after == list(range(FEW))


async def livelock_errors_while_a_slow_handler_takes_batches(broker: str, topic: str, state_dir: str) -> list[str]:
    """Deliver `topic` in small fetches to a handler that takes a while over each, with Faust's
    stream livelock check due every second after half a second; return what it logged as errors."""
    settings = {"stream_processing_timeout": 0.5, "broker_commit_interval": 0.4, "broker_max_poll_records": 5}
    app = faust_app(broker, topic, state_dir, **settings)
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    deliveries = Deliveries()

    async def slow_handler(batches: Mapping[TP, Sequence]) -> None:
        await deliveries.handler(batches)
        await asyncio.sleep(0.3)

    deliver_batches(app, source, {topic: slow_handler})
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    collect = Collect()
    logging.getLogger().addHandler(collect)
    await app.start()
    try:
        await deliveries.until(SLOW_RECORDS)
        return errors
    finally:
        await app.stop()
        logging.getLogger().removeHandler(collect)


def test_a_replay_taking_batches_is_not_reported_as_a_stream_that_never_started(kafka, tmp_path):
    """Batches bypass Faust's streams, so Faust's livelock check saw no stream event and logged
    an ERROR, 'Stream has not started processing', with a page of advice, for every partition of
    any replay or live worker still behind its log after 5 minutes (seen 16 times in one drill)."""
    topic = f"livelock-{uuid.uuid4().hex[:12]}"
    ensure_topic(kafka, topic, 1)
    _produce(kafka, topic, partitions=1, records=SLOW_RECORDS, batch=10)
    errors = asyncio.run(livelock_errors_while_a_slow_handler_takes_batches(kafka, topic, str(tmp_path / "state")))
    assert not [error for error in errors if "processing" in error], errors


async def offsets_after_a_pause_during_a_delivery(broker: str, topic: str, state_dir: str) -> list[int]:
    """Pause the partition (as a recovery pauses a changelog partition once restored) while the
    rest of its fetch waits for room in the queue; return what the test can take after that."""
    app, other = app_reading_per_record(broker, topic, state_dir)
    await app.start()
    try:
        before = [(await asyncio.wait_for(other.get(), TIMEOUT_S)).message.offset for _ in range(2)]
        assert before == [0, 1]
        await asyncio.sleep(0.5)  # record 2 is in the queue of one, the rest of the fetch waits
        app.consumer.pause_partitions({TP(topic, 0)})
        return await offsets_until_quiet(other)
    finally:
        await app.stop()


def test_a_paused_partition_gets_no_more_of_its_fetch(kafka, tmp_path):
    """The per-record path checked whether a partition was active once per fetch: a recovery
    that paused a restored changelog partition and then cleared the queues (flow resumes
    without a seek) still got the rest of its fetch, after the clear. The restore kept those
    records and moved its restore position past the cleared ones (found by review)."""
    topic = per_record_topic(kafka, "paused")
    taken = asyncio.run(offsets_after_a_pause_during_a_delivery(kafka, topic, str(tmp_path / "state")))
    assert taken == [2], "only the record queued before the pause"


async def fetch_attempts_while_flow_is_stopped(broker: str, topic: str, state_dir: str) -> int:
    """Stop flow for half a second, as a rebalance does, and count the fetches begun meanwhile."""
    deliveries = Deliveries()
    app = app_delivering_to(broker, topic, state_dir, deliveries.handler)
    await app.start()
    try:
        await deliveries.until(FEW)
        consumer = app.consumer
        fetch = consumer._fetch_and_deliver  # noqa: SLF001  # counted, as the seam calls it
        attempts = 0

        async def counted() -> None:
            nonlocal attempts
            attempts += 1
            await fetch()

        consumer._fetch_and_deliver = counted  # noqa: SLF001
        consumer.stop_flow()
        await asyncio.sleep(0.5)
        consumer.resume_flow()
        return attempts
    finally:
        await app.stop()


def test_a_stopped_flow_is_waited_for_not_polled(kafka, tmp_path):
    """While flow was stopped (every rebalance, until its recovery resumes it), the delivery loop
    started a fetch, had it cancelled at once by the stop it raced against, and started the next:
    a core spent spinning for the length of each rebalance (found by review)."""
    topic = f"stopped-flow-{uuid.uuid4().hex[:12]}"
    ensure_topic(kafka, topic, 1)
    _produce(kafka, topic, partitions=1, records=FEW)
    attempts = asyncio.run(fetch_attempts_while_flow_is_stopped(kafka, topic, str(tmp_path / "state")))
    assert attempts <= 1, f"{attempts} fetches begun in half a second of stopped flow"


async def offsets_through_a_pause_and_resume_during_a_delivery(broker: str, topic: str, state_dir: str) -> list[int]:
    """Pause the partition while the rest of its fetch waits for room in the queue, then resume
    it (as a rebalance pauses every assigned partition and its recovery resumes the changelogs);
    return every offset taken."""
    app, other = app_reading_per_record(broker, topic, state_dir)
    await app.start()
    try:
        taken = [(await asyncio.wait_for(other.get(), TIMEOUT_S)).message.offset for _ in range(2)]
        await asyncio.sleep(0.5)  # record 2 is in the queue of one, the rest of the fetch waits
        app.consumer.pause_partitions({TP(topic, 0)})
        taken.append((await asyncio.wait_for(other.get(), TIMEOUT_S)).message.offset)
        await asyncio.sleep(0.5)
        app.consumer.resume_partitions({TP(topic, 0)})
        return taken + await offsets_until_quiet(other)
    finally:
        await app.stop()


def test_a_partition_paused_and_resumed_during_its_delivery_gets_every_record_once(kafka, tmp_path):
    """Stopping at a paused partition dropped the rest of its fetch without a seek: once resumed,
    the partition went on after them, and a recovery waited forever for a restore's last records
    (found by scripts/drill_pauses.py on the first fix for a paused partition)."""
    topic = per_record_topic(kafka, "pause-resume")
    taken = asyncio.run(offsets_through_a_pause_and_resume_during_a_delivery(kafka, topic, str(tmp_path / "state")))
    assert taken == list(range(FEW))


async def offsets_after_a_flow_stop_overtakes_a_fetch(broker: str, topic: str, state_dir: str) -> list[int]:
    """Hold the first fetch that brings records until flow has stopped and resumed (a rebalance
    that overtakes a fetch on Faust's consumer thread), then let it return; every offset taken."""
    app, other = app_reading_per_record(broker, topic, state_dir)
    consumer = app.consumer
    fetch = consumer._wait_next_records  # noqa: SLF001  # held, as a slow thread would
    fetched, released = asyncio.Event(), asyncio.Event()

    async def held(timeout: float) -> tuple:
        records, active = await fetch(timeout)
        if records and not fetched.is_set():
            fetched.set()
            await released.wait()
        return records, active

    consumer._wait_next_records = held  # noqa: SLF001
    await app.start()
    try:
        await asyncio.get_running_loop().run_in_executor(None, _produce, broker, topic, 1, FEW)
        await asyncio.wait_for(fetched.wait(), TIMEOUT_S)
        consumer.stop_flow()  # cancels the delivery waiting for the fetch
        await asyncio.sleep(0.2)
        consumer.resume_flow()
        released.set()
        return await offsets_until_quiet(other)
    finally:
        await app.stop()


def test_a_fetch_a_flow_stop_overtook_is_delivered_not_lost(kafka, tmp_path):
    """A rebalance cancelled the delivery waiting for a fetch, and the fetch with it; the fetch
    went on on Faust's consumer thread, took the records off aiokafka's position, and its result
    was thrown away: a changelog partition its recovery had just sought and resumed lost them,
    so a restore skipped them, or waited forever when they were its last (helper-35's review)."""
    topic = per_record_topic(kafka, "overtaken", records=0)
    taken = asyncio.run(offsets_after_a_flow_stop_overtakes_a_fetch(kafka, topic, str(tmp_path / "state")))
    assert taken == list(range(FEW))


class CommittedOffsets:
    """What the seek to committed offsets reads of aiokafka's consumer: its assignment and each
    partition's committed offset, answered after `delays[partition]` seconds, or refused."""

    def __init__(self, delays: dict[int, float], refused: int) -> None:
        self.delays, self.refused, self.sought = delays, refused, []

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", partition) for partition in self.delays}

    async def committed(self, tp: TopicPartition) -> int:
        await asyncio.sleep(self.delays[tp.partition])
        if tp.partition == self.refused:
            raise RuntimeError(f"partition {tp.partition}: the coordinator did not answer")
        return 7


def test_a_seek_to_committed_that_fails_seeks_nothing_afterwards():
    """All partitions' offsets are asked for at once; the first failure ends the seek, as the
    loop one partition after another did: a question still out is cancelled, and its partition
    is not sought after the seek has failed."""
    consumer = CommittedOffsets({0: 0.0, 1: 0.05, 2: 0.3}, refused=1)
    seeker = type("Seeker", (), {"_seek_counted": lambda self, c, tp, offset: c.sought.append(tp.partition)})()

    async def seek_then_wait() -> None:
        with pytest.raises(RuntimeError, match="partition 1"):
            await KappaConsumerThread._seek_each_to_committed(seeker, consumer)  # noqa: SLF001
        await asyncio.sleep(0.5)  # past the slow partition's answer

    asyncio.run(seek_then_wait())
    assert consumer.sought == [0]
