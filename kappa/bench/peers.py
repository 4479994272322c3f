"""The peers as their users would first write them: naive Faust and Quix Streams.

Both keep per-key sum and count in RocksDB state with a changelog, as kappa does, and run
until every record is processed.
"""

from __future__ import annotations

import argparse
import os
import signal
import uuid

from kappa.bench.dataset import VALUE, write_result


def faust_naive(args: argparse.Namespace) -> None:
    """One table read and write per event: what a Faust user writes first."""
    import faust

    app = faust.App(
        f"bench-naive-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{args.broker}",
        store="rocksdb://",
        datadir=str(args.workdir),
        topic_partitions=args.partitions,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="json",
    )
    topic = app.topic(args.topic)
    table = app.Table("sums", default=None, partitions=args.partitions, key_type=bytes)
    seen = 0

    @app.agent(topic)
    async def aggregate(stream):
        nonlocal seen
        async for key, value in stream.items():
            current = table.get(key) or [0.0, 0]
            table[key] = [current[0] + float(value[VALUE]), current[1] + 1]
            seen += 1
            if seen == args.rows:
                sums = {k.decode(): v[0] for k, v in table.items()}
                counts = {k.decode(): v[1] for k, v in table.items()}
                write_result(args.out, sums, counts)
                os.kill(os.getpid(), signal.SIGTERM)

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit:
        pass


def quix(args: argparse.Namespace) -> None:
    """Quix Streams' stateful apply: sum and count in its RocksDB state, per message key."""
    from quixstreams import Application

    app = Application(
        broker_address=args.broker,
        consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        state_dir=str(args.workdir),
    )
    topic = app.topic(args.topic, value_deserializer="json", key_deserializer="str")
    final: dict[str, tuple[float, int]] = {}

    def aggregate(value: dict, key: str, timestamp: int, headers: object, state) -> None:
        total = state.get("sum", 0.0) + float(value[VALUE])
        count = state.get("count", 0) + 1
        state.set("sum", total)
        state.set("count", count)
        final[key] = (total, count)

    sdf = app.dataframe(topic)
    sdf = sdf.apply(aggregate, stateful=True, metadata=True)
    app.run(sdf, count=args.rows)
    write_result(args.out, {k: v[0] for k, v in final.items()}, {k: v[1] for k, v in final.items()})
