"""The load ledger: which files are on a topic, kept in Kafka beside it.

`<topic>.loads` is a compacted one-partition topic; its key is a load id, its value a JSON entry
(file, fingerprint, key, state `started` or `complete`, the topic's end offsets when the load
started). The loader writes `started` before it sends a row and `complete` after every row is
acknowledged, and puts the load id and a row number in one header (`kappa.load: <load id>:<row>`)
on the last message of every block of rows it sends (`BLOCK_ENDS`; kappa before 2026-12-07 put it
on every message, `EVERY_ROW`). So the log itself says which rows of an interrupted load arrived:
rows are sent in file order in transactions that end only at a block's end, so the committed rows
are those up to the highest row number found after the load's start offsets. Entries name the
topic's id, so a deleted and re-created topic starts a new ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Message, Producer

from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.kafka.reader import STALL_S, read_ranges

HEADER = "kappa.load"  # value: b"<load id>:<row number>"; one header, since every replay parses it
STARTED, COMPLETE = "started", "complete"
# which messages of a load carry its row header (LedgerEntry.row_marks): every one, or the last
# of each block, which is where every transaction of the load ends (a header per message was a
# third of a load's time: a Python list per row, and librdkafka's headers per message)
EVERY_ROW, BLOCK_ENDS = "every-row", "block-ends"
READER_GROUP = "kappa-load-ledger"


def ledger_topic(topic: str) -> str:
    return f"{topic}.loads"


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class LedgerEntry:
    load_id: str
    fingerprint: str
    occurrence: int
    file: str
    key: str
    topic_id: str
    state: str
    start_offsets: dict[int, int]
    started_at: str = field(default_factory=now_utc)
    rows: int | None = None
    completed_at: str | None = None
    row_marks: str = EVERY_ROW  # entries written before 2026-12-07 have none: every row was marked

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_NON_STR_KEYS)

    @classmethod
    def decode(cls, value: bytes) -> LedgerEntry:
        """An entry as written; one with a field this kappa does not know (a later kappa's) is
        refused in one line: what the field means for resuming that load is not known here."""
        recorded = orjson.loads(value)
        unknown = sorted(set(recorded) - {known.name for known in fields(cls)})
        if unknown:
            raise KappaError(
                f"the load ledger entry of {recorded.get('file', '?')} has fields this kappa does not know "
                f"({', '.join(unknown)}): a later kappa wrote it; load into this topic with that kappa"
            )
        entry = cls(**recorded)
        entry.start_offsets = {int(p): int(o) for p, o in entry.start_offsets.items()}
        if entry.row_marks not in (EVERY_ROW, BLOCK_ENDS):
            raise KappaError(
                f"the load ledger entry of {entry.file} marks its rows as {entry.row_marks!r}, which this kappa "
                f"does not know (it knows {EVERY_ROW!r} and {BLOCK_ENDS!r}): load it with the kappa that began it"
            )
        return entry


def load_id(fingerprint: str, occurrence: int) -> str:
    """The first load of a file is its fingerprint (64 bits of it: ids only need to differ among
    one topic's loads, and every message carries one); each `--again` is a further occurrence."""
    base = fingerprint[:16]
    return base if occurrence == 1 else f"{base}.{occurrence}"


def read_ledger(broker: str, topic: str, stall_s: float = STALL_S) -> list[LedgerEntry]:
    """Every load recorded for `topic`, latest entry per load id, in the order they were written."""
    entries: dict[str, LedgerEntry] = {}
    for entry in ledger_writes(broker, topic, stall_s):
        entries.pop(entry.load_id, None)
        entries[entry.load_id] = entry
    return list(entries.values())


def ledger_writes(broker: str, topic: str, stall_s: float = STALL_S) -> list[LedgerEntry]:
    """Every entry the ledger of `topic` still holds, in the order written: compaction keeps the
    latest per load id, and removes earlier ones only from segments no longer written to."""
    name = ledger_topic(topic)
    if admin.partition_count(broker, name) is None:
        return []
    writes: list[LedgerEntry] = []

    def keep(message: Message) -> None:
        if message.value() is not None:
            writes.append(LedgerEntry.decode(message.value()))

    read_ranges(broker, name, admin.watermarks(broker, name, 1), keep, group=READER_GROUP, stall_s=stall_s)
    return writes


class LedgerWriter:
    """Writes entries with acks from all in-sync replicas; returns only once the broker has one."""

    def __init__(self, broker: str, topic: str) -> None:
        admin.ensure_topic(broker, ledger_topic(topic), 1, {"cleanup.policy": "compact"})
        self.topic = ledger_topic(topic)
        self.producer = Producer(admin.client_config(broker, **{"enable.idempotence": True, "acks": "all"}))

    def write(self, entry: LedgerEntry) -> None:
        errors: list[str] = []

        def delivered(error, _message) -> None:
            if error is not None:
                errors.append(error.str())

        self.producer.produce(self.topic, entry.encode(), entry.load_id.encode(), on_delivery=delivered)
        unsent = self.producer.flush(120)
        if errors or unsent:
            reason = errors[0] if errors else "no acknowledgement within 120s"
            raise KappaError(
                f"could not record the load of {entry.file} as {entry.state} in {self.topic!r} ({reason}): "
                "check the broker, then run the same command again"
            )


@dataclass
class RowsOnLog:
    """Which row numbers of one load the log holds (a byte per row; enough for a billion rows)."""

    present: bytearray
    count: int
    duplicates: int

    @classmethod
    def none(cls) -> RowsOnLog:
        return cls(bytearray(), 0, 0)

    @classmethod
    def through(cls, last: int | None, duplicates: int = 0) -> RowsOnLog:
        """Rows 0 to `last` (none for None): a load that marks block ends (`BLOCK_ENDS`)."""
        count = 0 if last is None else last + 1
        return cls(bytearray(b"\x01") * count, count, duplicates)

    def add(self, row: int) -> None:
        if row >= len(self.present):
            self.present.extend(bytes(max(row + 1 - len(self.present), len(self.present))))
        if self.present[row]:
            self.duplicates += 1
        else:
            self.present[row] = 1
            self.count += 1


def header_prefix(load: str) -> bytes:
    return load.encode() + b":"


def block_end_headers(prefix: bytes, rows: Sequence[int]) -> list[list[tuple[str, bytes]] | None]:
    """The header lists of a block of rows that marks its end (`BLOCK_ENDS`): the last row's only."""
    headers: list[list[tuple[str, bytes]] | None] = [None] * len(rows)
    if rows:
        headers[-1] = [(HEADER, prefix + str(rows[-1]).encode())]
    return headers


def row_headers(prefix: bytes, rows: Sequence[int]) -> list[list[tuple[str, bytes]]]:
    """Each row's header list, `[(HEADER, prefix + row number)]`, the numbers written at once."""
    row_numbers = np.arange(rows.start, rows.stop) if isinstance(rows, range) else np.asarray(rows, dtype=np.int64)
    numbers = pa.array(row_numbers).cast(pa.string()).cast(pa.binary())
    texts = pc.binary_join_element_wise(pa.scalar(prefix, pa.binary()), numbers, pa.scalar(b"", pa.binary()))
    return [[(HEADER, text)] for text in texts.to_pylist()]


def _row_of(headers: Iterable[tuple[str, bytes]] | None, prefix: bytes) -> int | None:
    if not headers:
        return None
    for name, value in headers:
        if name == HEADER and value.startswith(prefix):
            return int(value[len(prefix) :])
    return None


def transactional_id(entry: LedgerEntry) -> str:
    """The transactional.id of every run of one load (of one topic, by its id): each run's
    init_transactions fences the runs before it and has the broker resolve their open transaction."""
    return f"kappa-load.{entry.topic_id}.{entry.load_id}"


def rows_on_log(broker: str, topic: str, entry: LedgerEntry, wait_s: float = STALL_S) -> RowsOnLog:
    """Scan the topic from the load's start offsets to each partition's high watermark for rows
    carrying its id, as a `read_committed` consumer reads them: the rows a replay counts.

    Run it once this run's init_transactions has returned: the broker has then resolved the
    transaction an earlier run of the load left open (aborted it, or finished committing it) and
    written its markers with acks from every in-sync replica, so all of the earlier runs' records
    are below the high watermark, committed or aborted for good. (Reading only below the high
    watermark as it was found, a re-run missed the last batches of a run stopped while a frozen
    follower held the watermark back, sent them again, and both copies were committed.) Rows of an
    aborted transaction are not on the log: they are sent again. A transaction of another producer
    still open below the high watermark is waited for, up to `wait_s` without progress: rows of
    this load committed after it began are above the last stable offset until it ends.

    Rows of a load written without transactions (kappa before 2026-12-07) are read the same way,
    and so are those of a load that marks every row (`EVERY_ROW`); for one that marks block ends
    (`BLOCK_ENDS`), every row up to the highest one found is on the log (see the module's doc)."""
    partitions = admin.require_partition_count(broker, topic)
    ends = admin.high_watermarks(broker, topic, partitions)
    ranges = {p: (entry.start_offsets.get(p, 0), end) for p, end in ends.items()}
    prefix = header_prefix(entry.load_id)
    found = RowsOnLog.none()

    def collect(message: Message) -> None:
        row = _row_of(message.headers(), prefix)
        if row is not None:
            found.add(row)

    read_ranges(broker, topic, ranges, collect, group=READER_GROUP, stall_s=wait_s, to_end=True)
    if entry.row_marks == BLOCK_ENDS:
        highest = found.present.rfind(1)
        return RowsOnLog.through(highest if highest >= 0 else None, found.duplicates)
    return found
