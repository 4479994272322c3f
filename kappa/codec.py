"""Turns one log record into a verdict under the record rules, with pandas' semantics.

The group key is the row's key field when the pipeline names one, whatever message key the
producer chose (so any `--key` groups as pandas does); only a pipeline without a key field
groups by the message key.

These are the rules; agents.fold applies them to whole batches column-wise and sends here
each record its columns cannot judge. A record is parsed with orjson first, and with the
standard library only when orjson refuses it (NaN/Infinity literals, integers beyond 64
bits), which pandas would still read as numbers.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

COUNTED, SKIPPED, REJECTED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Verdict:
    """kind is COUNTED, SKIPPED or REJECTED; key is None when the row has no group key."""

    kind: int
    key: str | None = None
    value: float = 0.0
    error: str = ""


NO_KEY = Verdict(SKIPPED)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def json_object(value: bytes | None) -> dict | str:
    """The message as a JSON object, or why it is rejected (`kappa load` counts JSON Lines by this rule too)."""
    if not value:
        return "empty message: expected a JSON object"
    try:
        row = _loads(value)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {str(exc)[:120]}"
    except OverflowError:
        return "not JSON: number out of range"
    if not isinstance(row, dict):
        return f"JSON {type(row).__name__} where a JSON object was expected"
    return row


def _key_fields(row: dict, value: bytes, names: tuple[str, ...]) -> list[Any]:
    """The row's key fields, each number as the message writes it: `12.50`, `1e3` and `-0` are
    keys as written, as pandas reads a CSV's key column with dtype=str (kappa load writes a
    CSV field as a number only if it is a JSON number, kappa.load.json_rows.written_values).
    orjson gives 12.5, 1000.0 and 0, so such a row is read again, keeping the numbers' text;
    an integer other than 0 is written as str(int) gives it back."""
    fields = [row.get(name) for name in names]
    written = None
    for index, field in enumerate(fields):
        if type(field) is float or (type(field) is int and field == 0):
            text = _number_text(value, names[index], field)
            if text is None:
                written = written or _numbers_as_written(value)
                text = written.get(names[index])
            fields[index] = text
    return fields


JSON_NUMBER = rb"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"


@functools.lru_cache(maxsize=64)
def _field_number(name: str) -> re.Pattern[bytes]:
    return re.compile(orjson.dumps(name) + rb"\s*:\s*" + JSON_NUMBER)


def _number_text(value: bytes, name: str, field: float) -> str | None:
    """The text of field `name`'s number as the message writes it, found without reading the
    message again (that took 5 µs a row: a million rows keyed by a float took 6 s more to load);
    None when it cannot be told so, and the message is read again. It can when no name or text
    holds an escape (so a name is written one way) and the name is followed by a number once in
    the message: nested fields of that name, or a repeated one, make more. `field` is orjson's
    value, checked against the text."""
    if b"\\" in value:
        return None
    found = _field_number(name).findall(value)
    if len(found) != 1 or float(found[0]) != field:
        return None
    return found[0].decode("ascii")


# orjson reads arrays and objects nested 1024 deep; the standard library's read of such a row, a
# frame per level, must too, from however deep a stack it is called (a worker's is a few hundred
# frames): a RecursionError there stopped the fold for good. Raised once, for every thread alike (a
# limit raised around each read would change it under another thread's read meanwhile).
RECURSION_LIMIT = 1024 + 2000
sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))


def _numbers_as_written(value: bytes) -> dict:
    """The row orjson read from `value` again, each number as its text."""
    return json.loads(value, parse_float=str, parse_int=str)


def _key_from_row(field: Any) -> str | None:
    """A row's key field as pandas would read it from CSV with dtype=str (numbers as written:
    see `_key_fields`)."""
    if field is None or isinstance(field, bool):
        return None if field is None else str(field)
    if isinstance(field, str):
        return field  # "" is a key, as pandas groups it; only a missing field has none
    if isinstance(field, int):
        return str(field)
    if isinstance(field, float):
        return None if math.isnan(field) else repr(field)
    return None


def key_field_text(row: dict, value: bytes, name: str) -> str | None:
    """The group key a replay by `--key name` reads from this message (None: the row has none).
    `kappa load` writes it as the message key too, so a replay without --key groups alike."""
    field = row.get(name)
    if type(field) is str:  # most keys: no second look at the message
        return field
    return _key_from_row(_key_fields(row, value, (name,))[0])


def _number(field: Any) -> float | None | str:
    """float for a counted value, None for a skipped one, or an error message."""
    if field is None:
        return None
    if isinstance(field, bool):
        return f"value is a boolean ({field!r}), expected a number"
    if isinstance(field, (int, float)):
        try:
            number = float(field)
        except OverflowError:  # an integer beyond float's range: infinite, skipped as infinities are
            return None
    elif isinstance(field, str):
        text = field.strip()
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            return f"value {field[:40]!r} is not numeric"
        # float() reads `1_0`, other scripts' digits and spaces (`5\u00a0`, `5\x1f`); pandas none of them
        if "_" in text or not field.isascii() or NOT_C_SPACE.search(field):
            return f"value {field[:40]!r} is not numeric"
    else:
        return f"value is a JSON {type(field).__name__}, expected a number"
    return number if math.isfinite(number) else None


def _is_valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_C_SPACE = re.compile(r"[\x1c-\x1f]")  # str.strip() and float() take them for spaces; pandas does not
RECORD_TIMESTAMP = "@timestamp"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_NAIVE = datetime(1970, 1, 1)
ONE_SECOND = timedelta(seconds=1)
UNIT_SECONDS = {"s": 1, "ms": 1000}
# Python reads ISO week dates (2024-W09-5); pandas refuses them, so kappa rejects them too
ISO_WEEK_DATE = re.compile(r"\s*[+-]?\d{4}-?W", re.IGNORECASE)
# ISO 8601's reduced precisions, a year (`2024`) or a month (`2024-03`): pandas reads them as the
# first moment of that year or month, and Python's fromisoformat refuses them
YEAR_OR_MONTH = re.compile(r"(\d{4})(?:-(\d{2}))?")
# the times Python's datetime holds, 0001-01-01T00:00:00 to 9999-12-31T23:59:59: an event time
# outside them is rejected (nanoseconds read as seconds, say), as a snapshot could not show it
FIRST_YEAR_SECOND, LAST_YEAR_SECOND = -62135596800, 253402300799


def event_second(field: Any, unit: str) -> int | None | str:
    """A row's event time as whole epoch seconds (floored), None when it has none, or an
    error text. ISO 8601 text without an offset is UTC; a number is epoch `unit` (s or ms)."""
    if field is None or (isinstance(field, str) and not field.strip()):
        return None
    if isinstance(field, bool):
        return f"time is a boolean ({field!r}), expected ISO 8601 text or epoch {unit}"
    if isinstance(field, (int, float)):
        if isinstance(field, float) and not math.isfinite(field):
            return None if math.isnan(field) else f"time {field!r} is not a finite number"
        return field // UNIT_SECONDS[unit] if isinstance(field, int) else math.floor(field / UNIT_SECONDS[unit])
    if isinstance(field, str):
        if ISO_WEEK_DATE.match(field):
            return f"time {field[:40]!r} is an ISO week date, which pandas does not read: write the calendar date"
        try:
            moment = _iso_moment(field.strip())
        except ValueError:
            return f"time {field[:40]!r} is not ISO 8601"
        # no offset means UTC: a naive time is measured from the naive epoch (no conversion)
        return (moment - (EPOCH_NAIVE if moment.tzinfo is None else EPOCH)) // ONE_SECOND
    return f"time is a JSON {type(field).__name__}, expected ISO 8601 text or epoch {unit}"


def _iso_moment(text: str) -> datetime:
    """ISO 8601 text as a datetime, read as pandas reads it: a reduced precision is the start of
    its year or month, and a lowercase `z` (RFC 3339 allows it) is UTC as `Z` is."""
    reduced = YEAR_OR_MONTH.fullmatch(text)
    if reduced:
        return datetime(int(reduced.group(1)), int(reduced.group(2) or 1), 1)
    return datetime.fromisoformat(text[:-1] + "Z" if text[-2:-1].isdigit() and text.endswith("z") else text)


def _time_out_of_range(row: dict, timestamp: int | None, shape: RowShape) -> str:
    if shape.time_field == RECORD_TIMESTAMP:
        return f"record timestamp {timestamp} ms is outside the years 1 to 9999"
    field = row.get(shape.time_field)
    unit = "seconds" if shape.time_unit == "s" else "milliseconds"
    shown = repr(field)[:40]
    if isinstance(field, (int, float)):
        return f"time {shown} is outside the years 1 to 9999 as epoch {unit}: is --time-unit right?"
    return f"time {shown} is outside the years 1 to 9999"


@dataclass(frozen=True, slots=True)
class RowShape:
    """What a pipeline reads from a row: key fields (None: the message key), value fields,
    and an optional event-time window."""

    key_fields: tuple[str, ...] | None
    value_fields: tuple[str, ...]
    window_s: int | None = None
    time_field: str | None = None
    time_unit: str = "s"


@dataclass(frozen=True, slots=True)
class RowVerdict:
    """kind is COUNTED (some value counted), SKIPPED or REJECTED; `group` the key texts and
    window start (None when the row has no group); `values` one per value field, None where skipped."""

    kind: int
    texts: tuple[str, ...] | None = None
    window_start: int | None = None
    values: tuple[float | None, ...] = ()
    error: str = ""


def decode_row(key: bytes | None, value: bytes | None, timestamp: int | None, shape: RowShape) -> RowVerdict:
    """The record rules for any pipeline shape.

    Every reason to reject comes before any reason to skip (a row with no key and a value
    that is not numeric is rejected, as before keys were checked): not a JSON object, a key
    that is not UTF-8, a value that is not numeric, an unparseable time."""
    row = json_object(value)
    if isinstance(row, str):
        return RowVerdict(REJECTED, error=row)
    texts: tuple[str, ...] | None
    if shape.key_fields is None:
        try:
            texts = (key.decode("utf-8"),) if key is not None else None  # b"" is the key ""
        except UnicodeDecodeError:
            return RowVerdict(REJECTED, error="message key is not valid UTF-8")
    else:
        assert value is not None  # a JSON object was read from it
        found = [_key_from_row(field) for field in _key_fields(row, value, shape.key_fields)]
        for name, text in zip(shape.key_fields, found, strict=True):
            if text is not None and not _is_valid_utf8(text):
                return RowVerdict(REJECTED, error=f"key field {name!r} is not valid UTF-8 (a lone surrogate)")
        texts = None if any(text is None for text in found) else tuple(found)  # type: ignore[arg-type]
    values: list[float | None] = []
    for name in shape.value_fields:
        number = _number(row.get(name))
        if isinstance(number, str):
            return RowVerdict(REJECTED, error=f"{name}: {number}" if len(shape.value_fields) > 1 else number)
        values.append(number)
    window_start = None
    if shape.window_s is not None:
        moment: int | str | None
        if shape.time_field == RECORD_TIMESTAMP:
            moment = None if timestamp is None or timestamp < 0 else timestamp // 1000
        else:
            moment = event_second(row.get(shape.time_field), shape.time_unit)
        if isinstance(moment, str):
            return RowVerdict(REJECTED, error=moment)
        if moment is None:
            return RowVerdict(SKIPPED, values=tuple(values))
        if not FIRST_YEAR_SECOND <= moment <= LAST_YEAR_SECOND:
            return RowVerdict(REJECTED, error=_time_out_of_range(row, timestamp, shape))
        window_start = moment - moment % shape.window_s
    if texts is None:
        return RowVerdict(SKIPPED, values=tuple(values))
    kind = COUNTED if any(number is not None for number in values) else SKIPPED
    return RowVerdict(kind, texts, window_start, tuple(values))


@functools.lru_cache(maxsize=64)
def _one_key_one_value(key_field: str | None, value_field: str) -> RowShape:
    return RowShape((key_field,) if key_field is not None else None, (value_field,))


def decode(key: bytes | None, value: bytes | None, key_field: str | None, value_field: str) -> Verdict:
    """The record rules for one key field (None: the message key) and one value: `decode_row`'s
    verdict in the shape the single-value fold uses."""
    row = decode_row(key, value, None, _one_key_one_value(key_field, value_field))
    if row.kind == REJECTED:
        return Verdict(REJECTED, error=row.error)
    if row.texts is None:
        return NO_KEY
    number = row.values[0]
    return Verdict(row.kind, key=row.texts[0], value=0.0 if number is None else number)
