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


def ensure_dead_letter_topic(broker: str, dlq_topic: str, partitions: int, replication_factor: int | None) -> None:
    """Make the dead-letter topic with the log's partitions, or add partitions to it up to them.
    A reject goes to the partition of the record it copies: once the log had gained partitions
    (or was made again with more), a reject from a new partition failed its send, and the
    process with it, on every restart."""
    admin.ensure_topic(broker, dlq_topic, partitions, admin.UNLIMITED_RETENTION, replication_factor)
    admin.grow_partitions(broker, dlq_topic, partitions)


def headers(
    error: str,
    topic: str,
    topic_id: str,
    partition: int,
    offset: int,
    pipeline: str,
    generation: int,
    definition: str,
) -> list[tuple[str, bytes]]:
    return [
        ("kappa.error", error.encode()),
        ("kappa.source.topic", topic.encode()),
        ("kappa.source.topic_id", topic_id.encode()),
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


def written_up_to(
    broker: str, dlq_topic: str, source_topic: str, source_topic_id: str, definition: str
) -> dict[int, int]:
    """Source partition -> highest source offset this definition has already dead-lettered from
    this very topic: a topic deleted and made again under the same name has another id, and its
    offsets name other records (before the id was compared, a replay on a made-again topic left
    out the rejects at offsets the old topic's had reached: 556 of 983 in the trial). Rejects
    written before the id was recorded carry none, and do not count: written again rather than lost."""
    partitions = admin.partition_count(broker, dlq_topic)
    if not partitions:
        return {}
    done: dict[int, int] = {}
    wanted = {
        "kappa.definition": definition.encode(),
        "kappa.source.topic": source_topic.encode(),
        "kappa.source.topic_id": source_topic_id.encode(),
    }

    def note(message: Message) -> None:
        found = dict(message.headers() or [])
        if all(found.get(name) == value for name, value in wanted.items()):
            partition, offset = int(found["kappa.source.partition"]), int(found["kappa.source.offset"])
            done[partition] = max(done.get(partition, -1), offset)

    read_ranges(broker, dlq_topic, admin.watermarks(broker, dlq_topic, partitions), note, group="kappa-dlq-scan")
    return done
