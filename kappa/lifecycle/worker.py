"""`kappa worker`: N Faust processes tail the log; a supervisor publishes merged snapshots.

Each process owns some source partitions (Faust's consumer group decides which), keeps its
own RocksDB directory, and every S seconds writes a part for each partition that changed
(kappa.snapshots.parts). The supervisor merges the newest part of every partition and publishes a
snapshot when the cut moved. Publishing is thus off the processing path, and it works the
same when processes on several hosts share one snapshot directory.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kappa.config import Settings
from kappa.engine.app import (
    Pipeline,
    app_id,
    changelog_topic,
    create_pipeline,
    quiet_faust_noise,
    relax_garbage_collector,
)
from kappa.engine.faust_internals import PromptWorker, fresh_event_loop
from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.kafka.availability import CLIENT_ERRORS_AFTER_S, LeaderWatch, OutageReporter, ReporterThread, outage_recent
from kappa.lifecycle.cleanup import clear_leftovers, finish_half_done_steps, report
from kappa.lifecycle.generations import GenerationState, Registry
from kappa.lifecycle.guards import check_definition, refuse_empty_result
from kappa.pipeline import Definition, Progress
from kappa.processes import pid_alive
from kappa.snapshots import parts, snapshot
from tables.aggregate import partial_schema
from tables.grouped_mean import read_partition

log = logging.getLogger("kappa.lifecycle.worker")
PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 60.0
HEARTBEAT_S = 1.0
RESTART_DELAY_S = 2.0


def claim_data_dir(settings: Settings, pipeline: str) -> IO:
    """One supervisor per (data dir, pipeline), or refuse at once.

    Two supervisors on one data directory would each spawn processes that claim the same
    state slots and publish the same parts, racing each other. The lock is an flock, so it
    disappears with the process, even after SIGKILL; there is no stale lock to clean up.
    """
    directory = settings.data_dir / "run" / pipeline
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / "worker.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise KappaError(
            f"data dir {settings.data_dir} is already used by a kappa worker for pipeline {pipeline!r} "
            f"({holder}); give this worker its own --data-dir, or raise --processes on the running one"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def current_generation(settings: Settings, pipeline: str, definition: Definition, partitions: int) -> int:
    """The generation live workers should run: the current one, or a new generation 1."""
    registry = Registry(settings.snapshot_dir, pipeline)
    report(finish_half_done_steps(settings, pipeline), pipeline)
    state = registry.read()
    current = state.get("current")
    if current is None:
        check_definition(settings, definition, partitions)
        generation = registry.begin("live", definition.to_record())
        clear_leftovers(settings, pipeline, generation)
        registry.mark(generation, GenerationState.LIVE, current=True)
        return generation
    recorded = state["generations"][str(current)].get("definition", {})
    if recorded and recorded != definition.to_record():
        raise KappaError(
            f"the current generation {current} of {pipeline!r} computes {recorded}, not "
            f"{definition.to_record()}: run `scripts/replay` with the new definition to switch"
        )
    return int(current)


# --- one worker process -------------------------------------------------------------------


def claim_state_slot(generation_dir: Path, preferred: int) -> tuple[int, IO]:
    """Lock the first free per-process state directory from `preferred` on.

    RocksDB allows one process per database directory; two workers started on one host
    (or pointed at one data dir) each get their own slot instead of fighting over a LOCK.
    The returned handle holds the claim for the life of the process.
    """
    generation_dir.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count(preferred):
        handle = open(generation_dir / f"p{slot}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return slot, handle
    raise AssertionError("unreachable")


class PartWriter:
    """Writes the parts of this process's partitions, and its heartbeat file."""

    def __init__(self, pipe: Pipeline, directory: Path, heartbeat: Path, interval: float) -> None:
        self.pipe = pipe
        self.directory = directory
        self.heartbeat = heartbeat
        self.interval = interval
        self.next_parts = time.monotonic() + interval

    def assigned(self) -> set[int]:
        topic = self.pipe.definition.topic
        return {tp.partition for tp in self.pipe.app.consumer.assignment() if tp.topic == topic}

    def write(self, partitions: set[int]) -> None:
        for partition in sorted(partitions):
            definition = self.pipe.definition
            partials, stats = read_partition(self.pipe.table, partition, definition.aggregate(), definition.layout())
            parts.write_part(self.directory, partition, partials, stats)

    def tick(self) -> None:
        """Heartbeat every tick; parts of changed partitions once per snapshot interval."""
        owned = self.assigned()
        if time.monotonic() >= self.next_parts:
            self.next_parts = time.monotonic() + self.interval
            progress = self.pipe.progress
            dirty, progress.dirty = progress.dirty & owned, set()
            self.write(dirty)
        self.beat(owned)

    def beat(self, owned: set[int]) -> None:
        progress = self.pipe.progress
        state = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "partitions": sorted(owned),
            "next_offsets": {str(p): o for p, o in sorted(progress.next_offsets.items()) if p in owned},
            "records_seen": progress.records_seen,
            "updated_at": snapshot.utc_now(),
        }
        self.heartbeat.parent.mkdir(parents=True, exist_ok=True)
        staging = self.heartbeat.with_suffix(".tmp")
        staging.write_text(json.dumps(state))
        os.replace(staging, self.heartbeat)


class FinalPartsWorker(PromptWorker):
    """A Faust worker that writes every owned partition's part before it stops on a signal,
    while the tables are still open, so a clean shutdown publishes everything applied."""

    part_writer: PartWriter | None = None

    async def before_signal_stop(self) -> None:
        if self.part_writer is not None:
            try:
                self.part_writer.write(self.part_writer.assigned())
            except Exception:  # the stop must go on; the next run rewrites parts
                log.exception("could not write final parts")


def run_process(
    settings: Settings,
    pipeline: str,
    definition: Definition,
    generation: int,
    index: int,
    interval: float,
    loglevel: str = "warn",
) -> int:
    """One worker process: Faust app + agent, and a timer that writes changed parts."""
    partitions = admin.require_partition_count(settings.broker, definition.topic)
    slot, _claim = claim_state_slot(settings.state_dir(pipeline, generation), index)
    state_dir = settings.state_dir(pipeline, generation) / f"p{slot}"
    state_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    pipe = create_pipeline(
        broker=settings.broker,
        pipeline=pipeline,
        generation=generation,
        definition=definition,
        partitions=partitions,
        state_dir=state_dir,
        progress=progress,
        replication=admin.replication(settings.broker, settings.replication_factor),
    )
    heartbeat = settings.run_dir(pipeline, generation) / f"process-{socket.gethostname()}-{slot}.json"
    writer = PartWriter(pipe, parts.parts_dir(settings.snapshot_dir, pipeline, generation), heartbeat, interval)

    async def write_parts() -> None:
        try:
            writer.tick()
        except OSError as exc:
            log.error("could not write snapshot parts under %s: %s; retrying in %ss", writer.directory, exc, interval)

    async def after_recovery() -> None:
        progress.dirty |= writer.assigned()  # restored state is publishable even with no new records

    pipe.table.on_recover(after_recovery)
    pipe.app.timer(min(interval, HEARTBEAT_S), name=f"kappa.{pipeline}.parts")(write_parts)
    worker = FinalPartsWorker(pipe.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.spinner = None
    worker.part_writer = writer
    quiet_faust_noise()
    relax_garbage_collector()
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        heartbeat.unlink(missing_ok=True)
        return int(exit_.code or 0)
    finally:
        fresh_event_loop()
    return 0


# --- the supervisor -----------------------------------------------------------------------


@dataclass
class Child:
    index: int
    process: subprocess.Popen


def spawn_process(
    settings: Settings,
    pipeline: str,
    definition: Definition,
    generation: int,
    index: int,
    interval: float,
    loglevel: str,
    hold: IO | None = None,
) -> Child:
    """Start one worker process. It gets SIGTERM when this process dies, however it dies, and
    it inherits `hold` (the data dir's lock): the lock is free only once every process is gone."""
    options = {
        "--pipeline": pipeline,
        "--generation": generation,
        "--index": index,
        "--snapshot-interval": interval,
        "--loglevel": loglevel,
        "--broker": settings.broker,
        "--data-dir": settings.data_dir,
        "--snapshot-dir": settings.snapshot_dir,
        "--replication-factor": settings.replication_factor,
    }
    command = [sys.executable, "-m", "kappa", "worker-process", *definition.to_args()]
    command += [part for flag, value in options.items() if value is not None for part in (flag, str(value))]
    parent = os.getpid()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        pass_fds=(hold.fileno(),) if hold is not None else (),
        preexec_fn=lambda: _die_with_parent(parent),
    )
    return Child(index, process)


def _die_with_parent(parent: int) -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (a clean stop that
    writes final parts), and stop at once if the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def stop_children(children: list[Child], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every child, then SIGKILL what has not stopped within `grace` seconds."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            print(f"kappa: process {child.index} did not stop in time; killing it", file=sys.stderr)
            child.process.kill()
            child.process.wait()


def heartbeats(settings: Settings, pipeline: str, generation: int) -> list[dict]:
    """Heartbeats of this host's live processes of one generation."""
    beats = []
    directory = settings.run_dir(pipeline, generation)
    for path in sorted(directory.glob("process-*.json")) if directory.is_dir() else []:
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if beat.get("host") == socket.gethostname() and not pid_alive(beat["pid"]):
            continue
        beats.append(beat)
    return beats


class Publisher:
    """Merges parts and publishes a snapshot whenever the cut has moved."""

    def __init__(
        self,
        settings: Settings,
        pipeline: str,
        definition: Definition,
        generation: int,
        partitions: int,
        *,
        force: bool = False,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.definition = definition
        self.generation = generation
        self.partitions = partitions
        self.directory = parts.parts_dir(settings.snapshot_dir, pipeline, generation)
        self.registry = Registry(settings.snapshot_dir, pipeline)
        self.force = force
        self.last_offsets: dict[int, int] | None = self._published_offsets()

    def _published_offsets(self) -> dict[int, int] | None:
        try:
            _, manifest = snapshot.read_snapshot(self.settings.snapshot_dir, self.pipeline)
        except (KappaError, OSError):
            return None
        if manifest.get("generation") != self.generation:
            return None
        return {int(p): o for p, o in manifest["offsets"].items()}

    def is_current(self) -> bool:
        return self.registry.current() == self.generation

    def publish_if_changed(self, make_current: bool = False) -> Path | None:
        """Publish when the cut moved. Only the current generation may publish, unless
        `make_current` is set: then this publish is the switch-over to this generation."""
        started = time.monotonic()
        newest = parts.newest_parts(self.directory)
        if not newest or parts.cut_of(newest, self.partitions) == self.last_offsets:
            return None
        aggregate, layout = self.definition.aggregate(), self.definition.layout()
        merged = parts.read_parts(newest, self.partitions, partial_schema(layout, aggregate))
        records = merged.stats.records(self.definition.value_fields)
        end_offsets = admin.end_offsets(self.settings.broker, self.definition.topic, self.partitions)
        manifest = snapshot.build_manifest(
            pipeline=self.pipeline,
            topic=self.definition.topic,
            generation=self.generation,
            definition=self.definition.to_record(),
            offsets=merged.offsets,
            end_offsets=end_offsets,
            records=records,
        )

        def allowed() -> bool:
            if make_current:
                refuse_empty_result(records, sum(end_offsets.values()), self.force)
                self.registry.switch_to(self.generation)
                return True
            return self.is_current()

        path = snapshot.publish(
            self.settings.snapshot_dir,
            self.pipeline,
            self.generation,
            merged.snapshot_rows(aggregate, layout),
            manifest,
            allowed,
        )
        if path is None:
            return None
        self.last_offsets = merged.offsets
        lag = sum(max(end - merged.offsets.get(p, 0), 0) for p, end in end_offsets.items())
        print(
            f"published {path.name}: generation {self.generation}, {manifest['keys']:,} keys, lag {lag:,}, "
            f"{time.monotonic() - started:.2f}s",
            flush=True,
        )
        return path


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        pipeline: str,
        definition: Definition,
        processes: int,
        interval: float,
        loglevel: str,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.definition = definition
        self.processes = processes
        self.interval = interval
        self.loglevel = loglevel
        self.stopping = False
        self.children: list[Child] = []
        self._data_dir_claim: IO | None = None
        self.outages: OutageReporter | None = None

    def _watch_leaders(self, generation: int) -> None:
        """One outage line for all processes, printed here (the processes stay quiet)."""
        topics = [self.definition.topic, self.definition.dlq_topic, changelog_topic(self.pipeline, generation)]
        if self.outages is None:
            self.outages = OutageReporter(LeaderWatch(self.settings.broker, topics), "kappa worker")
            self._outage_thread = ReporterThread(self.outages)
            self._outage_thread.start()
        else:
            self.outages.watch.topics = topics

    def _spawn(self, generation: int, index: int) -> Child:
        return spawn_process(
            self.settings,
            self.pipeline,
            self.definition,
            generation,
            index,
            self.interval,
            self.loglevel,
            hold=self._data_dir_claim,
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)  # from the start: a stop while starting is still clean
        signal.signal(signal.SIGINT, self._on_signal)
        self._data_dir_claim = claim_data_dir(self.settings, self.pipeline)
        admin.wait_until_reachable(self.settings.broker)
        partitions = admin.require_partition_count(self.settings.broker, self.definition.topic)
        admin.ensure_topic(
            self.settings.broker,
            self.definition.dlq_topic,
            partitions,
            admin.UNLIMITED_RETENTION,
            self.settings.replication_factor,
        )
        generation = current_generation(self.settings, self.pipeline, self.definition, partitions)
        publisher = Publisher(self.settings, self.pipeline, self.definition, generation, partitions)
        print(
            f"kappa worker: pipeline {self.pipeline!r} generation {generation} ({app_id(self.pipeline, generation)}), "
            f"{self.processes} process(es), snapshot every {self.interval:g}s",
            flush=True,
        )
        self.children = [self._spawn(generation, i) for i in range(self.processes)]
        self._watch_leaders(generation)
        next_publish = time.monotonic() + self.interval
        next_check = time.monotonic() + 1.0
        try:
            while not self.stopping:
                time.sleep(0.1)
                self._restart_dead(generation)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    followed = self._follow_switch(generation)
                    if followed is not None:
                        generation = followed
                        self._watch_leaders(generation)
                        publisher = Publisher(self.settings, self.pipeline, self.definition, generation, partitions)
                if time.monotonic() >= next_publish:
                    next_publish = time.monotonic() + self.interval
                    self._publish(publisher)
        finally:
            stop_children(self.children)
            if self.outages is not None:
                self._outage_thread.stop()
        self._publish(publisher)
        latest = self.settings.snapshot_dir / self.pipeline / "latest"
        where = (
            f"latest is {snapshot.resolve_latest(self.settings.snapshot_dir, self.pipeline)}"
            if latest.is_symlink()
            else "no snapshot was published yet"
        )
        print(f"kappa worker: stopped; {where}")
        return 0

    def _follow_switch(self, generation: int) -> int | None:
        """When a replay has made another generation current, move this worker's processes to it."""
        state = Registry(self.settings.snapshot_dir, self.pipeline).read()
        current = state.get("current")
        if current is None or current == generation:
            return None
        recorded = state["generations"][str(current)].get("definition") or {}
        print(
            f"kappa worker: generation {current} is now current (replaced {generation}); moving processes to it",
            flush=True,
        )
        stop_children(self.children)
        if recorded:
            self.definition = Definition.from_record(recorded)
        self.children = [self._spawn(current, i) for i in range(self.processes)]
        return int(current)

    def _publish(self, publisher: Publisher) -> None:
        try:
            publisher.publish_if_changed()
        except KappaError as exc:
            if self.outages is not None and (
                outage_recent(CLIENT_ERRORS_AFTER_S) or self.outages.watch.check() is not None
            ):
                return  # the outage line says why (or said it just now); the next interval retries
            print(f"kappa worker: error: {exc}; the previous snapshot stays current, retrying", file=sys.stderr)
        except OSError as exc:
            print(f"kappa worker: error: reading parts failed: {exc}; retrying", file=sys.stderr)

    def _restart_dead(self, generation: int) -> None:
        for position, child in enumerate(self.children):
            code = child.process.poll()
            if code is not None and not self.stopping:
                print(
                    f"kappa worker: process {child.index} (pid {child.process.pid}) exited with code {code}; "
                    f"restarting in {RESTART_DELAY_S:g}s",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(RESTART_DELAY_S)
                self.children[position] = self._spawn(generation, child.index)
