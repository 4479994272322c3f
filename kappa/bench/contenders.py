"""The reference contenders: the practical Python limit (`raw`) and in-memory pandas.

Run as `python -m kappa.bench.contenders NAME ...`; each writes its per-key sums and counts
to --out for the harness to check against the oracle.
"""

from __future__ import annotations

import argparse
import uuid
from collections import defaultdict
from pathlib import Path

import orjson
import pandas as pd

from kappa.bench.dataset import KEY, VALUE, write_result


def raw(args: argparse.Namespace) -> None:
    """A plain confluent-kafka consumer: big fetches, orjson, a dict. Nothing is stored."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": args.broker,
            "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
            # librdkafka's default (100,000) is less than one 16 MB fetch of a partition holds: its
            # fetcher then paused every partition for fetch.queue.backoff.ms (1 s) in 4 runs of 14
            # (reading 1M rows: 2.3-3.1 s against 1.1-1.5 s); with this, 1.45-1.88 s in 10 of 10
            "queued.min.messages": 1_000_000,
        }
    )
    consumer.subscribe([args.topic])
    sums: dict[bytes, float] = defaultdict(float)
    counts: dict[bytes, int] = defaultdict(int)
    seen = 0
    loads = orjson.loads
    while seen < args.rows:
        for message in consumer.consume(num_messages=10_000, timeout=1.0):
            if message.error():
                continue
            key = message.key()
            sums[key] += float(loads(message.value())[VALUE])
            counts[key] += 1
            seen += 1
    consumer.close()
    write_result(args.out, {k.decode(): v for k, v in sums.items()}, {k.decode(): v for k, v in counts.items()})


def pandas_groupby(args: argparse.Namespace) -> None:
    frame = pd.read_csv(args.csv, dtype={KEY: str})
    grouped = frame.groupby(KEY)[VALUE].agg(["sum", "count"])
    write_result(args.out, grouped["sum"].to_dict(), grouped["count"].to_dict())


def main() -> None:
    from kappa.bench import peers

    runners = {"raw": raw, "pandas": pandas_groupby, "faust_naive": peers.faust_naive, "quixstreams": peers.quix}
    parser = argparse.ArgumentParser(prog="python -m kappa.bench.contenders")
    parser.add_argument("name", choices=sorted(runners))
    parser.add_argument("--broker", default="127.0.0.1:9092")
    parser.add_argument("--topic")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runners[args.name](args)


if __name__ == "__main__":
    main()
