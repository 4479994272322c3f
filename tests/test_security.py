"""SASL/PLAIN end to end: an authenticated embedded broker, credentials from the environment,
a clear error on a wrong password, and no secret in logs, manifests or status."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.datagen import pandas_expectation, sample_frame
from tests.helpers import free_port, run_kappa
from tests.oracle import assert_matches, read_latest

PASSWORD = "pw-7f3a9c1e-never-print"
pytestmark = pytest.mark.slow


def run(args: list[str], env: dict, timeout: float = 300, stdin: bytes | None = None):
    return run_kappa(args, env=env, timeout=timeout, stdin=stdin)


def test_sasl_plain_broker_and_clients(tmp_path):
    port = free_port()
    data, snaps = tmp_path / "data", tmp_path / "snapshots"
    env = {
        **os.environ,
        "KAPPA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAPPA_SASL_USERNAME": "analyst",
        "KAPPA_SASL_PASSWORD": PASSWORD,
    }
    common = ["--broker", f"127.0.0.1:{port}", "--data-dir", str(data), "--snapshot-dir", str(snaps)]
    try:
        started = run(["kafka", "start", "--sasl", "--port", str(port), "--data-dir", str(data)], env, timeout=180)
        assert started.returncode == 0, started.stderr.decode()
        listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
        mine = [line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(f":{port}")]
        assert mine and all("127.0.0.1" in address for address in mine)

        path = tmp_path / "rows.csv"
        sample_frame(3_000, 80, seed=70).to_csv(path, index=False)
        loaded = run(["load", str(path), "--key", "city", "--topic", "secure", *common], env)
        assert loaded.returncode == 0, loaded.stderr.decode()
        replayed = run(["replay", "--topic", "secure", "--value", "amount", "--key", "city", "--batch", *common], env)
        assert replayed.returncode == 0, replayed.stderr.decode()
        csv_table, _, _ = read_latest(snaps, "secure")
        assert_matches(csv_table, pandas_expectation(str(path), "city", "amount"))

        wrong = run(["status", *common], {**env, "KAPPA_SASL_PASSWORD": "not-the-password"}, timeout=60)
        assert wrong.returncode != 0
        message = wrong.stderr.decode().strip()
        assert len(message.splitlines()) == 1 and "authentication" in message and "KAPPA_SASL_PASSWORD" in message

        plaintext = run(["status", *common], {**os.environ, "KAPPA_SECURITY_PROTOCOL": "PLAINTEXT"}, timeout=60)
        assert plaintext.returncode != 0

        status = run(["status", "--json", *common], env, timeout=60)
        assert status.returncode == 0, status.stderr.decode()
        outputs = [status.stdout, status.stderr, loaded.stdout, loaded.stderr, replayed.stdout, replayed.stderr]
        outputs += [wrong.stdout, wrong.stderr, started.stdout, started.stderr]
        files = [p for p in snaps.rglob("*") if p.is_file()] + [data / "kafka" / "broker.log"]
        for blob in outputs + [f.read_bytes() for f in files]:
            assert PASSWORD.encode() not in blob
        assert oct((data / "kafka" / "server.properties").stat().st_mode & 0o777) == "0o600"
    finally:
        stopped = run(["kafka", "stop", "--data-dir", str(data)], env, timeout=90)
        assert stopped.returncode == 0
