"""De-identification stage: study.assembled -> study.deidentified, between assembly and AI.

Every instance blob of an assembled study is de-identified by the Basic Application
Level Confidentiality Profile of DICOM PS3.15 Annex E with the site's options
(:mod:`deid.engine`) and written under its own key prefix,
``deid/{study}/{series}/{sop}.dcm`` in de-identified UIDs. The study event on
study.deidentified, keyed by the de-identified study UID, carries no original UID, no
patient identifier and no trace id computable from them: its ``trace_id`` is derived
from the de-identified study UID. The link between the two identities goes to
``study.link`` only (the identified zone, read by the worklist sink), so AI results on
the de-identified study can still land on the original worklist row.

Instances that may show burned-in PHI are quarantined on ``deid.quarantine`` with the
reason (never passed on silently); the rest of the study goes on. UIDs and the
pseudonym are keyed HMACs (:mod:`schemas.deid.keys`), so workers handling different
versions or halves of one study agree without sharing state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from schemas.blobs import BlobStore
from schemas.events import (
    DeadLetter,
    InstanceRef,
    SeriesSummary,
    StudyAssembled,
    StudyDeidentified,
    StudyLink,
    trace_id_for,
)
from deid.engine import DeidentifiedInstance, NotDicom, Quarantined, deidentify_instance
from schemas.deid.keys import DeidKeys
from schemas.deid.policy import Policy

STAGE = "deidentify"


def deid_key(instance: DeidentifiedInstance) -> str:
    """Blob key of a de-identified instance: ``deid/{study}/{series}/{sop}.dcm`` (de-identified UIDs)."""
    return f"deid/{instance.study_uid}/{instance.series_uid}/{instance.sop_instance_uid}.dcm"


@dataclass
class DeidOutcome:
    deidentified: StudyDeidentified | None
    link: StudyLink | None
    quarantined: list[DeadLetter] = field(default_factory=list)


def run(study: StudyAssembled, store: BlobStore, policy: Policy, keys: DeidKeys, now: datetime,
        deidentify: Callable[..., DeidentifiedInstance] = deidentify_instance) -> DeidOutcome:
    """De-identify every instance of one study version; write the blobs; build the events.

    Returns no study event when every instance was quarantined (nothing may go on).
    """
    site = policy.for_site(study.source_site)
    done: list[DeidentifiedInstance] = []
    quarantined: list[DeadLetter] = []
    for ref in study.instances:
        try:
            result = deidentify(store.get(ref.blob_uri), site, keys)
        except Quarantined as exc:
            quarantined.append(_held(study, ref, "burned_in_phi", exc.reason, now))
            continue
        except NotDicom as exc:
            quarantined.append(_held(study, ref, "not_dicom", str(exc), now))
            continue
        blob = store.put(deid_key(result), result.data)
        done.append((result, blob))
    if not done:
        return DeidOutcome(None, None, quarantined)
    first = done[0][0]
    series: dict[str, list[DeidentifiedInstance]] = {}
    for result, _ in done:
        series.setdefault(result.series_uid, []).append(result)
    summaries = [
        SeriesSummary(series_uid=uid, instance_count=len(members), series_number=members[0].series_number,
                      modality=members[0].modality, body_part_examined=members[0].body_part_examined,
                      series_description=members[0].series_description)
        for uid, members in series.items()
    ]
    deid_trace = trace_id_for(first.study_uid)
    event = StudyDeidentified(
        trace_id=deid_trace, study_uid=first.study_uid, version=study.version,
        patient_pseudonym=first.patient_pseudonym,
        modalities=list(dict.fromkeys(r.modality for r, _ in done if r.modality)),
        body_parts=list(dict.fromkeys((r.body_part_examined or "").upper() for r, _ in done if r.body_part_examined)),
        source_site=study.source_site, instance_count=len(done), series=summaries,
        instances=[
            InstanceRef(sop_instance_uid=r.sop_instance_uid, series_uid=r.series_uid, sop_class_uid=r.sop_class_uid,
                        transfer_syntax_uid=r.transfer_syntax_uid, blob_uri=blob.uri, blob_size=blob.size,
                        instance_number=r.instance_number)
            for r, blob in done
        ],
        profile_options=[code for code, _ in site.codes], deidentified_at=now,
        study_description=first.study_description, patient_age=first.patient_age, patient_sex=first.patient_sex,
    )
    link = StudyLink(
        trace_id=study.trace_id, study_uid=study.study_uid, version=study.version, deid_study_uid=first.study_uid,
        deid_trace_id=deid_trace, patient_pseudonym=first.patient_pseudonym, source_site=study.source_site,
        linked_at=now,
    )
    return DeidOutcome(event, link, quarantined)


def _held(study: StudyAssembled, ref: InstanceRef, reason: str, error: str, now: datetime) -> DeadLetter:
    return DeadLetter(stage=STAGE, reason=reason, error=f"SOP instance {ref.sop_instance_uid}: {error}",
                      failed_at=now, trace_id=study.trace_id, key=study.study_uid, payload_uri=ref.blob_uri)


# ---------------------------------------------------------------- the thin Faust agent


def register(ctx) -> None:
    """Attach the de-identification agent: study.assembled -> study.deidentified + study.link."""
    import asyncio

    from adapters.blobs import open_blob_store
    from schemas.codec import DecodeError
    from schemas.events import utcnow
    from adapters.telemetry import STAGE_EVENTS, STAGE_SECONDS, get_logger
    from schemas.topics import DEID_QUARANTINE, STUDY_ASSEMBLED, STUDY_DEIDENTIFIED, STUDY_LINK
    from schemas.deid.keys import load_keys
    from schemas.deid.policy import load_policy

    log = get_logger("radstream.deidentify")
    policy = load_policy(ctx.settings.deid.policy_file)  # an invalid policy stops the worker at start
    keys = load_keys(ctx.settings)
    store = open_blob_store(ctx.settings)

    @ctx.app.agent(ctx.topic(STUDY_ASSEMBLED), name="deidentify")
    async def deidentify_agent(stream) -> None:
        async for event in stream.events():
            try:
                study = ctx.codec.decode(event.value, StudyAssembled)
            except DecodeError as exc:
                await ctx.dead_letter(STAGE, "undecodable", str(exc), event)
                continue
            try:
                with STAGE_SECONDS.labels(STAGE).time():
                    # blob I/O and parsing off the event loop, so heartbeats keep flowing
                    outcome = await asyncio.to_thread(run, study, store, policy, keys, utcnow())
            except Exception as exc:  # a bug must not stop the agent: Faust would not restart it
                log.exception("de-identification failed", trace_id=study.trace_id)
                await ctx.dead_letter(STAGE, "stage_error", f"{type(exc).__name__}: {exc}", event,
                                      trace_id=study.trace_id)
                continue
            for letter in outcome.quarantined:
                await ctx.send(DEID_QUARANTINE, letter)
            if outcome.deidentified is not None:
                await ctx.send(STUDY_LINK, outcome.link)
                await ctx.send(STUDY_DEIDENTIFIED, outcome.deidentified)
            STAGE_EVENTS.labels(STAGE, "ok").inc()
            log.info("study de-identified", trace_id=study.trace_id, version=study.version,
                     instances=outcome.deidentified.instance_count if outcome.deidentified else 0,
                     quarantined=len(outcome.quarantined))
