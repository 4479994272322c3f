"""Keep worker logs readable: fold client errors that repeat, demote routine warnings.

While a broker is down, aiokafka logs "Unable connect to node" thousands of times a second
(300k lines in a 30 s outage, measured). One line per message template per window carries
the same information for an operator, plus a count of what was folded into it.

aiokafka also warns when a heartbeat meets a rebalance, which happens every time a process
joins a group (each start of a replay with several processes); it is logged at info here.
"""

from __future__ import annotations

import logging
import re
import time

REPEAT_WINDOW_S = 10.0


class RepeatFolder(logging.Filter):
    """Pass a message template's first record, then at most one per window with a count."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self._last_passed: dict[tuple[str, object], float] = {}
        self._folded: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        template = (record.name, record.msg)
        now = time.monotonic()
        last = self._last_passed.get(template)
        if last is not None and now - last < self.window_s:
            self._folded[template] = self._folded.get(template, 0) + 1
            return False
        folded = self._folded.pop(template, 0)
        if folded and last is not None:
            record.msg = f"{record.msg} ({folded} more like this in the last {now - last:.0f}s)"
        self._last_passed[template] = now
        return True


ROUTINE_WARNINGS = (
    "Heartbeat failed for group %s because it is rebalancing",
    # Faust, on a rebalance it has no sensor state for: it has none whenever no sensor is
    # installed, as in kappa's apps; seen as four warnings on a replay by 4 slow processes
    "Missing sensor state for rebalance #%s",
    "Missing sensor state for rebalance end #%s",
    # the rebalance after a process of the group died: a commit from the old group generation
    # is refused (aiokafka logs it as an error, then rejoins), and the commit timer's run that
    # waited for it overlaps its interval; the next commit catches up
    "OffsetCommit failed for group %s due to group error (%s), will rejoin",
    "Timer %s is overlapping (interval=%r runtime=%r)",
    # a heartbeat or commit that failed against the group coordinator, seen on every clean stop
    # (the broker answers the last heartbeat after the member left) and on a coordinator move;
    # a broker that is really gone is said in one line by kappa.kafka.availability
    "Marking the coordinator dead (node %s)for group %s.",
)
# an overlapping timer is routine only for the commit timer, which waits on the rebalance, and
# the parts timer (kappa.lifecycle.process), whose 0.1 s tick while a replay catches up is
# shorter than writing a big partition's part takes; any other (the event loop blocked) is
# worth a warning
ROUTINE_ONLY_FOR = {
    "Timer %s is overlapping (interval=%r runtime=%r)": re.compile(
        r"kappa\.(commit_pending|flush_stalled_cache|.+\.parts)"
    ),
}


class RoutineWarningDemoter(logging.Filter):
    """Log the warnings (and errors) in ROUTINE_WARNINGS at info: shown only where info is
    enabled. A template may follow a prefix (mode's service loggers add the service's name)."""

    def filter(self, record: logging.LogRecord) -> bool:
        routine_level = record.levelno in (logging.WARNING, logging.ERROR)
        if not routine_level or not str(record.msg).endswith(ROUTINE_WARNINGS):
            return True
        only_for = ROUTINE_ONLY_FOR.get(str(record.msg))
        if only_for is not None and not (
            isinstance(record.args, tuple) and record.args and only_for.fullmatch(str(record.args[0]))
        ):
            return True
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def _client_loggers(library: str) -> list[logging.Logger]:
    return [
        logger
        for name, logger in list(logging.root.manager.loggerDict.items())
        if (name == library or name.startswith(f"{library}.")) and isinstance(logger, logging.Logger)
    ]


def fold_repeated_client_errors(window_s: float = REPEAT_WINDOW_S) -> None:
    """Filter every aiokafka logger, and demote Faust's routine warnings; a logger's filter only
    sees records logged to it."""
    import aiokafka  # noqa: F401  (creates its module loggers)

    folder, demoter = RepeatFolder(window_s), RoutineWarningDemoter()
    for logger in _client_loggers("aiokafka"):
        logger.addFilter(demoter)
        logger.addFilter(folder)
    for logger in [*_client_loggers("faust"), *_client_loggers("mode")]:
        logger.addFilter(demoter)


# how Faust's stall report begins its explanation (faust.transport.drivers.aiokafka)
FAUST_STALL_REPORT = "There are multiple possible explanations"
CLIENT_LOGGERS = ("aiokafka", "faust", "mode", "kafka")


def _is_client_error(record: logging.LogRecord) -> bool:
    """A warning or error of the Kafka clients, or a traceback of a Kafka or network error."""
    if record.levelno < logging.WARNING:
        return False
    if record.name.split(".")[0] in CLIENT_LOGGERS:
        return True
    if record.exc_info and record.exc_info[1] is not None:
        from aiokafka.errors import KafkaError

        return isinstance(record.exc_info[1], KafkaError | OSError | TimeoutError)
    return False


# what aiokafka says when it cannot talk to one broker (aiokafka/conn.py, client.py, consumer/),
# and, in the first second of an outage, when the broker it asked is gone: its metadata, group
# coordinator and a produce it retries (seen before the watch's first check in a worker and a replay)
CONNECTION_ERRORS = (
    "KafkaConnectionError",
    "NodeNotReadyError",
    "Unable connect",
    "Connect call failed",
    "Unable to update metadata from",
    "is either not started or not valid",
    "GroupCoordinatorNotAvailableError",
    "NotLeaderForPartitionError",
)


def _is_connection_error(record: logging.LogRecord) -> bool:
    if not record.name.startswith("aiokafka") or record.levelno < logging.WARNING:
        return False
    text = record.getMessage() if record.args else str(record.msg)
    return any(marker in text for marker in CONNECTION_ERRORS)


class HeldBackDuringOutage(logging.Filter):
    """While partitions have no reachable leader (kappa.kafka.availability says so in one line),
    the clients' own reports of it are held back: Faust's stall block, which names every
    partition in twelve lines, aiokafka's connection errors and Kafka error tracebacks.

    Where a leader watch runs, aiokafka's connection errors are held back from the start:
    they come in the very second a broker dies, seconds before the watch's next check, and
    the watch reports a dead broker whenever it matters (it leads a partition we read)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kappa.kafka.availability import CLIENT_ERRORS_AFTER_S, STALL_REPORTS_AFTER_S, outage_recent, watched

        if watched() and _is_connection_error(record):
            return False
        if record.levelno < logging.WARNING or not outage_recent(STALL_REPORTS_AFTER_S):
            return True
        if FAUST_STALL_REPORT in str(record.msg):
            return False
        return not (_is_client_error(record) and outage_recent(CLIENT_ERRORS_AFTER_S))


def hold_back_during_outages(logger: logging.Logger) -> None:
    """Filter every handler of `logger` (the root logger, once Faust has set it up): a
    handler's filter sees records of every module, including loggers made later."""
    for handler in logger.handlers:
        if not any(isinstance(existing, HeldBackDuringOutage) for existing in handler.filters):
            handler.addFilter(HeldBackDuringOutage())
