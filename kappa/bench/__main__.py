"""`scripts/bench`: generate, load, then time every contender on the same topic in one run."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from kappa import admin, snapshot
from kappa import broker as embedded
from kappa.bench.dataset import KEY, VALUE, bench_frame, check, oracle
from kappa.bench.measure import run_measured

REPO = Path(__file__).resolve().parents[2]
CONTENDERS = ("load", "raw", "kappa", "faust_naive", "quixstreams", "pandas")
TARGETS = (  # (contender, against, minimum ratio of rows/s), from issue 6
    ("kappa", "raw", 0.3),
    ("kappa", "faust_naive", 5.0),
    ("kappa", "quixstreams", 1.5),
)
LOAD_TARGET_ROWS_S = 150_000


@contextlib.contextmanager
def bench_broker(address: str | None, workdir: Path) -> Iterator[str]:
    """The given broker, or a private embedded one that is stopped afterwards."""
    if address:
        yield address
        return
    with socketless_port() as port:
        started = embedded.start(workdir / "broker", port)
    try:
        yield started
    finally:
        embedded.stop(workdir / "broker")


@contextlib.contextmanager
def socketless_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


def kappa_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kappa", *args]


class Bench:
    def __init__(self, args: argparse.Namespace, broker: str, workdir: Path) -> None:
        self.args = args
        self.broker = broker
        self.workdir = workdir
        self.topic = f"bench-{uuid.uuid4().hex[:8]}"
        self.csv = workdir / "rows.csv"
        self.results: dict[str, dict] = {}
        self.expected = pd.DataFrame()

    def place(self, *names: str) -> list[str]:
        return ["--broker", self.broker, "--data-dir", str(self.workdir / "data"), "--snapshot-dir",
                str(self.workdir / "snapshots"), *names]  # fmt: skip

    def prepare(self) -> None:
        frame = bench_frame(self.args.rows, self.args.keys)
        frame.to_csv(self.csv, index=False)
        self.expected = oracle(frame)
        print(f"dataset: {self.args.rows:,} rows, {self.args.keys:,} keys, {self.args.partitions} partitions "
              f"-> topic {self.topic} on {self.broker}", flush=True)  # fmt: skip

    def record(self, name: str, measured, error: str | None) -> None:
        if measured.returncode != 0 and error is None:
            tail = measured.log.read_text(errors="replace").strip().splitlines()[-3:]
            error = f"exited {measured.returncode}: {' | '.join(tail)}"
        self.results[name] = {
            "rows_per_s": round(self.args.rows / measured.seconds, 1),
            "seconds": round(measured.seconds, 3),
            "peak_rss_mb": round(measured.peak_rss_mb, 1),
            "correct": error is None,
        }
        if error:
            self.results[name]["error"] = error
        verdict = "ok" if error is None else f"WRONG: {error}"
        print(f"  {name:<12} {measured.seconds:8.2f} s  {self.args.rows / measured.seconds:>12,.0f} rows/s  "
              f"{measured.peak_rss_mb:7.0f} MB  {verdict}", flush=True)  # fmt: skip

    def run_load(self) -> None:
        command = kappa_command("load", str(self.csv), "--key", KEY, "--topic", self.topic,
                                "--partitions", str(self.args.partitions), *self.place())  # fmt: skip
        measured = run_measured(command, self.workdir / "load.log")
        loaded = sum(admin.end_offsets(self.broker, self.topic, self.args.partitions).values())
        error = None if loaded == self.args.rows else f"{loaded} records in the topic, expected {self.args.rows}"
        self.record("load", measured, error)

    def run_kappa(self) -> None:
        pipeline = f"bench-kappa-{uuid.uuid4().hex[:6]}"
        command = [str(REPO / "scripts" / "replay"), "--topic", self.topic, "--value", VALUE, "--key", KEY,
                   "--batch", "--pipeline", pipeline, *self.place()]  # fmt: skip
        measured = run_measured(command, self.workdir / "kappa.log", env={**os.environ, "KAPPA_PYTHON": sys.executable})
        error = None
        if measured.returncode == 0:
            frame, _ = snapshot.read_snapshot(self.workdir / "snapshots", pipeline)
            error = check(frame, self.expected)
        self.record("kappa", measured, error)

    def run_contender(self, name: str) -> None:
        if name == "quixstreams" and importlib.util.find_spec("quixstreams") is None:
            print(f"  {name:<12} skipped: not installed (pip install -e '.[bench]')", flush=True)
            self.results[name] = {"skipped": "quixstreams is not installed: pip install -e '.[bench]'"}
            return
        out = self.workdir / f"{name}.parquet"
        workdir = self.workdir / name
        workdir.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "kappa.bench.contenders", name, "--broker", self.broker, "--topic",
                   self.topic, "--rows", str(self.args.rows), "--partitions", str(self.args.partitions),
                   "--csv", str(self.csv), "--workdir", str(workdir), "--out", str(out)]  # fmt: skip
        measured = run_measured(command, self.workdir / f"{name}.log")
        error = None
        if measured.returncode == 0:
            error = check(pd.read_parquet(out), self.expected) if out.exists() else "wrote no result"
        self.record(name, measured, error)

    def run(self, names: list[str]) -> dict:
        self.prepare()
        self.run_load()
        for name in names:
            if name == "load":
                continue
            if name == "kappa":
                self.run_kappa()
            else:
                self.run_contender(name)
        return {"rows": self.args.rows, "keys": self.args.keys, "partitions": self.args.partitions,
                "contenders": self.results}  # fmt: skip


def report(outcome: dict) -> list[str]:
    """The table with ratios to `raw`, and each target as met or missed."""
    contenders = outcome["contenders"]
    raw_rate = contenders.get("raw", {}).get("rows_per_s")
    lines = [f"{'contender':<12} {'rows/s':>12} {'x raw':>7} {'seconds':>9} {'peak MB':>8}  correct"]
    for name, result in contenders.items():
        if "skipped" in result:
            lines.append(f"{name:<12} skipped: {result['skipped']}")
            continue
        ratio = result["rows_per_s"] / raw_rate if raw_rate else float("nan")
        result["ratio_to_raw"] = round(ratio, 3)
        lines.append(f"{name:<12} {result['rows_per_s']:>12,.0f} {ratio:>7.3f} {result['seconds']:>9.2f} "
                     f"{result['peak_rss_mb']:>8.0f}  {result['correct']}")  # fmt: skip
    for name, against, minimum in TARGETS:
        mine, theirs = contenders.get(name, {}), contenders.get(against, {})
        if "rows_per_s" in mine and "rows_per_s" in theirs:
            ratio = mine["rows_per_s"] / theirs["rows_per_s"]
            verdict = "met" if ratio >= minimum else "MISSED"
            lines.append(f"target {name} >= {minimum}x {against}: {ratio:.2f}x {verdict}")
    if "rows_per_s" in contenders.get("load", {}):
        rate = contenders["load"]["rows_per_s"]
        lines.append(f"target load >= {LOAD_TARGET_ROWS_S:,} rows/s: {rate:,.0f} "
                     f"{'met' if rate >= LOAD_TARGET_ROWS_S else 'MISSED'}")  # fmt: skip
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--broker", help="an existing broker (default: start a private embedded one)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list from {','.join(CONTENDERS)}")
    parser.add_argument("--workdir", type=Path, help="keep the dataset, logs and state here (default: a temp dir)")
    args = parser.parse_args(argv)
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {','.join(CONTENDERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so the running contender and the private broker are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kappa-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        broker = stack.enter_context(bench_broker(args.broker, workdir))
        outcome = Bench(args, broker, workdir).run(args.contenders.split(","))
    lines = report(outcome)
    print("\n".join(lines))
    args.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"wrote {args.out}")
    wrong = [name for name, result in outcome["contenders"].items() if result.get("correct") is False]
    if wrong:
        print(f"bench: wrong results from {', '.join(wrong)}: their timings are void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
