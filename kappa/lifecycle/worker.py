"""`kappa worker`: N Faust processes tail the log; a supervisor publishes merged snapshots.

Each process owns some source partitions (Faust's consumer group decides which), keeps its
own RocksDB directory, and every S seconds writes a part for each partition that changed
(kappa.snapshots.parts). The supervisor merges the newest part of every partition and publishes a
snapshot when the cut moved. Publishing is thus off the processing path, and it works the
same when processes on several hosts share one snapshot directory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO

from kappa.config import Settings
from kappa.engine.deadletters import ensure_dead_letter_topic
from kappa.engine.names import app_id, changelog_topic
from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.kafka.availability import CLIENT_ERRORS_AFTER_S, LeaderWatch, OutageReporter, ReporterThread, outage_recent
from kappa.lifecycle.children import (
    Child,
    SupervisorRecord,
    heartbeats,
    spawn_process,
    stop_children,
    supervisor_record_path,
    worker_arguments,
)
from kappa.lifecycle.cleanup import clear_leftovers, finish_half_done_steps, report
from kappa.lifecycle.generations import Registry
from kappa.lifecycle.guards import (
    LOG_CHECK_INTERVAL_S,
    LogWatch,
    check_definition,
    check_same_log,
    check_same_topic,
)
from kappa.pipeline import Definition
from kappa.processes import keep_pandas_out, process_start_ticks
from kappa.snapshots import snapshot
from kappa.snapshots.publisher import Publisher

log = logging.getLogger("kappa.lifecycle.worker")
RESTART_DELAY_S = 2.0


def claim_data_dir(settings: Settings, pipeline: str) -> IO:
    """One supervisor per (data dir, pipeline), or refuse at once.

    Two supervisors on one data directory would each spawn processes that claim the same
    state slots and publish the same parts, racing each other. The lock is an flock, so it
    disappears with the process, even after SIGKILL; there is no stale lock to clean up.

    The lock counts only on the file the path names once it is held: a refused start removes
    the file (`release_refused_claim`), and a start that opened it just before would otherwise
    lock a file no later start can see, beside the new one that later start makes and locks.
    """
    directory = settings.data_dir / "run" / pipeline
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "worker.lock"
    while True:
        handle = open(path, "a+")
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
        if _names_the_same_file(handle, path):
            break
        handle.close()  # removed by a refused start while this one opened it: lock the file there now
        directory.mkdir(parents=True, exist_ok=True)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _names_the_same_file(handle: IO, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def release_refused_claim(settings: Settings, pipeline: str, claim: IO) -> None:
    """A worker refused before it started anything leaves nothing behind: a refused
    `kappa worker --topic nosuch` left run/nosuch/worker.lock, which no command removed
    (`kappa drop` knows no pipeline 'nosuch')."""
    directory = settings.data_dir / "run" / pipeline
    (directory / "worker.lock").unlink(missing_ok=True)
    claim.close()
    for empty in (directory, directory.parent):
        try:
            empty.rmdir()
        except OSError:  # not empty: another pipeline's, or this one's heartbeats
            break


def current_generation(settings: Settings, pipeline: str, definition: Definition, partitions: int) -> int:
    """The generation live workers should run: the current one, or a new generation 1."""
    registry = Registry(settings.snapshot_dir, pipeline)
    report(finish_half_done_steps(settings, pipeline), pipeline)
    if registry.current() is None:
        check_definition(settings, definition, partitions, verdicts=False)
    current, created = registry.current_or_begin("live", definition.to_record())
    if created:
        clear_leftovers(settings, pipeline, current)
        check_same_topic(settings, pipeline, current, definition.topic)  # records the topic it reads
        return current
    recorded = registry.read()["generations"][str(current)].get("definition", {})
    if recorded and recorded != definition.to_record():
        check_definition(settings, definition, partitions, verdicts=False)  # a misspelt field is a typo
        running = " ".join(Definition.from_record(recorded).to_args())
        raise KappaError(
            f"the current generation {current} of {pipeline!r} computes `{running}`, not "
            f"`{' '.join(definition.to_args())}`: run `scripts/replay` with the new definition to switch to it, "
            "or start the worker with the current one"
        )
    check_same_log(settings, pipeline, int(current), definition.topic, partitions)
    return int(current)


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
        self.log_watch = LogWatch(settings, pipeline, definition.topic)
        self._ready_said_for: int | None = None  # the generation whose processes were said to hold every partition
        self.record = SupervisorRecord(
            os.getpid(),
            socket.gethostname(),
            snapshot.utc_now(),
            processes,
            generation=0,
            pid_started=process_start_ticks(os.getpid()),
        )

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
        arguments = worker_arguments(
            self.settings, self.pipeline, self.definition, generation, index, self.interval, self.loglevel
        )
        return spawn_process(index, arguments, hold=self._data_dir_claim)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)  # from the start: a stop while starting is still clean
        signal.signal(signal.SIGINT, self._on_signal)
        keep_pandas_out()  # pyarrow would import it for the first publish, only to find no pandas object
        self._data_dir_claim = claim_data_dir(self.settings, self.pipeline)
        try:
            admin.wait_until_reachable(self.settings.broker)
            partitions = admin.require_partition_count(self.settings.broker, self.definition.topic)
            ensure_dead_letter_topic(
                self.settings.broker, self.definition.dlq_topic, partitions, self.settings.replication_factor
            )
            generation = current_generation(self.settings, self.pipeline, self.definition, partitions)
        except BaseException:
            release_refused_claim(self.settings, self.pipeline, self._data_dir_claim)
            raise
        publisher = Publisher(self.settings, self.pipeline, self.definition, generation, partitions)
        print(
            f"kappa worker: pipeline {self.pipeline!r} generation {generation} ({app_id(self.pipeline, generation)}), "
            f"{self.processes} process(es), snapshot every {self.interval:g}s",
            flush=True,
        )
        self.children = [self._spawn(generation, i) for i in range(self.processes)]
        self.record.generation = generation
        self.record.write(self.settings, self.pipeline)
        self._watch_leaders(generation)
        next_publish = time.monotonic() + self.interval
        next_check = time.monotonic() + 1.0
        next_log_check = time.monotonic() + LOG_CHECK_INTERVAL_S
        try:
            while not self.stopping:
                time.sleep(0.1)
                self._restart_dead(generation)
                if time.monotonic() >= next_log_check:
                    self._stop_if_log_changed(generation)
                    next_log_check = time.monotonic() + LOG_CHECK_INTERVAL_S
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    self._say_when_ready(generation, partitions)
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
            supervisor_record_path(self.settings, self.pipeline).unlink(missing_ok=True)
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

    def _say_when_ready(self, generation: int, partitions: int) -> None:
        """Once per generation, when its processes' heartbeats cover every partition: how many
        processes hold them and how far the generation is behind the log. Without it a worker
        said nothing between its first line and the first snapshot, which on a big table, or a
        log with no new records, could be minutes."""
        if self._ready_said_for == generation:
            return
        beats = heartbeats(self.settings, self.pipeline, generation)
        if len({partition for beat in beats for partition in beat.get("partitions", ())}) < partitions:
            return
        self._ready_said_for = generation
        # on a thread: the broker's answer may take a minute in an outage, and the loop restarts and stops processes
        threading.Thread(
            target=self._say_ready, args=(generation, partitions, len(beats)), name="kappa-ready", daemon=True
        ).start()

    def _say_ready(self, generation: int, partitions: int, processes: int) -> None:
        try:
            ends = admin.end_offsets(self.settings.broker, self.definition.topic, partitions)
            group = app_id(self.pipeline, generation)
            committed = admin.committed_offsets(self.settings.broker, group, self.definition.topic, partitions)
            behind = f"{sum(max(end - (committed.get(p) or 0), 0) for p, end in ends.items()):,} records behind the log"
        except Exception:  # a line of news never ends in a traceback: any client error means no answer
            behind = "how far behind the log unknown (the broker did not answer)"
        print(
            f"kappa worker: tailing: all {partitions} partitions held by {processes} process(es), {behind}; "
            f"a snapshot is published every {self.interval:g}s while records arrive",
            flush=True,
        )

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
        self.record.generation = int(current)
        self.record.write(self.settings, self.pipeline)
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
                self.record.restarted(child.index, child.process.pid, code, snapshot.utc_now())
                self.record.write(self.settings, self.pipeline)
                time.sleep(RESTART_DELAY_S)
                self._stop_if_log_changed(generation)  # they would fail on every restart
                self.children[position] = self._spawn(generation, child.index)

    def _stop_if_log_changed(self, generation: int) -> None:
        """Raise LogChanged when the log is no longer the one the generation was built on
        (kappa.lifecycle.guards.LogWatch). Checked every few seconds, not only before a restart:
        with a partition added, the processes ignored it, and the snapshots said complete, until
        a restart; with the topic made again, they published the old counts; with the topic
        deleted, they waited for it without a word. A broker that cannot answer now (an outage,
        which the processes ride out) is no reason to stop."""
        self.log_watch.topic = self.definition.topic  # a followed switch may read another topic
        self.log_watch.unchanged(generation)
