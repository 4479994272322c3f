"""The record rules: counted, skipped and rejected, with rejected records kept in <topic>.dlq."""

from __future__ import annotations

import math

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import NewPartitions

from kappa.kafka.admin import admin, client_config, delete_topics, ensure_topic, partition_count, watermarks
from kappa.kafka.reader import read_ranges
from tests.helpers import wait_until
from tests.oracle import read_latest

BIG = orjson.dumps({"v": 1, "pad": "x" * (1 << 20)})

# (key, value, verdict, key in table) as an outside producer might write them.
CASES = [
    (b"a", b"not json", "rejected"),
    (b"a", b"[1, 2]", "rejected"),
    (b"a", b'"a string"', "rejected"),
    (b"a", b"42", "rejected"),
    (b"a", b'{"v": "abc"}', "rejected"),
    (b"a", b'{"v": true}', "rejected"),
    (b"a", b'{"v": [1]}', "rejected"),
    (b"a", b'{"v": {}}', "rejected"),
    (b"\xff\xfe", b'{"v": 1}', "rejected"),
    (b"b", b"", "rejected"),
    (b"a", b'{"v": "3.5"}', "counted"),
    (b"a", b'{"v": NaN}', "skipped"),
    (b"a", b'{"v": -Infinity}', "skipped"),
    (b"a", b'{"v": null}', "skipped"),
    (None, b'{"v": 1}', "skipped"),
    (None, b'{"k": "c", "v": 2}', "skipped"),  # grouped by the message key: a row field does not stand in
    (b"b", b'{"v": 1e3}', "counted"),
    (b"d", b'{"k": "ignored", "v": 4}', "counted"),
    (b"big", BIG, "counted"),
]


def produce(broker: str, topic: str, cases) -> None:
    producer = Producer(client_config(broker, **{"message.max.bytes": 4 << 20, "partitioner": "consistent_random"}))
    for key, value, _ in cases:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def test_rejected_records_reach_the_dlq_and_counts_are_exact(kappa):
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 3)
    produce(kappa.broker, topic, CASES)
    kappa.run("replay", "--topic", topic, "--value", "v", "--batch")  # no --key: the message key groups

    verdicts = [verdict for _, _, verdict in CASES]
    csv_table, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["records"] == {kind: verdicts.count(kind) for kind in ("counted", "skipped", "rejected")}
    table = parquet_table.set_index("key")
    assert table.index.tolist() == ["a", "b", "big", "d"]
    assert table["count"].tolist() == [1, 1, 1, 1]
    assert table["sum"].tolist() == [3.5, 1000.0, 1.0, 4.0]
    assert csv_table["key"].tolist() == table.index.tolist()

    rejected = [(key, value) for key, value, verdict in CASES if verdict == "rejected"]
    dead = everything_in(kappa.broker, f"{topic}.dlq")
    assert len(dead) == len(rejected)
    assert sorted((m.key() or b"", m.value() or b"") for m in dead) == sorted((k or b"", v) for k, v in rejected)
    for message in dead:
        headers = {name: value.decode() for name, value in message.headers()}
        assert headers["kappa.source.topic"] == topic
        assert int(headers["kappa.source.partition"]) == message.partition()
        assert int(headers["kappa.source.offset"]) >= 0
        assert headers["kappa.error"]
    errors = {m.value(): dict(m.headers())["kappa.error"].decode() for m in dead}
    assert "not numeric" in errors[b'{"v": "abc"}']
    assert "UTF-8" in next(dict(m.headers())["kappa.error"].decode() for m in dead if m.key() == b"\xff\xfe")
    assert not math.isnan(table.loc["a", "mean"])


def everything_in(broker: str, topic: str) -> list:
    """Every message of `topic`, read up to each partition's end."""
    messages: list = []
    ends = watermarks(broker, topic, partition_count(broker, topic) or 0)
    read_ranges(broker, topic, ends, messages.append, group=f"check-{topic}")
    return messages


def test_a_replay_of_the_same_definition_does_not_dead_letter_twice(kappa):
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 3)
    rows = [
        (b"k", orjson.dumps({"city": f"c{i % 5}", "zone": i % 3, "v": "abc" if i % 10 == 0 else i}), "")
        for i in range(200)
    ]
    produce(kappa.broker, topic, rows)
    bad = sum(1 for i in range(200) if i % 10 == 0)

    kappa.replay_batch(topic, "v", "city")
    kappa.replay_batch(topic, "v", "city")
    _, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["generation"] == 2 and manifest["records"]["rejected"] == bad  # still counted in each
    dead = everything_in(kappa.broker, f"{topic}.dlq")
    assert len(dead) == bad, "the second replay of the same definition wrote its rejects again"
    headers = [{name: value.decode() for name, value in m.headers()} for m in dead]
    assert {h["kappa.pipeline"] for h in headers} == {topic}
    assert {h["kappa.generation"] for h in headers} == {"1"}

    kappa.replay_batch(topic, "v", "zone")  # another definition rejects them for itself
    assert len(everything_in(kappa.broker, f"{topic}.dlq")) == 2 * bad


def test_a_reject_longer_than_the_dead_letter_topic_takes_goes_without_its_value(kappa):
    """A reject over 1 MB failed the send (aiokafka's default cap on a record), and so the worker
    on every restart and the batch replay on every run; one longer than the dead-letter topic
    takes would fail at the broker. The first is copied whole now, the second without its value."""
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 1, {"max.message.bytes": str(4 << 20)})
    ensure_topic(kappa.broker, f"{topic}.dlq", 1, {"max.message.bytes": str(3 << 20)})
    over_a_megabyte = orjson.dumps({"v": "x" * (3 << 19)})  # 1.5 MB, not numeric
    too_long = orjson.dumps({"v": "y" * (7 << 19)})  # 3.5 MB, not numeric
    cases = [(b"a", over_a_megabyte, "rejected"), (b"a", too_long, "rejected"), (b"a", b'{"v": 5}', "counted")]
    produce(kappa.broker, topic, cases)
    kappa.run("replay", "--topic", topic, "--value", "v", "--batch")

    _, parquet_table, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["records"] == {"counted": 1, "skipped": 0, "rejected": 2}
    assert parquet_table["sum"].tolist() == [5.0]
    dead = everything_in(kappa.broker, f"{topic}.dlq")
    dead.sort(key=lambda message: int(dict(message.headers())["kappa.source.offset"]))
    assert [m.value() for m in dead] == [over_a_megabyte, None]
    headers = dict(dead[1].headers())
    assert headers["kappa.value.omitted"] == str(len(too_long)).encode()
    assert "not numeric" in headers["kappa.error"].decode()
    assert "kappa.value.omitted" not in dict(dead[0].headers())


def rows_with_rejects(count: int, every: int, seed: int) -> list:
    """Rows for `produce`: every `every`-th value is not numeric (a reject)."""
    return [
        (f"k{i % 7}".encode(), orjson.dumps({"city": f"c{(i + seed) % 5}", "v": "abc" if i % every == 0 else i}), "")
        for i in range(count)
    ]


def dead_letters_of(broker: str, topic: str, generation: int) -> list:
    dead = everything_in(broker, f"{topic}.dlq")
    return [m for m in dead if dict(m.headers())["kappa.generation"] == str(generation).encode()]


def test_a_replay_on_a_topic_made_again_dead_letters_each_of_its_rejects(kappa):
    """Rejects were written once per (definition, partition, offset), whatever the topic: on a
    topic made again, those at offsets the deleted topic's rejects had reached were left out."""
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 3)
    produce(kappa.broker, topic, rows_with_rejects(300, 3, seed=1))
    kappa.replay_batch(topic, "v", "city")
    delete_topics(kappa.broker, [topic])
    assert wait_until(lambda: partition_count(kappa.broker, topic) is None, 60)
    ensure_topic(kappa.broker, topic, 3)
    again = rows_with_rejects(300, 4, seed=2)
    produce(kappa.broker, topic, again)
    kappa.replay_batch(topic, "v", "city")

    _, _, manifest = read_latest(kappa.snapshot_dir, topic)
    rejects = sorted(value for _, value, _ in again if b'"abc"' in value)
    assert manifest["generation"] == 2 and manifest["records"]["rejected"] == len(rejects) == 75
    assert sorted(m.value() for m in dead_letters_of(kappa.broker, topic, 2)) == rejects


def test_rejects_from_a_partition_added_to_the_log_reach_the_dead_letter_topic(kappa):
    """The dead-letter topic kept the log's first partition count, so a reject from an added
    partition failed its send: a replay failed, and a live replay's process restarted forever."""
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 2)
    produce(kappa.broker, topic, rows_with_rejects(100, 5, seed=3))
    kappa.replay_batch(topic, "v", "city")
    admin(kappa.broker).create_partitions([NewPartitions(topic, 3)])[topic].result(timeout=30)
    producer = Producer(client_config(kappa.broker))
    for key, value, _ in rows_with_rejects(40, 2, seed=4):
        producer.produce(topic, value, key, partition=2)
    assert producer.flush(30) == 0

    kappa.replay_batch(topic, "v", "city")
    _, _, manifest = read_latest(kappa.snapshot_dir, topic)
    assert manifest["records"]["rejected"] == 20 + 20
    assert partition_count(kappa.broker, f"{topic}.dlq") == 3
    added = [m for m in dead_letters_of(kappa.broker, topic, 2) if dict(m.headers())["kappa.source.partition"] == b"2"]
    assert len(added) == 20 and {m.partition() for m in added} == {2}
