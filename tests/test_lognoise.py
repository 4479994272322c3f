"""Client error storms are folded into one line per window, with the count of what was folded."""

from __future__ import annotations

import logging

from kappa.lognoise import RepeatFolder, RoutineWarningDemoter


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
