"""Draw a bench outcome (the JSON of `scripts/bench`) as a PNG:

    python kappa/bench/plot.py bench.json bench.png

Run by `scripts/bench --plot` with an interpreter that has matplotlib (kappa's venv needs none);
it imports nothing of kappa. Panels: rows/s per contender at each key count (log scale, each bar
labelled with its ratio to `raw`), kappa's scale-out under a CPU quota per process against the
linear ideal, and for `--scaling` the rows and keys series.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

KAPPA = "#d62728"
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
RATE = FuncFormatter(lambda value, _: f"{value / 1e6:g}M" if value >= 1e6 else f"{value / 1e3:g}k")


def contenders_panel(ax, runs: list[dict]) -> None:
    names = [name for name in runs[0]["contenders"] if name not in ("load", "startup")]  # no rows/s of a read
    height = 0.8 / len(runs)
    labelled: set[int] = set()
    for index, run in enumerate(runs):
        contenders = run["contenders"]
        raw = contenders.get("raw", {}).get("rows_per_s")
        for row, name in enumerate(names):
            result = contenders.get(name, {})
            y = row + (index - (len(runs) - 1) / 2) * height
            if "rows_per_s" not in result:
                why = "unavailable" if "unavailable" in result else "not run"
                ax.text(0.01, y, f"{run['keys']:,} keys: {why}", va="center", fontsize=7, color="grey",
                        transform=ax.get_yaxis_transform())  # fmt: skip
                continue
            rate = result["rows_per_s"]
            edge = KAPPA if name == "kappa" else "none"
            label = None if index in labelled else f"{run['keys']:,} keys"
            labelled.add(index)
            ax.barh(y, rate, height * 0.9, color=COLORS[index % len(COLORS)], edgecolor=edge, linewidth=1.5,
                    label=label, hatch="" if result.get("correct", True) else "xx")  # fmt: skip
            ratio = f"  {rate:,.0f}/s" + (f"  {rate / raw:.2f}x raw" if raw else "")
            if not result.get("correct", True):
                ratio += "  WRONG"
            ax.text(rate, y, ratio, va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(RATE)
    lo = min((r["rows_per_s"] for run in runs for r in run["contenders"].values() if "rows_per_s" in r), default=1)
    hi = max((r["rows_per_s"] for run in runs for r in run["contenders"].values() if "rows_per_s" in r), default=1)
    ax.set_xlim(lo / 2, hi * 12)
    ax.set_xlabel("rows/s (log scale), process start to exit, median of rounds")
    rows = runs[0]["rows"]
    ax.set_title(f"{rows:,} rows, {runs[0]['partitions']} partitions: every result checked against pandas")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.25)


def scale_out_panel(ax, scale_out: dict) -> None:
    ax.set_title(f"kappa scale-out, {scale_out.get('cpus_per_process', 0):g} CPU quota per process")
    if "results" not in scale_out:
        ax.text(0.5, 0.5, scale_out.get("unmeasurable", "not measured"), ha="center", va="center",
                wrap=True, transform=ax.transAxes)  # fmt: skip
        ax.set_axis_off()
        return
    results = scale_out["results"]
    processes = [r["processes"] for r in results]
    ax.plot(processes, [n / processes[0] for n in processes], "--", color="grey", label="linear")
    curves = [("rows_per_s", "o-", "start to exit", -12), ("applying_rows_per_s", "s:", "applying records", 6)]
    for field, style, label, label_dy in curves:
        if not all(field in r for r in results):
            continue
        rates = [r[field] for r in results]
        ax.plot(processes, [rate / rates[0] for rate in rates], style, color=KAPPA, label=f"kappa, {label}")
        for n, rate in zip(processes, rates, strict=True):
            ax.annotate(f"{rate / rates[0]:.2f}x ({rate / 1e3:,.0f}k/s)", (n, rate / rates[0]),
                        textcoords="offset points", xytext=(5, label_dy), fontsize=7)  # fmt: skip
    ax.set_xticks(processes)
    ax.set_xlim(processes[0] - 0.3, processes[-1] + 1.2)
    ax.set_xlabel(f"kappa worker processes ({scale_out['partitions']} partitions, {scale_out['keys']:,} keys)")
    ax.set_ylabel("rows/s over 1 process (replay --processes N)")
    ax.set_ylim(0, processes[-1] / processes[0] * 1.1)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.25)


def series_panel(ax, results: list[dict], field: str, title: str) -> None:
    xs = [r[field] for r in results]
    ax.plot(xs, [r["rows_per_s"] for r in results], "o-", color=KAPPA)
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(field)
    ax.set_ylabel("rows/s")
    ax.yaxis.set_major_formatter(RATE)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.25)


def main(source: Path, png: Path) -> None:
    outcome = json.loads(source.read_text())
    panels: list[Callable[[Any], None]] = []
    if outcome.get("runs"):
        panels.append(lambda ax: contenders_panel(ax, outcome["runs"]))
    for name, results in outcome.get("scaling", {}).items():
        if results:
            field = "rows" if name == "rows" else "keys"
            panels.append(
                functools.partial(series_panel, results=results, field=field, title=f"kappa --batch over {name}")
            )
    if "scale_out" in outcome:
        panels.append(lambda ax: scale_out_panel(ax, outcome["scale_out"]))
    wide = bool(outcome.get("runs"))
    if wide:
        figure, axes = plt.subplots(1, len(panels), figsize=(16, 6.5), width_ratios=[2.2] + [1] * (len(panels) - 1),
                                    squeeze=False)  # fmt: skip
    else:
        figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, draw in zip(axes[0], panels, strict=True):
        draw(ax)
    figure.suptitle("kappa bench", fontweight="bold")
    figure.tight_layout()
    figure.savefig(png, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
