"""`kappa load`: put a file's rows on the log, one message per row, as fast as Kafka takes them.

Rows are read in chunks (bounded memory), turned into JSON objects with orjson (NaN becomes
null), and produced through librdkafka with large lz4 batches and idempotence on, so a
retried batch is never written twice. The message key is the row's key field as UTF-8,
partitioned with murmur2 as the Java client and Faust do.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson
import pandas as pd
from confluent_kafka import KafkaException, Producer

from kappa import admin
from kappa.config import Settings
from kappa.errors import KappaError
from kappa.progress import ProgressLine

CHUNK_ROWS = 100_000
ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
Message = tuple[bytes | None, bytes]


@dataclass
class LoadResult:
    topic: str
    rows: int
    seconds: float
    created: bool
    not_objects: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _key_bytes(value: object) -> bytes | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8") if text else None


def _require_column(columns, key: str, source: str) -> None:
    if key not in list(columns):
        raise KappaError(f"key column {key!r} not found in {source}; its columns are: {', '.join(map(str, columns))}")


def _frame_messages(frame: pd.DataFrame, key: str, source: str) -> Iterator[Message]:
    keys = frame[key].tolist()
    for key_value, row in zip(keys, frame.to_dict("records"), strict=True):
        yield _key_bytes(key_value), orjson.dumps(row, default=str, option=ORJSON_OPTIONS)


def _count_lines(path: Path) -> int:
    lines = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            lines += block.count(b"\n")
    return lines


class JsonLinesStats:
    not_objects = 0


def _jsonl_messages(handle: BinaryIO, key: str, stats: JsonLinesStats) -> Iterator[Message]:
    """Each line is loaded unchanged; lines that are not JSON objects still go to the log
    (it is the system of record) and are counted, since workers will reject them."""
    for line in handle:
        line = line.strip()
        if not line:
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            stats.not_objects += 1
            yield None, line
            continue
        yield _key_bytes(row.get(key)), line


def _detect_format(path: str) -> str:
    lowered = path.lower()
    if path == "-" or lowered.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if lowered.endswith((".parquet", ".pq")):
        return "parquet"
    if lowered.endswith((".csv", ".csv.gz", ".tsv")):
        return "csv"
    raise KappaError(
        f"cannot tell the format of {path!r}: expected a .csv, .parquet or .jsonl file, or - for JSON Lines on stdin"
    )


def _messages(path: str, key: str, stats: JsonLinesStats) -> tuple[Iterator[Message], int | None]:
    """The file's messages and, where cheap to know, how many rows it holds."""
    kind = _detect_format(path)
    if kind == "jsonl" and path == "-":
        return _jsonl_messages(sys.stdin.buffer, key, stats), None
    file = Path(path)
    if not file.is_file():
        raise KappaError(f"input file {path!r} not found")
    if kind == "jsonl":
        return _jsonl_messages(open(file, "rb"), key, stats), _count_lines(file)
    if kind == "parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(file)
        _require_column(parquet.schema_arrow.names, key, path)

        def parquet_rows() -> Iterator[Message]:
            for batch in parquet.iter_batches(batch_size=CHUNK_ROWS):
                yield from _frame_messages(batch.to_pandas(), key, path)

        return parquet_rows(), parquet.metadata.num_rows

    try:
        _require_column(pd.read_csv(file, nrows=0).columns, key, path)
    except pd.errors.EmptyDataError:
        raise KappaError(f"{path} is empty: expected a CSV header naming the key column {key!r}") from None

    def csv_rows() -> Iterator[Message]:
        try:
            reader = pd.read_csv(file, dtype={key: str}, chunksize=CHUNK_ROWS)
            for chunk in reader:
                yield from _frame_messages(chunk, key, path)
        except pd.errors.EmptyDataError:
            return
        except pd.errors.ParserError as exc:
            raise KappaError(f"{path} is not valid CSV: {exc}") from None

    return csv_rows(), max(_count_lines(file) - 1, 0)


def producer_config(broker: str) -> dict:
    return admin.client_config(
        broker,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "batch.num.messages": 100_000,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "message.max.bytes": 10_000_000,
            "delivery.report.only.error": True,
        },
    )


def load(settings: Settings, path: str, key: str, topic: str | None = None, partitions: int = 8) -> LoadResult:
    if topic is None:
        if path == "-":
            raise KappaError("reading from stdin needs a topic name: pass --topic T")
        topic = Path(path).name.split(".")[0]
    if partitions < 1:
        raise KappaError(f"--partitions must be at least 1, got {partitions}")
    stats = JsonLinesStats()
    messages, expected = _messages(path, key, stats)
    admin.wait_until_reachable(settings.broker)
    created = admin.ensure_topic(
        settings.broker, topic, partitions, admin.UNLIMITED_RETENTION, settings.replication_factor
    )
    failures: list[str] = []

    def on_delivery(error, message) -> None:
        if error is not None:
            failures.append(error.str())

    producer = Producer(producer_config(settings.broker), on_delivery=on_delivery)
    line = ProgressLine()
    rows = 0
    produce, poll = producer.produce, producer.poll
    for message_key, value in messages:
        while True:
            try:
                produce(topic, value, message_key)
                break
            except BufferError:
                poll(0.05)
            except KafkaException as exc:
                raise KappaError(f"could not produce to {topic!r}: {exc.args[0].str()}") from None
        rows += 1
        if rows % 20_000 == 0:
            poll(0)
            line.update(rows, expected, label=f"load {topic}")
        if failures:
            break
    remaining = producer.flush(60)
    line.finish()
    if failures or remaining:
        reason = failures[0] if failures else f"{remaining} messages still unsent after 60s"
        raise KappaError(f"load into {topic!r} failed after {rows:,} rows: {reason}; the topic may hold a partial load")
    return LoadResult(topic, rows, line.elapsed(), created, stats.not_objects)
