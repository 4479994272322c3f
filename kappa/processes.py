"""Small process helpers shared by the broker, the workers, replays, their supervisors and status."""

from __future__ import annotations

import gc
import importlib.abc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def in_background(name: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """`function(*args, **kwargs)` on a thread of its own, so its round trips overlap the
    caller's work; its result, or its exception, comes out of the future.

    A daemon thread: a caller that fails meanwhile (an engine mismatch found at import) exits
    at once with its own one-line error, without waiting for a broker that may not answer."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as exc:  # raised again where the result is taken
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


# Young-generation collections per allocated container object; CPython's default is 700.
GC_YOUNG_THRESHOLD = 100_000


def relax_garbage_collector() -> None:
    """Stop the cyclic GC from rescanning the heap for every few hundred records.

    Each record a replay parses allocates container objects (aiokafka's record, orjson's
    dict) that live until the batch is folded, and a load makes a header list per row, so
    CPython's default thresholds run a young collection every 700 of them and, every hundred
    of those, a full one over everything the imports left (Faust, aiohttp, pandas: hundreds
    of thousands of objects). py-spy --native put `gc_collect_main` at about a quarter of a
    replay's CPU; in a load, 1M header lists took 0.79 s with the defaults and 0.18 s with
    this. Freezing what exists at start moves it out of the collector's sight for good, and
    a larger young threshold batches the rest; garbage cycles are still collected, just less
    often. A kappa command starts with the collector off (kappa.ops.cli.main); this turns it on.
    """
    # no collection first: the imports and the wiring leave little garbage (1,046 objects at a batch
    # replay's start, measured), and a collection costs 35-50 ms
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    gc.enable()


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (even if owned by another user); a zombie, which has exited and
    only waits to be reaped, is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc here: trust the signal check
    return "\nState:\tZ" not in status


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (field 22 of /proc/<pid>/stat); None when
    it is gone or there is no /proc. A pid and this together name one process: Linux reuses pids."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def still_running(pid: int, started: int | None) -> bool:
    """Whether the process that wrote `pid` and `started` (its process_start_ticks) runs: a
    record left by a killed process may name a pid Linux has since given another. Without
    `started` (a record of an older kappa), whatever has the pid counts."""
    return pid_alive(pid) and (started is None or process_start_ticks(pid) == started)


class PandasStaysOut(importlib.abc.MetaPathFinder):
    """Refuses `import pandas` in a process that runs a Faust worker or supervises workers.

    Nothing such a process runs uses pandas: the agent, the parts and the snapshots build Arrow
    arrays from numpy and Arrow, and the CSV bytes are formatted by kappa.snapshots.csvtext.
    But pyarrow imports pandas the first time it builds an array or takes a Python scalar,
    only to ask whether its input is a pandas object; an import that fails tells it pandas is
    absent, and it carries on without. Importing it cost a worker about 40 MB of RSS and 0.2 s
    of CPU (0.5 s under a 0.4 CPU quota), on a thread that held the GIL while the first batches
    were applied (1k-key --batch replay, 4 alternating pairs: 2.89 s -> 2.78 s from process
    start, peak RSS 321 -> 282 MB); a supervisor paid the same for its first publish."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "pandas" or fullname.startswith("pandas."):
            raise ImportError(f"{fullname} is not imported in a process that runs or supervises kappa workers")


def keep_pandas_out() -> None:
    if not any(isinstance(finder, PandasStaysOut) for finder in sys.meta_path):
        sys.meta_path.insert(0, PandasStaysOut())


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the block runs, as Ctrl-C does, so that its
    cleanup runs (`finally` blocks, context managers) and the command says it was interrupted.
    SIGTERM's default ends the process at once: a load left stdin's spooled copy behind, and a
    replay beside live left its generation building with no builder, which `kappa gc` never
    deleted. Handlers the block installs for SIGTERM itself take precedence while they are in."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    with handling_signals(interrupt, signal.SIGTERM):
        yield


@contextmanager
def handling_signals(handler: Callable[[int, Any], None], *signums: int) -> Iterator[None]:
    """`handler` for the given signals while the block runs, the previous handlers after it."""
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)
