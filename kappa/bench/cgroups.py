"""CPU quotas per process (cgroup v1 cpu controller), to simulate one core per process.

On a machine of 2 shared cores, 4 worker processes cannot each have a core. A quota of, say,
0.25 CPU per process makes each one a "small core": if kappa's throughput grows with processes
under the same per-process quota, it would grow with real cores too. Each kappa worker process
gets a group of its own, created under /sys/fs/cgroup/cpu/kappa-bench-<pid>/ and removed afterwards.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

CPU_ROOT = Path(os.environ.get("KAPPA_BENCH_CGROUP_CPU", "/sys/fs/cgroup/cpu"))
PERIOD_US = 100_000


def unavailable_reason() -> str | None:
    """None when this process may make cpu groups with a quota; else why not."""
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CPU_ROOT}"
    probe = CPU_ROOT / f"kappa-bench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        try:
            (probe / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (probe / "cpu.cfs_quota_us").write_text(str(PERIOD_US // 2))
        finally:
            probe.rmdir()
    except OSError as error:
        return f"cannot make a cpu group with a quota under {CPU_ROOT}: {error.strerror or error}"
    return None


class CpuGroups:
    """Named groups of `cpus` CPU each; `close()` moves stragglers out and removes them all."""

    def __init__(self, cpus: float, label: str = "") -> None:
        self.cpus = cpus
        self.base = CPU_ROOT / f"kappa-bench-{os.getpid()}{label}"
        self.base.mkdir(exist_ok=True)
        self.groups: dict[str, Path] = {}
        self.placed: dict[int, str] = {}

    def group(self, name: str) -> Path:
        path = self.groups.get(name)
        if path is None:
            path = self.base / name
            path.mkdir(exist_ok=True)
            (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(round(self.cpus * PERIOD_US)))
            self.groups[name] = path
        return path

    def place(self, pid: int, name: str) -> None:
        (self.group(name) / "cgroup.procs").write_text(str(pid))
        self.placed[pid] = name

    def throttled_s(self) -> dict[str, float]:
        """Seconds each group spent throttled (cpu.stat throttled_time, ns)."""
        out = {}
        for name, path in self.groups.items():
            found = re.search(r"throttled_time (\d+)", (path / "cpu.stat").read_text())
            out[name] = int(found.group(1)) / 1e9 if found else 0.0
        return out

    def close(self) -> None:
        for path in [*self.groups.values(), self.base]:
            if not path.exists():
                continue
            for _ in range(50):
                try:
                    for pid in (path / "cgroup.procs").read_text().split():
                        with open(CPU_ROOT / "cgroup.procs", "w") as root:
                            root.write(pid)
                    path.rmdir()
                    break
                except ProcessLookupError:
                    continue
                except OSError:
                    time.sleep(0.1)
        self.groups.clear()

    def __enter__(self) -> CpuGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WORKER_INDEX = re.compile(rb"worker-(?:process|standby)\x00.*?--index\x00(\d+)", re.S)


class WorkerPlacer:
    """Called with the process group's id while a replay runs: moves each kappa worker process
    (`kappa worker-process --index i`, or `kappa worker-standby --index i` before it has work)
    into group `worker-i` as soon as it appears. The supervisor starts in group `supervisor`
    (see `enter_supervisor_group`), so no process escapes a quota."""

    def __init__(self, groups: CpuGroups) -> None:
        self.groups = groups

    def __call__(self, pgid: int) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in self.groups.placed:
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    if int(stat.read().rsplit(b")", 1)[1].split()[2]) != pgid:
                        continue
                with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                    found = WORKER_INDEX.search(cmdline.read())
                if found:
                    self.groups.place(int(entry.name), f"worker-{int(found.group(1))}")
            except (OSError, ValueError, IndexError):
                continue


def enter_supervisor_group(groups: CpuGroups):
    """A preexec_fn: the child joins the `supervisor` group before it execs."""
    procs = groups.group("supervisor") / "cgroup.procs"

    def enter() -> None:
        with open(procs, "w") as own:
            own.write("0")

    return enter
