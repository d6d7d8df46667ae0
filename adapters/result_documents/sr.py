"""The DICOM SR of a result revision: a PS3.16 TID 1500 Measurement Report built with highdicom,
referencing the source images by their ORIGINAL UIDs, a correction naming the SR it replaces."""

from __future__ import annotations

from typing import NamedTuple

import highdicom as hd
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage
from pydicom.valuerep import DA, DT, TM

from schemas.events import CodedConcept, ResultFinding, StudyResult
from adapters.result_documents.common import (
    ABSENT, CERTAINTY_OF_FINDING, COMMENT, PROCEDURES, QUALITATIVE_EVALUATIONS, REPORT_NARRATIVE, check_result,
    decision_text, derived_uid, finding_code, finding_sentence, patient_sex, pn_value, is_rejected, is_signed,
)


class SrUids(NamedTuple):
    series_uid: str
    sop_instance_uid: str


def sr_uids(trace_id: str, revision: int) -> SrUids:
    """The SR's UIDs from the result revision alone: a resend is the same instance to a PACS,
    and a correction can name its predecessor without having stored it."""
    return SrUids(series_uid=derived_uid("sr-series", trace_id, str(revision)),
                  sop_instance_uid=derived_uid("sr-instance", trace_id, str(revision)))


def _sr_code(code: CodedConcept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme.upper(), meaning=code.meaning)


def _evidence(result: StudyResult) -> list[Dataset]:
    """The source images as highdicom's evidence: their original UIDs, the first one also carrying
    the patient and study attributes the SR copies (PS3.3 C.7.1.1, C.7.2.1)."""
    if not result.instances:
        raise ValueError(f"result {result.trace_id}: no source instances; an SR must reference its images")
    evidence = []
    for ref in result.instances:
        ds = Dataset()
        ds.StudyInstanceUID = result.study_uid
        ds.SeriesInstanceUID = ref.series_uid
        ds.SOPInstanceUID = ref.sop_instance_uid
        ds.SOPClassUID = ref.sop_class_uid
        evidence.append(ds)
    first = evidence[0]
    first.SpecificCharacterSet = "ISO_IR 192"
    first.PatientID = result.patient_id
    first.PatientName = pn_value(result.patient_name) if result.patient_name else None
    first.PatientBirthDate = result.patient_birth_date
    first.PatientSex = patient_sex(result.patient_sex)
    first.AccessionNumber = result.accession_number
    first.StudyID = None
    first.StudyDate = result.study_date
    first.StudyTime = result.study_time
    first.ReferringPhysicianName = pn_value(result.referring_physician) if result.referring_physician else None
    if result.study_description:
        first.StudyDescription = result.study_description
    return evidence


def _finding_group(result: StudyResult, finding: ResultFinding) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the finding as its type, the model as algorithm (TID 4019), its confidence as
    Certainty of Finding, and the reader's decision as a comment. The tracking UID stays the same
    across revisions so a viewer can follow the finding from preliminary to final."""
    tracking = hd.sr.TrackingIdentifier(
        uid=derived_uid("finding", result.trace_id, finding.model, finding.label),
        identifier=finding.label,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=_sr_code(finding_code(finding)),
        algorithm_id=hd.sr.AlgorithmIdentification(name=finding.model, version=finding.model_version),
        measurements=[hd.sr.Measurement(name=CERTAINTY_OF_FINDING, value=round(finding.confidence * 100, 3),
                                        unit=codes.UCUM.Percent)],
    )
    notes = [decision_text(finding).capitalize()]
    if finding.location:
        notes.append(f"Location: {finding.location}")
    group[0].ContentSequence.extend(
        hd.sr.TextContentItem(name=COMMENT, value=note, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for note in notes
    )
    return group


def _evaluations(result: StudyResult, previous: StudyResult | None) -> list[hd.sr.ContentItem]:
    """TID 1500 row 12 items: the report text, what changed, and every finding that is no longer
    reported: a rejected one is stated absent (coded and in words), never silently dropped."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[hd.sr.ContentItem] = []
    if result.report_text.strip():
        items.append(hd.sr.TextContentItem(name=REPORT_NARRATIVE, value=result.report_text, relationship_type=contains))
    if result.replaces is not None and result.changes:
        items.append(hd.sr.TextContentItem(
            name=COMMENT, value=f"Amends revision {result.replaces}: {'; '.join(result.changes)}",
            relationship_type=contains))
    for finding in result.findings:
        if is_rejected(finding):
            items.append(hd.sr.CodeContentItem(name=_sr_code(finding_code(finding)), value=ABSENT,
                                               relationship_type=contains))
            items.append(hd.sr.TextContentItem(name=COMMENT, value=finding_sentence(finding),
                                               relationship_type=contains))
    if previous is not None:
        current = {(f.model, f.label) for f in result.findings}
        for finding in previous.findings:
            if (finding.model, finding.label) not in current and not is_rejected(finding):
                items.append(hd.sr.TextContentItem(
                    name=COMMENT, relationship_type=contains,
                    value=f"{finding.label} ({finding_code(finding).meaning}) reported in revision "
                          f"{previous.revision} is withdrawn: not reported in this revision"))
    return items


def _observation_context(result: StudyResult, manufacturer: str) -> hd.sr.ObservationContext:
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", manufacturer),
            name=manufacturer, manufacturer_name=manufacturer),
    )
    person = None
    if result.reader_id:
        person = hd.sr.ObserverContext(
            observer_type=codes.cid270.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=pn_value(result.reader_id), login_name=result.reader_id, organization_name=manufacturer),
        )
    return hd.sr.ObservationContext(observer_person_context=person, observer_device_context=device)


def _report_content(result: StudyResult, previous: StudyResult | None, manufacturer: str) -> hd.sr.ContentSequence:
    procedure = next((PROCEDURES[m] for m in result.modalities if m in PROCEDURES), codes.cid100.ImagingProcedure)
    groups = [_finding_group(result, f) for f in result.findings if not is_rejected(f)]
    context = _observation_context(result, manufacturer)
    if groups:
        report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=procedure,
                                         imaging_measurements=groups)
    else:
        # highdicom's MeasurementReport insists on a measurement group; TID 1500 row 6 is optional,
        # and a study whose every finding was rejected has none. Same root otherwise.
        root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
        root.ContentSequence = hd.sr.ContentSequence()
        root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
        root.ContentSequence.extend(context)
        root.ContentSequence.append(hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported, value=procedure,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD))
        report = hd.sr.ContentSequence([root], is_root=True)
    evaluations = _evaluations(result, previous)
    if evaluations:
        container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence(evaluations)
        report[0].ContentSequence.append(container)
    return report


def _predecessor(result: StudyResult) -> Dataset:
    uids = sr_uids(result.trace_id, result.replaces)
    ds = Dataset()
    ds.StudyInstanceUID = result.study_uid
    ds.SeriesInstanceUID = uids.series_uid
    ds.SOPInstanceUID = uids.sop_instance_uid
    ds.SOPClassUID = Comprehensive3DSRStorage
    return ds


def build_sr(result: StudyResult, *, previous: StudyResult | None = None, manufacturer: str = "radstream",
             institution_name: str | None = None) -> Dataset:
    """The revision as a Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500 Measurement Report.

    One TID 1501 group per finding still reported; rejected findings are stated absent in the
    Qualitative Evaluations container. Every source instance is listed in the Current Requested
    Procedure Evidence Sequence by its original UIDs. Preliminary results are PARTIAL /
    PRELIMINARY / UNVERIFIED; a signed one is COMPLETE / FINAL / VERIFIED by its reader at its
    signing time. A revision that ``replaces`` another names that revision's SR in the Predecessor
    Documents Sequence (PS3.3 C.17.2.3). ``previous``, the replaced revision when the caller has it,
    lets findings it reported and this one drops be stated as withdrawn.
    """
    check_result(result)
    if previous is not None and (previous.trace_id != result.trace_id or previous.revision != result.replaces):
        raise ValueError(f"previous is revision {previous.revision} of {previous.trace_id}; result "
                         f"{result.trace_id} revision {result.revision} replaces {result.replaces}")
    signed = is_signed(result)
    uids = sr_uids(result.trace_id, result.revision)
    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence(result),
        content=_report_content(result, previous, manufacturer),
        series_instance_uid=uids.series_uid,
        series_number=9000 + result.revision,  # clear of the modality's series numbers
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution_name,
        is_complete=signed,
        is_final=signed,
        is_verified=signed,
        verifying_observer_name=pn_value(result.reader_id) if signed else None,
        verifying_organization=manufacturer if signed else None,
        previous_versions=[_predecessor(result)] if result.replaces is not None else None,
        series_description=f"{manufacturer} AI result {result.status.value.lower()} r{result.revision}",
        content_date=result.issued_at.date(),
        content_time=result.issued_at.time(),
    )
    # highdicom stamps the time of building; a resend must be byte-identical, and the document
    # was created when the revision was issued and verified when the reader signed.
    sr.InstanceCreationDate = DA(result.issued_at.date())
    sr.InstanceCreationTime = TM(result.issued_at.time())
    for equipment in sr.get("ContributingEquipmentSequence", []):
        equipment.ContributionDateTime = DT(result.issued_at)
    if signed:
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(result.signed_at)
    return sr
