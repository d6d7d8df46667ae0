"""Stages as pure functions: assembly, routing and sink rows, no broker needed.

About 460 lines: every stage's pure steps, each with the events that drive it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import CompletionReason, InstanceReceived, Priority, trace_id_for
from streams.assemble import Action, StoredInstance, StudyProgress, add_instance, assemble, complete_by_count, decide
from streams.route import RuleError, load_rules, parse_rules, route
from streams.sink_rows import rows_for

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
QUIET = timedelta(seconds=5)
RETENTION = timedelta(hours=24)


def instance(sop: str, *, study: str = "1.2.3", series: str = "1.2.3.1", sha: str | None = None,
             expected: int | None = None, modality: str = "CT", at: datetime = T0, **extra) -> InstanceReceived:
    return InstanceReceived(
        trace_id=trace_id_for(study), study_uid=study, series_uid=series, sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_uri=f"file:///blobs/{sop}.dcm", blob_size=100, blob_sha256=sha or f"sha-{sop}", source_site="SITE_A",
        gateway="dicom-scp", received_at=at, modality=modality, expected_study_instances=expected, **extra,
    )


def feed(events, now=T0):
    progress, stored = None, {}
    for event in events:
        progress, new = add_instance(progress, event, stored.get(event.sop_instance_uid), now)
        if new:
            stored[new.sop_instance_uid] = new
    return progress, stored


def test_study_waits_for_quiet_period_then_assembles_by_wall_clock() -> None:
    progress, stored = feed([instance("1"), instance("2")])
    assert decide(progress, T0 + timedelta(seconds=4.9), QUIET, RETENTION) is Action.WAIT
    assert decide(progress, T0 + QUIET, QUIET, RETENTION) is Action.ASSEMBLE
    progress, study = assemble(progress, list(stored.values()), T0 + QUIET)
    assert study.version == 1 and study.instance_count == 2
    assert study.completion_reason is CompletionReason.QUIET_PERIOD_ELAPSED
    assert decide(progress, T0 + timedelta(hours=1), QUIET, RETENTION) is Action.WAIT


def test_expected_count_completes_at_once() -> None:
    progress, stored = feed([instance("1", expected=2), instance("2", expected=2)])
    assert complete_by_count(progress)
    assert decide(progress, T0, QUIET, RETENTION) is Action.ASSEMBLE
    _, study = assemble(progress, list(stored.values()), T0)
    assert study.completion_reason is CompletionReason.EXPECTED_COUNT_REACHED and study.expected_instance_count == 2


def test_identical_resend_changes_nothing_but_a_changed_instance_reopens() -> None:
    progress, stored = feed([instance("1")])
    progress, _ = assemble(progress, list(stored.values()), T0 + QUIET)
    same, new = add_instance(progress, instance("1"), stored["1"], T0 + QUIET * 2)
    assert new is None and same == progress and not same.pending
    changed, new = add_instance(progress, instance("1", sha="other"), stored["1"], T0 + QUIET * 2)
    assert new is not None and changed.pending and changed.instance_count == 1


def test_late_instance_makes_a_new_version_with_every_instance() -> None:
    progress, stored = feed([instance("1"), instance("2")])
    progress, first = assemble(progress, list(stored.values()), T0 + QUIET)
    progress, late = add_instance(progress, instance("3", at=T0 + timedelta(minutes=1)), None, T0 + timedelta(minutes=1))
    stored["3"] = late
    assert decide(progress, T0 + timedelta(minutes=1) + QUIET, QUIET, RETENTION) is Action.ASSEMBLE
    progress, second = assemble(progress, list(stored.values()), T0 + timedelta(minutes=1) + QUIET)
    assert (first.version, second.version) == (1, 2)
    assert {i.sop_instance_uid for i in second.instances} == {"1", "2", "3"}
    assert second.last_received_at == T0 + timedelta(minutes=1)


def test_after_restart_open_studies_wait_a_quiet_period_for_backlog() -> None:
    progress, _ = feed([instance("1")])
    restarted = T0 + timedelta(minutes=10)
    assert decide(progress, restarted + timedelta(seconds=1), QUIET, RETENTION, not_before=restarted) is Action.WAIT
    assert decide(progress, restarted + QUIET, QUIET, RETENTION, not_before=restarted) is Action.ASSEMBLE


def test_assembled_study_expires_after_retention() -> None:
    progress, stored = feed([instance("1")])
    progress, _ = assemble(progress, list(stored.values()), T0 + QUIET)
    assert decide(progress, T0 + RETENTION, QUIET, RETENTION) is Action.EXPIRE


def test_series_summary_and_study_metadata() -> None:
    progress, stored = feed([
        instance("1", series="s1", series_number=1, accession_number="ACC9", body_part_examined="head"),
        instance("2", series="s2", series_number=2, modality="CT", study_description="CT HEAD"),
    ])
    _, study = assemble(progress, list(stored.values()), T0 + QUIET)
    assert [s.series_uid for s in study.series] == ["s1", "s2"]
    assert study.accession_number == "ACC9" and study.study_description == "CT HEAD"
    assert study.body_parts == ["HEAD"] and study.modalities == ["CT"]


def test_progress_round_trips_through_table_json() -> None:
    progress, stored = feed([instance("1", expected=3)])
    assert StudyProgress.from_dict(progress.to_dict()) == progress
    item = next(iter(stored.values()))
    assert StoredInstance.from_dict(item.to_dict()) == item


def _assembled(**overrides):
    progress, stored = feed([instance("1", **overrides)])
    return assemble(progress, list(stored.values()), T0 + QUIET)[1]


def test_routing_head_ct_with_stroke_description_is_urgent_neuro() -> None:
    study = _assembled(study_description="CT HEAD STROKE PROTOCOL")
    decision, row = route(study, load_rules(), T0)
    assert decision.priority is Priority.URGENT and decision.subspecialty == "neuroradiology"
    assert {hit.rule_id for hit in decision.reasons} == {"neuro-by-description", "acute-neuro-protocol"}
    assert row.priority is Priority.URGENT and row.modality == "CT" and row.received_at == T0


@pytest.mark.parametrize("modality, body_part, description, subspecialty", [
    ("CR", "CSPINE", "XR C Spine Comp Min 4 Views", "msk"),
    ("MR", None, "Carotids", "neuroradiology"),
    ("CR", "CHEST", "THORAX", "thoracic"),
    ("US", None, None, "ultrasound"),
])
def test_default_rules_pick_the_subspecialty(modality, body_part, description, subspecialty) -> None:
    study = _assembled(modality=modality, body_part_examined=body_part, study_description=description)
    assert route(study, load_rules(), T0)[0].subspecialty == subspecialty


def test_routing_without_a_match_uses_defaults_and_says_so() -> None:
    decision, _ = route(_assembled(modality="OT"), load_rules(), T0)
    assert (decision.priority, decision.subspecialty) == (Priority.ROUTINE, "general")
    assert decision.reasons[0].rule_id == "defaults"


def test_most_urgent_matching_priority_rule_wins() -> None:
    rules = parse_rules({
        "priority": [
            {"id": "a", "when": {"modality": "CT"}, "priority": "URGENT"},
            {"id": "b", "when": {"source_site": ["site_a"]}, "priority": "CRITICAL"},
        ]
    })
    decision, _ = route(_assembled(), rules, T0)
    assert decision.priority is Priority.CRITICAL and [h.rule_id for h in decision.reasons] == ["a", "b"]


@pytest.mark.parametrize("bad, message", [
    ({"priority": [{"id": "x", "when": {"modalty": "CT"}, "priority": "URGENT"}]}, "unknown conditions"),
    ({"priority": [{"id": "x", "priority": "SOON"}]}, "is not one of"),
    ({"priority": [{"id": "x", "when": {"description_matches": "("}, "priority": "URGENT"}]}, "not a valid regex"),
    ({"subspecialty": [{"id": "x", "subspecialty": "a"}, {"id": "x", "subspecialty": "b"}]}, "used twice"),
    ({"routes": []}, "unknown top-level"),
])
def test_invalid_rules_fail_with_the_rule_named(bad, message) -> None:
    with pytest.raises(RuleError, match=message):
        parse_rules(bad)


def test_sink_rows_for_worklist_and_stages() -> None:
    study = _assembled()
    decision, row = route(study, load_rules(), T0 + QUIET)
    (table, worklist_row), = rows_for(row)
    assert table == "worklist" and worklist_row["priority"] == "ROUTINE" and worklist_row["version"] == 1
    stages = [r["stage"] for _, r in rows_for(study)] + [r["stage"] for _, r in rows_for(decision)]
    assert stages == ["received", "assembled", "routed"]
    newer = rows_for(row.replace(version=2))[0][1]
    assert newer["row_version"] > worklist_row["row_version"]


def test_sink_rows_for_a_study_link_and_a_quarantined_instance() -> None:
    from schemas.events import DeadLetter, StudyLink

    link = StudyLink(trace_id="t", study_uid="1.2.3", version=1, deid_study_uid="2.25.9", deid_trace_id="d",
                     patient_pseudonym="P1", source_site="SITE_A", linked_at=T0)
    (links, link_row), (stages, stage_row) = rows_for(link)
    assert (links, link_row["deid_study_uid"]) == ("study_links", "2.25.9")
    assert (stages, stage_row["stage"], stage_row["study_uid"]) == ("stage_events", "deidentified", "1.2.3")
    letter = DeadLetter(stage="deidentify", reason="burned_in_phi", error="US", failed_at=T0)
    (table, row), = rows_for(letter, 0, 7, "radstream.deid.quarantine")
    assert (table, row["dlq_topic"], row["dlq_offset"]) == ("dead_letters", "radstream.deid.quarantine", 7)


# ---------------------------------------------------------------- table state, one codec


def _order(**overrides):
    from schemas.events import OrderReceived

    fields = dict(trace_id="o1", accession_number="ACC9", message_type="ORM^O01", control_id="C1",
                  source_site="SITE_A", received_at=T0, priority="S")
    return OrderReceived(**{**fields, **overrides})


def test_every_stage_state_round_trips_through_the_one_table_codec() -> None:
    import dataclasses
    import json

    from schemas.codec import Codec
    from streams.orders import OrderJoin
    from streams.relink import RelinkState
    from streams.route import RouteState

    progress, stored = feed([instance("1", expected=3, study_description="CT HEAD", accession_number="ACC9")])
    progress = dataclasses.replace(progress, version=2, pending=False)
    study = _assembled(series_number=4, body_part_examined="HEAD")  # nested series, an enum, datetimes
    states = [
        progress,
        next(iter(stored.values())),
        OrderJoin(accession_number="ACC9", order=_order(), studies={"1.2.3": trace_id_for("1.2.3")}),
        RouteState(study_uid="1.2.3", study=study.replace(instances=[]), order=_order(study_uid="1.2.3"),
                   ai=_inference_result()),
        RouteState(study_uid="1.2.4"),
        RelinkState(deid_study_uid="2.25.9", waiting=[_inference_result()]),
        RelinkState(deid_study_uid="2.25.9", study_uid="1.2.3", trace_id="t"),
    ]
    for state in states:
        stored_value = json.loads(json.dumps(state.to_dict()))  # what the changelog holds
        assert type(state).from_dict(stored_value) == state
        assert type(state).from_dict(state.to_dict(Codec()), Codec()) == state


def test_table_state_keeps_the_format_earlier_workers_wrote() -> None:
    """Assembly and join state already in a changelog stays readable after an upgrade:
    datetimes as epoch milliseconds, an order as base64 single-object Avro."""
    import base64

    from schemas.codec import Codec
    from streams.orders import OrderJoin

    progress, _ = feed([instance("1")])
    data = progress.to_dict()
    assert data["first_received_at"] == int(T0.timestamp() * 1000) and data["metadata"] == progress.metadata
    order = _order()
    written_before = {"accession_number": "ACC9", "order": base64.b64encode(Codec().encode(order)).decode(),
                      "studies": {"1.2.3": "t"}}
    assert OrderJoin.from_dict(written_before) == OrderJoin(accession_number="ACC9", order=order, studies={"1.2.3": "t"})


def test_a_state_the_codec_cannot_store_fails_when_its_table_is_declared() -> None:
    from dataclasses import dataclass

    from schemas.codec import Codec
    from streams.state import TableState, TypedTable

    @dataclass(frozen=True)
    class Unstorable(TableState):
        seen: set[str]

    with pytest.raises(TypeError, match="set"):
        TypedTable({}, Unstorable, Codec())


# ---------------------------------------------------------------- what routing routes when


def test_a_late_order_re_routes_the_latest_version_with_the_order() -> None:
    from streams.route import order_arrives, study_arrives

    first, second = _assembled(), _assembled().replace(version=2)
    state, routed = study_arrives(None, first)
    assert routed is first and state.order is None
    state, routed = study_arrives(state, second)
    state, routed_again = order_arrives(state, _order(study_uid="1.2.3"))
    assert routed_again.version == 2 and routed_again.instances == [] and state.order.priority == "S"


def test_an_order_before_its_study_waits_and_the_study_is_routed_with_it() -> None:
    from streams.route import order_arrives, study_arrives

    state, routed = order_arrives(None, _order(study_uid="1.2.3"))
    assert routed is None
    state, routed = study_arrives(state, _assembled())
    assert routed.study_uid == "1.2.3" and state.order.accession_number == "ACC9"
    decision, row = route(routed, load_rules(), T0, state.order)
    assert row.priority is Priority.URGENT and "order-stat: priority=URGENT" in row.reasons


def test_an_older_version_replayed_is_routed_but_the_latest_is_kept() -> None:
    from streams.route import study_arrives

    state, _ = study_arrives(None, _assembled().replace(version=2))
    state, routed = study_arrives(state, _assembled())
    assert routed.version == 1 and state.study.version == 2


# ---------------------------------------------------------------- the runner and the sink's table


def test_a_stage_must_handle_exactly_the_events_its_topics_carry() -> None:
    from schemas.events import AssemblyTimer, StudyAssembled
    from schemas.topics import ASSEMBLY_TIMER, INFERENCE_RETRY, INSTANCE_RECEIVED, STUDY_DEIDENTIFIED
    from streams.runner import Stage

    Stage("assemble", (INSTANCE_RECEIVED, ASSEMBLY_TIMER), {InstanceReceived: list, AssemblyTimer: list})
    with pytest.raises(ValueError, match="has no handler for \\['assembly.timer'\\]"):
        Stage("assemble", (INSTANCE_RECEIVED, ASSEMBLY_TIMER), {InstanceReceived: list})
    with pytest.raises(ValueError, match="does not read: \\['StudyAssembled'\\]"):
        Stage("assemble", (INSTANCE_RECEIVED, ASSEMBLY_TIMER),
              {InstanceReceived: list, AssemblyTimer: list, StudyAssembled: list})
    # two sources of one event type: a handler per topic
    stage = Stage("preread", (STUDY_DEIDENTIFIED, INFERENCE_RETRY), {STUDY_DEIDENTIFIED: list, INFERENCE_RETRY: tuple})
    assert stage.handler(INFERENCE_RETRY) is tuple and stage.handler(STUDY_DEIDENTIFIED) is list


def _ddl_columns() -> dict[str, set[str]]:
    """Columns of every warehouse table a writer must fill (those without a server DEFAULT)."""
    import re
    from pathlib import Path

    tables: dict[str, set[str]] = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "schemas" / "clickhouse").glob("*.sql")):
        text = path.read_text()
        for name, body in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)\s*\((.*?)\n\)", text, re.S):
            lines = [line.strip() for line in body.strip().splitlines()]
            tables[name] = {line.split()[0] for line in lines if line and not line.startswith("--") and " DEFAULT " not in line}
        for name, alters in re.findall(r"ALTER TABLE (\w+)(.*)", text, re.S):
            tables[name].update(re.findall(r"ADD COLUMN IF NOT EXISTS (\w+)", alters))
    return tables


def _inference_result():
    from schemas.events import CodedConcept, Finding, InferenceResult, InferenceStatus, LabelScore, ModelRun

    run = ModelRun(model="m", model_version="1", model_sha256="ab", backend="onnxruntime-cpu",
                   status=InferenceStatus.OK, silent=False, images=3,
                   scores=[LabelScore(label="hemorrhage", score=0.9, threshold=0.5)])
    finding = Finding(label="hemorrhage", model="m", model_version="1", confidence=0.9, threshold=0.5, critical=True,
                      silent=False, codes=[CodedConcept(scheme="SCT", value="50960005", meaning="Hemorrhage")])
    return InferenceResult(trace_id="d", study_uid="2.25.9", version=1, status=InferenceStatus.OK, findings=[finding],
                           models=[run], level=2, images=3, queued_ms=1, decode_ms=2, infer_ms=3, latency_ms=6,
                           inferred_at=T0)


def test_every_event_on_a_sink_topic_has_rows_that_fill_their_table() -> None:
    from schemas.events import (Alert, AlertAck, AuditEvent, DeadLetter, DeliveryStatus, PatientUpdated, ReaderFeedback,
                                ReadingAction, ResultDelivery, ResultFinding, ResultStatus, StudyLink, StudyResult)
    from streams.sink_rows import SINK_TABLES, SINK_TOPICS

    assert {spec.event for spec in SINK_TOPICS} == set(SINK_TABLES)
    study = _assembled()
    decision, row = route(study, load_rules(), T0)
    samples = [
        study, decision, row, _order(),
        StudyLink(trace_id="t", study_uid="1.2.3", version=1, deid_study_uid="2.25.9", deid_trace_id="d",
                  patient_pseudonym="P1", source_site="SITE_A", linked_at=T0),
        Alert(trace_id="t", study_uid="1.2.3", version=1, alert_type="critical_finding", severity=Priority.CRITICAL,
              message="ICH", raised_at=T0),
        PatientUpdated(trace_id="a", message_type="ADT^A08", control_id="A1", source_site="SITE_A", received_at=T0,
                       patient_id="P1", patient_name="DOE^JANE", patient_state="NV"),
        DeadLetter(stage="assemble", reason="undecodable", error="x", failed_at=T0),
        _inference_result(),
        AuditEvent(trace_id="t", actor="radstream", action="assigned", stage="worklist", at=T0,
                   detail={"reader": "dr-a"}, study_uid="1.2.3"),
        ReaderFeedback(feedback_id="f1", trace_id="t", study_uid="1.2.3", version=1, reader_id="dr-a",
                       action=ReadingAction.REJECT, at=T0, source_site="SITE_A", finding="hemorrhage", score=0.9),
        StudyResult(trace_id="t", study_uid="1.2.3", version=1, revision=2, status=ResultStatus.CORRECTED,
                    issued_at=T0, source_site="SITE_A", modalities=["CT"], priority=Priority.CRITICAL, critical=True,
                    findings=[ResultFinding(label="ich", model="m", model_version="1", confidence=0.9, critical=True,
                                            codes=[], decision="REJECT")],
                    instances=[], report_text="draft", changes=["finding ich reject"], replaces=1),
        ResultDelivery(trace_id="t", study_uid="1.2.3", revision=2, destination="pacs", kind="sr",
                       status=DeliveryStatus.ACKED, attempts=1, at=T0, result_status=ResultStatus.CORRECTED,
                       document_id="2.25.1"),
        AlertAck(trace_id="t", study_uid="1.2.3", version=1, finding="ich", actor="dr-a", at=T0, note="called the ED"),
        row.replace(status="SIGNED", assigned_reader="dr-a", opened_at=T0, signed_at=T0 + timedelta(minutes=7)),
    ]
    assert {type(event) for event in samples} == set(SINK_TABLES)
    assert [stage for _, r in rows_for(samples[-1]) if "stage" in r for stage in [r["stage"]]] == ["opened", "signed"]
    ddl = _ddl_columns()
    for event in samples:
        for table, values in rows_for(event, 0, 1, "topic"):
            assert set(values) == ddl[table], f"{type(event).__name__} -> {table}"
    (table, update), = rows_for(samples[6])
    assert table == "patient_updates" and (update["patient_id"], update["patient_state"]) == ("P1", "NV")


def test_the_assembly_clock_wakes_when_the_next_study_falls_quiet() -> None:
    """The clock sleeps until the earliest open study's quiet period ends, not a whole scan
    interval past it; never longer than the interval, and studies already due or assembled
    by count do not shorten it."""
    from schemas.codec import Codec
    from streams.assemble import Assembly
    from streams.state import TypedTable

    quiet = timedelta(seconds=5)
    assembly = Assembly(TypedTable({}, StudyProgress, Codec()), TypedTable({}, StoredInstance, Codec()), quiet,
                        timedelta(hours=1))
    assembly.due_ticks(T0)
    assert assembly.clock_wait_s(T0, 0.5) == 0.5  # nothing open: the scan interval
    assembly.on_instance(instance("1"))
    assembly.on_instance(instance("7", study="1.2.7", expected=1))  # complete by count: nothing to wait for
    seen = assembly.studies.get("1.2.3").last_seen_at
    assert assembly.due_ticks(seen + timedelta(seconds=1)) == []
    assert assembly.clock_wait_s(seen + timedelta(seconds=1), 0.5) == 0.5  # due in 4 s: one interval
    assert assembly.clock_wait_s(seen + timedelta(seconds=4.8), 0.5) == pytest.approx(0.2)  # just until due
    assert assembly.clock_wait_s(seen + timedelta(seconds=4.999), 0.5) == 0.01  # floor: no busy loop
    (tick,) = assembly.due_ticks(seen + timedelta(seconds=5))
    assert tick.study_uid == "1.2.3"
    assert assembly.clock_wait_s(seen + timedelta(seconds=5), 0.5) == 0.5  # due and asked: back to scanning


def test_the_assembly_stage_handlers_over_in_memory_tables() -> None:
    """The handlers the runner calls, with dicts for Faust tables: a study complete by count
    is assembled at once, a quiet one when the clock's tick comes, and expired after."""
    from schemas.codec import Codec
    from schemas.events import AssemblyTimer, utcnow
    from schemas.topics import STUDY_ASSEMBLED
    from streams.assemble import Assembly
    from streams.state import TypedTable

    no_wait = timedelta(0)
    assembly = Assembly(TypedTable({}, StudyProgress, Codec()), TypedTable({}, StoredInstance, Codec()), no_wait, no_wait)
    assert assembly.on_instance(instance("1", expected=2)) == assembly.on_instance(instance("1", expected=2)) == []
    (topic, counted), = assembly.on_instance(instance("2", expected=2))
    assert topic is STUDY_ASSEMBLED and counted.completion_reason is CompletionReason.EXPECTED_COUNT_REACHED
    assert assembly.on_instance(instance("9", study="1.2.9")) == []
    ticks = {tick.study_uid: tick for tick in assembly.due_ticks(utcnow())}
    assert set(ticks) == {"1.2.3", "1.2.9"}
    (_, quiet), = assembly.on_tick(ticks["1.2.9"])
    assert quiet.completion_reason is CompletionReason.QUIET_PERIOD_ELAPSED and quiet.instance_count == 1
    assert assembly.on_tick(ticks["1.2.3"]) == []  # assembled and past retention: forgotten
    assert assembly.studies.get("1.2.3") is None and assembly.instances.keys() == ["1.2.9|9"]
    assert assembly.on_tick(AssemblyTimer(study_uid="1.2.404", due_at=T0)) == []


def test_a_crash_that_kept_one_assembly_table_write_and_lost_the_other_loses_no_instance() -> None:
    """The assembly's two tables are two changelogs: a SIGKILL can keep the write of one and
    lose the other's, and the instance's event then comes again (its offset was not committed).
    Stored but not counted: the study is repaired from the stored instances, not left without
    them (once, an instance stored with no progress made the resend a "duplicate" and the study
    never assembled). Counted but not stored: stored now, and counted once."""
    from dataclasses import replace

    from schemas.codec import Codec
    from schemas.events import AssemblyTimer
    from schemas.topics import STUDY_ASSEMBLED
    from streams.assemble import Assembly
    from streams.state import TypedTable

    no_wait = timedelta(0)

    def fresh() -> Assembly:
        return Assembly(TypedTable({}, StudyProgress, Codec()), TypedTable({}, StoredInstance, Codec()), no_wait,
                        RETENTION)

    def restarted(before: Assembly) -> Assembly:  # a new process over what the changelogs kept
        after = Assembly(before.studies, before.instances, no_wait, RETENTION)
        after.reindex()
        return after

    # instance 2 stored, its progress write lost: the study has no progress at all
    crashed = fresh()
    assert crashed.on_instance(instance("1", study="1.2.7")) == []
    crashed.instances["1.2.7|2"] = StoredInstance.of(instance("2", study="1.2.7"))
    del crashed.studies["1.2.7"]
    after = restarted(crashed)
    assert after.on_instance(instance("2", study="1.2.7")) == []  # the event again: not a duplicate
    assert after.studies["1.2.7"].instance_count == 2
    (topic, study), = after.on_tick(AssemblyTimer(study_uid="1.2.7", due_at=T0))
    assert topic is STUDY_ASSEMBLED and sorted(i.sop_instance_uid for i in study.instances) == ["1", "2"]

    # instance 2 stored, the progress still counting 1 of the 2 it expects: complete at the resend
    crashed = fresh()
    assert crashed.on_instance(instance("1", expected=2)) == []
    crashed.instances["1.2.3|2"] = StoredInstance.of(instance("2", expected=2))
    (topic, study), = restarted(crashed).on_instance(instance("2", expected=2))
    assert study.instance_count == 2 and study.completion_reason is CompletionReason.EXPECTED_COUNT_REACHED

    # the progress counted instance 2, its instance write lost: stored at the resend, counted once
    crashed = fresh()
    assert crashed.on_instance(instance("1", expected=3)) == []
    crashed.studies["1.2.3"] = replace(crashed.studies["1.2.3"], instance_count=2)
    after = restarted(crashed)
    assert after.on_instance(instance("2", expected=3)) == []  # 2 of 3: not complete early
    assert after.studies["1.2.3"].instance_count == 2

    # and a true resend is still a duplicate
    assert after.on_instance(instance("2", expected=3)) == []
    assert after.studies["1.2.3"].instance_count == 2 and len(after.instances.keys()) == 2


def test_the_event_that_assembled_a_version_sends_that_version_again_when_it_comes_again() -> None:
    """A crash can keep the assembly's table write and lose the study.assembled event beside it; the
    triggering event then comes again (its offset was not committed) and must not be taken for a
    duplicate, or the study never reaches the worklist. The same version goes again, never a new one;
    other resends of the study's instances stay duplicates."""
    from schemas.codec import Codec
    from schemas.events import AssemblyTimer
    from schemas.topics import STUDY_ASSEMBLED
    from streams.assemble import Assembly
    from streams.state import TypedTable

    assembly = Assembly(TypedTable({}, StudyProgress, Codec()), TypedTable({}, StoredInstance, Codec()),
                        timedelta(0), RETENTION)
    assert assembly.on_instance(instance("1", expected=2)) == []
    (_, first), = assembly.on_instance(instance("2", expected=2))  # its event lost in the crash
    (topic, again), = assembly.on_instance(instance("2", expected=2))
    assert topic is STUDY_ASSEMBLED and (again.version, again.instance_count) == (first.version, 2) == (1, 2)
    assert again.completion_reason is CompletionReason.EXPECTED_COUNT_REACHED
    assert assembly.on_instance(instance("1", expected=2)) == []  # not the trigger: a duplicate

    assert assembly.on_instance(instance("9", study="1.2.9")) == []
    tick = AssemblyTimer(study_uid="1.2.9", due_at=T0)
    (_, quiet), = assembly.on_tick(tick)
    (_, quiet_again), = assembly.on_tick(tick)
    assert (quiet_again.version, quiet_again.completion_reason) == (quiet.version, quiet.completion_reason)
    assert assembly.on_tick(AssemblyTimer(study_uid="1.2.9", due_at=T0 + QUIET)) == []  # another tick: nothing new
    assert assembly.studies["1.2.9"].version == 1


# ---------------------------------------------------------------- AI results in the identified zone


def _link(**overrides):
    from schemas.events import StudyLink

    fields = dict(trace_id=trace_id_for("1.2.3"), study_uid="1.2.3", version=1, deid_study_uid="2.25.9",
                  deid_trace_id="d", patient_pseudonym="P", source_site="SITE_A", linked_at=T0)
    return StudyLink(**{**fields, **overrides})


def test_an_ai_result_goes_on_to_routing_under_the_original_study_only_through_its_link() -> None:
    from streams.relink import link_arrives, result_arrives

    result = _inference_result()
    state, released = result_arrives(None, result)  # before its link: it waits
    assert released == [] and state.waiting == [result]
    state, released = link_arrives(state, _link())
    assert [(r.study_uid, r.trace_id) for r in released] == [("1.2.3", trace_id_for("1.2.3"))]
    assert released[0].findings == result.findings and state.waiting == []
    state, released = result_arrives(state, result.replace(version=2))  # after it: at once
    assert [(r.study_uid, r.version) for r in released] == [("1.2.3", 2)]


def test_routing_keeps_the_latest_ai_result_of_the_latest_version() -> None:
    from streams.route import ai_arrives, study_arrives

    study = _assembled()
    linked = _inference_result().replace(study_uid=study.study_uid, version=1)
    state, to_route = ai_arrives(None, linked)
    assert to_route is None and state.ai == linked  # no study yet: routed when it comes
    state, to_route = study_arrives(state, study)
    decision, row = route(to_route, load_rules(), T0, state.order, state.ai, ai_enabled=True)
    assert decision.priority is Priority.CRITICAL and row.ai_status == "OK"
    assert row.ai_findings == ["hemorrhage 0.90 (m 1)"] and "ai-critical: priority=CRITICAL" in row.reasons
    older = linked.replace(inferred_at=T0 - timedelta(seconds=5))
    assert ai_arrives(state, older) == (state, None)  # an older result does not replace a newer one
    from schemas.events import InferenceStatus
    deferred = linked.replace(status=InferenceStatus.TIMEOUT, inferred_at=T0 + timedelta(seconds=5))
    assert ai_arrives(state, deferred) == (state, None)  # nor does a TIMEOUT replace a finished pre-read
    state, _ = study_arrives(state, study.replace(version=2))
    assert ai_arrives(state, linked)[1] is None  # version 1's result is stale once version 2 is here
    _, pending = route(state.study, load_rules(), T0, state.order, state.ai, ai_enabled=True)
    assert pending.ai_status == "PENDING" and pending.priority is not Priority.CRITICAL


def test_failed_ai_is_shown_with_its_reason_and_changes_no_priority() -> None:
    from schemas.events import InferenceStatus

    study = _assembled()
    for status in (InferenceStatus.TIMEOUT, InferenceStatus.ERROR, InferenceStatus.NOT_APPLICABLE):
        failed = _inference_result().replace(study_uid=study.study_uid, status=status, findings=[], reason="why")
        _, row = route(study, load_rules(), T0, ai=failed, ai_enabled=True)
        assert (row.ai_status, row.ai_reason, row.priority) == (status.value, "why", Priority.ROUTINE)
    _, off = route(study, load_rules(), T0, ai_enabled=False)
    assert off.ai_status == "NONE"


def test_a_stat_order_or_an_emergency_location_makes_an_admission_hint_under_the_deidentified_uid() -> None:
    import re

    from streams.route import admission_hint

    emergency = re.compile(r"^(ED|ER)\b", re.IGNORECASE)
    stat = admission_hint(_order(), "2.25.9", emergency)
    assert (stat.study_uid, stat.level, stat.reason) == ("2.25.9", 1, "STAT order")
    ed = admission_hint(_order(priority="R", patient_location="ED^BAY3"), "2.25.9", emergency)
    assert ed.reason == "emergency location"
    assert admission_hint(_order(priority="R", patient_location="WARD^4"), "2.25.9", emergency) is None
    assert admission_hint(_order(order_control="CA"), "2.25.9", emergency) is None
    assert admission_hint(None, "2.25.9", emergency) is None
