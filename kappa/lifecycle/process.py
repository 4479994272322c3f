"""One worker process: a Faust app and agent for some of the log's partitions, and the
parts and heartbeat it writes so that a supervisor can publish and watch it."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from kappa.config import Settings
from kappa.engine.app import Pipeline, create_pipeline, prepare_for_worker
from kappa.engine.faust_internals import PromptWorker, every, fresh_event_loop, is_open
from kappa.files import replace_text
from kappa.kafka import admin
from kappa.pipeline import Definition, Progress
from kappa.processes import process_start_ticks
from kappa.snapshots import parts, snapshot
from tables.grouped_mean import read_partition

log = logging.getLogger("kappa.lifecycle.process")
HEARTBEAT_S = 1.0
CATCH_UP_TICK_S = 0.1
FINAL_COMMIT_S = 10.0
NOT_EXACT_REPORT_S = 60.0


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
    """Writes the parts of this process's partitions, and its heartbeat file.

    Parts of changed partitions are written once per `interval`. A replay's processes also get
    `catch_up_to`, the end offsets the replay publishes at: a changed partition that has reached
    its end is written at the next tick (every CATCH_UP_TICK_S), since the replay waits for
    nothing else. Before, the replay waited up to a whole interval after its last record."""

    def __init__(
        self,
        pipe: Pipeline,
        directory: Path,
        heartbeat: Path,
        interval: float,
        catch_up_to: Mapping[int, int] | None = None,
    ) -> None:
        self.pipe = pipe
        self.directory = directory
        self.heartbeat = heartbeat
        self.pid_started = process_start_ticks(os.getpid())  # with the pid, names this process (still_running)
        self.interval = interval
        self.catch_up_to = catch_up_to
        self.next_parts = time.monotonic() + interval
        self.next_beat = 0.0
        self.written_at_end: set[int] = set()
        self.reported_start = False
        self.not_exact_since: dict[int, float] = {}  # partition -> when its reads outside a restore began to fail
        self.reported_not_exact: set[int] = set()  # partitions said to be damaged (once each)

    def newly_caught_up(self, changed: set[int]) -> set[int]:
        """Changed partitions at or past their end offset whose part was not yet written there:
        once it was, records beyond the end (a replay beside live traffic) wait for the
        interval again, or every tick would rewrite the part."""
        ends = self.catch_up_to or {}
        next_offsets = self.pipe.progress.next_offsets
        return {p for p in changed - self.written_at_end if p in ends and next_offsets.get(p, 0) >= ends[p]}

    @property
    def tick_every(self) -> float:
        every = min(self.interval, HEARTBEAT_S)
        return every if self.catch_up_to is None else min(every, CATCH_UP_TICK_S)

    def assigned(self) -> set[int]:
        topic = self.pipe.definition.topic
        return {tp.partition for tp in self.pipe.app.consumer.assignment() if tp.topic == topic}

    def write(self, partitions: set[int], reopen: bool = False) -> set[int]:
        """Write the partitions' parts; those it cannot write yet stay marked for a later tick
        (returned: those written). A partition's database that a rebalance closed is not
        reopened here unless `reopen` (at the stop, when Faust may have closed them already),
        and a partition that is not an exact image (groups restored from the changelog ahead of
        its stats, during a restore or after it: tables.grouped_mean.read_partition) waits until
        the restore ends or the agent has applied those records again."""
        definition, table, written = self.pipe.definition, self.pipe.table, set()
        for partition in sorted(partitions):
            opened = reopen or is_open(table, partition)
            image = read_partition(table, partition, definition.aggregate(), definition.layout()) if opened else None
            if image is not None:
                parts.write_part(self.directory, partition, *image)
                written.add(partition)
                self.not_exact_since.pop(partition, None)
                self.reported_not_exact.discard(partition)
            else:
                self.pipe.progress.dirty.add(partition)
                if opened:
                    self._report_not_exact(partition)
        return written

    def _report_not_exact(self, partition: int) -> None:
        """Once a partition has not been an exact image for NOT_EXACT_REPORT_S outside a restore
        (the agent re-applies what a restore left ahead within seconds), say so: its snapshots
        stay at its last exact part, and a state that lost records never becomes exact again."""
        if self.pipe.app.in_recovery:
            self.not_exact_since.pop(partition, None)
            self.reported_not_exact.discard(partition)
            return
        since = self.not_exact_since.setdefault(partition, time.monotonic())
        if partition not in self.reported_not_exact and time.monotonic() - since >= NOT_EXACT_REPORT_S:
            self.reported_not_exact.add(partition)
            log.error(
                "partition %s: its table's groups have not agreed with its record counts for %.0fs, so no part of "
                "it is written to %s (snapshots keep its last exact part); if this stays, its state is damaged: "
                "rebuild the pipeline with a new replay",
                partition,
                NOT_EXACT_REPORT_S,
                self.directory,
            )

    def tick(self) -> None:
        """Parts of changed partitions once per snapshot interval, and of those that reached
        `catch_up_to` at once; a heartbeat once per HEARTBEAT_S, and also as soon as the first
        records are applied and before any part is written, so that a replay that sees a part
        reads a heartbeat at least as new (the span of applying records, AppliedSpan)."""
        owned, progress, now = self.assigned(), self.pipe.progress, time.monotonic()
        due: set[int] = set()
        at_end = False
        if now >= self.next_parts:
            self.next_parts = now + self.interval
            due, progress.dirty = progress.dirty & owned, set()
        elif self.catch_up_to is not None:
            due = self.newly_caught_up(progress.dirty & owned)
            progress.dirty -= due
            at_end = True
        started = progress.first_applied_at is not None and not self.reported_start
        try:
            if now >= self.next_beat or due or started:
                # half a tick early: a timer that fires a little early must not skip a beat
                self.next_beat = now + HEARTBEAT_S - self.tick_every / 2
                self.reported_start = progress.first_applied_at is not None
                self.beat(owned)
            written = self.write(due)
        except BaseException:  # a full disk: the parts due are written at a later tick, records or not
            progress.dirty |= due
            raise
        if at_end:
            self.written_at_end |= written

    def beat(self, owned: set[int]) -> None:
        progress = self.pipe.progress
        state = {
            "pid": os.getpid(),
            "pid_started": self.pid_started,
            "host": socket.gethostname(),
            "partitions": sorted(owned),
            "next_offsets": {str(p): o for p, o in sorted(progress.next_offsets.items()) if p in owned},
            "folded_offsets": {str(p): o for p, o in sorted(progress.folded_offsets.items()) if p in owned},
            "records_seen": progress.records_seen,
            "first_applied_at": progress.first_applied_at,
            "last_applied_at": progress.last_applied_at,
            "updated_at": snapshot.utc_now(),
        }
        replace_text(self.heartbeat, json.dumps(state))


class FinalPartsWorker(PromptWorker):
    """A Faust worker that, before it stops on a signal and while the tables are still open,
    writes every owned partition's part, so a clean shutdown publishes everything applied, and
    commits the offsets the table reached, so the group shows no lag that is not there (a
    replay stops its processes right after their last record, before the commit timer runs)."""

    part_writer: PartWriter | None = None

    async def before_signal_stop(self) -> None:
        if self.part_writer is None:
            return
        try:
            # the process ends next: a database Faust closed on the way out is read once more, and
            # one it was restoring is written only if it is an exact image (read_partition)
            self.part_writer.write(self.part_writer.assigned(), reopen=True)
        except Exception:  # the stop must go on; the next run rewrites parts
            log.exception("could not write final parts")
        try:
            await asyncio.wait_for(self.part_writer.pipe.commit_pending(), FINAL_COMMIT_S)
        except Exception:  # informational offsets: resuming reads the table's own (kappa.engine.app)
            log.warning("could not commit the final offsets within %ss", FINAL_COMMIT_S, exc_info=True)


def run_process(
    settings: Settings,
    pipeline: str,
    definition: Definition,
    generation: int,
    index: int,
    interval: float,
    loglevel: str = "warn",
    catch_up_to: Mapping[int, int] | None = None,
    group_size: int | None = None,
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
        group_size=group_size,
    )
    heartbeat = settings.run_dir(pipeline, generation) / f"process-{socket.gethostname()}-{slot}.json"
    directory = parts.parts_dir(settings.snapshot_dir, pipeline, generation)
    writer = PartWriter(pipe, directory, heartbeat, interval, catch_up_to)

    async def write_parts() -> None:
        try:
            writer.tick()
        except OSError as exc:
            log.error("could not write snapshot parts under %s: %s; retrying in %ss", writer.directory, exc, interval)

    async def after_recovery() -> None:
        progress.dirty |= writer.assigned()  # restored state is publishable even with no new records

    pipe.table.on_recover(after_recovery)
    every(pipe.app, writer.tick_every, f"kappa.{pipeline}.parts")(write_parts)
    worker = FinalPartsWorker(pipe.app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.spinner = None
    worker.part_writer = writer
    prepare_for_worker()
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        heartbeat.unlink(missing_ok=True)
        return int(exit_.code or 0)
    finally:
        fresh_event_loop()
    return 0
