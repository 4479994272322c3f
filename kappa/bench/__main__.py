"""`scripts/bench`: generate, load, then time every contender on the same topic in one run."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
from pathlib import Path

from kappa.bench.harness import Bench, bench_broker
from kappa.bench.scaling import run_scaling, scaling_report

CONTENDERS = ("load", "raw", "kappa", "faust_naive", "quixstreams", "pandas")
# (contender, against, minimum ratio of rows/s): kappa must keep at least these speeds relative to its peers
TARGETS = (
    ("kappa", "raw", 0.3),
    ("kappa", "faust_naive", 5.0),
    ("kappa", "quixstreams", 1.5),
)
LOAD_TARGET_ROWS_S = 150_000


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
        lines.append(
            f"{name:<12} {result['rows_per_s']:>12,.0f} {ratio:>7.3f} {result['seconds']:>9.2f} "
            f"{result['peak_rss_mb']:>8.0f}  {result['correct']}"
        )
    for name, against, minimum in TARGETS:
        mine, theirs = contenders.get(name, {}), contenders.get(against, {})
        if "rows_per_s" in mine and "rows_per_s" in theirs:
            ratio = mine["rows_per_s"] / theirs["rows_per_s"]
            verdict = "met" if ratio >= minimum else "MISSED"
            lines.append(f"target {name} >= {minimum}x {against}: {ratio:.2f}x {verdict}")
    if "rows_per_s" in contenders.get("load", {}):
        rate = contenders["load"]["rows_per_s"]
        lines.append(
            f"target load >= {LOAD_TARGET_ROWS_S:,} rows/s: {rate:,.0f} "
            f"{'met' if rate >= LOAD_TARGET_ROWS_S else 'MISSED'}"
        )
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
    parser.add_argument(
        "--scaling", action="store_true", help="instead: kappa alone over rows, keys and process counts"
    )
    parser.add_argument("--scaling-rows", help="comma list of row counts (default: 100000,1000000,5000000)")
    parser.add_argument("--scaling-keys", help="comma list of key counts at 1M rows (default: 1000,100000,1000000)")
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
        if args.scaling:
            outcome = run_scaling(args, broker, workdir)
        else:
            outcome = Bench(args, broker, workdir).run(args.contenders.split(","))
    print("\n".join(scaling_report(outcome) if args.scaling else report(outcome)))
    args.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.scaling:
        runs = [(f"{r['rows']:,} rows/{r['keys']:,} keys", r) for rs in outcome["scaling"].values() for r in rs]
    else:
        runs = list(outcome["contenders"].items())
    wrong = [name for name, result in runs if result.get("correct") is False]
    if wrong:
        print(f"bench: wrong results from {', '.join(wrong)}: their timings are void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
