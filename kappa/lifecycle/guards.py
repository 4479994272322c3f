"""Guards that keep a wrong definition from replacing a good result.

A definition is checked against the log before anything is built.
A typo in `--value` or `--key` would otherwise build a whole generation of empty counts and,
once it caught up, replace a good result. Reading a few records from the start and the end
of every partition is cheap and tells the fields the log's rows really have; a named field
that appears in none of them is refused with the fields that were seen. An empty log
proves nothing either way and is accepted. Whatever the sample said, a generation that
counted nothing from a log that has records never becomes current unless forced.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from kappa.codec import REJECTED, RowShape, decode_row
from kappa.config import Settings
from kappa.engine.deadletters import ensure_dead_letter_topic
from kappa.engine.names import changelog_topic
from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.kafka.availability import wait_for_leaders
from kappa.kafka.reader import read_ranges
from kappa.pipeline import Definition

# how often a running generation's log is compared with the one it was built on (check_log_unchanged),
# and how long each of its requests may take: the supervisor's loop waits for them
LOG_CHECK_INTERVAL_S = 5.0
LOG_CHECK_TIMEOUT_S = 5.0
# small fetches: a sample needs a hundred records, not a megabyte per partition
SMALL_FETCHES: dict[str, Any] = {"max.partition.fetch.bytes": 65536}
SAMPLE_PER_END = 100  # records read from the start and from the end of each partition
SAMPLE_STALL_S = 5.0
FIELDS_SHOWN = 20


@dataclass
class FieldSample:
    """The fields seen in a sample of the log's JSON objects and, with a row shape, how many of
    the records the record rules would reject (and why, for the first)."""

    shape: RowShape | None = None
    records: int = 0
    objects: int = 0
    rejected: int = 0
    first_rejection: str = ""
    fields: Counter[str] = field(default_factory=Counter)

    def add(self, value: bytes | None, key: bytes | None = None, timestamp: int | None = None) -> None:
        self.records += 1
        if self.shape is not None:
            verdict = decode_row(key, value, timestamp, self.shape)
            if verdict.kind == REJECTED:
                self.rejected += 1
                self.first_rejection = self.first_rejection or verdict.error
        try:
            row = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            return
        if isinstance(row, dict):
            self.objects += 1
            self.fields.update(row.keys())

    def seen(self) -> str:
        names = [name for name, _ in self.fields.most_common(FIELDS_SHOWN)]
        more = len(self.fields) - len(names)
        return ", ".join(names) + (f" (and {more} more)" if more > 0 else "") if names else "none"


def _passes(watermarks: dict[int, tuple[int, int]]) -> list[dict[int, tuple[int, int]]]:
    """Two passes of partition -> (first offset, stop): the heads, then the tails."""
    heads, tails = {}, {}
    for partition, (low, high) in sorted(watermarks.items()):
        if high <= low:
            continue
        head_stop = min(low + SAMPLE_PER_END, high)
        heads[partition] = (low, head_stop)
        tail_start = max(high - SAMPLE_PER_END, head_stop)
        if tail_start < high:
            tails[partition] = (tail_start, high)
    return [ranges for ranges in (heads, tails) if ranges]


def sample_fields(
    broker: str, topic: str, partitions: int, wanted: set[str] | None = None, shape: RowShape | None = None
) -> FieldSample:
    """Read the head of every partition of `topic` (and its tail too, unless every `wanted`
    field was seen already) and collect the rows' fields (and, with `shape`, the rules' verdicts).

    It is a sample: a pass that stalls (a partition without a leader) ends with what it has
    read, and the check goes on with that."""
    sample = FieldSample(shape)
    for ranges in _passes(admin.watermarks(broker, topic, partitions)):
        every_rejected = shape is not None and sample.rejected == sample.records
        if sample.objects and wanted is not None and wanted <= set(sample.fields) and not every_rejected:
            break  # the tails, too, when the heads alone would refuse the definition
        try:
            read_ranges(
                broker,
                topic,
                ranges,
                lambda message: sample.add(message.value(), message.key(), _timestamp_ms(message)),
                group="kappa-field-sample",
                stall_s=SAMPLE_STALL_S,
                **SMALL_FETCHES,
            )
        except KappaError:
            break
    return sample


def check_fields(sample: FieldSample, topic: str, named: dict[str, str]) -> None:
    """Refuse a definition whose named field is in none of the sampled rows.

    `named` maps each field the definition reads to the option that names it (`--value`)."""
    if sample.objects == 0:
        return
    for name, option in named.items():
        if name not in sample.fields:
            raise KappaError(
                f"{option} {name!r} is a field of none of the {sample.objects:,} rows sampled from the start and "
                f"end of every partition of {topic!r}; fields seen: {sample.seen()}. Check the spelling "
                "(nothing was built or switched)"
            )


def check_verdicts(sample: FieldSample, topic: str) -> None:
    """Refuse a definition under which the rules reject every sampled record: a wrong
    --time-unit (epoch milliseconds read as seconds lie beyond the year 9999) would copy the
    whole log to the dead-letter topic and build nothing."""
    if sample.records and sample.rejected == sample.records:
        raise KappaError(
            f"every one of the {sample.records:,} records sampled from the start and end of every partition of "
            f"{topic!r} would be rejected, the first with: {sample.first_rejection}. Check the definition "
            "(nothing was built or switched), or pass --force to build it anyway"
        )


def check_definition(settings: Settings, definition: Definition, partitions: int, verdicts: bool = True) -> None:
    """Refuse a definition naming a field that no sampled row has (a typo would build empty counts),
    or, with `verdicts`, one whose rules reject every sampled record. A worker leaves the verdicts
    out: it has no --force, and a log that so far holds only bad records must not keep it from
    starting (they go to the dead-letter topic, as every bad record does)."""
    named = definition.fields_read()
    shape = definition.row_shape() if verdicts else None
    sample = sample_fields(settings.broker, definition.topic, partitions, set(named), shape)
    check_fields(sample, definition.topic, named)
    check_verdicts(sample, definition.topic)


def _timestamp_ms(message: Message) -> int | None:
    kind, stamp = message.timestamp()
    return None if kind == TIMESTAMP_NOT_AVAILABLE else stamp


class EmptyResult(KappaError):
    """A finished generation counted no value at all from a log that has records."""


class LogChanged(KappaError):
    """The log under a generation is not the one it was built from (see `check_same_log`).

    `fact` says what changed; the message adds what to do about it (`advice`, or a replay)."""

    def __init__(self, fact: str, pipeline: str, advice: str | None = None) -> None:
        self.fact = fact
        super().__init__(
            fact
            + (
                advice
                or f": run `kappa replay` with the pipeline's definition (`kappa status --pipeline {pipeline}` shows "
                "it) to build a generation from the log as it is now"
            )
        )


def check_same_partitions(
    settings: Settings, pipeline: str, generation: int, topic: str, partitions: int, timeout: float = 10.0
) -> None:
    """Refuse a generation built on another number of the log's partitions (its changelog has
    one partition per partition of the log it was built on). With a partition added, a worker
    ignored it for minutes, then its processes failed on every start ("Unrecognized
    partition" from the changelog) and were restarted forever."""
    built_on = admin.partition_count(settings.broker, changelog_topic(pipeline, generation), timeout)
    if built_on is not None and built_on != partitions:
        raise LogChanged(
            f"topic {topic!r} has {partitions} partitions, but generation {generation} of {pipeline!r} was built on "
            f"{built_on}; its state is kept per partition, so it cannot follow a log whose partitions changed",
            pipeline,
        )


def check_same_topic(
    settings: Settings, pipeline: str, generation: int, topic: str, record: bool = True, timeout: float = 30.0
) -> None:
    """Refuse a generation that began reading another topic of the same name: on a topic
    deleted and made again, a worker went on from the offsets its state held, and published
    the deleted topic's counts as complete. Generations from before the topic id was recorded
    take the topic they find (unless not to `record` it: then nothing is checked)."""
    from kappa.lifecycle.generations import Registry

    found = admin.topic_id(settings.broker, topic, timeout)
    registry = Registry(settings.snapshot_dir, pipeline)
    if record:
        recorded = registry.bind_to_topic(generation, found)
    else:
        recorded = registry.read()["generations"].get(str(generation), {}).get("topic_id", found)
    if recorded != found:
        raise LogChanged(
            f"topic {topic!r} was deleted and made again since generation {generation} of {pipeline!r} began reading "
            f"it (topic id {recorded}, now {found}), so its counts are the deleted topic's",
            pipeline,
        )


def check_same_log(
    settings: Settings,
    pipeline: str,
    generation: int,
    topic: str,
    partitions: int,
    record: bool = True,
    timeout: float | None = None,
) -> None:
    """Refuse to continue a generation on a log it was not built from: its state is kept per
    partition of the topic it read (see `check_same_partitions` and `check_same_topic`). A
    replay rebuilds from the log as it is. `timeout`: for each request, instead of theirs."""
    check_same_partitions(settings, pipeline, generation, topic, partitions, timeout or 10.0)
    check_same_topic(settings, pipeline, generation, topic, record, timeout or 30.0)


class LogGone(LogChanged):
    """The topic a generation reads no longer exists."""

    def __init__(self, topic: str, pipeline: str, generation: int) -> None:
        super().__init__(
            f"topic {topic!r} was deleted under generation {generation} of {pipeline!r}",
            pipeline,
            ", so there is no log to follow: load the data into it again, then run `kappa replay` "
            f"(`kappa status --pipeline {pipeline}` shows the definition)",
        )


def check_log_unchanged(settings: Settings, pipeline: str, generation: int, topic: str, record: bool = True) -> None:
    """`check_same_log` against the log as it is now, for a generation that is running or about
    to become current; a topic that is gone raises LogGone. A broker that cannot tell raises
    KappaError, which says nothing about the log. `record`: see check_same_topic."""
    partitions = admin.partition_count(settings.broker, topic, timeout=LOG_CHECK_TIMEOUT_S)
    if partitions is None:
        raise LogGone(topic, pipeline, generation)
    check_same_log(settings, pipeline, generation, topic, partitions, record, LOG_CHECK_TIMEOUT_S)


# a topic missing this long, on every check, is taken for deleted: a broker that restarts may
# answer for a while that it has no such topic
GONE_AFTER_S = 30.0


class LogWatch:
    """`check_log_unchanged`, repeated while a generation runs or waits to become current.

    LogChanged at once when the log changed (partitions, topic id); LogGone only once the topic
    has been missing for GONE_AFTER_S; anything else (the broker cannot answer, a client's
    timeout) says nothing about the log. Before, one check that missed the topic could delete a
    replay's work, and a timeout from the client stopped a running worker."""

    def __init__(self, settings: Settings, pipeline: str, topic: str) -> None:
        self.settings, self.pipeline, self.topic = settings, pipeline, topic
        self._missing_since: float | None = None

    def unchanged(self, generation: int) -> bool:
        """True when the log is the one the generation was built on; False when it cannot tell now."""
        try:
            check_log_unchanged(self.settings, self.pipeline, generation, self.topic)
        except LogGone:
            now = time.monotonic()
            self._missing_since = self._missing_since if self._missing_since is not None else now
            if now - self._missing_since >= GONE_AFTER_S:
                raise
            return False
        except LogChanged:
            raise
        except Exception:  # noqa: BLE001  (a KappaError, or a client's own error: nothing is known about the log)
            return False
        self._missing_since = None
        return True


def refuse_empty_result(records: dict[str, int], total: int, force: bool) -> None:
    """A generation that counted nothing from a log that has records never becomes current
    unless forced: it would replace a real result with an empty one. `total` is the log's offsets
    (transaction markers take some); the records the generation read are what the line counts."""
    if total > 0 and records.get("counted", 0) == 0 and not force:
        read = sum(records.get(outcome, 0) for outcome in ("counted", "skipped", "rejected"))
        raise EmptyResult(
            f"the new generation counted no value out of {read:,} records (skipped {records.get('skipped', 0):,}, "
            f"rejected {records.get('rejected', 0):,}), so it does not replace the current one; check --value and "
            "--key, or pass --force to publish it anyway"
        )


def check_log_starts_at_zero(starts: dict[int, int], topic: str, allow_truncated: bool) -> None:
    """A replay over a log that retention has cut would silently drop history; refuse it."""
    truncated = {p: start for p, start in starts.items() if start > 0}
    if truncated and not allow_truncated:
        detail = ", ".join(f"partition {p} starts at {s}" for p, s in sorted(truncated.items()))
        raise KappaError(
            f"topic {topic!r} no longer starts at offset 0 ({detail}): retention removed records, so a replay "
            "cannot cover all history; pass --allow-truncated to replay what is left"
        )


def warn_finite_retention(settings: Settings, topic: str) -> None:
    retention = admin.retention_ms(settings.broker, topic)
    if retention is not None and retention >= 0:
        print(
            f"warning: topic {topic!r} has finite retention ({retention / 3_600_000:.1f} h): once records expire, "
            "a replay can no longer cover all history; set retention.ms=-1 on the log",
            file=sys.stderr,
        )


# what a preflight found: the source topic's partition count and its end offsets
Checked = tuple[int, dict[int, int]]


def preflight(
    settings: Settings,
    definition: Definition,
    allow_truncated: bool,
    force: bool = False,
    timeout: float | None = None,
) -> Checked:
    """Checks every replay makes first; returns the partition count and the end offsets now.

    The end offsets need every partition's leader: with a broker down, this waits (saying
    so) for at most `timeout` seconds, or as long as it takes when that is None.
    """
    admin.wait_until_reachable(settings.broker)
    partitions = admin.require_partition_count(settings.broker, definition.topic)
    wait_for_leaders(settings.broker, [definition.topic], f"replay of {definition.topic!r}", timeout)
    if not force:
        check_definition(settings, definition, partitions)
    marks = admin.watermarks(settings.broker, definition.topic, partitions)
    warn_finite_retention(settings, definition.topic)
    check_log_starts_at_zero({p: low for p, (low, _) in marks.items()}, definition.topic, allow_truncated)
    ensure_dead_letter_topic(settings.broker, definition.dlq_topic, partitions, settings.replication_factor)
    return partitions, {p: high for p, (_, high) in marks.items()}
