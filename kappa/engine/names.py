"""The Kafka names of a pipeline generation: its consumer group and app id, and the topics
Faust creates for it. Kept apart from kappa.engine.app so that commands which only name these
(status, gc, the replay supervisor) do not import Faust (about 0.3 s of CPU per process)."""

from __future__ import annotations

from tables.grouped_mean import TABLE_NAME


def app_id(pipeline: str, generation: int) -> str:
    return f"kappa-{pipeline}-g{generation}"


def changelog_topic(pipeline: str, generation: int) -> str:
    return f"{app_id(pipeline, generation)}-{TABLE_NAME}-changelog"


def assignor_topic(pipeline: str, generation: int) -> str:
    """Faust's leader-election topic of a generation (faust.assignor.leader_assignor)."""
    return f"{app_id(pipeline, generation)}-__assignor-__leader"
