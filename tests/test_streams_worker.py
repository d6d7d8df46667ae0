"""The Faust worker against a real broker: instances in, assembled/routed studies out.

No warehouse here (the sink retries until one answers); the end-to-end test with the
warehouse and dcmtk is tests/test_end_to_end.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from radstream import procs
from schemas.codec import Codec
from schemas.events import InstanceReceived, Priority, trace_id_for, utcnow
from schemas.settings import Settings
from schemas.topics import DEAD_LETTER, INSTANCE_RECEIVED, STUDY_ASSEMBLED, WORKLIST_UPDATE, key_of
from adapters.kafka import producer_config
from tests.workers import start_worker

pytestmark = pytest.mark.integration


def instance(study: str, sop: str, *, expected: int | None = None, description: str | None = None) -> InstanceReceived:
    return InstanceReceived(
        trace_id=trace_id_for(study), study_uid=study, series_uid=study + ".1", sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_uri=f"file:///blobs/{sop}.dcm", blob_size=10, blob_sha256="sha" + sop, source_site="SITE_A",
        gateway="dicom-scp", received_at=utcnow(), modality="CT", expected_study_instances=expected,
        study_description=description,
    )


def produce(settings: Settings, events, topic_spec=INSTANCE_RECEIVED, raw: list[bytes] | None = None) -> None:
    codec, producer = Codec(), Producer(producer_config(settings))
    for event in events:
        producer.produce(topic_spec.name(settings), key=key_of(topic_spec, event), value=codec.encode(event))
    for value in raw or []:
        producer.produce(topic_spec.name(settings), key=b"garbage", value=value)
    assert producer.flush(10) == 0


def consume(settings: Settings, spec, count: int, timeout_s: float = 40) -> list:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{time.time()}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(spec.name(settings), p, 0) for p in range(settings.kafka.partitions)])
    codec, out, deadline = Codec(), [], time.monotonic() + timeout_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                out.append(codec.decode(msg.value(), spec.event))
    finally:
        consumer.close()
    return out


def test_quiet_period_and_expected_count_studies_reach_the_worklist(worker: Settings) -> None:
    started = time.monotonic()
    produce(worker, [
        instance("1.9.1", "1.9.1.1"), instance("1.9.1", "1.9.1.2"), instance("1.9.1", "1.9.1.2"),  # resend
        instance("1.9.2", "1.9.2.1", expected=2, description="CT HEAD stroke"),
        instance("1.9.2", "1.9.2.2", expected=2, description="CT HEAD stroke"),
    ])
    assembled = {s.study_uid: s for s in consume(worker, STUDY_ASSEMBLED, 2)}
    assert set(assembled) == {"1.9.1", "1.9.2"}
    assert assembled["1.9.1"].instance_count == 2 and assembled["1.9.1"].completion_reason.value == "QUIET_PERIOD_ELAPSED"
    assert assembled["1.9.2"].completion_reason.value == "EXPECTED_COUNT_REACHED"
    rows = {w.study_uid: w for w in consume(worker, WORKLIST_UPDATE, 2)}
    assert rows["1.9.2"].priority is Priority.URGENT and rows["1.9.2"].subspecialty == "neuroradiology"
    assert rows["1.9.1"].priority is Priority.ROUTINE
    # the quiet period is closed by the clock: no later message was needed to close 1.9.1
    assert time.monotonic() - started < 40


def test_late_instance_makes_version_two(worker: Settings) -> None:
    produce(worker, [instance("1.8.1", "1.8.1.1")])
    assert [s.version for s in consume(worker, STUDY_ASSEMBLED, 1)] == [1]
    produce(worker, [instance("1.8.1", "1.8.1.2")])
    versions = consume(worker, STUDY_ASSEMBLED, 2)
    assert [s.version for s in versions] == [1, 2] and versions[1].instance_count == 2


def test_garbage_on_the_instance_topic_is_dead_lettered_and_the_worker_lives_on(worker: Settings) -> None:
    produce(worker, [], raw=[b"not avro at all", b"\xc3\x01" + b"\x00" * 12])
    letters = consume(worker, DEAD_LETTER, 2)
    assert {d.reason for d in letters} == {"undecodable"} and all(d.stage == "assemble" for d in letters)
    assert letters[0].payload == b"not avro at all" and letters[0].source_topic == INSTANCE_RECEIVED.name(worker)
    produce(worker, [instance("1.7.1", "1.7.1.1", expected=1)])
    assert consume(worker, STUDY_ASSEMBLED, 1)[0].study_uid == "1.7.1"


def test_a_bad_study_assembled_gives_one_dead_letter_though_four_agents_read_it(worker: Settings) -> None:
    """De-identification, the order re-keying, routing and the sink all read study.assembled."""
    from schemas.events import CompletionReason, InstanceRef, StudyAssembled
    from schemas.topics import STUDY_BY_ACCESSION

    now = utcnow()
    # After the garbage, on its partition: a study that every reader acts on visibly, so
    # when its results are out every reader is past the garbage. Its blob is missing, which
    # makes de-identification dead-letter it: that stage's visible act.
    follower = StudyAssembled(
        trace_id=trace_id_for("1.4.1"), study_uid="1.4.1", version=1, source_site="SITE_A", instance_count=1,
        modalities=["CT"], body_parts=[], series=[], first_received_at=now, last_received_at=now, assembled_at=now,
        instances=[InstanceRef(sop_instance_uid="1.4.1.1", series_uid="1.4.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               transfer_syntax_uid="1.2.840.10008.1.2.1", blob_uri="file:///nowhere/1.4.1.1.dcm",
                               blob_size=10)],
        completion_reason=CompletionReason.EXPECTED_COUNT_REACHED, accession_number="ACC-141",
    )
    producer, topic = Producer(producer_config(worker)), STUDY_ASSEMBLED.name(worker)
    producer.produce(topic, key=b"1.4.1", value=b"not avro at all")
    producer.produce(topic, key=b"1.4.1", value=Codec().encode(follower))
    assert producer.flush(10) == 0
    assert consume(worker, WORKLIST_UPDATE, 1)[0].study_uid == "1.4.1"  # routing
    assert consume(worker, STUDY_BY_ACCESSION, 1)[0].study_uid == "1.4.1"  # the order join's re-keying
    letters = consume(worker, DEAD_LETTER, 3, timeout_s=8)
    assert sorted((d.reason, d.stage, d.source_topic, d.source_offset) for d in letters) == [
        ("stage_error", "deidentify", topic, 1), ("undecodable", "deidentify", topic, 0)]


def test_open_study_survives_a_worker_crash_and_is_assembled_once_after_restart(broker: Settings, tmp_path: Path) -> None:
    """The quiet-period state is in a Faust table with a changelog: SIGKILL loses nothing."""
    import signal

    settings = broker.model_copy(update={"assembly": broker.assembly.model_copy(update={"quiet_period_s": 8.0})})
    first = start_worker(settings, tmp_path / "worker-1.log")
    try:
        produce(settings, [instance("1.6.1", "1.6.1.1"), instance("1.6.1", "1.6.1.2")])
        # let the worker take both instances into its tables (and their changelogs)
        time.sleep(3)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    assert consume(settings, STUDY_ASSEMBLED, 1, timeout_s=3) == [], "assembled before the quiet period ended"
    second = start_worker(settings, tmp_path / "worker-2.log")
    try:
        studies = consume(settings, STUDY_ASSEMBLED, 2, timeout_s=30)
    finally:
        procs.stop(second, grace_s=5)
    assert [(s.study_uid, s.version, s.instance_count) for s in studies] == [("1.6.1", 1, 2)]


def test_the_worker_consumer_fetch_waits_kafka_fetch_max_wait_ms_not_faust_s_1500(monkeypatch) -> None:
    """Tansu holds a fetch for its whole wait even when records arrive: Faust's hard-coded 1500 ms
    was up to 1.5 s on every hop of a study through the stages."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    from streams import offsets_compat

    class Consumer:
        _fetch_max_wait_ms = 1500

    monkeypatch.setattr(AIOKafkaConsumerThread, "_create_worker_consumer", lambda self, transport: Consumer())
    offsets_compat.install_fetch_wait(40)
    offsets_compat.install_fetch_wait(50)  # installing again wraps Faust's method, not the previous wrapper
    assert AIOKafkaConsumerThread._create_worker_consumer(None, None)._fetch_max_wait_ms == 50


def test_a_commit_waits_for_every_buffered_changelog_write_not_just_0_1_s() -> None:
    """Faust's buffer flush returned when one message took over 0.1 s to leave, and the offsets
    were committed with table changelog writes still buffered: a crash then lost them."""
    import asyncio

    from faust.transport.producer import ProducerBuffer

    from streams import offsets_compat

    offsets_compat.install_complete_flush()

    class Buffer:
        state = "running"

        def __init__(self) -> None:
            self.size = 3
            self.message_sent = asyncio.Event()

        async def send_slowly(self) -> None:
            while self.size:
                await asyncio.sleep(0.25)  # each message slower than the old 0.1 s patience
                self.size -= 1
                self.message_sent.set()

    async def scenario() -> int:
        buffer = Buffer()
        sender = asyncio.ensure_future(buffer.send_slowly())
        await ProducerBuffer.flush(buffer)
        left = buffer.size  # what a commit right now would overtake
        await sender
        return left

    assert asyncio.run(scenario()) == 0
