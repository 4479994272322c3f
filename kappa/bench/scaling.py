"""`scripts/bench --scaling`: how kappa's replay grows with rows, keys and processes.

Rows should cost linearly (seconds per million rows stays flat); keys drive the snapshot's
time and the worker's memory; a second process should help once one core is saturated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kappa.bench.harness import Bench

ROWS_STEPS = (100_000, 1_000_000, 5_000_000)
KEYS_STEPS = (1_000, 100_000, 1_000_000)
PROCESS_STEPS = (1, 2)


def _variant(args: argparse.Namespace, **changes: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _steps(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(step) for step in text.split(",")) if text else default


def run_scaling(args: argparse.Namespace, broker: str, workdir: Path) -> dict:
    def kappa_on(label: str, rows: int, keys: int, processes: int | None = None) -> dict:
        bench = Bench(_variant(args, rows=rows, keys=keys), broker, workdir / label)
        bench.workdir.mkdir(parents=True, exist_ok=True)
        bench.prepare()
        bench.run_load()
        bench.run_kappa(processes)
        return {"rows": rows, "keys": keys, **({"processes": processes} if processes else {}), **bench.results["kappa"]}

    series: dict[str, list[dict]] = {"rows": [], "keys": [], "processes": []}
    for rows in _steps(args.scaling_rows, ROWS_STEPS):
        result = kappa_on(f"rows-{rows}", rows, 1_000)
        result["seconds_per_million_rows"] = round(result["seconds"] / rows * 1e6, 2)
        series["rows"].append(result)
    for keys in _steps(args.scaling_keys, KEYS_STEPS):
        series["keys"].append(kappa_on(f"keys-{keys}", 1_000_000, keys))
    for processes in PROCESS_STEPS:
        series["processes"].append(kappa_on(f"processes-{processes}", 1_000_000, 1_000, processes))
    return {"partitions": args.partitions, "scaling": series}


def scaling_report(outcome: dict) -> list[str]:
    lines = [
        f"{'series':<10} {'rows':>10} {'keys':>10} {'procs':>5} {'rows/s':>10} {'seconds':>8} "
        f"{'s/1M rows':>9} {'snapshot s':>10} {'peak MB':>8}  correct"
    ]
    for name, results in outcome["scaling"].items():
        for r in results:
            lines.append(
                f"{name:<10} {r['rows']:>10,} {r['keys']:>10,} {r.get('processes', '-'):>5} {r['rows_per_s']:>10,.0f} "
                f"{r['seconds']:>8.2f} {r.get('seconds_per_million_rows', ''):>9} "
                f"{r.get('snapshot_seconds', ''):>10} {r['peak_rss_mb']:>8.0f}  {r['correct']}"
            )
    return lines
