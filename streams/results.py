"""Results out, in the identified zone: study.assembled + study.ai + worklist.update +
reading.applied -> results.outbox (+ alert for critical findings).

Every output a clinical system receives (DICOM SR, HL7 ORU^R01, FHIR DiagnosticReport,
webhook) is built from one :class:`StudyResult`; this stage decides when there is a new
one. A revision is published only when what the outputs would say changes, so replays and
re-deliveries of the inputs publish nothing twice:

* the first AI result of the study's latest version -> PRELIMINARY (AI findings and a draft
  report built from them, the prior comparison and the order's indication);
* the reader signs -> FINAL (the signed text);
* after something was issued, a rejected or modified finding, or a later version whose AI
  result differs -> CORRECTED, naming the revision it amends.

A critical finding also raises an alert the moment its AI result arrives, with the deadline
by which someone must acknowledge it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from adapters.telemetry import get_logger
from schemas.events import (
    Alert,
    InferenceResult,
    Priority,
    ReaderFeedback,
    ReadingAction,
    ResultFinding,
    ResultStatus,
    StudyAssembled,
    StudyResult,
    WorklistUpdate,
    utcnow,
)
from schemas.topics import ALERT, READING_APPLIED, RESULTS_OUTBOX, STUDY_AI, STUDY_ASSEMBLED, WORKLIST_UPDATE
from streams.runner import Output, Stage, run_stage
from streams.state import TableState, TypedTable

log = get_logger("radstream.results")


@dataclass(frozen=True)
class ResultsState(TableState):
    """What one study's outputs are built from, and the last revision issued."""

    study_uid: str
    assembled: StudyAssembled | None = None  # the latest version: instances and demographics
    ai: InferenceResult | None = None  # the AI result of the latest version it arrived for
    row: WorklistUpdate | None = None  # the latest worklist row: priority, reader, decisions, signature
    signed_by: str | None = None  # the reader whose SIGN was applied
    signed_text: str | None = None
    last: StudyResult | None = None
    fingerprint: str = ""  # of the last revision's content
    alerted: list[str] = field(default_factory=list)  # "version:label" of the critical alerts raised


# ---------------------------------------------------------------- the draft report

#: how each modality's examination is named in the draft; others use the DICOM code
_EXAMINATION = {"CT": "CT", "MR": "MRI", "CR": "Radiograph", "DX": "Radiograph", "US": "Ultrasound"}


def draft_report(assembled: StudyAssembled, findings: list[ResultFinding], row: WorklistUpdate | None,
                 ai: InferenceResult | None, signed_by: str | None = None) -> str:
    """The preliminary report a reader starts from: examination, indication (the order),
    comparison (the prior comparison), the AI findings in words, and an impression. Each
    finding is worded by its model card's code meaning; a model's name and version say
    whose reading it is, so the template follows the model and the modality."""
    modality = next(iter(assembled.modalities), "OT")
    examination = f"{_EXAMINATION.get(modality, modality)} {assembled.study_description or ''}".strip()
    lines = [f"EXAMINATION: {examination}",
             f"INDICATION: {(row.reason_for_exam if row else None) or 'Not provided.'}",
             f"COMPARISON: {(row.prior_summary if row else None) or 'None available.'}",
             "FINDINGS:"]
    active = [f for f in findings if f.decision != "REJECT"]
    if ai is None:
        lines.append("No AI pre-read.")
    elif not active:
        models = ", ".join(f"{m.model} {m.model_version}" for m in ai.models) or "none applicable"
        lines.append(f"No finding at the AI operating thresholds (models: {models}).")
    for f in active:
        what = f.modified_to or (f.codes[0].meaning if f.codes else f.label)
        source = "reader" if f.modified_to else f"AI {f.model} {f.model_version}, confidence {f.confidence:.2f}"
        lines.append(f"- {what}{' at ' + f.location if f.location else ''} ({source}).")
    rejected = [f for f in findings if f.decision == "REJECT"]
    for f in rejected:
        lines.append(f"- AI finding {f.label} ({f.model} {f.model_version}) was not confirmed by the reader.")
    critical = [f for f in active if f.critical]
    impression = ("Critical: " + "; ".join(f.modified_to or (f.codes[0].meaning if f.codes else f.label)
                                          for f in critical) + ". Communicated as a critical result."
                  if critical else "See findings." if active else "No acute finding identified by AI pre-read.")
    lines += [f"IMPRESSION: {impression}",
              f"Signed by {signed_by} without edits to the AI-assisted draft." if signed_by
              else "Preliminary: AI-assisted draft, not reviewed by a radiologist."]
    return "\n".join(lines)


# ---------------------------------------------------------------- the revisions

def _decisions(row: WorklistUpdate | None) -> dict[str, str]:
    decisions = {}
    for text in row.reader_decisions if row else []:
        label, _, decision = text.partition(": ")
        decisions[label] = decision
    return decisions


def findings_of(ai: InferenceResult | None, row: WorklistUpdate | None) -> list[ResultFinding]:
    """The AI result's routing-effective findings (never the silent ones) with the reader's decisions."""
    decisions = _decisions(row)
    out = []
    for f in ai.findings if ai else []:
        if f.silent:
            continue
        decision = decisions.get(f.label)
        modified_to = decision.split(" -> ", 1)[1] if decision and decision.startswith("MODIFY -> ") else None
        out.append(ResultFinding(label=f.label, model=f.model, model_version=f.model_version,
                                 confidence=round(f.confidence, 4), critical=f.critical, codes=list(f.codes),
                                 decision=decision.split(" ", 1)[0] if decision else None,
                                 modified_to=modified_to, location=f.location))
    return out


def _content(result: StudyResult) -> str:
    """The clinical content of a revision: the study version, the findings with the reader's
    decisions, and the signature with its text. Equal content, no new revision: a worklist row
    republished for its assignment, or a prior comparison refined after the AI result, amends
    nothing already sent (the next revision's draft carries them)."""
    data = {"version": result.version, "critical": result.critical,
            "findings": [f.to_avro() for f in result.findings], "reader": result.reader_id,
            "signed_at": result.signed_at, "signed_text": result.report_text if result.signed_at else None}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _why(state: ResultsState, findings: list[ResultFinding], signed: bool) -> list[str]:
    last = state.last
    if last is None:
        return ["signed" if signed else "first AI result"]
    reasons = []
    if state.assembled and state.assembled.version != last.version:
        reasons.append(f"study version {state.assembled.version} (was {last.version})")
    before = {f.label: f for f in last.findings}
    for f in findings:
        old = before.pop(f.label, None)
        if old is None:
            reasons.append(f"new finding {f.label}")
        elif f.decision != old.decision:
            reasons.append(f"finding {f.label} {f.decision.lower() if f.decision else 'undecided'}"
                           + (f" -> {f.modified_to}" if f.modified_to else ""))
    reasons += [f"finding {label} withdrawn" for label in before]
    if signed and last.signed_at is None:
        reasons.append("signed")
    return reasons or ["content changed"]


def next_result(state: ResultsState, now: datetime) -> StudyResult | None:
    """The new revision the study's state calls for, or None (nothing to say, or said already)."""
    a, row, ai = state.assembled, state.row, state.ai
    if a is None:
        return None
    if ai is not None and ai.version != a.version:
        ai = None  # a later version's AI result has not arrived: nothing new to say about it yet
    # the row says SIGNED just before reading.applied brings the signed text: wait for it
    signed = row is not None and row.status == "SIGNED" and row.version == a.version and state.signed_by is not None
    if ai is None and not signed:
        return None
    if not signed and (row is None or row.version != a.version or row.ai_status == "PENDING"):
        return None  # routing has not seen this AI result yet: its priority would be the one before it
    findings = findings_of(ai, row)
    text = (state.signed_text if signed and state.signed_text  # a signature without text signs the draft
            else draft_report(a, findings, row, ai, signed_by=state.signed_by if signed else None))
    last = state.last
    if signed:  # the first signed revision is FINAL; a change after it corrects it
        status = ResultStatus.FINAL if last is None or last.signed_at is None else ResultStatus.CORRECTED
    else:
        status = ResultStatus.PRELIMINARY if last is None else ResultStatus.CORRECTED
    critical = any(f.critical and f.decision != "REJECT" for f in findings)
    priority = row.priority if row is not None else (Priority.CRITICAL if critical else Priority.ROUTINE)
    result = StudyResult(
        trace_id=a.trace_id, study_uid=a.study_uid, version=a.version, revision=(last.revision + 1) if last else 1,
        status=status, issued_at=now, source_site=a.source_site, modalities=list(a.modalities), priority=priority,
        critical=critical, findings=findings, instances=list(a.instances), report_text=text, changes=[],
        ai_status=ai.status.value if ai else (row.ai_status if row else "NONE"),
        ai_reason=ai.reason if ai else (row.ai_reason if row else None),
        replaces=last.revision if last else None, accession_number=a.accession_number, patient_id=a.patient_id,
        patient_name=a.patient_name, patient_birth_date=a.patient_birth_date, patient_sex=a.patient_sex,
        study_date=a.study_date, study_time=a.study_time, study_description=a.study_description,
        referring_physician=a.referring_physician, reason_for_exam=row.reason_for_exam if row else None,
        prior_summary=row.prior_summary if row else None,
        reader_id=state.signed_by if signed else None, signed_at=row.signed_at if signed and row else None)
    if last is not None and _content(result) == state.fingerprint:
        return None
    return result.replace(changes=_why(state, findings, signed))


def critical_alerts(state: ResultsState, ai: InferenceResult, ack_within: timedelta, now: datetime
                    ) -> tuple[list[str], list[Alert]]:
    """An alert per critical finding of this version not alerted before; the keys to remember."""
    alerted, alerts = list(state.alerted), []
    for f in ai.findings:
        key = f"{ai.version}:{f.label}"
        if not f.critical or f.silent or key in alerted:
            continue
        alerted.append(key)
        code = f.codes[0] if f.codes else None
        deadline = now + ack_within
        alerts.append(Alert(trace_id=ai.trace_id, study_uid=ai.study_uid, version=ai.version,
                            alert_type="critical-finding", severity=Priority.CRITICAL,
                            message=f"AI critical finding {f.label} ({f.model} {f.model_version}, "
                                    f"confidence {f.confidence:.2f}): acknowledge by "
                                    f"{deadline.isoformat(timespec='seconds')}",
                            raised_at=now, finding_code=f"{code.scheme}:{code.value}" if code else None,
                            ack_deadline=deadline, finding=f.label))
    return alerted, alerts


class Results:
    """The stage over its table: each input updates the study's state, then asks for a revision."""

    def __init__(self, states: TypedTable[ResultsState], ack_within: timedelta) -> None:
        self.states, self.ack_within = states, ack_within

    def _update(self, study_uid: str, change, extra: list[Output] | None = None) -> list[Output]:
        state = self.states.get(study_uid) or ResultsState(study_uid=study_uid)
        state = change(state)
        outputs = list(extra or [])
        result = next_result(state, utcnow())
        if result is not None:
            state = replace(state, last=result, fingerprint=_content(result))
            outputs.append((RESULTS_OUTBOX, result))
            log.info("result issued", trace_id=result.trace_id, revision=result.revision,
                     status=result.status.value, changes=result.changes)
        self.states[study_uid] = state
        return outputs

    def on_assembled(self, event: StudyAssembled) -> list[Output]:
        return self._update(event.study_uid, lambda s: s if s.assembled and s.assembled.version > event.version
                            else replace(s, assembled=event))

    def on_ai(self, event: InferenceResult) -> list[Output]:
        state = self.states.get(event.study_uid) or ResultsState(study_uid=event.study_uid)
        if state.ai is not None and state.ai.version > event.version:
            return []
        alerted, alerts = critical_alerts(state, event, self.ack_within, utcnow())
        return self._update(event.study_uid, lambda s: replace(s, ai=event, alerted=alerted),
                            [(ALERT, alert) for alert in alerts])

    def on_row(self, row: WorklistUpdate) -> list[Output]:
        return self._update(row.study_uid, lambda s: s if s.row and s.row.version > row.version else replace(s, row=row))

    def on_applied(self, action: ReaderFeedback) -> list[Output]:
        if action.action is not ReadingAction.SIGN:
            return []  # the worklist row carries the decisions
        return self._update(action.study_uid,
                            lambda s: replace(s, signed_by=action.reader_id, signed_text=action.report_text))


def register(ctx) -> None:
    """Attach the results agent (study.assembled + study.ai + worklist.update + reading.applied -> results.outbox)."""
    if not ctx.settings.results.enabled:
        return
    results = Results(TypedTable.declare(ctx, "results", ResultsState),
                      timedelta(seconds=ctx.settings.results.alert_ack_s))
    handlers: dict = {STUDY_ASSEMBLED: results.on_assembled, STUDY_AI: results.on_ai,
                      WORKLIST_UPDATE: results.on_row, READING_APPLIED: results.on_applied}
    # all keyed by the original study UID: one stream, the table written in partition order
    run_stage(ctx, Stage("results", (STUDY_ASSEMBLED, STUDY_AI, WORKLIST_UPDATE, READING_APPLIED), handlers))

