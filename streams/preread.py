"""AI pre-read stage: study.deidentified -> inference.result, in the de-identified zone.

About 430 lines: planning, the study's path through admission, decode and engines, and its result, as one stage.

Runs as its own process and consumer group (``python -m streams inference``), so GPU
workers scale apart from stream workers. For each de-identified study version it:

1. plans which model cards apply (modality, body part, SOP class, image count) and how
   each runs at the study's site (:class:`Rollout`: active, silent, off, or a canary
   share), all pure (:func:`plan`);
2. waits for a lane in the priority-aware :class:`streams.admission.Admission` (level 1
   for a STAT order or an emergency location, hinted on ``inference.priority``; routine
   work beyond the bound is deferred to ``inference.retry``, never dropped);
3. fetches the selected images from the de-identified blobs and decodes and preprocesses
   them in a process pool (on a GPU the decode is the bottleneck, not the engine);
4. runs each model's images through its engine's :class:`engines.batcher.PriorityBatcher`,
   which batches images across studies, most urgent first, behind a circuit breaker;
5. publishes one :class:`InferenceResult` per study version: every model's scores,
   identity and backend, the findings at each label's operating threshold, and timings.

Nothing fails silently and the worklist never waits: a study past its latency budget
gets ``TIMEOUT``, an engine failure or undecodable pixels ``ERROR``, a study no model
reads ``NOT_APPLICABLE``, each with the reason; a deferred study gets ``TIMEOUT`` at once
and its real result when it is read again. The identified zone joins results back to the
worklist through the de-identification link (:mod:`streams.relink`), never here.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from adapters.telemetry import AI_DECODE_SECONDS, AI_DEFERRED, AI_RESULTS, AI_STUDY_SECONDS, get_logger
from engines.batcher import PriorityBatcher
from engines.breaker import CircuitBreaker
from engines.preprocess import (
    NotApplicable,
    Undecodable,
    aggregate,
    decode_worker_init,
    preprocess_instance,
    select_instances,
)
from schemas.events import (
    AdmissionHint,
    CodedConcept,
    Finding,
    InferenceResult,
    InferenceStatus,
    InstanceRef,
    LabelScore,
    ModelRun,
    StudyDeidentified,
)
from schemas.settings import AiSettings, RolloutRule
from schemas.topics import INFERENCE_PRIORITY, INFERENCE_RESULT, INFERENCE_RETRY, STUDY_DEIDENTIFIED
from streams.admission import ROUTINE, Admission, Deferred
from streams.runner import Output, Stage, run_stage

STAGE = "preread"

log = get_logger("radstream.preread")


# ---------------------------------------------------------------- what runs, pure


class Rollout:
    """Per site and model: ``active``, ``silent`` or ``off``; a fraction < 1 is a canary
    (that share of studies, chosen by a hash of study and model, runs active; the rest silent).
    The last matching rule wins; no rule means active. Sites are named as the operator knows
    them; the de-identified zone sees pseudonyms, so each named site is matched by both."""

    def __init__(self, rules: Sequence[RolloutRule], site_alias: Callable[[str], str] = lambda s: s) -> None:
        self.rules = [(rule, {rule.site, site_alias(rule.site)} if rule.site != "*" else {"*"}) for rule in rules]

    def mode(self, model: str, site: str, study_uid: str) -> str:
        chosen = "active"
        for rule, sites in self.rules:
            if rule.model in ("*", model) and ("*" in sites or site in sites):
                chosen = rule.mode
                if chosen == "active" and rule.fraction < 1.0:
                    chosen = "active" if canary_share(study_uid, model) < rule.fraction else "silent"
        return chosen


def canary_share(study_uid: str, model: str) -> float:
    """A stable number in [0, 1) per study and model: every version of a study gets the same arm."""
    digest = hashlib.sha256(f"{model}\0{study_uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class ModelPlan:
    card: Any  # engines.card.ModelCard
    silent: bool
    instances: tuple[InstanceRef, ...]  # the images it reads, in slice order


@dataclass(frozen=True)
class StudyPlan:
    models: tuple[ModelPlan, ...]
    skipped: tuple[str, ...]  # "model: reason" for every card that does not read this study


def plan(study: StudyDeidentified, cards: Sequence[Any], rollout: Rollout) -> StudyPlan:
    """Which models read this study version, how, and which images each reads."""
    models, skipped = [], []
    sop_classes = {ref.sop_class_uid for ref in study.instances}
    for card in cards:
        mode = rollout.mode(card.name, study.source_site, study.study_uid)
        if mode == "off":
            skipped.append(f"{card.name}: off at this site")
            continue
        why_not = card.applies_to(study.modalities, study.body_parts, sop_classes, study.instance_count)
        if why_not:
            skipped.append(f"{card.name}: {why_not}")
            continue
        ordered = [(ref.instance_number, ref) for ref in study.instances if _reads(card, ref)]
        if not ordered:
            skipped.append(f"{card.name}: no instance of an applicable SOP class")
            continue
        models.append(ModelPlan(card, mode == "silent", tuple(select_instances(ordered, card.volume))))
    return StudyPlan(tuple(models), tuple(skipped))


def _reads(card: Any, ref: InstanceRef) -> bool:
    classes = card.applicability.sop_classes
    return not classes or ref.sop_class_uid in classes


def findings_of(card: Any, scores: np.ndarray, silent: bool) -> list[Finding]:
    """The labels at or above their operating threshold, as findings with their codes."""
    return [
        Finding(label=label.name, model=card.name, model_version=card.version, confidence=round(float(score), 4),
                threshold=float(label.threshold), critical=bool(label.critical), silent=silent,
                codes=[CodedConcept(scheme=c.scheme, value=c.value, meaning=c.meaning) for c in label.codes])
        for label, score in zip(card.labels, scores, strict=True)
        if float(score) >= float(label.threshold)
    ]


def overall_status(runs: Sequence[ModelRun]) -> InferenceStatus:
    """OK if any model read the study; else the first failure (ERROR before TIMEOUT)."""
    statuses = {run.status for run in runs}
    for status in (InferenceStatus.OK, InferenceStatus.ERROR, InferenceStatus.TIMEOUT):
        if status in statuses:
            return status
    return InferenceStatus.NOT_APPLICABLE


@dataclass
class Timings:
    taken: float  # monotonic time the stage took the study
    queued_ms: float = 0.0
    decode_ms: float = 0.0
    infer_ms: float = 0.0


def result_of(study: StudyDeidentified, runs: Sequence[ModelRun], findings: Sequence[Finding], level: int,
              timings: Timings, now: float, reason: str | None = None,
              status: InferenceStatus | None = None) -> InferenceResult:
    status = status or overall_status(runs)
    if reason is None and status is not InferenceStatus.OK:
        reason = "; ".join(f"{run.model}: {run.reason}" for run in runs if run.reason) or None
    return InferenceResult(
        trace_id=study.trace_id, study_uid=study.study_uid, version=study.version, status=status,
        findings=sorted(findings, key=lambda f: (f.silent, not f.critical, -f.confidence)), models=list(runs),
        level=level, images=sum(run.images for run in runs), queued_ms=round(timings.queued_ms, 2),
        decode_ms=round(timings.decode_ms, 2), infer_ms=round(timings.infer_ms, 2),
        latency_ms=round((now - timings.taken) * 1000, 2), reason=reason,
        # on the study's shifted clock: a real time next to its shifted dates would give the shift away
        inferred_at=_to_millis(study.deidentified_at + timedelta(seconds=now - timings.taken)),
    )


def _to_millis(value: datetime) -> datetime:
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


# ---------------------------------------------------------------- the engines and their queues


@dataclass
class ModelSlot:
    """One model card with its engine (or why it has none), batcher and breaker."""

    card: Any
    engine: Any | None
    load_error: str | None
    batcher: PriorityBatcher | None
    breaker: CircuitBreaker

    @property
    def backend(self) -> str:
        return self.engine.identity.backend if self.engine is not None else "none"


def load_slots(cards: Sequence[Any], ai: AiSettings, plan_cache, load_engine: Callable[..., Any]) -> dict[str, ModelSlot]:
    """An engine per card on the configured backend; a card whose engine cannot load is
    kept, and its studies get ERROR with the reason (the stage never dies of one model)."""
    slots = {}
    for card in cards:
        breaker = CircuitBreaker(card.name, ai.breaker_failures, ai.breaker_reset_s)
        try:
            engine = load_engine(card, ai.backend, plan_cache=plan_cache, threads=ai.engine_threads or None)
        except Exception as exc:
            log.error("model engine failed to load", model=card.name, backend=ai.backend, error=str(exc))
            slots[card.name] = ModelSlot(card, None, f"engine failed to load: {exc}", None, breaker)
            continue
        batch = max(1, min(ai.max_batch_images, int(getattr(engine, "max_batch", card.input.max_batch))))
        batcher = PriorityBatcher(engine.run, max_batch=batch, max_delay_s=ai.max_batch_delay_ms / 1000, name=card.name)
        log.info("model ready", model=card.name, version=card.version, backend=engine.identity.backend,
                 device=engine.identity.device, precision=engine.identity.precision, max_batch=batch,
                 not_for_clinical_use=card.not_for_clinical_use)
        slots[card.name] = ModelSlot(card, engine, None, batcher, breaker)
    return slots


class Hints:
    """Admission levels hinted for studies (by de-identified UID), kept a while in memory:
    a hint may come before its study. Lost on restart, which only costs urgency."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._levels: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._capacity = capacity

    def put(self, hint: AdmissionHint) -> None:
        current = self._levels.get(hint.study_uid)
        if current is None or hint.level < current[0]:
            self._levels[hint.study_uid] = (hint.level, hint.reason)
        self._levels.move_to_end(hint.study_uid)
        while len(self._levels) > self._capacity:
            self._levels.popitem(last=False)

    def level(self, study_uid: str) -> tuple[int, str | None]:
        return self._levels.get(study_uid, (ROUTINE, None))


# ---------------------------------------------------------------- one study, end to end


@dataclass
class PreRead:
    """The stage's working parts; :meth:`study` pre-reads one study version."""

    slots: dict[str, ModelSlot]
    rollout: Rollout
    ai: AiSettings
    fetch: Callable[[str], bytes]  # the de-identified blob store's get
    pool: Executor | None = None  # decode/preprocess workers; None runs them in threads
    admission: Admission = field(init=False)
    hints: Hints = field(default_factory=Hints)

    def __post_init__(self) -> None:
        self.admission = Admission(lanes=self.lanes, capacity=self.ai.queue_studies,
                                   max_wait_s=self.ai.max_routine_wait_s)

    @property
    def lanes(self) -> int:
        """Studies fetched/decoded/inferred at once: enough to keep the pool busy and batches full."""
        return max(4, 2 * decode_workers(self.ai))

    @property
    def cards(self) -> list[Any]:
        return [slot.card for slot in self.slots.values()]

    async def study(self, study: StudyDeidentified, *, retried: bool = False) -> list[Output]:
        timings = Timings(taken=time.monotonic())
        planned = plan(study, self.cards, self.rollout)
        level, why_urgent = self.hints.level(study.study_uid)
        if not planned.models:
            return self._publish(result_of(study, [], [], level, timings, time.monotonic(),
                                           reason="; ".join(planned.skipped) or "no model cards are installed",
                                           status=InferenceStatus.NOT_APPLICABLE))
        budget = self.ai.latency_budget_s
        try:
            async with asyncio.timeout(budget):
                try:
                    level = await self.admission.enter(study.study_uid, level)
                except Deferred as exc:
                    return self._deferred(study, planned, level, timings, str(exc), retried)
                timings.queued_ms = (time.monotonic() - timings.taken) * 1000
                try:
                    runs, findings = await self._run(study, planned, level, timings)
                finally:
                    self.admission.leave()
        except TimeoutError:
            runs = [self._run_record(model, InferenceStatus.TIMEOUT, 0, [],
                                     f"no result within the {budget:g}s latency budget") for model in planned.models]
            return self._publish(result_of(study, runs, [], level, timings, time.monotonic()))
        log.info("study pre-read", trace_id=study.trace_id, version=study.version, level=level,
                 urgent=why_urgent, models=[run.model for run in runs], findings=[f.label for f in findings],
                 queued_ms=round(timings.queued_ms, 1), decode_ms=round(timings.decode_ms, 1),
                 infer_ms=round(timings.infer_ms, 1))
        return self._publish(result_of(study, runs, findings, level, timings, time.monotonic()))

    def hint(self, hint: AdmissionHint) -> list[Output]:
        self.hints.put(hint)
        if self.admission.promote(hint.study_uid, hint.level):
            log.info("queued study promoted", study_uid=hint.study_uid, level=hint.level, reason=hint.reason)
        return []

    async def retry(self, study: StudyDeidentified) -> list[Output]:
        await asyncio.sleep(self.ai.retry_delay_s)
        return await self.study(study, retried=True)

    # -- the work ---------------------------------------------------------------------

    async def _run(self, study: StudyDeidentified, planned: StudyPlan, level: int,
                   timings: Timings) -> tuple[list[ModelRun], list[Finding]]:
        started = time.monotonic()
        inputs = await asyncio.gather(*(self._inputs(model) for model in planned.models))
        timings.decode_ms = (time.monotonic() - started) * 1000
        AI_DECODE_SECONDS.observe(timings.decode_ms / 1000)
        started = time.monotonic()
        outcomes = await asyncio.gather(*(self._infer(model, images, error, level)
                                          for model, (images, error) in zip(planned.models, inputs, strict=True)))
        timings.infer_ms = (time.monotonic() - started) * 1000
        runs = [run for run, _ in outcomes]
        findings = [finding for _, found in outcomes for finding in found]
        return runs, findings

    async def _inputs(self, model: ModelPlan) -> tuple[np.ndarray | None, tuple[InferenceStatus, str] | None]:
        """The model's preprocessed images; undecodable images and images the model is not
        for are left out (and named if none is left: ERROR or NOT_APPLICABLE)."""
        loop = asyncio.get_running_loop()

        async def one(ref: InstanceRef) -> list[np.ndarray] | Exception:
            try:
                data = await asyncio.to_thread(self.fetch, ref.blob_uri)
                return await loop.run_in_executor(self.pool, preprocess_instance, data, model.card)
            except (Undecodable, NotApplicable) as exc:
                return type(exc)(f"instance {ref.sop_instance_uid}: {exc}")

        decoded = await asyncio.gather(*(one(ref) for ref in model.instances))
        frames = [frame for item in decoded if not isinstance(item, Exception) for frame in item]
        if frames:
            return np.stack(frames), None
        undecodable = [str(e) for e in decoded if isinstance(e, Undecodable)]
        if undecodable:
            return None, (InferenceStatus.ERROR, "undecodable pixel data: " + "; ".join(undecodable[:3]))
        return None, (InferenceStatus.NOT_APPLICABLE, "; ".join(str(e) for e in decoded[:3]))

    async def _infer(self, model: ModelPlan, images: np.ndarray | None, failed: tuple[InferenceStatus, str] | None,
                     level: int) -> tuple[ModelRun, list[Finding]]:
        slot = self.slots[model.card.name]
        if failed is not None:
            return self._run_record(model, failed[0], 0, [], failed[1]), []
        if slot.batcher is None:
            return self._run_record(model, InferenceStatus.ERROR, 0, [], slot.load_error), []
        if not slot.breaker.allows():
            return self._run_record(model, InferenceStatus.ERROR, 0, [], slot.breaker.reason()), []
        try:
            raw = await slot.batcher.infer(images, level)
            scores = aggregate(model.card.scores(raw), model.card.volume)
            if not np.all(np.isfinite(scores)):
                raise ValueError(f"non-finite scores {scores.tolist()}")
        except Exception as exc:  # an engine failure is this study's ERROR, and the breaker's business
            slot.breaker.failed(f"{type(exc).__name__}: {exc}")
            log.warning("engine failed", model=model.card.name, error=str(exc), consecutive=slot.breaker.consecutive)
            return self._run_record(model, InferenceStatus.ERROR, len(images), [], f"engine error: {exc}"), []
        slot.breaker.succeeded()
        labelled = [LabelScore(label=label.name, score=round(float(score), 4), threshold=float(label.threshold))
                    for label, score in zip(model.card.labels, scores, strict=True)]
        run = self._run_record(model, InferenceStatus.OK, len(images), labelled, None)
        return run, findings_of(model.card, scores, model.silent)

    def _run_record(self, model: ModelPlan, status: InferenceStatus, images: int, scores: list[LabelScore],
                    reason: str | None) -> ModelRun:
        card, slot = model.card, self.slots[model.card.name]
        return ModelRun(model=card.name, model_version=card.version, model_sha256=card.sha256, backend=slot.backend,
                        status=status, silent=model.silent, images=images, scores=scores, reason=reason)

    def _deferred(self, study: StudyDeidentified, planned: StudyPlan, level: int, timings: Timings, why: str,
                  retried: bool) -> list[Output]:
        AI_DEFERRED.inc()
        log.warning("study deferred", trace_id=study.trace_id, version=study.version, reason=why)
        if retried:  # its row already says so
            return [(INFERENCE_RETRY, study)]
        runs = [self._run_record(model, InferenceStatus.TIMEOUT, 0, [], f"deferred: {why}") for model in planned.models]
        result = result_of(study, runs, [], level, timings, time.monotonic())
        return [*self._publish(result), (INFERENCE_RETRY, study)]

    def _publish(self, result: InferenceResult) -> list[Output]:
        AI_RESULTS.labels(result.status.value).inc()
        AI_STUDY_SECONDS.labels(str(result.level)).observe(result.latency_ms / 1000)
        return [(INFERENCE_RESULT, result)]


def decode_workers(ai: AiSettings) -> int:
    return ai.decode_workers or os.cpu_count() or 1


def decode_pool(ai: AiSettings) -> ProcessPoolExecutor:
    """Processes for decoding: forkserver, since the stage's process runs threads (Faust, the
    broker client) that a fork would copy mid-flight; each keeps its freed memory."""
    return ProcessPoolExecutor(max_workers=decode_workers(ai), mp_context=multiprocessing.get_context("forkserver"),
                               initializer=decode_worker_init)


# ---------------------------------------------------------------- the stage


def register(ctx) -> None:
    """Attach the AI agent: study.deidentified + inference.priority + inference.retry -> inference.result."""
    from adapters.blobs import open_blob_store
    from engines import load_engine
    from engines.card import default_models_dir, load_cards
    from schemas.deid.keys import load_keys

    settings = ctx.settings
    ai = settings.ai
    cards = load_cards(ai.models_dir or default_models_dir())  # an invalid card stops the stage at start
    plan_cache = ai.plan_cache_dir or settings.data_dir.resolve() / "trt-plans"
    keys = load_keys(settings)
    preread = PreRead(slots=load_slots(cards, ai, plan_cache, load_engine), rollout=Rollout(ai.rollout, keys.site_pseudonym),
                      ai=ai, fetch=open_blob_store(settings).get, pool=decode_pool(ai))
    log.info("AI stage configured", models=[c.name for c in cards], lanes=preread.lanes,
             queue_studies=ai.queue_studies, decode_workers=decode_workers(ai), budget_s=ai.latency_budget_s)
    ctx.preread = preread

    run_stage(ctx, Stage(
        STAGE, (STUDY_DEIDENTIFIED, INFERENCE_PRIORITY, INFERENCE_RETRY),
        {STUDY_DEIDENTIFIED: preread.study, INFERENCE_RETRY: preread.retry, AdmissionHint: preread.hint},
        concurrency=ai.queue_studies + preread.lanes + 4,
    ))
