"""Wall time and peak RSS of one contender process (and the children it waited for)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float
    returncode: int
    log: Path


def run_measured(command: list[str], log: Path, env: dict | None = None, timeout_s: float = 3600) -> Measured:
    """Run to exit; a contender past its timeout, or one left behind by an interrupt, is killed."""
    with open(log, "wb") as output:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        reaped = False
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    reaped = True
                    break
                if time.monotonic() - started > timeout_s:
                    output.write(f"\nbench: killed after {timeout_s:g}s\n".encode())
                    os.killpg(process.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(process.pid, 0)
                    reaped = True
                    break
                time.sleep(0.02)
        finally:
            if not reaped:
                os.killpg(process.pid, signal.SIGKILL)
                os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
    return Measured(seconds, usage.ru_maxrss / 1024.0, os.waitstatus_to_exitcode(status), log)
