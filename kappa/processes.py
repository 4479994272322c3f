"""Small process helpers shared by the broker, the workers, replays and status."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
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
