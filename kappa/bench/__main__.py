"""`scripts/bench`: generate, load, then time every contender on the same topic, at each --keys;
then kappa's scale-out under a CPU quota per process; optionally a plot of it all."""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kappa.bench import external
from kappa.bench.harness import EXTERNAL, REPO, Bench, bench_broker
from kappa.bench.scaling import (
    CPUS_PER_PROCESS,
    PROCESS_STEPS,
    run_scale_out,
    run_scaling,
    scale_out_report,
    scaling_report,
)

CONTENDERS = (
    "startup",
    "load",
    "raw",
    "kappa",
    "kappa_shape",
    "kafka_streams",
    "bytewax",
    "pathway",
    "faust_naive",
    "quixstreams",
    "pandas",
)
FRAMEWORKS = ("kafka_streams", "bytewax", "pathway", "quixstreams")
HIGH_KEYS = 1_000_000  # from here on, the 1M-distinct-keys targets apply
# issue 15: twice the rate `kappa load` had when the issue was filed (129k-143k rows/s here, from
# process start to exit, on the bench's 1M rows)
LOAD_TARGET_ROWS_S = 280_000
STARTUP_TARGET_S = 1.0  # issue 15: a --batch replay of an empty topic, from process start to exit


def targets(keys: int) -> list[tuple[str, str, float]]:
    """(contender, against, minimum ratio of rows/s): the speed goals against raw, every framework
    peer and naive Faust, and the composite shape against the single key."""
    return [("kappa", "raw", 1.0 if keys >= HIGH_KEYS else 1.2), *(("kappa", peer, 2.0) for peer in FRAMEWORKS),
            ("kappa", "faust_naive", 5.0),
            # two key fields, two values and one-hour windows within 1.5x of kappa's own time on one key
            ("kappa_shape", "kappa", 1 / 1.5)]  # fmt: skip


def report(run: dict) -> list[str]:
    """One dataset's table with ratios to `raw`, and each target as met or missed."""
    contenders = run["contenders"]
    raw_rate = contenders.get("raw", {}).get("rows_per_s")
    rounds = max((r.get("rounds", 1) for r in contenders.values()), default=1)
    lines = [f"{run['rows']:,} rows, {run['keys']:,} keys, {run['partitions']} partitions"
             + (f" (median of {rounds} rounds)" if rounds > 1 else ""),
             f"{'contender':<13} {'rows/s':>12} {'x raw':>7} {'seconds':>9} {'peak MB':>8}  correct"]  # fmt: skip
    for name, result in contenders.items():
        if "unavailable" in result or "skipped" in result:
            word = "unavailable" if "unavailable" in result else "skipped"
            lines.append(f"{name:<13} {word}: {result.get('unavailable') or result['skipped']}")
            continue
        note = "" if result.get("rounds", 1) == rounds else f"  ({result.get('rounds', 1)} round)"
        if "rows_per_s" not in result:  # reads no rows (startup)
            lines.append(f"{name:<13} {'-':>12} {'-':>7} {result['seconds']:>9.2f} "
                         f"{result['peak_rss_mb']:>8.0f}  {result['correct']}{note}")  # fmt: skip
            continue
        ratio = result["rows_per_s"] / raw_rate if raw_rate else float("nan")
        result["ratio_to_raw"] = round(ratio, 3)
        lines.append(f"{name:<13} {result['rows_per_s']:>12,.0f} {ratio:>7.3f} {result['seconds']:>9.2f} "
                     f"{result['peak_rss_mb']:>8.0f}  {result['correct']}{note}")  # fmt: skip
    for name, against, minimum in targets(run["keys"]):
        mine, theirs = contenders.get(name, {}), contenders.get(against, {})
        if "rows_per_s" in mine and "rows_per_s" in theirs:
            ratio = mine["rows_per_s"] / theirs["rows_per_s"]
            verdict = "met" if ratio >= minimum else "MISSED"
            lines.append(f"target {name} >= {minimum:.3g}x {against}: {ratio:.2f}x {verdict}")
    kappa = contenders.get("kappa", {})
    if run["keys"] >= HIGH_KEYS and "peak_rss_mb" in kappa:
        peak = kappa["peak_rss_mb"]
        lines.append(f"target kappa peak RSS <= 300 MB at {run['keys']:,} keys: {peak:.0f} MB "
                     f"{'met' if peak <= 300 else 'MISSED'}")  # fmt: skip
    if "rows_per_s" in contenders.get("load", {}):
        rate = contenders["load"]["rows_per_s"]
        lines.append(
            f"target load >= {LOAD_TARGET_ROWS_S:,} rows/s: {rate:,.0f} "
            f"{'met' if rate >= LOAD_TARGET_ROWS_S else 'MISSED'}"
        )
    startup = contenders.get("startup", {})
    if "seconds" in startup:
        met = startup["correct"] and startup["seconds"] < STARTUP_TARGET_S  # a run that failed meets nothing
        lines.append(f"target startup < {STARTUP_TARGET_S:g} s (a --batch replay of an empty topic): "
                     f"{startup['seconds']:.2f} s {'met' if met else 'MISSED'}")  # fmt: skip
    return lines


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(step) for step in text.split(",") if step) if text not in ("", "none") else ()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", default=f"1000,{HIGH_KEYS}", help="comma list: one dataset per key count")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--plot", type=Path, help="also draw the results as a PNG (matplotlib, installed on demand)")
    parser.add_argument("--broker", help="an existing broker (default: start a private embedded one)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list from {','.join(CONTENDERS)}")
    parser.add_argument("--skip", default="", help="comma list of contenders to leave out (e.g. the external peers)")
    parser.add_argument("--workdir", type=Path, help="keep the dataset, logs and state here (default: a temp dir)")
    parser.add_argument("--peers-dir", type=Path,
                        help="external peers' venvs and build (default: <workdir>/peers)")  # fmt: skip
    parser.add_argument("--scale-out", default=",".join(map(str, PROCESS_STEPS)),
                        help="kappa process counts to run under a CPU quota each on the first dataset "
                             "(default 1,2,4; 'none' skips)")  # fmt: skip
    parser.add_argument("--cpu-per-process", type=float, default=CPUS_PER_PROCESS,
                        help=f"the scale-out's CPU quota per kappa process (default {CPUS_PER_PROCESS})")  # fmt: skip
    parser.add_argument(
        "--scaling", action="store_true", help="instead: kappa alone over rows, keys and process counts"
    )
    parser.add_argument("--scaling-rows", help="comma list of row counts (default: 100000,1000000,5000000)")
    parser.add_argument("--scaling-keys", help="comma list of key counts at 1M rows (default: 1000,100000,1000000)")
    args = parser.parse_args(argv)
    chosen = [name for name in args.contenders.split(",") if name]
    unknown = set(chosen) - set(CONTENDERS) | set(filter(None, args.skip.split(","))) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {','.join(CONTENDERS)}")
    args.names = [name for name in chosen if name not in args.skip.split(",")]
    args.key_counts = _ints(args.keys)
    args.scale_out_steps = _ints(args.scale_out)
    if not args.key_counts or args.rounds < 1 or not 0 < args.cpu_per_process <= 64:
        parser.error("--keys needs a count, --rounds at least 1, --cpu-per-process above 0")
    return args


def set_up_peers(names: list[str], peers_dir: Path) -> dict[str, list[str] | str]:
    """Each external peer's command prefix, or the reason it is unavailable (before any timing)."""
    peers: dict[str, list[str] | str] = {}
    for name in names:
        if name in EXTERNAL:
            try:
                peers[name] = external.setup(name, peers_dir)
            except external.Unavailable as why:
                peers[name] = str(why)
    return peers


def run_full(args: argparse.Namespace, broker: str, workdir: Path, peers_dir: Path) -> dict:
    peers = set_up_peers(args.names, peers_dir)
    outcome: dict = {"rows": args.rows, "partitions": args.partitions, "rounds": args.rounds, "runs": []}
    for position, keys in enumerate(args.key_counts):
        variant = argparse.Namespace(**{**vars(args), "keys": keys})
        bench = Bench(variant, broker, workdir / f"keys-{keys}", peers)
        bench.workdir.mkdir(parents=True, exist_ok=True)
        outcome["runs"].append(bench.run(args.names, args.rounds, first=position == 0))
        if position == 0 and args.scale_out_steps:
            outcome["scale_out"] = run_scale_out(bench, args.scale_out_steps, args.cpu_per_process, args.rounds)
    return outcome


def draw(outcome_path: Path, png: Path, peers_dir: Path) -> None:
    """The plot, drawn by a Python that has matplotlib (kappa's venv needs none)."""
    try:
        python = external.plot_python(peers_dir)
    except external.Unavailable as why:
        print(f"bench: no plot: {why}", file=sys.stderr)
        return
    done = subprocess.run([python, str(external.PLOT), str(outcome_path), str(png)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"bench: the plot failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
    else:
        print(f"wrote {png}")


def compile_sources() -> None:
    """Write the repository's bytecode before anything is timed. kappa is installed editable, so
    pip compiles none of it, and where PYTHONDONTWRITEBYTECODE is set (this machine's shell) every
    contender process compiled kappa's modules again: about 40 ms of each start, four times that
    under the scale-out's CPU quota. An installed package starts from bytecode."""
    for package in ("kappa", "agents", "tables"):
        compileall.compile_dir(REPO / package, quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    compile_sources()
    # SIGTERM unwinds like Ctrl-C, so the running contender and the private broker are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kappa-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        peers_dir = args.peers_dir or workdir / "peers"
        broker = stack.enter_context(bench_broker(args.broker, workdir))
        if args.scaling:
            outcome = run_scaling(args, broker, workdir)
        else:
            outcome = run_full(args, broker, workdir, peers_dir)
        if args.scaling:
            lines = scaling_report(outcome)
        else:
            lines = [line for run in outcome["runs"] for line in ["", *report(run)]]
            if "scale_out" in outcome:
                lines += ["", *scale_out_report(outcome["scale_out"])]
        print("\n".join(lines))
        args.out.write_text(json.dumps(outcome, indent=2) + "\n")
        print(f"wrote {args.out}")
        if args.plot:
            draw(args.out, args.plot, peers_dir)
    if args.scaling:
        runs = [(f"{r['rows']:,} rows/{r['keys']:,} keys", r) for rs in outcome["scaling"].values() for r in rs]
    else:
        runs = [(f"{name} at {run['keys']:,} keys", r) for run in outcome["runs"]
                for name, r in run["contenders"].items()]  # fmt: skip
    scale_out = outcome.get("scale_out", {})
    runs += [(f"kappa {r['processes']}p under a quota", r) for r in scale_out.get("results", [])]
    wrong = [name for name, result in runs if result.get("correct") is False]
    if wrong:
        print(f"bench: wrong results from {', '.join(wrong)}: their timings are void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
