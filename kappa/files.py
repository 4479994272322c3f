"""Files that other processes read while they are rewritten: a reader sees the old text or the new, whole."""

from __future__ import annotations

import os
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Write `text` to a staging file beside `path` and rename it over `path` (atomic on one
    file system), so a reader never sees a file written halfway. The staging name carries
    the pid: two writers never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(text)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
