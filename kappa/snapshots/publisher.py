"""Publishing a generation's snapshot from the parts its processes wrote.

The publisher merges the newest part of every partition (kappa.snapshots.parts) and
publishes when the cut moved. Publishing is thus off the processing path, and it works the
same when processes on several hosts share one snapshot directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from kappa.config import Settings
from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.lifecycle.generations import Registry
from kappa.lifecycle.guards import refuse_empty_result
from kappa.pipeline import Definition
from kappa.snapshots import parts, snapshot


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
            manifest = snapshot.read_manifest(self.settings.snapshot_dir, self.pipeline)
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
        cut = parts.cut_of(newest, self.partitions) if newest else None
        if cut is None or cut == self.last_offsets:
            return None
        pipeline_dir = self.settings.snapshot_dir / self.pipeline
        if make_current and snapshot.steps_back(pipeline_dir, None, cut):
            return None  # behind what readers see now: wait for newer parts (checked again under the lock)
        aggregate, layout = self.definition.aggregate(), self.definition.layout()
        merged = parts.read_parts(newest, self.partitions)
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

        def allowed() -> bool:  # under the publish lock: no other publisher moves `latest` meanwhile
            if make_current:
                # a replay beside live reaches the end offsets it started at while the live generation
                # publishes what came since: switching then moved `latest` back (found by helper-26)
                if snapshot.steps_back(pipeline_dir, None, merged.offsets):
                    return False
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
            f"published {path.name}: generation {self.generation}, {manifest['keys']:,} table rows, lag {lag:,}, "
            f"{time.monotonic() - started:.2f}s",
            flush=True,
        )
        return path
