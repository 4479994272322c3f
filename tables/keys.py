"""How a group key is stored: bytes whose order is the snapshot's row order.

RocksDB iterates in bytewise order and the snapshot merge sorts bytewise, so the encoding
must order like the tuple (key fields..., window start):

- one key field and no window: the field's UTF-8 text, unchanged (the common case, and
  what tables written before composite keys hold);
- otherwise each field's UTF-8 text with NUL escaped as NUL 0x01, closed by NUL NUL
  (a shorter field sorts first, as in the tuple), then, with a window, its start in epoch
  seconds as 8 big-endian bytes with the sign bit flipped (so negative starts sort first).

No encoded key starts with 0xff, so tables.grouped_mean's stats key cannot collide.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ESCAPED_NUL = b"\x00\x01"
FIELD_END = b"\x00\x00"
SIGN = 1 << 63
WINDOW = struct.Struct(">Q")


@dataclass(frozen=True)
class KeyLayout:
    """The shape of a pipeline's group key: its field names and whether it has a window."""

    fields: tuple[str, ...] = ("key",)
    windowed: bool = False

    @property
    def plain(self) -> bool:
        """One field and no window: the key is stored as its text."""
        return len(self.fields) == 1 and not self.windowed

    def encode(self, texts: Sequence[str], window_start: int | None = None) -> bytes:
        if self.plain:
            return texts[0].encode("utf-8")
        parts = [text.encode("utf-8").replace(b"\x00", ESCAPED_NUL) + FIELD_END for text in texts]
        if self.windowed:
            assert window_start is not None
            parts.append(WINDOW.pack(window_start + SIGN))
        return b"".join(parts)

    def encode_columns(self, texts: Sequence[pa.Array], window_starts: np.ndarray | None = None) -> pa.Array:
        """`encode` for whole columns: key field texts (Arrow strings) and window starts."""
        if self.plain:
            return texts[0].cast(pa.binary())
        parts = [pc.replace_substring(text.cast(pa.binary()), b"\x00", ESCAPED_NUL) for text in texts]
        if window_starts is None:
            parts.append(pa.array([b""] * len(texts[0]), type=pa.binary()))  # the last field's end follows
        else:
            packed = (window_starts.view(np.uint64) ^ np.uint64(SIGN)).astype(">u8").tobytes()
            windows = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(WINDOW.size), len(window_starts), [None, pa.py_buffer(packed)]
            )
            parts.append(windows.cast(pa.binary()))
        return pc.binary_join_element_wise(*parts, FIELD_END)

    def decode(self, raw: bytes) -> tuple[list[str], int | None]:
        if self.plain:
            return [raw.decode("utf-8")], None
        texts, position = [], 0
        for _ in self.fields:
            end = position
            while True:
                end = raw.index(b"\x00", end)
                if raw[end + 1] == 0:
                    break
                end += 2
            texts.append(raw[position:end].replace(ESCAPED_NUL, b"\x00").decode("utf-8"))
            position = end + 2
        window = WINDOW.unpack_from(raw, position)[0] - SIGN if self.windowed else None
        return texts, window

    def key_type(self) -> pa.DataType:
        """The Arrow type of the stored key column in partials: text when plain."""
        return pa.string() if self.plain else pa.binary()

    def columns(self, keys: pa.Array) -> dict[str, pa.Array]:
        """The snapshot's key columns (and `window_start`) from stored keys, in their order:
        `decode` for whole columns, with no Python object per key."""
        if self.plain:
            return {self.fields[0]: keys}
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        fields = keys
        columns: dict[str, pa.Array] = {}
        if self.windowed:
            fields = pc.binary_slice(keys, 0, -WINDOW.size)
            packed = pc.binary_slice(keys, -WINDOW.size).cast(pa.binary(WINDOW.size))
            data = np.frombuffer(packed.buffers()[1], dtype=">u8", count=len(keys), offset=packed.offset * WINDOW.size)
            starts = (data.astype(np.uint64) ^ np.uint64(SIGN)).view(np.int64)
            window = pa.array(starts, type=pa.timestamp("s", tz="UTC"))
        # no field holds NUL NUL (its NULs are escaped as NUL 0x01), so each field ends at the first one
        split = pc.split_pattern(fields, FIELD_END, max_splits=len(self.fields))
        for index, name in enumerate(self.fields):
            field = pc.replace_substring(pc.list_element(split, index), ESCAPED_NUL, b"\x00")
            columns[name] = field.cast(pa.string())
        if self.windowed:
            columns["window_start"] = window
        return columns

    def output_fields(self) -> list[tuple[str, pa.DataType]]:
        fields = [(name, pa.string()) for name in self.fields]
        if self.windowed:
            fields.append(("window_start", pa.timestamp("s", tz="UTC")))
        return fields


PLAIN = KeyLayout()
