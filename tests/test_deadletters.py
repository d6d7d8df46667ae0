"""``radstream deadletters``: a stage's dead letter goes back to that stage, once.

A real Faust worker on a real broker dead-letters the de-identification of a study whose
blob is missing; the blob then appears (the cause mended), and ``radstream deadletters
replay`` sends the study back: de-identification handles it, the other agents reading
``study.assembled`` (routing, the order join, the results, the sink) pass it by, and a
second replay sends nothing.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from adapters.blobs import LocalBlobStore
from radstream.cli import cli
from schemas.blobs import instance_key
from schemas.events import AuditEvent, CompletionReason, InstanceRef, StudyAssembled, trace_id_for, utcnow
from schemas.settings import Settings
from schemas.topics import (AUDIT, DEAD_LETTER, STUDY_ASSEMBLED, STUDY_BY_ACCESSION, STUDY_DEIDENTIFIED, WORKLIST_UPDATE,
                            redrive_stage)
from tests.deid_fixtures import seeded_bytes
from tests.test_streams_worker import consume, produce

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.10.543.77"


def test_headers_name_the_stage_a_record_was_sent_back_to() -> None:
    assert redrive_stage(None) is None and redrive_stage([("other", b"x")]) is None
    assert redrive_stage([("other", b"x"), ("radstream-redrive-to", b"deidentify")]) == "deidentify"
    assert redrive_stage({"radstream-redrive-to": b"route"}) == "route"


def test_a_dead_lettered_study_goes_back_to_its_stage_once(worker: Settings) -> None:
    store = LocalBlobStore(worker.blob_root, fsync=False)
    series, sop = STUDY + ".1", STUDY + ".1.1"
    key = instance_key(STUDY, series, sop)
    data = seeded_bytes("CT_small.dcm", sop_uid=sop, series_uid=series, study_uid=STUDY)
    now = utcnow()
    study = StudyAssembled(
        trace_id=trace_id_for(STUDY), study_uid=STUDY, version=1, source_site="SITE_A", instance_count=1,
        modalities=["CT"], body_parts=[], series=[], first_received_at=now, last_received_at=now, assembled_at=now,
        instances=[InstanceRef(sop_instance_uid=sop, series_uid=series, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               transfer_syntax_uid="1.2.840.10008.1.2.1", blob_uri=store.uri_of(key),
                               blob_size=len(data))],
        completion_reason=CompletionReason.EXPECTED_COUNT_REACHED, accession_number="ACC-77")
    produce(worker, [study], STUDY_ASSEMBLED)  # its blob is not there yet
    letters = consume(worker, DEAD_LETTER, 1)
    assert [(d.stage, d.reason, d.key) for d in letters] == [("deidentify", "stage_error", STUDY)]
    assert consume(worker, WORKLIST_UPDATE, 1)[0].study_uid == STUDY
    assert consume(worker, STUDY_BY_ACCESSION, 1)[0].study_uid == STUDY

    runner = CliRunner()
    env = {**worker.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": worker.kafka_bootstrap}
    listed = runner.invoke(cli, ["deadletters", "list", "--format", "json"], env=env, catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert (row["stage"], row["reason"], row["key"], row["replayed"]) == ("deidentify", "stage_error", STUDY, "")
    topic, partition, offset = letters[0].source_topic, letters[0].source_partition, letters[0].source_offset
    assert row["error"].startswith("BlobNotFound") and row["source"] == f"{topic}:{partition}:{offset}"

    store.put(key, data)  # the cause mended
    first = runner.invoke(cli, ["deadletters", "replay", "--actor", "ops-7"], env=env, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "replayed 1 skipped 0 failed 0" in first.output
    deidentified = consume(worker, STUDY_DEIDENTIFIED, 1)
    assert len(deidentified) == 1 and deidentified[0].instance_count == 1
    assert deidentified[0].study_uid != STUDY  # a de-identified UID

    [audit] = [a for a in consume(worker, AUDIT, 50, timeout_s=5) if isinstance(a, AuditEvent)
               and a.action == "deadletter-replayed"]
    assert (audit.actor, audit.stage, audit.detail["dead_letter"], audit.detail["to"]) == (
        "ops-7", "deidentify", row["position"], f"{topic}:{partition}:{offset + 1}")
    second = runner.invoke(cli, ["deadletters", "replay"], env=env, catch_exceptions=False)
    assert second.exit_code == 0 and "replayed 0 skipped 1 failed 0" in second.output, second.output
    listed = json.loads(runner.invoke(cli, ["deadletters", "list", "--format", "json"], env=env).output)
    assert [r["replayed"] != "" for r in listed] == [True]

    # the other readers of study.assembled passed the replayed record by: the order join
    # re-keyed the study once, nothing new was dead-lettered, and the one new worklist row is
    # the study re-routed with its prior comparison, which follows its de-identification
    assert len(consume(worker, STUDY_BY_ACCESSION, 2, timeout_s=3)) == 1
    assert len(consume(worker, DEAD_LETTER, 2, timeout_s=3)) == 1
    assert len(consume(worker, STUDY_DEIDENTIFIED, 2, timeout_s=3)) == 1
    updates = consume(worker, WORKLIST_UPDATE, 3, timeout_s=5)
    assert [u.prior_summary is not None for u in updates] == [False, True]


def test_a_letter_too_large_to_carry_its_event_is_replayed_from_the_source_topic(broker: Settings) -> None:
    """A dead letter holds at most 256 kB of its event (a study of thousands of instances holds
    more): the replay then reads the record where it was, while the topic still has it."""
    from confluent_kafka import Producer

    from adapters.kafka import producer_config
    from radstream.deadletters import source_value
    from schemas.events import DeadLetter

    topic, sent = STUDY_ASSEMBLED.name(broker), []
    producer = Producer(producer_config(broker))
    for value in (b"first", b"the event"):
        producer.produce(topic, key=b"k", value=value, partition=1, on_delivery=lambda e, m: sent.append(m.offset()))
    assert producer.flush(10) == 0
    letter = DeadLetter(stage="deidentify", reason="stage_error", error="x", failed_at=utcnow(), key="k",
                        source_topic=topic, source_partition=1, source_offset=sent[1])
    assert source_value(broker, letter) == b"the event"
    assert source_value(broker, dataclasses.replace(letter, payload=b"carried")) == b"carried"
    gone = dataclasses.replace(letter, source_offset=sent[1] + 5)  # an offset the topic does not hold
    assert source_value(broker, gone, timeout_s=3) is None
