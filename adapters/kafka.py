"""Kafka plumbing every process shares: topic creation, producer settings, exact end offsets,
consumer groups' lag.

The topic table itself is the contract (:mod:`schemas.topics`); this module is the
confluent-kafka side of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.settings import Settings
from schemas.topics import ALL_TOPICS


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create every missing topic; return the names created. Idempotent."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "client.id": settings.kafka.client_id})
    new = []
    for spec in ALL_TOPICS:
        config = {"cleanup.policy": "compact" if spec.compacted else "delete"}
        if spec.retention_ms is not None:
            config["retention.ms"] = str(spec.retention_ms)
        new.append(NewTopic(spec.name(settings), settings.kafka.partitions, settings.kafka.replication_factor, config=config))
    created = []
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except Exception as exc:  # KafkaException wrapping a KafkaError
            err = exc.args[0] if exc.args else None
            if getattr(err, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def producer_config(settings: Settings, **extra: object) -> dict[str, object]:
    """confluent-kafka producer settings every radstream producer shares.

    ``murmur2_random`` is the Java client's partitioner, which Faust (aiokafka) uses
    too: a study's events from a gateway and from a stream stage must land on the same
    partition number, or Faust tables keyed by study would not be co-partitioned.
    Idempotence follows ``kafka.producer_idempotence`` (see :class:`gateways.publisher.EventPublisher`).
    """
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": settings.kafka.client_id,
        "partitioner": "murmur2_random",
        "enable.idempotence": settings.kafka.producer_idempotence,
        "acks": "all",
        **extra,
    }


class EndOffsetsTimeout(TimeoutError):
    """The true end of a partition could not be read in time (broker down or restarting)."""


def end_offsets(bootstrap: str, partitions: list[tuple[str, int]], timeout_s: float = 10.0,
                settle_s: float = 1.0) -> dict[tuple[str, int], int]:
    """The offset after the last record of each ``(topic, partition)``, exactly.

    Not ListOffsets(latest) alone: Tansu 0.6 answers it with the *base* offset of the
    partition's last record batch + 1, so a batch of 3 records reads as 1. So each
    non-empty partition is read from its reported end - 1 on: it is done at end-of-partition,
    or once the reported last record has come and then nothing more for ``settle_s`` -- after
    a SIGKILL Tansu may serve a partition's last batch with a fetch high watermark inside it,
    and end-of-partition then never comes (its end was under-read, and a table recovered short
    of its last changelog records). On Kafka this reads one record each.
    Raises :class:`EndOffsetsTimeout` rather than return an end it could not confirm.
    """
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "radstream-end-offsets",
                         "enable.auto.commit": False, "enable.partition.eof": True, "fetch.wait.max.ms": 50})
    try:
        ends: dict[tuple[str, int], int] = {}
        lows: dict[tuple[str, int], int] = {}
        for topic, partition in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
            lows[(topic, partition)], ends[(topic, partition)] = max(low, 0), max(high, 0)
        reported = dict(ends)
        pending = {key for key, high in ends.items() if high > lows[key]}
        last_record: dict[tuple[str, int], float] = {}  # when each partition last gave a record at or past reported - 1
        if pending:
            consumer.assign([TopicPartition(t, p, max(lows[(t, p)], ends[(t, p)] - 1)) for t, p in sorted(pending)])
            deadline = time.monotonic() + timeout_s
            while pending and time.monotonic() < deadline:
                msg = consumer.poll(0.1)
                now = time.monotonic()
                if msg is not None:
                    key = (msg.topic(), msg.partition())
                    if msg.error() is None:
                        ends[key] = max(ends[key], msg.offset() + 1)
                        if msg.offset() >= reported[key] - 1:
                            last_record[key] = now
                    elif msg.error().code() == KafkaError._PARTITION_EOF:
                        ends[key] = max(ends[key], msg.offset())
                        pending.discard(key)
                pending -= {key for key, at in last_record.items() if now - at >= settle_s}
            if pending:  # an under-reported end is worse than none: its reader would skip records silently
                raise EndOffsetsTimeout(f"could not read to the end of {', '.join(f'{t}[{p}]' for t, p in sorted(pending))} "
                                        f"within {timeout_s:g}s; the broker may be restarting")
        return ends
    finally:
        consumer.close()


@dataclass(frozen=True)
class GroupLag:
    """How far one consumer group is behind on one topic, summed over its partitions."""

    group: str
    topic: str
    partitions: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return self.end - self.committed


def consumer_lag(bootstrap: str, accept: Callable[[str], bool] = lambda group: True,
                 timeout_s: float = 10.0) -> list[GroupLag]:
    """Every accepted consumer group's committed offsets against the topics' exact ends
    (:func:`end_offsets`), by group and topic. A partition the group never committed counts
    from the partition's start: its records are all still to read."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "client.id": "radstream-lag", "log_level": 3})
    listing = admin.list_consumer_groups(request_timeout=timeout_s).result(timeout=timeout_s)
    groups = sorted(g.group_id for g in listing.valid if accept(g.group_id))
    committed: dict[str, dict[tuple[str, int], int]] = {}
    for group in groups:  # the client asks one group per request
        future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)],
                                                   request_timeout=timeout_s)[group]
        offsets = future.result(timeout=timeout_s).topic_partitions or []
        committed[group] = {(tp.topic, tp.partition): tp.offset for tp in offsets if tp.error is None}
    pairs = sorted({pair for offsets in committed.values() for pair in offsets})
    ends = end_offsets(bootstrap, pairs, timeout_s) if pairs else {}
    lows: dict[tuple[str, int], int] = {}
    if pairs:
        from confluent_kafka import Consumer

        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "radstream-lag", "log_level": 3})
        try:
            for topic, partition in pairs:
                low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
                lows[(topic, partition)] = max(low, 0)
        finally:
            consumer.close()
    rows = []
    for group in groups:
        for topic in sorted({t for t, _ in committed[group]}):
            parts = {p: o for (t, p), o in committed[group].items() if t == topic}
            done = sum(o if o >= 0 else lows[(topic, p)] for p, o in parts.items())
            rows.append(GroupLag(group, topic, len(parts), done, sum(ends[(topic, p)] for p in parts)))
    return rows
