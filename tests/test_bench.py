"""A smoke run of `scripts/bench`, so the benchmark cannot rot: every contender, checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_bench_smoke_run_checks_every_contender(kafka, tmp_path):
    out = tmp_path / "bench.json"
    options = {"--rows": 20000, "--keys": 100, "--partitions": 2, "--broker": kafka, "--out": out}
    command = [str(REPO / "scripts" / "bench"), "--workdir", str(tmp_path / "work")]
    command += [part for flag, value in options.items() for part in (flag, str(value))]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "KAPPA_PYTHON": sys.executable}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(out.read_text())
    assert (outcome["rows"], outcome["keys"], outcome["partitions"]) == (20_000, 100, 2)
    contenders = outcome["contenders"]
    assert set(contenders) == {"load", "raw", "kappa", "faust_naive", "quixstreams", "pandas"}
    for name, measured in contenders.items():
        assert measured["correct"] is True, (name, measured)
        assert measured["rows_per_s"] > 0 and measured["peak_rss_mb"] > 0
    assert contenders["raw"]["ratio_to_raw"] == 1.0
    assert "target kappa >= 0.3x raw" in result.stdout
