"""Commands fail with one clear line and a non-zero exit on bad input or an unreachable broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kappa.errors import KappaError
from kappa.kafka import broker as embedded
from kappa.kafka.admin import ensure_topic
from kappa.processes import GC_YOUNG_THRESHOLD
from tests.helpers import REPO, free_port, free_port_block, kappa_command, run_kappa, wait_until


def kappa_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_kappa(args, timeout=timeout, text=True)


def test_unreachable_broker_is_one_clear_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"k": "a", "v": 1}\n')
    result = kappa_cli("load", str(data), "--key", "k", "--topic", "t", "--broker", f"127.0.0.1:{free_port()}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Kafka broker" in lines[0] and "kappa kafka start" in lines[0]


@pytest.mark.parametrize(
    "command",
    [["replay", "--batch"], ["replay", "--processes", "1"], ["worker"]],
    ids=["batch replay", "replay beside live", "worker"],
)
@pytest.mark.parametrize("unusable", ["--data-dir", "--snapshot-dir"])
def test_a_data_or_snapshot_dir_under_a_file_is_one_clear_line_and_nothing_is_recorded(kappa, tmp_path, command,
                                                                                        unusable):  # fmt: skip
    """It was a NotADirectoryError traceback, and a replay recorded a generation as running that never ran."""
    topic = kappa.topic()
    ensure_topic(kappa.broker, topic, 1)
    (tmp_path / "afile").write_text("")
    dirs = {"--data-dir": tmp_path / "data", "--snapshot-dir": tmp_path / "snapshots"}
    dirs[unusable] = tmp_path / "afile" / "dir"
    where = [item for option, path in dirs.items() for item in (option, str(path))]
    definition = ["--topic", topic, "--value", "v", "--key", "k"]
    result = kappa_cli(*command, *definition, "--broker", kappa.broker, *where)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"kappa: error: {unusable} {dirs[unusable]} cannot be made: {tmp_path / 'afile'} is a file, not a directory"
    ]
    assert not (tmp_path / "snapshots").exists() and not (tmp_path / "data").exists()


def test_usable_dirs_are_accepted_and_a_dangling_symlink_is_named(tmp_path, monkeypatch):
    from kappa.config import Settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    for data_dir, snapshot_dir in [("rel/data", "rel/snaps"), ("linked/data", "linked"), ("a/b/c/d", "e/f")]:
        Settings.from_args(None, data_dir, snapshot_dir).require_usable_dirs()
    # a broker writes no snapshot: its --snapshot-dir is not checked
    Settings.from_args(None, "data", "afile/snaps").require_usable_dirs(snapshots=False)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(KappaError, match=r"--data-dir .*dangling is a symlink to .*gone, which does not exist"):
        Settings.from_args(None, "dangling", "snaps").require_usable_dirs()


def test_missing_key_column_names_the_columns(kappa, tmp_path):
    data = tmp_path / "rows.csv"
    data.write_text("city,amount\nx,1\n")
    result = kappa.run("load", str(data), "--key", "town", "--topic", kappa.topic(), check=False)
    assert result.returncode != 0
    assert "key column 'town' not found" in result.stderr.decode() and "city, amount" in result.stderr.decode()


def test_missing_arguments_and_help():
    missing = kappa_cli("load", "x.csv")
    assert missing.returncode == 2 and "--key" in missing.stderr
    helped = kappa_cli("replay", "--help")
    assert helped.returncode == 0 and "--batch" in helped.stdout


def test_a_replay_by_no_process_is_refused_at_once(kappa, tmp_path):
    """It used to wait forever for parts that no process would write."""
    data = tmp_path / "rows.csv"
    data.write_text("city,amount\nx,1\n")
    topic = kappa.topic()
    kappa.run("load", str(data), "--key", "city", "--topic", topic)
    result = kappa.run("replay", "--topic", topic, "--value", "amount", "--key", "city", "--processes", "0",
                       check=False, timeout=60)  # fmt: skip
    assert result.returncode == 2
    expected = "kappa: error: --processes must be at least 1 and --snapshot-interval above 0"
    assert result.stderr.decode().strip() == expected


def test_kafka_start_refuses_a_taken_port(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = kappa_cli("kafka", "start", "--port", str(port), "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert f"port {port}" in result.stderr and "already in use" in result.stderr


def test_kafka_lifecycle_is_idempotent(tmp_path):
    port = free_port()
    flags = ["--port", str(port), "--data-dir", str(tmp_path)]
    try:
        first = kappa_cli("kafka", "start", *flags, timeout=180)
        assert first.returncode == 0, first.stderr
        assert f"127.0.0.1:{port}" in first.stdout
        again = kappa_cli("kafka", "start", *flags, timeout=60)
        assert again.returncode == 0 and f"127.0.0.1:{port}" in again.stdout
        status = kappa_cli("kafka", "status", "--data-dir", str(tmp_path))
        assert status.returncode == 0 and "pid" in status.stdout and status.stdout.rstrip().endswith("answering")
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        local_addresses = [line.split()[3] for line in listening.splitlines()]
        assert local_addresses and all(
            address.rsplit(":", 1)[0].endswith("127.0.0.1]") or address.startswith("127.0.0.1:")
            for address in local_addresses
        )
    finally:
        stopped = kappa_cli("kafka", "stop", "--data-dir", str(tmp_path), timeout=60)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    after = kappa_cli("kafka", "status", "--data-dir", str(tmp_path))
    assert after.returncode == 1 and "not running" in after.stdout


def test_a_broker_killed_outright_comes_back_on_its_port_and_leaves_no_files_behind(tmp_path):
    """The JVM unpacks lz4's native library (for the compressed batches every load sends) into its
    java.io.tmpdir and removes it only on a clean exit; in /tmp, each kill -9 left a copy for good.
    Started again without --port, a stopped broker came back on 9092, not on its own port."""
    from confluent_kafka import Producer

    port = free_port()
    temp = tmp_path / "kafka" / "tmp"
    try:
        first = kappa_cli("kafka", "start", "--port", str(port), "--data-dir", str(tmp_path), timeout=180)
        assert first.returncode == 0, first.stderr
        ensure_topic(f"127.0.0.1:{port}", "lz4-rows", 1)
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}", "compression.type": "lz4"})
        producer.produce("lz4-rows", b"x" * 1000)
        assert producer.flush(60) == 0
        wait_until(lambda: list(temp.glob("liblz4-java-*")), 30, interval=0.1)
        killed = set(temp.iterdir())
        (node,) = embedded.nodes(tmp_path)
        os.kill(node.pid, signal.SIGKILL)
        wait_until(lambda: not embedded.nodes(tmp_path)[0].running, 10, interval=0.05)
        again = kappa_cli("kafka", "start", "--data-dir", str(tmp_path), timeout=180)
        assert again.returncode == 0 and f"127.0.0.1:{port}" in again.stdout, again.stdout + again.stderr
        assert killed.isdisjoint(temp.iterdir()), "the killed JVM's files are still there"
    finally:
        kappa_cli("kafka", "stop", "--data-dir", str(tmp_path), timeout=60)


def test_kafka_start_on_another_port_is_refused(tmp_path):
    """A running broker answers `start`, but not when --port asks for a port it is not on."""
    port = free_port_block(2)
    try:
        first = kappa_cli("kafka", "start", "--port", str(port), "--data-dir", str(tmp_path), timeout=180)
        assert first.returncode == 0, first.stderr
        moved = kappa_cli("kafka", "start", "--port", str(port + 1), "--data-dir", str(tmp_path), timeout=60)
        assert moved.returncode != 0 and "up at" not in moved.stdout
        lines = moved.stderr.strip().splitlines()
        assert len(lines) == 1 and f"127.0.0.1:{port}, not on port {port + 1}" in lines[0], moved.stderr
        assert "kappa kafka stop" in lines[0]
        same = kappa_cli("kafka", "start", "--data-dir", str(tmp_path), timeout=60)
        assert same.returncode == 0 and f"127.0.0.1:{port}" in same.stdout, "without --port it keeps its port"
    finally:
        kappa_cli("kafka", "stop", "--data-dir", str(tmp_path), timeout=60)


def publish_trips(snapshot_dir: Path, groups: list[tuple[str, int, float, int]]) -> Path:
    """Publish generation 1 of pipeline `trips`: (city, window start, sum, count) per group."""
    from kappa.snapshots import snapshot
    from tables.aggregate import MEAN, MeanState, partials_table
    from tables.keys import KeyLayout

    layout = KeyLayout(("city",), windowed=True)
    partials = [
        (layout.encode([city], start), MEAN.encode([MeanState(total=total, count=count)]))
        for city, start, total, count in groups
    ]
    rows = snapshot.merge_partials([partials_table(sorted(partials), MEAN, layout).to_batches()], MEAN, layout)
    published = snapshot.publish(snapshot_dir, "trips", 1, rows, {"generation": 1, "offsets": {}, "complete": True})
    assert published is not None
    return published


def test_snapshot_as_csv_is_the_published_file(tmp_path):
    """`kappa snapshot NAME --format csv` prints table.csv byte for byte: window starts in ISO 8601
    with `Z`, keys quoted as the file has them (it once printed pandas' own rendering)."""

    groups = [("a,b", 0, 2.5, 2), ("東京", 3600, 2.5, 2), ('say "hi"', 7200, 2.5, 2)]
    published = publish_trips(tmp_path, groups)
    result = run_kappa(["snapshot", "trips", "--format", "csv", "--snapshot-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout == (published / "table.csv").read_bytes()
    assert b'"a,b",1970-01-01T00:00:00Z,2,2.5,1.25\r\n' in result.stdout
    assert result.stdout.count(b"\r\n") == 4  # a header and three rows


@pytest.mark.parametrize("form", ["table", "json", "csv"])
def test_a_snapshot_read_in_part_by_a_pipe_ends_quietly(tmp_path, form):
    """`kappa snapshot P | head -1` ended in a BrokenPipeError traceback, exit 1 (table and json)."""
    publish_trips(tmp_path, [(f"city-{n:05}", 0, n, 1) for n in range(20_000)])
    reader = subprocess.Popen(
        kappa_command("snapshot", "trips", "--format", form, "--snapshot-dir", str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert reader.stdout is not None and reader.stdout.readline()
    reader.stdout.close()  # as `head -1` exits
    _, stderr = reader.communicate(timeout=60)
    assert reader.returncode == 0 and b"Traceback" not in stderr, stderr.decode()


def test_snapshot_takes_the_pipelines_file_as_replay_and_worker_do(tmp_path):
    """`kappa snapshot NAME --config FILE` was refused (unrecognized arguments)."""
    publish_trips(tmp_path, [("a", 0, 2.5, 2)])
    config = tmp_path / "pipelines.toml"
    config.write_text('[pipelines.trips]\ntopic = "rides"\nvalue = "fare"\n')
    args = ["--format", "csv", "--snapshot-dir", str(tmp_path), "--config", str(config)]
    shown = run_kappa(["snapshot", "trips", *args])
    assert shown.returncode == 0 and shown.stdout.count(b"\r\n") == 2, shown.stderr
    unknown = run_kappa(["snapshot", "other", *args])
    assert unknown.returncode == 2 and b"no pipeline 'other' in" in unknown.stderr, unknown.stderr


def test_load_with_several_key_fields_says_where_they_belong(tmp_path):
    data = tmp_path / "rows.csv"
    data.write_text("city,vendor,fare\na,b,1\n")
    result = kappa_cli("load", str(data), "--key", "city,vendor", "--broker", f"127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert "names one column (the message key)" in result.stderr and "--key city,vendor" in result.stderr


def test_kafka_start_on_a_machine_without_the_jars_resolves_them(tmp_path):
    """A fresh machine has no jar cache: the first start copies the broker's jars with Maven,
    from the pom in this checkout, then runs the broker."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name not in ("KAPPA_KAFKA_POM", "KAPPA_KAFKA_LIBS")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    data = tmp_path / "data"
    try:
        started = run_kappa(
            ["kafka", "start", "--port", str(port), "--data-dir", str(data)], env=env, timeout=900, text=True
        )
        assert started.returncode == 0, started.stderr
        assert f"127.0.0.1:{port}" in started.stdout
        [libs] = (tmp_path / "cache" / "kappa").glob("kafka-4.1.0-*")  # and the pom's digest
        assert (libs / ".resolved").exists() and any(libs.glob("kafka_2.13-*.jar"))
    finally:
        run_kappa(["kafka", "stop", "--data-dir", str(data)], env=env, timeout=60)


def test_the_jar_cache_follows_the_pom_and_ignores_empty_settings(tmp_path, monkeypatch):
    """A changed pom resolves into a directory of its own; a variable set but empty is unset, not the
    current directory; a missing pom is one line saying what to set."""
    from kappa.kafka import broker

    pom = tmp_path / "pom.xml"
    pom.write_bytes(broker.POM.read_bytes())
    monkeypatch.setattr(broker, "POM", pom)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KAPPA_KAFKA_LIBS", "")
    first = broker.jar_cache()
    assert first.parent == tmp_path / "cache" / "kappa" and first.name.startswith("kafka-4.1.0-")
    pom.write_bytes(pom.read_bytes().replace(b"</project>", b"<!-- another log4j -->\n</project>"))
    assert broker.jar_cache() != first and broker.jar_cache().parent == first.parent
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert broker.jar_cache().parent == Path.home() / ".cache" / "kappa"
    monkeypatch.setattr(broker, "POM", tmp_path / "absent.xml")
    with pytest.raises(KappaError, match="KAPPA_KAFKA_POM"):
        broker.jar_cache()


@pytest.mark.parametrize(
    "start",
    [
        "from kappa.ops.cli import main; main(['snapshot', 'nothing', '--snapshot-dir', {tmp!r}])",
        # a batch replay and a worker process: right before their Faust worker starts
        "from kappa.engine.app import prepare_for_worker; prepare_for_worker()",
    ],
)
def test_a_command_started_with_the_collector_off_turns_it_on(tmp_path, start):
    """A kappa command starts with the garbage collector off (kappa.ops.cli.main); one that left
    it off would never collect a reference cycle."""
    probe = f"import gc; gc.disable(); {start.format(tmp=str(tmp_path))}; print(gc.isenabled(), gc.get_threshold()[0])"
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert found.stdout.split()[-2:] == ["True", str(GC_YOUNG_THRESHOLD)], found.stdout + found.stderr
