"""Topic definitions: name, schema, key and retention of every radstream topic.

Every study topic is keyed by StudyInstanceUID so that all events of a study land on
one partition and one worker; orders are keyed by accession number until they meet
their images. Topics that hold state (the worklist) are compacted. ``ensure_topics``
creates missing topics and leaves existing ones alone, so every process may call it
at start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from schemas.events import (
    Alert,
    AssemblyTimer,
    AuditEvent,
    DeadLetter,
    InferenceResult,
    InstanceReceived,
    OrderReceived,
    PriorComparison,
    Record,
    RoutingDecision,
    StudyAssembled,
    StudyDeidentified,
    StudyLink,
    WorklistUpdate,
)
from schemas.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    suffix: str
    event: type[Record]
    key: str  # the event field used as the Kafka key
    compacted: bool = False
    retention_ms: int | None = None

    def name(self, settings: Settings) -> str:
        return settings.topic(self.suffix)


INSTANCE_RECEIVED = TopicSpec("instance.received", InstanceReceived, "study_uid")
ORDER_RECEIVED = TopicSpec("order.received", OrderReceived, "accession_number")
STUDY_ASSEMBLED = TopicSpec("study.assembled", StudyAssembled, "study_uid")
STUDY_DEIDENTIFIED = TopicSpec("study.deidentified", StudyDeidentified, "study_uid")
INFERENCE_RESULT = TopicSpec("inference.result", InferenceResult, "study_uid")
PRIOR_COMPARISON = TopicSpec("prior.comparison", PriorComparison, "study_uid")
ROUTING_DECISION = TopicSpec("routing.decision", RoutingDecision, "study_uid")
WORKLIST_UPDATE = TopicSpec("worklist.update", WorklistUpdate, "study_uid", compacted=True)
ALERT = TopicSpec("alert", Alert, "study_uid")
AUDIT = TopicSpec("audit", AuditEvent, "trace_id")
DEAD_LETTER = TopicSpec("deadletter", DeadLetter, "key")
#: internal: clock ticks for open studies, co-partitioned with instance.received
ASSEMBLY_TIMER = TopicSpec("assembly.timer", AssemblyTimer, "study_uid", retention_ms=3_600_000)
#: internal: assembled studies re-keyed by accession number, co-partitioned with order.received
STUDY_BY_ACCESSION = TopicSpec("orders.study-by-accession", StudyAssembled, "accession_number")
#: an order joined to a study (``study_uid`` and the study's ``trace_id`` set), keyed by study for routing
STUDY_ORDER = TopicSpec("study.order", OrderReceived, "study_uid")
#: identified zone: original study UID <-> de-identified study UID, read by the worklist sink only
STUDY_LINK = TopicSpec("study.link", StudyLink, "study_uid")
#: identified zone: instances held back by de-identification (possible burned-in PHI), with the reason
DEID_QUARANTINE = TopicSpec("deid.quarantine", DeadLetter, "key")
#: the de-identified zone: every event here must be free of PHI (``radstream phi-scan`` checks)
DEIDENTIFIED_TOPICS: tuple[TopicSpec, ...] = (STUDY_DEIDENTIFIED,)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    INSTANCE_RECEIVED,
    ORDER_RECEIVED,
    STUDY_ASSEMBLED,
    STUDY_DEIDENTIFIED,
    INFERENCE_RESULT,
    PRIOR_COMPARISON,
    ROUTING_DECISION,
    WORKLIST_UPDATE,
    ALERT,
    AUDIT,
    DEAD_LETTER,
    ASSEMBLY_TIMER,
    STUDY_BY_ACCESSION,
    STUDY_ORDER,
    STUDY_LINK,
    DEID_QUARANTINE,
)


def key_of(spec: TopicSpec, event: Record) -> bytes | None:
    value = getattr(event, spec.key, None)
    return value.encode() if value else None


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
    """
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": settings.kafka.client_id,
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
        "acks": "all",
        **extra,
    }


def end_offsets(bootstrap: str, partitions: list[tuple[str, int]], timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """The offset after the last record of each ``(topic, partition)``, exactly.

    Not ListOffsets(latest) alone: Tansu 0.6 answers it with the *base* offset of the
    partition's last record batch + 1, so a batch of 3 records reads as 1. Fetch
    responses carry the true high watermark, so each non-empty partition is read from
    its reported end - 1 to end-of-partition. On Kafka that reads one record each.
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
        pending = {key for key, high in ends.items() if high > lows[key]}
        if pending:
            consumer.assign([TopicPartition(t, p, max(lows[(t, p)], ends[(t, p)] - 1)) for t, p in sorted(pending)])
            deadline = time.monotonic() + timeout_s
            while pending and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                key = (msg.topic(), msg.partition())
                if msg.error() is None:
                    ends[key] = max(ends[key], msg.offset() + 1)
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    ends[key] = max(ends[key], msg.offset())
                    pending.discard(key)
        return ends
    finally:
        consumer.close()
