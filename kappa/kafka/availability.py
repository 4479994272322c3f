"""Say, in one line, when a pipeline's partitions have no reachable leader, and when they are back.

While a broker is down, the clients underneath kappa only retry: Faust logs a twelve-line
"Stream has not started processing" block per partition after minutes, aiokafka logs
connection errors and tracebacks, and a replay otherwise looks hung. A leader watch asks
the cluster which partitions of the pipeline's topics have a leader, and probes each leader
with a TCP connect, since a cluster that has lost its quorum keeps naming dead leaders. The
user gets one line naming the partitions and the unreachable brokers, at most every
REPEAT_S seconds, and one line when everything has a leader again; meanwhile the clients'
own noise about it is held back (kappa.engine.lognoise) because this line says it better.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaException

from kappa.errors import KappaError
from kappa.kafka import admin

REPEAT_S = 30.0
CHECK_EVERY_S = 2.5
PROBE_TIMEOUT_S = 1.0
# after an outage ends, clients still report it for a while: their reconnect errors for
# seconds, Faust's stall report (which waits minutes before it speaks) for longer
CLIENT_ERRORS_AFTER_S = 30.0
STALL_REPORTS_AFTER_S = 360.0


class _Recent:
    """When this process last saw an outage (read by log filters on any thread)."""

    active = False
    ended_at: float | None = None
    watching = False  # a leader watch runs in this process


def mark_outage(active: bool) -> None:
    """Record that an outage began or ended (also for tests of the log filters)."""
    if _Recent.active and not active:
        _Recent.ended_at = time.monotonic()
    _Recent.active = active


def watched() -> bool:
    """True once a leader watch runs in this process: it, not the clients, reports dead brokers."""
    return _Recent.watching


def outage_recent(within_s: float) -> bool:
    """True while a watch in this process sees an outage, and for `within_s` after it ended."""
    if _Recent.active:
        return True
    return _Recent.ended_at is not None and time.monotonic() - _Recent.ended_at < within_s


@dataclass(frozen=True)
class Outage:
    """Partitions without a reachable leader, by topic, and the brokers that do not answer."""

    partitions: dict[str, list[int]]
    brokers: list[str]
    no_cluster: bool = False

    def line(self) -> str:
        where = "; ".join(f"{topic} [{_ranges(parts)}]" for topic, parts in sorted(self.partitions.items()))
        down = ", ".join(self.brokers) or "none known"
        if self.no_cluster:
            return f"no Kafka broker answers (tried {down}); waiting for the cluster to come back"
        count = sum(len(parts) for parts in self.partitions.values())
        return (
            f"{count} partition(s) have no reachable leader: {where}; unreachable broker(s): {down}; "
            "waiting for them, work goes on when they are back"
        )


def _ranges(numbers: Iterable[int]) -> str:
    """0,1,2,5 -> '0-2,5': a wide topic's partitions stay on one line."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


class LeaderWatch:
    """Which partitions of `topics` have no reachable leader, as the cluster and the network say."""

    def __init__(self, broker: str, topics: Iterable[str]) -> None:
        self.broker = broker
        self.topics = list(dict.fromkeys(topics))
        self.addresses: dict[int, str] = {}  # every broker ever listed: a dead one drops out of metadata

    def check(self) -> Outage | None:
        try:
            metadata = admin.admin(self.broker).list_topics(timeout=CHECK_EVERY_S)
        except KafkaException:
            return Outage({}, self.broker.split(","), no_cluster=True)
        for broker_id, info in metadata.brokers.items():
            self.addresses[broker_id] = f"{info.host}:{info.port}"
        down = {
            broker_id
            for broker_id, address in self.addresses.items()
            if broker_id not in metadata.brokers or not _reachable(address)
        }
        missing: dict[str, list[int]] = {}
        for topic in self.topics:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None:
                continue
            leaderless = [p for p, part in info.partitions.items() if part.leader < 0 or part.leader in down]
            if leaderless:
                missing[topic] = sorted(leaderless)
        if not missing:
            return None
        return Outage(missing, [f"{b} ({self.addresses[b]})" for b in sorted(down)])


def stderr_line(text: str) -> None:
    prefix = "\r\x1b[2K" if sys.stderr.isatty() else ""  # over a progress bar being redrawn
    print(prefix + text, file=sys.stderr, flush=True)


class OutageReporter:
    """Runs a watch and prints its outage line: at once, then at most every `repeat_s`;
    one line when it is over. With `emit=None` it only tells the log filters."""

    def __init__(
        self,
        watch: LeaderWatch,
        label: str,
        emit: Callable[[str], None] | None = stderr_line,
        repeat_s: float = REPEAT_S,
    ) -> None:
        self.watch = watch
        self.label = label
        self.emit = emit
        self.repeat_s = repeat_s
        self.current: Outage | None = None
        _Recent.watching = True
        self._since: float | None = None
        self._last_line: float | None = None

    def poll(self) -> Outage | None:
        """Check once; print what is news. Safe to call from a thread."""
        outage = self.watch.check()
        now = time.monotonic()
        if outage is not None:
            mark_outage(True)
            if self._since is None:
                self._since = now
            if self._last_line is None or now - self._last_line >= self.repeat_s:
                self._say(f"{self.label}: {outage.line()}")
                self._last_line = now
        elif self.current is not None:
            self._say(f"{self.label}: every partition has a leader again after {now - (self._since or now):.0f}s")
            self._since = self._last_line = None
            mark_outage(False)
        self.current = outage
        return outage

    def _say(self, text: str) -> None:
        if self.emit is not None:
            self.emit(text)


class ReporterThread(threading.Thread):
    """Polls a reporter every CHECK_EVERY_S seconds beside a synchronous loop (the supervisor)."""

    def __init__(self, reporter: OutageReporter, every_s: float = CHECK_EVERY_S) -> None:
        super().__init__(name="kappa-outages", daemon=True)
        self.reporter = reporter
        self.every_s = every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.reporter.poll()
            except Exception:  # a watch must never take the worker down; the next poll retries
                continue

    def stop(self) -> None:
        self.stopped.set()


def wait_for_leaders(broker: str, topics: list[str], label: str, timeout: float | None) -> None:
    """Return once every partition of `topics` has a reachable leader; say why while waiting.

    Raises KappaError after `timeout` seconds (None: wait as long as it takes).
    """
    from kappa.errors import KappaError

    reporter = OutageReporter(LeaderWatch(broker, topics), label)
    deadline = None if timeout is None else time.monotonic() + timeout
    while (outage := reporter.poll()) is not None:
        if deadline is not None and time.monotonic() >= deadline:
            raise KappaError(
                f"{label}: gave up after --timeout {timeout:g}s: {outage.line().split('; waiting')[0]}; "
                "restart the broker(s) and run it again"
            )
        time.sleep(min(CHECK_EVERY_S, max(deadline - time.monotonic(), 0.1)) if deadline else CHECK_EVERY_S)


@dataclass(frozen=True)
class ShortOfReplicas:
    """A topic's partitions that have fewer replicas in sync than assigned."""

    topic: str
    partitions: list[int]
    replicas: int  # assigned to each of them (the most any has)
    in_sync: int  # the fewest in sync among them
    out_of_sync: list[int]  # the brokers that hold a replica but are not in sync
    min_insync: int | None
    leaderless: bool = False  # some of them have no leader

    def line(self) -> str:
        count = len(self.partitions)
        text = (
            f"topic {self.topic!r}: {count} partition(s) [{_ranges(self.partitions)}] have {self.in_sync} of "
            f"{self.replicas} replicas in sync (not: {', '.join(map(str, self.out_of_sync))})"
        )
        if self.leaderless:
            return text + ": some have no leader; reads and writes of them wait until a replica is back"
        if self.min_insync is not None and self.in_sync < self.min_insync:
            return text + (
                f"; writes to them are refused now (min.insync.replicas {self.min_insync}) until a missing "
                "broker is back"
            )
        if self.min_insync is not None and self.in_sync - 1 < self.min_insync:
            return text + (
                f"; one more broker's death stops writes to them (min.insync.replicas {self.min_insync}) until "
                "the missing broker is back"
            )
        return text + "; the cluster copies them again once the missing broker is back"


@dataclass(frozen=True)
class ClusterHealth:
    """What one metadata read says about the cluster's brokers and some topics' replicas.

    A dead broker drops out of the broker list, but the partitions it held still name it as a
    replica: those are the brokers that do not answer. The bootstrap addresses are probed too,
    since a user names brokers by address, not by id."""

    answering: list[int]
    silent: list[int]
    silent_addresses: list[str]
    short: list[ShortOfReplicas]

    def broker_line(self) -> str:
        count = len(self.answering)
        text = f"{count} broker answers" if count == 1 else f"{count} brokers answer"
        if len(self.silent) == 1:
            text += f"; broker {self.silent[0]} does not answer, though partitions name it as a replica"
        elif self.silent:
            ids = ", ".join(map(str, self.silent))
            text += f"; brokers {ids} do not answer, though partitions name them as replicas"
        if self.silent_addresses:
            text += f"; no answer from {', '.join(self.silent_addresses)}"
        return text


def cluster_health(broker: str, topics: Iterable[str]) -> ClusterHealth:
    """The brokers that answer and those that do not, and which of `topics`' partitions are
    short of in-sync replicas (missing topics are left out)."""
    try:
        metadata = admin.admin(broker).list_topics(timeout=10)
    except KafkaException as exc:
        raise KappaError(f"cannot read the cluster's metadata from {broker}: {exc.args[0].str()}") from None
    answering = set(metadata.brokers)
    named = {
        replica for info in metadata.topics.values() for part in info.partitions.values() for replica in part.replicas
    }
    short = []
    for topic in dict.fromkeys(topics):
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            continue
        thin = {p: part for p, part in info.partitions.items() if len(part.isrs) < len(part.replicas)}
        if not thin:
            continue
        out_of_sync = sorted({r for part in thin.values() for r in part.replicas if r not in part.isrs})
        short.append(
            ShortOfReplicas(
                topic,
                sorted(thin),
                max(len(part.replicas) for part in thin.values()),
                min(len(part.isrs) for part in thin.values()),
                out_of_sync,
                admin.topic_config_int(broker, topic, "min.insync.replicas"),
                any(part.leader < 0 for part in thin.values()),
            )
        )
    bootstrap = [address.strip() for address in broker.split(",") if address.strip()]
    return ClusterHealth(
        sorted(answering),
        sorted(named - answering),
        [address for address in bootstrap if not _reachable(address)],
        short,
    )
