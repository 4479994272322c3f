#!/usr/bin/env python3
"""A drill for F1: a live table loses records after worker processes are paused (helper-31, 2026-12-07).

Run from a kappa checkout, with its venv (it imports kappa, confluent_kafka and pyarrow):

    .venv/bin/python scripts/drill_pauses.py                       # its own broker on 39092, 5 pause rounds
    .venv/bin/python scripts/drill_pauses.py --port 39192 --rounds 3 --seed 7 --keep
    .venv/bin/python scripts/drill_pauses.py --broker 127.0.0.1:39092   # an already running broker (left running)

What it does (defaults; about 7.5 min a run, 12.5 min when the live pipeline never reaches lag 0):
  1. starts an embedded broker (`kappa kafka start`) unless --broker is given;
  2. loads a first chunk into a fresh topic (8 partitions), JSON rows {"g": key, "v": value, "seq": n, "run": id},
     key g one of --keys values (k00..k59) plus "" with skewed (Zipf) frequencies;
  3. starts `kappa worker --processes 2 --snapshot-interval 2 --loglevel info` (log: <workdir>/worker.log);
  4. a producer thread appends --rate (3,000) rows/s: by default a steady confluent-kafka stream
     (--producer load: `kappa load -` of a chunk each --chunk-s, which never reproduced F1);
  5. after --warmup (300 s: the changelog must outgrow Faust's 65,536-record changelog queue, or a
     takeover's restore ends before the paused process is back), --rounds (5) rounds: SIGSTOP a worker
     child (`ps --ppid`; never the same one twice in a row unless --random-victim) for a random
     --pause-min..--pause-max (14-23 s), SIGCONT, wait --settle (12 s). With --cont-on-restore S
     (default 1) the SIGCONT comes S seconds after the other process starts restoring the paused one's
     partitions (about 11 s into the pause): it rejoins while that restore runs, F1's window.
     --cont-on-restore 0 keeps the drawn pause (reproduced 1 run in 2 with --warmup 240);
  6. stops the producer, waits (up to --drain-timeout) until the latest live snapshot covers the
     log's end offsets (lag 0), and saves `kappa status`;
  7. reads the latest live snapshot and the newest part of each partition, stops the worker, runs a fresh
     `kappa replay --batch` of the topic as pipeline <topic>-batch, and reads the topic itself (oracle);
  8. compares per group (count, exact sum) live vs batch and live vs the log at the live snapshot's
     own cut, and per partition each newest part's groups vs the log up to its offset; then sums up the
     worker log (restores a rebalance overtook, kappa's warnings and errors).

Last line printed: `LOSS n records in m groups (partitions ...)`, `EXACT`, `STUCK (live never reached
lag 0 ...); at its own cut: ...` (kappa now withholds a partition whose groups disagree with its
counts), or `MISMATCH ...` / `ERROR ...`. Exit code 0 for EXACT, 1 otherwise, 2 for an error.
Every child runs in its own process group; all are killed at exit (normal, exception, SIGINT/SIGTERM/
SIGHUP; a SIGSTOPped child gets SIGCONT first). The broker this script started is stopped. The work
dir is removed on EXACT (--keep-logs keeps its logs) and kept, without the broker's data, otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable

CHILDREN: list[subprocess.Popen] = []  # every process we started, each leader of its own process group
STOPPED: set[int] = set()  # pids we SIGSTOPped and not yet SIGCONTed
LOCK = threading.Lock()
EVENTS: list[str] = []
T0 = time.monotonic()


def git_head() -> str:
    run = subprocess.run(["git", "-C", str(HERE), "log", "--oneline", "-1"], capture_output=True, text=True)
    return run.stdout.strip()


def now() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]


def say(message: str) -> None:
    line = f"[{now()} +{time.monotonic() - T0:6.1f}s] {message}"
    EVENTS.append(line)
    print(line, flush=True)


def spawn(argv: list[str], **kw) -> subprocess.Popen:
    """Start a child as leader of a new process group (start_new_session)."""
    proc = subprocess.Popen(argv, start_new_session=True, **kw)
    with LOCK:
        CHILDREN.append(proc)
    return proc


def run(argv: list[str], timeout: float, input: bytes | None = None) -> subprocess.CompletedProcess:
    stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
    proc = spawn(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        tail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"timed out after {timeout}s: {' '.join(argv)}\n{tail}") from None
    with LOCK:  # finished; what it left running on purpose (the broker) is stopped by its own command
        CHILDREN.remove(proc)
    return subprocess.CompletedProcess(
        argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, then SIGKILL, the whole group."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cleanup_children() -> None:
    for pid in list(STOPPED):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        STOPPED.discard(pid)
    with LOCK:
        procs = list(CHILDREN)
    for proc in reversed(procs):  # the worker last-started first: it publishes a final snapshot
        kill_group(proc)


def kappa(*args: str) -> list[str]:
    return [PY, "-m", "kappa", *args]


# ---------------------------------------------------------------- data


class Rows:
    """Rows {"g": key, "v": value, "seq": n}: key "" or k00..k{n-1}, Zipf-weighted."""

    def __init__(self, keys: int, skew: float, seed: int, run_id: str):
        self.keys = [""] + [f"k{i:02d}" for i in range(keys)]
        rng = random.Random(seed)
        order = self.keys[:]
        rng.shuffle(order)  # which key is frequent is random; "" among them
        self.order = order
        self.weights = [1.0 / (rank + 1) ** skew for rank in range(len(order))]
        self.rng = random.Random(seed + 1)
        self.seq = 0
        self.run_id = run_id

    def chunk(self, n: int) -> list[bytes]:
        keys = self.rng.choices(self.order, self.weights, k=n)
        out = []
        for key in keys:
            value = round(self.rng.uniform(0, 1000), 3)
            out.append(json.dumps({"g": key, "v": value, "seq": self.seq, "run": self.run_id}).encode())
            self.seq += 1
        return out


class Producer(threading.Thread):
    def __init__(self, args, common: list[str], rows: Rows, workdir: Path):
        super().__init__(daemon=True)
        self.args, self.common, self.rows, self.workdir = args, common, rows, workdir
        self.halt = threading.Event()
        self.sent = 0
        self.error: str | None = None
        self.loads = 0

    def run(self) -> None:
        try:
            if self.args.producer == "kafka":
                self._run_kafka()
            else:
                self._run_load()
        except Exception as exc:  # reported by the main thread
            self.error = f"{type(exc).__name__}: {exc}"

    def _due(self, start: float) -> int:
        return int(self.args.rate * (time.monotonic() - start)) - self.sent

    def _run_load(self) -> None:
        start = time.monotonic()
        log = open(self.workdir / "producer.log", "a")
        while not self.halt.is_set():
            due = self._due(start)
            if due <= 0:
                self.halt.wait(0.05)
                continue
            due = min(due, int(self.args.rate * 5))  # never one huge catch-up chunk
            data = b"\n".join(self.rows.chunk(due)) + b"\n"
            proc = spawn(
                kappa("load", "-", "--key", "g", "--topic", self.args.topic_name, *self.common),
                stdin=subprocess.PIPE, stdout=log, stderr=log,
            )  # fmt: skip
            proc.communicate(data, timeout=180)
            with LOCK:
                CHILDREN.remove(proc)
            if proc.returncode != 0:
                raise RuntimeError(f"kappa load exited {proc.returncode} (see producer.log)")
            self.sent += due
            self.loads += 1
            self.halt.wait(max(0.0, self.args.chunk_s - 0.0))

    def _run_kafka(self) -> None:
        from confluent_kafka import Producer as KProducer

        producer = KProducer(
            {"bootstrap.servers": self.args.broker_addr, "enable.idempotence": True, "acks": "all",
             "linger.ms": 20, "compression.type": "lz4"}
        )  # fmt: skip
        start = time.monotonic()
        while not self.halt.is_set():
            due = self._due(start)
            if due <= 0:
                self.halt.wait(0.02)
                continue
            for row in self.rows.chunk(due):
                key = json.loads(row)["g"].encode()
                while True:
                    try:
                        producer.produce(self.args.topic_name, row, key=key)
                        break
                    except BufferError:
                        producer.poll(0.1)
            producer.poll(0)
            self.sent += due
        left = producer.flush(120)
        if left:
            raise RuntimeError(f"{left} messages not delivered")


# ---------------------------------------------------------------- kafka reads


def watermarks(broker: str, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker, "group.id": "repro-f1-wm", "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=15)
        parts = sorted(meta.topics[topic].partitions)
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in parts}
    finally:
        consumer.close()


def oracle(broker: str, topic: str, ends: dict[int, int]):
    """Per partition, its records (offset, key, value) in offset order, read straight from the topic
    up to `ends`."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": broker, "group.id": "repro-f1-oracle", "enable.auto.commit": False,
         "auto.offset.reset": "earliest", "enable.partition.eof": True}
    )  # fmt: skip
    per_part: dict[int, list] = {p: [] for p in ends}
    todo = {p for p, end in ends.items() if end > 0}
    consumer.assign([TopicPartition(topic, p, 0) for p in todo])
    deadline = time.monotonic() + 300
    try:
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(10000, 1.0):
                p = msg.partition()
                if msg.error():
                    continue
                if msg.offset() >= ends[p]:
                    todo.discard(p)
                    continue
                row = json.loads(msg.value())
                per_part[p].append((msg.offset(), row["g"], row["v"]))
                if msg.offset() + 1 >= ends[p]:
                    todo.discard(p)
        if todo:
            raise RuntimeError(f"oracle did not reach the end of partitions {sorted(todo)}")
    finally:
        consumer.close()
    return per_part


def aggregate(per_part: dict[int, list], cuts: dict[int, int], only: int | None = None) -> dict[str, tuple[int, float]]:
    """key -> (count, exact sum) over each partition's records before its cut."""
    values: dict[str, list] = defaultdict(list)
    for p, rows in per_part.items():
        if only is not None and p != only:
            continue
        cut = cuts.get(p, 0)
        for offset, key, value in rows:
            if offset >= cut:
                break
            values[key].append(value)
    return {k: (len(v), math.fsum(v)) for k, v in values.items()}


def differences(found: dict, expected: dict) -> tuple[dict, dict, dict]:
    """(short, over, sum_diff) of `found` against `expected`, per key."""
    short, over, sum_diff = {}, {}, {}
    for key in sorted(set(found) | set(expected)):
        ec, es = expected.get(key, (0, 0.0))
        fc, fs = found.get(key, (0, 0.0))
        if fc < ec:
            short[key] = (ec - fc, ec)
        elif fc > ec:
            over[key] = (fc - ec, ec)
        elif not math.isclose(fs, es, rel_tol=1e-9, abs_tol=1e-6):
            sum_diff[key] = (fs, es)
    return short, over, sum_diff


# ---------------------------------------------------------------- snapshot reads


def read_latest(snapshot_dir: Path, pipeline: str):
    import kappa as kp

    frame, manifest = kp.read_snapshot(snapshot_dir, pipeline)
    table = {}
    for row in frame.itertuples(index=False):
        table[str(row.key)] = (int(row.count), float(row.sum))
    return table, manifest


def latest_manifest(snapshot_dir: Path, pipeline: str) -> dict | None:
    path = snapshot_dir / pipeline / "latest" / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None


def read_parts(snapshot_dir: Path, pipeline: str, generation: int):
    """partition -> (next_offset, meta records, {key: (count, sum)}) from the newest part."""
    import pyarrow.parquet as pq

    from kappa.snapshots.parts import newest_parts, parts_dir

    found = {}
    for partition, (offset, path) in newest_parts(parts_dir(snapshot_dir, pipeline, generation)).items():
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            continue
        meta = json.loads(table.schema.metadata[b"kappa"])
        cols = table.to_pydict()
        groups = {}
        keycol = "key" if "key" in cols else next(iter(cols))
        countcol = next((c for c in cols if c.endswith("count")), None)
        sumcol = next((c for c in cols if c.endswith("sum") or c == "total" or c.startswith("sum")), None)
        for i, key in enumerate(cols[keycol]):
            key = key.decode() if isinstance(key, bytes) else str(key)
            groups[key] = (
                int(cols[countcol][i]) if countcol else None,
                float(cols[sumcol][i]) if sumcol and cols[sumcol][i] is not None else None,
            )
        found[partition] = (offset, meta, groups, table.schema.names)
    return found


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--port", type=int, default=39092, help="port of the broker this script starts (default 39092)")
    ap.add_argument("--broker", help="use this running broker instead of starting one (it is left running)")
    ap.add_argument("--workdir", help="default: /tmp/repro-f1-<time>")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, snapshots, state) in any case")
    ap.add_argument("--keep-logs", action="store_true", help="on EXACT, keep the logs and manifests (not the state)")
    ap.add_argument("--no-keep-on-loss", dest="keep_on_loss", action="store_false",
                    help="remove the work dir even when records were lost")  # fmt: skip
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--keys", type=int, default=60, help='distinct key values besides "" (default 60)')
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the key frequencies (0: uniform)")
    ap.add_argument("--rate", type=float, default=3000.0, help="rows/s the producer appends")
    ap.add_argument("--producer", choices=["load", "kafka"], default="kafka",
                    help="kafka (default): confluent-kafka, a steady stream; load: `kappa load -` of a chunk each "
                         "--chunk-s (bursty: few, large deliveries, a small changelog; "
                         "did not reproduce F1)")  # fmt: skip
    ap.add_argument("--chunk-s", type=float, default=1.0)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--snapshot-interval", type=float, default=2)
    ap.add_argument("--loglevel", default="info", choices=["debug", "info", "warn", "error", "crit"])
    ap.add_argument("--warmup", type=float, default=300.0,
                    help="seconds of producing before the first pause (default 300: the changelog must hold more "
                         "than Faust's 65,536-record changelog queue for a takeover's restore to last past the "
                         "paused process's return)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pause-min", type=float, default=14.0)
    ap.add_argument("--pause-max", type=float, default=23.0)
    ap.add_argument("--settle", type=float, default=12.0, help="seconds to wait after each SIGCONT")
    ap.add_argument("--stop-busy", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for the victim to be running (state R) before SIGSTOP "
                         "(default 0: any moment)")  # fmt: skip
    ap.add_argument("--random-victim", dest="alternate", action="store_false",
                    help="pick each round's child at random; by default the same child is never paused twice in a row "
                         "(each takeover then restores a long stretch of changelog)")  # fmt: skip
    ap.add_argument("--cont-on-restore", type=float, default=1.0, metavar="S",
                    help="SIGCONT the paused child S seconds after another process starts restoring its partitions "
                         "from the changelog (at most the drawn pause): it rejoins while that restore runs, which is "
                         "F1's window (default 1; 0: off, each pause lasts as drawn)")  # fmt: skip
    ap.add_argument("--drain-timeout", type=float, default=300.0, help="seconds to wait for lag 0")
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    workdir = Path(args.workdir or f"/tmp/repro-f1-{stamp}")
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, snap_dir, kafka_dir = workdir / "data", workdir / "snapshots", workdir / "kafka"
    args.topic_name = topic = f"f1-{stamp}"
    live, batch = topic, f"{topic}-batch"
    started_broker = args.broker is None
    args.broker_addr = broker = args.broker or f"127.0.0.1:{args.port}"
    common = ["--broker", broker, "--data-dir", str(data_dir), "--snapshot-dir", str(snap_dir)]
    rng = random.Random(seed)
    say(f"seed {seed}, workdir {workdir}, topic {topic}, broker {broker}, code {HERE} ({git_head()})")

    def on_signal(signum, _frame):
        raise SystemExit(f"interrupted by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    verdict, code, lost_any = "ERROR (unfinished)", 2, False
    producer = worker = None
    try:
        if started_broker:
            r = run(kappa("kafka", "start", "--port", str(args.port), "--data-dir", str(kafka_dir)), 180)
            if r.returncode != 0:
                raise RuntimeError(f"broker start failed: {r.stderr.strip()[-500:]}")
            say(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "broker started")

        rows = Rows(args.keys, args.skew, seed, stamp)
        first = b"\n".join(rows.chunk(int(args.rate))) + b"\n"
        r = run(kappa("load", "-", "--key", "g", "--topic", topic, "--partitions", str(args.partitions), *common),
                120, input=first)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"first load failed: {r.stderr.strip()[-500:]}")
        first_rows = rows.seq
        say(f"topic {topic} made with {args.partitions} partitions and {first_rows} rows")

        worker_log = open(workdir / "worker.log", "w")
        worker = spawn(
            kappa("worker", "--topic", topic, "--value", "v", "--key", "g", "--processes", str(args.processes),
                  "--snapshot-interval", str(args.snapshot_interval), "--loglevel", args.loglevel, *common),
            stdout=worker_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        say(f"worker supervisor pid {worker.pid} (log {workdir / 'worker.log'})")
        deadline = time.monotonic() + 120
        while latest_manifest(snap_dir, live) is None:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited {worker.returncode} before its first snapshot")
            if time.monotonic() > deadline:
                raise RuntimeError("no live snapshot within 120 s")
            time.sleep(0.5)
        say(f"first live snapshot; children {children_of(worker.pid)}")

        producer = Producer(args, common, rows, workdir)
        producer.start()
        say(f"producer started ({args.producer}, {args.rate:g} rows/s)")
        time.sleep(args.warmup)

        last_victim = None
        for round_no in range(1, args.rounds + 1):
            check_alive(worker, producer)
            kids = children_of(worker.pid)
            if not kids:
                raise RuntimeError("the worker has no child processes")
            if args.alternate and last_victim in kids and len(kids) > 1:
                victim = rng.choice([k for k in kids if k != last_victim])
            else:
                victim = rng.choice(kids)
            last_victim = victim
            pause = rng.uniform(args.pause_min, args.pause_max)
            if args.stop_busy:
                wait_until_running(victim, args.stop_busy)
            state = proc_state(victim)
            log_from = (workdir / "worker.log").stat().st_size
            os.kill(victim, signal.SIGSTOP)
            STOPPED.add(victim)
            say(
                f"round {round_no}: SIGSTOP child {victim} (of {kids}) for {pause:.1f}s (it was {state}); "
                f"produced {first_rows + producer.sent}"
            )
            if args.cont_on_restore:
                waited = wait_for_restore(workdir / "worker.log", log_from, victim, pause, args.cont_on_restore)
                say(f"round {round_no}: {waited}")
            else:
                time.sleep(pause)
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                say(f"round {round_no}: child {victim} is gone")
            STOPPED.discard(victim)
            say(f"round {round_no}: SIGCONT child {victim}; children now {children_of(worker.pid)}")
            time.sleep(args.settle)

        producer.halt.set()
        producer.join(200)
        if producer.is_alive():
            raise RuntimeError("producer did not stop")
        if producer.error:
            raise RuntimeError(f"producer failed: {producer.error}")
        total_sent = first_rows + producer.sent
        ends = watermarks(broker, topic)
        say(
            f"producer stopped: {total_sent} rows sent ({producer.loads} loads); "
            f"end offsets sum {sum(ends.values())} {ends}"
        )

        deadline = time.monotonic() + args.drain_timeout
        manifest = None
        while time.monotonic() < deadline:
            check_alive(worker, None)
            manifest = latest_manifest(snap_dir, live)
            offsets = {int(p): o for p, o in (manifest or {}).get("offsets", {}).items()}
            if manifest and all(offsets.get(p, 0) >= e for p, e in ends.items()):
                break
            time.sleep(1)
        status = run(kappa("status", *common), 60)
        (workdir / "status.txt").write_text(status.stdout + status.stderr)
        lag_line = next((line for line in status.stdout.splitlines() if "lag" in line.lower()), "")
        offsets = {int(p): o for p, o in (manifest or {}).get("offsets", {}).items()}
        behind = {p: e - offsets.get(p, 0) for p, e in ends.items() if offsets.get(p, 0) < e}
        if behind:
            say(f"live pipeline did NOT reach lag 0 within {args.drain_timeout:.0f}s: behind {behind}")
        else:
            say(f"live pipeline at lag 0 (kappa status: {lag_line.strip()})")
        time.sleep(args.snapshot_interval + 1)  # let any part written at the same cut settle

        live_table, live_manifest = read_latest(snap_dir, live)
        generation = int(live_manifest["generation"])
        parts = read_parts(snap_dir, live, generation)
        (workdir / "live-manifest.json").write_text(json.dumps(live_manifest, indent=1))
        say(f"live snapshot {os.readlink(snap_dir / live / 'latest')}: counted {live_manifest.get('records')}")

        kill_group(worker, grace=30)  # clean stop: final snapshot, then the batch replay has the CPU
        say(f"worker stopped (exit {worker.returncode})")

        t = time.monotonic()
        r = run(
            kappa("replay", "--topic", topic, "--value", "v", "--key", "g", "--batch", "--pipeline", batch, *common),
            600,
        )
        (workdir / "batch.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"batch replay exited {r.returncode}: {r.stderr.strip()[-500:]}")
        batch_table, batch_manifest = read_latest(snap_dir, batch)
        say(f"batch replay took {time.monotonic() - t:.1f}s: counted {batch_manifest.get('records')}")

        per_part = oracle(broker, topic, ends)
        truth_table = aggregate(per_part, ends)
        live_cut = {int(p): o for p, o in live_manifest.get("offsets", {}).items()}
        truth_at_live_cut = aggregate(per_part, live_cut)

        # ---- live vs batch (the brief's check), and live vs the log at the live snapshot's own cut
        lost_vs_batch, _, _ = differences(live_table, batch_table)
        lost, extra, sum_diff = differences(live_table, truth_at_live_cut)
        b_short, b_over, b_sum = differences(batch_table, truth_table)
        batch_vs_truth = set(b_short) | set(b_over) | set(b_sum)
        same_cut = live_cut == {int(p): o for p, o in batch_manifest.get("offsets", {}).items()}
        say(f"oracle (topic read directly): {sum(len(r) for r in per_part.values())} records; batch "
            f"{'EXACT' if not batch_vs_truth else f'differs in {len(batch_vs_truth)} groups'} vs oracle; "
            f"live and batch cuts {'equal' if same_cut else 'DIFFER'}")  # fmt: skip
        if not same_cut:
            say(f"  live offsets  {live_manifest.get('offsets')}\n  batch offsets {batch_manifest.get('offsets')}")
            say(f"  live short of batch: {sum(m for m, _ in lost_vs_batch.values())} records in {len(lost_vs_batch)} "
                "groups (lag included); below, the live snapshot against the log at its own cut")  # fmt: skip

        if lost:
            say("missing records per group (live snapshot short of the log at its cut): key: missing / expected count")
            for key, (miss, bc) in sorted(lost.items(), key=lambda kv: -kv[1][0]):
                say(f"  {key!r:8}: {miss} / {bc}")
        if extra:
            say(
                "EXTRA records per group (live above the log): "
                + ", ".join(f"{k!r}: +{d}" for k, (d, _) in extra.items())
            )
        if sum_diff:
            say(
                "sum differs with equal count: " + ", ".join(f"{k!r}: {a!r} vs {b!r}" for k, (a, b) in sum_diff.items())
            )

        # ---- per partition: the live manifest's offsets, the newest parts, the oracle at each part's offset
        say("per partition: end offset | live cut | newest part's next_offset | its counted+skipped+rejected | "
            "its groups' count sum | log records before that offset | missing (log - part groups)")  # fmt: skip
        part_loss = {}
        for p in sorted(ends):
            if p in parts:
                offset, meta, groups, names = parts[p]
                rec = meta.get("records", {})
                accounted = rec.get("counted", 0) + rec.get("skipped", 0) + rec.get("rejected", 0)
                gcount = sum(c or 0 for c, _ in groups.values())
                expected = aggregate(per_part, {p: offset}, only=p)
                in_log = sum(c for c, _ in expected.values())
                missing = in_log - gcount
                keys_short = {k: c - groups.get(k, (0, 0))[0] for k, (c, _) in expected.items()
                              if c != groups.get(k, (0, 0))[0]}  # fmt: skip
            else:
                offset, accounted, gcount, in_log, missing, keys_short = None, None, None, None, None, {}
            if missing:
                part_loss[p] = (missing, keys_short)
            say(f"  p{p}: {ends[p]} | {live_cut.get(p)} | {offset} | {accounted} | {gcount} | {in_log} | {missing}"
                + (f"  groups short: {keys_short}" if keys_short else ""))  # fmt: skip

        summarize_log(workdir / "worker.log")
        n_lost = sum(m for m, _ in lost.values())
        if lost:
            verdict, code = f"LOSS {n_lost} records in {len(lost)} groups", 1
            if part_loss:
                verdict += " (partitions " + ", ".join(f"p{p}: {m}" for p, (m, _) in sorted(part_loss.items())) + ")"
            lost_any = True
        elif extra or sum_diff:
            verdict, code = f"MISMATCH {len(extra)} groups over, {len(sum_diff)} groups with another sum", 1
            lost_any = True
        else:
            verdict, code = "EXACT", 0
        if behind:
            stuck = f"live never reached lag 0: {sum(behind.values())} records behind in " + ", ".join(
                f"p{p}: {n}" for p, n in sorted(behind.items())
            )
            verdict = f"STUCK ({stuck}); at its own cut: {verdict}"
            code, lost_any = 1, True
        if batch_vs_truth:
            verdict += f" [batch itself differs from the topic in {len(batch_vs_truth)} groups]"
    except BaseException as exc:  # noqa: BLE001 - report anything, then clean up
        verdict, code = f"ERROR {type(exc).__name__}: {exc}", 2
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()
    finally:
        if producer is not None:
            producer.halt.set()
        cleanup_children()
        if producer is not None:
            producer.join(30)
            cleanup_children()  # a load it started while we were cleaning
        if started_broker:
            r = subprocess.run(
                kappa("kafka", "stop", "--data-dir", str(kafka_dir)), capture_output=True, text=True, timeout=120
            )
            say(f"broker stopped: {(r.stdout + r.stderr).strip().splitlines()[-1:]}")
        (workdir / "events.txt").write_text("\n".join(EVENTS) + "\n")
        if args.keep or (lost_any and args.keep_on_loss) or code == 2:
            # the broker's files are not needed for evidence: the log is gone with them
            if started_broker and not args.keep:
                shutil.rmtree(kafka_dir, ignore_errors=True)
            say(f"work dir kept: {workdir}")
        elif args.keep_logs:
            for sub in (data_dir, snap_dir, kafka_dir):
                shutil.rmtree(sub, ignore_errors=True)
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        say(f"total run time {time.monotonic() - T0:.0f}s")
    print(verdict, flush=True)
    return code


NOTABLE = (
    "seeking back",
    "accepting the hole",
    "did not write",
    "Traceback",
    "CRITICAL",
    "restarting",
    "have not agreed",
    "Error in recovery",
    "recovery unknown topic",
    "exited",
    "Heartbeat session expired",
    "Restore complete",
    "Revoking previously assigned partitions",
)


def summarize_log(path: Path) -> None:
    """Counts of notable worker log lines, and the kappa warnings in full (evidence)."""
    counts: dict[str, int] = defaultdict(int)
    shown = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        for word in NOTABLE:
            if word in line:
                counts[word] += 1
        key_line = any(w in line for w in ("have not agreed", "Error in recovery", "recovery unknown topic"))
        if key_line or (
            any(w in line for w in ("seeking back", "accepting the hole", "did not write", "CRITICAL")) and shown < 8
        ):
            say(f"  log: {line[:300]}")
            shown += 1
    say("worker log: " + ", ".join(f"{k!r} x{v}" for k, v in counts.items()))
    # restores (changelog recovery), and whether a rebalance overtook one: the F1 window. Faust's
    # log filter folds repeated lines ("1 more like this"), so any group-membership line counts.
    import re

    head = re.compile(r"^\[(\S+ [\d:,]+)\] \[(\d+)\] \[\w+\] (.*)$")
    membership = ("Revoking previously", "Heartbeat session expired", "(Re-)joining group", "Successfully synced group",
                  "Setting newly assigned", "rebalancing")  # fmt: skip
    restoring: dict[str, dict] = {}
    for line in lines:
        m = head.match(line)
        if not m:
            continue
        at, pid, text = m.group(1)[11:], m.group(2), m.group(3)
        if "Restoring state from changelog" in text:
            restoring[pid] = {"start": at, "remaining": None, "overtaken": None}
        elif pid in restoring and "total remaining=" in text:
            restoring[pid]["remaining"] = restoring[pid]["remaining"] or text.split("total remaining=")[1].split(")")[0]
        elif pid in restoring and any(word in text for word in membership):
            restoring[pid]["overtaken"] = restoring[pid]["overtaken"] or at
        elif pid in restoring and "Done reading from changelog" in text:
            r = restoring.pop(pid)
            if r["overtaken"] or r["remaining"]:
                changed = r["overtaken"]
                overtaken = f"; group membership changed at {changed} before it was done" if changed else ""
                say(f"  restore by process {pid} {r['start']} -> {at}, "
                    f"remaining at first report {r['remaining'] or '?'}{overtaken}")  # fmt: skip


def wait_for_restore(log: Path, offset: int, victim: int, pause: float, after: float) -> str:
    """Wait until a process other than `victim` logs that it restores from the changelog (after
    `offset` of the log), then `after` seconds more; never longer than `pause` in all."""
    start = time.monotonic()
    deadline = start + pause
    seen = None
    with open(log, "rb") as handle:
        handle.seek(offset)
        buffer = b""
        while time.monotonic() < deadline:
            buffer += handle.read()
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                if b"Restoring state from changelog" in line and f"[{victim}]".encode() not in line and seen is None:
                    seen = time.monotonic()
                    deadline = min(deadline, seen + after)
            time.sleep(0.1)
    if seen is None:
        return f"no restore seen; paused {time.monotonic() - start:.1f}s"
    return f"another process began restoring {seen - start:.1f}s into the pause; paused {time.monotonic() - start:.1f}s"


def proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except OSError:
        return "gone"
    return f"{stat.rsplit(')', 1)[1].split()[0]}/{wchan}"


def wait_until_running(pid: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc_state(pid).startswith("R"):
            return
        time.sleep(0.001)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "worker-process" in line]


def check_alive(worker, producer) -> None:
    if worker.poll() is not None:
        raise RuntimeError(f"the worker exited {worker.returncode}")
    if producer is not None and producer.error:
        raise RuntimeError(f"producer failed: {producer.error}")


if __name__ == "__main__":
    sys.exit(main())
