"""The `kappa` command line. Each subcommand is a thin shell over a framework function."""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kappa.config import Settings, parse_offsets, validate_pipeline_name
from kappa.errors import KappaError
from kappa.processes import relax_garbage_collector

RECORD_KINDS = ("counted", "skipped", "rejected")
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
MALLOC_ARENAS = 2


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--broker", help="Kafka bootstrap address (default: $KAPPA_BROKER, else localhost:9092)")
    parent.add_argument("--data-dir", help="local state and the embedded broker's files (default: ./.kappa)")
    parent.add_argument("--snapshot-dir", help="where snapshots are published (default: ./snapshots)")
    parent.add_argument(
        "--replication-factor",
        type=int,
        help="replicas of every topic kappa creates (default: $KAPPA_REPLICATION_FACTOR, else the cluster's "
        "default.replication.factor, at most its broker count)",
    )
    return parent


def _settings(args: argparse.Namespace, writes: bool = False, snapshots: bool = True) -> Settings:
    """The settings; `writes`: a command that writes under --data-dir (and, with `snapshots`,
    --snapshot-dir), refused at once when one cannot be made or written."""
    settings = Settings.from_args(args.broker, args.data_dir, args.snapshot_dir, args.replication_factor)
    if writes:
        settings.require_usable_dirs(snapshots=snapshots)
    return settings


def cmd_kafka(args: argparse.Namespace) -> int:
    from kappa.kafka import broker

    settings = _settings(args, writes=args.action == "start", snapshots=False)  # a broker writes no snapshot
    if args.action == "start":
        address = broker.start(settings.data_dir, args.port, sasl=args.sasl, nodes=args.nodes)
        count = broker.recorded_nodes(settings.data_dir)
        shape = f"a {count}-node cluster" if count > 1 else "up"
        print(f"kafka {broker.KAFKA_VERSION} is {shape} at {address} (data in {settings.data_dir / 'kafka'})")
    elif args.action == "stop":
        stopped = broker.stop(settings.data_dir)
        print("kafka stopped" if stopped else f"no kafka broker was running from {settings.data_dir / 'kafka'}")
    else:
        state = broker.status(settings.data_dir)
        if not state["running"]:
            print(f"kafka is not running (data dir {state['home']})")
            return 1
        answering = "answering" if state["answers"] else f"not answering (starting, or stuck: see {state['home']})"
        print(
            f"kafka {state['version']} running at {state['address']} ({state['protocol']}) pid {state['pid']}, "
            f"{answering}"
        )
        if len(state["nodes"]) > 1:
            for node in state["nodes"]:
                where = f"{node['address']} pid {node['pid']}" if node["running"] else f"{node['address']} stopped"
                print(f"  node {node['node']}: {where}")
            print(f"  {state['registered']} of {len(state['nodes'])} nodes registered")
            if not all(node["running"] for node in state["nodes"]):
                return 1
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from kappa.load.loader import load

    result = load(_settings(args), args.path, args.key, args.topic, args.partitions, again=args.again)
    if result.previous is not None:
        entry = result.previous
        print(
            f"{args.path if args.path != '-' else 'stdin'} is already loaded into {result.topic!r}: "
            f"{result.total:,} rows with --key {entry.key}, completed {entry.completed_at}; nothing sent "
            "(pass --again to load it once more)"
        )
        return 0
    if result.not_objects:
        print(
            f"warning: {result.not_objects:,} {'line was' if result.not_objects == 1 else 'lines were'} not JSON "
            "objects; workers will reject them to "
            f"{result.topic}.dlq",
            file=sys.stderr,
        )
    if result.too_large is not None:
        print(result.too_large.line(result.topic), file=sys.stderr)
    created = " (created)" if result.created else ""
    resumed = f"; {result.resumed_from:,} were already there" if result.resumed_from is not None else ""
    rows = "1 row" if result.rows == 1 else f"{result.rows:,} rows"
    print(
        f"loaded {rows} into {result.topic!r}{created} in {result.seconds:.2f}s "
        f"({result.rows_per_s:,.0f} rows/s){resumed}"
    )
    return 0


def _require_processes(args: argparse.Namespace) -> None:
    if args.processes < 1 or args.snapshot_interval <= 0:
        raise KappaError("--processes must be at least 1 and --snapshot-interval above 0")


def cmd_replay(args: argparse.Namespace) -> int:
    _require_processes(args)
    if not args.batch:
        if args.timeout is not None:
            raise KappaError("--timeout applies to --batch replays only: add --batch, or leave out --timeout")
        from kappa.lifecycle.children import start_standby, stop_standby
        from kappa.processes import sigterm_interrupts

        with sigterm_interrupts():  # its workers are stopped on the way out, as on Ctrl-C
            # its processes import their libraries while this one imports its own and checks the log
            standby = start_standby(args.processes)
            try:
                settings = _settings(args, writes=True)
                pipeline, definition = _definition(args)
                return _replay_beside(args, settings, pipeline, definition, standby)
            finally:
                stop_standby(standby)  # those that got work are the replay's to stop, and are gone by now
    pipeline, definition = _definition(args)
    settings = _settings(args, writes=True)
    if args.timeout is not None and args.timeout <= 0:
        raise KappaError(f"--timeout must be a number of seconds above 0, got {args.timeout:g}")
    from kappa.lifecycle.guards import preflight
    from kappa.processes import in_background

    # the preflight mostly waits on the broker: Faust is imported meanwhile
    checked = in_background(
        "kappa-preflight", preflight, settings, definition, args.allow_truncated, args.force, args.timeout
    )
    from kappa.lifecycle.replay import run_batch
    from kappa.lifecycle.switchover import keep_generation, retire_generation

    result = run_batch(
        settings, pipeline, definition, force=args.force, checked=checked, loglevel=args.loglevel, timeout=args.timeout
    )
    records = result.manifest["records"]
    rate = sum(records[kind] for kind in RECORD_KINDS) / result.seconds if result.seconds else 0.0
    print(
        f"generation {result.generation} of {pipeline!r} published: {result.path} "
        f"({result.manifest['keys']:,} table rows; counted {records['counted']:,}, skipped {records['skipped']:,}, "
        f"rejected {records['rejected']:,}) in {result.seconds:.2f}s "
        f"({rate:,.0f} rows/s; snapshot {result.snapshot_seconds:.2f}s)"
    )
    if result.previous is not None and result.previous != result.generation:
        if args.keep_old:
            keep_generation(settings, pipeline, result.previous)
        else:
            retire_generation(settings, pipeline, result.previous, definition.topic)
    return 0


def _definition(args: argparse.Namespace):
    """The pipeline's name and definition, from kappa.toml and/or the options."""
    from kappa.pipeline import resolve

    name, definition = resolve(
        args.name,
        args.config,
        topic=args.topic,
        key=args.key,
        value=args.value,
        window=args.window,
        time=args.time,
        time_unit=args.time_unit,
    )
    pipeline = validate_pipeline_name(args.pipeline or name or definition.topic)
    return pipeline, definition


def cmd_worker(args: argparse.Namespace) -> int:
    from kappa.lifecycle.worker import Supervisor

    _require_processes(args)
    pipeline, definition = _definition(args)
    supervisor = Supervisor(
        _settings(args, writes=True), pipeline, definition, args.processes, args.snapshot_interval, args.loglevel
    )
    return supervisor.run()


def cmd_worker_process(args: argparse.Namespace) -> int:
    from kappa.lifecycle.process import run_process

    pipeline, definition = _definition(args)
    return run_process(
        _settings(args),
        pipeline,
        definition,
        args.generation,
        args.index,
        args.snapshot_interval,
        args.loglevel,
        catch_up_to=args.catch_up_to,
        group_size=args.group_size,
    )


def cmd_worker_standby(args: argparse.Namespace) -> int:
    """A replay's worker process before its work is known (kappa.lifecycle.children.Standby):
    import what a worker runs, say so on the ready pipe, then run `worker-process` with the
    arguments read from stdin; EOF instead means the replay needs it no more."""
    import kappa.lifecycle.process  # noqa: F401  the larger part of a worker's start

    with os.fdopen(args.ready_fd, "wb") as ready:
        ready.write(b"ready\n")
    line = sys.stdin.readline()
    if not line:
        return 0
    return main(["worker-process", *json.loads(line)])


def cmd_status(args: argparse.Namespace) -> int:
    from kappa.ops import status

    state = status.gather(_settings(args), args.pipeline)
    print(status.dumps(state) if args.json else status.render(state))
    if not state["broker_reachable"]:
        # what is on disk was shown; the broker's part is missing, so the command did not fully succeed
        print(f"kappa: error: {state['broker_error']}", file=sys.stderr)
        return 1
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from kappa.lifecycle.cleanup import collect_garbage
    from kappa.lifecycle.generations import pipelines_under

    settings = _settings(args)
    names = [validate_pipeline_name(args.pipeline)] if args.pipeline else pipelines_under(settings.snapshot_dir)
    cleaned = 0
    for name in names:
        for line in collect_garbage(settings, name, kept=args.kept):
            print(f"{name}: {line}")
            cleaned += 1
    if not cleaned:
        print("nothing to clean: no abandoned or half-retired generations")
    return 0


def cmd_drop(args: argparse.Namespace) -> int:
    from kappa.lifecycle.cleanup import drop_pipeline

    name = validate_pipeline_name(args.name)
    for line in drop_pipeline(_settings(args), name, with_topic=args.topic):
        print(f"{name}: {line}")
    return 0


def _replay_beside(args: argparse.Namespace, settings: Settings, pipeline: str, definition, standby: list) -> int:
    from kappa.lifecycle.switchover import run_beside

    result = run_beside(
        settings,
        pipeline,
        definition,
        processes=args.processes,
        interval=args.snapshot_interval,
        keep_old=args.keep_old,
        allow_truncated=args.allow_truncated,
        force=args.force,
        loglevel=args.loglevel,
        standby=standby,
    )
    replaced = f", replacing generation {result.previous}" if result.previous else ""
    retired = (
        f"; generation {result.previous}'s state was deleted"
        if result.retired
        else (f"; generation {result.previous}'s state is kept" if result.previous else "")
    )
    applying = f", applying records for {result.applying:.3f}s" if result.applying is not None else ""
    print(
        f"generation {result.generation} of {pipeline!r} is current{replaced}: {result.path} "
        f"(caught up in {result.seconds:.1f}s{applying}){retired}"
    )
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from kappa.snapshots.snapshot import manifest_in, read_snapshot, resolve_latest

    settings = _settings(args)
    if not (args.pipeline or args.name):
        raise KappaError("which pipeline? pass its name: kappa snapshot NAME (or --pipeline NAME)")
    pipeline = validate_pipeline_name(args.pipeline or args.name)
    if args.config is not None:  # as replay and worker take it: the name must be one of the file's pipelines
        from kappa.pipeline import resolve_name_in

        resolve_name_in(args.config, pipeline)
    if args.format == "csv":  # the published table.csv itself, byte for byte (ISO 8601 window starts)
        directory = resolve_latest(settings.snapshot_dir, pipeline)
        manifest = manifest_in(directory)
        sys.stdout.flush()
        sys.stdout.buffer.write((directory / "table.csv").read_bytes())
        sys.stdout.buffer.flush()
        _snapshot_footer(directory, manifest)
        return 0
    frame, manifest = read_snapshot(settings.snapshot_dir, pipeline)
    if args.format == "json":
        rows = json.loads(frame.to_json(orient="records"))
        print(json.dumps({"manifest": manifest, "rows": rows}, indent=2))
        return 0
    import pandas as pd

    with pd.option_context("display.max_rows", args.rows, "display.min_rows", args.rows, "display.width", 120):
        print(frame.to_string(index=False, max_rows=args.rows))
    _snapshot_footer(resolve_latest(settings.snapshot_dir, pipeline), manifest)
    return 0


def _snapshot_footer(directory: Path, manifest: dict) -> None:
    """Which snapshot was printed, its manifest, and a warning if it does not cover the log (stderr)."""
    print(f"# snapshot {directory}", file=sys.stderr)
    print("# manifest " + json.dumps(manifest, sort_keys=True), file=sys.stderr)
    if not manifest.get("complete"):
        lag = manifest.get("lag")
        missing = f"{lag:,} records" if isinstance(lag, int) else "records"
        print(
            f"# warning: this snapshot is not complete: it does not cover {missing} the log held when it was "
            "written (the pipeline was still catching up)",
            file=sys.stderr,
        )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="kappa",
        description="Kappa-architecture stream processor: batch is a replay of the log, live is tailing it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    kafka = commands.add_parser("kafka", parents=[common], help="run the embedded Kafka broker (one node or a cluster)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument(
        "--port",
        type=int,
        help="listener port on 127.0.0.1 (default 9092, or the port the data dir's broker has); "
        "a cluster's nodes listen on consecutive ports from it, their controllers right after",
    )
    kafka.add_argument(
        "--nodes",
        type=int,
        help="KRaft nodes (broker+controller each; default 1, or what the data dir holds); 3 make a cluster "
        "that survives one node's death",
    )
    kafka.add_argument(
        "--sasl",
        action="store_true",
        help="require SASL/PLAIN on the listener; the user is KAPPA_SASL_USERNAME / KAPPA_SASL_PASSWORD",
    )
    kafka.set_defaults(handler=cmd_kafka)

    load = commands.add_parser("load", parents=[common], help="load a CSV, Parquet or JSON Lines file into the log")
    load.add_argument("path", help="input file, or - for JSON Lines on stdin")
    load.add_argument("--key", required=True, help="the row field whose value becomes the message key")
    load.add_argument("--topic", help="target topic (default: the file name without its extension)")
    load.add_argument(
        "--partitions",
        type=int,
        help="partitions when the topic is created (default 8); an existing topic keeps its count",
    )
    load.add_argument(
        "--again",
        action="store_true",
        help="load a file the topic already holds once more (by default a loaded file is not sent twice)",
    )
    load.set_defaults(handler=cmd_load)

    replay = commands.add_parser("replay", parents=[common], help="run a new generation of a pipeline from offset 0")
    _pipeline_arguments(replay)
    replay.add_argument(
        "--batch", action="store_true", help="run in the foreground to the current end offsets, publish, exit"
    )
    replay.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="with --batch: give up after this long (exit non-zero, state kept), e.g. while a broker is down",
    )
    replay.add_argument(
        "--allow-truncated", action="store_true", help="replay even if retention removed the log's start"
    )
    replay.add_argument(
        "--force",
        action="store_true",
        help="skip the check that the named fields exist, and publish even a generation that counted nothing",
    )
    replay.add_argument("--processes", type=int, default=1, help="processes building the new generation (default 1)")
    replay.add_argument("--snapshot-interval", type=float, default=1.0, help="seconds between parts (default 1)")
    replay.add_argument("--keep-old", action="store_true", help="keep the replaced generation's state after the switch")
    _loglevel(replay)
    replay.set_defaults(handler=cmd_replay)

    worker = commands.add_parser("worker", parents=[common], help="run N live worker processes tailing the log")
    _pipeline_arguments(worker)
    worker.add_argument("--processes", type=int, default=1, help="worker processes on this host (default 1)")
    worker.add_argument("--snapshot-interval", type=float, default=10.0, help="seconds between snapshots (default 10)")
    _loglevel(worker)
    worker.set_defaults(handler=cmd_worker)

    process = commands.add_parser("worker-process", parents=[common])  # internal: one child of `kappa worker`
    _pipeline_arguments(process)
    process.add_argument("--generation", type=int, required=True)
    process.add_argument("--index", type=int, required=True)
    process.add_argument("--snapshot-interval", type=float, default=10.0)
    # a replay's end offsets, `PARTITION:OFFSET,...`: parts are written as soon as they are reached
    process.add_argument("--catch-up-to", type=parse_offsets, default=None)
    # the processes a replay started together (see BatchDeliveryConsumer._waiting_for_members)
    process.add_argument("--group-size", type=int, default=None)
    _loglevel(process)
    process.set_defaults(handler=cmd_worker_process)

    standby = commands.add_parser("worker-standby")  # internal: a replay's worker process before it has work
    standby.add_argument("--index", type=int, required=True)  # which process of the replay; the work says it again
    standby.add_argument("--ready-fd", type=int, required=True)
    standby.set_defaults(handler=cmd_worker_standby)

    status = commands.add_parser("status", parents=[common], help="broker, offsets, generations, lag and snapshots")
    status.add_argument("--pipeline", help="only this pipeline (default: every pipeline under --snapshot-dir)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    gc = commands.add_parser(
        "gc", parents=[common], help="delete the state of abandoned generations and finish interrupted retirements"
    )
    gc.add_argument("--pipeline", help="only this pipeline (default: every pipeline under --snapshot-dir)")
    gc.add_argument("--kept", action="store_true", help="also delete generations replaced with --keep-old")
    gc.set_defaults(handler=cmd_gc)

    drop = commands.add_parser(
        "drop", parents=[common], help="delete a pipeline: every generation's state, its snapshots and its registry"
    )
    drop.add_argument("name", help="the pipeline")
    drop.add_argument(
        "--topic",
        action="store_true",
        help="also delete the topic it reads, with <topic>.loads and <topic>.dlq; after a drop without --topic, "
        "`kappa drop TOPIC --topic` deletes the topic it kept",
    )
    drop.set_defaults(handler=cmd_drop)

    snap = commands.add_parser("snapshot", parents=[common], help="print the latest snapshot and its manifest")
    snap.add_argument("name", nargs="?", help="the pipeline (as --pipeline)")
    snap.add_argument("--pipeline", help="pipeline name (by default its topic name)")
    snap.add_argument("--format", choices=["table", "csv", "json"], default="table")
    snap.add_argument("--rows", type=int, default=20, help="rows shown by --format table (default 20)")
    snap.add_argument("--config", type=Path, help="the pipelines file that names NAME (default: ./kappa.toml)")
    snap.set_defaults(handler=cmd_snapshot)
    return parser


def _loglevel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loglevel", default="warn", choices=["debug", "info", "warn", "error", "crit"])


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", nargs="?", help="a pipeline of the pipelines file (kappa.toml); options below override it"
    )
    parser.add_argument("--config", type=Path, help="the pipelines file (default: ./kappa.toml)")
    parser.add_argument("--topic", help="the log: the source topic")
    parser.add_argument("--value", help="the row field(s) to count, sum and average: fare, or fare,tip")
    parser.add_argument(
        "--key",
        help="the row field(s) to group by: city, or city,vendor (default: the message key, for producers that "
        "send no key field)",
    )
    parser.add_argument("--window", help="also group by event-time tumbling windows: 30s, 15m, 1h, 1d")
    parser.add_argument("--time", help="with --window: the event-time field, or @timestamp for the record timestamp")
    parser.add_argument(
        "--time-unit", choices=["s", "ms"], help="epoch numbers in the time field are seconds (default) or ms"
    )
    parser.add_argument("--pipeline", help="pipeline name (default: the name from kappa.toml, else the topic)")


def main(argv: Sequence[str] | None = None) -> int:
    # No collections while a batch replay or a worker process imports its modules and wires its
    # app: they leave about 110,000 objects that live as long as the process, and each collection
    # rescanned them (35-45 ms of such a start); those commands turn the collector on right before
    # their Faust worker starts, every other command here (kappa.processes.relax_garbage_collector)
    gc.disable()
    bound_allocator_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not turns_collector_on_later(args):
        relax_garbage_collector()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KappaError as exc:
        print(f"kappa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kappa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kappa snapshot P | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


def turns_collector_on_later(args: argparse.Namespace) -> bool:
    """Whether the command turns the garbage collector on itself (see `main`): a batch replay and
    a worker process do, right before their Faust worker starts (kappa.engine.app.prepare_for_worker),
    once their imports and their app's wiring are done, or before a wait on the broker."""
    return args.command in ("worker-process", "worker-standby") or (args.command == "replay" and args.batch)


def bound_allocator_memory() -> None:
    """Keep freed memory from piling up in allocators, unless the user chose otherwise.

    A 1M-key batch replay allocates and frees hundreds of MB (batches, then the snapshot's
    slices on 3 writer threads); it peaked about 480 MB before this and the streaming
    snapshot, and 270 MB with both, no slower.

    - Arrow's buffers come from malloc: its default pool (mimalloc) keeps freed pages for
      reuse (50 MB more at the peak). Arrow reads the variable when it first allocates, so
      this runs before any kappa module builds an array.
    - glibc gives each new thread its own heap, up to 8 per core, and each keeps what it
      freed: at most 2 here (M_ARENA_MAX, as MALLOC_ARENA_MAX would set it; 20 MB less at the
      peak). Set at run time, for the threads started from now on; every kappa process sets
      it for itself."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if "MALLOC_ARENA_MAX" not in os.environ and sys.platform == "linux":
        limit_malloc_arenas(MALLOC_ARENAS)


def limit_malloc_arenas(arenas: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl has no arenas)
        return
    libc.mallopt(M_ARENA_MAX, arenas)


if __name__ == "__main__":
    sys.exit(main())
