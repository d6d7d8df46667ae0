"""The pure rules of prior comparison: body regions, relevance, AI finding comparison, follow-up flags.

Relevance has no standard (no IHE profile defines it); the rules here are the ones PACS
use — same patient, body region, modality, a look-back window and the last N (Siegel &
Reiner 1998: the last N found the previous matching exam far more often, per prior
fetched, than a time window alone) — with the regions from the Playbook-style tables of
:mod:`schemas.priors`. Every candidate prior gets the rule that made it relevant or the
reason it is not, in words a reader can check. Dates are the de-identified ones: the
per-patient shift moves every study of a patient by the same days, so intervals and
order hold. :mod:`streams.priors` is the stage that keeps the state and publishes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from schemas.events import InferenceResult, InferenceStatus, ResultByPatient, StudyDeidentified
from schemas.priors import BodyRegion, RelevanceTables, load_tables, words

PENDING = "PENDING"


@dataclass(frozen=True)
class PriorRules:
    """The relevance rules: region tables, look-back window and N (``[priors]`` settings)."""

    tables: RelevanceTables
    look_back_days: int = 3650
    max_priors: int = 3
    score_change_min: float = 0.1

    @classmethod
    def from_settings(cls, settings) -> PriorRules:
        p = settings.priors
        return cls(load_tables(p.regions_file, p.adjacency_file), p.look_back_days, p.max_priors, p.score_change_min)


# ---------------------------------------------------------------- what is kept of a study


@dataclass(frozen=True)
class RegionSeen:
    region: str
    focus: str | None
    evidence: str  # where it came from: "BodyPartExamined HEAD", "StudyDescription BRAIN"

    @property
    def body_region(self) -> BodyRegion:
        return BodyRegion(self.region, self.focus)


@dataclass(frozen=True)
class FindingSeen:
    label: str
    model: str
    confidence: float
    critical: bool


@dataclass(frozen=True)
class ScoreSeen:
    model: str
    label: str
    score: float


@dataclass(frozen=True)
class StudySummary:
    """What prior comparison keeps of one study (its latest version) and its AI result."""

    study_uid: str
    version: int
    trace_id: str
    taken_at: datetime  # shifted StudyDate + StudyTime; the shifted arrival time when the study has no date
    modalities: list[str]
    regions: list[RegionSeen]
    seen_at: datetime  # the latest shifted clock of the study (de-identified, inferred)
    study_date: str | None = None
    ai_status: str = PENDING
    result_version: int = 0
    findings: list[FindingSeen] = field(default_factory=list)
    scores: list[ScoreSeen] = field(default_factory=list)
    revision: int = 0  # comparisons published for this study
    published: str = ""  # fingerprint of the last one: an unchanged comparison is not published again


# ---------------------------------------------------------------- body regions


def region_evidence(study: StudyDeidentified, tables: RelevanceTables) -> dict[BodyRegion, str]:
    """Each body region of the study and what showed it, BodyPartExamined first, then the
    descriptions' words, then the modality; a focused region hides the same region unfocused."""
    found: dict[BodyRegion, str] = {}
    modalities = list(study.modalities) or [s.modality for s in study.series if s.modality]

    def add(source: str, term: str, modality: str | None, evidence: str) -> None:
        for region in tables.lookup(source, term, modality):
            found.setdefault(region, evidence)

    parts = [(p, m) for p in study.body_parts for m in modalities or [None]]
    parts += [(s.body_part_examined, s.modality) for s in study.series if s.body_part_examined]
    for part, modality in parts:
        add("body_part", part, modality, f"BodyPartExamined {part.upper()}")
    for modality in modalities or [None]:
        for word in words(study.study_description):
            add("keyword", word, modality, f"StudyDescription {word}")
    for series in study.series:
        for word in words(series.series_description):
            add("keyword", word, series.modality, f"SeriesDescription {word}")
    for modality in modalities:
        add("modality", "", modality, f"Modality {modality}")
    focused = {region.region for region in found if region.focus}
    return {r: e for r, e in found.items() if r.focus or r.region not in focused}


def body_regions(study: StudyDeidentified, tables: RelevanceTables) -> set[BodyRegion]:
    return set(region_evidence(study, tables))


def taken_at(study: StudyDeidentified) -> datetime:
    """When the study was acquired, on the patient's shifted clock."""
    if study.study_date and len(study.study_date) == 8 and study.study_date.isdigit():
        clock = "".join(ch for ch in (study.study_time or "").split(".")[0] if ch.isdigit())[:6].ljust(6, "0")
        try:
            return datetime.strptime(study.study_date + clock, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            pass
    return study.deidentified_at


def summarise_study(study: StudyDeidentified, tables: RelevanceTables) -> StudySummary:
    return StudySummary(
        study_uid=study.study_uid, version=study.version, trace_id=study.trace_id, taken_at=taken_at(study),
        modalities=sorted({m.upper() for m in study.modalities}), study_date=study.study_date,
        regions=[RegionSeen(r.region, r.focus, e) for r, e in region_evidence(study, tables).items()],
        seen_at=study.deidentified_at,
    )


def active_findings(result: InferenceResult | ResultByPatient) -> tuple[list[FindingSeen], list[ScoreSeen]]:
    """The findings and scores that count: never a silent model's (recorded, never used)."""
    findings = [FindingSeen(f.label, f.model, f.confidence, f.critical) for f in result.findings if not f.silent]
    scores = [ScoreSeen(run.model, s.label, s.score) for run in result.models
              if not run.silent and run.status is InferenceStatus.OK for s in run.scores]
    return findings, scores


# ---------------------------------------------------------------- relevance


@dataclass(frozen=True)
class Relevance:
    prior: StudySummary
    relevant: bool
    rule: str
    reason: str
    days_before: int


def _regions(regions: Iterable[RegionSeen]) -> str:
    return ", ".join(str(r.body_region) for r in regions) or "unknown"


def _match(current: StudySummary, prior: StudySummary, tables: RelevanceTables) -> tuple[bool, str, str]:
    shared = sorted(set(current.modalities) & set(prior.modalities))
    modality = f"same modality {'/'.join(shared)}" if shared else \
        f"{'/'.join(prior.modalities) or '?'} vs {'/'.join(current.modalities) or '?'}"
    if not current.regions or not prior.regions:
        unknown = "body regions of both studies unknown" if not current.regions and not prior.regions else \
            f"body region of the {'current study' if not current.regions else 'prior'} unknown"
        if shared:
            return True, "same-modality", f"{modality}; {unknown}"
        return False, "unknown-region", f"{unknown} and modality differs: {modality}"
    other_focus = None
    for c in current.regions:
        for p in prior.regions:
            if c.region == p.region and (c.focus is None or p.focus is None or c.focus == p.focus):
                where = c.evidence if c.evidence == p.evidence else f"{c.evidence}; prior {p.evidence}"
                return True, "same-region", f"same body region {c.body_region} ({where}); {modality}"
            if c.region == p.region:
                other_focus = (p, c)
    for c in current.regions:
        for p in prior.regions:
            if pair := tables.adjacent(c.body_region, p.body_region):
                return True, "adjacent-region", f"adjacent region {p.body_region} ~ {c.body_region}: {pair.note}; {modality}"
    if other_focus:
        p, c = other_focus
        return False, "other-focus", f"different anatomic focus: {p.focus} vs {c.focus}"
    return False, "other-region", f"different body region: {_regions(prior.regions)} vs {_regions(current.regions)}"


def relevant_priors(current: StudySummary, history: Iterable[StudySummary], rules: PriorRules) -> list[Relevance]:
    """Every earlier study of the patient, relevant ones first (most recent first), each with
    its rule or reason: look-back window, then region and modality, then the last N."""
    earlier = sorted((p for p in history if p.study_uid != current.study_uid and p.taken_at < current.taken_at),
                     key=lambda p: (p.taken_at, p.study_uid), reverse=True)
    listed, kept = [], 0
    for prior in earlier:
        days = days_before(current, prior)
        if days > rules.look_back_days:
            listed.append(Relevance(prior, False, "look-back", f"outside the look-back window: {days} days "
                                    f"before, window {rules.look_back_days} days", days))
            continue
        relevant, rule, reason = _match(current, prior, rules.tables)
        if relevant and kept >= rules.max_priors:
            relevant, rule, reason = False, "last-n", f"not among the last {rules.max_priors} relevant priors ({reason})"
        kept += relevant
        listed.append(Relevance(prior, relevant, rule, reason, days))
    return sorted(listed, key=lambda r: not r.relevant)


# ---------------------------------------------------------------- AI findings


@dataclass(frozen=True)
class FindingComparison:
    new: list[str]
    resolved: list[str]
    persistent: list[str]
    changed: list[str]  # "ich 0.42 -> 0.91 (+0.49, ich_ct_demo)"


def compare_findings(current: StudySummary | InferenceResult | ResultByPatient,
                     prior: StudySummary | InferenceResult | ResultByPatient,
                     score_change_min: float = 0.1) -> FindingComparison:
    """Active findings of the current study against a prior's. A label is new or resolved
    only where the prior was read by the same model for it (its score is there)."""
    (cur_findings, cur_scores), (pri_findings, pri_scores) = (
        (s.findings, s.scores) if isinstance(s, StudySummary) else active_findings(s) for s in (current, prior))
    cur_labels, pri_labels = {f.label for f in cur_findings}, {f.label for f in pri_findings}
    pri_score = {(s.model, s.label): s.score for s in pri_scores}
    cur_score = {(s.model, s.label): s.score for s in cur_scores}
    new = sorted({f.label for f in cur_findings if f.label not in pri_labels and (f.model, f.label) in pri_score})
    resolved = sorted({f.label for f in pri_findings if f.label not in cur_labels and (f.model, f.label) in cur_score})
    changed = [f"{label} {pri_score[(model, label)]:.2f} -> {score:.2f} ({score - pri_score[(model, label)]:+.2f}, {model})"
               for (model, label), score in sorted(cur_score.items())
               if (model, label) in pri_score and abs(score - pri_score[(model, label)]) >= score_change_min]
    return FindingComparison(new, resolved, sorted(cur_labels & pri_labels), changed)


def follow_up_flags(current: StudySummary, relevant: list[StudySummary], compared: FindingComparison | None,
                    compared_with: StudySummary | None) -> list[str]:
    flags = []
    if current.ai_status == PENDING:
        for prior in relevant:
            if prior.findings:
                flags.append(f"the prior of {ago(current, prior)} had {', '.join(sorted({f.label for f in prior.findings}))}: "
                             "this study's AI result is pending")
    if compared is not None and compared_with is not None:
        critical = {f.label for f in current.findings if f.critical}
        for label in compared.persistent:
            if label in critical:
                flags.append(f"persistent critical finding {label} (also on the prior of {ago(current, compared_with)})")
        for label in compared.new:
            if label in critical:
                flags.append(f"new critical finding {label} since the prior of {ago(current, compared_with)}")
    return flags


def days_before(current: StudySummary, prior: StudySummary) -> int:
    """Calendar days from the prior to the current study: the same before and after the
    per-patient date shift, so it reads right in both zones (a shifted date would not)."""
    return (current.taken_at.date() - prior.taken_at.date()).days


def ago(current: StudySummary, prior: StudySummary) -> str:
    days = days_before(current, prior)
    return "the same day" if days == 0 else "1 day before" if days == 1 else f"{days} days before"
