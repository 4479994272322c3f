"""The record of a pipeline's generations, kept beside its snapshots.

A small JSON file, changed only under an exclusive lock and replaced atomically, so that
concurrent replays agree on numbering and every reader sees one consistent state. Each
generation has a state; every change of state is checked against the transitions below, so
a bug that would, say, bring a retired generation back to life fails loudly instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

from kappa.errors import KappaError
from kappa.files import replace_text
from kappa.processes import process_start_ticks, still_running
from kappa.snapshots.snapshot import utc_now


class GenerationState(StrEnum):
    RUNNING = "running"  # a batch replay is computing it in the foreground
    BUILDING = "building"  # a replay beside the current generation is computing it
    LIVE = "live"  # current: workers tail the log and publish it
    COMPLETE = "complete"  # current: a batch replay published it; workers may continue it
    RETIRING = "retiring"  # replaced; its state is deleted once its processes have stopped
    KEPT = "kept"  # replaced, and its state kept on request (--keep-old) until `kappa gc --kept`
    RETIRED = "retired"  # replaced or abandoned, and its state is deleted
    FAILED = "failed"  # stopped before it became current; its state is kept to resume or delete


ALLOWED: dict[GenerationState | None, set[GenerationState]] = {
    None: {GenerationState.RUNNING, GenerationState.BUILDING},
    GenerationState.RUNNING: {GenerationState.LIVE, GenerationState.FAILED},
    GenerationState.BUILDING: {GenerationState.LIVE, GenerationState.FAILED, GenerationState.BUILDING},
    GenerationState.LIVE: {GenerationState.COMPLETE, GenerationState.RETIRING, GenerationState.LIVE},
    GenerationState.COMPLETE: {GenerationState.LIVE, GenerationState.RETIRING},
    GenerationState.RETIRING: {GenerationState.RETIRED, GenerationState.KEPT},
    GenerationState.KEPT: {GenerationState.RETIRED},
    GenerationState.FAILED: {GenerationState.RUNNING, GenerationState.BUILDING, GenerationState.RETIRED},
    GenerationState.RETIRED: set(),
}
CURRENT_STATES = {GenerationState.LIVE, GenerationState.COMPLETE}
# a replay's own process keeps its generation in these while it computes it (its `builder`)
BUILDER_STATES = (GenerationState.RUNNING, GenerationState.BUILDING)


def this_builder() -> dict:
    """Who is computing a generation: checked before another process takes it over."""
    return {"pid": os.getpid(), "pid_started": process_start_ticks(os.getpid()), "host": socket.gethostname()}


def builder_alive(entry: dict) -> bool:
    builder = entry.get("builder") or {}
    if builder.get("host") != socket.gethostname():
        return bool(builder)  # cannot tell for another host: assume it is alive
    return bool(builder.get("pid")) and still_running(int(builder["pid"]), builder.get("pid_started"))


def _state_of(entry: dict) -> GenerationState | None:
    raw = entry.get("state")
    return GenerationState(raw) if raw is not None else None


def _transition(generation: int, entry: dict, new: GenerationState) -> None:
    old = _state_of(entry)
    if new not in ALLOWED[old]:
        raise KappaError(
            f"generation {generation} cannot go from {old.value if old else 'nothing'} to {new.value}; "
            "the registry may have been edited by hand or by another kappa version"
        )
    entry["state"] = new.value
    entry["updated_at"] = utc_now()


def pipelines_under(snapshot_dir: Path) -> list[str]:
    """The pipelines whose registry lives under `snapshot_dir`, by name."""
    if not snapshot_dir.is_dir():
        return []
    return sorted(entry.name for entry in snapshot_dir.iterdir() if (entry / "generations.json").exists())


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
            replace_text(self.path, json.dumps(state, indent=2, sort_keys=True) + "\n")

    def begin(self, mode: str, definition: dict, builder: dict | None = None) -> int:
        """Allocate the next generation number and record it as running."""
        with self._locked() as state:
            numbers = [int(n) for n in state["generations"]]
            generation = max(numbers, default=0) + 1
            entry = {"mode": mode, "definition": definition, "started_at": utc_now(), "builder": builder or {}}
            _transition(generation, entry, GenerationState.RUNNING)
            state["generations"][str(generation)] = entry
        return generation

    def current_or_begin(self, mode: str, definition: dict) -> tuple[int, bool]:
        """The current generation, or a new one made current at once; True when it is new.

        One step under the lock: two supervisors starting a pipeline together (on two hosts,
        say) must agree on one generation 1, not make one each."""
        with self._locked() as state:
            current = state.get("current")
            if current is not None:
                return int(current), False
            generation = max((int(n) for n in state["generations"]), default=0) + 1
            entry = {"mode": mode, "definition": definition, "started_at": utc_now(), "builder": {}}
            _transition(generation, entry, GenerationState.RUNNING)
            _transition(generation, entry, GenerationState.LIVE)
            state["generations"][str(generation)] = entry
            state["current"] = generation
        return generation, True

    def resume(self, generation: int, new: GenerationState, builder: dict) -> None:
        """Take over a failed generation to finish it (its state and offsets are kept)."""
        with self._locked() as state:
            entry = state["generations"][str(generation)]
            _transition(generation, entry, new)
            entry["builder"] = builder

    def entries(self) -> dict[int, dict]:
        return {int(number): entry for number, entry in self.read()["generations"].items()}

    def in_state(self, *states: GenerationState) -> list[tuple[int, dict]]:
        wanted = {state.value for state in states}
        return sorted((n, e) for n, e in self.entries().items() if e.get("state") in wanted)

    def current(self) -> int | None:
        return self.read().get("current")

    def building(self) -> tuple[int, dict] | None:
        """The generation a replay is building beside the current one, if any."""
        building = self.in_state(GenerationState.BUILDING)
        return building[0] if building else None

    def begin_building(self, definition: dict, builder: dict) -> int:
        """Allocate generation N+1 for a replay beside live work; refuse a second one."""
        with self._locked() as state:
            for number, entry in state["generations"].items():
                if entry.get("state") == GenerationState.BUILDING:
                    raise GenerationBusy(int(number), entry)
            generation = max((int(n) for n in state["generations"]), default=0) + 1
            entry = {"mode": "replay", "definition": definition, "builder": builder, "started_at": utc_now()}
            _transition(generation, entry, GenerationState.BUILDING)
            state["generations"][str(generation)] = entry
        return generation

    def set_builder(self, generation: int, builder: dict) -> None:
        with self._locked() as state:
            state["generations"][str(generation)]["builder"] = builder

    def bind_to_topic(self, generation: int, topic_id: str) -> str:
        """The id of the topic the generation reads: recorded the first time, returned ever after
        (a topic deleted and made again under the same name has another id). Once recorded, it
        is read without the registry's lock: a running worker compares it every few seconds."""
        recorded = self.read()["generations"][str(generation)].get("topic_id")
        if recorded is not None:
            return str(recorded)
        with self._locked() as state:
            return state["generations"][str(generation)].setdefault("topic_id", topic_id)

    def switch_to(self, generation: int) -> int | None:
        """Make `generation` current and the previous one retiring; returns the previous."""
        with self._locked() as state:
            previous = state.get("current")
            state["current"] = generation
            entry = state["generations"][str(generation)]
            _transition(generation, entry, GenerationState.LIVE)
            entry["switched_at"] = utc_now()
            if previous is not None and previous != generation:
                _transition(previous, state["generations"][str(previous)], GenerationState.RETIRING)
        return previous

    def mark(self, generation: int, new_state: GenerationState, *, current: bool = False) -> None:
        with self._locked() as state:
            entry = state["generations"].setdefault(str(generation), {})
            _transition(generation, entry, new_state)
            if current:
                state["current"] = generation
