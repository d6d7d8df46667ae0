"""De-identification stage: study.assembled -> study.deidentified, between assembly and AI.

Every instance blob of an assembled study is de-identified by the Basic Application
Level Confidentiality Profile of DICOM PS3.15 Annex E with the site's options
(:mod:`deid.engine`) and written under its own key prefix,
``deid/{study}/{series}/{sop}.dcm`` in de-identified UIDs. The study event on
study.deidentified, keyed by the de-identified study UID, carries no original UID, no
patient identifier and no trace id computable from them: its ``trace_id`` is derived
from the de-identified study UID. The link between the two identities goes to
``study.link`` only (the identified zone, read by the worklist sink), so AI results on
the de-identified study can still land on the original worklist row. The event names
its site by a keyed pseudonym (unless the site's policy retains institution identity)
and its time moved by the patient's date shift, so neither the site nor the shift can
be read off the de-identified topic.

Instances that may show burned-in PHI are quarantined on ``deid.quarantine`` with the
reason (never passed on silently); the rest of the study goes on. UIDs and the
pseudonym are keyed HMACs (:mod:`schemas.deid.keys`), so workers handling different
versions or halves of one study agree without sharing state. The blob reads and
writes go through a port passed in (:class:`InstanceBlobs`), so :func:`run` is tested
with a local store and no broker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from adapters.telemetry import get_logger
from deid.engine import DeidentifiedInstance, NotDicom, Quarantined, deidentify_instance
from schemas.blobs import BlobRef
from schemas.deid.keys import DeidKeys
from schemas.deid.policy import Policy
from schemas.events import (
    DeadLetter,
    InstanceRef,
    SeriesSummary,
    StudyAssembled,
    StudyDeidentified,
    StudyLink,
    trace_id_for,
    utcnow,
)
from schemas.topics import DEID_QUARANTINE, STUDY_ASSEMBLED, STUDY_DEIDENTIFIED, STUDY_LINK, STUDY_LINK_BY_DEID
from streams.runner import Output, Stage, run_stage

STAGE = "deidentify"

log = get_logger("radstream.deidentify")


class InstanceBlobs(Protocol):
    """The blob I/O de-identification does: read an identified instance, write a
    de-identified one. Every :class:`schemas.blobs.BlobStore` is one."""

    def get(self, uri: str) -> bytes:
        ...

    def put(self, key: str, data: bytes, *, sample_bytes: int = 1) -> BlobRef:
        ...


def deid_key(instance: DeidentifiedInstance) -> str:
    """Blob key of a de-identified instance: ``deid/{study}/{series}/{sop}.dcm`` (de-identified UIDs)."""
    return f"deid/{instance.study_uid}/{instance.series_uid}/{instance.sop_instance_uid}.dcm"


@dataclass
class DeidOutcome:
    deidentified: StudyDeidentified | None
    link: StudyLink | None
    quarantined: list[DeadLetter] = field(default_factory=list)

    def outputs(self) -> list[Output]:
        """What to publish: held instances first, then the link before the study it links."""
        held: list[Output] = [(DEID_QUARANTINE, letter) for letter in self.quarantined]
        if self.deidentified is None:
            return held
        # the link keyed both ways: by the original study for the worklist, by the
        # de-identified one for AI results to find their study (streams.relink)
        return [*held, (STUDY_LINK, self.link), (STUDY_LINK_BY_DEID, self.link), (STUDY_DEIDENTIFIED, self.deidentified)]


def run(study: StudyAssembled, blobs: InstanceBlobs, policy: Policy, keys: DeidKeys, now: datetime,
        deidentify: Callable[..., DeidentifiedInstance] = deidentify_instance) -> DeidOutcome:
    """De-identify every instance of one study version; write the blobs; build the events.

    Returns no study event when every instance was quarantined (nothing may go on).
    """
    site = policy.for_site(study.source_site)
    done: list[tuple[DeidentifiedInstance, BlobRef]] = []
    quarantined: list[DeadLetter] = []
    for ref in study.instances:
        try:
            result = deidentify(blobs.get(ref.blob_uri), site, keys)
        except Quarantined as exc:
            quarantined.append(_held(study, ref, "burned_in_phi", exc.reason, now))
            continue
        except NotDicom as exc:
            quarantined.append(_held(study, ref, "not_dicom", str(exc), now))
            continue
        blob = blobs.put(deid_key(result), result.data, sample_bytes=result.sample_bytes)
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
    # PS3.15 Annex E removes institution identity: downstream of this stage the site is a
    # keyed pseudonym, unless its policy retains institution identity (113112)
    deid_site = study.source_site if site.retains_institution else keys.site_pseudonym(study.source_site)
    event = StudyDeidentified(
        trace_id=deid_trace, study_uid=first.study_uid, version=study.version,
        patient_pseudonym=first.patient_pseudonym,
        modalities=list(dict.fromkeys(r.modality for r, _ in done if r.modality)),
        body_parts=list(dict.fromkeys((r.body_part_examined or "").upper() for r, _ in done if r.body_part_examined)),
        source_site=deid_site, instance_count=len(done), series=summaries,
        instances=[
            InstanceRef(sop_instance_uid=r.sop_instance_uid, series_uid=r.series_uid, sop_class_uid=r.sop_class_uid,
                        transfer_syntax_uid=r.transfer_syntax_uid, blob_uri=blob.uri, blob_size=blob.size,
                        instance_number=r.instance_number)
            for r, blob in done
        ],
        # the wall clock shifted with the patient's dates: a real processing time next to a
        # shifted study date would give the shift away
        profile_options=[code for code, _ in site.codes], deidentified_at=now + first.date_shift,
        study_description=first.study_description, patient_age=first.patient_age, patient_sex=first.patient_sex,
        study_date=first.study_date, study_time=first.study_time,
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


def register(ctx) -> None:
    """Attach the de-identification agent: study.assembled -> study.deidentified + study.link."""
    from adapters.blobs import open_blob_store
    from schemas.deid.keys import load_keys
    from schemas.deid.policy import load_policy

    policy = load_policy(ctx.settings.deid.policy_file)  # an invalid policy stops the worker at start
    keys = load_keys(ctx.settings)
    blobs = open_blob_store(ctx.settings)

    def deidentify_study(study: StudyAssembled) -> list[Output]:
        outcome = run(study, blobs, policy, keys, utcnow())
        log.info("study de-identified", trace_id=study.trace_id, version=study.version,
                 instances=outcome.deidentified.instance_count if outcome.deidentified else 0,
                 quarantined=len(outcome.quarantined))
        return outcome.outputs()

    run_stage(ctx, Stage(STAGE, (STUDY_ASSEMBLED,), {StudyAssembled: deidentify_study}, blocking=True))
