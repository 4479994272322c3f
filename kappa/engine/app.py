"""The Faust app factory: one app per (pipeline, generation), wired log -> agent -> table.

A generation's app id names its consumer group and changelog topic, so generations never
share offsets or state, and retiring one is deleting what carries its id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.grouped_mean import COMMIT_EVERY_S, DeadLetters, GroupedMeanAgent
from kappa.config import fetch_partition_bytes
from kappa.engine import deadletters
from kappa.engine.faust_internals import (
    FaustApp,
    PerRecordQuietMonitor,
    PromptTableManager,
    commit_offsets,
    deliver_batches,
    every,
)
from kappa.engine.lognoise import fold_repeated_client_errors
from kappa.engine.names import app_id, assignor_topic, changelog_topic
from kappa.kafka import admin, security
from kappa.kafka.availability import CHECK_EVERY_S, LeaderWatch, OutageReporter, stderr_line
from kappa.pipeline import Definition, Progress
from kappa.processes import in_background, keep_pandas_out, relax_garbage_collector
from tables.grouped_mean import define_table, stored_next_offset

if TYPE_CHECKING:  # Faust is imported through the seam (faust_internals.import_faust_types_without_aiohttp)
    import faust

HEARTBEAT_S = 0.5  # a worker's heartbeat to its group (see create_pipeline)
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # the producer's cap on one record; the topics' own limits are lower
REPLAY_HEARTBEAT_S = 0.1  # a replay's processes', while they form their group


def quiet_faust_noise() -> None:
    """Faust warns on every full producer buffer, which batches of table writes fill by
    design; the agent drains it, so keep the log to what an operator needs."""
    logging.getLogger("faust.transport.producer").setLevel(logging.ERROR)
    fold_repeated_client_errors()


def prepare_for_worker() -> None:
    """What a process does right before it runs a Faust worker (a batch replay, a worker
    process): quiet Faust's noise, relax the GC, and keep pandas out."""
    quiet_faust_noise()
    relax_garbage_collector()
    keep_pandas_out()


class NoHttpClient:
    """Faust's `HttpClient` setting. Its default names aiohttp's ClientSession, which Faust
    imports while it reads its settings, so every app paid aiohttp's import (about 0.12 s of
    each process's start) for a client kappa never uses: its apps run no web server and make
    no HTTP calls. Faust makes one only when `app.http_client` is read, and then gets this."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        raise RuntimeError("kappa's Faust apps make no HTTP calls (kappa.engine.app.NoHttpClient)")


@dataclass
class Pipeline:
    """A wired Faust app and the handles the runner needs to watch and snapshot it."""

    app: faust.App
    table: Any  # a faust Table (its types do not describe the RocksDB store kappa reads)
    progress: Progress
    definition: Definition
    outages: OutageReporter
    # commits the offsets the table reached and the commit timer has not committed yet
    commit_pending: Callable[[], Awaitable[None]]


def create_pipeline(
    *,
    broker: str,
    pipeline: str,
    generation: int,
    definition: Definition,
    partitions: int,
    state_dir: Path,
    progress: Progress,
    replication: admin.Replication,
    outage_label: str | None = None,
    group_size: int | None = None,
) -> Pipeline:
    """Wire the generation's app. Every topic it creates is replicated as `replication` says:
    Faust's changelog through its own settings, its assignor topic made here first (Faust
    gives that one no config, and leaves an existing topic as it is).

    A leader watch runs beside it; with `outage_label` it prints the outage lines itself
    (a replay), without it only the log filters learn of outages (a worker process, whose
    supervisor prints them once for all processes). `group_size`: the processes a replay
    started together; until they have all joined, one with more than its share fetches nothing."""
    assignor = in_background(  # a round trip to the controller (about 40 ms), made while the app is wired
        "kappa-assignor-topic",
        admin.ensure_topic,
        broker,
        assignor_topic(pipeline, generation),
        1,
        replication_factor=replication.factor,
    )
    app = FaustApp(
        app_id(pipeline, generation),
        broker=f"kafka://{broker}",
        # one client id per generation: broker-side logs and quotas can tell generations apart
        broker_client_id=app_id(pipeline, generation),
        **security.from_environment().faust_options(),
        store="rocksdb://",
        datadir=str(state_dir),
        autodiscover=False,
        web_enabled=False,
        HttpClient=NoHttpClient,
        topic_partitions=partitions,
        topic_replication_factor=replication.factor,
        # every changelog and dead-letter write waits for all in-sync replicas: a write the
        # table counts on must survive the death of the broker that took it
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        stream_recovery_delay=0.0,
        stream_buffer_maxsize=65_536,
        broker_commit_every=50_000,
        consumer_max_fetch_size=fetch_partition_bytes(),
        # a batch writes each key it touches once (changelog and RocksDB): with many keys,
        # bigger batches mean fewer writes (100k instead of 20k took a 190k-group windowed replay from 14.5 s to 11.9 s,
        # about 90 MB more peak RSS at 1k keys; scripts/bench measures both)
        broker_max_poll_records=100_000,
        producer_linger_ms=20,
        producer_max_batch_size=1024 * 1024,
        # a reject is copied whole when its dead-letter topic takes it (kappa.engine.deadletters):
        # aiokafka's own cap on a record (1 MB by default) must not refuse it first
        producer_max_request_size=MAX_REQUEST_BYTES,
        table_cleanup_interval=3600.0,
        # a killed process must leave the group in seconds, not Faust's default minute
        broker_session_timeout=10.0,
        # a member learns of a rebalance at its next heartbeat; at Faust's 3 s, every process
        # joining a replay held the whole group for seconds. A replay's processes start together
        # and the first to join is assigned alone until its heartbeat says the others came:
        # they beat every 0.1 s (a 4-process replay under a 0.25 CPU quota each caught up about
        # 0.5 s sooner than at 0.5 s); they stop once the replay has caught up
        broker_heartbeat_interval=REPLAY_HEARTBEAT_S if group_size else HEARTBEAT_S,
        # no standby copies: each process would also replay every other process's changelog,
        # doubling the table work on a host; a moved partition is restored from the changelog
        # (compact: one entry per key), and exactness never depends on standbys
        table_standby_replicas=0,
        Monitor=PerRecordQuietMonitor,  # see kappa.engine.faust_internals
        TableManager=PromptTableManager,
    )
    source = app.topic(definition.topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    dlq = app.topic(
        definition.dlq_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    table = define_table(app, partitions, replication.topic_config)
    identity = deadletters.definition_id(definition.to_record())
    source_id = admin.topic_id(broker, definition.topic)
    written = deadletters.written_up_to(broker, definition.dlq_topic, definition.topic, source_id, identity)
    dead_letters = DeadLetters(
        pipeline, generation, identity, source_id, written, deadletters.message_limit(broker, definition.dlq_topic)
    )
    agent = GroupedMeanAgent(table, definition, dlq, progress, dead_letters)
    # Faust subscribes to the source topic and fetches it; its batches go straight to the agent
    fair_share = -(-partitions // group_size) if group_size else None
    deliver_batches(app, source, {definition.topic: agent.on_batch}, fair_share)
    every(app, COMMIT_EVERY_S, "kappa.commit_pending")(agent.commit_pending)
    every(app, COMMIT_EVERY_S, "kappa.flush_stalled_cache")(agent.flush_stalled_cache)
    watch = LeaderWatch(broker, [definition.topic, definition.dlq_topic, changelog_topic(pipeline, generation)])
    outages = OutageReporter(watch, outage_label or "", emit=stderr_line if outage_label else None)

    async def watch_leaders() -> None:
        await _poll_in_thread(outages)

    every(app, CHECK_EVERY_S, "kappa.watch_leaders")(watch_leaders)
    wired = Pipeline(
        app=app,
        table=table,
        progress=progress,
        definition=definition,
        outages=outages,
        commit_pending=agent.commit_pending,
    )
    table.on_recover(lambda: resume_from_table_offsets(wired))
    assignor.result()  # made before the app can start
    return wired


async def _poll_in_thread(outages: OutageReporter) -> None:
    """The watch blocks on metadata and TCP probes; the loop must keep processing meanwhile."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, outages.poll)
    except Exception:  # a watch must never stop the pipeline; the next tick retries
        logging.getLogger("kappa.kafka.availability").debug("leader watch failed", exc_info=True)


async def resume_from_table_offsets(pipe: Pipeline) -> None:
    """Make the table, not the consumer group, decide where each partition resumes.

    Faust seeks to the committed offsets right after table recovery. A committed offset can
    be ahead of what the changelog restored (a commit raced a changelog write, or a process
    lost its partitions while writing), and resuming there would skip records. Committing
    the restored state's own next offset first makes the seek land exactly after the last
    applied record; records the state already holds are skipped per key, so this is exact
    in both directions (the idempotent-recovery design of Quix Streams).
    """
    consumer = pipe.app.consumer
    topic = pipe.definition.topic
    offsets = {tp: stored_next_offset(pipe.table, tp.partition) for tp in consumer.assignment() if tp.topic == topic}
    for tp, stored in offsets.items():
        # a restored partition may already be at the replay's end offsets, with nothing left to apply
        progress = pipe.progress.next_offsets
        progress[tp.partition] = max(stored, progress.get(tp.partition, 0))
        pipe.progress.folded(tp.partition, stored)  # a resumed replay's progress line starts there
        pipe.progress.dirty.add(tp.partition)
    await commit_offsets(consumer, offsets)
