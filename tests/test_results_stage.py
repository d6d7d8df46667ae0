"""The results stage: when a study's result gets a new revision, and what it says."""

from __future__ import annotations

from datetime import timedelta

from schemas.codec import Codec
from schemas.events import (
    CodedConcept,
    CompletionReason,
    Finding,
    InferenceResult,
    InferenceStatus,
    InstanceRef,
    Priority,
    ReaderFeedback,
    ReadingAction,
    ResultStatus,
    StudyAssembled,
    StudyResult,
    WorklistUpdate,
    trace_id_for,
    utcnow,
)
from schemas.topics import ALERT, RESULTS_OUTBOX
from streams.results import Results, ResultsState
from streams.state import TypedTable

STUDY = "1.2.826.0.1.3680043.8.498.1"
NOW = utcnow()


def assembled(version: int = 1) -> StudyAssembled:
    return StudyAssembled(
        trace_id=trace_id_for(STUDY), study_uid=STUDY, version=version, source_site="SITE_A", instance_count=1,
        modalities=["CT"], body_parts=["HEAD"], series=[],
        instances=[InstanceRef(sop_instance_uid=f"{STUDY}.{version}", series_uid=f"{STUDY}.9",
                               sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               transfer_syntax_uid="1.2.840.10008.1.2.1", blob_uri="s3://b/k", blob_size=10)],
        first_received_at=NOW, last_received_at=NOW, assembled_at=NOW, completion_reason=CompletionReason.QUIET_PERIOD_ELAPSED,
        accession_number="ACC1", patient_id="P1", patient_name="Doe^Jane", study_description="HEAD W/O")


def finding(label: str = "ich", critical: bool = True, silent: bool = False, confidence: float = 0.91) -> Finding:
    return Finding(label=label, model="head-ct", model_version="1.0", confidence=confidence, threshold=0.5,
                   critical=critical, silent=silent,
                   codes=[CodedConcept(scheme="SCT", value="1386000", meaning="Intracranial hemorrhage")])


def ai(version: int = 1, findings: list[Finding] | None = None) -> InferenceResult:
    return InferenceResult(trace_id=trace_id_for(STUDY), study_uid=STUDY, version=version, status=InferenceStatus.OK,
                           findings=[finding()] if findings is None else findings, models=[], level=3, images=1,
                           queued_ms=0, decode_ms=0, infer_ms=0, latency_ms=0, inferred_at=NOW)


def row(version: int = 1, status: str = "UNREAD", decisions: list[str] | None = None,
        ai_status: str = "OK") -> WorklistUpdate:
    return WorklistUpdate(trace_id=trace_id_for(STUDY), study_uid=STUDY, version=version, modality="CT",
                          modalities=["CT"], priority=Priority.CRITICAL, subspecialty="neuro", source_site="SITE_A",
                          instance_count=1, reasons=[], received_at=NOW, assembled_at=NOW, routed_at=NOW, status=status,
                          reason_for_exam="headache after fall", prior_summary="no relevant prior", ai_status=ai_status,
                          assigned_reader="dr-neuro", reader_decisions=decisions or [],
                          signed_at=NOW if status == "SIGNED" else None)


def sign(text: str | None = "Acute subdural hematoma.") -> ReaderFeedback:
    return ReaderFeedback(feedback_id="f-sign", trace_id=trace_id_for(STUDY), study_uid=STUDY, version=1,
                          reader_id="dr-neuro", action=ReadingAction.SIGN, at=NOW, source_site="SITE_A",
                          report_text=text)


def stage() -> Results:
    return Results(TypedTable({}, ResultsState, Codec()), timedelta(minutes=10))  # a dict under the typed table


def issued(outputs) -> list[StudyResult]:
    return [event for spec, event in outputs if spec is RESULTS_OUTBOX]


def test_the_first_ai_result_issues_a_preliminary_result_with_a_draft_report_and_a_critical_alert() -> None:
    results = stage()
    assert results.on_assembled(assembled()) == []  # no AI result yet: nothing to say
    assert results.on_row(row(ai_status="PENDING")) == []
    alerted = results.on_ai(ai())  # the alert goes out at once: it does not wait for routing
    assert issued(alerted) == []  # the result does: routing has not seen the AI result, its priority is the old one
    outputs = results.on_row(row())
    (result,) = issued(outputs)
    assert result.status is ResultStatus.PRELIMINARY and result.revision == 1 and result.replaces is None
    assert result.critical and [f.label for f in result.findings] == ["ich"]
    assert result.findings[0].codes[0].value == "1386000"
    assert result.instances[0].sop_instance_uid == f"{STUDY}.1"  # original UIDs: the identified zone
    assert "INDICATION: headache after fall" in result.report_text
    assert "COMPARISON: no relevant prior" in result.report_text
    assert "Intracranial hemorrhage (AI head-ct 1.0, confidence 0.91)" in result.report_text
    assert "Critical: Intracranial hemorrhage" in result.report_text
    (alert,) = [event for spec, event in alerted if spec is ALERT]
    assert alert.severity is Priority.CRITICAL and alert.finding_code == "SCT:1386000"
    assert "acknowledge by" in alert.message
    # the same AI result again (a re-delivery): no new revision, no second alert
    assert results.on_ai(ai()) == []


def test_silent_findings_never_reach_a_result() -> None:
    results = stage()
    results.on_assembled(assembled())
    results.on_row(row())
    (result,) = issued(results.on_ai(ai(findings=[finding("pneumo", critical=True, silent=True)])))
    assert result.findings == [] and not result.critical
    assert "No finding at the AI operating thresholds" in result.report_text


def test_a_rejected_finding_corrects_the_result_and_signing_makes_it_final_with_the_signed_text() -> None:
    results = stage()
    results.on_assembled(assembled())
    results.on_row(row())
    (first,) = issued(results.on_ai(ai()))
    (corrected,) = issued(results.on_row(row(status="IN_PROGRESS", decisions=["ich: REJECT"])))
    assert corrected.status is ResultStatus.CORRECTED and corrected.replaces == first.revision
    assert corrected.findings[0].decision == "REJECT" and not corrected.critical
    assert corrected.changes == ["finding ich reject"]
    assert "was not confirmed by the reader" in corrected.report_text
    # SIGNED on the row comes just before reading.applied brings the text: wait for it
    assert issued(results.on_row(row(status="SIGNED", decisions=["ich: REJECT"]))) == []
    (final,) = issued(results.on_applied(sign()))
    assert final.status is ResultStatus.FINAL and final.revision == 3 and final.replaces == 2
    assert final.report_text == "Acute subdural hematoma." and final.reader_id == "dr-neuro"
    assert final.signed_at is not None and final.changes == ["signed"]


def test_a_later_version_whose_ai_result_differs_corrects_what_was_sent() -> None:
    results = stage()
    results.on_assembled(assembled(1))
    results.on_row(row(1))
    results.on_ai(ai(1))
    assert issued(results.on_assembled(assembled(2))) == []  # its AI result has not arrived yet
    assert issued(results.on_ai(ai(1))) == []  # a late result of the old version says nothing new
    assert issued(results.on_row(row(1).replace(priority=Priority.ROUTINE, prior_summary="1 relevant prior"))) == []
    results.on_row(row(2))
    (corrected,) = issued(results.on_ai(ai(2, findings=[finding(confidence=0.97)])))
    assert corrected.status is ResultStatus.CORRECTED and corrected.version == 2 and corrected.replaces == 1
    assert corrected.changes[0] == "study version 2 (was 1)"


def test_without_ai_only_the_signature_issues_a_result() -> None:
    results = stage()
    results.on_assembled(assembled())
    assert issued(results.on_row(row(status="SIGNED"))) == []
    (final,) = issued(results.on_applied(sign("Normal head CT.")))
    assert final.status is ResultStatus.FINAL and final.findings == [] and final.report_text == "Normal head CT."


def test_a_signature_without_text_signs_the_draft_without_its_preliminary_disclaimer() -> None:
    results = stage()
    results.on_assembled(assembled())
    results.on_row(row())
    (draft,) = issued(results.on_ai(ai()))
    assert draft.report_text.endswith("Preliminary: AI-assisted draft, not reviewed by a radiologist.")
    results.on_row(row(status="SIGNED", decisions=["ich: ACCEPT"]))
    (final,) = issued(results.on_applied(sign(None)))
    assert final.status is ResultStatus.FINAL and final.findings[0].decision == "ACCEPT"
    assert "Preliminary" not in final.report_text
    assert final.report_text.endswith("Signed by dr-neuro without edits to the AI-assisted draft.")


def test_state_and_results_round_trip_through_their_codecs() -> None:
    results = stage()
    results.on_assembled(assembled())
    results.on_row(row())
    (result,) = issued(results.on_ai(ai()))
    codec = Codec()
    assert codec.decode(codec.encode(result)) == result
    state = results.states[STUDY]
    assert ResultsState.from_dict(state.to_dict()) == state
