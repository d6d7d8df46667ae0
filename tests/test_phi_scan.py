"""``radstream phi-scan`` reads every event: counted against the true end of each partition.

The embedded broker (Tansu 0.6) answers ListOffsets with the base offset of a partition's
last record batch + 1, so a batch of records reads as one. A scanner that trusted it read
10 of 11 events in the audit (issue #15, finding 5) and reported nothing about the rest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from adapters.blobs import LocalBlobStore
from radstream.phi_scan import scan
from schemas.deid.keys import DeidKeys
from schemas.deid.policy import parse_policy
from schemas.events import StudyDeidentified, trace_id_for, utcnow
from schemas.settings import Settings
from schemas.topics import STUDY_DEIDENTIFIED
from tests.test_streams_worker import produce

pytestmark = pytest.mark.integration

KEYS = DeidKeys(bytes(range(32)))


def deidentified(index: int, site: str) -> StudyDeidentified:
    uid = f"2.25.{1000 + index}"
    return StudyDeidentified(
        trace_id=trace_id_for(uid), study_uid=uid, version=1, patient_pseudonym=f"P{index:024d}", modalities=["CT"],
        body_parts=[], source_site=site, instance_count=0, series=[], instances=[], profile_options=["113100"],
        deidentified_at=utcnow())


def reported_ends(settings: Settings, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "t-watermarks"})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in range(settings.kafka.partitions))
    finally:
        consumer.close()


def test_phi_scan_reads_every_event_the_broker_under_reports_and_says_how_many(broker: Settings, tmp_path: Path) -> None:
    topic = STUDY_DEIDENTIFIED.name(broker)
    # one batch of 11: the broker reports fewer; the last one names a site in clear
    produce(broker, [deidentified(i, KEYS.site_pseudonym("SITE_A")) for i in range(10)] + [deidentified(10, "CANARYSITE")],
            STUDY_DEIDENTIFIED)
    assert reported_ends(broker, topic) < 11, "the broker no longer under-reports: this test shows nothing"
    report = scan(broker, ["CANARYSITE"], [topic], LocalBlobStore(tmp_path / "blobs", fsync=False),
                  parse_policy({}), KEYS)
    assert report.events == 11 and report.read == {topic: (11, 11)} and report.complete
    assert [(f.attribute, f.problem) for f in report.findings] == [("source_site", "canary 'CANARYSITE'")]
