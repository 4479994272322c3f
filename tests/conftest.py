"""Fixtures: one real Kafka broker for the whole session (and a 3-node cluster for the tests
that ask for it); every test gets its own topics and dirs. Helpers are in tests/helpers.py."""

from __future__ import annotations

import os
import re

import pytest

from kappa.kafka import broker as embedded
from tests.helpers import Cluster, Kappa, free_port, free_port_block


def pytest_sessionstart(session: pytest.Session) -> None:
    """With pytest-xdist, the broker's jars are resolved once, before any worker starts a broker:
    two Maven runs filling one repository at once can corrupt it."""
    if not hasattr(session.config, "workerinput"):
        embedded.resolve_jars()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    """A 3-node KRaft cluster (RF 3, min.insync.replicas 2) for the whole session; tests that
    kill nodes restart them before they end. Only tests/test_cluster.py uses it: `make test`
    runs the suite with pytest-xdist's `--dist loadfile`, which keeps a file on one worker, so
    one cluster is started, not one per worker."""
    data_dir = tmp_path_factory.mktemp("cluster")
    address = embedded.start(data_dir, free_port_block(6), nodes=3)
    try:
        yield Cluster(address, data_dir)
    finally:
        embedded.stop(data_dir)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> str:
    """The broker address: $KAPPA_TEST_BROKER if set, else an embedded broker for this session."""
    external = os.environ.get("KAPPA_TEST_BROKER")
    if external:
        yield external
        return
    data_dir = tmp_path_factory.mktemp("broker")
    address = embedded.start(data_dir, free_port())
    try:
        yield address
    finally:
        embedded.stop(data_dir)


@pytest.fixture
def kappa(kafka, tmp_path, request) -> Kappa:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return Kappa(kafka, tmp_path / "data", tmp_path / "snapshots", name)


@pytest.fixture
def cluster_kappa(cluster, tmp_path, request) -> Kappa:
    """Like `kappa`, against the 3-node cluster; any node a test killed is started again."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    yield Kappa(cluster.address, tmp_path / "data", tmp_path / "snapshots", name)
    if not all(node.running for node in cluster.nodes()):
        cluster.restart()


@pytest.fixture
def live(kappa):
    """Start `kappa worker` supervisors for this test; every one is killed at teardown."""
    from kappa.kafka.admin import ensure_topic
    from tests.live import kill_group, start_worker

    started = []

    def run(topic: str, partitions: int, processes: int = 2, interval: float = 1.0, value: str = "amount"):
        ensure_topic(kappa.broker, topic, partitions)
        worker = start_worker(kappa, topic, value, "city", processes, interval)
        worker.partitions = partitions
        started.append(worker)
        return worker

    yield run
    for worker in started:
        kill_group(worker)
