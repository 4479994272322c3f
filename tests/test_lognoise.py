"""Client error storms are folded into one line per window, with the count of what was folded."""

from __future__ import annotations

import logging

from kappa.engine.lognoise import RepeatFolder, RoutineWarningDemoter


def test_repeats_are_folded_and_counted(caplog):
    logger = logging.getLogger("aiokafka.test-folding")
    folder = RepeatFolder(window_s=0.0)
    folder.window_s = 3600.0
    logger.addFilter(folder)
    try:
        with caplog.at_level(logging.ERROR, logger="aiokafka.test-folding"):
            for attempt in range(500):
                logger.error("Unable connect to node with id %s: %s", 1, attempt)
            logger.error("a different problem")
            folder.window_s = 0.0
            logger.error("Unable connect to node with id %s: %s", 1, "last")
    finally:
        logger.removeFilter(folder)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "Unable connect to node with id 1: 0",
        "a different problem",
        lines[2],
    ]
    assert lines[2].startswith("Unable connect to node with id 1: last (499 more like this in the last")


def test_routine_rebalance_warning_is_logged_at_info(caplog):
    logger = logging.getLogger("aiokafka.test-demoting")
    logger.addFilter(RoutineWarningDemoter())
    try:
        with caplog.at_level(logging.WARNING, logger="aiokafka.test-demoting"):
            logger.warning("Heartbeat failed for group %s because it is rebalancing", "kappa-p-g2")
            logger.warning("Heartbeat failed for group %s: coordinator (node %s)", "kappa-p-g2", 1)
        assert [record.getMessage() for record in caplog.records] == [
            "Heartbeat failed for group kappa-p-g2: coordinator (node 1)"
        ]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="aiokafka.test-demoting"):
            logger.warning("Heartbeat failed for group %s because it is rebalancing", "kappa-p-g2")
        assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
            ("INFO", "Heartbeat failed for group kappa-p-g2 because it is rebalancing")
        ]
    finally:
        logger.filters.clear()


def test_fausts_warning_of_missing_sensor_state_is_logged_at_info(caplog):
    """Faust warns on a rebalance it has no sensor state for, which kappa's apps never have:
    a replay by 4 processes on a slow machine printed four such warnings."""
    from kappa.engine.app import quiet_faust_noise

    quiet_faust_noise()
    logger = logging.getLogger("faust.app.base")
    with caplog.at_level(logging.WARNING, logger="faust.app.base"):
        logger.warning("[^-App]: Missing sensor state for rebalance #%s", 2)
        logger.warning("[^-App]: Missing sensor state for rebalance end #%s", 2)
        logger.warning("[^-App]: something else %s", 2)
    assert [record.getMessage() for record in caplog.records] == ["[^-App]: something else 2"]


def test_the_reports_of_a_rebalance_after_a_process_died_are_logged_at_info(caplog):
    """After a worker process was killed, the survivor printed aiokafka's refused commit as an
    error and mode's overlapping commit timer as a warning, which read like faults to fix."""
    from kappa.engine.app import quiet_faust_noise

    quiet_faust_noise()
    coordinator, timers = logging.getLogger("aiokafka.consumer.group_coordinator"), logging.getLogger("mode.timers")
    with caplog.at_level(logging.WARNING):
        coordinator.error(
            "OffsetCommit failed for group %s due to group error (%s), will rejoin", "kappa-p-g1", "IllegalGeneration"
        )
        timers.warning("Timer %s is overlapping (interval=%r runtime=%r)", "kappa.commit_pending", 1.0, 2.5)
        timers.warning("Timer %s is overlapping (interval=%r runtime=%r)", "kappa.trips.parts", 0.1, 0.18)
        timers.warning("Timer %s is overlapping (interval=%r runtime=%r)", "kappa.watch", 1.0, 2.5)  # a blocked loop
        coordinator.error("OffsetCommit failed for group %s - %s", "kappa-p-g1", "another error")
        coordinator.warning("Marking the coordinator dead (node %s)for group %s.", 1, "kappa-p-g1")  # a clean stop
    shown = [record.getMessage() for record in caplog.records]
    assert shown == [
        "Timer kappa.watch is overlapping (interval=1.0 runtime=2.5)",
        "OffsetCommit failed for group kappa-p-g1 - another error",
    ]


def test_client_outage_noise_is_held_back_only_during_an_outage():
    from kappa.engine.lognoise import HeldBackDuringOutage
    from kappa.kafka import availability

    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, (), None)

    stall = record(
        "faust.transport.drivers.aiokafka",
        logging.ERROR,
        "Stream has not started processing TP(...) There are multiple possible explanations",
    )
    connect = record("aiokafka.conn", logging.ERROR, "Unable connect to node with id 1")
    ours = record("kappa.lifecycle.process", logging.ERROR, "could not write snapshot parts")
    held_back = HeldBackDuringOutage()
    assert all(held_back.filter(r) for r in (stall, connect, ours)), "no outage: everything passes"
    availability.mark_outage(True)
    try:
        assert not held_back.filter(stall) and not held_back.filter(connect)
        assert held_back.filter(ours), "kappa's own errors always pass"
    finally:
        availability.mark_outage(False)
        availability._Recent.ended_at = None
    assert held_back.filter(stall) and held_back.filter(connect)
    # what aiokafka said in the first second of an outage, before the watch's first check
    first_second = [
        record("aiokafka", logging.ERROR, "Unable to update metadata from [1]"),
        record("aiokafka.consumer.group_coordinator", logging.WARNING,
               "Heartbeat failed for group kappa-p-g1: coordinator (node 1) is either not started or not valid"),
        record("aiokafka.consumer.group_coordinator", logging.ERROR,
               "Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError"),
        record("aiokafka.producer.sender", logging.WARNING,
               "Got error produce response on topic-partition TopicPartition(topic='c', partition=1), retrying. "
               "Error: <class 'aiokafka.errors.NotLeaderForPartitionError'>"),
    ]  # fmt: skip
    assert all(held_back.filter(r) for r in first_second), "where no watch runs, they are the only word"
    availability._Recent.watching = True  # a watch reports dead brokers; aiokafka need not
    try:
        assert not any(held_back.filter(r) for r in first_second)
        assert not held_back.filter(connect) and held_back.filter(stall)
    finally:
        availability._Recent.watching = False
