#!/usr/bin/env python3
"""Median latency from producing a record to seeing it in the published snapshot.

Run against a running `kappa worker` (for example with --snapshot-interval 1): each probe
produces one record with a fresh key and polls `latest` until that key appears.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import orjson
from confluent_kafka import Producer

from kappa import read_snapshot
from kappa.errors import KappaError
from kappa.kafka.admin import client_config


def probe(producer: Producer, topic: str, snapshot_dir: str, pipeline: str, timeout: float) -> float:
    key = f"probe-{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    producer.produce(topic, orjson.dumps({"key": key, "value": 1.0}), key.encode())
    producer.flush(10)
    while time.monotonic() - started < timeout:
        try:
            frame, _ = read_snapshot(snapshot_dir, pipeline)
        except (KappaError, OSError):
            frame = None
        if frame is not None and key in set(frame["key"]):
            return time.monotonic() - started
        time.sleep(0.02)
    raise SystemExit(f"probe {key} never appeared within {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", default=os.environ.get("KAPPA_BROKER", "localhost:9092"))
    parser.add_argument("--topic", required=True)
    parser.add_argument("--snapshot-dir", default="snapshots")
    parser.add_argument("--pipeline")
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    producer = Producer(client_config(args.broker))
    latencies = []
    for _ in range(args.probes):
        latencies.append(probe(producer, args.topic, args.snapshot_dir, args.pipeline or args.topic, 60))
        time.sleep(0.3)
    print(
        f"{len(latencies)} probes: median {statistics.median(latencies):.2f}s, "
        f"min {min(latencies):.2f}s, max {max(latencies):.2f}s"
    )


if __name__ == "__main__":
    main()
