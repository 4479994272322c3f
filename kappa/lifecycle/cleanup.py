"""A generation's state outside the registry: consumer group, changelog topic, local dirs.

Nothing kappa creates is left behind without a way to remove it: a replaced generation is
retired by the replay that replaced it, or by the next command if that replay was stopped
halfway; an abandoned one is resumed by the same replay or deleted by `kappa gc`.

Deleting it is how a replaced generation is retired. Checking for it is how a new one starts
clean: generation numbers come from the registry beside the snapshots, so a registry that was
deleted (or another snapshot dir) hands out a number an earlier run already used, and Faust
would otherwise restore that run's table from its changelog.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from kappa.config import Settings
from kappa.engine.names import app_id, assignor_topic, changelog_topic
from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.lifecycle.children import heartbeats, read_supervisor_record
from kappa.lifecycle.generations import BUILDER_STATES, GenerationState, Registry, builder_alive, pipelines_under
from kappa.lifecycle.guards import LogChanged, check_same_log
from kappa.snapshots import parts

TOPIC_GONE_TIMEOUT_S = 30.0


def _local_dirs(settings: Settings, pipeline: str, generation: int) -> list[Path]:
    return [
        settings.state_dir(pipeline, generation),
        parts.parts_dir(settings.snapshot_dir, pipeline, generation),
        settings.run_dir(pipeline, generation),
    ]


def delete_generation_state(settings: Settings, pipeline: str, generation: int) -> None:
    """Consumer group, changelog and assignor topics, and local directories; the group must have no members."""
    admin.delete_consumer_group(settings.broker, app_id(pipeline, generation))
    admin.delete_topics(settings.broker, [changelog_topic(pipeline, generation), assignor_topic(pipeline, generation)])
    for directory in _local_dirs(settings, pipeline, generation):
        shutil.rmtree(directory, ignore_errors=True)


def clear_leftovers(settings: Settings, pipeline: str, generation: int) -> None:
    """Make a generation the registry has just allocated start from nothing."""
    group, changelog = app_id(pipeline, generation), changelog_topic(pipeline, generation)
    members = admin.group_members(settings.broker, group)
    if members:
        raise KappaError(
            f"consumer group {group!r} has {members} live member(s), but generation {generation} of {pipeline!r} "
            f"is new in {settings.snapshot_dir / pipeline}: another kappa with another --snapshot-dir runs this "
            "pipeline on this broker; stop it, or give this one its own --pipeline NAME"
        )
    found = [f"changelog topic {changelog}"] if admin.partition_count(settings.broker, changelog) is not None else []
    found += [f"consumer group {group}"] if members is not None else []
    found += [str(d) for d in _local_dirs(settings, pipeline, generation) if d.exists()]
    if not found:
        return
    print(
        f"kappa: generation {generation} of {pipeline!r} is new, but an earlier run left state for it "
        f"({', '.join(found)}); deleting it so the generation starts empty",
        file=sys.stderr,
        flush=True,
    )
    delete_generation_state(settings, pipeline, generation)
    deadline = time.monotonic() + TOPIC_GONE_TIMEOUT_S
    while admin.partition_count(settings.broker, changelog) is not None:
        if time.monotonic() > deadline:
            raise KappaError(f"the broker did not delete topic {changelog!r} within {TOPIC_GONE_TIMEOUT_S:g}s")
        time.sleep(0.2)


def retire_if_stopped(settings: Settings, pipeline: str, generation: int) -> bool:
    """Delete a replaced or abandoned generation's state once none of its processes runs."""
    if heartbeats(settings, pipeline, generation):
        return False
    delete_generation_state(settings, pipeline, generation)
    Registry(settings.snapshot_dir, pipeline).mark(generation, GenerationState.RETIRED)
    return True


def finish_half_done_steps(settings: Settings, pipeline: str) -> list[str]:
    """Finish what an interrupted command left half done: a generation left `retiring` by a
    switch-over that was stopped before it deleted the old state is retired now, once its
    processes are gone. Run by every command that starts or replaces a generation."""
    done = []
    for generation, _ in Registry(settings.snapshot_dir, pipeline).in_state(GenerationState.RETIRING):
        if retire_if_stopped(settings, pipeline, generation):
            done.append(f"retired generation {generation} (replaced earlier; its state is deleted)")
    return done


def abandoned(registry: Registry) -> list[tuple[int, dict]]:
    """Generations that stopped before becoming current and that nobody is computing (a
    replay killed outright leaves its generation running or building, with its builder gone)."""
    states = (GenerationState.FAILED, *BUILDER_STATES)
    return [(number, entry) for number, entry in registry.in_state(*states) if not builder_alive(entry)]


def resumed_from(settings: Settings, pipeline: str, generation: int, topic: str, ends: dict[int, int]) -> str:
    """Where a stopped generation goes on from, for the line a resumed replay prints: the
    offsets its consumer group committed, as records of the log read before it stopped."""
    committed = admin.committed_offsets(settings.broker, app_id(pipeline, generation), topic, len(ends))
    done = sum(min(committed.get(partition) or 0, end) for partition, end in ends.items())
    total = sum(ends.values())
    return f"from the offsets it committed ({done:,} of {total:,} records read before it stopped)"


def mark_failed(registry: Registry, generation: int, entry: dict) -> None:
    """An abandoned generation whose builder is gone is failed (if it was not marked so already)."""
    if entry.get("state") in BUILDER_STATES:
        registry.mark(generation, GenerationState.FAILED)


def collect_garbage(settings: Settings, pipeline: str, *, keep: int | None = None, kept: bool = False) -> list[str]:
    """Everything a pipeline no longer needs: half-done retirements and abandoned generations
    (all of them, or all but `keep`, which a resumed replay is about to take over), and with
    `kept` the generations replaced with --keep-old."""
    done = finish_half_done_steps(settings, pipeline)
    registry = Registry(settings.snapshot_dir, pipeline)
    for generation, _ in registry.in_state(GenerationState.KEPT) if kept else []:
        if retire_if_stopped(settings, pipeline, generation):
            done.append(f"deleted generation {generation} (replaced earlier and kept with --keep-old)")
    for generation, entry in abandoned(registry):
        if generation == keep:
            continue
        mark_failed(registry, generation, entry)
        if retire_if_stopped(settings, pipeline, generation):
            done.append(f"deleted generation {generation} ({entry.get('mode')}, stopped before it became current)")
    return done


def discard_built_on_another_log(settings: Settings, pipeline: str, topic: str, partitions: int) -> list[str]:
    """Delete the abandoned generations of `topic` that were built on another log (partitions
    added since, or the topic deleted and made again): resuming one would go on from offsets
    and per-partition state of a log that is gone, and publish its counts as this log's. The
    replay then builds a new generation from the log as it is."""
    registry = Registry(settings.snapshot_dir, pipeline)
    done = []
    for generation, entry in abandoned(registry):
        if (entry.get("definition") or {}).get("topic") != topic:
            continue
        try:
            check_same_log(settings, pipeline, generation, topic, partitions, record=False)
        except LogChanged as changed:
            mark_failed(registry, generation, entry)
            if retire_if_stopped(settings, pipeline, generation):
                done.append(f"deleted generation {generation} instead of resuming it: {changed.fact}")
    return done


def report(lines: list[str], pipeline: str) -> None:
    for line in lines:
        print(f"kappa: {pipeline}: {line}", file=sys.stderr, flush=True)


def drop_pipeline(settings: Settings, pipeline: str, *, with_topic: bool = False) -> list[str]:
    """Delete everything kappa made for a pipeline: every generation's consumer group,
    changelog and assignor topics and local state, its snapshots and its registry; with
    `with_topic`, also the topic it reads and the topic's load ledger and dead-letter topic
    (refused while another pipeline under the same --snapshot-dir reads that topic). A drop
    without `with_topic` says which topics it kept; `pipeline` may then name such a topic, which
    `with_topic` deletes once no pipeline reads it.

    Refused while any of its processes runs, here or on another host (its groups' members):
    deleting a running generation's changelog would leave its processes failing. A worker's
    supervisor counts too, even while none of its processes runs (one failing at every start,
    between two restarts): it would start them again on what was deleted."""
    registry = Registry(settings.snapshot_dir, pipeline)
    generations = registry.read()["generations"]
    home = settings.snapshot_dir / pipeline
    if not generations and not home.exists():
        if with_topic and admin.partition_count(settings.broker, pipeline) is not None:
            _refuse_if_read_by_another(settings, pipeline, None)  # a pipeline dropped without --topic kept it
            return [_drop_topic(settings, pipeline)]
        raise KappaError(f"no pipeline {pipeline!r} under {settings.snapshot_dir}: nothing to drop")
    supervisor = read_supervisor_record(settings, pipeline)
    if supervisor is not None:
        raise KappaError(
            f"pipeline {pipeline!r} has processes running (a kappa worker: supervisor pid {supervisor.pid} on "
            f"{supervisor.host}, generation {supervisor.generation}): stop its workers and replays first, then drop it"
        )
    running = [
        int(number)
        for number, entry in generations.items()
        if heartbeats(settings, pipeline, int(number))
        or admin.group_members(settings.broker, app_id(pipeline, int(number)))
        or (entry.get("state") in BUILDER_STATES and builder_alive(entry))
    ]
    if running:
        raise KappaError(
            f"pipeline {pipeline!r} has processes running (generation {running[0]}): stop its workers and replays "
            "first, then drop it"
        )
    topics = {entry["definition"]["topic"] for entry in generations.values() if entry.get("definition")}
    if with_topic:
        for topic in sorted(topics):
            _refuse_if_read_by_another(settings, topic, pipeline)
    done = []
    for number, entry in sorted((int(n), entry) for n, entry in generations.items()):
        store = settings.state_dir(pipeline, number)
        here = store.exists()
        delete_generation_state(settings, pipeline, number)
        if entry.get("state") == GenerationState.RETIRED:  # deleted when it was retired: only a leftover is news
            if here:
                done.append(f"deleted the local store {store} of generation {number}, retired earlier")
            continue
        deleted = f"deleted generation {number}: its consumer group, changelog and assignor topics"
        if here:
            done.append(f"{deleted}, and its local store {store}")
        else:  # built under another --data-dir (or host), which keeps its store
            done.append(f"{deleted}; no local store under {settings.data_dir} (the --data-dir that built it keeps one)")
    for directory in (home, settings.data_dir / "state" / pipeline, settings.data_dir / "run" / pipeline):
        if directory.exists():
            shutil.rmtree(directory)
            done.append(f"deleted {directory}")
    for parent in (settings.data_dir / "state", settings.data_dir / "run"):  # the last pipeline's leave nothing
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    for topic in sorted(topics):
        if with_topic:
            done.append(_drop_topic(settings, topic))
        elif admin.partition_count(settings.broker, topic) is not None:  # a topic deleted meanwhile is not kept
            done.append(_kept_topic(settings, topic))
    return done


def _readers(settings: Settings, topic: str) -> list[str]:
    """The pipelines under --snapshot-dir with a generation that reads `topic`."""
    return [
        pipeline
        for pipeline in pipelines_under(settings.snapshot_dir)
        if any(
            entry.get("definition", {}).get("topic") == topic
            for entry in Registry(settings.snapshot_dir, pipeline).read()["generations"].values()
        )
    ]


def _refuse_if_read_by_another(settings: Settings, topic: str, dropping: str | None) -> None:
    others = [reader for reader in _readers(settings, topic) if reader != dropping]
    if others:
        leave_out = ", or leave out --topic" if dropping else ""
        raise KappaError(f"pipeline {others[0]!r} also reads topic {topic!r}: drop it first{leave_out}")


def _drop_topic(settings: Settings, topic: str) -> str:
    """Delete a topic with its load ledger and dead-letter topic (the caller has checked that
    no other pipeline reads it, `_refuse_if_read_by_another`)."""
    named = [topic, f"{topic}.loads", f"{topic}.dlq"]
    admin.delete_topics(settings.broker, named)
    return f"deleted topics {', '.join(named)}"


def _kept_topic(settings: Settings, topic: str) -> str:
    """What a drop without --topic left, and the command that deletes it once no pipeline reads it."""
    others = _readers(settings, topic)
    if others:
        return f"kept topic {topic!r}, which pipeline {others[0]!r} also reads"
    if (settings.snapshot_dir / topic / "generations.json").exists():  # `kappa drop <topic>` names that pipeline
        return f"kept topic {topic!r} with {topic}.loads and {topic}.dlq"
    return f"kept topic {topic!r} with {topic}.loads and {topic}.dlq: `kappa drop {topic} --topic` deletes them"
