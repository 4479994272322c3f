"""Replays: a new generation of a pipeline, consuming the log from offset 0.

A batch replay captures the log's end offsets first, runs the Faust worker in this process
until every partition has reached them, publishes the table as a snapshot, makes the
generation current, and exits. Records produced after the start are left for live work.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kappa.config import Settings
from kappa.engine.app import Pipeline, create_pipeline, prepare_for_worker
from kappa.engine.faust_internals import PromptWorker, every, fresh_event_loop, request_stop
from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.lifecycle.cleanup import (
    abandoned,
    clear_leftovers,
    collect_garbage,
    delete_generation_state,
    discard_built_on_another_log,
    report,
    resumed_from,
)
from kappa.lifecycle.generations import GenerationState, Registry, builder_alive, this_builder
from kappa.lifecycle.guards import (
    Checked,
    EmptyResult,
    LogChanged,
    LogWatch,
    check_same_topic,
    refuse_empty_result,
)
from kappa.ops.progress import ProgressLine
from kappa.pipeline import Definition, Progress
from kappa.processes import relax_garbage_collector
from kappa.snapshots import snapshot
from tables.grouped_mean import PartitionStats, partition_batches, read_stats

WATCH_INTERVAL_S = 0.25


@dataclass
class ReplayResult:
    generation: int
    path: Path
    manifest: dict
    seconds: float
    snapshot_seconds: float
    previous: int | None = None


def resumable_batch(registry: Registry, definition: Definition) -> int | None:
    """The newest abandoned batch generation of this very definition: finishing it is exact
    (its table resumes from the offsets it holds) and saves redoing its work."""
    for number, entry in reversed(abandoned(registry)):
        if entry.get("mode") == "batch" and entry.get("definition") == definition.to_record():
            if entry.get("state") == GenerationState.RUNNING:
                registry.mark(number, GenerationState.FAILED)
            return number
    running = [n for n, e in registry.in_state(GenerationState.RUNNING) if builder_alive(e)]
    if running:
        raise KappaError(
            f"generation {running[0]} is being computed by another batch replay that is still running; "
            "wait for it, or stop it first"
        )
    return None


def table_rows(pipe: Pipeline, partitions: int) -> snapshot.SnapshotRows:
    """The snapshot's rows: every partition's partials, read out of RocksDB as Arrow (no
    Python object per key) while the snapshot is written, merged the same way live parts are
    (kappa.snapshots.snapshot)."""
    aggregate, layout = pipe.definition.aggregate(), pipe.definition.layout()
    ahead = snapshot.read_ahead_rows(partitions)
    runs = [partition_batches(pipe.table, partition, aggregate, layout, ahead) for partition in range(partitions)]
    return snapshot.merge_partials(runs, aggregate, layout)


def record_counts(pipe: Pipeline, partitions: int) -> dict:
    """counted, skipped and rejected (and per value) over every partition's stats entry."""
    totals = PartitionStats()
    for partition in range(partitions):
        totals.merge(read_stats(pipe.table, partition))
    return totals.records(pipe.definition.value_fields)


def run_batch(
    settings: Settings,
    pipeline: str,
    definition: Definition,
    *,
    checked: Future[Checked],
    force: bool = False,
    loglevel: str = "warn",
    timeout: float | None = None,
) -> ReplayResult:
    """Replay to the end offsets captured now and publish. `checked` is the preflight
    (kappa.lifecycle.guards.preflight), started by the caller with the same `force` and
    `timeout` so that its round trips overlap the caller's imports. With `timeout`, give up
    after that many seconds (the generation is marked failed and its state kept) rather than
    wait for brokers that do not come back."""
    began = time.monotonic()
    if not checked.done():  # a wait on the broker, as long as it takes: not with the collector off
        relax_garbage_collector()
    partitions, end_offsets = checked.result()
    registry = Registry(settings.snapshot_dir, pipeline)
    definition_record = definition.to_record()
    report(discard_built_on_another_log(settings, pipeline, definition.topic, partitions), pipeline)
    resumable = resumable_batch(registry, definition)
    report(collect_garbage(settings, pipeline, keep=resumable), pipeline)
    if resumable is not None:
        generation = resumable
        registry.resume(generation, GenerationState.RUNNING, this_builder())
    else:
        generation = registry.begin("batch", definition_record, this_builder())
        clear_leftovers(settings, pipeline, generation)
        check_same_topic(settings, pipeline, generation, definition.topic)  # records the topic it reads
    total = sum(end_offsets.values())
    verb = "resuming the stopped generation" if resumable is not None else "generation"
    start = "from offset 0"
    if resumable is not None:
        start = resumed_from(settings, pipeline, generation, definition.topic, end_offsets)
    print(
        f"replay {pipeline} {verb} {generation}: {total:,} records in {partitions} partitions "
        f"of {definition.topic!r}, {start} to the end offsets captured now",
        file=sys.stderr,
        flush=True,
    )
    progress = Progress(stop_at=end_offsets)
    settings.state_dir(pipeline, generation).mkdir(parents=True, exist_ok=True)
    pipe = create_pipeline(
        broker=settings.broker,
        pipeline=pipeline,
        generation=generation,
        definition=definition,
        partitions=partitions,
        state_dir=settings.state_dir(pipeline, generation),
        progress=progress,
        replication=admin.replication(settings.broker, settings.replication_factor),
        outage_label=f"replay {pipeline} g{generation}",
    )
    line = ProgressLine()
    outcome: dict[str, Any] = {}

    async def finish() -> None:
        try:
            await pipe.app.producer.flush()
            snapshot_started = time.monotonic()
            counts = record_counts(pipe, partitions)
            refuse_empty_result(counts, total, force)
            # a generation on a log that changed meanwhile could never be continued live; a
            # broker that cannot tell now does not stop a result that is exact for its cut
            LogWatch(settings, pipeline, definition.topic).unchanged(generation)
            manifest = snapshot.build_manifest(
                pipeline=pipeline,
                topic=definition.topic,
                generation=generation,
                definition=definition_record,
                offsets=end_offsets,
                end_offsets=end_offsets,
                records=counts,
            )
            outcome["previous"] = registry.current()

            def switch() -> bool:
                registry.switch_to(generation)
                return True

            # on the loop, not in a thread: a stop signal then waits until the snapshot and the
            # switch are complete, and Faust never closes RocksDB under a running merge
            outcome["path"] = snapshot.publish(
                settings.snapshot_dir, pipeline, generation, table_rows(pipe, partitions), manifest, switch
            )
            outcome["snapshot_seconds"] = time.monotonic() - snapshot_started
            outcome["manifest"] = manifest
            registry.mark(generation, GenerationState.COMPLETE)
        except Exception as exc:  # reported after the worker stops, as one line
            outcome["error"] = exc
        finally:
            line.finish()
            request_stop()

    def applied() -> int:
        return sum(min(progress.folded_offsets.get(p, 0), end) for p, end in end_offsets.items())

    def start_finish() -> None:
        if not outcome:
            outcome["pending"] = asyncio.ensure_future(finish())  # a task of its own: it takes a while

    def on_ready() -> None:
        # from here on the agent starts the finish as soon as its last batch is durable (an
        # empty or already replayed log has nothing left: at once); the timer is the fallback
        progress.on_reached = start_finish
        progress.check_reached()

    async def watch() -> None:
        if outcome:
            return
        line.update(applied(), total, label=f"g{generation}")
        if timeout is not None and time.monotonic() - began > timeout and not progress.reached_stop():
            outcome["timed_out"] = True
            line.finish()
            request_stop()
            return
        if progress.reached_stop():
            start_finish()

    every(pipe.app, WATCH_INTERVAL_S, f"kappa.{pipeline}.watch")(watch)
    worker = PromptWorker(pipe.app, loglevel=loglevel, quiet=True, redirect_stdouts=False, override_logging=True)
    worker.spinner = None  # its cursor escapes would garble our own progress line
    worker.on_ready = on_ready
    prepare_for_worker()
    started = time.monotonic()
    with admin.OffsetCommitter(settings.broker, pipe.app.conf.id) as committer:  # made now, ready at the end
        try:
            worker.execute_from_commandline()
        except SystemExit:
            pass
        finally:
            fresh_event_loop()
        seconds = time.monotonic() - started
        if "path" in outcome:
            # Faust may have committed past the cut; a live worker continuing this generation
            # must resume exactly where the published table stops.
            committer.commit(definition.topic, end_offsets)
    if "error" in outcome:
        registry.mark(generation, GenerationState.FAILED)
        error = outcome["error"]
        if isinstance(error, EmptyResult | LogChanged):  # nothing worth resuming
            delete_generation_state(settings, pipeline, generation)
            registry.mark(generation, GenerationState.RETIRED)
        if isinstance(error, KappaError):
            raise error
        raise KappaError(
            f"replay of generation {generation} failed while publishing: {error!r}; its state is kept: run the "
            f"same replay again to finish it, or `kappa gc --pipeline {pipeline}` to delete it"
        )
    if "timed_out" in outcome:
        registry.mark(generation, GenerationState.FAILED)
        outage = pipe.outages.current
        why = f"; {outage.line().split('; waiting')[0]}" if outage is not None else ""
        raise KappaError(
            f"replay of generation {generation} did not reach the end offsets within --timeout {timeout:g}s "
            f"({applied():,} of {total:,} records applied{why}); its state is kept: run the same replay again "
            f"to resume it, or `kappa gc --pipeline {pipeline}` to delete it"
        )
    if "path" not in outcome:
        registry.mark(generation, GenerationState.FAILED)
        raise KappaError(
            f"replay of generation {generation} stopped before reaching the end offsets; its state is kept: run "
            f"the same replay again to resume it where it stopped, or `kappa gc --pipeline {pipeline}` to delete it"
        )
    return ReplayResult(
        generation, outcome["path"], outcome["manifest"], seconds, outcome["snapshot_seconds"], outcome.get("previous")
    )
