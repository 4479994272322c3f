"""The record of a pipeline's generations, kept beside its snapshots.

A small JSON file, changed only under an exclusive lock and replaced atomically, so that
concurrent replays agree on numbering and every reader sees one consistent state.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kappa.snapshot import utc_now


class Registry:
    def __init__(self, snapshot_dir: Path, pipeline: str) -> None:
        self.directory = snapshot_dir / pipeline
        self.path = self.directory / "generations.json"

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"current": None, "generations": {}}

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".generations.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            yield state
            staging = self.path.with_suffix(f".{os.getpid()}.tmp")
            staging.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            os.replace(staging, self.path)

    def begin(self, mode: str, definition: dict) -> int:
        """Allocate the next generation number and record it as running."""
        with self._locked() as state:
            numbers = [int(n) for n in state["generations"]]
            generation = max(numbers, default=0) + 1
            state["generations"][str(generation)] = {
                "state": "running",
                "mode": mode,
                "definition": definition,
                "started_at": utc_now(),
            }
        return generation

    def mark(self, generation: int, new_state: str, *, current: bool = False) -> None:
        with self._locked() as state:
            entry = state["generations"].setdefault(str(generation), {})
            entry["state"] = new_state
            entry["updated_at"] = utc_now()
            if current:
                state["current"] = generation
