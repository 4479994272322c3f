"""Reading a bounded range of a topic's records: ledgers, dead letters, field samples.

Each reader kappa needs outside the engine reads some partitions from a start offset up to an
end it knows (a watermark) and stops there. One function does it for all of them, with the
same stop rule (the range's last offset, or the partition's end) and the same stall limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from kappa.errors import KappaError
from kappa.kafka import admin

STALL_S = 60.0
MAX_BATCH = 10_000


def read_ranges(
    broker: str,
    topic: str,
    ranges: dict[int, tuple[int, int]],
    on_message: Callable[[Message], None],
    *,
    group: str,
    stall_s: float = STALL_S,
    to_end: bool = False,
    **config: object,
) -> None:
    """Call `on_message` for every record of `topic` in [start, end) per partition, in offset
    order per partition. A read that makes no progress for `stall_s` seconds fails in one line.

    The read is `read_committed` (librdkafka's default): records of aborted transactions are
    skipped, and a partition's commit and abort markers hold no record, so a range may end
    without one at `end - 1`; the partition's end-of-partition event says where reading got.
    That event comes at the end of what is readable now, the first offset of a transaction
    still open: with `to_end` a partition is done only once that is `end` or past it (a
    transaction open below `end` is waited for until it is committed or aborted), without it
    at the first such event (for ends taken as end_offsets are, which no transaction straddles)."""
    todo = {p: (start, end) for p, (start, end) in ranges.items() if end > start}
    if not todo:
        return
    consumer = Consumer(
        admin.client_config(
            broker,
            **{
                "group.id": group,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",  # a start offset that retention removed reads what is left
                **config,
            },
        )
    )

    def done(partition: int) -> None:
        todo.pop(partition)
        consumer.pause([TopicPartition(topic, partition)])  # what librdkafka fetched past its range is dropped

    try:
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in todo.items()])
        last_progress = time.monotonic()
        while todo:
            # consume() returns before its timeout only once it has the messages asked for: keep the wait short
            batch = consumer.consume(_batch_size(todo), timeout=0.05)
            if batch:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall_s:
                raise KappaError(
                    f"reading topic {topic!r} stalled for {stall_s:g}s with partitions {sorted(todo)} unread: "
                    "check that the broker is up, then run the same command again"
                )
            for message in batch:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001 (a documented librdkafka code)
                        partition = message.partition()
                        if partition in todo and (not to_end or message.offset() >= todo[partition][1]):
                            done(partition)
                        continue
                    raise KappaError(f"could not read topic {topic!r}: {error.str()}")
                partition = message.partition()
                if partition not in todo:
                    continue
                on_message(message)
                if message.offset() >= todo[partition][1] - 1:
                    done(partition)
    finally:
        consumer.close()


def _batch_size(todo: dict[int, tuple[int, int]]) -> int:
    """How many messages to take off librdkafka's queue at once: no more than the largest range
    still unread holds. A broker returns whole producer batches (a loaded
    topic's hold thousands of rows), and the queue holds them in fetch order, so asking for
    10,000 to read 100 rows of each partition took every partition's first batches into Python
    (140,000 messages to sample 800, 0.15-0.2 s of CPU); a partition that is done is paused,
    which drops what was fetched past it before it is taken."""
    return max(1, min(MAX_BATCH, max(end - start for start, end in todo.values())))
