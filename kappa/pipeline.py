"""What a pipeline is, independent of how it runs: its definition, the records it reads, and
the progress a process has made on it. It imports nothing of kappa's engine or of the agents
(only the record rules and the table's layout), so every layer can use it.

A pipeline's definition: what it reads from the log and how it groups.

A definition is count, sum and mean of one or more value fields, grouped by one or more
key fields of the row (or by the message key when none is named), optionally by event-time
tumbling windows aligned to the Unix epoch in UTC as well. It is recorded with every
generation, so a replay of a changed definition is a new generation, and `kappa.toml`
names definitions so that commands can refer to them by name.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kappa.codec import RECORD_TIMESTAMP, UNIT_SECONDS, RowShape
from kappa.errors import KappaError
from tables.aggregate import Mean
from tables.keys import KeyLayout

DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
LONGEST_WINDOW_S = 36_500 * 86_400
CONFIG_FILE = "kappa.toml"
PIPELINE_KEYS = {"topic", "key", "value", "window", "time", "time_unit"}


def parse_duration(text: str) -> int:
    """`90s`, `15m`, `1h`, `1d` -> seconds."""
    match = DURATION.match(text)
    if not match or int(match.group(1)) == 0:
        raise KappaError(
            f"--window {text!r} is not a duration: expected a positive number and a unit, as 30s, 15m, 1h, 1d"
        )
    return int(match.group(1)) * DURATION_SECONDS[match.group(2)]


def refuse_longer_than_a_century(window: str | None) -> None:
    """A window given now must be at most a century: `99999999999999999999d` is beyond the 64-bit
    integers the fold computes window starts in, and failed there with a traceback. Only what a
    user gives is checked: a definition recorded before the limit still reads back."""
    if window is not None and parse_duration(window) > LONGEST_WINDOW_S:
        raise KappaError(
            f"--window {window!r} is longer than {LONGEST_WINDOW_S // 86_400} days (a century); pick a shorter window"
        )


def split_fields(text: str | Sequence[str] | None, option: str) -> tuple[str, ...] | None:
    """`a,b` (or a list, from kappa.toml) -> ("a", "b"); refuses empty names and repeats."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")] if isinstance(text, str) else [str(n) for n in text]
    if not names or any(not name for name in names):
        raise KappaError(f"{option} {text!r} names an empty field; separate field names with commas, as a,b")
    if len(set(names)) != len(names):
        raise KappaError(f"{option} {text!r} names a field twice")
    for name in names:
        if "," in name:  # definitions are recorded, and passed to worker processes, as `a,b`
            raise KappaError(
                f"{option} field {name!r} holds a comma, which kappa puts between field names: rename the "
                "field (for a CSV, its header) before loading it"
            )
    return tuple(names)


class Record(Protocol):
    """What the agent reads of a record: aiokafka's parsed record, its ConsumerRecord and
    Faust's Message all fit."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


class Delivered(list):
    """One partition's records of one delivery, and the offsets fetched with them: every offset
    in [start, read_to) was read, and those that are not among the records hold none (a
    transaction's commit or abort marker, an aborted transaction's records, a record that
    compaction removed). A log written by a transactional producer ends each partition with a
    marker, so only `read_to`, not the last record, reaches the partition's end offset."""

    def __init__(self, records: Iterable[Record], start: int, read_to: int) -> None:
        super().__init__(records)
        self.start = start
        self.read_to = read_to


@dataclass(frozen=True)
class Definition:
    """What a pipeline computes, over `topic`."""

    topic: str
    value_fields: tuple[str, ...]
    key_fields: tuple[str, ...] | None = None  # None: the message key groups
    window: str | None = None  # as given, e.g. "1h"
    time_field: str | None = None
    time_unit: str = "s"
    window_s: int | None = field(init=False, default=None, compare=False)

    def __post_init__(self) -> None:
        if self.window is not None:
            object.__setattr__(self, "window_s", parse_duration(self.window))
            if not self.time_field:
                raise KappaError("--window needs --time FIELD (or --time @timestamp for the Kafka record timestamp)")
        elif self.time_field is not None:
            raise KappaError(f"--time {self.time_field!r} is used only with --window; add --window 1h, for example")
        if self.time_unit not in UNIT_SECONDS:
            raise KappaError(f"--time-unit {self.time_unit!r}: expected s or ms")
        if self.key_fields is not None and "window_start" in self.key_fields and self.window:
            raise KappaError("a key field named window_start would clash with the window column; rename it")

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def plain(self) -> bool:
        """At most one key field, one value and no window: the agent's fastest path."""
        one_key = self.key_fields is None or len(self.key_fields) == 1
        return one_key and len(self.value_fields) == 1 and not self.window

    @property
    def value_field(self) -> str:
        return self.value_fields[0]

    @property
    def key_field(self) -> str | None:
        return self.key_fields[0] if self.key_fields else None

    def layout(self) -> KeyLayout:
        names = self.key_fields if self.key_fields and len(self.key_fields) > 1 else ("key",)
        return KeyLayout(fields=names, windowed=self.window is not None)

    def aggregate(self) -> Mean:
        return Mean(self.value_fields)

    def row_shape(self) -> RowShape:
        return RowShape(self.key_fields, self.value_fields, self.window_s, self.time_field, self.time_unit)

    def fields_read(self) -> dict[str, str]:
        """Field name -> the option that names it: what the log's rows must have."""
        named = {name: "--value" for name in self.value_fields}
        named.update({name: "--key" for name in self.key_fields or ()})
        if self.time_field and self.time_field != RECORD_TIMESTAMP:
            named[self.time_field] = "--time"
        return named

    def to_record(self) -> dict:
        """The definition as the registry and manifests keep it (one-field definitions as before)."""
        record: dict[str, Any] = {
            "topic": self.topic,
            "value": ",".join(self.value_fields),
            "key": ",".join(self.key_fields) if self.key_fields is not None else None,
        }
        if self.window is not None:
            record.update(window=self.window, time=self.time_field, time_unit=self.time_unit)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Definition:
        return cls(
            topic=record["topic"],
            value_fields=split_fields(record["value"], "value") or (),
            key_fields=split_fields(record.get("key"), "key"),
            window=record.get("window"),
            time_field=record.get("time"),
            time_unit=record.get("time_unit", "s"),
        )

    def to_args(self) -> list[str]:
        """The definition as `kappa` command-line options (for the worker processes)."""
        return ["--topic", self.topic, *self.computation_args()]

    def computation_args(self) -> list[str]:
        """The options that say what is computed over the topic: values, keys, window."""
        record = self.to_record()
        args = ["--value", record["value"]]
        if record["key"] is not None:
            args += ["--key", record["key"]]
        if self.window is not None:
            args += ["--window", self.window, "--time", str(self.time_field)]
            if self.time_unit != "s":  # the default: a record timestamp or ISO text has no unit to give
                args += ["--time-unit", self.time_unit]
        return args


@dataclass
class Progress:
    """What this process has applied, per source partition; read by snapshots and progress."""

    next_offsets: dict[int, int] = field(default_factory=dict)  # durable: in the table and its changelog
    # folded into the table or its write-back cache: what progress lines show. A replay's cache
    # holds its deliveries until its end offsets (tables.cache), and a progress line fed by the
    # durable offsets stayed at 0% until then
    folded_offsets: dict[int, int] = field(default_factory=dict)
    stop_at: Mapping[int, int] | None = None
    records_seen: int = 0
    dirty: set[int] = field(default_factory=set)
    # wall-clock times (time.time()) this process's first batch began and its last one was applied
    first_applied_at: float | None = None
    last_applied_at: float | None = None

    on_reached: Callable[[], None] | None = field(default=None, repr=False)

    def folded(self, partition: int, next_offset: int) -> None:
        self.folded_offsets[partition] = max(next_offset, self.folded_offsets.get(partition, 0))

    def reached_stop(self) -> bool:
        if self.stop_at is None:
            return False
        return all(self.next_offsets.get(p, 0) >= end for p, end in self.stop_at.items() if end > 0)

    def check_reached(self) -> None:
        """Call `on_reached` (once) if every partition has reached its stop offset: a replay
        publishes as soon as its last batch is durable, not at its next timer tick."""
        if self.on_reached is not None and self.reached_stop():
            reached, self.on_reached = self.on_reached, None
            reached()


def read_config(path: Path) -> dict[str, dict[str, Any]]:
    """The `[pipelines.NAME]` tables of a pipelines file; unknown keys are refused by name."""
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise KappaError(f"no pipelines file at {path}: create it, or pass the definition as options") from None
    except tomllib.TOMLDecodeError as exc:
        raise KappaError(f"{path} is not valid TOML: {exc}") from None
    unknown = set(document) - {"pipelines"}
    if unknown:
        raise KappaError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; expected [pipelines.NAME]")
    pipelines = document.get("pipelines", {})
    for name, table in pipelines.items():
        if not isinstance(table, dict):
            raise KappaError(f"{path}: pipelines.{name} must be a table of topic, key, value, window, time")
        extra = set(table) - PIPELINE_KEYS
        if extra:
            raise KappaError(
                f"{path}: pipeline {name!r} has unknown key(s) {', '.join(sorted(extra))}; "
                f"known keys: {', '.join(sorted(PIPELINE_KEYS))}"
            )
    return pipelines


def resolve_name_in(config: Path | None, name: str) -> dict[str, Any]:
    """Pipeline `name`'s entry of the pipelines file (`config`, or ./kappa.toml)."""
    path = config or Path(CONFIG_FILE)
    pipelines = read_config(path)
    if name not in pipelines:
        known = ", ".join(sorted(pipelines)) or "none"
        raise KappaError(f"no pipeline {name!r} in {path} (pipelines there: {known})")
    return dict(pipelines[name])


def resolve(
    name: str | None,
    config: Path | None,
    *,
    topic: str | None,
    key: str | None,
    value: str | None,
    window: str | None,
    time: str | None,
    time_unit: str | None,
) -> tuple[str | None, Definition]:
    """A definition from `kappa.toml`'s pipeline `name` (if given), with options overriding it.

    Returns (the pipeline name from the file or None, the definition)."""
    entry: dict[str, Any] = resolve_name_in(config, name) if name is not None else {}
    overrides = {"topic": topic, "key": key, "value": value, "window": window, "time": time, "time_unit": time_unit}
    entry.update({k: v for k, v in overrides.items() if v is not None})
    if entry.get("time_unit") not in (None, "s") and not entry.get("window"):
        raise KappaError(
            "--time-unit applies to epoch numbers in the --time field of a --window; add --window 1h and "
            "--time FIELD, for example, or leave --time-unit out"
        )
    if not entry.get("topic"):
        raise KappaError("a pipeline needs a topic: pass --topic T, or name a pipeline of kappa.toml")
    if not entry.get("value"):
        raise KappaError("a pipeline needs a value field: pass --value V, or set value in kappa.toml")
    refuse_longer_than_a_century(entry.get("window"))
    definition = Definition(
        topic=str(entry["topic"]),
        value_fields=split_fields(entry["value"], "--value") or (),
        key_fields=split_fields(entry.get("key"), "--key"),
        window=entry.get("window"),
        time_field=entry.get("time"),
        time_unit=entry.get("time_unit") or "s",
    )
    return name, definition
