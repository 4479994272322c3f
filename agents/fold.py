"""Folds one partition's batch of records into per-key runs: the agent's hot loop.

Almost every record is plain: a JSON object whose value field is a JSON number, under a
UTF-8 message key. The loop recognises those with one orjson call and a type check, and
keeps their values in per-key lists that the table adds up with one `math.fsum` each.
Every other record (no message key, a string or null value, bad JSON, a non-object) goes
through `kappa.codec.decode`, which owns SPEC.md's record rules; for a plain record both
paths give the same verdict (tests/test_fold.py checks this on awkward input).

Offsets decide what is applied (see tables.grouped_mean): the fold keeps each key's
offsets so a key whose stored state already covers part of the batch applies only the
rest, and counts records (counted, skipped, rejected) only from the partition's own next
offset on, so a re-delivered batch never counts twice.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from kappa.codec import COUNTED, REJECTED, decode
from kappa.fastpath import Record
from tables.grouped_mean import MeanState

NO_STOP = 1 << 63
_SLOW = object()


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
        if self.has_skipped:
            values = [value for value in values if value is not None]
        state.add_all(values)
        state.next_offset = offsets[-1] + 1
        return True


@dataclass(slots=True)
class Fold:
    """A batch folded: per-key runs, and the counts of records not counted before."""

    runs: dict[bytes, KeyRun] = field(default_factory=dict)
    counted: int = 0
    skipped: int = 0
    rejected: list[tuple[Record, str]] = field(default_factory=list)
    last_offset: int = -1  # the last record folded, whether or not it was counted before


def fold(
    records: Sequence[Record], key_field: str, value_field: str, *, counted_from: int, stop: int | None = None
) -> Fold:
    """Fold records (offset order) below `stop`; count those at or after `counted_from`."""
    result = Fold()
    runs = result.runs
    loads = orjson.loads
    stop_at = NO_STOP if stop is None else stop
    counted = 0
    for record in records:
        offset = record.offset
        if offset >= stop_at:
            break
        try:
            number = loads(record.value)[value_field]
        except Exception:  # anything unusual: decode() gives the exact verdict
            number = _SLOW
        else:
            kind = type(number)
            if kind is int:
                number = float(number)
            elif kind is not float:  # orjson's floats are always finite
                number = _SLOW
        key = record.key
        if number is not _SLOW and key:
            run = runs.get(key)
            if run is None and _is_utf8(key):
                run = runs[key] = KeyRun()
            if run is not None:
                run.offsets.append(offset)
                run.values.append(number)
                if offset >= counted_from:
                    counted += 1
                result.last_offset = offset
                continue
        _fold_slow(result, record, key_field, value_field, counted_from)
    result.counted += counted
    return result


def _is_utf8(key: bytes) -> bool:
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _fold_slow(result: Fold, record: Record, key_field: str, value_field: str, counted_from: int) -> None:
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
    key = verdict.key.encode()
    run = result.runs.get(key)
    if run is None:
        run = result.runs[key] = KeyRun()
    run.offsets.append(offset)
    if verdict.kind == COUNTED:
        run.values.append(verdict.value)
    else:
        run.values.append(None)
        run.has_skipped = True
