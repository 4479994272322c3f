"""The worker processes a supervisor or a replay starts: spawning them so that they die
with their parent and hold its data-dir lock, stopping them, and reading their heartbeats."""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from kappa.config import Settings, format_offsets
from kappa.files import replace_text
from kappa.processes import still_running

if TYPE_CHECKING:  # a replay starts its processes before it imports the pipeline's modules
    from kappa.pipeline import Definition

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 60.0
READY_WAIT_S = 60.0
STANDBY_GRACE_S = 10.0


@dataclass
class Child:
    index: int
    process: subprocess.Popen


def worker_arguments(
    settings: Settings,
    pipeline: str,
    definition: Definition,
    generation: int,
    index: int,
    interval: float,
    loglevel: str,
    catch_up_to: Mapping[int, int] | None = None,
    group_size: int | None = None,
) -> list[str]:
    """The arguments of `kappa worker-process` for one worker process. A replay's processes get
    `catch_up_to`, the end offsets it publishes at (see PartWriter), and `group_size` if they
    start together (see kappa.engine.faust_internals.BatchDeliveryConsumer._waiting_for_members)."""
    options = {
        "--pipeline": pipeline,
        "--generation": generation,
        "--index": index,
        "--snapshot-interval": interval,
        "--loglevel": loglevel,
        "--broker": settings.broker,
        "--data-dir": settings.data_dir,
        "--snapshot-dir": settings.snapshot_dir,
        "--replication-factor": settings.replication_factor,
        "--catch-up-to": format_offsets(catch_up_to) if catch_up_to is not None else None,
        "--group-size": group_size,
    }
    return [
        *definition.to_args(),
        *(part for flag, value in options.items() if value is not None for part in (flag, str(value))),
    ]


def spawn_process(index: int, arguments: list[str], hold: IO | None = None) -> Child:
    """Start `kappa worker-process` with `arguments` (see `worker_arguments`). It gets SIGTERM
    when this process dies, however it dies, and it inherits `hold` (the data dir's lock): the
    lock is free only once every process is gone."""
    parent = os.getpid()
    process = subprocess.Popen(
        [sys.executable, "-m", "kappa", "worker-process", *arguments],
        stdin=subprocess.DEVNULL,
        pass_fds=(hold.fileno(),) if hold is not None else (),
        preexec_fn=lambda: _die_with_parent(parent),
    )
    return Child(index, process)


@dataclass
class Standby:
    """A worker process started before its work is known (`kappa worker-standby`).

    Most of a worker's start is importing its libraries (Faust, aiokafka, pyarrow, RocksDB):
    about half a second of CPU, over a second on a small core. A replay starts its processes in
    standby first, so that they import while it checks the log and claims its generation, then
    hands each its `worker-process` arguments on stdin (`assign`). Each writes one line to its
    `ready` pipe once imported; `assign` waits for all of them before it hands out any work, so
    the processes join their group together: one that joined alone would take every partition,
    start on them, and lose that work to the rebalance the others' joins cause a moment later.
    """

    index: int
    process: subprocess.Popen
    ready: int  # the read end of the process's ready pipe; EOF without a line: it exited


def start_standby(count: int) -> list[Standby]:
    """`count` worker processes in standby; they die with this process, as spawned ones do."""
    parent = os.getpid()
    started = []
    for index in range(count):
        read_end, write_end = os.pipe()
        process = subprocess.Popen(
            [sys.executable, "-m", "kappa", "worker-standby", "--index", str(index), "--ready-fd", str(write_end)],
            stdin=subprocess.PIPE,
            pass_fds=(write_end,),
            preexec_fn=lambda: _die_with_parent(parent),
        )
        os.close(write_end)
        started.append(Standby(index, process, read_end))
    return started


def assign(standby: list[Standby], arguments: Callable[[int], list[str]], wait: float = READY_WAIT_S) -> list[Child]:
    """Give each standby process its `worker-process` arguments (`arguments(index)`) once every
    one is ready or gone, or `wait` seconds have passed; a process that is gone is the caller's
    to restart, as any worker process that exits."""
    waiting = {entry.ready: entry for entry in standby}
    deadline = time.monotonic() + wait
    while waiting and time.monotonic() < deadline:
        readable, _, _ = select.select(list(waiting), [], [], max(deadline - time.monotonic(), 0.0))
        for fd in readable:
            os.read(fd, 64)  # a line once imported, or EOF: either way it waits no longer
            waiting.pop(fd)
    children = []
    for entry in standby:
        _close_ready(entry)
        stdin = entry.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(arguments(entry.index)).encode() + b"\n")
            stdin.close()
        except BrokenPipeError:  # it exited: the caller sees its exit code and restarts it
            pass
        children.append(Child(entry.index, entry.process))
    return children


def _die_with_parent(parent: int) -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (a clean stop that
    writes final parts), and stop at once if the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _close_ready(entry: Standby) -> None:
    if entry.ready >= 0:
        os.close(entry.ready)
        entry.ready = -1


def stop_standby(standby: list[Standby]) -> None:
    """Stop processes that never got work: EOF on stdin ends them, SIGTERM if still importing."""
    for entry in standby:
        _close_ready(entry)
        if entry.process.stdin is not None and not entry.process.stdin.closed:
            entry.process.stdin.close()
    stop_children([Child(entry.index, entry.process) for entry in standby], grace=STANDBY_GRACE_S)


def stop_children(children: list[Child], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every child, then SIGKILL what has not stopped within `grace` seconds."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            print(f"kappa: process {child.index} did not stop in time; killing it", file=sys.stderr)
            child.process.kill()
            child.process.wait()


def heartbeats(settings: Settings, pipeline: str, generation: int) -> list[dict]:
    """Heartbeats of one generation's processes: this host's live ones, and every other host's."""
    beats = []
    directory = settings.run_dir(pipeline, generation)
    for path in sorted(directory.glob("process-*.json")) if directory.is_dir() else []:
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if beat.get("host") == socket.gethostname() and not still_running(beat["pid"], beat.get("pid_started")):
            continue
        beats.append(beat)
    return beats


RESTARTS_KEPT = 20  # the newest restarts a supervisor record lists


def supervisor_record_path(settings: Settings, pipeline: str) -> Path:
    return settings.data_dir / "run" / pipeline / "supervisor.json"


@dataclass
class SupervisorRecord:
    """What `kappa status` shows of a running `kappa worker` beyond its processes' heartbeats:
    how many processes it keeps, and its restarts of them. A process that fails at every start
    writes no heartbeat worth reading; without this record, status showed only the lag of a
    worker whose processes were restarted every two seconds."""

    pid: int
    host: str
    started_at: str
    processes: int
    generation: int
    restart_count: int = 0
    restarts: list[dict] = field(default_factory=list)  # the newest RESTARTS_KEPT: index, pid, code, at
    # when the supervisor started (kappa.processes.process_start_ticks): a record left by a
    # supervisor that was killed names a pid that another process may have since
    pid_started: int | None = None

    def restarted(self, index: int, pid: int, code: int, at: str) -> None:
        self.restart_count += 1
        self.restarts = [*self.restarts, {"index": index, "pid": pid, "code": code, "at": at}][-RESTARTS_KEPT:]

    def write(self, settings: Settings, pipeline: str) -> None:
        replace_text(supervisor_record_path(settings, pipeline), json.dumps(asdict(self)))


def read_supervisor_record(settings: Settings, pipeline: str) -> SupervisorRecord | None:
    """The record of the worker running `pipeline` from this data dir; None when there is none,
    or when its supervisor (on this host) is gone."""
    try:
        record = SupervisorRecord(**json.loads(supervisor_record_path(settings, pipeline).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if record.host == socket.gethostname() and not still_running(record.pid, record.pid_started):
        return None
    return record
