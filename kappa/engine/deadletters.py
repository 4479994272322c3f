"""The dead-letter topic `<topic>.dlq`: rejected records, copied unchanged, with headers that
say why, where from, and which pipeline, generation and definition rejected them.

A replay recomputes every record, so it meets the same rejects again. Whether a record is
rejected depends only on the definition, so a definition's rejects are written once: before
a generation starts, the topic is read for the highest source offset per partition that this
definition already dead-lettered, and the agent writes only rejects beyond it (in each
partition they come in offset order). They are still counted in every generation.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping

from confluent_kafka import Consumer, TopicPartition

from kappa.kafka import admin

SCAN_TIMEOUT_S = 30.0


def definition_id(definition: Mapping[str, object]) -> str:
    """A short stable name for a definition record (its fields, in any order)."""
    return hashlib.sha256(json.dumps(dict(definition), sort_keys=True).encode()).hexdigest()[:16]


def headers(
    error: str, topic: str, partition: int, offset: int, pipeline: str, generation: int, definition: str
) -> list[tuple[str, bytes]]:
    return [
        ("kappa.error", error.encode()),
        ("kappa.source.topic", topic.encode()),
        ("kappa.source.partition", str(partition).encode()),
        ("kappa.source.offset", str(offset).encode()),
        ("kappa.pipeline", pipeline.encode()),
        ("kappa.generation", str(generation).encode()),
        ("kappa.definition", definition.encode()),
    ]


def written_up_to(broker: str, dlq_topic: str, source_topic: str, definition: str) -> dict[int, int]:
    """Source partition -> highest source offset this definition has already dead-lettered."""
    partitions = admin.partition_count(broker, dlq_topic)
    if not partitions:
        return {}
    stops = {p: high for p, (low, high) in admin.watermarks(broker, dlq_topic, partitions).items() if high > low}
    if not stops:
        return {}
    done: dict[int, int] = {}
    consumer = Consumer(admin.client_config(broker, **{"group.id": "kappa-dlq-scan", "enable.auto.commit": False}))
    try:
        consumer.assign([TopicPartition(dlq_topic, p, 0) for p in stops])
        pending, deadline = set(stops), time.monotonic() + SCAN_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.05):  # waits for all 1000 unless short
                if message.error() is not None:
                    continue
                if message.offset() >= stops[message.partition()] - 1:
                    pending.discard(message.partition())
                found = dict(message.headers() or [])
                if found.get("kappa.definition") != definition.encode():
                    continue
                if found.get("kappa.source.topic") != source_topic.encode():
                    continue
                partition, offset = int(found["kappa.source.partition"]), int(found["kappa.source.offset"])
                done[partition] = max(done.get(partition, -1), offset)
    finally:
        consumer.close()
    return done
