"""Narrow interface to Kafka's admin side: readiness, topics and offsets.

confluent-kafka (librdkafka) does this work: it is the one client here whose admin calls are
fast and complete, and the loader uses it to produce at full speed.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, ConsumerGroupState, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic, ResourceType

from kappa.errors import KappaError
from kappa.kafka import security

T = TypeVar("T")
_quiet = logging.getLogger("kappa.librdkafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False

UNLIMITED_RETENTION = {"retention.ms": "-1", "retention.bytes": "-1"}


class _AuthErrors:
    """Remembers authentication failures librdkafka reports, to explain a timeout."""

    last: str | None = None

    @classmethod
    def record(cls, error) -> None:
        # librdkafka's local error codes start with an underscore; they are documented constants
        if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):  # noqa: SLF001
            cls.last = error.str()


def client_config(broker: str, **extra: object) -> dict:
    """librdkafka settings shared by every client kappa builds, credentials included."""
    return {
        "bootstrap.servers": broker,
        "logger": _quiet,
        "error_cb": _AuthErrors.record,
        **security.from_environment().librdkafka(),
        **extra,
    }


def admin(broker: str) -> AdminClient:
    """The process's admin client for `broker` (and the credentials now in the environment).

    A new client costs a connection and a metadata round trip, 0.1-0.2 s, and a command makes
    several admin calls; one client reconnects by itself, to any broker of the cluster it has
    learned of, when one goes away."""
    credentials = tuple(sorted(security.from_environment().librdkafka().items()))
    return _admin_client(broker, credentials)


@functools.lru_cache(maxsize=16)
def _admin_client(broker: str, credentials: tuple[tuple[str, str], ...]) -> AdminClient:
    # librdkafka lets a producer-type handle (an admin client is one) ask the broker to create a
    # topic its metadata request names; on a cluster with auto.create.topics.enable (Kafka's
    # default), asking for a missing topic's partitions would make it
    return AdminClient(client_config(broker, **{"allow.auto.create.topics": False}, **dict(credentials)))


REACH_SLICE_S, REACH_PAUSE_S = 0.5, 0.05  # see wait_until_reachable


def wait_until_reachable(broker: str, timeout: float = 10.0, **overrides: object) -> None:
    """Fail fast, in one line, when nothing answers at `broker` or it refuses our credentials.

    Asked in slices of REACH_SLICE_S: a Ctrl-C is handled only once librdkafka's call returns,
    so one call of `timeout` held it for up to 10 s, and then the unreachable broker's error
    could be reported instead of the interrupt."""
    _AuthErrors.last = None
    # the process's client when nothing is overridden: the commands' next admin calls then
    # reuse the connection this check has made
    client = AdminClient(client_config(broker, **overrides)) if overrides else admin(broker)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_topics(timeout=max(min(REACH_SLICE_S, deadline - time.monotonic()), 0.01))
            return
        except KafkaException as exc:
            failure = exc
        client.poll(0)  # serves error_cb, which is how an authentication failure is reported
        if _AuthErrors.last or time.monotonic() >= deadline:
            break
        time.sleep(REACH_PAUSE_S)  # a refused connection may fail at once: no busy loop
    if _AuthErrors.last:
        raise KappaError(
            f"authentication to the Kafka broker at {broker} failed ({_AuthErrors.last}): check "
            "KAPPA_SASL_USERNAME / KAPPA_SASL_PASSWORD and KAPPA_SECURITY_PROTOCOL"
        ) from None
    raise KappaError(
        f"cannot reach the Kafka broker at {broker} within {timeout:g}s ({failure.args[0].str()}): "
        "start one with `kappa kafka start`, or pass --broker HOST:PORT / set KAPPA_BROKER"
    ) from None


def partition_count(broker: str, topic: str, timeout: float = 10.0) -> int | None:
    """The topic's partition count, or None when it does not exist."""
    try:
        metadata = admin(broker).list_topics(topic=topic, timeout=timeout)
    except KafkaException as exc:
        raise KappaError(f"cannot read metadata for topic {topic!r} from {broker}: {exc.args[0].str()}") from None
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        return None
    return len(info.partitions)


def topic_id(broker: str, topic: str, timeout: float = 30.0) -> str:
    """The id Kafka gave the topic when it was created: a re-created topic of the same name has another."""
    from confluent_kafka import TopicCollection

    client = admin(broker)  # must outlive its futures
    try:
        described = client.describe_topics(TopicCollection([topic]), request_timeout=timeout)[topic]
        return str(described.result(timeout=timeout + 1).topic_id)
    except KafkaException as exc:
        raise KappaError(f"cannot describe topic {topic!r} on {broker}: {exc.args[0].str()}") from None
    except TimeoutError:  # the future's own timeout (a running worker asks every few seconds: it must not crash)
        raise KappaError(f"cannot describe topic {topic!r} on {broker}: no answer within {timeout:g}s") from None


def require_partition_count(broker: str, topic: str) -> int:
    count = partition_count(broker, topic)
    if count is None:
        raise KappaError(
            f"topic {topic!r} does not exist on {broker}: load data first with "
            f"`kappa load FILE --key K --topic {topic}`"
        )
    return count


@dataclass(frozen=True)
class Replication:
    """How the topics kappa creates are replicated on one cluster.

    `factor` is the cluster's default.replication.factor, never more than its brokers (a
    single laptop broker gives 1), unless the user chose one. `min_insync` is factor - 1 from
    three replicas on: an acks=all write then survives one dead broker and still lands on two.
    `use_broker_default` asks CreateTopics for the broker's own default (-1, KIP-464).
    """

    factor: int
    min_insync: int
    brokers: int
    use_broker_default: bool = False

    @property
    def topic_config(self) -> dict[str, str]:
        return {"min.insync.replicas": str(self.min_insync)}

    @property
    def create_factor(self) -> int:
        return -1 if self.use_broker_default else self.factor


def min_insync_for(factor: int) -> int:
    return factor - 1 if factor >= 3 else 1


_replication_cache: dict[tuple[str, int | None], Replication] = {}


def replication(broker: str, requested: int | None = None) -> Replication:
    """The replication of every topic kappa creates on `broker`'s cluster; asked once per process.

    Faust needs a concrete factor for its changelog and assignor topics, so the default is
    read from the cluster (its brokers' default.replication.factor, capped at the broker
    count) rather than left to each CreateTopics call.
    """
    cached = _replication_cache.get((broker, requested))
    if cached is not None:
        return cached
    client = admin(broker)
    try:
        metadata = client.list_topics(timeout=10)
    except KafkaException as exc:
        wait_until_reachable(broker, timeout=5)  # says why in its own words: unreachable, or credentials refused
        raise KappaError(f"cannot read the cluster's brokers from {broker}: {exc.args[0].str()}") from None
    brokers = len(metadata.brokers)
    if requested is not None:
        if requested > brokers:
            raise KappaError(
                f"replication factor {requested} was asked for, but the cluster at {broker} has {brokers} "
                "broker(s): pass a --replication-factor (or KAPPA_REPLICATION_FACTOR) of at most that"
            )
        found = Replication(requested, min_insync_for(requested), brokers)
    else:
        default = _default_replication_factor(client, sorted(metadata.brokers))
        if default is None:  # not allowed to read broker configs: as many as there are, up to 3
            found = Replication(min(brokers, 3), min_insync_for(min(brokers, 3)), brokers)
        else:
            factor = max(1, min(default, brokers))
            found = Replication(factor, min_insync_for(factor), brokers, use_broker_default=factor == default)
    _replication_cache[(broker, requested)] = found
    return found


def _default_replication_factor(client: AdminClient, broker_ids: list[int]) -> int | None:
    if not broker_ids:
        return None
    resource = ConfigResource(ResourceType.BROKER, str(broker_ids[0]))
    try:
        entries = client.describe_configs([resource])[resource].result(timeout=10)
    except KafkaException:
        return None
    entry = entries.get("default.replication.factor")
    try:
        return int(entry.value) if entry is not None and entry.value is not None else None
    except ValueError:
        return None


def ensure_topic(
    broker: str,
    topic: str,
    partitions: int,
    config: Mapping[str, str] | None = None,
    replication_factor: int | None = None,
) -> bool:
    """Create `topic` if missing, replicated as the cluster allows (kappa.kafka.admin.replication);
    returns True when it was created here."""
    if partition_count(broker, topic) is not None:
        return False
    chosen = replication(broker, replication_factor)
    client = admin(broker)  # must outlive its futures
    futures = client.create_topics(
        [
            NewTopic(
                topic,
                num_partitions=partitions,
                replication_factor=chosen.create_factor,
                config={**chosen.topic_config, **(config or {})},
            )
        ]
    )
    created = True
    try:
        futures[topic].result(timeout=30)
    except KafkaException as exc:
        if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise KappaError(f"could not create topic {topic!r} on {broker}: {exc.args[0].str()}") from None
        created = False
    _wait_until_led(client, broker, topic, PROPAGATION_SETTLE_S if chosen.brokers > 1 else 0.0)
    return created


def grow_partitions(broker: str, topic: str, at_least: int) -> None:
    """Give an existing `topic` at least `at_least` partitions (partitions are only ever added)."""
    found = partition_count(broker, topic)
    if found is None or found >= at_least:
        return
    client = admin(broker)  # must outlive its futures
    try:
        client.create_partitions([NewPartitions(topic, at_least)])[topic].result(timeout=30)
    except KafkaException as exc:
        if exc.args[0].name() != "INVALID_PARTITIONS":  # another process added them first
            raise KappaError(f"could not add partitions to topic {topic!r} on {broker}: {exc.args[0].str()}") from None
    except TimeoutError:
        raise KappaError(f"could not add partitions to topic {topic!r} on {broker}: no answer within 30s") from None
    deadline = time.monotonic() + 30.0
    while (partition_count(broker, topic) or 0) < at_least:  # the metadata shows the new partitions
        if time.monotonic() > deadline:
            raise KappaError(f"topic {topic!r} on {broker} did not show {at_least} partitions within 30s")
        time.sleep(0.1)
    _wait_until_led(client, broker, topic, PROPAGATION_SETTLE_S if replication(broker).brokers > 1 else 0.0)


PROPAGATION_SETTLE_S = 0.15


def _wait_until_led(client: AdminClient, broker: str, topic: str, settle: float, timeout: float = 30.0) -> None:
    """Return once `topic` shows a leader for every partition and has kept showing it for
    `settle` seconds (PROPAGATION_SETTLE_S on a cluster, 0 on a single broker).

    The controller acknowledges a creation before the brokers have applied it, and a metadata
    request goes to whichever broker the client picks: on a 3-node cluster, a request right after
    `create_topics` missed the new topic 23 times in 40, and once one broker showed it, another
    could still miss it for up to 35 ms (measured over 30 creations). A caller that describes,
    counts or reads the topic next would find it missing. librdkafka cannot address one broker, so
    the wait is for a settle time well above that lag, spent only when there is more than one broker."""
    deadline = time.monotonic() + timeout
    shown_since: float | None = None
    while True:
        now = time.monotonic()
        if _shows_led(client, topic):
            shown_since = now if shown_since is None else shown_since
            if now - shown_since >= settle:
                return
        else:
            shown_since = None
        if now > deadline:
            raise KappaError(
                f"topic {topic!r} was created on {broker} but does not show a leader for every partition "
                f"after {timeout:.0f} s: check the cluster's brokers (kappa kafka status)"
            )
        time.sleep(0.02)


def _shows_led(client: AdminClient, topic: str) -> bool:
    """True when the broker the client asks shows `topic` with a leader for every partition."""
    try:
        info = client.list_topics(topic=topic, timeout=5).topics.get(topic)
    except KafkaException:
        return False
    if info is None or info.error is not None or not info.partitions:
        return False
    return all(partition.leader >= 0 for partition in info.partitions.values())


@dataclass(frozen=True)
class TopicReplication:
    """What a topic has: its fewest replicas over partitions, and its min.insync.replicas."""

    topic: str
    replicas: int
    min_insync: int | None


def topic_replication(broker: str, topics: list[str]) -> dict[str, TopicReplication]:
    """Existing topics among `topics` with their replication; missing ones are left out."""
    client = admin(broker)
    try:
        metadata = client.list_topics(timeout=10)
    except KafkaException as exc:
        raise KappaError(f"cannot read topic metadata from {broker}: {exc.args[0].str()}") from None
    found = {}
    for topic in topics:
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            continue
        replicas = min(len(partition.replicas) for partition in info.partitions.values())
        found[topic] = TopicReplication(topic, replicas, _topic_min_insync(client, topic))
    return found


def _topic_min_insync(client: AdminClient, topic: str) -> int | None:
    return _topic_config_int(client, topic, "min.insync.replicas")


def topic_config_int(broker: str, topic: str, name: str) -> int | None:
    """`topic`'s integer config `name` (its own or the broker's default), or None when it cannot be read."""
    return _topic_config_int(admin(broker), topic, name)


def _topic_config_int(client: AdminClient, topic: str, name: str) -> int | None:
    """A topic's integer config `name`, or None when it cannot be read (also when the broker asked
    does not answer within 10 s: a stalled broker, say, frozen while the cluster still counts it in)."""
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        entries = client.describe_configs([resource])[resource].result(timeout=10)
    except (KafkaException, TimeoutError):
        return None
    entry = entries.get(name)
    return int(entry.value) if entry is not None and entry.value is not None else None


def delete_topics(broker: str, topics: list[str]) -> None:
    if not topics:
        return
    client = admin(broker)  # must outlive its futures
    for topic, future in client.delete_topics(topics, operation_timeout=30).items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].name() != "UNKNOWN_TOPIC_OR_PART":
                raise KappaError(f"could not delete topic {topic!r}: {exc.args[0].str()}") from None


WATERMARK_PATIENCE_S = 60.0


def watermarks(broker: str, topic: str, partitions: int, *, stable: bool = True) -> dict[int, tuple[int, int]]:
    """(log start, log end) per partition: the cut a batch run stops at, and truncation.

    The log end is the last stable offset (librdkafka asks for it as its consumers read,
    `read_committed`): the first offset of a transaction still open, else the high watermark.
    Every record below it is committed or aborted for good. `stable=False` gives the high
    watermark itself, which counts the records of open transactions too.

    A partition whose leader just died answers again once the cluster has elected another
    (seconds on a replicated topic), so a failed read is retried for a while before giving
    up, each time with a new client: librdkafka may otherwise keep asking the dead leader.
    """
    deadline = time.monotonic() + WATERMARK_PATIENCE_S
    found: dict[int, tuple[int, int]] = {}
    isolation = "read_committed" if stable else "read_uncommitted"
    while True:
        consumer = Consumer(
            client_config(
                broker, **{"group.id": "kappa-watermarks", "enable.auto.commit": False, "isolation.level": isolation}
            )
        )
        try:
            for p in range(partitions):
                if p not in found:
                    found[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            return found
        except KafkaException as exc:
            if time.monotonic() >= deadline:
                missing = ", ".join(str(p) for p in range(partitions) if p not in found)
                raise KappaError(
                    f"could not read offsets of topic {topic!r} (partition {missing}) within "
                    f"{WATERMARK_PATIENCE_S:g}s: {exc.args[0].str()}; is its leader's broker down?"
                ) from None
        finally:
            consumer.close()
        time.sleep(1.0)


def end_offsets(broker: str, topic: str, partitions: int) -> dict[int, int]:
    return {p: high for p, (_, high) in watermarks(broker, topic, partitions).items()}


def high_watermarks(broker: str, topic: str, partitions: int) -> dict[int, int]:
    """Each partition's high watermark: past every record it has committed, those of transactions
    still open included (end_offsets stops at the first of those)."""
    return {p: high for p, (_, high) in watermarks(broker, topic, partitions, stable=False).items()}


def _retrying(call: Callable[[], T], failure: str, absent: str | None = None, timeout: float = 30.0) -> T | None:
    """Group calls meet a coordinator that is still loading or moving (a fresh or restarted
    broker) and fail for a few seconds; retry them, and return None for the `absent` error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            if absent is not None and error.name() == absent:
                return None
            if time.monotonic() > deadline:
                raise KappaError(f"{failure}: {error.str() or error.name()}") from None
            time.sleep(0.5)


class OffsetCommitter:
    """Sets a (memberless) consumer group's committed offsets, e.g. to a batch run's exact cut.

    Through a consumer of its own, never subscribed: the process's admin client took 8 ms, but
    its AlterConsumerGroupOffsets is sent once, and with the group's coordinator just dead it
    timed out where the consumer's commit finds the new coordinator and retries (a batch replay
    on the 3-node cluster exited 2 after a broker was killed mid-read). The consumer looks for
    the coordinator as soon as it is made: a commit through one made for it took about 60 ms,
    through one made 0.3 s before, 8 ms in 3 runs of 4 (60 ms in the fourth). Use it as a
    context manager: it is closed on every path."""

    def __init__(self, broker: str, group: str) -> None:
        self.group = group
        self._consumer = Consumer(client_config(broker, **{"group.id": group, "enable.auto.commit": False}))

    def commit(self, topic: str, offsets: dict[int, int]) -> None:
        try:
            self._consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
        except KafkaException as exc:
            raise KappaError(f"could not commit offsets for group {self.group!r}: {exc.args[0].str()}") from None

    def __enter__(self) -> OffsetCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._consumer.close()


def committed_offsets(broker: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """A group's committed next offset per partition (None where it has committed nothing)."""
    consumer = Consumer(client_config(broker, **{"group.id": group, "enable.auto.commit": False}))
    try:
        committed = _retrying(
            lambda: consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10),
            f"could not read committed offsets of group {group!r}",
        )
    finally:
        consumer.close()
    return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in committed or ()}


def delete_consumer_group(broker: str, group: str, timeout: float = 60.0) -> None:
    """Delete a consumer group once its members have left (retrying while it is not empty)."""
    deadline = time.monotonic() + timeout
    while True:
        client = admin(broker)  # must outlive its futures
        future = client.delete_consumer_groups([group], request_timeout=10)[group]
        try:
            future.result(timeout=15)
            return
        except KafkaException as exc:
            name = exc.args[0].name()
            if name == "GROUP_ID_NOT_FOUND":
                return
            if name != "NON_EMPTY_GROUP" or time.monotonic() > deadline:
                raise KappaError(f"could not delete consumer group {group!r}: {exc.args[0].str()}") from None
        time.sleep(1.0)


def group_members(broker: str, group: str) -> int | None:
    """How many members a consumer group has, or None when the broker does not know the group
    (never created, or deleted; a group with only committed offsets counts as known)."""
    client = admin(broker)  # must outlive its futures
    described = _retrying(
        lambda: client.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15),
        f"could not describe consumer group {group!r}",
        absent="GROUP_ID_NOT_FOUND",
    )
    if described is None or described.state == ConsumerGroupState.DEAD:
        return None
    return len(described.members)


def retention_ms(broker: str, topic: str) -> int | None:
    """The topic's retention.ms (-1 = unlimited), or None when it cannot be read."""
    return _topic_config_int(admin(broker), topic, "retention.ms")
