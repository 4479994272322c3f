"""The dead-letter topic `<topic>.dlq`: rejected records, copied unchanged, with headers that
say why, where from, and which pipeline, generation and definition rejected them (a record
longer than the topic takes goes without its value, its length in a header: `fitting`).

A replay recomputes every record, so it meets the same rejects again. Whether a record is
rejected depends only on the definition, so a definition's rejects are written once: before
a generation starts, the topic is read for the highest source offset per partition that this
definition already dead-lettered, and the agent writes only rejects beyond it (in each
partition they come in offset order). They are still counted in every generation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from confluent_kafka import Message

from kappa.kafka import admin
from kappa.kafka.reader import read_ranges


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


OMITTED_HEADER = "kappa.value.omitted"  # on a reject whose value the topic could not take: its length
DEFAULT_MESSAGE_BYTES = 1_048_588  # Kafka's default max.message.bytes, when the topic's cannot be read
FRAMING_BYTES = 1024  # a record's batch and header framing beside its key, value and header texts


def message_limit(broker: str, dlq_topic: str) -> int:
    """The longest record the dead-letter topic takes (its max.message.bytes)."""
    return admin.topic_config_int(broker, dlq_topic, "max.message.bytes") or DEFAULT_MESSAGE_BYTES


def fitting(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], limit: int
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The value and headers of a reject as the dead-letter topic can take it: unchanged, or,
    when the record is longer than `limit` (a source topic may take longer records than its
    dead-letter topic, or than the producer's request), without the value and with a header
    giving its length. Sent whole, such a record failed the send, and the worker with it, on
    every restart."""
    size = len(key or b"") + len(value or b"") + sum(len(name) + len(text) for name, text in headers)
    if value is None or size + FRAMING_BYTES <= limit:
        return value, headers
    return None, [*headers, (OMITTED_HEADER, str(len(value)).encode())]


def written_up_to(broker: str, dlq_topic: str, source_topic: str, definition: str) -> dict[int, int]:
    """Source partition -> highest source offset this definition has already dead-lettered."""
    partitions = admin.partition_count(broker, dlq_topic)
    if not partitions:
        return {}
    done: dict[int, int] = {}
    wanted_definition, wanted_topic = definition.encode(), source_topic.encode()

    def note(message: Message) -> None:
        found = dict(message.headers() or [])
        if found.get("kappa.definition") == wanted_definition and found.get("kappa.source.topic") == wanted_topic:
            partition, offset = int(found["kappa.source.partition"]), int(found["kappa.source.offset"])
            done[partition] = max(done.get(partition, -1), offset)

    read_ranges(broker, dlq_topic, admin.watermarks(broker, dlq_topic, partitions), note, group="kappa-dlq-scan")
    return done
