"""Progress on long work: a redrawn line on a terminal, an occasional plain line elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_rate(rows: float, seconds: float) -> str:
    return f"{rows / seconds:,.0f} rows/s" if seconds > 0 else "- rows/s"


def human_eta(remaining: float, rate: float) -> str:
    if rate <= 0:
        return "ETA -"
    seconds = int(remaining / rate)
    return f"ETA {seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"ETA {seconds}s"


class ProgressLine:
    """Redraws in place on a TTY; on a pipe or in CI prints at most every `plain_every` seconds."""

    def __init__(self, stream: TextIO | None = None, plain_every: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.plain_every = plain_every
        self.started = time.monotonic()
        self._last_plain: float | None = None
        self._last_line = ""
        self._drawn = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, done: int, total: int | None, label: str = "", detail: str = "") -> None:
        elapsed = self.elapsed()
        rate = done / elapsed if elapsed > 0 else 0.0
        if total:
            fraction = min(done / total, 1.0)
            bar = "#" * int(fraction * 24)
            head = f"{label} [{bar:<24}] {fraction:6.1%} {done:,}/{total:,}"
            tail = f"{rate:,.0f} rows/s {human_eta(total - done, rate)}"
        else:
            head, tail = f"{label} {done:,}", f"{rate:,.0f} rows/s"
        line = f"{head} {tail} {detail}".rstrip()
        self._last_line = line
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
            self._drawn = True
        elif self._last_plain is None or time.monotonic() - self._last_plain >= self.plain_every:
            self._last_plain = time.monotonic()
            self._drawn = False
            print(line, file=self.stream, flush=True)
        else:
            self._drawn = True

    def finish(self) -> None:
        """End the bar on a terminal; on a pipe, print the last state if it was not shown."""
        if self._drawn:
            self.stream.write("\n" if self.tty else self._last_line + "\n")
            self.stream.flush()
            self._drawn = False
