"""Folds one partition's batch of records into per-key runs: the agent's hot loop.

Almost every record is plain: a JSON object whose value field is a JSON number and whose
key field is a non-empty string (or, for a pipeline without a key field, a record with a
UTF-8 message key). The loop recognises those with one orjson call and type checks, and
keeps their values in per-key lists that the table adds up with one `math.fsum` each.
Every other record (no key, a string or null value, bad JSON, a non-object) goes through
`kappa.codec.decode`, which owns the record rules; for a plain record both
paths give the same verdict (tests/test_fold.py checks this on awkward input).

Offsets decide what is applied (see tables.grouped_mean): the fold keeps each key's
offsets so a key whose stored state already covers part of the batch applies only the
rest, and counts records (counted, skipped, rejected) only from the partition's own next
offset on, so a re-delivered batch never counts twice.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from kappa.codec import COUNTED, RECORD_TIMESTAMP, REJECTED, RowShape, RowVerdict, decode, decode_row, event_second
from kappa.pipeline import Record
from tables.aggregate import MeanState
from tables.keys import KeyLayout

NO_STOP = 1 << 63


@dataclass(slots=True)
class KeyRun:
    """One key's records in a batch, in offset order; a skipped record's value is None."""

    offsets: list[int] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    has_skipped: bool = False

    def apply_to(self, state: MeanState) -> bool:
        """Add the records the state has not applied yet (those below its next offset were);
        False when there were none."""
        offsets, values = self.offsets, self.values
        if offsets[0] < state.next_offset:
            start = bisect_left(offsets, state.next_offset)
            if start == len(offsets):
                return False
            values = values[start:]
        counted = [value for value in values if value is not None] if self.has_skipped else values
        state.add_all(cast(list[float], counted))
        state.next_offset = offsets[-1] + 1
        return True


@dataclass(slots=True)
class Fold:
    """A batch folded: per-key runs, and the counts of records not counted before."""

    runs: dict[bytes, KeyRun] | dict[bytes, RowsRun] = field(default_factory=dict)
    counted: int = 0
    skipped: int = 0
    rejected: list[tuple[Record, str]] = field(default_factory=list)
    last_offset: int = -1  # the last record folded, whether or not it was counted before
    value_counts: list[list[int]] | None = None  # [counted, skipped] per value, for several values


def fold(
    records: Sequence[Record],
    key_field: str | None,
    value_field: str,
    *,
    counted_from: int,
    stop: int | None = None,
) -> Fold:
    """Fold records (offset order) below `stop`; count those at or after `counted_from`.

    The group key is the row's `key_field`, or the message key when `key_field` is None.
    """
    result = Fold()
    runs: dict[str, KeyRun] = {}
    loads = orjson.loads
    stop_at = NO_STOP if stop is None else stop
    by_field = key_field is not None
    counted = 0
    for record in records:
        offset = record.offset
        if offset >= stop_at:
            break
        try:
            row = loads(record.value or b"")
            number = row[value_field]
            group = row[key_field] if by_field else (record.key or b"").decode("utf-8")
        except Exception:  # anything unusual: decode() gives the exact verdict
            _fold_slow(result, runs, record, key_field, value_field, counted_from)
            continue
        kind = type(number)
        if kind is int:
            number = float(number)
        elif kind is not float:  # orjson's floats are always finite
            _fold_slow(result, runs, record, key_field, value_field, counted_from)
            continue
        if type(group) is not str or not group:
            _fold_slow(result, runs, record, key_field, value_field, counted_from)
            continue
        run = runs.get(group)
        if run is None:
            run = runs[group] = KeyRun()
        run.offsets.append(offset)
        run.values.append(number)
        if offset >= counted_from:
            counted += 1
        result.last_offset = offset
    result.counted += counted
    # orjson refuses lone surrogates, and the slow path rejects them, so every key encodes
    result.runs = {group.encode("utf-8"): run for group, run in runs.items()}
    return result


def _fold_slow(
    result: Fold, runs: dict[str, KeyRun], record: Record, key_field: str | None, value_field: str, counted_from: int
) -> None:
    offset = record.offset
    verdict = decode(record.key, record.value, key_field, value_field)
    result.last_offset = offset
    if offset >= counted_from:
        if verdict.kind == COUNTED:
            result.counted += 1
        elif verdict.kind == REJECTED:
            result.rejected.append((record, verdict.error))
        else:
            result.skipped += 1
    if verdict.key is None or verdict.kind == REJECTED:
        return
    run = runs.get(verdict.key)
    if run is None:
        run = runs[verdict.key] = KeyRun()
    run.offsets.append(offset)
    if verdict.kind == COUNTED:
        run.values.append(verdict.value)
    else:
        run.values.append(None)
        run.has_skipped = True


@dataclass(slots=True)
class RowsRun:
    """One key's records in a batch for a pipeline with several values or a window: a tuple
    of values (None where skipped) per record, in offset order."""

    offsets: list[int] = field(default_factory=list)
    values: list[tuple[float | None, ...]] = field(default_factory=list)

    def apply_to(self, states: list[MeanState]) -> bool:
        """Add the records the states have not applied yet; False when there were none."""
        offsets, rows = self.offsets, self.values
        if offsets[0] < states[0].next_offset:
            start = bisect_left(offsets, states[0].next_offset)
            if start == len(offsets):
                return False
            rows = rows[start:]
        for index, state in enumerate(states):
            state.add_all([value for row in rows if (value := row[index]) is not None])
            state.next_offset = offsets[-1] + 1
        return True


def fold_rows(
    records: Sequence[Record], shape: RowShape, layout: KeyLayout, *, counted_from: int, stop: int | None = None
) -> Fold:
    """`fold` for any pipeline shape: composite keys, several values, windows.

    A plain record (a JSON object whose key fields are non-empty strings and whose values
    are JSON numbers, with a parseable time) is recognised inline; any other goes through
    `decode_row`, which owns the rules (tests/test_fold.py checks both agree). Runs are kept
    by (key texts, window start) and their stored keys encoded once per batch. Counts per
    value are kept as well (a row with a fare and no tip counts for fare only).
    """
    value_counts = [[0, 0] for _ in shape.value_fields]
    result = Fold(value_counts=value_counts)
    runs: dict[tuple[tuple[str, ...], int | None], RowsRun] = {}
    stop_at = NO_STOP if stop is None else stop
    loads = orjson.loads
    key_fields, value_fields = shape.key_fields, shape.value_fields
    window, time_field, time_unit = shape.window_s, shape.time_field, shape.time_unit
    plain_keys = key_fields if key_fields is not None and (window is None or time_field != RECORD_TIMESTAMP) else None
    counted_plain = 0
    times: dict[str, int | None | str] = {}  # a time text's epoch second: records of a batch share many
    values: tuple[float | None, ...]
    for record in records:
        offset = record.offset
        if offset >= stop_at:
            break
        result.last_offset = offset
        plain = None
        if plain_keys is not None:
            plain = _plain_row(loads, record.value, plain_keys, value_fields, window, time_field, time_unit, times)
        if plain is not None:
            if offset >= counted_from:  # counted, every value numeric
                counted_plain += 1
            texts, window_start, values = plain
        else:
            verdict = decode_row(record.key, record.value, getattr(record, "timestamp", None), shape)
            if offset >= counted_from:
                _count(result, value_counts, record, verdict)
            if verdict.kind == REJECTED or verdict.texts is None:
                continue
            texts, window_start, values = verdict.texts, verdict.window_start, verdict.values
        run = runs.get((texts, window_start))
        if run is None:
            run = runs[(texts, window_start)] = RowsRun()
        run.offsets.append(offset)
        run.values.append(values)
    result.counted += counted_plain
    for counts in value_counts:
        counts[0] += counted_plain
    result.runs = {layout.encode(texts, start): run for (texts, start), run in runs.items()}
    return result


def _count(result: Fold, value_counts: list[list[int]], record: Record, verdict: RowVerdict) -> None:
    if verdict.kind == REJECTED:
        result.rejected.append((record, verdict.error))
        return
    if verdict.kind == COUNTED:
        result.counted += 1
    else:
        result.skipped += 1
    grouped = verdict.texts is not None
    for index, number in enumerate(verdict.values):
        value_counts[index][0 if grouped and number is not None else 1] += 1


PlainRow = tuple[tuple[str, ...], int | None, tuple[float, ...]]


def _plain_row(
    loads: Callable[[bytes], Any],
    value: bytes | None,
    key_fields: tuple[str, ...],
    value_fields: tuple[str, ...],
    window: int | None,
    time_field: str | None,
    time_unit: str,
    times: dict[str, int | None | str],
) -> PlainRow | None:
    """(key texts, window start, values) of a plain row, or None for decode_row to judge."""
    try:
        row = loads(value or b"")
        texts = tuple([row[name] for name in key_fields])
        numbers = [row[name] for name in value_fields]
        moment = None
        if window is not None:
            when = row[time_field]
            if type(when) is str:
                moment = times.get(when)
                if moment is None:
                    moment = times[when] = event_second(when, time_unit)
            else:
                moment = event_second(when, time_unit)
    except Exception:
        return None
    for text in texts:
        if type(text) is not str or not text:
            return None
    for index, number in enumerate(numbers):
        kind = type(number)
        if kind is int:
            numbers[index] = float(number)
        elif kind is not float:
            return None
    if window is None:
        return texts, None, tuple(numbers)
    if type(moment) is not int:
        return None
    return texts, moment - moment % window, tuple(numbers)
