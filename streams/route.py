"""Routing v1: priority and subspecialty of a study from its DICOM metadata, by rules.

About 430 lines: the rule file, then how the order, the AI result and the prior comparison each shape one row.

Rules live in a TOML file (``routing.rules_file``; the packaged
``streams/rules/default.toml`` otherwise), validated when loaded: an unknown key, an
unknown priority or a bad regular expression fails at start with the rule's id, never
in the middle of a stream. Every matching rule is recorded in the decision's ``reasons``
so a reader or an auditor sees why a study got its priority (explainable routing).

The subspecialty is taken from the first matching ``[[subspecialty]]`` rule; the
priority is the most urgent of all matching ``[[priority]]`` rules. The study's HL7
order, joined by :mod:`streams.orders` and read from ``study.order``, adds clinical
context: a STAT order makes it at least URGENT and its reason for exam goes on the
worklist. Routing keeps, per study, the latest version and the joined order
(:class:`RouteState`), so an order that arrives after its study was routed re-routes it:
the same version's worklist row is replaced by one with a later ``routed_at``
(:func:`study_arrives`, :func:`order_arrives` decide what is routed when). The prior
comparison (:mod:`streams.priors`, re-identified by :mod:`streams.relink`) does the same
(:func:`priors_arrive`): the row shows the relevant priors, the comparison summary,
follow-up flags, and every candidate prior with its rule or the reason it is not relevant.

AI never holds a study back: a study is routed at once with ``ai_status`` PENDING, and
its AI result (``study.ai``, re-identified by :mod:`streams.relink`) routes the same
version again (:func:`ai_arrives`): a critical finding of an active model makes it
CRITICAL with the finding as the reason (:func:`apply_ai`); a TIMEOUT / ERROR /
NOT_APPLICABLE result is shown with its reason and changes nothing else; silent models
never reach the worklist. Routing also tells the AI stage which studies are urgent (a
STAT order or an emergency location): an :class:`AdmissionHint` on
``inference.priority``, naming the study by its de-identified UID only. Its rows go on
``worklist.routed``, where :mod:`streams.worklist` puts each study on a reader's list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from adapters.telemetry import get_logger
from schemas.events import (
    AdmissionHint,
    InferenceResult,
    InferenceStatus,
    OrderReceived,
    PriorComparison,
    Priority,
    RoutingDecision,
    RuleHit,
    StudyAssembled,
    WorklistUpdate,
    finding_text,
    utcnow,
)
from schemas.topics import (
    INFERENCE_PRIORITY,
    ROUTING_DECISION,
    STUDY_AI,
    STUDY_ASSEMBLED,
    STUDY_ORDER,
    STUDY_PRIORS,
    WORKLIST_ROUTED,
)
from schemas.toml_files import read_toml
from streams.runner import Output, Stage, Unexpected, run_stage
from streams.state import TableState, TypedTable

log = get_logger("radstream.route")

_CONDITIONS = {"modality", "body_part", "description_matches", "source_site"}


class RuleError(ValueError):
    """A routing rule file is invalid; the message names the rule and the key."""


@dataclass(frozen=True)
class Condition:
    modality: frozenset[str] | None = None
    body_part: frozenset[str] | None = None
    description: re.Pattern[str] | None = None
    source_site: frozenset[str] | None = None

    def matches(self, study: StudyAssembled) -> bool:
        if self.modality is not None and not self.modality & {m.upper() for m in study.modalities}:
            return False
        if self.body_part is not None and not self.body_part & {b.upper() for b in study.body_parts}:
            return False
        if self.description is not None:
            text = " ".join(filter(None, [study.study_description, *(s.series_description or "" for s in study.series)]))
            if not self.description.search(text):
                return False
        if self.source_site is not None and study.source_site.upper() not in self.source_site:
            return False
        return True


@dataclass(frozen=True)
class Rule:
    id: str
    description: str
    when: Condition
    priority: Priority | None = None
    subspecialty: str | None = None


@dataclass(frozen=True)
class RuleSet:
    default_priority: Priority
    default_subspecialty: str
    subspecialty_rules: tuple[Rule, ...]
    priority_rules: tuple[Rule, ...]
    source: str


def default_rules_path() -> Path:
    return Path(str(resources.files("streams").joinpath("rules", "default.toml")))


def load_rules(path: Path | None = None) -> RuleSet:
    path = path or default_rules_path()
    return parse_rules(read_toml(path, "routing rules file", RuleError), str(path))


def parse_rules(data: dict[str, Any], source: str = "<rules>") -> RuleSet:
    unknown = set(data) - {"defaults", "subspecialty", "priority"}
    if unknown:
        raise RuleError(f"{source}: unknown top-level keys {sorted(unknown)}")
    defaults = data.get("defaults", {})
    seen: set[str] = set()

    def rule(raw: dict[str, Any], kind: str) -> Rule:
        rule_id = raw.get("id")
        if not rule_id or not isinstance(rule_id, str):
            raise RuleError(f"{source}: a [[{kind}]] rule has no id")
        if rule_id in seen:
            raise RuleError(f"{source}: rule id {rule_id!r} is used twice")
        seen.add(rule_id)
        allowed = {"id", "description", "when", kind}
        if extra := set(raw) - allowed:
            raise RuleError(f"{source}: rule {rule_id!r} has unknown keys {sorted(extra)}")
        if kind not in raw:
            raise RuleError(f"{source}: rule {rule_id!r} must set {kind!r}")
        when = raw.get("when", {})
        if extra := set(when) - _CONDITIONS:
            raise RuleError(f"{source}: rule {rule_id!r} has unknown conditions {sorted(extra)}; known: {sorted(_CONDITIONS)}")
        try:
            pattern = re.compile(when["description_matches"], re.IGNORECASE) if "description_matches" in when else None
        except re.error as exc:
            raise RuleError(f"{source}: rule {rule_id!r} description_matches is not a valid regex: {exc}") from None
        condition = Condition(
            modality=_upper_set(when, "modality", rule_id, source),
            body_part=_upper_set(when, "body_part", rule_id, source),
            description=pattern,
            source_site=_upper_set(when, "source_site", rule_id, source),
        )
        value = raw[kind]
        return Rule(
            id=rule_id, description=raw.get("description", rule_id), when=condition,
            priority=_priority(value, rule_id, source) if kind == "priority" else None,
            subspecialty=str(value) if kind == "subspecialty" else None,
        )

    return RuleSet(
        default_priority=_priority(defaults.get("priority", "ROUTINE"), "defaults", source),
        default_subspecialty=str(defaults.get("subspecialty", "general")),
        subspecialty_rules=tuple(rule(r, "subspecialty") for r in data.get("subspecialty", [])),
        priority_rules=tuple(rule(r, "priority") for r in data.get("priority", [])),
        source=source,
    )


def _upper_set(when: dict[str, Any], key: str, rule_id: str, source: str) -> frozenset[str] | None:
    if key not in when:
        return None
    value = when[key]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RuleError(f"{source}: rule {rule_id!r} condition {key!r} must be a string or a list of strings")
    return frozenset(v.upper() for v in values)


def _priority(value: Any, rule_id: str, source: str) -> Priority:
    try:
        return Priority(str(value).upper())
    except ValueError:
        raise RuleError(f"{source}: rule {rule_id!r} priority {value!r} is not one of {[p.value for p in Priority]}") from None


#: Order priorities (OBR-27 / TQ1-9, HL7 table 0027) and the priority they raise a study to at least.
ORDER_PRIORITY_FLOOR = {"S": Priority.URGENT}  # S = STAT
#: ORC-1 order controls (HL7 table 0119) after which the order no longer applies.
ORDER_CANCELLED = frozenset({"CA", "DC", "OC"})


def apply_order(order: OrderReceived | None, priority: Priority, reasons: list[RuleHit]) -> tuple[Priority, bool]:
    """Clinical context of the study's HL7 order: a STAT order makes the study at least
    URGENT. Returns the priority and whether the order applies (not cancelled)."""
    if order is None:
        return priority, False
    if (order.order_control or "").upper() in ORDER_CANCELLED:
        reasons.append(RuleHit(rule_id="order-cancelled", description=f"order {order.accession_number} was cancelled "
                               f"(ORC-1 {order.order_control})", effect="order ignored"))
        return priority, False
    floor = ORDER_PRIORITY_FLOOR.get((order.priority or "").upper())
    if floor is not None:
        reasons.append(RuleHit(rule_id="order-stat", description="order priority STAT", effect=f"priority={floor.value}"))
        if floor.rank < priority.rank:
            priority = floor
    return priority, True


def apply_ai(result: InferenceResult | None, priority: Priority, reasons: list[RuleHit]) -> tuple[Priority, list[str]]:
    """An AI result's effect: a critical finding of an active model makes the study
    CRITICAL; other active findings are listed. Silent findings have none. Returns the
    priority and the findings as the worklist shows them."""
    if result is None or result.status is not InferenceStatus.OK:
        return priority, []
    shown = []
    for finding in result.findings:
        if finding.silent:
            continue
        text = finding_text(finding.label, finding.confidence, finding.model, finding.model_version)
        shown.append(text)
        if finding.critical:
            reasons.append(RuleHit(rule_id="ai-critical", description=f"AI critical finding: {text}",
                                   effect=f"priority={Priority.CRITICAL.value}"))
            priority = Priority.CRITICAL
        else:
            reasons.append(RuleHit(rule_id="ai-finding", description=f"AI finding: {text}", effect="listed"))
    return priority, shown


def ai_status(result: InferenceResult | None, ai_enabled: bool) -> tuple[str, str | None]:
    if not ai_enabled:
        return "NONE", None
    if result is None:
        return "PENDING", None
    return result.status.value, result.reason


def prior_lines(comparison: PriorComparison | None) -> list[str]:
    """Every candidate prior as the worklist shows it: interval, modalities, and the rule
    that made it relevant or the reason it is not (intervals only: its dates are shifted)."""
    if comparison is None:
        return []
    return [f"{p.days_before} days before, {'/'.join(p.modalities) or '?'}: "
            f"{'relevant' if p.relevant else 'not relevant'} ({p.rule}): {p.reason}" for p in comparison.priors]


def route(study: StudyAssembled, rules: RuleSet, now, order: OrderReceived | None = None,
          ai: InferenceResult | None = None, ai_enabled: bool = False,
          priors: PriorComparison | None = None) -> tuple[RoutingDecision, WorklistUpdate]:
    """Decide priority and subspecialty of one study version, with its joined order, its
    AI result and its prior comparison if any; pure. Another version's are not this one's."""
    if ai is not None and ai.version != study.version:
        ai = None
    if priors is not None and priors.version != study.version:
        priors = None
    reasons: list[RuleHit] = []
    subspecialty = rules.default_subspecialty
    for rule in rules.subspecialty_rules:
        if rule.when.matches(study):
            subspecialty = rule.subspecialty or subspecialty
            reasons.append(RuleHit(rule_id=rule.id, description=rule.description, effect=f"subspecialty={subspecialty}"))
            break
    priority = rules.default_priority
    for rule in rules.priority_rules:
        if rule.when.matches(study):
            reasons.append(RuleHit(rule_id=rule.id, description=rule.description, effect=f"priority={rule.priority.value}"))
            if rule.priority.rank < priority.rank:
                priority = rule.priority
    priority, ordered = apply_order(order, priority, reasons)
    priority, findings = apply_ai(ai, priority, reasons)
    status, why_no_ai = ai_status(ai, ai_enabled)
    if not reasons:
        reasons.append(RuleHit(rule_id="defaults", description="no rule matched", effect=f"priority={priority.value}"))
    decision = RoutingDecision(
        trace_id=study.trace_id, study_uid=study.study_uid, version=study.version, priority=priority,
        subspecialty=subspecialty, reasons=reasons, routed_at=now,
        required_license_state=order.patient_state if ordered else None,
    )
    worklist = WorklistUpdate(
        trace_id=study.trace_id, study_uid=study.study_uid, version=study.version,
        accession_number=study.accession_number, patient_id=study.patient_id, patient_name=study.patient_name,
        modality=study.modalities[0] if study.modalities else "OT", modalities=list(study.modalities),
        body_part=study.body_parts[0] if study.body_parts else None, study_description=study.study_description,
        priority=priority, subspecialty=subspecialty, source_site=study.source_site,
        institution_name=study.institution_name, instance_count=study.instance_count,
        reasons=[f"{hit.rule_id}: {hit.effect}" for hit in reasons],
        received_at=study.first_received_at, assembled_at=study.assembled_at, routed_at=now,
        reason_for_exam=order.reason_for_exam if ordered else None,
        ai_status=status, ai_findings=findings, ai_reason=why_no_ai,
        relevant_priors=priors.relevant_priors if priors else 0, prior_summary=priors.summary if priors else None,
        prior_follow_up=list(priors.follow_up) if priors else [], priors=prior_lines(priors),
        patient_state=order.patient_state if ordered else None,
    )
    return decision, worklist


def admission_hint(order: OrderReceived | None, deid_study_uid: str,
                   emergency: re.Pattern[str]) -> AdmissionHint | None:
    """Level 1 in the AI queue for a study with a STAT order or an emergency location (PV1-3)."""
    if order is None or (order.order_control or "").upper() in ORDER_CANCELLED:
        return None
    if (order.priority or "").upper() == "S":
        reason = "STAT order"
    elif order.patient_location and emergency.search(order.patient_location):
        reason = "emergency location"
    else:
        return None
    return AdmissionHint(study_uid=deid_study_uid, level=1, reason=reason)


# ---------------------------------------------------------------- what is routed when


@dataclass(frozen=True)
class RouteState(TableState):
    """What routing keeps of one study: its latest version (without the instance list,
    which routing never reads) and its joined order."""

    study_uid: str
    study: StudyAssembled | None = None
    order: OrderReceived | None = None
    ai: InferenceResult | None = None  # the latest AI result of the latest version
    priors: PriorComparison | None = None  # the latest prior comparison of the latest version


def study_arrives(state: RouteState | None, study: StudyAssembled) -> tuple[RouteState, StudyAssembled]:
    """A study version arrives: it is routed now, with the order joined so far
    (``state.order``); it is kept unless a later version is kept already."""
    state = state or RouteState(study_uid=study.study_uid)
    if state.study is None or state.study.version <= study.version:
        state = replace(state, study=study.replace(instances=[]))
    return state, study


def _standing(result: InferenceResult) -> tuple:
    """Which of two results of a study stands: the later version; within one, a finished
    pre-read over a TIMEOUT (a deferred study's real result follows its TIMEOUT); then the later."""
    return result.version, result.status is not InferenceStatus.TIMEOUT, result.inferred_at


def ai_arrives(state: RouteState | None, result: InferenceResult) -> tuple[RouteState, StudyAssembled | None]:
    """An AI result arrives: kept unless it is of an older version or outranked by the one
    kept; the latest version is routed again with it (None: nothing to route yet, or stale)."""
    state = state or RouteState(study_uid=result.study_uid)
    kept = state.ai
    if kept is not None and _standing(result) < _standing(kept):
        return state, None
    if state.study is not None and result.version < state.study.version:
        return state, None
    state = replace(state, ai=result)
    return state, state.study


def order_arrives(state: RouteState | None, order: OrderReceived) -> tuple[RouteState, StudyAssembled | None]:
    """The study's order arrives or changes: it is kept, and the latest version of the
    study is routed again with it; None while no version has arrived (routed then)."""
    state = replace(state or RouteState(study_uid=order.study_uid), order=order)
    return state, state.study


def priors_arrive(state: RouteState | None, comparison: PriorComparison) -> tuple[RouteState, StudyAssembled | None]:
    """A prior comparison arrives (or a new revision of one): kept unless the kept one is of
    a later version or revision; the latest version is routed again with it."""
    state = state or RouteState(study_uid=comparison.study_uid)
    kept = state.priors
    if kept is not None and (comparison.version, comparison.revision) <= (kept.version, kept.revision):
        return state, None
    if state.study is not None and comparison.version < state.study.version:
        return state, None
    state = replace(state, priors=comparison)
    return state, state.study


# ---------------------------------------------------------------- the stage


def register(ctx) -> None:
    """Attach the routing agent: study.assembled + study.order + AI + priors -> routing.decision + worklist.routed."""
    from schemas.deid.keys import load_keys

    rules = load_rules(ctx.settings.routing.rules_file)  # invalid rules stop the worker at start
    states = TypedTable.declare(ctx, "route-state", RouteState)
    ai_enabled = ctx.settings.ai.enabled
    keys = load_keys(ctx.settings)  # the de-identified UID of a study, for its admission hint
    emergency = re.compile(ctx.settings.ai.emergency_locations, re.IGNORECASE)

    def routed(study: StudyAssembled | None, state: RouteState) -> list[Output]:
        if study is None:
            return []
        decision, worklist = route(study, rules, utcnow(), state.order, state.ai, ai_enabled, state.priors)
        log.info("study routed", trace_id=study.trace_id, version=study.version, priority=decision.priority.value,
                 subspecialty=decision.subspecialty, order=state.order.accession_number if state.order else None,
                 ai_status=worklist.ai_status, ai_findings=worklist.ai_findings)
        outputs: list[Output] = [(ROUTING_DECISION, decision), (WORKLIST_ROUTED, worklist)]
        hint = admission_hint(state.order, keys.uid(study.study_uid), emergency) if ai_enabled else None
        if hint is not None and state.ai is None:
            outputs.append((INFERENCE_PRIORITY, hint))
        return outputs

    def on_study(study: StudyAssembled) -> list[Output]:
        state, to_route = states.apply(study.study_uid, study_arrives, study)
        return routed(to_route, state)

    def on_order(order: OrderReceived) -> list[Output]:
        if not order.study_uid:
            raise Unexpected("an order on study.order must name its study_uid")
        state, to_route = states.apply(order.study_uid, order_arrives, order)
        return routed(to_route, state)

    def on_ai(result: InferenceResult) -> list[Output]:
        state, to_route = states.apply(result.study_uid, ai_arrives, result)
        return routed(to_route, state)

    def on_priors(comparison: PriorComparison) -> list[Output]:
        state, to_route = states.apply(comparison.study_uid, priors_arrive, comparison)
        return routed(to_route, state)

    # Studies, orders, AI results and prior comparisons share one stream, so the state is
    # written in partition order.
    run_stage(ctx, Stage("route", (STUDY_ASSEMBLED, STUDY_ORDER, STUDY_AI, STUDY_PRIORS),
                         {StudyAssembled: on_study, OrderReceived: on_order, InferenceResult: on_ai,
                          PriorComparison: on_priors}))
