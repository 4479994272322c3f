"""The one seam between kappa and the internals of faust-streaming, aiokafka and mode-streaming.

kappa is fast because it replaced most of Faust's per-record path; that rests on private
members of the three libraries. Every override, subclass and private access lives here and
nowhere else (ruff's SLF rule is on for the rest of the repo). The members were read against
faust-streaming 0.15.3, aiokafka 0.14.0 and mode-streaming 0.7.1, pinned exactly in
pyproject.toml. At import, `check_internals()` checks that each member below exists with the
shape kappa uses, and otherwise stops with one line naming the library, the version found and
the version expected (an `EngineMismatch`), instead of a replay that hangs or a stop that
publishes nothing.

What is coupled, what it is for, and what an upstream change would do without the check:

1. faust `Consumer._drain_messages(fetcher)`, called by `Fetcher._fetcher`.
   For: overridden by `BatchDeliveryConsumer` to hand fetched batches to the agent.
   If changed: renamed or no longer called, Faust's own loop runs, the agent never sees a
   record and a replay hangs with no error. Checked: signature, and that the caller calls it.
2. faust `Consumer._wait_next_records`, `_buffered_partitions`, `_paused_partitions`, `_read_offset`,
   `_add_gap`, `_commit_every`, `_n_acked`, `perform_seek`, mode `Service._stopped`, `CONSUMER_FETCHING`.
   For: the batch loop keeps Faust's bookkeeping as its `getmany` would.
   If changed: AttributeError. A change in what `_read_offset` means (after a seek the next
   offset to read, after a delivery the last one delivered) would re-deliver or skip records:
   no check can see that, hence the exact pins. `BatchDeliveryConsumer` replaces the mapping
   with a `ReadOffsets` (the same contract, plus a count of seeks), which Faust's `seek`,
   `perform_seek` and revocation write into, and `KappaConsumerThread`'s seeks on the thread.
3. faust aiokafka driver `Consumer._to_message(tp, record)`, `Consumer._commit(offsets)`,
   `Consumer._new_consumer_thread()`, and on `AIOKafkaConsumerThread`
   `_create_worker_consumer(transport)`, `_commit(offsets)`, `_ensure_consumer()` and
   `tp_last_committed_at`; aiokafka `AIOKafkaConsumer._isolation_level`, read by `start`.
   For: the per-record path of changelog topics; `commit_offsets`; `KappaConsumerThread`
   (read_committed, and a commit a rebalance overtook is skipped instead of fatal).
   If changed: AttributeError, or Faust's own thread (uncommitted reads, fatal commits).
4. aiokafka `fetcher.PartitionRecords` (`_unpack_records`, `_consumer_record(tp, record)`,
   `_tp`, `_records`, `_check_crcs`, `_isolation_level`, `next_fetch_offset`,
   `READ_COMMITTED`, and for read_committed `_consume_aborted_up_to(batch_offset)`,
   `_contains_abort_marker(next_batch)`, `_aborted_producers`: aiokafka's own per-batch test
   for aborted transactions), looked up by its module-global name in `Fetcher._proc_fetch_request`;
   `FetchResult.getall` moving the position from `next_fetch_offset` after each item.
   For: `PassThroughRecords` rebinds that global (process-wide, never undone) so the source
   topic's records come as one list per record batch, skipping the `ConsumerRecord` dataclass.
   If changed: no longer looked up by name, the batch consumer gets ConsumerRecords instead of
   chunks and stops with a TypeError. Checked: signatures, the attributes `__init__` sets, and
   that the fetch function names the global and `getall` updates the position.
5. faust `Monitor.on_message_in/on_stream_event_in/on_stream_event_out/on_message_out`, and
   `Monitor.stream_inbound_time`, which Faust's livelock check (`verify_event_path`) reads.
   For: `PerRecordQuietMonitor` nulls them; Faust's sensors therefore see no records. The batch
   path sets each delivered partition's inbound time itself (`_mark_stream_inbound`).
   If changed: new per-record hooks would run again (slower); a false "Stream has not started
   processing" ERROR would come back (tests/test_batch_delivery.py fails).
6. faust `TableManager.on_start` (`sleep`, `should_stop`, `_update_channels`, `recovery.start`).
   For: `PromptTableManager` is a copy of it without the 1 s sleep.
   If changed: a startup step added upstream would be skipped silently, so the names its body
   uses are compared.
7. mode `Worker._sentinel_task`, awaited by `Worker._shutdown_loop`.
   For: `PromptWorker` shortens the 1 s sleep before the loop closes.
   If changed: the nap comes back.
8. mode `Worker._stop_on_signal(signal)`, called by `Worker._schedule_shutdown`.
   For: `PromptWorker` runs `before_signal_stop` first, where a worker process writes its final
   parts while the tables are open.
   If changed: a clean stop would publish no final snapshot. Checked: signature and caller.
9. faust `Transport.Consumer` (a class attribute, replaced on one app's transport) and
   `app.topics.add` (subscribing without an agent).
   For: `deliver_batches`.
   If changed: the batch consumer would not be used and a replay would hang.
10. faust `Producer.buffer` (`size`, `flush`; its `flush_atmost` gives up after 0.1 s).
    For: `drain_producer_buffer` empties it before offsets are committed.
    If changed: AttributeError.
11. faust aiokafka driver `Producer._ensure_producer()`; aiokafka `create_batch`, `send_batch`.
    For: `raw_producer`; the table writer appends changelog records straight into record
    batches, in exactly Faust's changelog format.
    If changed: AttributeError.
12. faust RocksDB `Store._db_for_partition`, `_dbs`, `offset_key`, `set_persisted_offset`,
    `persisted_offset`, `apply_changelog_batch` (replaced on the table's store instance).
    For: `partition_db`, `is_open`, `store_offset_key`, `persist_changelog_offset`,
    `persisted_changelog_offset`, `keep_newest_on_restore`.
    If changed: AttributeError; a moved offset key would leak into snapshots.
13. A mode Worker stops cleanly on SIGTERM only, and closes its event loop when it stops.
    For: `request_stop` (a replay stops itself once done), `fresh_event_loop` (the process goes
    on after the worker).
    If changed: a replay would not stop, or later asyncio calls would fail.

14. faust `App._app_tasks` (started by `on_started_init_extra_tasks`, as its timers are) and
    mode `Service.itertimer`.
    For: `every`, Faust's `app.timer` without venusian's frame inspection, which builds
    `inspect`'s module-to-file map on a process's first timer (25 ms; 60 ms under a 0.4 CPU
    quota) for the autodiscovery kappa does not use.
    If changed: AttributeError at pipeline set-up.
15. faust `AIOKafkaConsumerThread.seek_to_committed()`, `_seek_wait(consumer, partitions)` and
    `_fetch_records(consumer, active_partitions, timeout, max_records)`, called by its
    `seek_to_committed`, `seek_wait` and `getmany` through mode's `call_thread`, and Faust's
    `perform_seek`, which sets the read offsets (`_read_offset.update`) once its seek to committed
    offsets has come back; aiokafka's public `committed(tp)`, `seek(tp, offset)`, `position(tp)`.
    For: `KappaConsumerThread` counts every seek in the step that makes it and stamps every fetch
    in the step that takes its records, both on the consumer thread (`StampedRecords`), and seeks
    a partition committed at 0 too (aiokafka skips it).
    If changed: Faust's own methods would come back: a fetch taken during a seek to committed
    offsets was dropped and its records lost, and a fresh partition's dropped poll lost its
    records (tests in tests/test_batch_delivery.py fail).
16. faust `Consumer._wait_next_records` napping 1 s (`self.sleep(1)`) when no partition is
    active, `_get_active_partitions`, `can_resume_flow`, `not_waiting_next_records`.
    For: `BatchDeliveryConsumer._wait_next_records` naps `IDLE_POLL_S` instead.
    If changed: AttributeError, or the check's mismatch if upstream stops napping there.
17. faust `Conductor._tp_index` (each partition's channels, whose `queue` its callback fills),
    `Conductor._tp_to_callback_lock`, `ProducerBuffer.max_messages`, and mode
    `FlowControlEvent.is_active`: what Faust's callback waits on before it puts a record in a
    queue (flow control, the producer buffer, the callback map's lock, a full queue).
    For: the per-record path waits for them itself, so the callback never waits
    (`BatchDeliveryConsumer._until_taken_at_once`).
    If changed: AttributeError; a new reason for the callback to wait would let a record land
    after a rebalance's recovery seek again (tests/test_batch_delivery.py fails).

String couplings stay where they are used: logger names (`faust.transport.producer`,
`aiokafka.*`) and aiokafka's message texts in `kappa.engine.lognoise`; only the noise would come back.
confluent-kafka is used through its public API (`kappa.kafka.admin`); its underscore error codes
(`KafkaError._PARTITION_EOF`, `_AUTHENTICATION`) are documented constants, marked where used.

Why each override exists (py-spy on a 1M-record replay):

1. Records of the pipeline's source topic reach the agent as the batches Faust's consumer
fetched them in, not one event at a time. Faust delivers every record through
`Service.wait_first(callback(message), suspend_flow.wait())` (four asyncio tasks per
record), then the Conductor builds an Event, a queue carries it to the stream, and the
stream acks it: the task race alone was 40% of the CPU and the rest of that path most of
what was left. Faust still does everything else: group membership, assignment, fetching,
table recovery, changelogs and seeks. Each fetched batch is delivered inside one
`wait_first` race against flow suspension, so a rebalance cancels the rest of a batch; its
records were not applied and their read offsets did not move, and Faust seeks back to the
committed offsets after the rebalance (a partition committed at 0 too: see
`KappaConsumerThread.seek_to_committed`). Records of other topics (table changelogs during
recovery) take Faust's own path. The batch is taken before Faust's `getmany` turns it into a
stream (a highwater lookup and a Faust message per record, a quarter of what was left).

Deliveries are at most `DELIVERY_RECORDS` records; the next one is parsed on a thread while the
agent applies the current one (aiokafka's parser holds the GIL, much of the agent's work does
not): a 1k-key replay of 1M records took 2.74-3.22 s instead of 3.18-3.42 s (5 alternating pairs).

2. aiokafka wraps every record in a Python `ConsumerRecord` dataclass, 17% of the CPU, and
steps a Python generator, a method call and a list append per record. For the topics with a
batch handler, the records the C batch parser built (aiokafka's `DefaultRecord`, with `offset`,
`key`, `value` and `headers`) are passed on as they are, a record batch at a time: iterating
1M records of a 1k-key topic took 0.48 s record by record and 0.23 s a batch at a time.

3. The monitor keeps no per-record statistics (about 5% of the CPU, for a web view that is
off); kappa reports progress from the table's own offsets instead (kappa.ops.status).

4. Faust's table manager naps 1 s before subscribing (for tables defined late by
autodiscovery; kappa defines its one table first), a tenth of a replay's wall time, and mode
naps 1 s more before closing the loop.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import signal
import sys
import threading
import time
import types
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from kappa.engine.lognoise import hold_back_during_outages
from kappa.errors import KappaError
from kappa.pipeline import Delivered, Record

# the releases this module was read against (pyproject.toml pins the same)
WRITTEN_FOR = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}
SEAM = "kappa/engine/faust_internals.py"


class EngineMismatch(KappaError):
    """An installed faust-streaming, aiokafka or mode-streaming lacks what the seam relies on."""


def installed_version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def mismatch(library: str, what: str) -> EngineMismatch:
    return EngineMismatch(
        f"{library} {installed_version(library)} is installed, but kappa's engine seam ({SEAM}) was written for "
        f"{library} {WRITTEN_FOR[library]}: {what}; install the pinned versions (make venv) or port the seam"
    )


def _module(library: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise mismatch(library, f"module {name} cannot be imported ({exc})") from None


def _member(library: str, owner: Any, name: str) -> Any:
    where = f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}"
    if name not in dir(owner) and name not in getattr(owner, "__annotations__", {}):
        raise mismatch(library, f"{where.lstrip('.')}.{name} is missing")
    return getattr(owner, name, None)


def _code(function: Any) -> Any:
    function = getattr(function, "fun", function)  # mode's @Service.task wraps the function
    function = inspect.unwrap(getattr(function, "fget", function))
    return function.__code__


def _method(library: str, owner: type, name: str, params: Sequence[str], *, coroutine: bool | None = None) -> Any:
    """`owner.name` exists, takes exactly `params` (after self) and is (not) a coroutine."""
    function = _member(library, owner, name)
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    if not callable(function):
        raise mismatch(library, f"{where} is no longer a method")
    found = [p for p in inspect.signature(function).parameters if p != "self"]
    if found != list(params):
        raise mismatch(library, f"{where} takes ({', '.join(found)}), not ({', '.join(params)})")
    if coroutine is not None and inspect.iscoroutinefunction(function) != coroutine:
        raise mismatch(library, f"{where} is {'no longer' if coroutine else 'now'} a coroutine")
    return function


def _calls(library: str, owner: type, caller: str, names: Iterable[str]) -> None:
    """`owner.caller` still refers to each of `names` (an attribute, method or global it uses)."""
    used = set(_code(_member(library, owner, caller)).co_names)
    for name in names:
        if name not in used:
            where = f"{owner.__module__}.{owner.__qualname__}.{caller}"
            raise mismatch(library, f"{where} no longer uses {name}")


def _sets(library: str, owner: type, names: Iterable[str]) -> None:
    """The attributes `owner.__init__` assigns (instance state the seam reads) include `names`."""
    _calls(library, owner, "__init__", names)


def check_internals() -> None:
    """Every member the seam relies on, with the shape it relies on; raises `EngineMismatch`."""
    faust, aiokafka, mode = "faust-streaming", "aiokafka", "mode-streaming"

    consumer_module = _module(faust, "faust.transport.consumer")
    consumer = consumer_module.Consumer
    _member(faust, consumer_module, "CONSUMER_FETCHING")
    _method(faust, consumer, "_drain_messages", ["fetcher"], coroutine=True)
    _calls(faust, consumer_module.Fetcher, "_fetcher", ["_drain_messages"])
    _method(faust, consumer, "_wait_next_records", ["timeout"], coroutine=True)
    _method(faust, consumer, "_get_active_partitions", [], coroutine=False)
    _sets(faust, consumer, ["can_resume_flow", "not_waiting_next_records"])
    if "sleep" not in _code(consumer._wait_next_records).co_names:
        raise mismatch(faust, "Consumer._wait_next_records no longer naps without active partitions")
    _method(faust, consumer, "_add_gap", ["tp", "offset_from", "offset_to"], coroutine=True)
    _method(faust, consumer, "perform_seek", [], coroutine=True)
    _calls(faust, consumer, "perform_seek", ["seek_to_committed", "update"])
    _calls(faust, consumer_module.ThreadDelegateConsumer, "seek_to_committed", ["_thread", "seek_to_committed"])
    _method(faust, consumer, "seek_wait", ["partitions"], coroutine=True)
    _sets(faust, consumer, ["_read_offset", "_buffered_partitions", "_commit_every"])
    _calls(faust, consumer, "_reset_state", ["_paused_partitions"])
    _member(faust, consumer, "_n_acked")
    _member(faust, _module(mode, "mode").Service, "_stopped")
    driver = _module(faust, "faust.transport.drivers.aiokafka")
    _method(faust, driver.Consumer, "_to_message", ["tp", "record"], coroutine=False)
    _method(faust, driver.Consumer, "_commit", ["offsets"], coroutine=True)
    _method(faust, driver.Producer, "_ensure_producer", [], coroutine=False)
    _method(faust, driver.Consumer, "_new_consumer_thread", [], coroutine=False)
    _method(faust, driver.AIOKafkaConsumerThread, "_create_worker_consumer", ["transport"], coroutine=False)
    _method(faust, driver.AIOKafkaConsumerThread, "_commit", ["offsets"], coroutine=True)
    _method(faust, driver.AIOKafkaConsumerThread, "_ensure_consumer", [], coroutine=False)
    _method(faust, driver.AIOKafkaConsumerThread, "seek_to_committed", [], coroutine=True)
    _method(faust, driver.AIOKafkaConsumerThread, "_seek_wait", ["consumer", "partitions"], coroutine=True)
    _calls(faust, driver.AIOKafkaConsumerThread, "seek_wait", ["call_thread", "_seek_wait"])
    fetch_params = ["consumer", "active_partitions", "timeout", "max_records"]
    _method(faust, driver.AIOKafkaConsumerThread, "_fetch_records", fetch_params, coroutine=True)
    _calls(faust, driver.AIOKafkaConsumerThread, "getmany", ["call_thread", "_fetch_records"])
    _calls(faust, driver.AIOKafkaConsumerThread, "__post_init__", ["tp_last_committed_at"])
    raw_consumer = _module(aiokafka, "aiokafka").AIOKafkaConsumer
    _sets(aiokafka, raw_consumer, ["_isolation_level"])
    _calls(aiokafka, raw_consumer, "start", ["_isolation_level"])
    _member(faust, _module(faust, "faust.transport.base").Transport, "Consumer")
    producer = _module(faust, "faust.transport.producer")
    _sets(faust, producer.Producer, ["buffer"])
    _member(faust, producer.ProducerBuffer, "size")
    _member(faust, producer.ProducerBuffer, "max_messages")
    _sets(faust, _module(faust, "faust.transport.conductor").Conductor, ["_tp_index", "_tp_to_callback_lock"])
    _method(mode, _module(mode, "mode.utils.queues").FlowControlEvent, "is_active", [], coroutine=False)
    _method(faust, producer.ProducerBuffer, "flush", [], coroutine=True)
    monitor = _module(faust, "faust.sensors.monitor").Monitor
    _member(faust, monitor, "stream_inbound_time")
    _method(faust, monitor, "on_message_in", ["tp", "offset", "message"])
    _method(faust, monitor, "on_stream_event_in", ["tp", "offset", "stream", "event"])
    _method(faust, monitor, "on_stream_event_out", ["tp", "offset", "stream", "event", "state"])
    _method(faust, monitor, "on_message_out", ["tp", "offset", "message"])
    manager = _module(faust, "faust.tables.manager").TableManager
    _method(faust, manager, "_update_channels", [], coroutine=True)
    upstream_start = set(_code(_method(faust, manager, "on_start", [], coroutine=True)).co_names)
    if upstream_start != {"sleep", "should_stop", "_update_channels", "recovery", "start"}:
        raise mismatch(faust, "TableManager.on_start changed (PromptTableManager copies its body)")
    app = _module(faust, "faust.app.base").App
    _sets(faust, app, ["_app_tasks"])
    _calls(faust, app, "on_started_init_extra_tasks", ["_app_tasks"])
    _method(mode, app, "itertimer", ["interval", "max_drift_correction", "sleep", "clock", "name"], coroutine=False)
    store = _module(faust, "faust.stores.rocksdb").Store
    _method(faust, store, "_db_for_partition", ["partition"], coroutine=False)
    _method(faust, store, "set_persisted_offset", ["tp", "offset"], coroutine=False)
    _method(faust, store, "persisted_offset", ["tp"], coroutine=False)
    _method(faust, store, "apply_changelog_batch", ["batch", "to_key", "to_value"], coroutine=False)
    _member(faust, store, "_dbs")
    if not isinstance(_member(faust, store, "offset_key"), bytes):
        raise mismatch(faust, "faust.stores.rocksdb.Store.offset_key is no longer bytes")

    fetcher = _module(aiokafka, "aiokafka.consumer.fetcher")
    records = _member(aiokafka, fetcher, "PartitionRecords")
    if not isinstance(records, type):
        raise mismatch(aiokafka, "aiokafka.consumer.fetcher.PartitionRecords is no longer a class")
    _method(aiokafka, records, "_consumer_record", ["tp", "record"], coroutine=False)
    _method(aiokafka, records, "_unpack_records", [], coroutine=False)
    _sets(aiokafka, records, ["_tp", "_records", "_check_crcs", "_isolation_level", "next_fetch_offset",
                              "_aborted_producers"])  # fmt: skip
    _method(aiokafka, records, "_consume_aborted_up_to", ["batch_offset"], coroutine=False)
    _method(aiokafka, records, "_contains_abort_marker", ["next_batch"], coroutine=False)
    _calls(aiokafka, records, "__init__", ["_unpack_records"])
    _member(aiokafka, fetcher, "READ_COMMITTED")
    _calls(aiokafka, fetcher.FetchResult, "getall", ["_update_position"])
    _calls(aiokafka, fetcher.Fetcher, "_proc_fetch_request", ["PartitionRecords"])
    raw = _module(aiokafka, "aiokafka").AIOKafkaProducer
    _method(aiokafka, raw, "create_batch", [], coroutine=False)
    _method(aiokafka, raw, "send_batch", ["batch", "topic", "partition"], coroutine=True)

    worker = _module(mode, "mode.worker").Worker
    _method(mode, worker, "_stop_on_signal", ["signal"], coroutine=True)
    _calls(mode, worker, "_schedule_shutdown", ["_stop_on_signal"])
    _method(mode, worker, "_sentinel_task", [], coroutine=True)
    _calls(mode, worker, "_shutdown_loop", ["_sentinel_task"])
    _member(mode, worker, "on_setup_root_logger")


def import_faust_types_without_aiohttp() -> None:
    """Import `faust.types` without aiohttp, unless Faust is imported already.

    faust.types.web imports aiohttp's `ClientSession` only to name a type in annotations;
    Faust's web server and HTTP client, which kappa turns off, import aiohttp when they are
    used. aiohttp and what it pulls in (an SSL context made at import) took about 0.1 s of the
    0.6 s every kappa process spends importing; under the bench's CPU quota of 0.25, 0.4 s of
    each scale-out process's start. A stand-in module holding that one name is in
    `sys.modules` while faust.types imports, and only then: any later `import aiohttp` gets
    the real one. No other thread may import aiohttp meanwhile (it would find the stand-in);
    the only thread running then, a replay's preflight, imports confluent-kafka only."""
    if "faust.types" in sys.modules or "aiohttp.client" in sys.modules:
        return
    stand_in = types.ModuleType("aiohttp.client", "kappa's stand-in while faust.types imports")
    stand_in.ClientSession = type("ClientSession", (), {"__module__": "aiohttp.client"})  # type: ignore[attr-defined]
    sys.modules["aiohttp.client"] = stand_in
    try:
        importlib.import_module("faust.types")
    except ImportError as exc:  # it wants more of aiohttp than the one name, or Faust is missing
        what = f"faust.types does not import with kappa's aiohttp stand-in ({exc})"
        raise mismatch("faust-streaming", what) from None
    finally:
        if sys.modules.get("aiohttp.client") is stand_in:
            del sys.modules["aiohttp.client"]


import_faust_types_without_aiohttp()
check_internals()

# Only once the members are known to be there: class definitions below read some at import.
import aiokafka.errors as aiokafka_errors  # noqa: E402
import faust  # noqa: E402
from aiokafka.consumer import fetcher as aiokafka_fetcher  # noqa: E402
from aiokafka.consumer.fetcher import PartitionRecords  # noqa: E402
from aiokafka.structs import OffsetAndMetadata  # noqa: E402
from aiokafka.structs import TopicPartition as aiokafka_TP  # noqa: E402
from faust.sensors.monitor import Monitor  # noqa: E402
from faust.tables.manager import TableManager  # noqa: E402
from faust.transport.consumer import CONSUMER_FETCHING  # noqa: E402
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread  # noqa: E402
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer  # noqa: E402
from faust.types import TP  # noqa: E402

FaustApp = faust.App  # kappa.engine.app imports Faust through the seam (import_faust_types_without_aiohttp)
YIELD_EVERY = 100
# records parsed and handed to the agent at once: bounds the memory of a fetch's parsed records
# (two deliveries are held, one applied and one parsed). 25k held 25-35 MB less than 50k at
# 1k and at 1M keys and was as fast; 12.5k was about 5% slower at 1k keys.
DELIVERY_RECORDS = 25_000
TAKEN_AT_ONCE_POLL_S = 0.005  # how often the per-record path looks again for room in a full queue
IDLE_POLL_S = 0.05  # a poll with no active partition, instead of Faust's 1 s (see _wait_next_records)
MEMBERS_WAIT_S = 5.0  # see BatchDeliveryConsumer._waiting_for_members

# a partition's records from one fetch, in offset order, as aiokafka parsed them
BatchHandler = Callable[[dict[TP, Sequence[Record]]], Awaitable[None]]


# --- 1, 2, 3, 9: batch delivery -----------------------------------------------------------------


COMMIT_LOG = logging.getLogger("kappa.commit")


class KappaConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, with two changes.

    Its aiokafka consumer reads committed records only. Faust reads uncommitted records unless
    its own exactly-once mode is on, so a log written by a transactional producer (Kafka Streams
    with exactly-once, Flink, any `transactional.id`) would have its aborted transactions
    counted. Its changelogs, written without transactions, read the same either way.
    `_isolation_level` is what aiokafka hands its fetcher at start.

    A commit that a rebalance overtook is skipped, not fatal (see `_commit`).

    The seek to committed offsets counts each seek as it is made (see `seek_to_committed`)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._isolation_level = "read_committed"
        return consumer

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """aiokafka's seek of every assigned partition to its committed offset, run on this
        thread, with three changes (the third: all offsets asked for at once, `_seek_each_to_committed`).

        Each seek is counted in the read offsets (`ReadOffsets.sought`) as it is made, on
        this thread. aiokafka seeks one partition after another, each once its committed offset
        has come back from the broker; Faust counted them only when the whole seek had come back
        to its own thread. A fetch that came back in between, of a partition already sought,
        held records read after the seek, yet was taken for stale and dropped: they were past
        aiokafka's position and never came again (a live worker restarted on wiped state stayed
        2,003 records behind forever, one test run in 45).

        A partition committed at 0 is sought too. aiokafka skips it (`if offset and offset >
        0`), which leaves its fetch position wherever a dropped poll moved it: a partition with
        nothing applied yet would lose those records, and if they were the rest of its log,
        nothing later would arrive to trigger the agent's rewind (a replay then waits forever)."""
        return await self.call_thread(self._seek_each_to_committed, self._ensure_consumer())

    async def _seek_each_to_committed(self, consumer: Any) -> dict[Any, int | None]:
        """Every partition's committed offset asked for at once, each sought as it comes back
        (one after another, N assigned partitions took N round trips of every start). As the
        loop one after another did, the first failure stops the seek: the questions still out
        are cancelled, so no partition is sought after the seek has failed."""
        committed: dict[Any, int | None] = {}

        async def seek(tp: Any) -> None:
            offset = committed[tp] = await consumer.committed(tp)
            if offset is not None and offset >= 0:
                self._seek_counted(consumer, tp, offset)

        asking = [asyncio.ensure_future(seek(tp)) for tp in consumer.assignment()]
        try:
            if asking:
                await asyncio.wait(asking, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for question in asking:
                question.cancel()
            await asyncio.gather(*asking, return_exceptions=True)
        for question in asking:
            failure = None if question.cancelled() else question.exception()
            if failure is not None:
                raise failure
        return committed

    async def _seek_wait(self, consumer: Any, partitions: Mapping[TP, int]) -> None:
        """Faust's `seek_wait` (a recovery's seeks, kappa's seek back at a pause), run on this
        thread: each seek is counted in the step that makes it, where Faust counted only some
        (a seek to 0 of a partition with no read offset left no trace), and kappa added a count
        on the main loop before the seek, which a fetch taken before the seek could carry and so
        pass for fresh."""
        for tp, offset in partitions.items():
            self._seek_counted(consumer, tp, offset)
        await asyncio.wait_for(
            asyncio.gather(*[consumer.position(tp) for tp in partitions]),
            timeout=self.app.conf.broker_request_timeout,
        )

    async def _fetch_records(
        self, consumer: Any, active_partitions: set[TP], timeout: float | None = None, max_records: int | None = None
    ) -> Mapping[TP, list]:
        """Faust's fetch on this thread, stamped in the step that takes the records off aiokafka's
        position with each fetched partition's seek count and the consumer generation
        (`StampedRecords`). Stamped later, on the main loop, a fetch taken just before a seek
        could carry that seek's count and its stale records pass for fresh; a fetch taken just
        after one could miss its count and its fresh records be dropped, and both happened."""
        records = await super()._fetch_records(consumer, active_partitions, timeout=timeout, max_records=max_records)
        return StampedRecords(records, self._read_offsets.changes_of(records), self.app.consumer_generation_id)

    def _seek_counted(self, consumer: Any, tp: TP, offset: int) -> None:
        """aiokafka's seek, counted in the read offsets in the same step (`ReadOffsets.sought`):
        no fetch is taken between the two, so a fetch's stamp tells whether it was taken before."""
        consumer.seek(tp, offset)
        self._read_offsets.sought(tp, offset)

    @property
    def _read_offsets(self) -> ReadOffsets:
        return cast(ReadOffsets, self.consumer._read_offset)

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        """Faust's commit, run on this thread, except that a commit refused because the group is
        rebalancing returns False instead of crashing the consumer (and with it the worker).

        The assignment checked here can change before aiokafka checks it again: it then raises
        IllegalStateError ("No partitions assigned", "Partition ... is not assigned") or
        CommitFailedError, which Faust treats as fatal. Skipping loses nothing. A refused commit
        means a rebalance is under way, whose recovery commits each partition's table offsets
        again (kappa.engine.app.resume_from_table_offsets); should a seek still land on a stale
        group offset, the agent rewinds to what its table holds or skips what it already applied.
        Any other error still crashes the consumer, as in Faust.

        Offsets gathered before a rebalance can all belong to revoked partitions: nothing is
        committed then, where Faust would hand aiokafka an empty map, which it refuses with
        `ValueError({})`, crashing the worker; a partition's new owner commits for it instead."""
        assigned = self.assignment()
        owned = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not owned:
            return False
        try:
            await self._ensure_consumer().commit(
                {aiokafka_TP(tp.topic, tp.partition): OffsetAndMetadata(offset, "") for tp, offset in owned.items()}
            )
        except (aiokafka_errors.CommitFailedError, aiokafka_errors.IllegalStateError) as exc:
            # routine while the group rebalances, as after a process died; aiokafka's text of it
            # (seven lines on raising max_poll_interval_ms) is advice kappa's users must not take
            COMMIT_LOG.info(
                "offsets not committed, the group is rebalancing (%s); the next commit catches up", type(exc).__name__
            )
            return False
        except Exception as exc:
            self.log.exception("Got exception: %r\nCurrent assignment: %r", exc, assigned)
            await self.crash(exc)
            return False
        self.tp_last_committed_at.update(dict.fromkeys(owned, time.monotonic()))
        return True


class ReadOffsets(dict):
    """Faust's `_read_offset` (a partition's next offset to read after a seek, its last one
    delivered after a delivery), which also counts the seeks of each partition: every change
    of its entry other than a delivery's own (`delivered`) and perform_seek's (`update`), and
    every seek made on the consumer thread (`sought`), in the step that makes it.

    Invariant: a delivery moves a partition's read offset only if the partition was not sought
    since its records were fetched. A seek (the agent's rewind; a rebalance's recovery, made on
    Faust's consumer thread; the seek back to committed offsets) or a revocation made while a
    delivery awaits its handler sets where reading starts again. A delivery that then set the
    read offset to its own last record would make every re-fetched record before it look
    already read, and they would be dropped: a changelog restore that skipped most of a
    partition lost records from a live table that way (F1). The lock makes the check and the
    set one step against the consumer thread's seeks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.changes: Counter[TP] = Counter()
        self._lock = threading.Lock()

    def __missing__(self, tp: TP) -> None:
        return None  # Faust's `defaultdict(lambda: None)`, without storing the None

    def __setitem__(self, tp: TP, offset: int | None) -> None:
        with self._lock:
            self.changes[tp] += 1
            super().__setitem__(tp, offset)

    def __delitem__(self, tp: TP) -> None:
        with self._lock:
            self.changes[tp] += 1
            super().__delitem__(tp)

    def pop(self, tp: TP, *default: Any) -> Any:
        with self._lock:
            self.changes[tp] += 1
            return super().pop(tp, *default)

    def update(self, *others: Any, **named: Any) -> None:
        """Faust's `perform_seek` sets every assigned partition's read offset here once its seek
        to committed offsets has come back: to the committed offset it sought, or to None where
        nothing is committed. Nothing is counted: the seeks were counted as they were made
        (`KappaConsumerThread.seek_to_committed`), and counted again here, later, they would make
        a fetch taken after them look stale, and its records were lost."""
        with self._lock:
            for tp, offset in dict(*others, **named).items():
                super().__setitem__(tp, offset)

    def sought(self, tp: TP, offset: int) -> None:
        """A seek of `tp` to `offset`, made on the consumer thread: counted, and reading starts
        there again (Faust's None for 0)."""
        with self._lock:
            self.changes[tp] += 1
            if offset > 0:
                super().__setitem__(tp, offset)
            else:
                super().pop(tp, None)

    def clear(self) -> None:
        for tp in list(self):
            del self[tp]

    def setdefault(self, tp: TP, offset: int | None = None) -> int | None:
        if tp not in self:
            self[tp] = offset
        return self[tp]

    def changes_of(self, tps: Iterable[TP]) -> dict[TP, int]:
        """How often each partition was sought so far: what `delivered` compares with."""
        return {tp: self.changes[tp] for tp in tps}

    def delivered(self, tp: TP, offset: int, changes: int) -> bool:
        """Set `tp`'s read offset to a delivered record's `offset`, unless its entry changed
        since it had `changes` changes; whether it was set."""
        with self._lock:
            if self.changes[tp] != changes:
                return False
            super().__setitem__(tp, offset)
            return True


class StampedRecords(dict):
    """A fetch's records per partition, with each fetched partition's seek count and the
    consumer generation as they were taken off aiokafka's position, on the consumer thread.

    Invariant: every seek is counted in the step that makes it (`ReadOffsets.sought`), and a
    fetch is stamped in the step that takes its records, both on the consumer thread; so a
    fetch's records are stale exactly when its partition's count has changed since."""

    def __init__(self, records: Mapping[TP, list], changes: dict[TP, int], generation_id: int) -> None:
        super().__init__(records)
        self.changes = changes
        self.generation_id = generation_id


# a fetch: records per partition (None: none), the active partitions, each fetched partition's
# seek count and the consumer generation when its records were taken
Fetch = tuple[Mapping[TP, list] | None, set[TP] | None, dict[TP, int], int]


class BatchDeliveryConsumer(AIOKafkaConsumer):
    """Bind with `for_topics`; the handlers get every fetched batch of their topics."""

    handlers: Mapping[str, BatchHandler] = {}
    fair_share: int | None = None  # the most handler-topic partitions a process has in the full group
    _members_wait_until: float | None = None
    _read_offset: ReadOffsets
    _pending_fetch: asyncio.Future[Fetch] | None = None  # a fetch a cancelled delivery left (see _next_fetch)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset = ReadOffsets()

    @classmethod
    def for_topics(
        cls, handlers: Mapping[str, BatchHandler], fair_share: int | None = None
    ) -> type[BatchDeliveryConsumer]:
        PassThroughRecords.install(handlers)
        return type("BatchDeliveryConsumer", (cls,), {"handlers": dict(handlers), "fair_share": fair_share})

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return KappaConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _waiting_for_members(self) -> bool:
        """Whether this process holds more than its `fair_share` of the handlers' partitions
        while the group's other processes may still join (MEMBERS_WAIT_S from its first poll).

        A replay's processes start together, but the broker gives the first to join every
        partition at once; the others' joins then rebalance the group within a second. Records
        it applied meanwhile were lost work: the partitions it gave up started again from their
        committed offsets or were restored from the changelog, and the rest of the group waited
        for its delivery to end. So it fetches nothing until the group has its size, or the wait
        is over (a process that never comes)."""
        if self.fair_share is None:
            return False
        now = time.monotonic()
        if self._members_wait_until is None:
            self._members_wait_until = now + MEMBERS_WAIT_S
        if now >= self._members_wait_until:
            return False
        held = sum(1 for tp in self._get_active_partitions() if tp.topic in self.handlers)
        return held > self.fair_share

    async def _wait_next_records(self, timeout: float) -> tuple[Mapping[TP, list] | None, set[TP] | None]:
        """Faust's, except that with no active partition it naps `IDLE_POLL_S`, not a whole
        second. Partitions become active when a rebalance's recovery ends; a process that
        polled just before waited out the rest of Faust's second with its partitions ready
        (every process of a 4-process replay lost up to 1 s at its start that way)."""
        if not self.flow_active:
            await self.wait(self.can_resume_flow)  # type: ignore[arg-type]  # as Faust does
        if self.app.client_only or (self._get_active_partitions() and not self._waiting_for_members()):
            return await super()._wait_next_records(timeout)
        self.not_waiting_next_records.set()
        await self.sleep(IDLE_POLL_S)
        return {}, set()

    async def _drain_messages(self, fetcher: Any) -> None:
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                if self.suspend_flow.is_set():  # a rebalance: racing a fetch against it would spin
                    await self.wait(self.can_resume_flow)  # type: ignore[arg-type]  # as Faust does
                    continue
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.wait_first(self._fetch_and_deliver(), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)
            if self._pending_fetch is not None:  # the loop is over: nothing takes it now
                self._pending_fetch.cancel()
                self._pending_fetch = None

    async def _fetch_and_deliver(self) -> None:
        """Faust's `getmany`, per fetched batch instead of per record.

        The same guards apply: nothing is delivered once flow is suspended or the consumer
        generation changed (a rebalance), and only active partitions are delivered.
        """
        records, active, changes, generation_id = await self._next_fetch()
        await self.sleep(0)
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            await self._seek_back_while_suspended()
            return
        if self.app.consumer_generation_id != generation_id:
            return  # fetched before a rebalance, whose seeks fetch the records again
        fetched_batches: dict[str, dict[TP, deque[FetchedBatch]]] = {}
        others: list[tuple[TP, list]] = []
        for tp, fetched in records.items():
            if tp.topic in self.handlers:
                if active is not None and tp not in active and tp not in self._buffered_partitions:
                    continue  # Faust's seek back after the rebalance that paused it fetches them again
                # the deque owns the batches from here: a parsed batch holds its decompressed
                # bytes until nothing refers to it, so the poll's list must not keep them all
                fetched_batches.setdefault(tp.topic, {})[tp] = deque(fetched)
                fetched.clear()
                continue
            fresh = self._unread(tp, fetched)
            if fresh:
                others.append((tp, fresh))
        for topic, pending in fetched_batches.items():
            if not await self._deliver_all(topic, pending, generation_id, changes):
                return
        for tp, fresh in others:
            await self._deliver_one_by_one(tp, fresh, generation_id, changes[tp])

    async def _next_fetch(self) -> Fetch:
        """The next fetch, with each fetched partition's seek count and the consumer generation
        as its records were taken (`StampedRecords`).

        Invariant: a fetch is never abandoned. A rebalance cancels the delivery, but the fetch
        it was waiting for goes on, on Faust's consumer thread; abandoned, its records were
        taken off aiokafka's position and thrown away, and a changelog partition its recovery
        had just sought and resumed lost them: a restore skipped them, or waited forever for
        them when they were its last (found by helper-35's review). So the fetch is kept and the
        next delivery takes it. Its seek counts were taken with its records, so records fetched
        before a rebalance's seek are found stale however late it is delivered."""
        if self._pending_fetch is None:
            self._pending_fetch = asyncio.ensure_future(self._fetch_stamped())
        fetch = self._pending_fetch
        try:
            return await asyncio.shield(fetch)
        finally:
            if fetch.done():
                self._pending_fetch = None

    async def _fetch_stamped(self) -> Fetch:
        records, active = await self._wait_next_records(1.0)
        if isinstance(records, StampedRecords):  # stamped as they were taken (KappaConsumerThread._fetch_records)
            return records, active, records.changes, records.generation_id
        return records, active, {}, self.app.consumer_generation_id  # no fetch made: nothing fetched

    async def _deliver_all(
        self, topic: str, pending: dict[TP, deque[FetchedBatch]], generation_id: int, changes: Mapping[TP, int]
    ) -> bool:
        """Hand the agent `pending`, `DELIVERY_RECORDS` or so at a time, the next delivery parsed
        on the parser thread while the agent applies this one; False once flow stopped or the
        consumer generation changed (the rest is dropped: Faust seeks back after a rebalance).

        Invariants: only the parser thread touches `pending` while a parse runs; a partition
        sought since the fetch (`changes`: the agent's rewind, a recovery's seek) is dropped
        from every later delivery and from `pending` once the running parse is done, since its
        records come again after the seek, and its read offset is left where the seek put it
        (`ReadOffsets`)."""
        loop = asyncio.get_running_loop()
        following: asyncio.Future[dict[TP, Delivered]] | None
        following = loop.run_in_executor(_parser(), take_records, pending, DELIVERY_RECORDS)
        try:
            while following is not None:
                taken = await following
                following = None
                for tp in self._sought_since(changes):
                    taken.pop(tp, None)
                    pending.pop(tp, None)
                if not self._in_generation(generation_id):
                    return False
                if pending:
                    following = loop.run_in_executor(_parser(), take_records, pending, DELIVERY_RECORDS)
                await self._deliver(topic, taken, changes)
            return True
        finally:
            if following is not None:  # abandoned (a cancelled delivery): its outcome is nobody's
                following.add_done_callback(_ignore_outcome)

    def _sought_since(self, changes: Mapping[TP, int]) -> list[TP]:
        """The partitions whose read offset something other than a delivery changed since `changes`."""
        now = self._read_offset.changes
        return [tp for tp, count in changes.items() if now[tp] != count]

    async def _deliver(self, topic: str, taken: dict[TP, Delivered], changes: Mapping[TP, int]) -> None:
        """Hand the agent one delivery; the read offsets move past it, except for partitions
        sought meanwhile (`ReadOffsets`)."""
        mine: dict[TP, Sequence[Record]] = {}
        for tp, delivered in taken.items():
            fresh = self._unread_delivered(tp, delivered)
            if fresh is not None:
                mine[tp] = fresh
        if not mine:
            return
        self._mark_stream_inbound(mine)
        await self.handlers[topic](mine)
        for tp, records in mine.items():
            if records:
                self._read_offset.delivered(tp, records[-1].offset, changes[tp])

    def _mark_stream_inbound(self, partitions: Iterable[TP]) -> None:
        """Tell Faust's monitor that these partitions' records reached the agent now, as its
        stream would per event. Its livelock check reads that time: without it, every partition
        still behind its log 5 minutes after the start (`stream_processing_timeout`) was logged
        as an ERROR, "Stream has not started processing", with a page of advice."""
        monitor = self.app.monitor
        if monitor is not None:
            now = time.monotonic()
            for tp in partitions:
                monitor.stream_inbound_time[tp] = now

    def _unread_delivered(self, tp: TP, delivered: Delivered) -> Delivered | None:
        """`_unread` for a delivery, which stays one while it passes offsets it has not read:
        records, or markers only (an empty delivery that ends past the read offset)."""
        read_offset = self._read_offset[tp]
        if read_offset is None:
            return delivered
        if not delivered:  # markers: wanted if they end past the read offset (the agent checks they follow on)
            return delivered if delivered.read_to > read_offset else None
        fresh = self._unread(tp, delivered)
        if fresh is delivered:
            return delivered
        # the records before the read offset were left out: the delivery vouches only for what follows
        return Delivered(fresh, max(delivered.start, read_offset), delivered.read_to) if fresh else None

    def _unread(self, tp: TP, fetched: list) -> list:
        """Faust's rule: a record at or after the read offset is delivered. (After a seek the
        read offset is the next offset to read; after a delivery, the last one delivered.)"""
        read_offset = self._read_offset[tp]
        if read_offset is None or fetched[0].offset >= read_offset:
            return fetched
        return [record for record in fetched if record.offset >= read_offset]

    async def _deliver_one_by_one(self, tp: TP, fetched: list, generation_id: int, changes: int) -> None:
        """Faust's own per-record path, for topics without a batch handler (changelogs), except
        that it stops at a seek of the partition made since the fetch (`changes`, `ReadOffsets`):
        the rest of `fetched` comes again from where the seek points, and the read offset stays
        there."""
        acks_enabled = self.app.topics.acks_enabled_for(tp.topic)
        read_offsets = self._read_offset
        for position, record in enumerate(fetched):
            if not await self._still_delivering(tp, record.offset, generation_id, changes):
                return
            if position % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
            read_offset = read_offsets[tp]
            offset = record.offset
            if read_offset and offset - read_offset > 1 and acks_enabled:
                await self._add_gap(tp, read_offset + 1, offset)
            if self._commit_every is not None and self._n_acked >= self._commit_every:
                self._n_acked = 0
                await self.commit()
            await self._until_taken_at_once(tp)
            if not await self._still_delivering(tp, record.offset, generation_id, changes):
                return
            if read_offsets.changes[tp] != changes:
                return
            await self.callback(self._to_message(tp, record))  # puts it at once: nothing left to wait for
            if not read_offsets.delivered(tp, offset, changes):
                return

    def _in_generation(self, generation_id: int) -> bool:
        """Flow is on and no rebalance came since `generation_id`."""
        return self.flow_active and self.app.consumer_generation_id == generation_id

    async def _still_delivering(self, tp: TP, offset: int, generation_id: int, changes: int) -> bool:
        """Whether the record of `tp` at `offset` may be handed over (`_deliverable`); if not, the
        partition is sought back there (`_fetch_again_from`)."""
        if self._deliverable(tp, generation_id):
            return True
        await self._fetch_again_from(tp, offset, generation_id, changes)
        return False

    def _deliverable(self, tp: TP, generation_id: int) -> bool:
        """Faust's own test before each record (flow on, the same consumer generation, the
        partition active or only held back for a full buffer), and the partition not paused.

        A recovery pauses a changelog partition once it is restored, then resumes flow, which
        clears the queues without a seek: the rest of a fetch delivered after that went into the
        queue after the clear, and the restore kept those records and moved its restore position
        past the cleared ones. A partition held back for a full buffer stays deliverable in
        Faust's test even when paused, hence the explicit pause check."""
        if not self._in_generation(generation_id):
            return False
        if tp in self._paused_partitions:
            return False
        return tp in self._get_active_partitions() or tp in self._buffered_partitions

    async def _fetch_again_from(self, tp: TP, offset: int, generation_id: int, changes: int) -> None:
        """Make the records of `tp` from `offset` on, fetched and not delivered, come again once
        the partition is resumed: seek it there, unless something sought it since its fetch or a
        rebalance stopped the delivery (Faust seeks back after a rebalance). Dropped without a
        seek, they never came: a recovery that paused and resumed a changelog partition while its
        fetch was being delivered waited for them forever (found by scripts/drill_pauses.py)."""
        if not self._in_generation(generation_id) or self._read_offset.changes[tp] != changes:
            return
        try:
            await self.seek_wait({tp: offset})  # on the consumer thread, in order with the recovery's seeks
        except Exception as exc:  # as Faust's own seek back: a partition revoked meanwhile is sought by its next owner
            self.log.warning(f"could not seek {tp} back to {offset}: {exc!r}")

    def _takes_at_once(self, tp: TP) -> bool:
        """Whether Faust's callback would put a record of `tp` in its queues without waiting: flow
        control is on, the producer buffer is within its limit, the conductor's callback map is not
        being changed (its lock) and every queue of `tp` has room."""
        app = self.app
        buffer = app.producer.buffer
        if not app.flow_control.is_active() or buffer.size > buffer.max_messages:
            return False
        conductor = cast(Any, app.topics)  # its type names neither the index nor the lock
        if conductor._tp_to_callback_lock.locked():
            return False
        return not any(channel.queue.full() for channel in conductor._tp_index.get(tp, ()))

    async def _until_taken_at_once(self, tp: TP) -> None:
        """Wait until a record of `tp` can be handed to Faust's callback without it waiting.

        Invariant: the per-record path never lets Faust's callback wait, so a record is in its
        queue before anything else runs, or it was never handed over. Waiting, the callback
        outlived the delivery a rebalance cancels: it puts a record into a full queue from a task
        of its own, and that task, started as flow stopped, waited for flow to resume and then put
        its record after the recovery had sought the partition back and cleared the queues.
        Faust's restore took that record's offset for the last one read and dropped every
        re-fetched record below it; the live table lost the groups whose newest entries were
        there (F1's third path). A wait here is cancelled with the delivery and leaves nothing."""
        while not self._takes_at_once(tp):
            await asyncio.sleep(TAKEN_AT_ONCE_POLL_S)

    async def _seek_back_while_suspended(self) -> None:
        try:
            await self.perform_seek()
        except Exception as exc:  # Faust's getmany logs and carries on here too
            self.log.warning(f"exception performing seek when flow not active {exc}")


class PassThroughRecords(PartitionRecords):
    """aiokafka's per-partition record iterator, for chosen topics a `FetchedBatch` per record batch.

    For the topics named in `install`, each item is one Kafka record batch, checked (CRC) but not
    yet parsed: the batch consumer parses it with aiokafka's C parser in one call, when the
    agent is about to take its records, instead of one generator step, one `ConsumerRecord` and
    one list append per record here. Unparsed, a whole fetch costs its compressed bytes, so a
    poll may take all of it. Invariant: `next_fetch_offset` is the offset after everything
    yielded so far, as aiokafka's own iterator keeps it: `FetchResult.getall` may stop after
    any item and moves the position from it, so it is set to the batch's end before the batch
    is yielded, never after. Topics not named here keep aiokafka's behaviour, record by record.
    """

    topics: ClassVar[set[str]] = set()
    _wrap = PartitionRecords._consumer_record

    @classmethod
    def install(cls, topics: Iterable[str]) -> None:
        """aiokafka builds its iterator by the module-global name; rebinding it is the only
        seam it has."""
        cls.topics.update(topics)
        aiokafka_fetcher.PartitionRecords = cls

    def _unpack_records(self) -> Iterator[Any]:
        if self._tp.topic not in self.topics:
            yield from super()._unpack_records()
            return
        batches = self._records
        while batches.has_next():
            batch = batches.next_batch()
            if self._check_crcs and not batch.validate_crc():
                # the consumer drops this iterator and fetches the batch again, as aiokafka does
                raise aiokafka_errors.CorruptRecordException(f"Invalid CRC - {self._tp}")
            first: int = self.next_fetch_offset  # type: ignore[has-type]  # a batch may start before it
            # the end of the batch, not its last record: compaction may have removed later records
            self.next_fetch_offset = batch.next_offset
            if self._aborted(batch) or batch.is_control_batch:  # in this order: an abort marker ends the abort
                # no records to read, but its offsets are passed: a log's last offset may be a marker
                yield FetchedBatch((), first, batch.next_offset)
            else:
                yield FetchedBatch(batch, first, batch.next_offset)

    def _aborted(self, batch: Any) -> bool:
        """aiokafka's own test, per batch: with read_committed, a batch of a transaction that
        was aborted (its abort marker comes later in the log, as the fetch response lists)."""
        if self._isolation_level != aiokafka_fetcher.READ_COMMITTED or batch.producer_id is None:
            return False
        self._consume_aborted_up_to(batch.base_offset)
        if batch.is_control_batch and self._contains_abort_marker(batch):
            self._aborted_producers.discard(batch.producer_id)
        return bool(batch.is_transactional and batch.producer_id in self._aborted_producers)

    def _consumer_record(self, tp: Any, record: Any) -> Any:
        if tp.topic in self.topics:
            return FetchedBatch([record], record.offset, record.offset + 1)
        return self._wrap(tp, record)


@dataclass(frozen=True, slots=True)
class FetchedBatch:
    """One record batch of a chosen topic as fetched: `records` iterates its records (aiokafka's
    C `DefaultRecord`s, with `offset`, `key`, `value` and `headers`) once; those before `first`
    were fetched but are not to be read."""

    records: Iterable[Any]
    first: int
    next_offset: int  # the offset after the batch (a control batch's, or an aborted one's, too)

    def parse(self) -> list[Any]:
        records = list(self.records)
        if records and records[0].offset < self.first:
            return [record for record in records if record.offset >= self.first]
        return records


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned parse's exception, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


@functools.cache
def _parser() -> ThreadPoolExecutor:
    """The thread that parses fetched record batches while the agent applies the previous ones
    (aiokafka's parser holds the GIL; much of the agent's work, Arrow's JSON reader and
    RocksDB, does not)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kappa-parse")


def take_records(fetched: dict[TP, deque[FetchedBatch]], limit: int) -> dict[TP, Delivered]:
    """Up to about `limit` records, parsed from the front of each partition's fetched batches in
    turn (whole batches, in offset order: a delivery exceeds `limit` by less than one record
    batch); a partition whose batches are all taken leaves `fetched`. A partition whose batches
    taken hold no record (markers) is taken too: its offsets were read."""
    taken: dict[TP, Delivered] = {}
    size = 0
    for tp in list(fetched):
        batches = fetched[tp]
        if not batches:
            del fetched[tp]
            continue
        start, read_to = batches[0].first, batches[0].first
        records: list[Any] = []
        while batches and size + len(records) < limit:
            batch = batches.popleft()
            records += batch.parse()
            read_to = batch.next_offset
        if not batches:
            del fetched[tp]
        if records or read_to > start:
            taken[tp] = Delivered(records, start, read_to)
            size += len(records)
        if size >= limit:
            break
    return taken


def deliver_batches(
    app: faust.App, source: Any, handlers: Mapping[str, BatchHandler], fair_share: int | None = None
) -> None:
    """Subscribe `app` to `source` without a Faust agent, and hand every fetched batch of the
    handlers' topics to them (faust's `Transport.Consumer` is replaced for this app only).
    `fair_share`: see `BatchDeliveryConsumer._waiting_for_members`."""
    app.topics.add(source)
    app.transport.Consumer = BatchDeliveryConsumer.for_topics(handlers, fair_share)  # type: ignore[misc]  # this app's only


async def commit_offsets(consumer: Any, offsets: Mapping[TP, int]) -> bool:
    """Commit `offsets` on the consumer's thread (`KappaConsumerThread._commit`: the partitions
    it still owns only, and a commit a rebalance overtook is skipped); False when nothing was."""
    return bool(await consumer._commit(offsets))


# --- 5, 6, 7, 8: Faust's services ---------------------------------------------------------------


class PerRecordQuietMonitor(Monitor):
    """Faust's monitor minus its four per-record hooks; the rest (commits, rebalances) stays."""

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        return None

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None


class PromptTableManager(TableManager):
    """Faust's table manager without its one-second nap before subscribing (Faust's body,
    which `check_internals` compares, minus the sleep)."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class PromptWorker(faust.Worker):
    """Faust's worker without mode's final one-second sleep after the loop has stopped, with
    the clients' outage noise held back (kappa.engine.lognoise), a hook that runs once the
    worker is ready (`on_ready`) and one that runs on a stop signal before anything is stopped.

    That sleep only lets stray callbacks run before the loop closes; by then every service,
    the consumer and the producer are stopped, and a short nap does the same job. Not shorter
    than 50 ms: with 10 ms, a 4-process scale-out round once waited 60 s for a worker to stop
    (bd9c65d), and a few turns of the loop instead (0f23607) were undone for that reason.
    """

    on_ready: Callable[[], None] | None = None  # called once: partitions assigned, tables recovered

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        if self.on_ready is not None:
            self.on_ready()

    async def before_signal_stop(self) -> None:
        """Runs on SIGTERM or SIGINT while every service (tables included) is still open."""

    async def _stop_on_signal(self, sig: signal.Signals) -> None:
        await self.before_signal_stop()
        await super()._stop_on_signal(sig)

    async def _sentinel_task(self) -> None:
        await asyncio.sleep(0.05)

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        hold_back_during_outages(logger)


def every(app: faust.App, interval: float, name: str) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """`app.timer(interval, name=name)`: run the decorated coroutine function every `interval`
    seconds from when the app has started until it stops (Faust's `itertimer` keeps the beat
    and stops with the app), registered without Faust's venusian scan hook."""

    def register(function: Callable[[], Awaitable[None]]) -> None:
        async def run_every() -> None:
            async for _ in app.itertimer(interval, name=name):
                await function()

        app._app_tasks.append(run_every)

    return register


def request_stop() -> None:
    """Stop the worker running in this process as a signal would (mode's only clean stop)."""
    os.kill(os.getpid(), signal.SIGTERM)


def fresh_event_loop() -> None:
    """mode closes the event loop when its worker stops; give the rest of the process a new one."""
    asyncio.set_event_loop(asyncio.new_event_loop())


# --- 10, 11, 12: producer and RocksDB store -----------------------------------------------------


async def drain_producer_buffer(app: faust.App) -> None:
    """Wait until Faust's producer buffer is empty and its producer flushed. Faust's own flush
    is not enough: its buffer flush gives up after 0.1 s with records still pending
    (faust/transport/producer.py, flush_atmost)."""
    producer = app.producer
    while producer.buffer.size:
        await producer.buffer.flush()
    await producer.flush()


def raw_producer(app: faust.App) -> Any:
    """Faust's own aiokafka producer (started on first use): record batches go straight to it."""
    return cast(Any, app.producer)._ensure_producer()  # the aiokafka driver's Producer


def partition_db(table: Any, partition: int) -> Any:
    """The RocksDB database (rocksdict Rdict) of one source partition; opened if it is not."""
    return table.data._db_for_partition(partition)


def is_open(table: Any, partition: int) -> bool:
    """Whether the partition's database is open (a rebalance may have closed it)."""
    return partition in table.data._dbs


def store_offset_key(table: Any) -> bytes:
    """The key under which Faust keeps a partition's changelog offset, in that partition's database."""
    return table.data.offset_key


def persisted_changelog_offset(table: Any, changelog: str, partition: int) -> int | None:
    """Where Faust's recovery of this partition resumes (after this changelog offset), if anywhere."""
    return table.data.persisted_offset(TP(changelog, partition))


def keep_newest_on_restore(table: Any, next_offset_of: Callable[[bytes, bytes], int]) -> None:
    """Make Faust's restore of `table` from its changelog keep each key's newest entry (the
    highest `next_offset_of(key, value)`; the later one of equals) instead of its last one.
    Older entries are dropped before Faust applies a batch; the restore still resumes after
    the batch's last record, dropped or not.

    Records of a changelog partition that Faust's recovery is not restoring (neither active nor
    standby) are dropped too, and do not move its restore position. Faust's `_slurp_changelogs`
    logs "recovery unknown topic" for such a record (one fetched before a rebalance took the
    partition away) and then buffers it for the table of the record before it: applied, it
    wrote a partition this process no longer owned and saved a restore position there, so when
    the partition came back its restore started past records it had never read, and the live
    table lost them (F1, helper-31)."""
    store = table.data
    apply = store.apply_changelog_batch
    recovery = table.app.tables.recovery

    def apply_newest(batch: Iterable[Any], to_key: Any, to_value: Any) -> None:
        restoring = recovery.active_tps | recovery.standby_tps
        batch = [event for event in batch if event.message.tp in restoring]
        kept = []
        newest: dict[tuple[int, bytes], int] = {}  # (partition, key) -> next offset of its newest entry so far
        ends: dict[Any, int] = {}  # changelog partition -> the batch's last offset
        for event in batch:
            message = event.message
            ends[message.tp] = max(ends.get(message.tp, -1), message.offset)
            slot = (message.partition, message.key)
            if message.value is None:  # a delete is applied as it comes
                newest.pop(slot, None)
                kept.append(event)
                continue
            if slot not in newest:
                current = store._db_for_partition(message.partition).get(message.key)
                newest[slot] = -1 if current is None else next_offset_of(message.key, current)
            offset = next_offset_of(message.key, message.value)
            if offset >= newest[slot]:
                newest[slot] = offset
                kept.append(event)
        apply(kept, to_key, to_value)
        for tp, offset in ends.items():
            store.set_persisted_offset(tp, offset)

    store.apply_changelog_batch = apply_newest


def persist_changelog_offset(table: Any, changelog: str, partition: int, offset: int) -> None:
    """Record where Faust's recovery of this partition resumes, unless a rebalance closed its
    database meanwhile (it must never be reopened here)."""
    if is_open(table, partition):
        table.data.set_persisted_offset(TP(changelog, partition), offset)
