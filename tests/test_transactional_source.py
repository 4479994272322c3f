"""A log written by a transactional producer (Kafka Streams with exactly-once, Flink, any
`transactional.id`): each partition ends with a commit marker, an offset that holds no record,
and aborted transactions leave records that were never committed."""

from __future__ import annotations

import orjson
import pandas as pd
from confluent_kafka import Producer

from kappa.kafka.admin import client_config, ensure_topic, watermarks
from tests.datagen import pandas_expectation, sample_frame
from tests.oracle import assert_matches, read_latest


def produce_in_transactions(broker: str, topic: str, frame: pd.DataFrame, transactions: int) -> None:
    """The rows in `transactions` committed transactions, with an aborted one between each two
    (the same rows again, with other amounts): a reader that counts aborted records is wrong.

    Each transaction has a producer of its own: Kafka 4.1 now and then refused one producer's
    abort right after its commit (INVALID_TXN_STATE, fatal to that producer)."""
    rows = frame.to_dict("records")
    size = -(-len(rows) // transactions)
    failures: list = []
    for start in range(0, len(rows), size):
        for aborted in (False, True) if start + size < len(rows) else (False,):
            producer = Producer(
                client_config(broker, **{"transactional.id": f"{topic}-{start}-{aborted}", "partitioner": "murmur2"})
            )
            producer.init_transactions(30)
            producer.begin_transaction()
            for row in rows[start : start + size]:
                key = row["city"].encode() if isinstance(row["city"], str) else None
                value = {**row, "amount": 1e6} if aborted else row
                producer.produce(
                    topic,
                    orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY),
                    key,
                    on_delivery=lambda error, _message: error is not None and failures.append(error),
                )
            assert producer.flush(30) == 0  # on the log before an abort, which would drop what is queued
            assert failures == []
            if aborted:
                producer.abort_transaction(30)
            else:
                producer.commit_transaction(30)


def test_a_batch_replay_of_a_transactional_log_finishes_with_the_committed_records_only(kappa, tmp_path):
    topic = kappa.topic()
    partitions = 3
    ensure_topic(kappa.broker, topic, partitions)
    frame = sample_frame(3_000, 40)
    frame.to_csv(tmp_path / "rows.csv", index=False)
    produce_in_transactions(kappa.broker, topic, frame, transactions=3)
    ends = watermarks(kappa.broker, topic, partitions)
    aborted = len(frame) - len(frame) // 3 - 1  # every transaction but the last is followed by an aborted copy
    assert sum(high for _, high in ends.values()) > len(frame) + aborted, "aborted records and markers on the log"

    kappa.replay_batch(topic, "amount", "city", "--timeout", "120", timeout=180)

    table, _, manifest = read_latest(kappa.snapshot_dir, topic)
    expected = pandas_expectation(str(tmp_path / "rows.csv"), "city", "amount")
    counted = int(expected["count"].sum())
    assert manifest["records"] == {"counted": counted, "skipped": len(frame) - counted, "rejected": 0}
    assert_matches(table, expected)
