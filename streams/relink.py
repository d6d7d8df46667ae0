"""Re-identification of AI results and prior comparisons, in the identified zone:
inference.result -> study.ai, prior.comparison -> study.priors.

The AI and priors stages know studies only by their de-identified UIDs. Here, and nowhere
else, a result or comparison meets the de-identification link (``study.link.by-deid``, published by the
de-identification stage beside ``study.link`` and keyed, like the results, by the
de-identified study UID, so both reach the same worker) and goes on to routing keyed by
the original study UID with the study's original trace id. What arrives before its link
waits in the table for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from adapters.telemetry import get_logger
from schemas.events import InferenceResult, PriorComparison, Record, StudyLink
from schemas.topics import INFERENCE_RESULT, PRIOR_COMPARISON, STUDY_AI, STUDY_LINK_BY_DEID, STUDY_PRIORS
from streams.runner import Output, Stage, run_stage
from streams.state import TableState, TypedTable

log = get_logger("radstream.relink")


@dataclass(frozen=True)
class RelinkState(TableState):
    """One de-identified study: which original study it is (once linked), and the results
    that came before the link."""

    deid_study_uid: str
    study_uid: str | None = None
    trace_id: str | None = None
    waiting: list[InferenceResult] = field(default_factory=list)
    waiting_comparisons: list[PriorComparison] = field(default_factory=list)


def reidentified(event: Record, state: RelinkState) -> Record:
    return event.replace(study_uid=state.study_uid, trace_id=state.trace_id)


def link_arrives(state: RelinkState | None, link: StudyLink) -> tuple[RelinkState, list[Record]]:
    """The link is kept (every version links the same two studies); what waited for it goes on."""
    state = replace(state or RelinkState(deid_study_uid=link.deid_study_uid), study_uid=link.study_uid,
                    trace_id=link.trace_id)
    released = [reidentified(event, state) for event in (*state.waiting, *state.waiting_comparisons)]
    return replace(state, waiting=[], waiting_comparisons=[]), released


def result_arrives(state: RelinkState | None, result: InferenceResult) -> tuple[RelinkState, list[Record]]:
    state = state or RelinkState(deid_study_uid=result.study_uid)
    if state.study_uid is None:
        return replace(state, waiting=[*state.waiting, result]), []
    return state, [reidentified(result, state)]


def comparison_arrives(state: RelinkState | None, comparison: PriorComparison) -> tuple[RelinkState, list[Record]]:
    state = state or RelinkState(deid_study_uid=comparison.study_uid)
    if state.study_uid is None:
        return replace(state, waiting_comparisons=[*state.waiting_comparisons, comparison]), []
    return state, [reidentified(comparison, state)]


def register(ctx) -> None:
    """Attach the relink agent: study.link.by-deid + inference.result -> study.ai."""
    links = TypedTable.declare(ctx, "relink", RelinkState)

    def released(events: list[Record]) -> list[Output]:
        outputs: list[Output] = []
        for event in events:
            if isinstance(event, InferenceResult):
                log.info("AI result linked to its study", trace_id=event.trace_id, version=event.version,
                         status=event.status.value, findings=[f.label for f in event.findings])
                outputs.append((STUDY_AI, event))
            else:
                outputs.append((STUDY_PRIORS, event))
        return outputs

    def on_link(link: StudyLink) -> list[Output]:
        _, results = links.apply(link.deid_study_uid, link_arrives, link)
        return released(results)

    def on_result(result: InferenceResult) -> list[Output]:
        _, results = links.apply(result.study_uid, result_arrives, result)
        return released(results)

    def on_comparison(comparison: PriorComparison) -> list[Output]:
        _, comparisons = links.apply(comparison.study_uid, comparison_arrives, comparison)
        return released(comparisons)

    # All keyed by the de-identified study UID: one stream, the table written in partition order.
    run_stage(ctx, Stage("relink", (STUDY_LINK_BY_DEID, INFERENCE_RESULT, PRIOR_COMPARISON),
                         {StudyLink: on_link, InferenceResult: on_result, PriorComparison: on_comparison}))
