"""The bench's moving parts: a broker, a dataset on a topic, and contenders measured on it."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from kappa.bench.dataset import KEY, VALUE, bench_frame, check, oracle
from kappa.bench.measure import Measured, run_measured
from kappa.kafka import admin
from kappa.kafka import broker as embedded
from kappa.snapshots import snapshot

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def bench_broker(address: str | None, workdir: Path) -> Iterator[str]:
    """The given broker, or a private embedded one that is stopped afterwards."""
    if address:
        yield address
        return
    started = embedded.start(workdir / "broker", free_port())
    try:
        yield started
    finally:
        embedded.stop(workdir / "broker")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        return [
            "--broker",
            self.broker,
            "--data-dir",
            str(self.workdir / "data"),
            "--snapshot-dir",
            str(self.workdir / "snapshots"),
            *names,
        ]

    def prepare(self) -> None:
        frame = bench_frame(self.args.rows, self.args.keys)
        frame.to_csv(self.csv, index=False)
        self.expected = oracle(frame)
        print(
            f"dataset: {self.args.rows:,} rows, {self.args.keys:,} keys, {self.args.partitions} partitions "
            f"-> topic {self.topic} on {self.broker}",
            flush=True,
        )

    def record(self, name: str, measured: Measured, error: str | None) -> None:
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
        print(
            f"  {name:<12} {measured.seconds:8.2f} s  {self.args.rows / measured.seconds:>12,.0f} rows/s  "
            f"{measured.peak_rss_mb:7.0f} MB  {verdict}",
            flush=True,
        )

    def run_load(self) -> None:
        command = kappa_command(
            "load",
            str(self.csv),
            "--key",
            KEY,
            "--topic",
            self.topic,
            "--partitions",
            str(self.args.partitions),
            *self.place(),
        )
        measured = run_measured(command, self.workdir / "load.log")
        loaded = sum(admin.end_offsets(self.broker, self.topic, self.args.partitions).values())
        error = None if loaded == self.args.rows else f"{loaded} records in the topic, expected {self.args.rows}"
        self.record("load", measured, error)

    def run_kappa(self, processes: int | None = None) -> None:
        """`scripts/replay --batch`, or with `processes` a replay by that many worker processes."""
        pipeline = f"bench-kappa-{uuid.uuid4().hex[:6]}"
        mode = ["--batch"] if processes is None else ["--processes", str(processes)]
        command = [
            str(REPO / "scripts" / "replay"),
            "--topic",
            self.topic,
            "--value",
            VALUE,
            "--key",
            KEY,
            *mode,
            "--pipeline",
            pipeline,
            *self.place(),
        ]
        measured = run_measured(command, self.workdir / "kappa.log", env={**os.environ, "KAPPA_PYTHON": sys.executable})
        error = None
        if measured.returncode == 0:
            frame, _ = snapshot.read_snapshot(self.workdir / "snapshots", pipeline)
            error = check(frame, self.expected)
        self.record("kappa", measured, error)
        found = re.search(r"snapshot ([0-9.]+)s", measured.log.read_text(errors="replace"))
        if found:
            self.results["kappa"]["snapshot_seconds"] = float(found.group(1))

    def run_contender(self, name: str) -> None:
        if name == "quixstreams" and importlib.util.find_spec("quixstreams") is None:
            print(f"  {name:<12} skipped: not installed (pip install -e '.[bench]')", flush=True)
            self.results[name] = {"skipped": "quixstreams is not installed: pip install -e '.[bench]'"}
            return
        out = self.workdir / f"{name}.parquet"
        workdir = self.workdir / name
        workdir.mkdir(exist_ok=True)
        options = {
            "--broker": self.broker,
            "--topic": self.topic,
            "--rows": self.args.rows,
            "--partitions": self.args.partitions,
            "--csv": self.csv,
            "--workdir": workdir,
            "--out": out,
        }
        command = [sys.executable, "-m", "kappa.bench.contenders", name]
        command += [part for flag, value in options.items() for part in (flag, str(value))]
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
        return {
            "rows": self.args.rows,
            "keys": self.args.keys,
            "partitions": self.args.partitions,
            "contenders": self.results,
        }
