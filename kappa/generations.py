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


class GenerationBusy(Exception):
    def __init__(self, generation: int, entry: dict) -> None:
        super().__init__(generation)
        self.generation = generation
        self.entry = entry


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

    def current(self) -> int | None:
        return self.read().get("current")

    def building(self) -> tuple[int, dict] | None:
        """The generation a replay is building beside the current one, if any."""
        for number, entry in self.read()["generations"].items():
            if entry.get("state") == "building":
                return int(number), entry
        return None

    def begin_building(self, definition: dict, builder: dict) -> int:
        """Allocate generation N+1 for a replay beside live work; refuse a second one."""
        with self._locked() as state:
            for number, entry in state["generations"].items():
                if entry.get("state") == "building":
                    raise GenerationBusy(int(number), entry)
            generation = max((int(n) for n in state["generations"]), default=0) + 1
            state["generations"][str(generation)] = {
                "state": "building",
                "mode": "replay",
                "definition": definition,
                "builder": builder,
                "started_at": utc_now(),
            }
        return generation

    def set_builder(self, generation: int, builder: dict) -> None:
        with self._locked() as state:
            state["generations"][str(generation)]["builder"] = builder

    def switch_to(self, generation: int) -> int | None:
        """Make `generation` current and the previous one retiring; returns the previous."""
        with self._locked() as state:
            previous = state.get("current")
            state["current"] = generation
            entry = state["generations"][str(generation)]
            entry["state"] = "live"
            entry["switched_at"] = utc_now()
            if previous is not None and previous != generation:
                state["generations"][str(previous)]["state"] = "retiring"
        return previous

    def mark(self, generation: int, new_state: str, *, current: bool = False) -> None:
        with self._locked() as state:
            entry = state["generations"].setdefault(str(generation), {})
            entry["state"] = new_state
            entry["updated_at"] = utc_now()
            if current:
                state["current"] = generation
