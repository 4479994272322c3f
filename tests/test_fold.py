"""The agent's batch fold against the record rules applied one record at a time.

The fold reads batches column-wise and sends what the columns cannot judge to
`kappa.codec.decode_row`; this checks that the two routes never disagree, on the awkward
input the replay tests also use, alone and mixed into plain batches; that offsets gate what
is applied and counted exactly as the idempotence design says; and that sums do not depend
on how records were batched. Groups are applied as the agent applies them (`apply_groups`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import numpy as np
import orjson
import pandas as pd
import pytest

from agents.fold import Fold, _parse, fold, record_offsets
from kappa.codec import COUNTED, REJECTED, RowShape, decode, decode_row
from tables.aggregate import Mean, MeanState
from tables.keys import KeyLayout


@dataclass
class ParsedRecord:  # what aiokafka parses a record into: a fold is pure computation
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list = field(default_factory=list)
    timestamp: int | None = None


AWKWARD_VALUES = [
    b'{"amount": 1.5, "key": "a"}',
    b'{"amount": 2, "key": "a"}',
    b'{"amount": -3.25}',
    b'{"amount": 1e12}',
    b'{"amount": "3.5"}',
    b'{"amount": " 4 "}',
    b'{"amount": "abc"}',
    b'{"amount": "1_000"}',
    b'{"amount": null}',
    b'{"amount": true}',
    b'{"amount": [1]}',
    b'{"amount": {}}',
    b'{"other": 1}',
    b'{"amount": NaN}',
    b'{"amount": -Infinity}',
    b'{"amount": 1e999}',
    b'{"amount": 18446744073709551616}',
    b'{"amount": 123456789012345678901234567890}',
    b"[1, 2]",
    b'"amount"',
    b"42",
    b"not json",
    b"",
    None,
    b'{"amount": 7, "key": "from-row"}',
    b'{"amount": 8, "key": 7}',
    b'{"amount": 9, "key": ""}',
]
AWKWARD_KEYS = [b"a", b"b", 'ünï cödé, "q"\n'.encode(), b"007", b"", None, b"\xff\xfe"]


def awkward_records(count: int, first_offset: int = 0) -> list[ParsedRecord]:
    return [
        ParsedRecord(
            first_offset + i, AWKWARD_KEYS[(i * 3) % len(AWKWARD_KEYS)], AWKWARD_VALUES[i % len(AWKWARD_VALUES)]
        )
        for i in range(count)
    ]


def one_at_a_time(records, counted_from, stop, states, key_field="key"):
    """The per-record rules, as the agent applied them before batching (the reference)."""
    counts = {"counted": 0, "skipped": 0, "rejected": []}
    for record in records:
        if stop is not None and record.offset >= stop:
            break
        verdict = decode(record.key, record.value, key_field, "amount")
        if record.offset >= counted_from:
            if verdict.kind == COUNTED:
                counts["counted"] += 1
            elif verdict.kind == REJECTED:
                counts["rejected"].append((record.offset, verdict.error))
            else:
                counts["skipped"] += 1
        if verdict.key is None or verdict.kind == REJECTED:
            continue
        state = states.setdefault(verdict.key.encode(), MeanState())
        if record.offset >= state.next_offset:
            if verdict.kind == COUNTED:
                state.add(verdict.value)
            state.next_offset = record.offset + 1
    return counts


def folded(records, counted_from, stop, states, key_field="key"):
    shape = RowShape(None if key_field is None else (key_field,), ("amount",))
    result = fold(records, shape, KeyLayout(), counted_from=counted_from, stop=stop)
    apply_groups(result, states, 1)
    return {
        "counted": result.counted,
        "skipped": result.skipped,
        "rejected": [(record.offset, error) for record, error in result.rejected],
    }


def apply_groups(result: Fold, states: dict, width: int) -> None:
    """What the agent does with a fold: each group's batch added to its stored entry, column-wise
    (Mean.add_batches), and record by record for a group re-delivered in part (Groups.apply_to).
    With one value the tests keep the state itself, with several a list."""
    aggregate = Mean([f"v{index}" for index in range(width)])
    groups = result.groups
    stored = [
        aggregate.encode([states[key]] if width == 1 else states[key]) if key in states else None for key in groups.keys
    ]
    for group, (key, entry) in enumerate(
        zip(groups.keys, aggregate.add_batches(stored, groups.batch_sums()), strict=True)
    ):
        if entry is None:
            partly = aggregate.decode(stored[group])
            groups.apply_to(group, partly)
            entry = aggregate.encode(partly)
        updated = aggregate.decode(entry)
        states[key] = updated[0] if width == 1 else updated


def assert_same_states(mine: dict, reference: dict) -> None:
    assert mine.keys() == reference.keys()
    for key, expected in reference.items():
        got = mine[key]
        assert (got.count, got.next_offset) == (expected.count, expected.next_offset), key
        assert math.isclose(got.sum, expected.sum, rel_tol=1e-12, abs_tol=1e-9), key


@pytest.mark.parametrize("key_field", ["key", None])
@pytest.mark.parametrize("counted_from,stop", [(0, None), (40, None), (0, 150), (60, 120), (500, None)])
def test_fold_agrees_with_the_per_record_rules(counted_from, stop, key_field):
    records = awkward_records(400)
    reference_states, mine_states = {}, {}
    reference = one_at_a_time(records, counted_from, stop, reference_states, key_field)
    mine = folded(records, counted_from, stop, mine_states, key_field)
    assert mine == reference
    assert_same_states(mine_states, reference_states)
    if counted_from == 0 and stop is None:  # the input really exercises every outcome
        assert mine["counted"] and mine["skipped"] and mine["rejected"]


def test_a_key_already_partly_applied_takes_only_the_rest():
    """A state restored from the changelog may be ahead of the partition's stats entry."""
    records = [ParsedRecord(offset, b"k", orjson.dumps({"amount": offset})) for offset in range(10)]
    states = {b"k": MeanState(total=sum(range(6)), count=6, next_offset=6)}
    counts = folded(records, 0, None, states, key_field=None)
    assert counts["counted"] == 10  # stats count the records; the key applies only 6..9
    assert (states[b"k"].count, states[b"k"].sum, states[b"k"].next_offset) == (10, 45.0, 10)
    assert folded(records, 10, None, states, key_field=None)["counted"] == 0  # a re-delivered batch is a no-op
    assert (states[b"k"].count, states[b"k"].sum) == (10, 45.0)


def test_fsum_keeps_large_and_small_magnitudes_exact():
    values = [1e12, 0.1, -1e12, 0.2] * 1000
    records = [ParsedRecord(i, b"k", orjson.dumps({"amount": v})) for i, v in enumerate(values)]
    states = {}
    folded(records, 0, None, states, key_field=None)
    assert states[b"k"].sum == pytest.approx(math.fsum(values), rel=1e-12)


def test_sums_beyond_the_float_range_become_infinite_instead_of_failing():
    """fsum raises on overflow; a record that pandas would sum to inf must not crash the worker."""
    records = [ParsedRecord(i, b"k", orjson.dumps({"amount": 1e308})) for i in range(3)]
    states = {}
    assert folded(records, 0, None, states, key_field=None)["counted"] == 3
    assert states[b"k"].count == 3 and states[b"k"].sum == math.inf  # inf, not inf - inf in the compensation
    # the stored entry reads back: JSON has no inf, and a null there once stopped the next batch
    more = [ParsedRecord(i, b"k", orjson.dumps({"amount": 1.0})) for i in range(3, 5)]
    assert folded(more, 3, None, states, key_field=None)["counted"] == 2
    assert states[b"k"].count == 5 and states[b"k"].sum == math.inf


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [([1e308, 1e308], [-1e308], math.inf), ([1e308], [1e308], math.inf), ([-1e308, -1e308], [1.0], -math.inf)],
)
def test_partitions_whose_sums_overflow_merge_to_an_infinite_sum(first, second, expected):
    """pandas sums past float's range to inf; kappa's snapshot showed an empty sum (NaN: inf - inf
    in a compensation), or stopped on fsum's OverflowError when two finite partials overflowed."""
    partials = []
    for values in (first, second):
        state = MeanState()
        state.add_all(values)
        partials.append(state)
    columns = {
        "total": np.array([state.total for state in partials]),
        "compensation": np.array([state.compensation for state in partials]),
        "count": np.array([state.count for state in partials]),
    }
    merged = Mean().merge_groups(columns, np.array([0]))
    assert merged["count_0"].tolist() == [len(first) + len(second)]
    with np.errstate(over="ignore"):
        assert merged["sum_0"].tolist() == [expected] == [float(pd.Series([*first, *second]).sum())]


def test_the_key_field_is_the_group_key_whatever_the_message_key():
    """A topic loaded with one key and replayed with another groups by the row's field."""
    records = [
        ParsedRecord(0, b"ideal", b'{"amount": 1, "color": "E"}'),
        ParsedRecord(1, b"ideal", b'{"amount": 3, "color": "F"}'),
        ParsedRecord(2, b"fair", b'{"amount": 5, "color": "E"}'),
        ParsedRecord(3, b"fair", b'{"amount": 7}'),
        ParsedRecord(4, None, b'{"amount": 9, "color": "F"}'),
        ParsedRecord(5, b"\xff", b'{"amount": 2, "color": "E"}'),
    ]
    states = {}
    counts = folded(records, 0, None, states, key_field="color")
    assert {key: (state.count, state.sum) for key, state in states.items()} == {b"E": (3, 8.0), b"F": (2, 12.0)}
    assert counts == {"counted": 5, "skipped": 1, "rejected": []}
    by_message_key = {}
    folded(records, 0, None, by_message_key, key_field=None)
    assert {key: state.count for key, state in by_message_key.items()} == {b"ideal": 2, b"fair": 2}


def test_a_key_field_with_a_lone_surrogate_is_rejected():
    records = [ParsedRecord(0, b"k", b'{"amount": 1, "key": "\\ud800"}')]
    counts = folded(records, 0, None, {}, key_field="key")
    assert counts["rejected"] and "UTF-8" in counts["rejected"][0][1]


SHAPE = RowShape(("city", "vendor"), ("fare", "tip"), 3600, "at", "s")
ROW_VALUES = [
    b'{"city": "a", "vendor": "v", "fare": 1.5, "tip": 2, "at": "2024-03-01T10:15:00"}',
    b'{"city": "a", "vendor": "v", "fare": 2, "tip": null, "at": "2024-03-01T10:59:59"}',
    b'{"city": "a", "vendor": "w", "fare": "3.5", "tip": 1, "at": 1709287200}',
    b'{"city": "b", "vendor": "v", "fare": 4, "tip": 1, "at": "2024-03-01T09:00:00Z"}',
    b'{"city": "b", "vendor": "", "fare": 5, "tip": 1, "at": "2024-03-01T09:00:00"}',
    b'{"city": "b", "vendor": 7, "fare": 6, "tip": 1, "at": "2024-03-01T09:00:00"}',
    b'{"city": "b", "vendor": "v", "fare": 7, "tip": 1}',
    b'{"city": "b", "vendor": "v", "fare": 8, "tip": 1, "at": "yesterday"}',
    b'{"city": "b", "vendor": "v", "fare": "x", "tip": 1, "at": "2024-03-01T09:00:00"}',
    b'{"city": "c", "vendor": "v", "tip": 1, "at": "2024-03-01T09:00:00+02:00"}',
    b'{"city": "c", "vendor": "v", "fare": NaN, "tip": 1e999, "at": "2024-03-01T09:00:00"}',
    b"[1]",
    b"",
]


def rows_one_at_a_time(records, counted_from, stop, states, shape=SHAPE):
    layout = KeyLayout(("city", "vendor"), True)
    counts = {"counted": 0, "skipped": 0, "rejected": [], "values": [[0, 0], [0, 0]]}
    for record in records:
        if stop is not None and record.offset >= stop:
            break
        verdict = decode_row(record.key, record.value, record.timestamp, shape)
        if record.offset >= counted_from:
            if verdict.kind == REJECTED:
                counts["rejected"].append((record.offset, verdict.error))
            else:
                counts["counted" if verdict.kind == COUNTED else "skipped"] += 1
                for index, number in enumerate(verdict.values):
                    counts["values"][index][0 if verdict.texts and number is not None else 1] += 1
        if verdict.kind == REJECTED or verdict.texts is None:
            continue
        key = layout.encode(verdict.texts, verdict.window_start)
        pair = states.setdefault(key, [MeanState(), MeanState()])
        if record.offset >= pair[0].next_offset:
            for state, number in zip(pair, verdict.values, strict=True):
                if number is not None:
                    state.add(number)
                state.next_offset = record.offset + 1
    return counts


@pytest.mark.parametrize("counted_from,stop", [(0, None), (30, None), (0, 70), (500, None)])
def test_fold_rows_agrees_with_the_per_record_rules(counted_from, stop):
    records = [ParsedRecord(i, b"k", ROW_VALUES[(i * 7) % len(ROW_VALUES)]) for i in range(300)]
    mine = assert_fold_matches_rows_one_at_a_time(records, counted_from, stop)
    if counted_from == 0 and stop is None:
        assert mine["counted"] and mine["skipped"] and mine["rejected"]


# Rows the column parser accepts, each awkward in a way the per-record rules must still decide:
# missing, null and empty key fields, NUL and non-ASCII in keys, skipped values (null, missing,
# NaN, infinite), and event times in every form (plain, Z, fractions, offsets, blank, unparseable,
# a date that does not exist, before year 1).
PARSEABLE_ROWS = [
    {"city": "a", "vendor": "v", "fare": 1.5, "tip": 2, "at": "2024-03-01T10:15:00"},
    {"city": "a", "vendor": "v", "fare": 2, "tip": None, "at": "2024-03-01T10:59:59.999"},
    {"city": "a\u0000b", "vendor": "ü", "fare": 1e12, "tip": 1, "at": "2024-03-01T09:00:00Z"},
    {"city": "007", "vendor": "v", "fare": -0.1, "at": "2024-03-01T09:00:00.123456Z"},
    {"city": "b", "vendor": "", "fare": 5, "tip": 1, "at": "2024-03-01T09:00:00"},
    {"city": None, "vendor": "v", "fare": 6, "tip": 1, "at": "2024-03-01T09:00:00"},
    {"vendor": "v", "fare": 7, "tip": 1, "at": "2024-03-01T09:00:00"},
    {"city": "b", "vendor": "v", "fare": 8, "tip": 1},
    {"city": "b", "vendor": "v", "fare": 8, "tip": 1, "at": None},
    {"city": "b", "vendor": "v", "fare": 9, "tip": 1, "at": "  "},
    {"city": "b", "vendor": "v", "fare": 10, "tip": 1, "at": "yesterday"},
    {"city": "b", "vendor": "v", "fare": 11, "tip": 1, "at": "2024-03-01T11:00:00+02:00"},
    {"city": "b", "vendor": "v", "fare": 12, "tip": 1, "at": "2024-03-01 11:00:00"},
    {"city": "b", "vendor": "v", "fare": 13, "tip": 1, "at": "0000-01-01T00:00:00"},
    {"city": "b", "vendor": "v", "fare": 14, "tip": 1, "at": "1969-12-31T23:59:59.5"},
    {"city": "c", "vendor": "v", "tip": 1, "at": "2024-03-01T08:00:00"},
    {"city": "c", "vendor": "v", "fare": None, "tip": None, "at": "2024-03-01T08:00:00"},
    {"city": "c", "vendor": "w", "fare": 123456789012345678901234567890, "tip": 0, "at": "2024-03-01T08:00:00"},
]
NAN_ROW = b'{"city": "c", "vendor": "v", "fare": NaN, "tip": Infinity, "at": "2024-03-01T07:00:00"}'
NO_DATE = {"city": "d", "vendor": "v", "fare": 1, "tip": 1, "at": "2023-02-29T00:00:00"}


def parseable_records(count: int, rows: list[bytes]) -> list[ParsedRecord]:
    return [ParsedRecord(i, b"k", rows[(i * 5) % len(rows)]) for i in range(count)]


def assert_fold_matches_rows_one_at_a_time(records, counted_from, stop, shape=SHAPE):
    reference_states, mine_states = {}, {}
    reference = rows_one_at_a_time(records, counted_from, stop, reference_states, shape)
    result = fold(records, shape, KeyLayout(("city", "vendor"), True), counted_from=counted_from, stop=stop)
    apply_groups(result, mine_states, 2)
    mine = {
        "counted": result.counted,
        "skipped": result.skipped,
        "rejected": [(record.offset, error) for record, error in result.rejected],
        "values": result.value_counts,
    }
    assert mine == reference
    assert mine_states.keys() == reference_states.keys()
    for key, pair in reference_states.items():
        for got, want in zip(mine_states[key], pair, strict=True):
            assert (got.count, got.next_offset) == (want.count, want.next_offset)
            assert math.isclose(got.sum, want.sum, rel_tol=1e-12)
    return mine


@pytest.mark.parametrize("with_missing_date", [False, True])
@pytest.mark.parametrize("counted_from,stop", [(0, None), (30, None), (0, 70), (500, None)])
def test_the_column_path_agrees_with_the_per_record_rules(counted_from, stop, with_missing_date):
    rows = [json.dumps(row).encode() for row in PARSEABLE_ROWS] + [NAN_ROW]  # json: big integers, \u escapes
    rows += [json.dumps(NO_DATE).encode()] * with_missing_date
    records = parseable_records(300, rows)
    assert _parse(records, SHAPE).table is not None  # the batch really takes the column path
    mine = assert_fold_matches_rows_one_at_a_time(records, counted_from, stop)
    if counted_from == 0 and stop is None:
        assert mine["counted"] and mine["skipped"] and mine["rejected"]


@pytest.mark.parametrize("unit", ["s", "ms"])
@pytest.mark.parametrize("times", [[1709287200, -1, 0, -3601, None], [1709287200.5, -0.5, float("nan"), 2.0**60, None]])
def test_epoch_times_agree_with_the_per_record_rules(times, unit):
    shape = RowShape(("city", "vendor"), ("fare", "tip"), 3600, "at", unit)
    rows = [json.dumps({"city": "a", "vendor": str(i % 3), "fare": i, "tip": 1, "at": at}).encode()
            for i, at in enumerate(times)]  # fmt: skip
    records = parseable_records(100, rows)
    assert _parse(records, shape).table is not None
    assert_fold_matches_rows_one_at_a_time(records, 0, None, shape)


def test_message_keys_take_the_column_path_too():
    keys = [b"a", b"b", 'ünï "q"\n'.encode(), b"007", b"", None]
    records = [ParsedRecord(i, keys[i % len(keys)], orjson.dumps({"amount": i * 0.5})) for i in range(60)]
    reference_states, mine_states = {}, {}
    reference = one_at_a_time(records, 0, None, reference_states, key_field=None)
    assert _parse(records, RowShape(None, ("amount",))).table is not None
    assert folded(records, 0, None, mine_states, key_field=None) == reference
    assert_same_states(mine_states, reference_states)


@pytest.mark.parametrize("seed", range(5))
def test_a_sum_does_not_depend_on_how_the_records_were_batched(seed):
    """Live and batch fetch the same log in different batches: the sums must be the same bits,
    the correctly rounded sum of every value (math.fsum), whatever the split."""
    rng = random.Random(seed)
    scale = rng.choice([1.0, 1e6, 1e-3])
    values = [round(rng.uniform(-50, 500), 2) * scale for _ in range(3000)]
    keys = [b"k%d" % rng.randrange(3) for _ in values]
    records = [
        ParsedRecord(i, key, orjson.dumps({"amount": v})) for i, (key, v) in enumerate(zip(keys, values, strict=True))
    ]
    expected = {key: math.fsum(v for k, v in zip(keys, values, strict=True) if k == key) for key in set(keys)}
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(records)), rng.randrange(1, 60)))
        states = {}
        for start, stop in zip([0, *cuts], [*cuts, len(records)], strict=True):
            folded(records[start:stop], start, None, states, key_field=None)
        assert {key: state.sum for key, state in states.items()} == expected


# Records the column parser refuses or reads otherwise than orjson and json do: each must be judged
# by the per-record rules while the plain records around it keep the column path.
UNLIKE_ORJSON = [
    b'{"city": "a", "vendor": "v", "fare": "3.5", "tip": 1, "at": "2024-03-01T10:00:00"}',  # a value as text
    b'{"city": "a", "vendor": "v", "fare": -NaN, "tip": 1, "at": "2024-03-01T10:00:00"}',  # no JSON to Python
    b'{"city": "a", "vendor": "v", "fare": 5, "tip": 1, "at": "2024-03-01T10:00:00", "x": Inf}',  # Arrow reads it
    b'{"city": "a", "vendor": "v", "fare": -Inf, "tip": 1, "at": "2024-03-01T10:00:00"}',
    b'{"city": "a", "vendor": "v", "fare": 1, "tip": 1, "at": "2024-03-01T10:00:00", "x": "\xff"}',  # not UTF-8
    b'{"city": "a", "vendor": "v", "fare": 1, "tip": 1, "at": "2024-03-01T10:00:00"}x',  # trailing garbage
    b'\xef\xbb\xbf{"city": "a", "vendor": "v", "fare": 2, "tip": 1, "at": "2024-03-01T10:00:00"}',  # a BOM
    b'{"city": "a", "vendor": "v", "fare": 1, "tip": 1, "at": "2024-03-01T10:00:00", "x": '
    + b"[" * 1100
    + b"]" * 1100
    + b"}",  # nested deeper than orjson reads
    b'{"city": "a", "vendor": "v", "fare": 3, "tip": 1, "at": "2024-03-01T10:00:00", "x": {"y": [1]}}',  # nested
    b"not json",
    b"",
    b'{"city": 7, "vendor": "v", "fare": 1, "tip": 1, "at": "2024-03-01T10:00:00"}',  # a number as key
    b'{"city": "a", "city": "b", "vendor": "v", "fare": 1, "tip": 1, "at": "2024-03-01T10:00:00"}',
]


def fold_with_bad_records(monkeypatch, bad_rows: dict[int, bytes]) -> tuple[dict, int]:
    """A batch of plain rows with `bad_rows` put in: checked against the per-record rules; also
    returns how many records went through those rules."""
    import agents.fold

    plain = [json.dumps(row).encode() for row in PARSEABLE_ROWS[:4]]
    values = [bad_rows.get(i, plain[i % len(plain)]) for i in range(6000)]
    records = [ParsedRecord(i, b"k", value) for i, value in enumerate(values)]
    judged = []
    monkeypatch.setattr(agents.fold, "decode_row", lambda *a: judged.append(1) or decode_row(*a))
    return assert_fold_matches_rows_one_at_a_time(records, 0, None), len(judged)


@pytest.mark.parametrize("bad", UNLIKE_ORJSON)
def test_a_record_the_columns_cannot_judge_is_judged_alone(monkeypatch, bad):
    mine, judged = fold_with_bad_records(monkeypatch, {3: bad, 2000: bad, 5999: bad})
    assert mine["rejected"] or mine["counted"] == 6000
    assert judged <= 3 * 2  # the refused record and the one Arrow may name instead; the rest keep the columns


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ('"fare": 1' + "0" * 400, None),  # beyond float: infinite, skipped as infinities are
        ('"fare": "\u0661\u0662"', "fare: value '\u0661\u0662' is not numeric"),  # digits float() reads, pandas not
        ('"fare": "\uff11\uff12"', "fare: value '\uff11\uff12' is not numeric"),
        ('"fare": "5\u00a0"', "fare: value '5\\xa0' is not numeric"),  # a space pandas does not strip
        ('"fare": "\u20071"', "fare: value '\\u20071' is not numeric"),
        ('"fare": "5\\u001f"', "fare: value '5\\x1f' is not numeric"),  # float() strips it
        ('"fare": 1, "at": 1e20', "time 1e+20 is outside the years 1 to 9999 as epoch seconds: is --time-unit right?"),
        ('"fare": 1, "at": 1700000000123456789', "time 1700000000123456789 is outside the years 1 to 9999"),
        ('"fare": 1, "at": 1180591620717411303424', "time 1.1805916207174113e+21 is outside the years 1 to 9999"),
        ('"fare": 1, "at": -62135596801', "time -62135596801 is outside the years 1 to 9999"),
        ('"fare": 1, "at": "9999-12-31T23:59:59-01:00"', "time '9999-12-31T23:59:59-01:00' is outside the years"),
        ('"fare": 1, "at": "2024-W09-5"', "time '2024-W09-5' is an ISO week date, which pandas does not read"),
        ('"fare": 1, "at": "2024W095"', "time '2024W095' is an ISO week date, which pandas does not read"),
    ],
)
def test_values_and_times_beyond_what_a_result_holds_never_stop_the_fold(fields, error):
    """An integer beyond float's range raised OverflowError, and a time beyond int64 or the
    years a snapshot can show raised in the key's encoding or the snapshot's: one such record
    stopped a pipeline for good. Each is judged alike by the rules and the columns."""
    message = ('{"city": "a", "vendor": "v", "tip": 1, ' + fields + "}").encode()
    if b'"at"' not in message:
        message = message[:-1] + b', "at": "2024-03-01T10:00:00"}'
    verdict = decode_row(None, message, None, SHAPE)
    if error is None:
        assert verdict.kind == COUNTED and verdict.values == (None, 1.0)
    else:
        assert verdict.kind == REJECTED and verdict.error.startswith(error), verdict.error
    row = {"city": "a", "vendor": "v", "tip": 1}
    numeric_times = [orjson.dumps({**row, "fare": i, "at": 1709287200 + i}) for i in range(50)]
    for plain in (numeric_times, [json.dumps(row).encode() for row in PARSEABLE_ROWS[:4]] * 10):
        records = [ParsedRecord(i, b"k", value) for i, value in enumerate([*plain[:20], message, *plain[20:], message])]
        mine = assert_fold_matches_rows_one_at_a_time(records, 0, None)
        assert len(mine["rejected"]) == (0 if error is None else 2)


def test_a_record_timestamp_beyond_the_years_a_result_holds_is_rejected():
    shape = RowShape(("city", "vendor"), ("fare", "tip"), 3600, "@timestamp", "s")
    value = b'{"city": "a", "vendor": "v", "fare": 1, "tip": 1}'
    records = [ParsedRecord(i, b"k", value, timestamp=1709287200000 + i) for i in range(30)]
    records[7] = ParsedRecord(7, b"k", value, timestamp=2**62)
    verdict = decode_row(None, value, 2**62, shape)
    assert verdict.kind == REJECTED and verdict.error == f"record timestamp {2**62} ms is outside the years 1 to 9999"
    mine = assert_fold_matches_rows_one_at_a_time(records, 0, None, shape=shape)
    assert len(mine["rejected"]) == 1


@pytest.mark.parametrize("position", [3, 5999], ids=["inside", "last"])
@pytest.mark.parametrize(
    "message",
    [
        b'{"city": "a", "vendor": "v", "fare": 4, "tip": 1, "at": "2024-03-01T10:00:00"}\n',
        b'{"city": "a",\n "vendor": "v", "fare": 5, "tip": 1, "at": "2024-03-01T10:00:00"}',
        b"",
    ],
    ids=["ends-a-line", "two-lines", "empty"],
)
def test_a_message_that_is_not_one_line_is_judged_alone(monkeypatch, message, position):
    """The batch is parsed as one message per line: a message that ends a line or spans two
    would shift the rows, and an empty last one leaves the text ending in a newline."""
    mine, judged = fold_with_bad_records(monkeypatch, {position: message})
    assert mine["counted"] + mine["skipped"] + len(mine["rejected"]) == 6000
    assert judged >= 1


def test_many_records_the_columns_cannot_judge(monkeypatch):
    bad_rows = {index: UNLIKE_ORJSON[n % len(UNLIKE_ORJSON)] for n, index in enumerate(range(3, 6000, 37))}
    mine, _ = fold_with_bad_records(monkeypatch, bad_rows)
    assert len(mine["rejected"]) >= len(bad_rows) // 2


@pytest.mark.parametrize("distinct", [200, 80_000], ids=["radix-sorted", "beyond-16-bits"])
def test_groups_come_in_the_stores_key_order_each_with_its_own_rows(distinct):
    """The agent reads and writes a batch's keys in the order the fold gives them, and RocksDB
    takes keys in bytewise order far faster than in arrival order. Up to 2**16 distinct keys,
    the rows are grouped by a radix sort, beyond by another."""
    rng = random.Random(5)
    cities = [f"c{n}" for n in rng.sample(range(10 * distinct), distinct)] + ["Zürich", "zeta", "Ab", "a", "b,c"]
    records = [
        ParsedRecord(offset, None, orjson.dumps({"city": rng.choice(cities), "amount": offset}))
        for offset in range(max(3000, 4 * distinct))
    ]
    groups = fold(records, RowShape(("city",), ("amount",)), KeyLayout(), counted_from=0).groups
    assert groups.keys == sorted(groups.keys) and len(groups.keys) == len(set(groups.keys))
    expected: dict[bytes, list[int]] = {}
    for record in records:
        expected.setdefault(orjson.loads(record.value)["city"].encode(), []).append(record.offset)
    assert (len(groups.keys) > 1 << 16) == (distinct > 1 << 16)
    for index, key in enumerate(groups.keys):
        assert groups.offsets[groups.starts[index] : groups.ends[index]].tolist() == expected[key]


@pytest.mark.parametrize(
    ("vendor", "key"),
    [(b"12.50", "12.50"), (b"1e3", "1e3"), (b"-0", "-0"), (b"-0.0", "-0.0"), (b"7", "7"), (b"1.0", "1.0"),
     (b"123456789012345678901234567890", "123456789012345678901234567890"), (b'"12.50"', "12.50")],
)  # fmt: skip
def test_a_number_in_a_key_field_is_the_key_as_written(vendor, key):
    """orjson reads `12.50` as 12.5: the key was `12.5`, where pandas reads a CSV's `12.50` with
    dtype=str as `12.50` (kappa load writes it so, as a number the worker can count)."""
    message = b'{"city": "a", "vendor": ' + vendor + b', "fare": 2, "tip": 1, "at": "2024-03-01T10:00:00"}'
    verdict = decode_row(None, message, None, SHAPE)
    assert verdict.kind == COUNTED and verdict.texts == ("a", key), verdict
    records = [ParsedRecord(i, b"k", message) for i in range(3)]
    assert_fold_matches_rows_one_at_a_time(records, 0, None)


@pytest.mark.parametrize("depth", [990, 1023])
def test_a_number_in_a_key_field_beside_a_deeply_nested_field_never_stops_the_fold(depth):
    """A key that is a number is read again with the standard library to keep its text, whose
    recursion limit (1000) is below orjson's nesting limit (1024): a row orjson reads, with a
    field nested about 1000 deep, raised RecursionError out of the rules, so the replay's
    preflight failed with a traceback and a worker failed on each start (found by helper-27)."""
    message = b'{"city": "a", "vendor": 7.5, "fare": 2, "tip": 1, "at": "2024-03-01T10:00:00", "n": '
    message += b"[" * depth + b"]" * depth + b"}"
    verdict = decode_row(None, message, None, SHAPE)
    assert verdict.kind == COUNTED and verdict.texts == ("a", "7.5"), verdict
    plain = json.dumps(PARSEABLE_ROWS[0]).encode()
    records = [ParsedRecord(i, b"k", message if i % 7 == 3 else plain) for i in range(30)]
    assert_fold_matches_rows_one_at_a_time(records, 0, None)


@pytest.mark.parametrize("gaps", [(), (3,), (0, 1, 2), (5, 6, 7), (1, 2, 10)])
def test_offsets_with_holes_gate_what_is_counted_and_applied(gaps):
    """A log with transaction markers or compacted records has offsets that hold no record:
    the fold must take each record's own offset, not assume consecutive ones from the first."""
    offsets = [offset for offset in range(12) if offset not in gaps]
    records = [ParsedRecord(offset, b"k", orjson.dumps({"amount": offset})) for offset in offsets]
    assert record_offsets(records).tolist() == offsets
    states = {b"k": MeanState(total=math.fsum(o for o in offsets if o < 6), count=sum(o < 6 for o in offsets),
                              next_offset=6)}  # fmt: skip
    assert folded(records, 4, None, states, key_field=None)["counted"] == sum(o >= 4 for o in offsets)
    assert (states[b"k"].count, states[b"k"].sum, states[b"k"].next_offset) == (
        len(offsets),
        math.fsum(offsets),
        offsets[-1] + 1,
    )
