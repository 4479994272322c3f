"""Replay beside live work (Kreps' recipe): build generation N+1 from offset 0 next to the
current generation N, switch readers to it once it has caught up, then retire N.

The script runs N+1's processes itself and shows their progress. Generation N keeps
publishing until the switch; the switch is one publish, made under the same lock that every
publisher takes, that also records N+1 as current, so N can never publish after it. Live
supervisors see the switch in the registry and move their processes to N+1. A replay that is
killed leaves N+1 "building"; running the same replay again resumes it (exactly, since
state and offsets are idempotent), and a second replay is refused while one is alive.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kappa.config import Settings
from kappa.engine.names import changelog_topic
from kappa.errors import KappaError
from kappa.kafka.availability import (
    CHECK_EVERY_S,
    CLIENT_ERRORS_AFTER_S,
    LeaderWatch,
    OutageReporter,
    ReporterThread,
    outage_recent,
)
from kappa.lifecycle.children import (
    Child,
    Standby,
    assign,
    heartbeats,
    spawn_process,
    start_standby,
    stop_children,
    worker_arguments,
)
from kappa.lifecycle.cleanup import (
    clear_leftovers,
    collect_garbage,
    delete_generation_state,
    discard_built_on_another_log,
    report,
    resumed_from,
)
from kappa.lifecycle.generations import GenerationBusy, GenerationState, Registry, builder_alive, this_builder
from kappa.lifecycle.guards import (
    LOG_CHECK_INTERVAL_S,
    EmptyResult,
    LogChanged,
    LogWatch,
    check_same_topic,
    preflight,
)
from kappa.ops.progress import ProgressLine
from kappa.pipeline import Definition
from kappa.processes import keep_pandas_out
from kappa.snapshots import parts
from kappa.snapshots.publisher import Publisher

POLL_S = 0.2
RETIRE_WAIT_S = 120.0
# a process that exits this often within this window fails at every start: the replay gives up
GIVE_UP_EXITS = 5
GIVE_UP_WINDOW_S = 60.0


@dataclass
class AppliedSpan:
    """When a replay's processes applied records: from the first batch any of them began to the
    last one any applied (wall clock, from their heartbeats). Its length is the replay's
    time without its fixed costs (start-up, group join, publish and stop), so throughput per
    process shows in it when the whole replay is short."""

    first: float | None = None
    last: float | None = None

    def add(self, beats: list[dict]) -> None:
        for beat in beats:
            first, last = beat.get("first_applied_at"), beat.get("last_applied_at")
            if first is not None:
                self.first = first if self.first is None else min(self.first, first)
            if last is not None:
                self.last = last if self.last is None else max(self.last, last)

    @property
    def seconds(self) -> float | None:
        return None if self.first is None or self.last is None else self.last - self.first


@dataclass
class SwitchResult:
    generation: int
    previous: int | None
    path: Path
    seconds: float
    retired: bool
    applying: float | None = None  # seconds from the first record applied to the last (AppliedSpan)


def claim_generation(registry: Registry, definition: Definition) -> tuple[int, bool]:
    """A new generation, or the half-built one a killed replay of the same definition left."""
    record = definition.to_record()
    building = registry.building()
    if building is not None:
        number, entry = building
        builder = entry.get("builder", {})
        if builder_alive(entry):
            raise KappaError(
                f"generation {number} is already being built by a replay (pid {builder.get('pid')} on "
                f"{builder.get('host')}, started {entry.get('started_at')}): wait for it to switch over, "
                "or stop it first; two replays at once are refused"
            )
        if entry.get("definition") == record:
            registry.set_builder(number, this_builder())
            return number, True
        registry.mark(number, GenerationState.FAILED)
    try:
        return registry.begin_building(record, this_builder()), False
    except GenerationBusy as busy:
        raise KappaError(f"generation {busy.generation} is already being built by another replay") from None


def _progress_detail(offsets: dict[int, int], ends: dict[int, int]) -> str:
    return " ".join(f"p{p}:{min(offsets.get(p, 0), end)}/{end}" for p, end in sorted(ends.items()))


def run_beside(
    settings: Settings,
    pipeline: str,
    definition: Definition,
    *,
    processes: int = 1,
    interval: float = 1.0,
    keep_old: bool = False,
    allow_truncated: bool = False,
    force: bool = False,
    loglevel: str = "warn",
    standby: list[Standby] | None = None,
) -> SwitchResult:
    """`standby`: processes started early (see Standby); the replay starts its own without."""
    partitions, ends = preflight(settings, definition, allow_truncated, force)
    registry = Registry(settings.snapshot_dir, pipeline)
    report(discard_built_on_another_log(settings, pipeline, definition.topic, partitions), pipeline)
    generation, resumed = claim_generation(registry, definition)
    report(collect_garbage(settings, pipeline, keep=generation), pipeline)
    if not resumed:
        clear_leftovers(settings, pipeline, generation)
        check_same_topic(settings, pipeline, generation, definition.topic)  # records the topic it reads
    total = sum(ends.values())
    current = registry.current()
    verb = "resuming" if resumed else "building"
    start = resumed_from(settings, pipeline, generation, definition.topic, ends) if resumed else "from offset 0"
    print(
        f"replay {pipeline}: {verb} generation {generation} {start} beside current generation {current}; "
        f"{total:,} records to catch up in {partitions} partitions",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    standby = standby if standby is not None else start_standby(processes)
    children = assign(
        standby,
        lambda index: worker_arguments(
            settings, pipeline, definition, generation, index, interval, loglevel, ends, group_size=len(standby)
        ),
    )
    keep_pandas_out()  # pyarrow would import it for the first publish, only to find no pandas object
    publisher = Publisher(settings, pipeline, definition, generation, partitions, force=force)
    line = ProgressLine(plain_every=5.0)
    span = AppliedSpan()
    topics = [definition.topic, definition.dlq_topic, changelog_topic(pipeline, generation)]
    outages = OutageReporter(LeaderWatch(settings.broker, topics), "replay")
    watching = ReporterThread(outages)
    watching.start()  # its processes ride an outage out quietly: the line that says why is printed here
    try:
        path = _catch_up_and_switch(
            settings, pipeline, generation, ends, children, publisher, line, interval, loglevel, definition, span,
            outages,
        )  # fmt: skip
    except (EmptyResult, LogChanged):  # nothing worth resuming
        line.finish()
        stop_children(children)
        delete_generation_state(settings, pipeline, generation)
        registry.mark(generation, GenerationState.FAILED)
        raise
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (kappa.processes.sigterm_interrupts): as a batch replay says it
        line.finish()
        if registry.current() == generation:  # stopped between the switch and the old generation's retirement
            raise KappaError(
                f"replay of generation {generation} stopped after it became current; `kappa gc --pipeline "
                f"{pipeline}` (or the pipeline's next command) deletes the generation it replaced"
            ) from None
        raise KappaError(
            f"replay of generation {generation} stopped before it caught up; its state is kept: run the same "
            f"replay again to resume it where it stopped, or `kappa gc --pipeline {pipeline}` to delete it"
        ) from None
    finally:
        watching.stop()
        watching.join(timeout=2 * CHECK_EVERY_S)  # its last line comes before the replay's own
        line.finish()
        stop_children(children)
    previous = current if current != generation else None
    retired = False
    if previous is not None and keep_old:
        keep_generation(settings, pipeline, previous)
    elif previous is not None:
        retired = retire_generation(settings, pipeline, previous, definition.topic)
    return SwitchResult(generation, previous, path, time.monotonic() - started, retired, span.seconds)


def _catch_up_and_switch(
    settings: Settings,
    pipeline: str,
    generation: int,
    ends: dict[int, int],
    children: list[Child],
    publisher: Publisher,
    line: ProgressLine,
    interval: float,
    loglevel: str,
    definition: Definition,
    span: AppliedSpan,
    outages: OutageReporter,
) -> Path:
    """Restart the processes that exit (unless one fails at every start) and show progress,
    until every partition's part reaches its end offset; then make the generation current."""
    total = sum(ends.values())
    directory = parts.parts_dir(settings.snapshot_dir, pipeline, generation)
    next_log_check = time.monotonic() + LOG_CHECK_INTERVAL_S
    log_watch = LogWatch(settings, pipeline, definition.topic)
    exits: dict[int, list[float]] = {}
    while True:
        time.sleep(POLL_S)
        if time.monotonic() >= next_log_check:
            log_watch.unchanged(generation)
            next_log_check = time.monotonic() + LOG_CHECK_INTERVAL_S
        for position, child in enumerate(children):
            if child.process.poll() is not None:
                if not (outage_recent(CLIENT_ERRORS_AFTER_S) or outages.poll() is not None):
                    _give_up_if_failing(exits, child, pipeline, generation)  # an exit in an outage is no sign
                print(f"replay: process {child.index} exited ({child.process.returncode}); restarting", file=sys.stderr)
                arguments = worker_arguments(
                    settings, pipeline, definition, generation, child.index, interval, loglevel, ends
                )
                children[position] = spawn_process(child.index, arguments)
        offsets: dict[int, int] = {}
        beats = heartbeats(settings, pipeline, generation)
        span.add(beats)
        for beat in beats:
            for partition, offset in beat.get("folded_offsets", {}).items():
                offsets[int(partition)] = max(offsets.get(int(partition), 0), offset)
        done = sum(min(offsets.get(p, 0), end) for p, end in ends.items())
        line.update(done, total, label=f"g{generation}", detail=_progress_detail(offsets, ends))
        published = {p: offset for p, (offset, _) in parts.newest_parts(directory).items()}
        if all(published.get(p, 0) >= end for p, end in ends.items()) and (total == 0 or published):
            span.add(heartbeats(settings, pipeline, generation))  # a process beats before its part at the end
            if not log_watch.unchanged(generation):
                continue  # the broker cannot tell now: never switch unchecked (with a partition added,
                # a replay replaced the current generation with counts that left it out)
            path = publisher.publish_if_changed(make_current=True)
            if path is None and publisher.is_current():
                path = Path(os.path.realpath(settings.snapshot_dir / pipeline / "latest"))
            if path is not None:
                return path


def _give_up_if_failing(exits: dict[int, list[float]], child: Child, pipeline: str, generation: int) -> None:
    """Raise once a process has exited GIVE_UP_EXITS times within GIVE_UP_WINDOW_S: one that
    failed at every start (in the trial, on a reject its dead-letter topic had no partition
    for) was restarted every second, with its traceback, until the user stopped the replay."""
    now = time.monotonic()
    recent = [when for when in exits.get(child.index, []) if now - when < GIVE_UP_WINDOW_S] + [now]
    exits[child.index] = recent
    if len(recent) >= GIVE_UP_EXITS:
        raise KappaError(
            f"process {child.index} of the replay exited {len(recent)} times within {GIVE_UP_WINDOW_S:g}s (last exit "
            f"code {child.process.returncode}), and is not restarted again: its error, if it printed one, is above. "
            f"Generation {generation}'s state is kept: run the same replay again to resume it once the cause is "
            f"fixed, or `kappa gc --pipeline {pipeline}` to delete it"
        )


def keep_generation(settings: Settings, pipeline: str, generation: int) -> None:
    """A replaced generation whose state the user wants kept (--keep-old)."""
    Registry(settings.snapshot_dir, pipeline).mark(generation, GenerationState.KEPT)


def retire_generation(settings: Settings, pipeline: str, generation: int, topic: str) -> bool:
    """Delete a replaced generation's state once its processes are gone: RocksDB directories,
    snapshot parts, heartbeats, consumer group and changelog topic."""
    deadline = time.monotonic() + RETIRE_WAIT_S
    while heartbeats(settings, pipeline, generation) and time.monotonic() < deadline:
        time.sleep(0.5)
    if heartbeats(settings, pipeline, generation):
        print(
            f"replay: generation {generation} still has live processes after {RETIRE_WAIT_S:g}s; "
            "it is retired by the next replay or worker start once they have stopped, or by `kappa gc`",
            file=sys.stderr,
        )
        return False
    delete_generation_state(settings, pipeline, generation)
    Registry(settings.snapshot_dir, pipeline).mark(generation, GenerationState.RETIRED)
    return True
