"""What a pipeline is, independent of how it runs: its definition, the records it reads, and
the progress a process has made on it.

This module imports nothing of kappa's engine or of the agents, so every layer can use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Record(Protocol):
    """What the agent reads of a record: aiokafka's parsed record, its ConsumerRecord and
    Faust's Message all fit."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


@dataclass(frozen=True)
class Definition:
    """What a pipeline computes: mean of `value_field` grouped by the row's `key_field`
    (by the message key when `key_field` is None), over `topic`."""

    topic: str
    value_field: str
    key_field: str | None

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    def to_record(self) -> dict:
        """The definition as the registry and manifests keep it."""
        return {"topic": self.topic, "value": self.value_field, "key": self.key_field}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Definition:
        return cls(topic=record["topic"], value_field=record["value"], key_field=record.get("key"))


@dataclass
class Progress:
    """What this process has applied, per source partition; read by snapshots and progress."""

    next_offsets: dict[int, int] = field(default_factory=dict)
    stop_at: Mapping[int, int] | None = None
    records_seen: int = 0
    dirty: set[int] = field(default_factory=set)

    def reached_stop(self) -> bool:
        if self.stop_at is None:
            return False
        return all(self.next_offsets.get(p, 0) >= end for p, end in self.stop_at.items() if end > 0)
