"""Merging partition parts into snapshot rows: key order, partials added up, any chunking.

Parts are real Parquet files on disk, written by the workers' own `write_part`; the oracle
is computed here with math.fsum over every partial, per key.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from kappa.snapshots import parts
from tables.aggregate import MEAN, Mean, MeanState, partials_table
from tables.grouped_mean import PartitionStats

AWKWARD = ["São Paulo", "東京", "a,b", 'say "hi"', "line\nbreak", "007", "7", "emoji 🎉", " padded "]


def write_spread_parts(directory, partitions: int, seed: int = 3) -> dict[str, tuple[int, float]]:
    """Keys spread over several partitions (as an outside partitioner does), with partials
    that nearly cancel; returns key -> (count, exact sum)."""
    rng = np.random.default_rng(seed)
    partials_by_key: dict[str, list[MeanState]] = defaultdict(list)
    for partition in range(partitions):
        names = {f"k{int(k)}" for k in rng.integers(0, 400, 250)} | set(AWKWARD[partition::2])
        partials = []
        for name in sorted(names, key=lambda n: n.encode()):
            state = MeanState(
                float(rng.choice([1e12, -1e12]) + rng.normal()), float(rng.normal(0, 1e-5)), int(rng.integers(0, 4))
            )
            partials.append((name.encode(), MEAN.encode([state])))
            partials_by_key[name].append(state)
        parts.write_part(directory, partition, partials_table(partials), PartitionStats(next_offset=partition + 1))
    return {
        key: (sum(s.count for s in states), math.fsum([s.total for s in states] + [s.compensation for s in states]))
        for key, states in partials_by_key.items()
    }


@pytest.mark.parametrize("chunk_rows", [1, 97, 65_536])
def test_parts_merge_into_key_ordered_exact_rows(tmp_path, chunk_rows):
    expected = write_spread_parts(tmp_path, partitions=4)
    merged = parts.merge_parts(tmp_path, 4)
    frame = pa.concat_tables(merged.snapshot_rows(size=chunk_rows).chunks).to_pandas()

    assert list(frame["key"]) == sorted(expected)  # code-point order, one row per key
    assert merged.offsets == {0: 1, 1: 2, 2: 3, 3: 4}
    for key, count, total, mean in frame[["key", "count", "sum", "mean"]].itertuples(index=False):
        want_count, want_sum = expected[key]
        assert count == want_count, key
        assert total == pytest.approx(want_sum, rel=1e-12, abs=1e-9), key
        assert math.isnan(mean) if count == 0 else mean == pytest.approx(want_sum / count, rel=1e-12, abs=1e-9)
    assert sum(1 for v in expected.values() if v[0] == 0) > 0  # the empty-mean case was exercised


def test_no_parts_is_an_empty_table(tmp_path):
    assert list(parts.merge_parts(tmp_path, 3).snapshot_rows().chunks) == []


def test_the_batch_and_the_live_path_merge_alike(tmp_path):
    """One merge: partials read straight from encoded entries give the parts' rows."""
    from kappa.snapshots.snapshot import merge_partials

    expected = write_spread_parts(tmp_path, partitions=3, seed=5)
    merged = parts.merge_parts(tmp_path, 3)
    live = pa.concat_tables(merged.snapshot_rows().chunks).to_pandas()
    batch = pa.concat_tables(merge_partials([run.to_batches() for run in merged.runs]).chunks).to_pandas()
    pd.testing.assert_frame_equal(live, batch)
    assert len(live) == len(expected)


def test_entries_carry_a_version_and_older_entries_still_read():
    state = MeanState(total=1.5, compensation=1e-17, count=3, next_offset=42)
    encoded = MEAN.encode([state])
    assert encoded[0] == 2 and len(encoded) == 33 and MEAN.decode(encoded) == [state]
    version_1 = b"\x01[42,1.5,1e-17,3]"  # how kappa stored an entry until version 2
    legacy = b"[1.5,1e-17,3,42]"  # how kappa stored an entry before versions
    assert MEAN.decode(version_1) == [state] and MEAN.decode(legacy) == [state]
    assert MEAN.decode(b'\x01[42,"inf",0.0,3]')[0].total == math.inf  # version 1 spelt infinities as text
    columns = MEAN.decode_many([encoded, version_1, legacy])
    assert columns["count"].tolist() == [3, 3, 3] and columns["total"].tolist() == [1.5, 1.5, 1.5]
    assert columns["compensation"].tolist() == [1e-17] * 3
    with pytest.raises(ValueError, match="encoding version 9"):
        MEAN.decode(bytes((9,)) + b"[]")
    two_values = Mean(("fare", "tip")).encode([state, state])
    with pytest.raises(ValueError, match="holds 2 value"):
        MEAN.decode_many([encoded, two_values])


def test_a_mean_of_nothing_is_null_in_parquet_and_empty_in_csv(tmp_path):
    """SPEC.md: `mean` is empty in CSV and null (not NaN) in Parquet where count is 0."""
    import pyarrow.parquet as pq

    from kappa.snapshots.snapshot import write_table_files

    expected = write_spread_parts(tmp_path / "parts", partitions=3, seed=9)
    rows = write_table_files(tmp_path, parts.merge_parts(tmp_path / "parts", 3).snapshot_rows())
    empty = sorted(key for key, (count, _) in expected.items() if count == 0)
    assert rows == len(expected) and empty
    table = pq.read_table(tmp_path / "table.parquet")
    means = dict(zip(table.column("key").to_pylist(), table.column("mean").to_pylist(), strict=True))
    assert sorted(key for key, mean in means.items() if mean is None) == empty
    assert not any(isinstance(mean, float) and math.isnan(mean) for mean in means.values())
    csv = pd.read_csv(tmp_path / "table.csv", dtype={"key": str}, keep_default_na=False)
    assert sorted(csv.loc[csv["mean"] == "", "key"]) == empty


def test_entries_an_older_kappa_stored_take_new_batches_like_current_ones():
    """A live generation that an upgrade finds holds version 1 (JSON) entries; the next batch
    rewrites them as version 2, with the same arithmetic as entries that were version 2, and
    the same refusal of a batch the entry has partly applied (its stored offset is past the
    batch's first record: None, for the caller to apply record by record)."""
    import orjson

    from tables.aggregate import BatchSums

    states = [
        MeanState(1.5, 1e-17, 3, 42),
        MeanState(-2e12, 0.0, 1, 7),
        MeanState(float("inf"), 0.0, 2, 9),
        MeanState(4.0, 0.0, 1, 45),
    ]
    as_version_1 = [
        b"\x01" + orjson.dumps([s.next_offset, "inf" if math.isinf(s.total) else s.total, s.compensation, s.count])
        for s in states
    ]
    current = [MEAN.encode([state]) for state in states]
    batch = BatchSums(
        sums=np.array([[0.25], [3.0], [1.0], [2.0], [4.0]]),
        rests=np.array([[1e-20], [0.0], [0.0], [0.0], [0.0]]),
        counts=np.array([[2], [1], [1], [2], [3]]),
        first_offsets=np.array([50, 7, 9, 40, 0]),
        next_offsets=np.array([60, 8, 10, 50, 5]),
    )
    upgraded = MEAN.add_batches([*as_version_1, None], batch)
    assert upgraded == MEAN.add_batches([*current, None], batch)
    assert upgraded[3] is None, "the fourth entry applied part of this batch already"
    first, second, third, new = (MEAN.decode(upgraded[index])[0] for index in (0, 1, 2, 4))
    assert all(upgraded[index][0] == 2 for index in (0, 1, 2, 4))
    assert (first.count, first.next_offset, second.count, third.total, new.count) == (5, 60, 2, math.inf, 3)
    assert first.total + first.compensation == 1.75 and second.total + second.compensation == -2e12 + 3.0


def _runs_of(partials_by_run: list[list[tuple[bytes, bytes]]], batch_rows: int) -> list[list[pa.RecordBatch]]:
    return [partials_table(run).to_batches(max_chunksize=batch_rows) for run in partials_by_run]


def test_the_merge_reads_each_run_a_slice_at_a_time():
    """A snapshot holds a slice of every run, not the whole table: when the first chunk comes
    out, each run has been read only about `size / runs` rows ahead."""
    from kappa.snapshots.snapshot import merge_partials

    state = MEAN.encode([MeanState(total=3.0, count=2)])
    runs = [[(f"k{key:05d}".encode(), state) for key in range(run, 20_000, 4)] for run in range(4)]
    taken = [0] * len(runs)

    def counted(index: int, batches: list[pa.RecordBatch]):
        for batch in batches:
            taken[index] += batch.num_rows
            yield batch

    batches = _runs_of(runs, batch_rows=100)
    chunks = iter(merge_partials([counted(i, b) for i, b in enumerate(batches)], size=1_000).chunks)
    first = next(chunks)
    assert first.column("key").to_pylist()[:3] == ["k00000", "k00001", "k00002"]
    assert max(taken) <= 300  # 1,000 / 4 runs, rounded up to whole batches of 100
    rest = pa.concat_tables([first, *chunks]).to_pandas()
    assert sum(taken) == 20_000 and len(rest) == 20_000
    assert list(rest["key"]) == [f"k{key:05d}" for key in range(20_000)]
    assert (rest["count"] == 2).all() and (rest["mean"] == 1.5).all()


def test_a_run_out_of_key_order_is_refused():
    """Merged a slice at a time, a run out of order would split a key over two rows: refused."""
    from kappa.errors import KappaError
    from kappa.snapshots.snapshot import merge_partials

    state = MEAN.encode([MeanState(total=1.0, count=1)])
    ordered = [(key.encode(), state) for key in ("a", "b", "c", "d")]
    shuffled = [(key.encode(), state) for key in ("a", "c", "b", "d")]
    assert len(pa.concat_tables(merge_partials(_runs_of([ordered, ordered], 2), size=2).chunks)) == 4
    with pytest.raises(KappaError, match="not in key order"):
        list(merge_partials(_runs_of([ordered, shuffled], 2), size=2).chunks)
    with pytest.raises(KappaError, match="not in key order"):
        list(merge_partials(_runs_of([ordered, shuffled], 1), size=2).chunks)  # across batches
