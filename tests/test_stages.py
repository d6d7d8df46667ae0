"""Stages as pure functions: assembly, routing and sink rows, no broker needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import CompletionReason, InstanceReceived, Priority, trace_id_for
from streams.assemble import Action, StoredInstance, StudyProgress, add_instance, assemble, complete_by_count, decide
from streams.route import RuleError, load_rules, parse_rules, route
from streams.sink import rows_for

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
