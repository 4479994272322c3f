"""A generation's state outside the registry: consumer group, changelog topic, local dirs.

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

from kappa import admin, parts
from kappa.app import app_id, changelog_topic
from kappa.config import Settings
from kappa.errors import KappaError

TOPIC_GONE_TIMEOUT_S = 30.0


def _local_dirs(settings: Settings, pipeline: str, generation: int) -> list[Path]:
    return [
        settings.state_dir(pipeline, generation),
        parts.parts_dir(settings.snapshot_dir, pipeline, generation),
        settings.run_dir(pipeline, generation),
    ]


def delete_generation_state(settings: Settings, pipeline: str, generation: int) -> None:
    """Consumer group, changelog topic and local directories; the group must have no members."""
    admin.delete_consumer_group(settings.broker, app_id(pipeline, generation))
    admin.delete_topics(settings.broker, [changelog_topic(pipeline, generation)])
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
