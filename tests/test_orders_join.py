"""Orders meet their images on the accession number, whichever arrives first.

The join logic (:mod:`streams.orders`) and the order-aware routing (:func:`streams.route.route`)
are pure and tested directly; one integration test drives the real thing: an MLLP client
sends ORM^O01 messages to the real HL7 gateway process, studies go through the real Faust
worker on a real broker, and the worklist topic must end with the STAT rows and the
indication in both arrival orders, a routine row for the study nobody ordered.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from radstream import procs
from schemas.codec import Codec
from schemas.events import (
    CompletionReason,
    InstanceReceived,
    OrderReceived,
    Priority,
    StudyAssembled,
    WorklistUpdate,
    trace_id_for,
    utcnow,
)
from schemas.settings import Settings
from schemas.topics import INSTANCE_RECEIVED, WORKLIST_UPDATE, key_of
from adapters.kafka import producer_config
from streams.orders import OrderJoin, on_order, on_study, rekey
from streams.route import parse_rules, route

RULES = parse_rules({"defaults": {"priority": "ROUTINE", "subspecialty": "general"},
                     "priority": [{"id": "stroke", "when": {"description_matches": "stroke"}, "priority": "CRITICAL"}]})


def order(accession: str = "ACC1", *, priority: str | None = "S", control: str = "NW", study_uid: str | None = None,
          reason: str | None = "Sudden headache, rule out bleed", seconds: int = 0) -> OrderReceived:
    return OrderReceived(
        trace_id=trace_id_for(f"order:SITE_A:{accession}"), accession_number=accession, message_type="ORM^O01",
        control_id=f"C{seconds}", source_site="SITE_A", received_at=utcnow() + timedelta(seconds=seconds),
        order_control=control, study_uid=study_uid, priority=priority, reason_for_exam=reason, patient_state="NV",
    )


def study(uid: str = "1.2.3", accession: str | None = "ACC1", version: int = 1, description: str = "CT HEAD") -> StudyAssembled:
    now = utcnow()
    return StudyAssembled(
        trace_id=trace_id_for(uid), study_uid=uid, version=version, source_site="SITE_A", instance_count=1,
        modalities=["CT"], body_parts=["HEAD"], series=[], instances=[], first_received_at=now, last_received_at=now,
        assembled_at=now, completion_reason=CompletionReason.EXPECTED_COUNT_REACHED, accession_number=accession,
        study_description=description,
    )


# ---------------------------------------------------------------- the join, pure


def test_order_first_then_study_emits_the_order_for_that_study() -> None:
    state, out = on_order(None, order())
    assert out == []
    state, out = on_study(state, study("1.2.3"))
    assert [(o.study_uid, o.trace_id, o.priority) for o in out] == [("1.2.3", trace_id_for("1.2.3"), "S")]


def test_study_first_then_order_emits_the_order_for_every_study_seen() -> None:
    state, out = on_study(None, study("1.2.3"))
    assert out == [] and state.order is None
    state, out = on_study(state, study("1.2.4"))  # two studies under one accession (e.g. CT and CTA)
    state, out = on_order(state, order())
    assert [o.study_uid for o in out] == ["1.2.3", "1.2.4"]


def test_a_new_version_of_a_joined_study_emits_nothing_routing_keeps_the_order() -> None:
    state, _ = on_order(None, order())
    state, first = on_study(state, study("1.2.3"))
    state, again = on_study(state, study("1.2.3", version=2))
    assert len(first) == 1 and again == []


def test_a_changed_order_is_sent_again_and_an_older_replay_is_ignored() -> None:
    state, _ = on_study(None, study("1.2.3"))
    state, _ = on_order(state, order(priority="R", seconds=0))
    state, changed = on_order(state, order(priority="S", control="XO", seconds=5))
    state, replay = on_order(state, order(priority="R", seconds=1))
    assert [o.priority for o in changed] == ["S"] and replay == [] and state.order.priority == "S"


def test_an_order_naming_its_study_uid_joins_before_any_image_arrives() -> None:
    state, out = on_order(None, order(study_uid="1.2.9"))
    assert [o.study_uid for o in out] == ["1.2.9"]
    state, out = on_study(state, study("1.2.9"))
    assert out == []  # already joined


def test_studies_without_accession_number_are_not_joined_and_join_state_round_trips() -> None:
    assert rekey(study(accession=None)) is None
    assert rekey(study()).instances == []
    state, _ = on_order(None, order())
    state, _ = on_study(state, study("1.2.3"))
    assert OrderJoin.from_dict(state.to_dict(Codec()), Codec()) == state


# ---------------------------------------------------------------- routing with an order, pure


def test_stat_order_makes_a_routine_study_urgent_and_shows_the_indication() -> None:
    decision, row = route(study(), RULES, utcnow(), order())
    assert row.priority is Priority.URGENT and "order-stat: priority=URGENT" in row.reasons
    assert row.reason_for_exam == "Sudden headache, rule out bleed" and decision.required_license_state == "NV"


def test_stat_order_never_lowers_a_critical_study() -> None:
    _, row = route(study(description="CT HEAD stroke"), RULES, utcnow(), order())
    assert row.priority is Priority.CRITICAL and "order-stat: priority=URGENT" in row.reasons


def test_routine_and_cancelled_orders_do_not_raise_priority() -> None:
    _, routine = route(study(), RULES, utcnow(), order(priority="R"))
    _, cancelled = route(study(), RULES, utcnow(), order(control="CA"))
    _, unordered = route(study(), RULES, utcnow())
    assert [r.priority for r in (routine, cancelled, unordered)] == [Priority.ROUTINE] * 3
    assert routine.reason_for_exam == "Sudden headache, rule out bleed"
    assert cancelled.reason_for_exam is None and any(r.startswith("order-cancelled") for r in cancelled.reasons)
    assert unordered.reason_for_exam is None


# ---------------------------------------------------------------- through the real worker and gateway


def _instance(study_uid: str, accession: str) -> InstanceReceived:
    return InstanceReceived(
        trace_id=trace_id_for(study_uid), study_uid=study_uid, series_uid=study_uid + ".1",
        sop_instance_uid=study_uid + ".1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", blob_uri=f"file:///blobs/{study_uid}.dcm", blob_size=10,
        blob_sha256="sha" + study_uid, source_site="SITE_A", gateway="dicom-scp", received_at=utcnow(),
        modality="CT", expected_study_instances=1, accession_number=accession, study_description="CT HEAD",
    )


def _send_images(settings: Settings, *studies: tuple[str, str]) -> None:
    producer, codec = Producer(producer_config(settings)), Codec()
    for study_uid, accession in studies:
        event = _instance(study_uid, accession)
        producer.produce(INSTANCE_RECEIVED.name(settings), key=key_of(INSTANCE_RECEIVED, event), value=codec.encode(event))
    assert producer.flush(10) == 0


def _segment(name: str, fields: dict[int, str]) -> str:
    values = [""] * max(fields)
    for n, value in fields.items():
        values[n - 1] = value
    return "|".join([name, *values])


def _orm(accession: str, control_id: str) -> bytes:
    segments = [
        f"MSH|^~\\&|RIS|SITE_A|RADSTREAM|RADSTREAM|20250101120000||ORM^O01|{control_id}|P|2.5",
        "PID|1||P1^^^SITE_A^MR||DOE^JANE||19800101|F",
        "PV1|1|E|ED^1^1^SITE_A",
        f"ORC|NW|PL-{accession}",
        _segment("OBR", {1: "1", 2: f"PL-{accession}", 4: "CTHEAD^CT head^L", 16: "DR1^Smith^Jane", 18: accession,
                         27: "^^^^^S", 31: "^Thunderclap headache"}),
    ]
    return b"\x0b" + ("\r".join(segments) + "\r").encode() + b"\x1c\r"


def _send_order(port: int, accession: str, control_id: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(_orm(accession, control_id))
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = sock.recv(4096)
            assert chunk, "gateway closed without an ACK"
            answer += chunk
    return answer


def _worklist_until(settings: Settings, done: Callable[[dict[str, WorklistUpdate]], bool],
                    timeout_s: float = 45) -> dict[str, WorklistUpdate]:
    """The latest worklist update per study, read until ``done`` says the rows are as wanted."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{time.time()}",
                         "enable.auto.commit": False})
    topic = WORKLIST_UPDATE.name(settings)
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.kafka.partitions)])
    rows: dict[str, WorklistUpdate] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not done(rows):
            assert time.monotonic() < deadline, f"worklist stayed {[(r.study_uid, r.priority) for r in rows.values()]}"
            msg = consumer.poll(0.3)
            if msg is not None and not msg.error():
                row = Codec().decode(msg.value(), WorklistUpdate)
                rows[row.study_uid] = row
    finally:
        consumer.close()
    return rows


def _stat(row: WorklistUpdate | None) -> bool:
    return row is not None and row.priority is Priority.URGENT and row.reason_for_exam == "Thunderclap headache"


@pytest.mark.integration
def test_orm_then_images_and_images_then_orm_both_end_stat_on_the_worklist(broker: Settings, tmp_path: Path) -> None:
    from tests.workers import start_worker  # the same worker start-up as the stream tests

    env = {**os.environ, **broker.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": broker.kafka_bootstrap}
    gateway = procs.spawn(procs.python_module("gateways.hl7_mllp"), env=env, log_path=tmp_path / "hl7.log")
    worker = start_worker(broker, tmp_path / "worker.log")
    try:
        procs.wait_for_port("127.0.0.1", broker.hl7.port, 30, gateway)
        # order first, then its images
        assert b"MSA|AA|CTRL-A" in _send_order(broker.hl7.port, "ACC-A", "CTRL-A")
        # images first (B), and a study nobody ordered (C)
        _send_images(broker, ("1.5.1", "ACC-A"), ("1.5.2", "ACC-B"), ("1.5.3", "ACC-C"))
        rows = _worklist_until(broker, lambda r: _stat(r.get("1.5.1")) and {"1.5.2", "1.5.3"} <= set(r))
        assert rows["1.5.2"].priority is Priority.ROUTINE and rows["1.5.2"].reason_for_exam is None
        # ... then B's order arrives: the routed study is re-routed
        assert b"MSA|AA|CTRL-B" in _send_order(broker.hl7.port, "ACC-B", "CTRL-B")
        rows = _worklist_until(broker, lambda r: _stat(r.get("1.5.1")) and _stat(r.get("1.5.2")) and "1.5.3" in r)
    finally:
        procs.stop(worker, grace_s=5)
        procs.stop(gateway, grace_s=5)
    for uid in ("1.5.1", "1.5.2"):
        assert "order-stat: priority=URGENT" in rows[uid].reasons and rows[uid].version == 1
    unordered = rows["1.5.3"]
    assert unordered.priority is Priority.ROUTINE and unordered.reason_for_exam is None
    assert not any(r.startswith("order-") for r in unordered.reasons)
