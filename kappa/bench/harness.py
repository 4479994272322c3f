"""The bench's moving parts: a broker, a dataset on a topic, and contenders measured on it."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from kappa.bench.cgroups import CpuGroups, WorkerPlacer, enter_supervisor_group
from kappa.bench.dataset import (
    KEY,
    SHAPE_KEYS,
    SHAPE_TIME,
    SHAPE_VALUES,
    SHAPE_WINDOW,
    VALUE,
    bench_frame,
    check,
    check_shape,
    oracle,
    shape_oracle,
)
from kappa.bench.measure import Measured, run_measured
from kappa.kafka import admin
from kappa.kafka import broker as embedded
from kappa.load.ledger import ledger_topic
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


EXTERNAL = ("kafka_streams", "bytewax", "pathway")  # set up by kappa.bench.external
SLOW = ("faust_naive",)  # about 2,500 rows/s: one round, and only at the first --keys
KEYLESS = ("startup",)  # reads no dataset: every round, at the first --keys only


def read_result(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"key": str})
    return pd.read_parquet(path)


def median_round(rounds: list[dict]) -> dict:
    """The round of median time (the faster of the middle two for an even count), with every round's
    seconds beside it; correct only if every round was."""
    ordered = sorted(rounds, key=lambda r: r["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds"] = len(rounds)
    chosen["seconds_each"] = [r["seconds"] for r in rounds]
    chosen["correct"] = all(r["correct"] for r in rounds)
    errors = [r["error"] for r in rounds if "error" in r]
    if errors:
        chosen["error"] = errors[0]
    return chosen


class Bench:
    """One dataset (rows x keys) on one topic, and the contenders measured on it."""

    def __init__(
        self, args: argparse.Namespace, broker: str, workdir: Path, peers: dict[str, list[str] | str] | None = None
    ) -> None:
        self.args = args
        self.broker = broker
        self.workdir = workdir
        self.peers = peers or {}  # external peer -> command prefix, or the reason it is unavailable
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

    def prepare(self, shaped: bool = False) -> None:
        frame = bench_frame(self.args.rows, self.args.keys, shaped=shaped)
        frame.to_csv(self.csv, index=False)
        self.expected = oracle(frame)
        self.expected_shape = shape_oracle(frame) if shaped else None
        print(
            f"dataset: {self.args.rows:,} rows, {self.args.keys:,} keys, {self.args.partitions} partitions "
            f"-> topic {self.topic} on {self.broker}",
            flush=True,
        )

    def outcome(self, name: str, measured: Measured, error: str | None, rows: int | None = None) -> dict:
        """One round's result of one contender, printed as it comes; `rows`: what it read, when
        not the dataset (a contender that reads none has no rows/s)."""
        if measured.returncode != 0 and error is None:
            tail = measured.log.read_text(errors="replace").strip().splitlines()[-3:]
            error = f"exited {measured.returncode}: {' | '.join(tail)}"
        rows = self.args.rows if rows is None else rows
        result: dict[str, object] = {
            "seconds": round(measured.seconds, 3),
            "peak_rss_mb": round(measured.peak_rss_mb, 1),
            "correct": error is None,
        }
        if rows:
            result["rows_per_s"] = round(rows / measured.seconds, 1)
        if error:
            result["error"] = error
        verdict = "ok" if error is None else f"WRONG: {error}"
        rate = f"{rows / measured.seconds:>12,.0f} rows/s" if rows else f"{'-':>12} rows/s"
        print(f"  {name:<13} {measured.seconds:8.2f} s  {rate}  {measured.peak_rss_mb:7.0f} MB  {verdict}",
              flush=True)  # fmt: skip
        return result

    def fill_topic(self) -> None:
        """Load the dataset into the topic every contender reads. Untimed: it is also the fresh
        broker's first heavy work (its JIT still cold), which no contender should be charged
        for; it took 3.7-4.7 s where the same load took 2.9-3.5 s in later rounds."""
        filled = self.run_load(label="(fill)")
        if not filled["correct"]:
            raise SystemExit(f"bench: the dataset did not load into {self.topic}: {filled['error']}")

    def run_load(self, topic: str | None = None, label: str = "load") -> dict:
        """`kappa load` of the dataset into the bench's topic, or into `topic`, a scratch topic
        of a round that is deleted once measured."""
        topic = topic or self.topic
        command = kappa_command("load", str(self.csv), "--key", KEY, "--topic", topic,
                                "--partitions", str(self.args.partitions), *self.place())  # fmt: skip
        try:
            measured = run_measured(command, self.workdir / "load.log")
            loaded = sum(admin.end_offsets(self.broker, topic, self.args.partitions).values())
        finally:
            if topic != self.topic:
                admin.delete_topics(self.broker, [topic, ledger_topic(topic)])
        # --rows records, or more if a load adds records of its own (transaction markers): never fewer
        error = None if loaded >= self.args.rows else f"{loaded} records in the topic, expected {self.args.rows}"
        return self.outcome(label, measured, error)

    def measure_kappa(
        self, processes: int | None = None, groups: CpuGroups | None = None, shaped: bool = False
    ) -> dict:
        """`scripts/replay --batch`; with `processes`, a replay beside live by that many worker processes,
        each in a cpu group of its own when `groups` is given; `shaped`: the composite shape (two key
        fields, two values, one-hour windows) on the same topic."""
        pipeline = f"bench-kappa-{uuid.uuid4().hex[:6]}"
        mode = ["--batch"] if processes is None else ["--processes", str(processes)]
        definition = ["--value", VALUE, "--key", KEY]
        if shaped:
            definition = ["--value", ",".join(SHAPE_VALUES), "--key", ",".join(SHAPE_KEYS),
                          "--window", SHAPE_WINDOW, "--time", SHAPE_TIME]  # fmt: skip
        label = "kappa_shape" if shaped else "kappa" if processes is None else f"kappa-{processes}p"
        hooks = {}
        if groups is not None:
            groups.placed.clear()  # pids of an earlier run may be reused
            hooks = {"preexec_fn": enter_supervisor_group(groups), "on_poll": WorkerPlacer(groups)}
        measured = self.run_replay(self.topic, pipeline, [*definition, *mode], label, **hooks)
        error = None
        if measured.returncode == 0:
            frame, _ = snapshot.read_snapshot(self.workdir / "snapshots", pipeline)
            error = check_shape(frame, self.expected_shape) if shaped else check(frame, self.expected)
        result = self.outcome(label, measured, error)
        output = measured.log.read_text(errors="replace")
        found = re.search(r"snapshot ([0-9.]+)s", output)
        if found:
            result["snapshot_seconds"] = float(found.group(1))
        found = re.search(r"applying records for ([0-9.]+)s", output)
        if found:  # a replay beside live: its processes' first record to their last (AppliedSpan)
            result["applying_seconds"] = float(found.group(1))
        return result

    def run_replay(self, topic: str, pipeline: str, options: list[str], label: str, **hooks: Any) -> Measured:
        """`scripts/replay` of `topic` into `pipeline` with `options`, logged to `<label>.log`."""
        command = [str(REPO / "scripts" / "replay"), "--topic", topic, *options, "--pipeline", pipeline,
                   *self.place()]  # fmt: skip
        env = {**os.environ, "KAPPA_PYTHON": sys.executable}
        return run_measured(command, self.workdir / f"{label}.log", env=env, **hooks)

    def measure_startup(self) -> dict:
        """`scripts/replay --batch` of an empty topic of the bench's partition count, from process
        start to exit: the imports, the preflight, the group join, an empty snapshot and the stop,
        with no record to apply. Each round is a new pipeline's first replay, on a topic made
        before it starts and deleted after."""
        pipeline = f"bench-startup-{uuid.uuid4().hex[:6]}"
        topic = f"{self.topic}-empty-{pipeline[-6:]}"  # a name per round: a topic just deleted may still be listed
        admin.ensure_topic(self.broker, topic, self.args.partitions)
        try:
            measured = self.run_replay(topic, pipeline, ["--value", VALUE, "--key", KEY, "--batch"], "startup")
        finally:
            admin.delete_topics(self.broker, [topic])
        error = None
        if measured.returncode == 0:
            frame, manifest = snapshot.read_snapshot(self.workdir / "snapshots", pipeline)
            if len(frame) or manifest["records"]["counted"]:
                error = f"{len(frame)} table rows from an empty topic"
        return self.outcome("startup", measured, error, rows=0)

    def contender_command(self, name: str, workdir: Path, out: Path) -> list[str]:
        if name == "kafka_streams":
            state = workdir / f"state-{uuid.uuid4().hex[:6]}"
            return [*self.peers[name], "--broker", self.broker, "--topic", self.topic, "--rows", str(self.args.rows),
                    "--value", VALUE, "--state-dir", str(state), "--out", str(out)]  # fmt: skip
        if name in EXTERNAL:
            return [*self.peers[name], "--broker", self.broker, "--topic", self.topic, "--out", str(out)]
        return [sys.executable, "-m", "kappa.bench.contenders", name, "--broker", self.broker, "--topic",
                self.topic, "--rows", str(self.args.rows), "--partitions", str(self.args.partitions),
                "--csv", str(self.csv), "--workdir", str(workdir), "--out", str(out)]  # fmt: skip

    def unavailable(self, name: str) -> str | None:
        if name == "quixstreams" and importlib.util.find_spec("quixstreams") is None:
            return "quixstreams is not installed: pip install -e '.[bench]'"
        found = self.peers.get(name)
        if name in EXTERNAL and not isinstance(found, list):
            return found or "not set up"
        return None

    def measure_contender(self, name: str) -> dict:
        out = self.workdir / f"{name}.{'csv' if name in EXTERNAL else 'parquet'}"
        out.unlink(missing_ok=True)
        workdir = self.workdir / name
        workdir.mkdir(exist_ok=True)
        measured = run_measured(self.contender_command(name, workdir, out), self.workdir / f"{name}.log")
        shutil.rmtree(workdir, ignore_errors=True)  # state of RocksDB peers: a round leaves no disk behind
        error = None
        if measured.returncode == 0:
            error = check(read_result(out), self.expected) if out.exists() else "wrote no result"
        return self.outcome(name, measured, error)

    def run(self, names: list[str], rounds: int = 1, first: bool = True) -> dict:
        """Every contender once a round, rounds interleaved; each reported by its median round."""
        self.prepare(shaped="kappa_shape" in names)
        per_round: dict[str, list[dict]] = {name: [] for name in names}
        for name in names:
            reason = self.unavailable(name)
            if reason:
                print(f"  {name:<13} unavailable: {reason}", flush=True)
                self.results[name] = {"unavailable": reason}
            elif name in SLOW and not first:
                self.results[name] = {"skipped": "slow (one event at a time): measured at the first --keys only"}
            elif name in KEYLESS and not first:
                self.results[name] = {"skipped": "reads no dataset: measured at the first --keys only"}
        self.fill_topic()
        for round_number in range(rounds):
            if rounds > 1:
                print(f" round {round_number + 1} of {rounds}", flush=True)
            for name in names:
                if name in self.results or (name in SLOW and round_number > 0):
                    continue
                if name == "load":
                    per_round[name].append(self.run_load(f"{self.topic}-load{round_number}"))
                elif name in ("kappa", "kappa_shape"):
                    per_round[name].append(self.measure_kappa(shaped=name == "kappa_shape"))
                elif name == "startup":
                    per_round[name].append(self.measure_startup())
                else:
                    per_round[name].append(self.measure_contender(name))
        ordered = {}
        for name in names:
            ordered[name] = self.results[name] if name in self.results else median_round(per_round[name])
        self.results = ordered
        return {"rows": self.args.rows, "keys": self.args.keys, "partitions": self.args.partitions,
                "contenders": self.results}  # fmt: skip
