"""The engine seam's import guard: a Faust, aiokafka or mode release without a member kappa relies
on stops kappa with one line naming the library and both versions, never a hang. No broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.errors import CommitFailedError, GroupAuthorizationFailedError, IllegalStateError
from faust.transport.consumer import Consumer
from faust.transport.consumer import Fetcher as FaustFetcher
from faust.types import TP
from mode.worker import Worker

from kappa.engine import faust_internals
from kappa.engine.faust_internals import EngineMismatch, check_internals
from tests.helpers import REPO


@pytest.fixture
def newer_releases(monkeypatch):
    """Pretend newer releases are installed, so the message shows found and expected apart."""
    found = {"faust-streaming": "0.16.0", "aiokafka": "0.15.0", "mode-streaming": "0.8.0"}
    monkeypatch.setattr(faust_internals, "installed_version", found.__getitem__)


def test_the_installed_releases_pass():
    check_internals()


def test_a_renamed_drain_messages_is_one_clear_line(monkeypatch, newer_releases):
    monkeypatch.delattr(Consumer, "_drain_messages")
    with pytest.raises(EngineMismatch) as raised:
        check_internals()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("faust-streaming 0.16.0 is installed, but kappa's engine seam")
    assert "written for faust-streaming 0.15.3" in message
    assert "faust.transport.consumer.Consumer._drain_messages is missing" in message


def test_a_drain_messages_faust_no_longer_calls_is_caught(monkeypatch, newer_releases):
    async def fetcher_that_drains_otherwise(self) -> None:
        await self.app.consumer.drain_everything(self)

    monkeypatch.setattr(FaustFetcher, "_fetcher", fetcher_that_drains_otherwise)
    with pytest.raises(EngineMismatch, match=r"Fetcher._fetcher no longer uses _drain_messages"):
        check_internals()


def test_a_changed_stop_on_signal_is_caught(monkeypatch, newer_releases):
    async def stop_on_signal(self, signal, grace):
        await self.stop()

    monkeypatch.setattr(Worker, "_stop_on_signal", stop_on_signal)
    with pytest.raises(EngineMismatch) as raised:
        check_internals()
    assert str(raised.value).startswith("mode-streaming 0.8.0 is installed")
    assert "written for mode-streaming 0.7.1" in str(raised.value)
    assert "Worker._stop_on_signal takes (signal, grace), not (signal)" in str(raised.value)


def test_a_stop_on_signal_mode_no_longer_calls_is_caught(monkeypatch, newer_releases):
    def schedule_shutdown(self, signal):
        self.loop.create_task(self.stop())

    monkeypatch.setattr(Worker, "_schedule_shutdown", schedule_shutdown)
    with pytest.raises(EngineMismatch, match=r"Worker._schedule_shutdown no longer uses _stop_on_signal"):
        check_internals()


def test_partition_records_no_longer_looked_up_by_name_is_caught(monkeypatch, newer_releases):
    async def proc_fetch_request(self, assignment, node_id, request):
        return None

    monkeypatch.setattr(Fetcher, "_proc_fetch_request", proc_fetch_request)
    with pytest.raises(EngineMismatch) as raised:
        check_internals()
    assert str(raised.value).startswith("aiokafka 0.15.0 is installed")
    assert "_proc_fetch_request no longer uses PartitionRecords" in str(raised.value)


def test_the_cli_prints_the_mismatch_as_one_line_instead_of_running():
    """The guard runs when the seam is imported: a replay fails before it touches a broker."""
    script = (
        "import faust.transport.consumer as c; del c.Consumer._drain_messages\n"
        "from kappa.ops.cli import main\n"
        "raise SystemExit(main(['replay', '--topic', 't', '--value', 'v', '--batch', '--broker', '127.0.0.1:9']))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kappa: error: faust-streaming 0.15.3 is installed, but kappa's engine seam")
    assert "Consumer._drain_messages is missing" in lines[0]


def test_commands_that_only_name_a_generation_do_not_import_faust():
    """`kappa status`, `kappa gc`, and the supervisors of `kappa worker` and of a replay beside live
    name a generation's topics but run no Faust app: importing Faust costs each about 0.3 s of
    CPU, which under a CPU quota per process delays every worker the supervisor starts."""
    modules = ["kappa.ops.cli", "kappa.ops.status", "kappa.lifecycle.switchover", "kappa.lifecycle.worker"]
    loaded = "print(sorted(m for m in ('faust', 'aiokafka') if m in sys.modules))"
    probe = f"import sys; import {', '.join(modules)}; {loaded}"
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout + found.stderr


def test_the_command_line_starts_without_pyarrow():
    """`import kappa` (which every command does) leaves pyarrow and numpy, 0.2 s of imports, to
    the commands that read or write tables; `kappa.read_snapshot` still works."""
    probe = (
        "import sys, kappa, kappa.ops.cli; before = sorted(m for m in ('pyarrow', 'numpy') if m in sys.modules); "
        "from kappa import read_snapshot; print(before, read_snapshot.__module__)"
    )
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[] kappa.snapshots.snapshot", found.stdout + found.stderr


def test_a_worker_process_imports_faust_without_aiohttp():
    """Faust imports aiohttp only to name a type in faust.types.web; the seam imports Faust with
    a stand-in for that one name (0.1 s of every worker's start). Nothing a batch replay or a
    worker process imports brings the real aiohttp in, and the stand-in is gone afterwards."""
    probe = (
        "import sys, kappa.lifecycle.replay, kappa.lifecycle.process, kappa.engine.app; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp')); "
        "import aiohttp.client, faust.types.web; print(aiohttp.client.ClientSession.__module__, "
        "faust.types.web.HttpClientT is aiohttp.client.ClientSession)"
    )
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.split("\n")[:2] == ["[]", "aiohttp.client False"], found.stdout + found.stderr


def test_faust_types_that_no_longer_import_with_the_stand_in_is_one_clear_line():
    """If a Faust release wants more of aiohttp at import than the stand-in holds, kappa stops
    with the seam's one line, and the stand-in is not left behind."""
    script = (
        "import sys, importlib.abc\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'yarl': raise ImportError('cannot import name URL (simulated)')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from kappa.ops.cli import main\n"
        "try:\n"
        "    main(['replay', '--topic', 't', '--value', 'v', '--batch', '--broker', '127.0.0.1:9'])\n"
        "finally:\n"
        "    print('aiohttp.client' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kappa: error: faust-streaming 0.15.3 is installed, but kappa's engine seam")
    assert "faust.types does not import with kappa's aiohttp stand-in" in lines[0]
    assert result.stdout.strip() == "False"


def test_faust_imported_after_aiohttp_uses_the_real_one():
    probe = "import aiohttp, kappa.engine.app, faust.types.web as w; print(w.HttpClientT is aiohttp.ClientSession)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "True", found.stdout + found.stderr


class _Thread:
    """What `KappaConsumerThread._commit` uses of Faust's consumer thread: its aiokafka consumer,
    its view of the assignment, its commit bookkeeping and `crash`."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.committed: list[dict] = []
        self.crashed: list[BaseException] = []
        self.tp_last_committed_at: dict = {}
        self.log = faust_internals.COMMIT_LOG

    def assignment(self) -> set:
        return {TP("t", 0), TP("t", 1)}

    def _ensure_consumer(self) -> _Thread:
        return self

    async def commit(self, offsets: dict) -> None:
        if self.error is not None:
            raise self.error
        self.committed.append({(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()})

    async def crash(self, exc: BaseException) -> None:
        self.crashed.append(exc)


def _commit(thread: _Thread, offsets: dict) -> bool:
    return asyncio.run(faust_internals.KappaConsumerThread._commit(thread, offsets))  # type: ignore[arg-type]


def test_a_commit_commits_the_owned_partitions_only():
    thread = _Thread(None)
    assert _commit(thread, {TP("t", 0): 5, TP("t", 7): 9}) is True
    assert thread.committed == [{("t", 0): 5}] and set(thread.tp_last_committed_at) == {TP("t", 0)}
    assert _commit(thread, {TP("t", 7): 9}) is False and len(thread.committed) == 1


@pytest.mark.parametrize(
    "error", [IllegalStateError("No partitions assigned"), CommitFailedError("the group has already rebalanced")]
)
def test_a_commit_a_rebalance_overtook_is_skipped_not_fatal(error):
    """Faust crashes the consumer, and so the worker, on these; the table holds the offsets anyway."""
    thread = _Thread(error)
    assert _commit(thread, {TP("t", 0): 5}) is False
    assert thread.crashed == []


def test_any_other_commit_error_still_crashes_the_consumer():
    thread = _Thread(GroupAuthorizationFailedError())
    assert _commit(thread, {TP("t", 0): 5}) is False
    assert len(thread.crashed) == 1
