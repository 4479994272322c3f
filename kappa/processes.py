"""Small process helpers shared by the broker, the workers and status."""

from __future__ import annotations

import os
from pathlib import Path


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
