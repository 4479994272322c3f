"""Wall time and peak RSS of one contender's process group.

Peak RSS is the sum of the group's VmHWM (the kernel's high-water mark of each process's
own memory since its exec), sampled while it runs. wait4's ru_maxrss would be wrong here:
a forked child starts with the bench's own pages counted (the dataset frame), so every
contender reported at least the bench's size.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

QUIET_BUSY = 0.15  # of all CPUs: below this the machine counts as quiet
QUIET_WINDOW_S = 0.5
QUIET_PATIENCE_S = 10.0


def _cpu_times() -> tuple[int, int]:
    """Busy and total jiffies of all CPUs since boot (/proc/stat's first line)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]  # guest time is in user already
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def wait_until_quiet() -> float:
    """Wait until the machine is quiet, so that one contender's leftovers (a JVM exiting, the
    broker flushing what it was sent) are not charged to the next; seconds waited.

    Gives up after `QUIET_PATIENCE_S` (a busy neighbour would otherwise stall the bench) and
    does nothing where /proc/stat cannot be read."""
    started = time.monotonic()
    try:
        busy, total = _cpu_times()
        while time.monotonic() - started < QUIET_PATIENCE_S:
            time.sleep(QUIET_WINDOW_S)
            now_busy, now_total = _cpu_times()
            share = (now_busy - busy) / max(now_total - total, 1)
            if share < QUIET_BUSY:
                break
            busy, total = now_busy, now_total
    except OSError:
        pass
    return time.monotonic() - started


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    returncode: int
    log: Path


def run_measured(
    command: list[str],
    log: Path,
    env: dict | None = None,
    timeout_s: float = 3600,
    preexec_fn: Callable[[], None] | None = None,
    on_poll: Callable[[int], None] | None = None,
) -> Measured:
    """Run to exit, once the machine is quiet (`wait_until_quiet`); a contender past its timeout,
    or one left behind by an interrupt, is killed.

    `preexec_fn` runs in the child before exec; `on_poll(pgid)` every poll (50 ms) while it runs."""
    wait_until_quiet()
    with open(log, "wb") as output:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   preexec_fn=preexec_fn)  # fmt: skip
        reaped = False
        peak_kb = 0
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    reaped = True
                    break
                peak_kb = max(peak_kb, group_hwm_kb(process.pid))
                if on_poll is not None:
                    on_poll(process.pid)
                if time.monotonic() - started > timeout_s:
                    output.write(f"\nbench: killed after {timeout_s:g}s\n".encode())
                    os.killpg(process.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(process.pid, 0)
                    reaped = True
                    break
                time.sleep(0.05)
        finally:
            if not reaped:
                os.killpg(process.pid, signal.SIGKILL)
                os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
    return Measured(seconds, peak_kb / 1024.0, os.waitstatus_to_exitcode(status), log)


with open("/proc/self/cmdline", "rb") as _own:
    _OWN_CMDLINE = _own.read()


def group_hwm_kb(group: int) -> int:
    """Sum of VmHWM over the live processes of a process group (0 for a process not yet exec'd)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) != group:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                if cmdline.read() == _OWN_CMDLINE:
                    continue  # forked but not yet exec'd: still the bench's own pages
            with open(f"/proc/{entry.name}/status", "rb") as status:
                for line in status:
                    if line.startswith(b"VmHWM:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total
