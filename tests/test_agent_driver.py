"""The agent's durability order, checked step by step without a broker (tests/driver.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import orjson
import pyarrow.parquet as pq
import pytest
from faust.types import TP

import agents.grouped_mean as agent_module
import kappa.lifecycle.process as process_module
from kappa.engine.faust_internals import is_open, partition_db
from kappa.lifecycle.process import PartWriter
from kappa.pipeline import Definition, Delivered
from kappa.snapshots import parts
from tables.aggregate import Mean
from tables.grouped_mean import STATS_KEY, RecordsLost, partition_batches
from tables.transaction import TransactionError
from tests.driver import AgentDriver, ParsedRecord

DEFINITION = Definition(topic="trips", value_fields=("fare",), key_fields=("city",))
MEAN = Mean()


@pytest.fixture
def make_driver(tmp_path, monkeypatch):
    made: list[AgentDriver] = []

    def make(
        partitions: int = 1, batch_capacity: int = 4, stop_at: dict[int, int] | None = None, directory=None
    ) -> AgentDriver:
        made.append(AgentDriver(directory or tmp_path, DEFINITION, partitions, monkeypatch, batch_capacity, stop_at))
        return made[-1]

    yield make
    for driver in made:
        driver.close()


def records(first: int, count: int, keys: int = 6) -> list[ParsedRecord]:
    return [
        ParsedRecord(offset, b"m", orjson.dumps({"city": f"c{offset % keys}", "fare": offset}))
        for offset in range(first, first + count)
    ]


def table_sums(driver: AgentDriver, partition: int) -> dict[bytes, tuple[int, float]]:
    found = {}
    for key, raw in driver.entries(partition).items():
        [state] = MEAN.decode(raw)
        found[key] = (state.count, state.sum)
    return found


def expected_sums(count: int, keys: int = 6) -> dict[bytes, tuple[int, float]]:
    found: dict[bytes, tuple[int, float]] = {}
    for offset in range(count):
        key = f"c{offset % keys}".encode()
        n, total = found.get(key, (0, 0.0))
        found[key] = (n + 1, total + offset)
    return found


def test_a_batch_reaches_table_changelog_and_commit_in_order(make_driver):
    driver = make_driver(partitions=2)
    driver.feed(0, records(0, 20))
    assert table_sums(driver, 0) == expected_sums(20)
    assert driver.stats(0).counted == 20 and driver.stats(0).next_offset == 20
    # the changelog holds exactly what the table holds: every entry and the stats entry
    assert dict(driver.producer.changelog[0]) == {**driver.entries(0), **{k: v for k, v in driver.producer.changelog[0]
                                                                       if k not in driver.entries(0)}}  # fmt: skip
    assert driver.commits == [{TP("trips", 0): 20}], "the committed offset is the table's next offset"


def test_a_cancel_between_two_record_batches_leaves_the_table_behind_never_ahead(make_driver):
    driver = make_driver(batch_capacity=3)
    driver.feed(0, records(0, 12))
    before = table_sums(driver, 0)
    driver.producer.cancel_at = driver.producer.sends + 2  # the second record batch of the next write
    with pytest.raises(asyncio.CancelledError):
        driver.feed(0, records(12, 12))
    # the changelog got the first record batch; the local table got nothing of this batch
    assert table_sums(driver, 0) == before
    assert driver.stats(0).next_offset == 12
    assert len(driver.commits) == 1, "nothing of the cancelled batch was committed"
    # the partition moves: restored from its changelog, then the batch is delivered again
    driver.restore_from_changelog(0)
    driver.producer.cancel_at = None
    driver.feed(0, records(12, 12))
    assert table_sums(driver, 0) == expected_sums(24), "restored and re-applied: nothing lost or counted twice"
    assert driver.stats(0).counted == 24
    assert driver.commits[-1] == {TP("trips", 0): 24}


def test_a_redelivered_batch_is_a_no_op_and_a_resume_continues_exactly(make_driver):
    driver = make_driver()
    driver.feed(0, records(0, 10))
    driver.feed(0, records(0, 10))  # the same records again (a commit that was lost)
    assert table_sums(driver, 0) == expected_sums(10) and driver.stats(0).counted == 10
    driver.feed(0, records(5, 10))  # overlapping: 5..9 were applied, 10..14 are new
    assert table_sums(driver, 0) == expected_sums(15) and driver.stats(0).counted == 15


def test_a_consumer_ahead_of_the_table_is_rewound(make_driver):
    driver = make_driver()
    driver.feed(0, records(0, 10))
    driver.feed(0, records(20, 5))  # 10..19 were never applied: seek back, drop these
    assert driver.consumer.seeks == [(TP("trips", 0), 10)]
    assert driver.stats(0).next_offset == 10
    driver.feed(0, records(10, 15))  # the re-delivery from the table's offset
    assert table_sums(driver, 0) == expected_sums(25)


def test_an_empty_partition_is_rewound_to_the_log_start_not_resumed_ahead_of_it(make_driver):
    """Seen in a 4-process replay: a rebalance raced a commit, and a partition whose table held
    nothing was fetched from offset 100,000; its first 100,000 records were lost with exit 0."""
    driver = make_driver()
    driver.feed(0, records(20, 5))  # nothing applied yet, and the log starts at 0
    assert driver.consumer.seeks == [(TP("trips", 0), 0)]
    assert driver.stats(0).next_offset == 0 and table_sums(driver, 0) == {}
    driver.feed(0, records(0, 25))  # the re-delivery from the log's start
    assert table_sums(driver, 0) == expected_sums(25) and driver.stats(0).counted == 25


def test_a_batch_that_a_rebalance_overtook_is_not_committed(make_driver):
    """The new assignment commits what its restored tables hold; a commit of the old batch after
    that would move the group's offset ahead of them."""
    driver = make_driver()
    driver.feed(0, records(0, 10))
    driver.producer.rebalance_at = driver.producer.sends + 1
    driver.feed(0, records(10, 10))
    assert driver.commits == [{TP("trips", 0): 10}], "only the batch before the rebalance was committed"
    assert driver.stats(0).next_offset == 20, "the table keeps what it applied; resuming goes by it"


def test_an_empty_partition_starts_where_retention_left_the_log(make_driver):
    driver = make_driver()
    driver.consumer.log_starts[TP("trips", 0)] = 20
    driver.feed(0, records(20, 5))
    assert driver.consumer.seeks == [] and driver.stats(0).counted == 5


def test_the_transaction_refuses_steps_out_of_order(make_driver):
    from tables.transaction import BatchTransaction

    driver = make_driver()

    async def scenario() -> None:
        transaction = BatchTransaction(driver.agent.writer, lambda: asyncio.sleep(0))
        with pytest.raises(TransactionError):
            transaction.committable()  # not durable yet
        await transaction.make_durable()
        with pytest.raises(TransactionError):
            await transaction.write(0, {b"k": b"v"}, 1)  # after the flush began

    driver.loop.run_until_complete(scenario())


def test_the_batch_that_reaches_the_stop_offsets_tells_the_replay_once_it_is_durable(make_driver):
    """A replay publishes as soon as its last batch is on the changelog and committed, not at
    its next timer tick; and only once."""
    driver = make_driver(partitions=2)
    driver.progress.stop_at = {0: 20, 1: 10}
    told: list[tuple[int, list]] = []
    driver.progress.on_reached = lambda: told.append((driver.stats(1).next_offset, list(driver.commits)))
    driver.feed(0, records(0, 20))
    assert told == [], "partition 1 has not reached its stop offset"
    driver.feed(1, records(0, 10))
    assert len(told) == 1
    next_offset, commits = told[0]
    assert next_offset == 10 and commits[-1] == {TP("trips", 1): 10}
    assert driver.producer.changelog[1], "the last batch is on the changelog before the replay is told"
    driver.feed(1, records(10, 5))
    assert len(told) == 1, "told once"


def changelog_keys(driver: AgentDriver, partition: int) -> list[bytes]:
    return [key for key, _ in driver.producer.changelog.get(partition, [])]


def test_a_batch_replay_writes_each_group_once_when_it_holds_every_partition_to_its_stop(make_driver):
    """The write-back cache (tables.cache): nothing is written, reported or committed before
    the flush, and the flush writes each group once, however many deliveries touched it."""
    driver = make_driver(partitions=2, stop_at={0: 40, 1: 12})
    told: list[int] = []
    driver.progress.on_reached = lambda: told.append(driver.stats(0).next_offset)
    driver.feed(0, records(0, 20))
    driver.feed(0, records(20, 20))
    driver.feed(1, records(0, 6))
    assert driver.entries(0) == {} and driver.stats(0).next_offset == 0, "nothing durable before the flush"
    assert driver.producer.changelog == {} and driver.commits == [] and driver.progress.next_offsets == {}
    # what the progress line shows: a batch replay's stayed at 0% until the flush at its end
    assert driver.progress.folded_offsets == {0: 40, 1: 6}
    driver.feed(1, records(6, 6))  # every partition now reaches its stop offset
    assert table_sums(driver, 0) == expected_sums(40) and table_sums(driver, 1) == expected_sums(12)
    assert driver.stats(0).counted == 40 and driver.stats(1).counted == 12
    assert sorted(changelog_keys(driver, 0)) == sorted([*expected_sums(40), STATS_KEY]), "each group written once"
    assert driver.commits[-1] == {TP("trips", 0): 40, TP("trips", 1): 12}
    assert told == [40]


def test_a_full_cache_is_written_before_the_stop(make_driver, monkeypatch):
    monkeypatch.setattr(agent_module, "CACHE_LIMIT_BYTES", 1)
    driver = make_driver(partitions=1, stop_at={0: 40})
    driver.feed(0, records(0, 20))
    assert table_sums(driver, 0) == expected_sums(20) and driver.commits[-1] == {TP("trips", 0): 20}
    driver.feed(0, records(20, 20))
    assert table_sums(driver, 0) == expected_sums(40) and driver.stats(0).counted == 40


def test_a_rebalance_drops_what_the_cache_held_and_the_redelivery_counts_it_once(make_driver):
    """After a rebalance Faust seeks to what the table holds: the records the cache held come
    again, and are applied to the table's state, once."""
    driver = make_driver(partitions=1, stop_at={0: 40})
    driver.feed(0, records(0, 20))
    assert len(driver.agent.cache) > 0
    driver.app.consumer_generation_id += 1
    driver.feed(0, records(driver.stats(0).next_offset, 40))
    assert table_sums(driver, 0) == expected_sums(40) and driver.stats(0).counted == 40
    assert len(driver.agent.cache) == 0


def test_an_old_cache_is_written_so_a_long_replay_shows_progress(make_driver, monkeypatch):
    monkeypatch.setattr(agent_module, "CACHE_MAX_AGE_S", 0.0)
    driver = make_driver(partitions=2, stop_at={0: 40, 1: 40})
    driver.feed(0, records(0, 20))
    assert driver.progress.next_offsets == {0: 20} and table_sums(driver, 0) == expected_sums(20)


def test_a_cache_that_a_stalled_fetch_left_old_is_written_and_committed_by_the_timer(make_driver):
    """A broker quota can hold the next fetch back for 10 s: what the cache held was neither
    durable nor committed until then, so progress looked stuck and a stop lost it."""
    driver = make_driver(partitions=2, stop_at={0: 40, 1: 40})
    driver.feed(0, records(0, 20))
    driver.tick()
    assert 0 not in driver.progress.next_offsets and table_sums(driver, 0) == {}, "not old yet"
    driver.agent.cache.max_age_s = 0.0
    driver.tick()
    assert driver.progress.next_offsets == {0: 20} and table_sums(driver, 0) == expected_sums(20)
    assert driver.commits[-1] == {TP("trips", 0): 20}
    driver.feed(0, records(20, 20))
    assert table_sums(driver, 0) == expected_sums(40) and driver.stats(0).counted == 40


@pytest.mark.parametrize("moment", ["after a rebalance", "while flow is stopped"])
def test_the_timer_never_writes_a_cache_of_an_earlier_generation_nor_while_flow_is_stopped(make_driver, moment):
    driver = make_driver(partitions=2, stop_at={0: 40, 1: 40})
    driver.feed(0, records(0, 20))
    driver.agent.cache.max_age_s = 0.0
    if moment == "after a rebalance":
        driver.app.consumer_generation_id += 1
    else:
        driver.consumer.flow_active = False
    driver.tick()
    assert table_sums(driver, 0) == {} and driver.commits == [] and len(driver.agent.cache) > 0


def test_a_reject_sent_before_a_rebalance_dropped_the_cache_is_not_sent_again(make_driver):
    driver = make_driver(partitions=1, stop_at={0: 40})
    batch = records(0, 20)
    batch[5] = ParsedRecord(5, b"m", b"not json")
    driver.feed(0, batch)
    assert [message["headers"] for message in driver.dead.sent] and len(driver.dead.sent) == 1
    driver.app.consumer_generation_id += 1  # the cache is dropped: offsets 0..19 come again
    driver.feed(0, [*batch, *records(20, 20)])
    assert len(driver.dead.sent) == 1, "one dead letter per rejected record"
    assert driver.stats(0).rejected == 1 and driver.stats(0).counted == 39


def test_markers_after_the_last_record_take_the_partition_to_its_end_offset(make_driver):
    """A transactional producer's log ends each partition with a commit marker: an offset that
    holds no record. A replay to that end offset reaches it by what was read, not by the last record."""
    driver = make_driver(partitions=2, stop_at={0: 21, 1: 12})
    told: list[dict[int, int]] = []
    driver.progress.on_reached = lambda: told.append(dict(driver.progress.next_offsets))
    driver.feed(0, Delivered(records(0, 20), 0, 21))  # the marker at 20 came in the same fetch
    driver.feed(1, Delivered(records(0, 11), 0, 11))
    assert told == []
    driver.feed(1, Delivered([], 15, 16))  # markers that do not follow what the table holds are not passed
    assert told == [], "passed markers beyond a gap"
    driver.feed(1, Delivered([], 11, 12))  # the marker alone, in a later fetch
    assert told == [{0: 21, 1: 12}]
    assert driver.stats(0).next_offset == 21 and driver.stats(1).next_offset == 12
    assert table_sums(driver, 0) == expected_sums(20) and driver.stats(0).counted == 20


def test_a_delivery_read_past_the_stop_offset_moves_the_partition_to_the_stop_only(make_driver):
    """Records at or past a replay's stop are not folded, so its next offset must not pass them:
    a worker that later continues the generation resumes from there."""
    driver = make_driver(partitions=1, stop_at={0: 10})
    driver.feed(0, Delivered(records(0, 20), 0, 20))
    assert driver.stats(0).next_offset == 10 and driver.stats(0).counted == 10
    assert table_sums(driver, 0) == expected_sums(10)


def test_a_delivery_that_starts_with_a_marker_follows_on_and_is_applied_not_rewound(make_driver):
    """The marker at offset 20 ends the first delivery's transaction; the second delivery read
    from 20, and its first record is 21. It follows what the table holds: no seek, no record dropped."""
    driver = make_driver(partitions=1)
    driver.feed(0, Delivered(records(0, 20), 0, 20))
    later = records(21, 20)
    driver.feed(0, Delivered(later, 20, 41))
    assert driver.consumer.seeks == []
    assert driver.stats(0).next_offset == 41 and driver.stats(0).counted == 40
    expected = expected_sums(20)
    for record in later:
        key, value = orjson.loads(record.value)["city"].encode(), orjson.loads(record.value)["fare"]
        count, total = expected.get(key, (0, 0.0))
        expected[key] = (count + 1, total + value)
    assert table_sums(driver, 0) == expected


def test_a_stop_while_the_cache_is_written_never_leaves_the_changelog_with_stats_ahead_of_groups(make_driver):
    """The cache kept the stats entry where the first delivery put it, before the groups later
    deliveries added. A stop between two changelog record batches then left a changelog whose
    stats said every record was applied while groups were missing: a batch replay stopped with
    Ctrl-C and run again lost about 5% of 1M records, with exit 0 and all said counted."""
    driver = make_driver(partitions=1, batch_capacity=3, stop_at={0: 20})
    driver.feed(0, records(0, 2))  # c0 and c1, then the stats entry
    driver.producer.cancel_at = driver.producer.sends + 2  # the flush's second record batch
    with pytest.raises(asyncio.CancelledError):
        driver.feed(0, records(2, 18))  # c2..c5 are new, and the partition reaches its stop: the flush
    # the replay runs again: each partition restored from its changelog, read from what its stats say
    driver.restore_from_changelog(0)
    driver.producer.cancel_at = None
    resumed_from = driver.stats(0).next_offset
    driver.feed(0, records(resumed_from, 20 - resumed_from))
    assert table_sums(driver, 0) == expected_sums(20) and driver.stats(0).counted == 20
    assert changelog_keys(driver, 0)[-1] == STATS_KEY


def test_a_stop_while_the_broker_has_not_acknowledged_leaves_the_local_table_behind_never_ahead(make_driver):
    """RocksDB was written once the changelog records were queued, before the broker had them.
    A stop then (kill -9, Ctrl-C in an outage) left local entries the changelog never got: the
    process went on from its local stats, so those groups never reached the changelog, and a
    process that restored the partition from it lost their records (found by review)."""
    driver = make_driver()
    driver.feed(0, records(0, 12))
    driver.producer.unacknowledged = True
    with pytest.raises(asyncio.TimeoutError):
        driver.feed_then_stop(0, records(12, 3))  # c0..c2 once more: queued, never on the broker
    assert driver.stats(0).next_offset == 12, "the local table stays where the changelog is"
    driver.producer.unacknowledged = False
    resumed_from = driver.stats(0).next_offset
    driver.feed(0, records(resumed_from, 18 - resumed_from))
    driver.restore_from_changelog(0)  # another process takes the partition over
    assert table_sums(driver, 0) == expected_sums(18) and driver.stats(0).counted == 18


def test_a_record_batch_that_fails_while_a_later_one_lands_never_leaves_stats_ahead(make_driver):
    """The producer is not idempotent: a record batch can fail (expire) while the next one,
    queued already, lands. The stats entry is therefore sent only once the groups are on the broker."""
    driver = make_driver(batch_capacity=3)
    driver.feed(0, records(0, 12))
    driver.producer.fail_at = driver.producer.sends + 1  # the next write's first record batch
    with pytest.raises(RuntimeError, match="expired"):
        driver.feed(0, records(12, 12))
    driver.producer.fail_at = None
    driver.restore_from_changelog(0)  # the process failed; another restores the partition
    resumed_from = driver.stats(0).next_offset
    driver.feed(0, records(resumed_from, 24 - resumed_from))
    assert table_sums(driver, 0) == expected_sums(24) and driver.stats(0).counted == 24


def test_a_partition_revoked_while_the_broker_acknowledges_is_not_reopened_to_store_the_batch(make_driver):
    """The batch is stored locally once the broker has it; a rebalance may have closed the
    partition's database meanwhile, and reopening it here would hold a database Faust closed
    (its next owner restores the batch from the changelog)."""
    driver = make_driver()
    driver.feed(0, records(0, 6))
    changelog = TP(driver.table.changelog_topic.get_topic_name(), 0)
    driver.producer.on_send = lambda _: driver.table.data.revoke_partitions(driver.table, {changelog})
    driver.feed(0, records(6, 6))
    assert not is_open(driver.table, 0), "a revoked partition's database stays closed"
    assert changelog_keys(driver, 0)[-1] == STATS_KEY, "the broker has the whole batch"


def test_no_part_is_written_from_a_partition_faust_is_still_restoring(make_driver, tmp_path):
    """A new live pipeline's 2 processes published a first snapshot whose table held every record
    while its manifest said none were counted (found by helper-23, 5 runs in 9). The process
    applied a batch, a rebalance closed the partition's database before it was stored, and Faust
    restored it from the changelog; the parts timer fired between the group entries and the stats
    entry, so the part held the groups at offset 0. A part is an exact image or is not written."""
    driver = make_driver(partitions=1)
    driver.feed(0, records(0, 20))
    writer = part_writer(driver, tmp_path)
    assert driver.progress.dirty == {0}
    # the partition moved back: Faust restores it from the changelog, all but its last record so far
    driver.restore_from_changelog(0, records=len(driver.producer.changelog[0]) - 1)
    assert driver.app.in_recovery and driver.stats(0).next_offset == 0 and driver.entries(0)
    writer.tick()
    assert parts.newest_parts(tmp_path / "parts") == {}, "a part was written from a half-restored partition"
    assert driver.progress.dirty == {0}, "the partition must be written once it is restored"
    driver.restore_from_changelog(0, records=1)  # the stats entry: recovery ends
    writer.tick()
    offset, path = parts.newest_parts(tmp_path / "parts")[0]
    assert offset == 20 and driver.progress.dirty == set()


def part_writer(driver: AgentDriver, directory) -> PartWriter:
    """The worker's parts writer over the driver's table, owning partition 0, writing at every tick."""
    driver.consumer.assigned = {TP("trips", 0)}
    pipe = SimpleNamespace(definition=DEFINITION, progress=driver.progress, table=driver.table, app=driver.app)
    return PartWriter(pipe, directory / "parts", directory / "heartbeat.json", interval=0.0)


def part_counts(path) -> tuple[dict, list[int]]:
    """A part's metadata and its groups' counts."""
    table = pq.read_table(path)
    return json.loads(table.schema.metadata[b"kappa"]), sorted(table.column("count").to_pylist())


def test_no_part_is_written_from_groups_restored_ahead_of_their_stats(make_driver, tmp_path):
    """A stop between a batch's groups and its stats entry is allowed (the groups skip re-delivered
    records by their own offsets), so a partition restored from its changelog can hold groups ahead
    of its stats after the restore has ended. A part written then held 30 records' groups under
    metadata that counted 20, and replaced the exact part of that name (found by review)."""
    driver = make_driver(partitions=1)
    driver.feed(0, records(0, 20))
    writer = part_writer(driver, tmp_path)
    writer.tick()
    exact, _ = parts.newest_parts(tmp_path / "parts")[0]
    before = part_counts(parts.newest_parts(tmp_path / "parts")[0][1])
    assert before[0]["next_offset"] == 20 and sum(before[1]) == 20
    driver.producer.cancel_at = driver.producer.sends + 3  # the groups' two record batches land, the stats never
    with pytest.raises(asyncio.CancelledError):
        driver.feed(0, records(20, 10))
    driver.restore_from_changelog(0)  # the partition moved, or was restored again: the restore ends
    assert not driver.app.in_recovery and driver.stats(0).next_offset == 20
    driver.progress.dirty.add(0)  # a restore marks every assigned partition
    writer.tick()
    assert part_counts(parts.newest_parts(tmp_path / "parts")[0][1]) == before, "a part counts what it holds"
    assert driver.progress.dirty == {0}
    driver.feed(0, records(20, 10))  # delivered again: the stats entry catches up with its groups
    writer.tick()
    meta, counts = part_counts(parts.newest_parts(tmp_path / "parts")[0][1])
    assert meta["next_offset"] == 30 and meta["records"]["counted"] == sum(counts) == 30


def test_no_part_is_written_from_a_table_whose_groups_lost_records(make_driver, tmp_path, monkeypatch, caplog):
    """A restore that skipped most of a changelog partition (F1) left groups holding fewer records
    than the stats entry counts; the agent went on on top of them, and the parts published a
    table short of 40 records under manifests that counted them. A part is an exact image or is
    not written, and a partition that stays so is reported."""
    driver = make_driver(partitions=1)
    driver.feed(0, records(0, 20))
    writer = part_writer(driver, tmp_path)
    writer.tick()
    assert parts.newest_parts(tmp_path / "parts")[0][0] == 20
    assert sum(sum(batch.column("count").to_pylist()) for batch in partition_batches(driver.table, 0)) == 20
    db = partition_db(driver.table, 0)
    del db[next(key for key in driver.entries(0))]  # a group the restore never read
    driver.feed(0, records(20, 20))
    monkeypatch.setattr(process_module, "NOT_EXACT_REPORT_S", 0.0)
    with caplog.at_level(logging.ERROR, logger=process_module.log.name):
        writer.tick()
        writer.tick()
    assert parts.newest_parts(tmp_path / "parts")[0][0] == 20, "a part short of records was written"
    assert driver.progress.dirty == {0}
    assert [r.getMessage().count("its state is damaged") for r in caplog.records] == [1], "said once"
    with pytest.raises(RecordsLost, match="holds 3[0-9] records in its groups where its stats entry counts 40"):
        list(partition_batches(driver.table, 0))  # a batch replay's final snapshot is not published


def test_groups_ahead_of_their_stats_whose_records_retention_removed_are_still_published(
    make_driver, monkeypatch, tmp_path
):
    """Groups restored ahead of their stats, whose records retention removed before they came
    again: the agent accepts the hole, and the table holds more records than its stats count,
    for good. The check for records lost must not refuse that partition forever (found by review)."""
    driver = make_driver(partitions=1)
    driver.feed(0, records(0, 20))
    stats_at_20 = partition_db(driver.table, 0)[STATS_KEY]
    driver.feed(0, records(20, 20))
    partition_db(driver.table, 0)[STATS_KEY] = stats_at_20  # a stop between the groups and the stats
    driver.consumer.log_starts[TP("trips", 0)] = 40  # down past the topic's retention
    monkeypatch.setattr(agent_module, "REWIND_PATIENCE_S", 0.0)
    driver.feed(0, records(40, 20))  # seeks back to 20: nothing is there
    driver.feed(0, records(40, 20))  # the hole is accepted
    assert driver.stats(0).counted == 40 and sum(count for count, _ in table_sums(driver, 0).values()) == 60
    writer = part_writer(driver, tmp_path)
    writer.tick()
    assert parts.newest_parts(tmp_path / "parts")[0][0] == 60
    assert sum(sum(batch.column("count").to_pylist()) for batch in partition_batches(driver.table, 0)) == 60


def test_changelog_records_of_a_partition_the_recovery_is_not_restoring_are_not_applied(make_driver, tmp_path):
    """Faust's recovery hands a changelog record of a partition it no longer restores (fetched
    before a rebalance) to the table anyway: applied, it wrote that partition's database and
    saved a restore position there, and the partition's next restore started past records it
    had never read (F1, found by helper-31's reproduction)."""
    a = make_driver(partitions=1)
    a.feed(0, records(0, 20))
    b = make_driver(partitions=1, directory=tmp_path / "b")
    b.producer.changelog = a.producer.changelog
    b.restore_through_faust(0, restoring=False)
    assert b.persisted_offset(0) is None and b.entries(0) == {}
    b.restore_through_faust(0)
    assert table_sums(b, 0) == expected_sums(20) and b.stats(0).counted == 20


def sums_of(offsets: list[int], keys: int = 6) -> dict[bytes, tuple[int, float]]:
    """The count and sum per key of the records at these offsets (see `records`)."""
    found: dict[bytes, tuple[int, float]] = {}
    for offset in offsets:
        key = f"c{offset % keys}".encode()
        n, total = found.get(key, (0, 0.0))
        found[key] = (n + 1, total + offset)
    return found


def test_a_process_paused_past_its_session_never_makes_the_table_lose_records(make_driver, tmp_path):
    """Process A is paused (SIGSTOP) past its session: B takes its partition over, restores it
    and goes on. A resumes and writes what it computed before the pause, after B's entries, and
    stored its changelog offset past them; B writes more. A then gets the partition back and
    restores from its stored offset: it skipped B's entries, and A's older ones won under B's
    newer stats. A live pipeline lost records in its final, complete snapshot (found by helper-25)."""
    a = make_driver(partitions=1)
    b = make_driver(partitions=1, directory=tmp_path / "b")
    b.producer.changelog = a.producer.changelog  # one changelog topic, two writers
    a.feed(0, records(0, 20))
    b.restore_through_faust(0)  # A is paused: B takes the partition over
    assert b.stats(0).next_offset == 20
    b.feed(0, records(20, 20))
    a.feed(0, records(20, 10))  # A resumes: its batch from before the pause lands after B's entries
    assert a.persisted_offset(0) < len(a.producer.changelog[0]) - 1, "A stored an offset past B's entries"
    later = [offset for offset in range(40, 60) if offset % 6 in (0, 1)]  # B goes on: keys c0 and c1 only
    b.feed(0, Delivered([record for record in records(40, 20) if record.offset in later], 40, 60))
    a.restore_through_faust(0)  # A gets the partition back
    assert a.stats(0).next_offset == b.stats(0).next_offset
    assert table_sums(a, 0) == sums_of([*range(40), *later]) == table_sums(b, 0)
    b.close()
