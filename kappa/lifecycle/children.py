"""The worker processes a supervisor or a replay starts: spawning them so that they die
with their parent and hold its data-dir lock, stopping them, and reading their heartbeats."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO

from kappa.config import Settings, format_offsets
from kappa.pipeline import Definition
from kappa.processes import pid_alive

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 60.0


@dataclass
class Child:
    index: int
    process: subprocess.Popen


def spawn_process(
    settings: Settings,
    pipeline: str,
    definition: Definition,
    generation: int,
    index: int,
    interval: float,
    loglevel: str,
    hold: IO | None = None,
    catch_up_to: Mapping[int, int] | None = None,
) -> Child:
    """Start one worker process. It gets SIGTERM when this process dies, however it dies, and
    it inherits `hold` (the data dir's lock): the lock is free only once every process is gone.
    A replay's processes get `catch_up_to`, the end offsets it publishes at (see PartWriter)."""
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
    }
    command = [sys.executable, "-m", "kappa", "worker-process", *definition.to_args()]
    command += [part for flag, value in options.items() if value is not None for part in (flag, str(value))]
    parent = os.getpid()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        pass_fds=(hold.fileno(),) if hold is not None else (),
        preexec_fn=lambda: _die_with_parent(parent),
    )
    return Child(index, process)


def _die_with_parent(parent: int) -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (a clean stop that
    writes final parts), and stop at once if the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


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
    """Heartbeats of this host's live processes of one generation."""
    beats = []
    directory = settings.run_dir(pipeline, generation)
    for path in sorted(directory.glob("process-*.json")) if directory.is_dir() else []:
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if beat.get("host") == socket.gethostname() and not pid_alive(beat["pid"]):
            continue
        beats.append(beat)
    return beats
