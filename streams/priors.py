"""Prior comparison, in the de-identified zone: each study version beside the patient's relevant earlier studies.

A patient's studies meet on the keyed pseudonym (the same on every worker). Every
candidate prior is listed with the rule that made it relevant or the reason it is not
(the rules, pure, are :mod:`streams.prior_relevance`: body region from the Playbook-style
tables of :mod:`schemas.priors`, modality, look-back window, last N, on the shifted dates);
the AI findings of the study and of its most recent relevant prior with a result are
compared (new, resolved, persistent, score changes) and follow-up flags raised.

State is one :class:`PriorsState` per patient (a summary of each study, never pixels or
instances). :func:`study_arrives` and :func:`result_arrives` are pure steps: each returns
the comparisons that changed, so a prior that arrives after a later study, or a result
that arrives after its study, publishes a new revision of every comparison it changes.
Events reach the stage keyed by patient: ``priors-rekey`` copies ``study.deidentified`` and
``inference.result`` (both keyed by study) to ``priors.*-by-patient`` (:func:`register`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial

from adapters.telemetry import get_logger
from schemas.events import (
    InferenceResult,
    InferenceStatus,
    PriorComparison,
    PriorStudy,
    ResultByPatient,
    StudyDeidentified,
)
from schemas.topics import INFERENCE_RESULT, PRIOR_COMPARISON, PRIORS_RESULT_BY_PATIENT, PRIORS_STUDY_BY_PATIENT, STUDY_DEIDENTIFIED
from streams.prior_relevance import (  # re-exported: the stage's whole API in one place
    PENDING,
    FindingComparison,
    FindingSeen,
    PriorRules,
    Relevance,
    RegionSeen,
    ScoreSeen,
    StudySummary,
    active_findings,
    body_regions,
    compare_findings,
    follow_up_flags,
    region_evidence,
    relevant_priors,
    summarise_study,
    taken_at,
    ago,
    days_before,
)
from streams.runner import Output, Stage, run_stage
from streams.state import TableState, TypedTable

__all__ = [
    "PENDING", "FindingComparison", "FindingSeen", "PatientOfStudy", "PriorRules", "PriorsState", "Relevance",
    "RegionSeen", "ScoreSeen", "StudySummary", "active_findings", "body_regions", "by_patient", "compare_findings",
    "comparison", "follow_up_flags", "region_evidence", "rekey_result", "rekey_study", "register", "relevant_priors",
    "result_arrives", "study_arrives", "summarise_study", "taken_at", "ago", "days_before",
]

log = get_logger("radstream.priors")


# ---------------------------------------------------------------- state


@dataclass(frozen=True)
class PriorsState(TableState):
    """One patient (by pseudonym): every study seen, and AI results that came before their study."""

    patient_pseudonym: str
    studies: dict[str, StudySummary] = field(default_factory=dict)
    waiting: dict[str, ResultByPatient] = field(default_factory=dict)


# ---------------------------------------------------------------- the comparison


def comparison(state: PriorsState, current: StudySummary, rules: PriorRules) -> PriorComparison:
    """The comparison of one study as of ``state`` (revision and clock filled by the caller)."""
    listed = relevant_priors(current, state.studies.values(), rules)
    relevant = [r.prior for r in listed if r.relevant]
    compared_with = next((p for p in relevant if p.ai_status == InferenceStatus.OK.value), None)
    compared = None
    if compared_with is not None and current.ai_status == InferenceStatus.OK.value:
        compared = compare_findings(current, compared_with, rules.score_change_min)
    flags = follow_up_flags(current, relevant, compared, compared_with)
    summary = (f"{len(relevant)} relevant prior{'s' if len(relevant) != 1 else ''} "
               f"(of {len(listed)} earlier stud{'ies' if len(listed) != 1 else 'y'})")
    if relevant:
        summary += f", latest {'/'.join(relevant[0].modalities)} {ago(current, relevant[0])}"
    if compared is not None:
        parts = [f"{name} {', '.join(labels)}" for name, labels in (("new", compared.new), ("resolved", compared.resolved),
                 ("persistent", compared.persistent)) if labels]
        summary += f"; AI vs the prior of {ago(current, compared_with)}: {'; '.join(parts) or 'no findings either time'}"
    elif compared_with is not None:
        summary += f"; AI vs the prior of {ago(current, compared_with)}: awaiting this study's result ({current.ai_status})"
    return PriorComparison(
        trace_id=current.trace_id, study_uid=current.study_uid, version=current.version,
        patient_pseudonym=state.patient_pseudonym, revision=current.revision,
        body_regions=[str(r.body_region) for r in current.regions],
        priors=[PriorStudy(study_uid=r.prior.study_uid, version=r.prior.version, modalities=r.prior.modalities,
                           body_regions=[str(g.body_region) for g in r.prior.regions], relevant=r.relevant, rule=r.rule,
                           reason=r.reason, days_before=r.days_before, ai_status=r.prior.ai_status,
                           findings=sorted({f.label for f in r.prior.findings}), study_date=r.prior.study_date)
                for r in listed],
        relevant_priors=len(relevant), new_findings=compared.new if compared else [],
        resolved_findings=compared.resolved if compared else [],
        persistent_findings=compared.persistent if compared else [],
        changed_findings=compared.changed if compared else [], follow_up=flags, follow_up_due=bool(flags),
        summary=summary, compared_with=compared_with.study_uid if compared_with else None,
        # the patient's shifted clock: a real time next to shifted dates would give the shift away
        compared_at=max([current.seen_at, *(r.prior.seen_at for r in listed)]),
    )


def _fingerprint(found: PriorComparison) -> str:
    content = found.replace(revision=0, compared_at=datetime(1970, 1, 1, tzinfo=UTC)).to_avro()
    content.pop("compared_at")
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _republish(state: PriorsState, since: datetime, rules: PriorRules) -> tuple[PriorsState, list[PriorComparison]]:
    """New revisions of the comparisons of every study taken at or after ``since`` that changed."""
    studies, published = dict(state.studies), []
    for uid, study in sorted(state.studies.items(), key=lambda item: (item[1].taken_at, item[0])):
        if study.taken_at < since:
            continue
        found = comparison(replace(state, studies=studies), study, rules)
        mark = _fingerprint(found)
        if mark == study.published:
            continue
        studies[uid] = replace(study, revision=study.revision + 1, published=mark)
        published.append(found.replace(revision=study.revision + 1))
    return replace(state, studies=studies), published


def _with_result(study: StudySummary, result: ResultByPatient) -> StudySummary:
    findings, scores = active_findings(result)
    return replace(study, ai_status=result.status.value, result_version=result.version, findings=findings,
                   scores=scores, seen_at=max(study.seen_at, result.inferred_at))


def study_arrives(state: PriorsState | None, study: StudyDeidentified,
                  rules: PriorRules) -> tuple[PriorsState, list[PriorComparison]]:
    """A study version arrives: its comparison, and new ones for the later studies it changes."""
    state = state or PriorsState(patient_pseudonym=study.patient_pseudonym)
    known = state.studies.get(study.study_uid)
    if known is not None and known.version >= study.version:
        return state, []  # a replayed or older version
    summary = summarise_study(study, rules.tables)
    if known is not None:  # the AI result of an earlier version stands until this version's arrives
        summary = replace(summary, ai_status=known.ai_status, result_version=known.result_version,
                          findings=known.findings, scores=known.scores, revision=known.revision,
                          published=known.published, seen_at=max(summary.seen_at, known.seen_at))
    waiting = dict(state.waiting)
    if (result := waiting.pop(study.study_uid, None)) is not None:
        summary = _with_result(summary, result)
    state = replace(state, studies={**state.studies, study.study_uid: summary}, waiting=waiting)
    since = summary.taken_at if known is None else min(summary.taken_at, known.taken_at)
    return _republish(state, since, rules)


def result_arrives(state: PriorsState | None, result: ResultByPatient,
                   rules: PriorRules) -> tuple[PriorsState, list[PriorComparison]]:
    """An AI result arrives: its study's comparison changes, and so may those of later studies."""
    state = state or PriorsState(patient_pseudonym=result.patient_pseudonym)
    study = state.studies.get(result.study_uid)
    if study is None:  # before its study: kept until the study arrives
        held = state.waiting.get(result.study_uid)
        if held is None or held.version <= result.version:
            state = replace(state, waiting={**state.waiting, result.study_uid: result})
        return state, []
    if result.version < study.result_version:
        return state, []
    state = replace(state, studies={**state.studies, result.study_uid: _with_result(study, result)})
    return _republish(state, study.taken_at, rules)


# ---------------------------------------------------------------- re-keying by patient


@dataclass(frozen=True)
class PatientOfStudy(TableState):
    """One de-identified study: its patient's pseudonym once known, and results that came first."""

    study_uid: str
    patient_pseudonym: str | None = None
    waiting: list[InferenceResult] = field(default_factory=list)


def by_patient(result: InferenceResult, pseudonym: str) -> ResultByPatient:
    return ResultByPatient(trace_id=result.trace_id, study_uid=result.study_uid, version=result.version,
                           patient_pseudonym=pseudonym, status=result.status, findings=result.findings,
                           models=result.models, inferred_at=result.inferred_at, reason=result.reason)


def rekey_study(state: PatientOfStudy | None, study: StudyDeidentified) -> tuple[PatientOfStudy, list[Output]]:
    """The study travels without its instance list; results that waited for it follow it."""
    state = state or PatientOfStudy(study_uid=study.study_uid)
    outputs: list[Output] = [(PRIORS_STUDY_BY_PATIENT, study.replace(instances=[]))]
    outputs += [(PRIORS_RESULT_BY_PATIENT, by_patient(r, study.patient_pseudonym)) for r in state.waiting]
    return replace(state, patient_pseudonym=study.patient_pseudonym, waiting=[]), outputs


def rekey_result(state: PatientOfStudy | None, result: InferenceResult) -> tuple[PatientOfStudy, list[Output]]:
    state = state or PatientOfStudy(study_uid=result.study_uid)
    if state.patient_pseudonym is None:
        return replace(state, waiting=[*state.waiting, result]), []
    return state, [(PRIORS_RESULT_BY_PATIENT, by_patient(result, state.patient_pseudonym))]


def register(ctx) -> None:
    """Attach ``priors-rekey`` (study.deidentified + inference.result -> priors.*-by-patient)
    and ``priors`` (priors.*-by-patient -> prior.comparison)."""
    rules = PriorRules.from_settings(ctx.settings)  # an invalid region table stops the worker at start
    patients_of = TypedTable.declare(ctx, "priors-patient-of-study", PatientOfStudy)
    patients = TypedTable.declare(ctx, "priors-by-patient", PriorsState)

    def published(found: list[PriorComparison]) -> list[Output]:
        for item in found:
            log.info("prior comparison", trace_id=item.trace_id, version=item.version, revision=item.revision,
                     relevant=item.relevant_priors, follow_up=item.follow_up_due)
        return [(PRIOR_COMPARISON, item) for item in found]

    def on_study(study: StudyDeidentified) -> list[Output]:
        return published(patients.apply(study.patient_pseudonym, partial(study_arrives, rules=rules), study)[1])

    def on_result(result: ResultByPatient) -> list[Output]:
        return published(patients.apply(result.patient_pseudonym, partial(result_arrives, rules=rules), result)[1])

    # both keyed by de-identified study UID: one stream, the table written in partition order
    run_stage(ctx, Stage("priors-rekey", (STUDY_DEIDENTIFIED, INFERENCE_RESULT), {
        StudyDeidentified: lambda study: patients_of.apply(study.study_uid, rekey_study, study)[1],
        InferenceResult: lambda result: patients_of.apply(result.study_uid, rekey_result, result)[1]}))
    # both keyed by patient pseudonym: one patient's studies and results in order on one worker
    run_stage(ctx, Stage("priors", (PRIORS_STUDY_BY_PATIENT, PRIORS_RESULT_BY_PATIENT),
                         {StudyDeidentified: on_study, ResultByPatient: on_result}))
