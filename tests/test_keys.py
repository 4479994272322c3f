"""Stored group keys: their bytes order like the tuple, and whole columns decode as each key does."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from tables.keys import KeyLayout

AWKWARD_TEXTS = ["x", "\x00", "\x01", "a", "ü", "\x00\x00", "z\x00", "007", "a\x00\x01b"]
STARTS = [0, -3600, 1709251200, -(1 << 62), 1 << 62]


def random_keys(layout: KeyLayout, count: int, seed: int) -> list[tuple[list[str], int | None]]:
    rng = random.Random(seed)
    return [
        (
            ["".join(rng.choice(AWKWARD_TEXTS) for _ in range(rng.randint(1, 3))) for _ in layout.fields],
            rng.choice(STARTS) if layout.windowed else None,
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    "layout", [KeyLayout(("a", "b"), True), KeyLayout(("a", "b", "c")), KeyLayout(("a",), True), KeyLayout()]
)
def test_columns_decode_whole_columns_as_each_key_decodes(layout):
    keys = random_keys(layout, 2000, seed=len(layout.fields))
    stored = pa.array([layout.encode(texts, start) for texts, start in keys], type=pa.binary())
    if layout.plain:
        stored = stored.cast(pa.string())
    columns = layout.columns(pa.chunked_array([stored.slice(3, 100), stored.slice(103)]))  # offsets, chunks
    for row, (texts, start) in enumerate(keys[3:]):
        assert [columns[name][row].as_py() for name in layout.fields] == texts
        assert layout.decode(stored[row + 3].as_py() if not layout.plain else texts[0].encode())[0] == texts
        if layout.windowed:
            assert columns["window_start"][row].value == start


def test_stored_keys_order_like_their_tuples():
    layout = KeyLayout(("a", "b"), True)
    keys = random_keys(layout, 2000, seed=5)
    by_bytes = sorted(keys, key=lambda pair: layout.encode(*pair))
    by_tuple = sorted(keys, key=lambda pair: ([text.encode() for text in pair[0]], pair[1]))
    assert by_bytes == by_tuple
