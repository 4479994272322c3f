"""A smoke run of `scripts/bench`, so the benchmark cannot rot: every in-venv contender, checked by the
oracle. The external peers (Kafka Streams, Bytewax, Pathway) need a JDK build and PyPI installs, so the
smoke run leaves them out with --skip; their setup failing is reported, not fatal (tested below)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kappa.bench import cgroups
from kappa.bench.__main__ import report, set_up_peers
from kappa.bench.harness import median_round
from tests.helpers import REPO


def _leftover_groups() -> set[str]:
    return {p.name for p in cgroups.CPU_ROOT.glob("kappa-bench-*")} if cgroups.CPU_ROOT.is_dir() else set()


@pytest.mark.slow
def test_bench_smoke_run_checks_every_contender(kafka, tmp_path):
    out = tmp_path / "bench.json"
    groups_before = _leftover_groups()
    command = [str(REPO / "scripts" / "bench"), "--rows", "20000", "--keys", "100", "--partitions", "2",
               "--rounds", "1", "--skip", "kafka_streams,bytewax,pathway", "--scale-out", "1,2",
               "--cpu-per-process", "0.5", "--broker", kafka, "--out", str(out),
               "--workdir", str(tmp_path / "work")]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "KAPPA_PYTHON": sys.executable}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(out.read_text())
    assert (outcome["rows"], outcome["partitions"], outcome["rounds"]) == (20_000, 2, 1)
    [run] = outcome["runs"]
    assert run["keys"] == 100
    contenders = run["contenders"]
    rated = {"load", "raw", "kappa", "kappa_shape", "faust_naive", "quixstreams", "pandas"}
    assert set(contenders) == {"startup", *rated}
    for name, measured in contenders.items():
        assert measured["correct"] is True, (name, measured)
        assert measured["seconds"] > 0 and measured["peak_rss_mb"] > 0
        assert (measured.get("rows_per_s", 0) > 0) == (name in rated), (name, measured)
    assert contenders["raw"]["ratio_to_raw"] == 1.0
    assert "target kappa >= 1.2x raw" in result.stdout and "target kappa_shape >= " in result.stdout
    assert "target startup < 1 s (a --batch replay of an empty topic): " in result.stdout
    scale_out = outcome["scale_out"]
    if "unmeasurable" in scale_out:  # no writable cgroup v1 cpu controller here
        assert scale_out["unmeasurable"].startswith("not measurable here")
    else:
        assert [r["processes"] for r in scale_out["results"]] == [1, 2]
        assert all(r["correct"] for r in scale_out["results"])
        assert set(scale_out["speedups"]) == set(scale_out["applying_speedups"]) == {"2p/1p"}
        assert all(0 < r["applying_seconds"] < r["seconds"] for r in scale_out["results"])
    assert _leftover_groups() == groups_before


@pytest.mark.parametrize("on_path", [(), ("java", "mvn")], ids=["nothing", "a JRE without javac"])
def test_an_unavailable_peer_is_reported_not_fatal(tmp_path, monkeypatch, on_path):
    for tool in on_path:  # never run: only found on PATH
        (tmp_path / tool).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    peers = set_up_peers(["raw", "kafka_streams"], tmp_path / "peers")
    assert set(peers) == {"kafka_streams"} and "needs a JDK and mvn" in peers["kafka_streams"]
    run = {"rows": 10, "keys": 1_000_000, "partitions": 1, "contenders": {
        "raw": {"rows_per_s": 10.0, "seconds": 1.0, "peak_rss_mb": 1.0, "correct": True},
        "kafka_streams": {"unavailable": peers["kafka_streams"]}}}  # fmt: skip
    lines = report(run)
    assert any(line.startswith("kafka_streams") and "unavailable: needs a JDK and mvn" in line for line in lines)


def test_median_round_is_the_middle_time_and_correct_only_if_every_round_was():
    rounds = [{"seconds": s, "rows_per_s": 6 / s, "peak_rss_mb": 1.0, "correct": True} for s in (3.0, 1.0, 2.0)]
    rounds[0] |= {"correct": False, "error": "a sum differs"}
    chosen = median_round(rounds)
    assert (chosen["seconds"], chosen["rounds"], chosen["seconds_each"]) == (2.0, 3, [3.0, 1.0, 2.0])
    assert chosen["correct"] is False and chosen["error"] == "a sum differs"


@pytest.mark.parametrize(("seconds", "correct", "verdict"), [(0.74, True, "met"), (1.3, True, "MISSED"),
                                                            (0.5, False, "MISSED")])  # fmt: skip
def test_startup_is_reported_by_its_seconds_against_its_target(seconds, correct, verdict):
    run = {"rows": 10, "keys": 1_000, "partitions": 8, "contenders": {
        "startup": {"seconds": seconds, "peak_rss_mb": 120.0, "correct": correct},
        "raw": {"rows_per_s": 10.0, "seconds": 1.0, "peak_rss_mb": 1.0, "correct": True}}}  # fmt: skip
    lines = report(run)
    [row] = [line for line in lines if line.startswith("startup")]
    assert row.split()[1:4] == ["-", "-", f"{seconds:.2f}"]
    assert f"target startup < 1 s (a --batch replay of an empty topic): {seconds:.2f} s {verdict}" in lines
    assert "ratio_to_raw" not in run["contenders"]["startup"]
