"""`kappa load`: put a file's rows on the log exactly once, one message per row, as fast as Kafka takes them.

Rows are read in chunks (bounded memory), turned into JSON objects with orjson (NaN becomes
null), and produced through librdkafka with large lz4 batches, acks from all in-sync replicas
and idempotence on, so a retried batch is never written twice. The message key is the row's key
field as UTF-8, partitioned with murmur2 as the Java client and Faust do.

Rows are sent in transactions (one transactional.id per load, `ledger.transactional_id`),
committed every `TRANSACTION_ROWS` rows or `TRANSACTION_S` seconds, whichever comes first. A
re-run's init_transactions fences every earlier run of the load and has the broker resolve the
transaction one left open, so the re-run's ledger scan sees each earlier row committed or aborted
for good: without it, rows on a leader that a frozen follower kept above the high watermark were
missed by the scan, sent again, and later committed twice. Aborted rows are not on the log for
any reader kappa has (its workers, replays and the ledger scan read `read_committed`, as kcat and
librdkafka do by default), so the re-run sends them again.

Across runs, exactly-once comes from the ledger (kappa/load/ledger.py): a file is known by the
sha256 of its bytes, the last message of every block of rows carries its load id and row number
in a header, every transaction ends at a block's end, and a re-run of an interrupted load sends
only the rows after the highest one on the log; a completed file is not sent again unless the
user asks for another occurrence (`--again`).
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from itertools import repeat, starmap
from operator import length_hint
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Producer

from kappa.config import Settings
from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.load.ledger import (
    BLOCK_ENDS,
    COMPLETE,
    EVERY_ROW,
    STARTED,
    LedgerEntry,
    LedgerWriter,
    RowsOnLog,
    block_end_headers,
    header_prefix,
    ledger_writes,
    load_id,
    now_utc,
    read_ledger,
    row_headers,
    rows_on_log,
    transactional_id,
)
from kappa.load.sources import Chunk, Source, opened_source, split_name
from kappa.ops.progress import ProgressLine
from kappa.processes import handling_signals, relax_garbage_collector, sigterm_interrupts

DEFAULT_PARTITIONS = 8
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_TOPIC_LENGTH = 249 - len(".loads")  # Kafka's limit, leaving room for the ledger beside the topic
DELIVERY_TIMEOUT_S = 120  # librdkafka retries a batch this long: long enough to ride out a leader election
# The broker aborts a transaction left open this long (a load killed outright): readers of the topic
# (read_committed) wait for it until then, unless the load is run again, which aborts it at once.
# Longer than the delivery timeout, as librdkafka requires, so a batch retried through a leader
# election does not outlive its transaction.
TRANSACTION_TIMEOUT_S = DELIVERY_TIMEOUT_S + 30
TRANSACTION_ROWS = 500_000  # rows a transaction holds at most; each commit waits for its rows' acks
TRANSACTION_S = 2.0  # ... and seconds: how long a live worker waits to see rows being loaded
GIVE_UP_S = 2.0  # after a second Ctrl-C (or SIGTERM), how long the open transaction's abort is waited for
READABLE_WAIT_S = 30.0  # how long a finished load waits for its last commit markers (milliseconds, as a rule)
POLL_EVERY = 20_000  # rows between progress lines and the checks for delivery errors and Ctrl-C
POLL_WAIT_S = 0.1  # the delivery poller's longest wait for a report
QUEUE_FULL_WAIT_S = 0.05  # the producing thread's poll when librdkafka's queue is full
PRODUCER_MAX_MESSAGE_BYTES = 10_000_000  # librdkafka's message.max.bytes, set below
BATCH_BYTES = 1_000_000  # a produce batch's bytes before compression, unless the topic takes less
# a message's bytes beside its key and value on the broker: its batch's framing (61 bytes), the
# record's own (about 20) and the row header (about 40), with room to spare
MESSAGE_FRAMING_BYTES = 512


@dataclass
class LoadResult:
    topic: str
    rows: int
    seconds: float
    created: bool
    total: int = 0
    resumed_from: int | None = None
    not_objects: int = 0
    previous: LedgerEntry | None = None
    too_large: TooLarge | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def topic_for_path(path: str) -> str:
    """The file name without its known extension; a name Kafka would refuse is refused here."""
    if path == "-":
        raise KappaError("reading from stdin needs a topic name: pass --topic NAME")
    split = split_name(Path(path).name)
    stem = split[0] if split else Path(path).name
    return check_topic_name(stem, derived_from=path)


def check_topic_name(topic: str, derived_from: str | None = None) -> str:
    """Kafka accepts [a-zA-Z0-9._-] up to 249 characters, except `.` and `..`; the ledger topic
    `<topic>.loads` must fit as well."""
    if TOPIC_NAME.match(topic) and len(topic) <= MAX_TOPIC_LENGTH and topic not in (".", ".."):
        return topic
    origin = f" (derived from {derived_from!r})" if derived_from else ""
    shown = topic if len(topic) <= 60 else topic[:57] + "..."
    raise KappaError(
        f"topic name {shown!r}{origin} is not one Kafka accepts: expected 1 to {MAX_TOPIC_LENGTH} letters, digits, "
        f"'.', '_' or '-' (not '.' or '..'); pass --topic NAME"
    )


def producer_config(
    broker: str, topic_limit: int = PRODUCER_MAX_MESSAGE_BYTES, transactional: str | None = None
) -> dict:
    """The loader's producer; its batches are no longer than `topic_limit` bytes (uncompressed),
    the longest message the topic takes, or the broker would refuse every batch of a topic
    whose max.message.bytes is below the batch size. With a `transactional` id it sends in
    transactions (idempotence comes with them)."""
    transactions = (
        {"transactional.id": transactional, "transaction.timeout.ms": TRANSACTION_TIMEOUT_S * 1000}
        if transactional is not None
        else {}
    )
    return admin.client_config(
        broker,
        **transactions,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "delivery.timeout.ms": DELIVERY_TIMEOUT_S * 1000,
            "linger.ms": 50,
            "batch.size": min(BATCH_BYTES, topic_limit),
            "batch.num.messages": 100_000,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "message.max.bytes": PRODUCER_MAX_MESSAGE_BYTES,
            "delivery.report.only.error": True,
        },
    )


def _prepare_topic(broker: str, topic: str, partitions: int | None, replication_factor: int | None) -> bool:
    """Create the topic if missing (True when created here). An explicit --partitions that
    differs from an existing topic's count is reported, and the rows go to the existing partitions:
    changing a topic's partition count would move keys between partitions."""
    existing = admin.partition_count(broker, topic)
    if existing is None:
        return admin.ensure_topic(
            broker, topic, partitions or DEFAULT_PARTITIONS, admin.UNLIMITED_RETENTION, replication_factor
        )
    if partitions is not None and partitions != existing:
        note(
            f"warning: topic {topic!r} already has {existing} partitions; --partitions {partitions} applies only "
            f"when the topic is created, so the rows go to its {existing} partitions"
        )
    return False


class DeliveryErrors:
    """librdkafka reports only failed messages (successes are not worth a Python call each).
    A message purged while in flight may or may not have reached the broker: it is `unsure`."""

    def __init__(self) -> None:
        self.failed = 0
        self.unsure = 0
        self.first: str | None = None

    def __call__(self, error, _message) -> None:
        if error is None:
            return
        if error.name() == "_PURGE_INFLIGHT":
            self.unsure += 1
            return
        self.failed += 1
        if self.first is None and error.name() != "_PURGE_QUEUE":
            self.first = error.str()

    @property
    def count(self) -> int:
        return self.failed + self.unsure


@dataclass
class Plan:
    """What this run does: a fresh load, or the rest of an interrupted one (`resuming`: which of
    its rows the log holds is read once this run's transactions have begun, `_resume`)."""

    entry: LedgerEntry
    on_log: RowsOnLog
    total: int | None
    resuming: bool = False


@dataclass
class TooLarge:
    """Rows whose message is longer than the topic takes (`limit` bytes, the smaller of the
    topic's max.message.bytes and the producer's own limit, before compression). They cannot be
    on the log, so they are reported and not sent: sent, the producer or the broker would
    refuse them, and the load would stop at the same row on every run."""

    limit: int
    rows: list[tuple[int, int]] = field(default_factory=list)  # (row number, message bytes)

    def __len__(self) -> int:
        return len(self.rows)

    def below(self, row: int) -> int:
        """How many of these rows come before row number `row`."""
        return sum(1 for number, _ in self.rows if number < row)

    def keep_fitting(self, chunk: Chunk, first: int, rows: range | list[int]) -> range | list[int]:
        """The given rows of the chunk (whose first row is number `first`) whose message fits;
        the others are recorded here."""
        if chunk.longest + MESSAGE_FRAMING_BYTES <= self.limit:
            return rows
        fitting = []
        for row in rows:
            key = chunk.keys[row - first]
            size = len(chunk.values[row - first]) + (len(key) if key is not None else 0) + MESSAGE_FRAMING_BYTES
            if size > self.limit:
                self.rows.append((row, size))
            else:
                fitting.append(row)
        return fitting

    def line(self, topic: str) -> str:
        """One line for the user: how many rows, which (counted from 1, a header not counted)."""
        shown = ", ".join(f"{row + 1:,} ({size:,} bytes)" for row, size in self.rows[:5])
        more = f" and {len(self.rows) - 5:,} more" if len(self.rows) > 5 else ""
        if len(self.rows) == 1:
            rows, messages, which = "1 row was", "its message is", "row"
        else:
            rows, messages, which = f"{len(self.rows):,} rows were", "their messages are", "rows"
        return (
            f"warning: {rows} not loaded: {messages} longer than {topic!r} takes "
            f"({self.limit:,} bytes before compression): {which} {shown}{more}"
        )


def message_limit(broker: str, topic: str) -> int:
    """The longest message, in bytes, that `topic` takes from the loader."""
    configured = admin.topic_config_int(broker, topic, "max.message.bytes")
    return min(PRODUCER_MAX_MESSAGE_BYTES, configured) if configured is not None else PRODUCER_MAX_MESSAGE_BYTES


def _plan(settings: Settings, topic: str, source: Source, again: bool, writer: LedgerWriter) -> Plan | LedgerEntry:
    """Resume this file's unfinished load if there is one; else report it as loaded (the
    complete entry is returned) unless `again`; else record the start of a new occurrence."""
    fingerprint = source.fingerprint()
    topic_id = admin.topic_id(settings.broker, topic)
    # before the ledger is read: a run of the same load that this read misses records itself
    # later, and sends rows only after that, so they all lie past these (see _rows_sent_meanwhile)
    partitions = admin.require_partition_count(settings.broker, topic)
    start_offsets = admin.end_offsets(settings.broker, topic, partitions)
    ledger = [entry for entry in read_ledger(settings.broker, topic) if entry.topic_id == topic_id]
    entries = [entry for entry in ledger if entry.fingerprint == fingerprint]
    earlier = source.earlier_fingerprint() if ledger and not entries else None
    if earlier is not None:  # recorded before 2026-12-07 under the hash of a compressed file's bytes
        entries = [entry for entry in ledger if entry.fingerprint == earlier]
    unfinished = [entry for entry in entries if entry.state == STARTED]
    if unfinished:
        entry = unfinished[-1]
        if entry.key != source.key:
            raise KappaError(
                f"an interrupted load of {source.name} into {topic!r} used --key {entry.key}, not {source.key}: "
                f"run it again with --key {entry.key} to finish it"
            )
        return Plan(entry, RowsOnLog.none(), None, resuming=True)
    if entries and not again:
        return entries[-1]
    occurrence = max((entry.occurrence for entry in entries), default=0) + 1
    entry = LedgerEntry(
        load_id=load_id(fingerprint, occurrence),
        fingerprint=fingerprint,
        occurrence=occurrence,
        file=source.name,
        key=source.key,
        topic_id=topic_id,
        state=STARTED,
        start_offsets=start_offsets,
        row_marks=BLOCK_ENDS,
    )
    writer.write(entry)
    return Plan(entry, RowsOnLog.none(), None)


def _rows_sent_meanwhile(settings: Settings, topic: str, plan: Plan) -> RowsOnLog | None:
    """The rows of this new load on the log when another run began it too and sent some (else
    None; a resume takes them as its scan): two runs of
    one file started together can both find no entry and both begin it. They share its
    transactional id, so the later init_transactions fenced the other (which stops, saying so).
    The other recorded the load before its own init_transactions, so once this run's has
    returned, the ledger holds both records when this run is the later one; the rows the other
    committed are past this run's start offsets (taken before its ledger read), and this run
    resumes after them instead of sending them again. Only then is the topic scanned: a scan
    waits for any transaction open on it, another load's killed outright among them."""
    load = plan.entry.load_id
    begun = [
        entry for entry in ledger_writes(settings.broker, topic) if entry.load_id == load and entry.state == STARTED
    ]
    if len(begun) < 2:
        return None
    found = _scan_for_rows(settings, topic, plan.entry)
    return found if found.count else None


def _scan_for_rows(settings: Settings, topic: str, entry: LedgerEntry) -> RowsOnLog:
    """The load's rows on the log (`rows_on_log`), waiting for a transaction open on the topic at
    most until the broker would have aborted it, and a minute more."""
    return rows_on_log(settings.broker, topic, entry, wait_s=TRANSACTION_TIMEOUT_S + 60)


def _resume(settings: Settings, topic: str, source: Source, plan: Plan, on_log: RowsOnLog | None = None) -> None:
    """Find which rows of the interrupted load the log holds (once init_transactions has
    resolved what its earlier runs left open; `on_log` when already scanned) and say how many
    this run sends."""
    entry = plan.entry
    plan.on_log = on_log if on_log is not None else _scan_for_rows(settings, topic, entry)
    plan.total = total = source.count_rows()
    started = f"an interrupted load of {source.name} started {entry.started_at}"
    note(f"resuming: {_done_rows(entry, plan.on_log.count, total)} ({started})")
    if plan.on_log.duplicates:
        note(f"warning: {plan.on_log.duplicates:,} rows of that load are on the log more than once")


def _done_rows(entry: LedgerEntry, done: int, total: int) -> str:
    """What a resume found done, for its first line. A load that marks block ends knows where the
    rows on the log end, not which rows before that were too long for the topic and never sent:
    so it says where it goes on from, and the final line counts the rows that were there."""
    if entry.row_marks == EVERY_ROW:
        return f"{done:,} of {total:,} rows already on the log, sending {total - done:,}"
    if done == 0:
        return f"none of the {total:,} rows is on the log, sending them all"
    return (
        f"rows 1 to {done:,} of {total:,} are done (on the log, or too long for the topic), "
        f"sending the {total - done:,} after them"
    )


def _blocking(call: Callable[[], object], give_up: Callable[[], bool] = lambda: False) -> bool:
    """Run a blocking librdkafka call on a thread of its own and wait for it; True once it
    returned (its exception is raised here), False when `give_up()` said to stop waiting.

    Python runs signal handlers only between bytecodes of the main thread, so a Ctrl-C or
    SIGTERM during a long call (a commit waiting for acks, init_transactions waiting for the
    broker to resolve an earlier run) would wait for it to return. librdkafka asks that
    transactional calls be given their whole timeout rather than retried in slices."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # handed to the waiting thread
            outcome.append(exc)

    thread = threading.Thread(target=run, name="kappa-load-transaction", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if thread.is_alive() and give_up():
            return False
    if outcome[0] is not None:
        raise outcome[0]
    return True


def _init_transactions(producer: Producer, topic: str) -> None:
    """Fence every earlier run of this load and have the broker resolve the transaction one left
    open: aborted (or its commit finished) and the markers written with acks from every in-sync
    replica, so every earlier record is below the high watermark when this returns. A follower
    that stalled while in the ISR holds that until the controller fences it (seconds)."""
    try:
        _blocking(lambda: producer.init_transactions(TRANSACTION_TIMEOUT_S))
    except KafkaException as exc:
        raise KappaError(
            f"could not begin the load's transactions on {topic!r} ({exc.args[0].str()}): check the broker, "
            "then run the same command again"
        ) from None


class TransactionFailed(KappaError):
    """The open transaction could not be committed."""


class LoadTransaction:
    """The load's open transaction and the rows of this run in committed ones.

    A transaction is begun before the first row is handed over and committed every
    `TRANSACTION_ROWS` rows or `TRANSACTION_S` seconds (checked every `POLL_EVERY` rows): few
    enough commits not to slow the load (each waits for its rows' acks), and short enough that
    a live worker sees the rows as they load and an interrupted load loses little."""

    def __init__(self, producer: Producer, stop: StopRequest) -> None:
        self.producer = producer
        self.stop = stop
        self.committed = 0  # rows of this run in committed transactions
        self.rows = 0  # rows handed to librdkafka in the open transaction
        self.open = False
        self.opened_at = 0.0

    def begin(self) -> None:
        if not self.open:
            self.producer.begin_transaction()
            self.open, self.opened_at = True, time.monotonic()

    def due(self) -> bool:
        return self.open and (self.rows >= TRANSACTION_ROWS or time.monotonic() - self.opened_at >= TRANSACTION_S)

    def commit(self) -> bool:
        """Commit the open transaction once librdkafka has delivered its rows; True once done,
        False when a second Ctrl-C (or SIGTERM) stopped the wait (its rows may or may not be
        committed). Raises TransactionFailed when it cannot be committed, having aborted it when
        the broker allows that (then none of its rows is on the log)."""
        if not self.open:
            return True
        try:
            if not _blocking(lambda: self.producer.commit_transaction(TRANSACTION_TIMEOUT_S), self._give_up):
                return False
        except KafkaException as exc:
            error = exc.args[0]
            if error.txn_requires_abort():
                self.abort()
            raise TransactionFailed(error.str()) from None
        self.committed, self.rows, self.open = self.committed + self.rows, 0, False
        return True

    def abort(self) -> bool:
        """Abort the open transaction (librdkafka drops its rows still queued); True once the
        broker has, False when it could not or a second Ctrl-C stopped the wait (the next run of
        the load aborts it then, or the broker after TRANSACTION_TIMEOUT_S)."""
        if not self.open:
            return True
        deadline = time.monotonic() + GIVE_UP_S

        def give_up() -> bool:
            return self.stop.count >= 2 and time.monotonic() >= deadline

        try:
            if not _blocking(lambda: self.producer.abort_transaction(TRANSACTION_TIMEOUT_S), give_up):
                return False
        except KafkaException:
            return False
        self.rows, self.open = 0, False
        return True

    def _give_up(self) -> bool:
        return self.stop.count >= 2


def _wait_until_readable(broker: str, topic: str) -> None:
    """Return once readers see every row of the load's last transaction: the coordinator answers
    a commit once it has recorded it, and writes the commit markers after that, so until they are
    written the topic's end offsets (its last stable offset, where a replay started now stops) are
    still below the last rows. A transaction of another producer open below them holds them back
    longer; that is not waited for beyond READABLE_WAIT_S."""
    partitions = admin.require_partition_count(broker, topic)
    written = admin.high_watermarks(broker, topic, partitions)  # past every row of this load
    deadline = time.monotonic() + READABLE_WAIT_S
    while time.monotonic() < deadline:
        stable = admin.end_offsets(broker, topic, partitions)
        if all(stable[p] >= end for p, end in written.items()):
            return
        time.sleep(0.02)


# a producer's fatal errors when a newer one with its transactional id fenced it: as librdkafka
# finds it itself, or as the broker says it (to a produce, or a transaction request)
FENCED_CODES = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})  # noqa: SLF001


class DeliveryPoller:
    """Serves librdkafka's delivery reports on a thread of its own while rows are produced.

    Each poll frees the messages the broker acknowledged since the last one (about 0.5 µs
    each, even with reports for failures only): 0.5 s per million rows. librdkafka does that
    without the GIL, so on its own thread it overlaps the producing thread instead of
    pausing it. The failure reports (`DeliveryErrors`) are counted on this thread."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kappa-load-poller", daemon=True)
        self.fatal: KafkaError | None = None  # the producer's fatal error, which poll raises

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._producer.poll(POLL_WAIT_S)
        except KafkaException as exc:  # the producer is unusable: the send loop fails on its next call
            self.fatal = exc.args[0]

    def __enter__(self) -> DeliveryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()


class ProduceFailed(KappaError):
    """produce() itself failed, after `produced` messages of the call were handed over; `fatal`:
    the producer's fatal error, when that is why."""

    def __init__(self, message: str, produced: int, fatal: KafkaError | None = None) -> None:
        super().__init__(message)
        self.produced = produced
        self.fatal = fatal


class StopRequest:
    """A SIGINT and SIGTERM handler that only counts the signals for the send loop to act on.
    A KeyboardInterrupt raised inside librdkafka's produce() would surface as an unrelated
    TypeError and lose the count of what was sent; SIGTERM's default would end the process
    without saying what the log holds, and leave stdin's spooled copy behind."""

    count = 0
    reason = ""

    @property
    def requested(self) -> bool:
        return self.count > 0

    def __call__(self, signum: int, _frame: object) -> None:
        self.count += 1
        self.reason = self.reason or ("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)

    def handling(self) -> AbstractContextManager[None]:
        """This handler for SIGINT and SIGTERM while the block runs, the previous ones after it."""
        return handling_signals(self, signal.SIGINT, signal.SIGTERM)


@dataclass
class Sent:
    """How far a run got: rows read from the file, rows of them handed to librdkafka, and those
    too large to send."""

    too_large: TooLarge
    rows: int = 0
    produced: int = 0
    # a block cut short (a stop while librdkafka's queue was full) left rows after the last
    # marked one in the open transaction: committed, a re-run could not tell they are on the log
    unmarked: bool = False


def _send(
    producer: Producer,
    topic: str,
    source: Source,
    plan: Plan,
    errors: DeliveryErrors,
    sent: Sent,
    stop: StopRequest,
    show: Callable[[], None] = lambda: None,
    transaction: LoadTransaction | None = None,
) -> bool:
    """Produce every row the log lacks, in file order, counting into `sent`; True when every row
    was read. Stops early on the first delivery error or when `stop` is requested (checked
    every `POLL_EVERY` rows, and while librdkafka's queue is full); `show` updates the progress.
    With a `transaction`, rows go in its transactions, committed when due (checked then too)."""
    prefix = header_prefix(plan.entry.load_id)
    for chunk in source.chunks():
        first = sent.rows
        sent.rows += len(chunk.values)
        # rows too long for the topic are found among the chunk's rows on the log too: a load that
        # marks block ends counts every row up to the highest one found as done, those included
        fitting = sent.too_large.keep_fitting(chunk, first, range(first, first + len(chunk.values)))
        rows = _not_on_log(plan.on_log, fitting)
        position = 0
        while position < len(rows):
            # up to the next multiple of POLL_EVERY rows produced, counted across chunks
            some = rows[position : position + POLL_EVERY - sent.produced % POLL_EVERY]
            if transaction is not None:
                transaction.begin()
            try:
                produced = _produce_rows(producer, topic, chunk, first, some, prefix, stop, plan.entry.row_marks)
            except ProduceFailed as failed:
                sent.produced += failed.produced  # handed over before the failure: delivered or failed
                if transaction is not None:
                    transaction.rows += failed.produced
                raise
            sent.produced += produced
            if transaction is not None:
                transaction.rows += produced
            position += len(some)
            if produced < len(some):
                sent.unmarked = produced > 0 and plan.entry.row_marks == BLOCK_ENDS
                return False
            if sent.produced % POLL_EVERY == 0:
                show()
                if errors.count or stop.requested:
                    return False
                if transaction is not None and transaction.due() and not transaction.commit():
                    return False
    return True


def _settle(
    transaction: LoadTransaction, sent: Sent, errors: DeliveryErrors, stop: StopRequest, reason: str | None
) -> tuple[bool, str | None]:
    """Commit the open transaction once the send loop has stopped, or abort it after a failure,
    a delivery error, a second Ctrl-C (or SIGTERM) or a block cut short (`Sent.unmarked`); whether
    that is settled, and why the load stopped (None: it did not fail)."""
    try:
        if reason is None and not errors.count and stop.count < 2 and not sent.unmarked:
            return transaction.commit(), reason
        return transaction.abort(), reason
    except TransactionFailed as exc:
        return not transaction.open, reason or str(exc)


def _not_on_log(on_log: RowsOnLog, rows: range | list[int]) -> range | list[int]:
    """The given row numbers (in increasing order) that the log does not hold yet."""
    present = on_log.present
    if not rows or rows[0] >= len(present):
        return rows
    return [row for row in rows if row >= len(present) or not present[row]]


def _produce_rows(
    producer: Producer,
    topic: str,
    chunk: Chunk,
    first: int,
    rows: range | list[int],
    prefix: bytes,
    stop: StopRequest,
    marks: str,
) -> int:
    """Hand librdkafka the given rows of the chunk (whose first row is number `first`), the last
    one with its row number header (every one for an `EVERY_ROW` load); returns how many it took
    (fewer when a stop was requested while its queue was full)."""
    if isinstance(rows, range):
        span = slice(rows.start - first, rows.stop - first)
        values, keys = chunk.values[span], chunk.keys[span]
    else:
        values, keys = [chunk.values[row - first] for row in rows], [chunk.keys[row - first] for row in rows]
    headers = row_headers(prefix, rows) if marks == EVERY_ROW else block_end_headers(prefix, rows)
    done = 0
    while True:
        try:
            done += _produce_from(producer.produce, topic, values, keys, headers, done)
        except ProduceFailed as failed:
            failed.produced += done
            raise
        if done == len(values):
            return done
        try:
            producer.poll(QUEUE_FULL_WAIT_S)  # the queue is full until the broker acknowledges (poll is thread-safe)
        except KafkaException as exc:  # the producer's fatal error, which one poll raises, this one or the poller's
            raise ProduceFailed(f"could not produce to {topic!r}: {exc.args[0].str()}", done, exc.args[0]) from None
        if stop.requested:
            return done


def _produce_from(
    produce: Callable[..., None],
    topic: str,
    values: list[bytes],
    keys: list[bytes | None],
    headers: Sequence[list[tuple[str, bytes]] | None],
    start: int,
) -> int:
    """Hand produce() the messages from `start` on; returns how many it took before its queue
    was full (BufferError), or all of them.

    The loop runs in C (`starmap` drained by a zero-length deque) with positional arguments:
    a Python loop and keyword arguments cost 0.45 µs a message, a third of produce() itself.
    The positions are confluent-kafka's: topic, value, key, partition, callback, on_delivery,
    timestamp, headers. zip takes the refused message from `values_left` before produce()
    refuses it, so the messages taken are those gone from it, less one."""
    values_left = iter(values[start:])
    calls = zip(
        repeat(topic), values_left, keys[start:], repeat(-1), repeat(None), repeat(None), repeat(0), headers[start:]
    )
    try:
        deque(starmap(produce, calls), maxlen=0)
    except BufferError:
        return len(values) - start - length_hint(values_left) - 1
    except KafkaException as exc:
        taken = len(values) - start - length_hint(values_left) - 1
        raise ProduceFailed(f"could not produce to {topic!r}: {exc.args[0].str()}", taken) from None
    return len(values) - start


def acknowledged(producer: Producer, produced: int, failed: int) -> int:
    """Of `produced` messages handed to librdkafka, those the broker has acknowledged: what the
    progress line counts. It counted those handed over, and with the broker gone it reached
    100% while the rows waited in librdkafka's queue until they timed out. librdkafka's length
    also counts reports not yet served (an error event, say), so it can pass `produced`."""
    return max(produced - len(producer) - failed, 0)


def fenced(error: KafkaError | None) -> bool:
    """Whether a producer's fatal error says it was fenced: by a newer producer with its
    transactional id (a later run of the same load), or by the broker (`_fenced_off`)."""
    return error is not None and error.code() in FENCED_CODES


def _fatal_error(producer: Producer, poller: DeliveryPoller, failure: KappaError | None) -> KafkaError | None:
    """The producer's fatal error, if it has one: raised by one poll only, the sending thread's
    (`ProduceFailed.fatal`) or the poller's, or else by the next."""
    if isinstance(failure, ProduceFailed) and failure.fatal is not None:
        return failure.fatal
    if poller.fatal is not None:
        return poller.fatal
    try:
        producer.poll(0)
    except KafkaException as exc:
        return exc.args[0]
    return None


def _fenced_off(source: Source, topic: str, on_log: int) -> KappaError:
    """A newer producer of the load's transactional id fenced this run: another run of the same
    load, or the broker itself, which fences a producer whose transaction outlived
    TRANSACTION_TIMEOUT_S (a process suspended that long). The error is the same for both."""
    return KappaError(
        f"load of {source.name} into {topic!r} stopped: its transactions were fenced, by another run of the "
        f"same load that took it over, or by the broker after this one stalled for over {TRANSACTION_TIMEOUT_S}s; "
        f"{on_log:,} rows are on the log. If another run is loading it, let that run finish; if not, run the "
        "same command again to send the rest exactly once"
    )


def _interrupted(source: Source, topic: str, on_log: int, unsure: int, reason: str) -> KappaError:
    maybe = f" ({unsure:,} more may be)" if unsure else ""
    return KappaError(
        f"load of {source.name} into {topic!r} interrupted ({reason}): {on_log:,} rows are on the log{maybe}; "
        "run the same command again to send the rest exactly once"
    )


def load(
    settings: Settings,
    path: str,
    key: str,
    topic: str | None = None,
    partitions: int | None = None,
    again: bool = False,
) -> LoadResult:
    topic = check_topic_name(topic) if topic is not None else topic_for_path(path)
    if partitions is not None and partitions < 1:
        raise KappaError(f"--partitions must be at least 1, got {partitions}")
    with sigterm_interrupts(), ExitStack() as stack:
        try:  # Ctrl-C or SIGTERM before this run sent a row: one line, as later on
            source = stack.enter_context(opened_source(path, key))  # a copy of stdin is removed on the way out
            for text in source.notes:
                note(text)
            source.check()  # a file pandas refuses is refused before anything is made or sent
            admin.wait_until_reachable(settings.broker)
            created = _prepare_topic(settings.broker, topic, partitions, settings.replication_factor)
            writer = LedgerWriter(settings.broker, topic)
            plan = _plan(settings, topic, source, again, writer)
            if isinstance(plan, LedgerEntry):
                return LoadResult(topic, 0, 0.0, created, plan.rows or 0, previous=plan)
            errors = DeliveryErrors()
            too_large = TooLarge(message_limit(settings.broker, topic))
            config = producer_config(settings.broker, too_large.limit, transactional_id(plan.entry))
            producer = Producer(config, on_delivery=errors)
            _init_transactions(producer, topic)  # before the resume's scan: see rows_on_log
            meanwhile = None if plan.resuming else _rows_sent_meanwhile(settings, topic, plan)
            if plan.resuming or meanwhile is not None:
                plan.resuming = True
                _resume(settings, topic, source, plan, meanwhile)
        except KeyboardInterrupt:
            name = "stdin" if path == "-" else path
            raise KappaError(
                f"load of {name} into {topic!r} interrupted before this run sent a row: run the same command again"
            ) from None
        return _load(settings.broker, topic, source, plan, writer, created, producer, errors, too_large)


def _load(
    broker: str,
    topic: str,
    source: Source,
    plan: Plan,
    writer: LedgerWriter,
    created: bool,
    producer: Producer,
    errors: DeliveryErrors,
    too_large: TooLarge,
) -> LoadResult:
    """Send the plan's rows in transactions; record the load complete once the last one is
    committed, or say how many rows the log holds and how to finish."""
    relax_garbage_collector()  # the chunks' values and keys
    started = time.monotonic()
    sent = Sent(too_large)
    stop = StopRequest()
    transaction = LoadTransaction(producer, stop)
    total = plan.total if plan.total is not None else source.estimated_rows
    to_send = total - plan.on_log.count if total is not None else None
    line = ProgressLine()

    def show() -> None:
        line.update(acknowledged(producer, sent.produced, errors.count), to_send, label=f"load {topic}")

    with stop.handling():
        failure: KappaError | None = None
        unsure = 0
        try:
            with DeliveryPoller(producer) as poller:
                try:
                    finished = _send(producer, topic, source, plan, errors, sent, stop, show, transaction)
                except KappaError as exc:
                    finished, failure = False, exc
                # Done, or a first Ctrl-C (or SIGTERM): the open transaction's rows, at most
                # TRANSACTION_ROWS, are delivered and committed. A delivery error, a second one, or
                # a block cut short (`Sent.unmarked`): aborted.
                settled, reason = _settle(transaction, sent, errors, stop, str(failure) if failure else errors.first)
                if not settled:
                    unsure = transaction.rows
                    producer.purge(in_queue=True, in_flight=True)  # what is left is the next run's to resolve
            if finished and settled and reason is None:
                line.update(sent.produced, sent.produced, label=f"load {topic}")  # the exact count, not the estimate
        finally:
            line.finish()
    if not (finished and settled and reason is None):
        on_log = plan.on_log.count + transaction.committed
        if fenced(_fatal_error(producer, poller, failure)):
            raise _fenced_off(source, topic, on_log)
        raise _interrupted(source, topic, on_log, unsure, reason or stop.reason or "could not commit")
    _wait_until_readable(broker, topic)  # before the load says it is done: `kappa replay` may follow at once
    plan.entry.state, plan.entry.rows, plan.entry.completed_at = COMPLETE, sent.rows, now_utc()
    writer.write(plan.entry)
    resumed = plan.on_log.count - too_large.below(len(plan.on_log.present)) if plan.total is not None else None
    seconds, refused = time.monotonic() - started, too_large if too_large else None
    return LoadResult(topic, sent.produced, seconds, created, sent.rows, resumed, source.not_objects, too_large=refused)


__all__ = ["LoadResult", "check_topic_name", "load", "producer_config", "topic_for_path"]
