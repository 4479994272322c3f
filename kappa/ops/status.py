"""`kappa status`: one view of the broker, the logs, generations, lag and snapshots."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime

from kappa.config import Settings
from kappa.engine.names import app_id, assignor_topic, changelog_topic
from kappa.errors import KappaError
from kappa.kafka import admin
from kappa.kafka.availability import cluster_health
from kappa.lifecycle.children import heartbeats, read_supervisor_record
from kappa.lifecycle.generations import BUILDER_STATES, GenerationState, Registry, builder_alive, pipelines_under
from kappa.lifecycle.guards import LogChanged, check_log_unchanged
from kappa.load.ledger import STARTED, read_ledger
from kappa.pipeline import Definition
from kappa.snapshots.snapshot import read_manifest

# a process restarted this often within this window fails at every start: status says so
CRASH_LOOP_RESTARTS = 3
CRASH_LOOP_WINDOW_S = 60.0
LEDGER_STALL_S = 5.0  # a load ledger that cannot be read this long is a warning, not a wait


def _age_s(stamp: str) -> float:
    created = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return round((datetime.now(UTC) - created).total_seconds(), 1)


def _processes(settings: Settings, pipeline: str, generation: int) -> list[dict]:
    beats = heartbeats(settings, pipeline, generation)
    return [{**beat, "heartbeat_age_s": _age_s(beat["updated_at"])} for beat in beats]


def _worker(settings: Settings, pipeline: str, generations: list[dict]) -> dict | None:
    """The running `kappa worker` of this data dir, with the restarts of its processes
    (`generations`: the status's own, whose processes were read already)."""
    record = read_supervisor_record(settings, pipeline)
    if record is None:
        return None
    recent: dict[int, list[dict]] = {}
    for restart in record.restarts:
        if _age_s(restart["at"]) <= CRASH_LOOP_WINDOW_S:
            recent.setdefault(restart["index"], []).append(restart)
    return {
        **asdict(record),
        "with_heartbeat": sum(len(gen["processes"]) for gen in generations if gen["generation"] == record.generation),
        "crash_looping": [
            {"index": index, "restarts": len(restarts), "last_code": restarts[-1]["code"]}
            for index, restarts in sorted(recent.items())
            if len(restarts) >= CRASH_LOOP_RESTARTS
        ],
    }


def pipeline_status(settings: Settings, pipeline: str, broker_reachable: bool = True) -> dict:
    """What disk holds (generations, processes, the latest snapshot) and, when the broker answers, the log's
    end offsets and each generation's committed offsets and lag (None when it cannot be asked)."""
    registry = Registry(settings.snapshot_dir, pipeline).read()
    current = registry.get("current")
    generations = registry.get("generations", {})
    topic = next((g["definition"]["topic"] for g in generations.values() if g.get("definition")), pipeline)
    partitions: int | None = None
    ends: dict[int, int] | None = None
    if broker_reachable:
        partitions = admin.partition_count(settings.broker, topic) or 0
        ends = admin.end_offsets(settings.broker, topic, partitions) if partitions else {}
    result: dict = {
        "pipeline": pipeline,
        "topic": topic,
        "partitions": partitions,
        "end_offsets": None if ends is None else {str(p): o for p, o in ends.items()},
        "current_generation": current,
        "generations": [],
    }
    for number, entry in sorted(generations.items(), key=lambda item: int(item[0])):
        if entry.get("state") == GenerationState.RETIRED:
            continue
        committed: dict[int, int | None] | None = None
        lag: dict[str, int] | None = None
        members: int | None = None
        if ends is not None and partitions is not None:
            committed = admin.committed_offsets(settings.broker, app_id(pipeline, int(number)), topic, partitions)
            lag = {str(p): ends[p] - (committed.get(p) or 0) for p in ends}
            members = admin.group_members(settings.broker, app_id(pipeline, int(number)))
        result["generations"].append(
            {
                "generation": int(number),
                "state": entry.get("state"),
                "mode": entry.get("mode"),
                "definition": entry.get("definition"),
                "committed": None if committed is None else {str(p): o for p, o in committed.items()},
                "lag": lag,
                "total_lag": None if lag is None else sum(lag.values()),
                "processes": _processes(settings, pipeline, int(number)),
                "builder_gone": entry.get("state") in BUILDER_STATES and not builder_alive(entry),
                "group_members": members,
            }
        )
    result["worker"] = _worker(settings, pipeline, result["generations"])
    kept = [gen["generation"] for gen in result["generations"]]
    warnings = replication_warnings(settings, pipeline, topic, kept) if broker_reachable else []
    result["unfinished_loads"] = None
    if broker_reachable:
        warnings += log_warnings(settings, pipeline, result["generations"])
        if partitions:
            result["unfinished_loads"], unreadable = unfinished_loads(settings, topic)
            warnings += unreadable
    result["warnings"] = warnings + _crash_loop_warnings(result["worker"])
    try:
        manifest = read_manifest(settings.snapshot_dir, pipeline)
        result["latest_snapshot"] = {
            "generation": manifest["generation"],
            "age_s": _age_s(manifest["created_at"]),
            "keys": manifest["keys"],
            "complete": manifest["complete"],
            "records": manifest["records"],
            "records_after": _records_after(manifest, ends),
        }
    except KappaError:
        result["latest_snapshot"] = None
    return result


def unfinished_loads(settings: Settings, topic: str) -> tuple[list[dict], list[str]]:
    """The loads into `topic` its ledger records as begun and not completed (still running, or
    interrupted), and a warning if the ledger cannot be read. A load killed outright leaves its
    open transaction on the log, and every reader of the topic (live workers too) waits at it
    until the same load runs again or the broker aborts it: the lag alone did not say why."""
    try:
        current = admin.topic_id(settings.broker, topic)
        entries = read_ledger(settings.broker, topic, stall_s=LEDGER_STALL_S)
    except KappaError as exc:
        return [], [f"the load ledger of {topic!r} could not be read: {exc}"]
    return [
        {"file": entry.file, "key": entry.key, "started_at": entry.started_at, "load_id": entry.load_id}
        for entry in entries
        if entry.state == STARTED and entry.topic_id == current
    ], []


def _records_after(manifest: dict, ends: dict[int, int] | None) -> int | None:
    """How many records the log holds past the offsets a snapshot covers (None: unknown)."""
    if ends is None:
        return None
    covered = manifest.get("offsets", {})
    return sum(max(end - int(covered.get(str(partition), 0)), 0) for partition, end in ends.items())


def replication_warnings(settings: Settings, pipeline: str, topic: str, generations: list[int]) -> list[str]:
    """One line per pipeline topic with fewer replicas than the cluster could give it, and one
    per topic whose partitions have fewer replicas in sync than assigned (a broker is down or
    catching up).

    A thin topic (made by an older kappa, another tool, --replication-factor, or while a broker
    was down) survives fewer broker deaths than the rest, however well the rest is replicated.
    """
    possible = admin.replication(settings.broker).factor
    topics = [topic, f"{topic}.dlq"]
    for generation in generations:
        topics += [changelog_topic(pipeline, generation), assignor_topic(pipeline, generation)]
    thin = [
        f"topic {found.topic!r} has {found.replicas} replica(s) where the cluster could give {possible}: "
        f"{_what_a_death_does(found.replicas)}; raise it with kafka-reassign-partitions"
        for found in admin.topic_replication(settings.broker, topics).values()
        if found.replicas < possible
    ]
    return thin + [short.line() for short in cluster_health(settings.broker, topics).short]


def _what_a_death_does(replicas: int) -> str:
    if replicas == 1:
        return "one broker's death takes its partitions offline"
    return f"it outlives {replicas - 1} broker death(s) where the others outlive more"


def log_warnings(settings: Settings, pipeline: str, generations: list[dict]) -> list[str]:
    """One line per generation that is live or building on a log it was not built from
    (kappa.lifecycle.guards.check_log_unchanged): its snapshots may say complete, but it can
    never catch up. Each generation is checked against the topic its own definition reads."""
    found = []
    for gen in generations:
        topic = (gen["definition"] or {}).get("topic")
        if topic is None or gen["state"] in (GenerationState.FAILED, GenerationState.KEPT, GenerationState.RETIRING):
            continue
        try:
            check_log_unchanged(settings, pipeline, gen["generation"], topic, record=False)
        except LogChanged as changed:
            found.append(f"{changed.fact}: run `kappa replay` to build a generation from the log as it is now")
        except KappaError:
            continue
    return found


def _crash_loop_warnings(worker: dict | None) -> list[str]:
    return [
        f"worker process {looping['index']} exited {looping['restarts']} times in the last "
        f"{CRASH_LOOP_WINDOW_S:g}s (last exit code {looping['last_code']}): it fails soon after each start; "
        "the worker's output says why"
        for looping in (worker or {}).get("crash_looping", [])
    ]


def gather(settings: Settings, pipeline: str | None = None) -> dict:
    """Everything `kappa status` shows. A broker that does not answer (or refuses the credentials) is not an
    error here: `broker_reachable` is False, `broker_error` says why, and the disk's part is still there."""
    error: str | None = None
    try:
        admin.wait_until_reachable(settings.broker, timeout=5)
    except KappaError as exc:
        error = str(exc)
    names = [pipeline] if pipeline else pipelines_under(settings.snapshot_dir)
    pipelines = []
    for name in names:
        try:
            pipelines.append(pipeline_status(settings, name, broker_reachable=error is None))
        except KappaError as exc:  # the broker went away between the check and these calls
            error = str(exc)
            pipelines.append(pipeline_status(settings, name, broker_reachable=False))
    brokers: str | None = None
    if error is None:
        try:
            brokers = cluster_health(settings.broker, []).broker_line()
        except KappaError as exc:
            error = str(exc)
    return {
        "broker": settings.broker,
        "broker_reachable": error is None,
        "broker_error": error,
        "brokers": brokers,
        "pipelines": pipelines,
    }


def render(status: dict) -> str:
    reachable = "reachable" if status["broker_reachable"] else "unreachable (end offsets and lag unknown)"
    if status.get("brokers"):
        reachable += f"; {status['brokers']}"
    lines = [f"broker {status['broker']}: {reachable}"]
    if not status["pipelines"]:
        lines.append("no pipelines yet: run `scripts/replay --batch` or `kappa worker`")
    for pipe in status["pipelines"]:
        if pipe["end_offsets"] is None:
            lines.append(f"pipeline {pipe['pipeline']}: topic {pipe['topic']!r}, partitions and end offsets unknown")
        else:
            ends = ", ".join(f"{p}:{o}" for p, o in pipe["end_offsets"].items())
            lines.append(
                f"pipeline {pipe['pipeline']}: topic {pipe['topic']!r}, {pipe['partitions']} partitions, "
                f"end offsets {ends}"
            )
        current = pipe["current_generation"]
        lines.append(f"  current generation: {current if current is not None else 'none yet (no replay has finished)'}")
        for gen in pipe["generations"]:
            recorded = gen["definition"]
            computes = "definition unknown"
            if recorded:
                computes = " ".join(Definition.from_record(recorded).computation_args())
            if gen["state"] == GenerationState.KEPT:  # nothing reads it: its lag only grows, and means nothing
                lag = ""
            elif gen["lag"] is None:
                lag = ", lag unknown"
            else:
                per_partition = ", ".join(f"{p}:{lag}" for p, lag in gen["lag"].items())
                lag = f", lag {gen['total_lag']:,} ({per_partition})"
            label = f"{gen['state']}, {gen['mode']}"
            if gen["state"] == GenerationState.COMPLETE and _followed_live(gen, pipe.get("worker")):
                label += ", continued by a live worker"  # a batch replay built it; a worker tails it now
            if gen["state"] == GenerationState.KEPT:
                label += ", replaced: no longer read; `kappa gc --kept` deletes it"
            if gen.get("builder_gone"):  # killed outright: nothing marked it failed
                label += ", stopped: the replay that built it is gone; run it again to resume, or `kappa gc`"
            if _untended(gen, pipe.get("worker")):
                label += ", no worker runs it: `kappa worker` continues it"
            lines.append(f"  generation {gen['generation']} [{label}] {computes}{lag}")
            for proc in gen["processes"]:
                lines.append(
                    f"    process pid {proc['pid']} on {proc['host']}: partitions {proc['partitions']}, "
                    f"heartbeat {proc['heartbeat_age_s']}s ago"
                )
        lines.extend(_worker_lines(pipe.get("worker")))
        lines.extend(_load_lines(pipe["topic"], pipe.get("unfinished_loads") or []))
        lines.extend(f"  warning: {warning}" for warning in pipe.get("warnings", []))
        snap = pipe["latest_snapshot"]
        if snap:
            records = snap["records"]
            lines.append(
                f"  latest snapshot: generation {snap['generation']}, {snap['keys']:,} table rows (groups), "
                f"{snap['age_s']}s old, "
                f"complete={snap['complete']}; counted {records['counted']:,}, skipped {records['skipped']:,}, "
                f"rejected {records['rejected']:,}"
            )
            if snap.get("records_after"):  # complete says the snapshot was caught up when published
                lines[-1] += f"; the log has {snap['records_after']:,} records it does not cover yet"
        else:
            lines.append("  latest snapshot: none yet")
    return "\n".join(lines)


def _untended(gen: dict, worker: dict | None) -> bool:
    """A live generation that no process tails: none here (heartbeats, a supervisor) and none in
    its consumer group, wherever it runs (unknown with the broker down: not said)."""
    if gen["state"] != GenerationState.LIVE or gen["processes"] or gen.get("group_members") != 0:
        return False
    return worker is None or worker["generation"] != gen["generation"]


def _followed_live(gen: dict, worker: dict | None) -> bool:
    return bool(gen["processes"]) or (worker is not None and worker["generation"] == gen["generation"])


def _load_lines(topic: str, loads: list[dict]) -> list[str]:
    if not loads:
        return []
    from kappa.load.loader import TRANSACTION_TIMEOUT_S  # the loader imports pandas: only when a line needs it

    return [
        f"  load of {load['file']} (--key {load['key']}) into {topic!r}, begun {load['started_at']}, has not "
        "completed: it is still running, or it was interrupted and the same `kappa load` finishes it (a load "
        f"killed outright holds back the topic's readers until then, or at most {TRANSACTION_TIMEOUT_S}s)"
        for load in loads
    ]


def _worker_lines(worker: dict | None) -> list[str]:
    if worker is None:
        return []
    lines = [
        f"  worker: supervisor pid {worker['pid']} on {worker['host']}, generation {worker['generation']}, "
        f"{worker['with_heartbeat']} of {worker['processes']} process(es) with a heartbeat, "
        f"{worker['restart_count']:,} restart(s)"
    ]
    if worker["restarts"]:
        last = worker["restarts"][-1]
        lines[0] += f" (the last {_age_s(last['at'])}s ago: process {last['index']} exited with code {last['code']})"
    return lines


def dumps(status: dict) -> str:
    return json.dumps(status, indent=2, default=str)
