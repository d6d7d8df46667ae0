"""Contracts: every event dataclass matches its Avro schema, and the codec round-trips."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest

from schemas.codec import Codec, DecodeError, EncodeError, load_schema
from schemas.events import (
    EVENT_TYPES,
    CompletionReason,
    DeadLetter,
    InstanceRef,
    Priority,
    RoutingDecision,
    RuleHit,
    SeriesSummary,
    StudyAssembled,
    trace_id_for,
    utcnow,
)


@pytest.mark.parametrize("name", sorted(EVENT_TYPES))
def test_dataclass_fields_match_avro_schema(name: str) -> None:
    schema = json.loads(resources.files("schemas").joinpath("avro", f"{name}.avsc").read_text())
    avro_fields = {f["name"]: f for f in schema["fields"]}
    dc_fields = {f.name: f for f in dataclasses.fields(EVENT_TYPES[name])}
    assert set(avro_fields) == set(dc_fields)
    for fname, avro in avro_fields.items():
        nullable = isinstance(avro["type"], list) and "null" in avro["type"]
        has_default = dc_fields[fname].default is not dataclasses.MISSING or dc_fields[fname].default_factory is not dataclasses.MISSING
        assert nullable <= has_default, f"{name}.{fname} is nullable in Avro but required in Python"


def test_every_event_on_a_topic_is_known_to_the_codec() -> None:
    """An event type the codec does not know is dead-lettered as undecodable wherever it is read
    (the assignment clock's ticks once were: aging never ran in the runtime)."""
    from schemas.topics import ALL_TOPICS

    on_topics = {spec.event for spec in ALL_TOPICS}
    unknown = {event.__name__ for event in on_topics if EVENT_TYPES.get(event.SCHEMA) is not event}
    assert not unknown


def _study() -> StudyAssembled:
    now = utcnow()
    return StudyAssembled(
        trace_id=trace_id_for("1.2.3"), study_uid="1.2.3", version=2, source_site="SITE_A", instance_count=1,
        modalities=["CT"], body_parts=["HEAD"],
        series=[SeriesSummary(series_uid="1.2.3.4", instance_count=1, modality="CT")],
        instances=[InstanceRef(sop_instance_uid="1.2.3.4.5", series_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               transfer_syntax_uid="1.2.840.10008.1.2.1", blob_uri="file:///x", blob_size=10)],
        first_received_at=now, last_received_at=now, assembled_at=now,
        completion_reason=CompletionReason.QUIET_PERIOD_ELAPSED, accession_number="ACC1",
    )


def test_round_trip_single_object_encoding() -> None:
    codec = Codec()
    study = _study()
    data = codec.encode(study)
    assert data[:2] == b"\xc3\x01" and data[2:10] == load_schema("study_assembled").fingerprint
    assert codec.decode(data, StudyAssembled) == study


def test_nested_enums_round_trip() -> None:
    codec = Codec()
    decision = RoutingDecision(trace_id="t", study_uid="1.2", version=1, priority=Priority.URGENT, subspecialty="neuro",
                               reasons=[RuleHit(rule_id="r1", description="d", effect="priority=URGENT")], routed_at=utcnow())
    back = codec.decode(codec.encode(decision))
    assert back == decision and back.priority is Priority.URGENT


def test_event_that_breaks_its_schema_is_refused_with_the_field_named() -> None:
    bad = _study().replace(version="two")
    with pytest.raises(EncodeError, match="version"):
        Codec().encode(bad)


def test_garbage_and_wrong_type_are_decode_errors() -> None:
    codec = Codec()
    with pytest.raises(DecodeError, match="not an Avro event"):
        codec.decode(b'{"json": "is not avro"}')
    with pytest.raises(DecodeError, match="too short"):
        codec.decode(b"")
    with pytest.raises(DecodeError, match="expected DeadLetter"):
        codec.decode(codec.encode(_study()), DeadLetter)
    truncated = codec.encode(_study())[:30]
    with pytest.raises(DecodeError, match="corrupt"):
        codec.decode(truncated)


def test_trace_id_is_stable_per_study() -> None:
    assert trace_id_for("1.2.3") == trace_id_for("1.2.3") != trace_id_for("1.2.4")


def test_every_declared_topic_is_created_at_start() -> None:
    """A topic left out of ALL_TOPICS is auto-created by the broker with its default
    partition count, and a table fed by it then fails (PartitionsMismatch)."""
    from schemas import topics

    declared = {value for value in vars(topics).values() if isinstance(value, topics.TopicSpec)}
    assert declared == set(topics.ALL_TOPICS), sorted(spec.suffix for spec in declared - set(topics.ALL_TOPICS))
