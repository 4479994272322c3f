"""Peers that do not run in kappa's venv, set up by the bench itself before any timing.

- `kafka_streams`: kappa/bench/kstreams (a small Java program), built with Maven against
  kafka-streams 4.1.0 from Maven Central; run with the machine's `java`.
- `bytewax`, `pathway`: each in its own venv (their pins conflict with kappa's lock, or are not in it),
  installed from PyPI with pip; run kappa/bench/peer_flows.py with that venv's interpreter.
- `plot`: matplotlib for `--plot`, in its own venv unless kappa's venv already has it.

Everything lands under the peers directory (default <workdir>/peers; `make bench` keeps one in
~/.cache so the second run installs nothing). A setup that fails (no network, no JDK, a build
error) raises `Unavailable`; the bench reports the peer as "unavailable: <reason>" and goes on.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KSTREAMS = HERE / "kstreams"
PEER_FLOWS = HERE / "peer_flows.py"
PLOT = HERE / "plot.py"
SETUP_TIMEOUT_S = 1200

# what each Python peer's venv gets: the framework pinned, plus what peer_flows.py imports
VENV_PACKAGES = {
    "bytewax": ["bytewax[kafka]==0.21.1", "orjson"],
    "pathway": ["pathway==0.33.0"],
    "plot": ["matplotlib"],
}


class Unavailable(Exception):
    """A peer that cannot be set up here; its message is the reason shown in the table."""


def _run(command: list[str], what: str, log: Path) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Unavailable(f"{what} failed: {error}") from None
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line or "error" in line.lower()] or lines
        reason = errors[0][:200] if errors else f"exit {done.returncode}"
        raise Unavailable(f"{what} failed ({reason.strip()}; see {log})")


def _sources_newer(than: Path) -> bool:
    built = than.stat().st_mtime
    return any(path.stat().st_mtime > built for path in KSTREAMS.rglob("*") if path.is_file())


def kafka_streams(peers_dir: Path) -> list[str]:
    """The command prefix that runs the Kafka Streams program (built here on first use)."""
    java, javac, mvn = shutil.which("java"), shutil.which("javac"), shutil.which("mvn")
    if java is None or javac is None or mvn is None:
        raise Unavailable("needs a JDK and mvn (apt-get install openjdk-17-jdk-headless maven)")
    build = peers_dir / "kafka_streams"
    jar = build / "bench-kafka-streams-1.jar"
    if not jar.exists() or _sources_newer(jar):
        build.mkdir(parents=True, exist_ok=True)
        print(f"  setup: building the Kafka Streams contender with Maven into {build}", flush=True)
        _run([mvn, "-q", "-B", "-f", str(KSTREAMS / "pom.xml"), f"-Dbench.build={build}", "package",
              "dependency:copy-dependencies", f"-DoutputDirectory={build / 'lib'}"],
             "the Maven build", peers_dir / "kafka_streams-build.log")  # fmt: skip
        if not jar.exists():
            raise Unavailable(f"the Maven build made no {jar.name}")
    return [java, "-cp", f"{jar}:{build / 'lib'}/*", "dev.kappa.bench.KafkaStreamsBench"]


def venv_python(name: str, peers_dir: Path) -> Path:
    """A venv of its own for `name` (VENV_PACKAGES), made and installed from PyPI on first use."""
    venv = peers_dir / f"venv-{name}"
    python = venv / "bin" / "python"
    ready = venv / ".kappa-bench-ready"
    wanted = "\n".join(VENV_PACKAGES[name])
    if ready.exists() and ready.read_text() == wanted:
        return python
    peers_dir.mkdir(parents=True, exist_ok=True)
    print(f"  setup: installing {' '.join(VENV_PACKAGES[name])} into {venv} from PyPI", flush=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    if not python.exists():
        _run([base, "-m", "venv", str(venv)], f"making the {name} venv", peers_dir / f"venv-{name}.log")
    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *VENV_PACKAGES[name]],
         f"pip install {' '.join(VENV_PACKAGES[name])}", peers_dir / f"venv-{name}.log")  # fmt: skip
    ready.write_text(wanted)
    return python


def python_peer(name: str, peers_dir: Path) -> list[str]:
    return [str(venv_python(name, peers_dir)), str(PEER_FLOWS), name]


def setup(name: str, peers_dir: Path) -> list[str]:
    """The command prefix for an external peer; raises Unavailable with the reason."""
    if name == "kafka_streams":
        return kafka_streams(peers_dir)
    return python_peer(name, peers_dir)


def plot_python(peers_dir: Path) -> str:
    """An interpreter with matplotlib: kappa's own if it has one, else the bench's plot venv."""
    if importlib.util.find_spec("matplotlib") is not None:
        return sys.executable
    return str(venv_python("plot", peers_dir))
