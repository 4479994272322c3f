"""The Python framework peers, run by their own venv's interpreter (no kappa import here):

    <peer venv>/bin/python kappa/bench/peer_flows.py bytewax|pathway --broker B --topic T --out result.csv

Each is the job as that framework's users write it first, per its docs: read the topic from the
start to the end offsets it finds at start-up, sum and count the amount per row key, write the
final table as CSV (key,sum,count) for the bench's oracle check.
"""

from __future__ import annotations

import argparse
import csv
import uuid

KEY, VALUE = "key", "amount"


def write_csv(path: str, rows) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["key", "sum", "count"])
        for key, total, count in rows:
            writer.writerow([key, repr(float(total)), int(count)])


def bytewax(args: argparse.Namespace) -> None:
    """Bytewax 0.21: KafkaSource(tail=False) stops at the end offsets; fold_final emits at the end."""
    import bytewax.operators as op
    import orjson
    from bytewax.connectors.kafka import KafkaSource
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    loads = orjson.loads

    def parse(message) -> tuple[str, float]:
        row = loads(message.value)
        return str(row[KEY]), float(row[VALUE])

    def fold(total: list, amount: float) -> list:
        total[0] += amount
        total[1] += 1
        return total

    flow = Dataflow("bench")
    messages = op.input("in", flow, KafkaSource([args.broker], [args.topic], tail=False))
    totals = op.fold_final("sum", op.map("parse", messages, parse), lambda: [0.0, 0], fold)
    final: list = []
    op.output("out", totals, TestingSink(final))
    run_main(flow)
    write_csv(args.out, ((key, total[0], total[1]) for key, total in final))


def pathway(args: argparse.Namespace) -> None:
    """Pathway 0.33: kafka.read(mode="static") reads to the end offsets, then groupby().reduce()."""
    import pathway as pw

    class Row(pw.Schema):
        key: str
        amount: float

    settings = {
        "bootstrap.servers": args.broker,
        "group.id": f"bench-pathway-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": "6000",
    }
    rows = pw.io.kafka.read(settings, topic=args.topic, format="json", schema=Row, mode="static")
    totals = rows.groupby(rows.key).reduce(rows.key, sum=pw.reducers.sum(rows.amount), count=pw.reducers.count())
    frame = pw.debug.table_to_pandas(totals)
    write_csv(args.out, zip(frame["key"], frame["sum"], frame["count"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(prog="peer_flows.py")
    parser.add_argument("name", choices=("bytewax", "pathway"))
    parser.add_argument("--broker", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    {"bytewax": bytewax, "pathway": pathway}[args.name](args)


if __name__ == "__main__":
    main()
