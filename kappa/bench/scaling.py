"""How kappa's replay grows: with processes under a CPU quota each (`run_scale_out`, part of every
full bench), and with rows, keys and processes (`scripts/bench --scaling`).

Rows should cost linearly (seconds per million rows stays flat); keys drive the snapshot's
time and the worker's memory; processes should add throughput when each has a core of its own,
which the scale-out simulates with one cgroup CPU quota per process (kappa.bench.cgroups).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kappa.bench import cgroups
from kappa.bench.harness import Bench, median_round

ROWS_STEPS = (100_000, 1_000_000, 5_000_000)
KEYS_STEPS = (1_000, 100_000, 1_000_000)
PROCESS_STEPS = (1, 2, 4)
# 4 workers and the replay's supervisor at 0.25 each fill 1.25 of this machine's 2 cores, and leave
# the broker and the bench room: at 0.4 they add up to both cores (4p applied records 2.53x faster
# than 1p at 0.4, 3.11x at 0.25, in two bench runs on the same day)
CPUS_PER_PROCESS = 0.25


def _variant(args: argparse.Namespace, **changes: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _steps(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(step) for step in text.split(",")) if text else default


def run_scale_out(bench: Bench, steps: tuple[int, ...], cpus: float, rounds: int) -> dict:
    """`scripts/replay --processes N` on the bench's topic for each N, every kappa process (the
    supervisor and each worker) in a cpu group of its own limited to `cpus`; rounds interleaved,
    medians reported, with each N's rows/s over the first N's."""
    outcome: dict = {"cpus_per_process": cpus, "rows": bench.args.rows, "keys": bench.args.keys,
                     "partitions": bench.args.partitions, "processes": list(steps)}  # fmt: skip
    reason = cgroups.unavailable_reason()
    if reason:
        outcome["unmeasurable"] = f"not measurable here: {reason}"
        print(f" scale-out: {outcome['unmeasurable']}", flush=True)
        return outcome
    print(f" scale-out: {', '.join(map(str, steps))} processes on {bench.args.partitions} partitions, "
          f"{cpus:g} CPU each (cgroup cpu quota)", flush=True)  # fmt: skip
    per_step: dict[int, list[dict]] = {n: [] for n in steps}
    with cgroups.CpuGroups(cpus) as groups:
        for _ in range(rounds):
            for processes in steps:
                per_step[processes].append(bench.measure_kappa(processes, groups))
    results = [{"processes": n, **median_round(per_step[n])} for n in steps]
    for result in results:
        if result.get("applying_seconds"):  # the median round's (kappa.lifecycle.switchover.AppliedSpan)
            result["applying_rows_per_s"] = round(bench.args.rows / result["applying_seconds"], 1)
    outcome["results"] = results
    if results[0]["correct"]:
        outcome["speedups"] = _speedups(results, "rows_per_s")
        if "applying_rows_per_s" in results[0]:
            outcome["applying_speedups"] = _speedups(results, "applying_rows_per_s")
    return outcome


def _speedups(results: list[dict], field: str) -> dict[str, float]:
    """Each correct result's `field` over the first one's, named `Np/1p`."""
    base = results[0]
    return {f"{r['processes']}p/{base['processes']}p": round(r[field] / base[field], 2)
            for r in results[1:] if r["correct"] and field in r}  # fmt: skip


def scale_out_report(outcome: dict) -> list[str]:
    if "unmeasurable" in outcome:
        return [f"scale-out: {outcome['unmeasurable']}"]
    rounds = outcome["results"][0]["rounds"]
    lines = [f"scale-out: {outcome['rows']:,} rows, {outcome['keys']:,} keys, {outcome['partitions']} partitions, "
             f"{outcome['cpus_per_process']:g} CPU per process (cgroup quota), median of {rounds}",
             f"{'processes':>9} {'rows/s':>10} {'seconds':>8} {'applying':>8} {'peak MB':>8}  correct"]  # fmt: skip
    for r in outcome["results"]:
        applying = f"{r['applying_seconds']:>8.2f}" if r.get("applying_seconds") is not None else f"{'-':>8}"
        lines.append(f"{r['processes']:>9} {r['rows_per_s']:>10,.0f} {r['seconds']:>8.2f} {applying} "
                     f"{r['peak_rss_mb']:>8.0f}  {r['correct']}")  # fmt: skip
    applying_speedups = outcome.get("applying_speedups", {})
    for name, speedup in outcome.get("speedups", {}).items():
        beside = f" (applying records: {applying_speedups[name]:.2f}x)" if name in applying_speedups else ""
        lines.append(f"speedup {name}: {speedup:.2f}x, process start to exit{beside}")
    lines.append("applying: the processes' first record to their last, without start-up, group join, publish and stop")
    return lines


def run_scaling(args: argparse.Namespace, broker: str, workdir: Path) -> dict:
    def bench_on(label: str, rows: int, keys: int) -> Bench:
        bench = Bench(_variant(args, rows=rows, keys=keys), broker, workdir / label)
        bench.workdir.mkdir(parents=True, exist_ok=True)
        bench.prepare()
        bench.fill_topic()
        return bench

    def kappa_on(label: str, rows: int, keys: int) -> dict:
        return {"rows": rows, "keys": keys, **bench_on(label, rows, keys).measure_kappa()}

    series: dict[str, list[dict]] = {"rows": [], "keys": []}
    for rows in _steps(args.scaling_rows, ROWS_STEPS):
        result = kappa_on(f"rows-{rows}", rows, 1_000)
        result["seconds_per_million_rows"] = round(result["seconds"] / rows * 1e6, 2)
        series["rows"].append(result)
    for keys in _steps(args.scaling_keys, KEYS_STEPS):
        series["keys"].append(kappa_on(f"keys-{keys}", 1_000_000, keys))
    scale_out = run_scale_out(bench_on("processes", 1_000_000, 1_000), _steps(args.scale_out, PROCESS_STEPS),
                              args.cpu_per_process, args.rounds)  # fmt: skip
    return {"partitions": args.partitions, "scaling": series, "scale_out": scale_out}


def scaling_report(outcome: dict) -> list[str]:
    lines = [f"{'series':<10} {'rows':>10} {'keys':>10} {'rows/s':>10} {'seconds':>8} "
             f"{'s/1M rows':>9} {'snapshot s':>10} {'peak MB':>8}  correct"]  # fmt: skip
    for name, results in outcome["scaling"].items():
        for r in results:
            lines.append(
                f"{name:<10} {r['rows']:>10,} {r['keys']:>10,} {r['rows_per_s']:>10,.0f} "
                f"{r['seconds']:>8.2f} {r.get('seconds_per_million_rows', ''):>9} "
                f"{r.get('snapshot_seconds', ''):>10} {r['peak_rss_mb']:>8.0f}  {r['correct']}"
            )
    return lines + scale_out_report(outcome["scale_out"])
