"""Result documents: one study result revision as each receiving system reads it.

Pure builders (no I/O) from :class:`schemas.events.StudyResult`, the identified zone's
result with the ORIGINAL UIDs and real demographics: a DICOM SR Measurement Report
(PS3.16 TID 1500) for PACS, an HL7 v2.5 ORU^R01 for the RIS, a FHIR R4 transaction
Bundle with a DiagnosticReport for EHRs, and a signed JSON webhook. Every builder is
deterministic in the result: a resend of the same revision is the same SR SOP instance,
the same FHIR conditional update and the same webhook idempotency key, so receivers
deduplicate it. A reader's REJECT is told the same way everywhere: the SR states the
finding as absent instead of listing it, HL7 sends its OBX with status ``D``, FHIR marks
its Observation ``entered-in-error``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import urlencode

import highdicom as hd
import pydantic
from fhir.resources.R4B.bundle import Bundle
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage
from pydicom.valuerep import DA, DT, TM

from schemas.events import CodedConcept, Priority, ResultFinding, ResultStatus, StudyResult

#: Namespace of the ids derived here (webhook event ids, idempotency keys, FHIR identifiers).
RESULT_NAMESPACE = uuid.UUID("3c9f6a52-8e1d-5f0b-a7c4-726573756c74")

# ---------------------------------------------------------------- codes

#: Schemes that name a finding first. Their designators are the same in DICOM (PS3.16 Table 8-1)
#: and HL7 (table 0396), so a code's scheme is used as is there; FHIR names systems by URI.
PREFERRED_SCHEMES = ("SCT", "RADLEX")
FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "RADLEX": "http://www.radlex.org",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}
#: TID 1500 row 12 container of free-standing evaluations (it allows CODE and TEXT items).
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: The report's narrative, as RIS and PACS know it (LOINC; OBX-3 of ORU report lines too).
REPORT_NARRATIVE = hd.sr.CodedConcept("18782-3", "LN", "Radiology Study observation (narrative)")
ABSENT = codes.SCT.Absent  # (272519000, SCT): what a rejected finding is, once a reader has looked
PRESENT = codes.SCT.Present  # (52101004, SCT)
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding  # (111012, DCM), in percent as in CAD TID 4104
COMMENT = codes.DCM.Comment  # (121106, DCM)
#: Procedure reported (TID 1500 row 4, CID 100) by modality; anything else is an imaging procedure.
PROCEDURES = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
}
DIAGNOSTIC_IMAGING_STUDY = {"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}
#: FHIR identifier system of a URI value: our ids are UUIDs, so ``urn:uuid:...`` (RFC 4122 URNs).
URI_SYSTEM = "urn:ietf:rfc:3986"
DICOM_UID_SYSTEM = "urn:dicom:uid"


def finding_code(finding: ResultFinding) -> CodedConcept:
    """The code that names a finding everywhere: its first SNOMED CT or RadLex code, else its first code."""
    if not finding.codes:
        raise ValueError(f"finding {finding.label!r} has no code: every output names findings by code")
    preferred = [c for c in finding.codes if c.scheme.upper() in PREFERRED_SCHEMES]
    return (preferred or finding.codes)[0]


def _rejected(finding: ResultFinding) -> bool:
    return (finding.decision or "").upper() == "REJECT"


def _signed(result: StudyResult) -> bool:
    return result.status is not ResultStatus.PRELIMINARY and bool(result.reader_id) and result.signed_at is not None


def _check_result(result: StudyResult) -> None:
    """What every output needs; refused here with the field to fix, not deep in a library."""
    if result.status is ResultStatus.CORRECTED and result.replaces is None:
        raise ValueError(f"result {result.trace_id} revision {result.revision}: CORRECTED needs 'replaces'")
    if result.replaces is not None and result.replaces >= result.revision:
        raise ValueError(f"result {result.trace_id}: revision {result.revision} cannot replace {result.replaces}")
    if result.status is ResultStatus.FINAL and not _signed(result):
        raise ValueError(f"result {result.trace_id} revision {result.revision}: FINAL needs reader_id and signed_at")
    for finding in result.findings:
        finding_code(finding)


def _decision_text(finding: ResultFinding) -> str:
    decision = (finding.decision or "").upper()
    if decision == "MODIFY":
        return f"modified by the reader to: {finding.modified_to or '(no text)'}"
    if decision == "ACCEPT":
        return "accepted by the reader"
    if decision == "REJECT":
        return "rejected by the reader: not present"
    return "not yet reviewed by a reader"


def _finding_sentence(finding: ResultFinding) -> str:
    code = finding_code(finding)
    where = f", location {finding.location}" if finding.location else ""
    return (f"{finding.label} ({code.meaning}, {code.scheme} {code.value}){where}: AI {finding.model} "
            f"{finding.model_version} confidence {finding.confidence:.2f}; {_decision_text(finding)}")


# ---------------------------------------------------------------- DICOM SR (PS3.16 TID 1500)


class SrUids(NamedTuple):
    series_uid: str
    sop_instance_uid: str


def derived_uid(*names: str) -> str:
    """A UID that is a function of ``names``: ``2.25.<integer of a name-based UUID>`` (PS3.5 B.2).

    Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with no prefix it ignores the
    entropy sources and returns a random UUID UID."""
    return f"2.25.{uuid.uuid5(RESULT_NAMESPACE, '|'.join(names)).int}"


def sr_uids(trace_id: str, revision: int) -> SrUids:
    """The SR's UIDs from the result revision alone: a resend is the same instance to a PACS,
    and a correction can name its predecessor without having stored it."""
    return SrUids(series_uid=derived_uid("sr-series", trace_id, str(revision)),
                  sop_instance_uid=derived_uid("sr-instance", trace_id, str(revision)))


def _sr_code(code: CodedConcept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme.upper(), meaning=code.meaning)


def _person_name(name: str) -> str:
    # A PN without "^" is a family name only; highdicom wants that said explicitly.
    return name if "^" in name else f"{name}^"


def _patient_sex(sex: str | None) -> str | None:
    value = (sex or "").upper()
    return value if value in ("M", "F", "O") else None


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
    first.PatientName = _person_name(result.patient_name) if result.patient_name else None
    first.PatientBirthDate = result.patient_birth_date
    first.PatientSex = _patient_sex(result.patient_sex)
    first.AccessionNumber = result.accession_number
    first.StudyID = None
    first.StudyDate = result.study_date
    first.StudyTime = result.study_time
    first.ReferringPhysicianName = _person_name(result.referring_physician) if result.referring_physician else None
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
    notes = [_decision_text(finding).capitalize()]
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
        if _rejected(finding):
            items.append(hd.sr.CodeContentItem(name=_sr_code(finding_code(finding)), value=ABSENT,
                                               relationship_type=contains))
            items.append(hd.sr.TextContentItem(name=COMMENT, value=_finding_sentence(finding),
                                               relationship_type=contains))
    if previous is not None:
        current = {(f.model, f.label) for f in result.findings}
        for finding in previous.findings:
            if (finding.model, finding.label) not in current and not _rejected(finding):
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
                name=_person_name(result.reader_id), login_name=result.reader_id, organization_name=manufacturer),
        )
    return hd.sr.ObservationContext(observer_person_context=person, observer_device_context=device)


def _report_content(result: StudyResult, previous: StudyResult | None, manufacturer: str) -> hd.sr.ContentSequence:
    procedure = next((PROCEDURES[m] for m in result.modalities if m in PROCEDURES), codes.cid100.ImagingProcedure)
    groups = [_finding_group(result, f) for f in result.findings if not _rejected(f)]
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
    _check_result(result)
    if previous is not None and (previous.trace_id != result.trace_id or previous.revision != result.replaces):
        raise ValueError(f"previous is revision {previous.revision} of {previous.trace_id}; result "
                         f"{result.trace_id} revision {result.revision} replaces {result.replaces}")
    signed = _signed(result)
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
        verifying_observer_name=_person_name(result.reader_id) if signed else None,
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


# ---------------------------------------------------------------- HL7 v2.5 ORU^R01

#: OBR-25 / OBX-11 result status (HL7 table 0085); a rejected finding's OBX is ``D`` (deleted).
HL7_STATUS = {ResultStatus.PRELIMINARY: "P", ResultStatus.FINAL: "F", ResultStatus.CORRECTED: "C"}
#: OBR-5 / TQ.6 priority (HL7 table 0027): stat, ASAP, routine.
HL7_PRIORITY = {Priority.CRITICAL: "S", Priority.URGENT: "A", Priority.ROUTINE: "R"}
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")


def hl7_escape(text: str) -> str:
    """Text as an HL7 field value (v2.5 section 2.7.4): the escape character first, then the
    delimiters, so ``|^&~\\`` in a name or a report cannot split a field; line breaks, which
    would end the segment, become spaces (report text goes line by line into TX OBX instead)."""
    escaped = (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
               .replace("&", "\\T\\").replace("~", "\\R\\"))
    return _LINE_BREAKS.sub(" ", escaped)


def _hl7_ts(when: datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S") + when.strftime("%z")


def _hl7_study_time(result: StudyResult) -> str:
    """DICOM DA + TM -> DTM, without an offset: the site's local time, whose offset we do not know."""
    if not result.study_date:
        return ""
    return hl7_escape(result.study_date + (result.study_time or "").split(".")[0])


def _xpn(person_name: str) -> str:
    """DICOM PN ``family^given^middle^prefix^suffix`` (first, alphabetic group) -> HL7 XPN
    ``family^given^middle^suffix^prefix``: same order but for prefix and suffix."""
    parts = (person_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (hl7_escape(p) for p in parts)
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def _hl7_code(finding: ResultFinding) -> str:
    """OBX-3 CWE: the finding's code, with a second scheme's code as the alternate identifier."""
    primary = finding_code(finding)
    alternate = next((c for c in finding.codes if c.scheme.upper() != primary.scheme.upper()), None)
    triples = [primary] + ([alternate] if alternate else [])
    return "^".join(f"{hl7_escape(c.value)}^{hl7_escape(c.meaning)}^{hl7_escape(c.scheme.upper())}"
                    for c in triples)


def build_oru(result: StudyResult, *, sending_app: str = "RADSTREAM", sending_facility: str = "RADSTREAM",
              receiving_app: str, receiving_facility: str, control_id: str) -> str:
    """The revision as an HL7 v2.5 ORU^R01 (section 7.3.1), segments separated by CR.

    PID from the result's demographics, ORC ``RE`` and one OBR per study with the accession
    number as placer and filler order number, OBR-25 P/F/C, priority ``S`` when critical. One ST
    OBX per AI finding (OBX-8 ``AA`` critical / ``A``; OBX-11 ``D`` when the reader rejected it),
    then one TX OBX per line of the report text. The RIS matches the result to its order by the
    accession number and the patient by PID-3, so both are required.
    """
    _check_result(result)
    if not result.accession_number or not result.patient_id:
        raise ValueError(f"result {result.trace_id}: an ORU needs accession_number and patient_id "
                         "(the RIS matches the order and the patient by them)")
    status = HL7_STATUS[result.status]
    priority = "S" if result.critical else HL7_PRIORITY[result.priority]
    issued = _hl7_ts(result.issued_at)
    accession = hl7_escape(result.accession_number)
    service = result.study_description or "/".join(result.modalities)
    msh = ["MSH", "^~\\&", hl7_escape(sending_app), hl7_escape(sending_facility), hl7_escape(receiving_app),
           hl7_escape(receiving_facility), issued, "", "ORU^R01^ORU_R01", hl7_escape(control_id), "P", "2.5",
           "", "", "", "", "", "UNICODE UTF-8"]
    pid = ["PID", "1", "", f"{hl7_escape(result.patient_id)}^^^{hl7_escape(result.source_site)}", "",
           _xpn(result.patient_name or ""), "", hl7_escape(result.patient_birth_date or ""),
           _patient_sex(result.patient_sex) or "U"]
    orc = ["ORC", "RE", accession, accession]
    obr = ["OBR", "1", accession, accession, f"^{hl7_escape(service)}", priority, "", _hl7_study_time(result)]
    obr += [""] * 8 + [f"^{_xpn(result.referring_physician)}" if result.referring_physician else ""]  # OBR-16
    obr += [""] * 5 + [issued, "", "RAD", status, "", f"^^^^^{priority}"]  # OBR-22 .. OBR-27
    obr += ["", "", "", f"^{hl7_escape(result.reason_for_exam)}" if result.reason_for_exam else "",
            hl7_escape(result.reader_id) if _signed(result) else ""]  # OBR-31, OBR-32
    segments = [msh, pid, orc, obr]
    for sub_id, finding in enumerate(result.findings, start=1):
        rejected = _rejected(finding)
        flag = "" if rejected else ("AA" if finding.critical else "A")
        observer = hl7_escape(result.reader_id) if finding.decision and result.reader_id else ""
        segments.append(["OBX", str(len(segments) - 3), "ST", _hl7_code(finding), str(sub_id),
                         hl7_escape(_finding_sentence(finding)),
                         "", "", flag, "", "", "D" if rejected else status, "", "", issued, "", observer, "",
                         hl7_escape(f"{finding.model} {finding.model_version}")])
    narrative = f"{REPORT_NARRATIVE.value}^{REPORT_NARRATIVE.meaning}^LN"
    if result.report_text.strip():
        for line in _LINE_BREAKS.split(result.report_text):
            segments.append(["OBX", str(len(segments) - 3), "TX", narrative, "1", hl7_escape(line),
                             "", "", "", "", "", status])
    return "\r".join("|".join(fields) for fields in segments)


# ---------------------------------------------------------------- FHIR R4 (transaction Bundle)

#: DiagnosticReport.status / Observation.status by result status (required bindings in R4).
FHIR_STATUS = {ResultStatus.PRELIMINARY: "preliminary", ResultStatus.FINAL: "final",
               ResultStatus.CORRECTED: "amended"}
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_GENDER = {"M": "male", "F": "female", "O": "other"}
#: required bindings fhir.resources does not check (it takes any code): resource -> field -> codes
_REQUIRED_CODES = {
    "DiagnosticReport": {"status": {"registered", "partial", "preliminary", "final", "amended", "corrected",
                                    "appended", "cancelled", "entered-in-error", "unknown"}},
    "Observation": {"status": {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                               "entered-in-error", "unknown"}},
    "ImagingStudy": {"status": {"registered", "available", "cancelled", "entered-in-error", "unknown"}},
    "Patient": {"gender": {"male", "female", "other", "unknown"}},
}
_BUNDLE_TYPES = {"document", "message", "transaction", "transaction-response", "batch", "batch-response",
                 "history", "searchset", "collection"}
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}


def _urn(result: StudyResult, *parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.UUID(result.trace_id), ':'.join(parts))}"


def _fhir_date(dicom_date: str | None) -> str | None:
    if not dicom_date or len(dicom_date) != 8:
        return None
    return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:]}"


def _coding(code: CodedConcept) -> dict[str, str]:
    system = FHIR_SYSTEMS.get(code.scheme.upper())
    return {**({"system": system} if system else {}), "code": code.value, "display": code.meaning}


def _conditional(resource_type: str, system: str, value: str) -> str:
    return f"{resource_type}?{urlencode({'identifier': f'{system}|{value}'})}"


def _observation(result: StudyResult, finding: ResultFinding, subject: dict[str, Any],
                 study_ref: dict[str, str]) -> tuple[str, dict[str, Any]]:
    full_url = _urn(result, "observation", finding.model, finding.label)
    identifier = {"system": URI_SYSTEM, "value": _urn(result, "finding", finding.model, finding.label)}
    primary = finding_code(finding)
    codings = [_coding(primary)] + [_coding(c) for c in finding.codes if c is not primary]
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [identifier],
        "status": "entered-in-error" if _rejected(finding) else FHIR_STATUS[result.status],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging", "display": "Imaging"}]}],
        "code": {"coding": codings, "text": finding.label},
        "subject": subject,
        "issued": result.issued_at.isoformat(),
        "valueCodeableConcept": {"coding": [{"system": FHIR_SYSTEMS["SCT"], "code": PRESENT.value,
                                             "display": PRESENT.meaning}]},
        "interpretation": [{"coding": [{"system": _INTERPRETATION, "code": "AA", "display": "Critical abnormal"}
                                       if finding.critical else
                                       {"system": _INTERPRETATION, "code": "A", "display": "Abnormal"}]}],
        "note": [{"text": _finding_sentence(finding)}],
        "device": {"display": f"{finding.model} {finding.model_version}"},
        "derivedFrom": [study_ref],
        "component": [{
            "code": {"coding": [{"system": FHIR_SYSTEMS["DCM"], "code": CERTAINTY_OF_FINDING.value,
                                 "display": CERTAINTY_OF_FINDING.meaning}]},
            "valueQuantity": {"value": round(finding.confidence * 100, 3), "unit": "%",
                              "system": "http://unitsofmeasure.org", "code": "%"},
        }],
    }
    if (effective := _fhir_date(result.study_date)) is not None:
        observation["effectiveDateTime"] = effective
    if finding.location:
        observation["bodySite"] = {"text": finding.location}
    return full_url, observation


def build_fhir(result: StudyResult, *, patient_id_system: str | None = None) -> dict[str, Any]:
    """The revision as a FHIR R4 transaction Bundle a server accepts with one POST.

    Patient and ImagingStudy (study UID as ``urn:dicom:uid`` identifier) are created only if
    absent (``ifNoneExist``); the Observations (one per finding) and the DiagnosticReport
    (LOINC 18748-4, identifier ``urn:uuid:<trace_id>``) are conditional updates on their
    identifiers, so every revision updates the same resources instead of adding copies, and a
    rejected finding's Observation becomes ``entered-in-error``. References between entries are
    ``urn:uuid`` fullUrls the server resolves. ``patient_id_system`` is the site's identifier
    system for PID values (default: a URN naming the source site).
    """
    _check_result(result)
    if not result.patient_id:
        raise ValueError(f"result {result.trace_id}: a DiagnosticReport needs patient_id for its subject")
    try:
        uuid.UUID(result.trace_id)
    except ValueError:
        raise ValueError(f"trace_id {result.trace_id!r} is no UUID: the report's identifier is "
                         "urn:uuid:<trace_id>") from None
    system = patient_id_system or f"urn:radstream:site:{result.source_site}:patient-id"
    patient_url, study_url, report_url = (_urn(result, kind) for kind in ("patient", "imaging-study", "report"))
    patient: dict[str, Any] = {"resourceType": "Patient",
                               "identifier": [{"system": system, "value": result.patient_id}]}
    if result.patient_name:
        family, _, rest = result.patient_name.split("=")[0].partition("^")
        given = [part for part in rest.split("^")[:2] if part]
        patient["name"] = [{"family": family, **({"given": given} if given else {})}]
    if (birth_date := _fhir_date(result.patient_birth_date)) is not None:
        patient["birthDate"] = birth_date
    patient["gender"] = _GENDER.get(_patient_sex(result.patient_sex) or "", "unknown")
    subject = {"reference": patient_url, "identifier": {"system": system, "value": result.patient_id}}
    study_identifier = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{result.study_uid}"}
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [study_identifier],
        "status": "available",
        "subject": subject,
        "modality": [{"system": FHIR_SYSTEMS["DCM"], "code": m} for m in result.modalities],
        "numberOfSeries": len({ref.series_uid for ref in result.instances}),
        "numberOfInstances": len(result.instances),
    }
    if (started := _fhir_date(result.study_date)) is not None:
        study["started"] = started
    if result.study_description:
        study["description"] = result.study_description
    study_ref = {"reference": study_url}
    observations = [_observation(result, f, subject, study_ref) for f in result.findings]
    report_identifier = {"system": URI_SYSTEM, "value": f"urn:uuid:{result.trace_id}"}
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [report_identifier],
        "status": FHIR_STATUS[result.status],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [DIAGNOSTIC_IMAGING_STUDY]},
        "subject": subject,
        "issued": result.issued_at.isoformat(),
        "imagingStudy": [study_ref],
        "result": [{"reference": url} for url, _ in observations],
    }
    if result.study_description:
        report["code"]["text"] = result.study_description
    if result.accession_number:
        report["identifier"].append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                          "code": "ACSN"}]}, "value": result.accession_number})
    if (effective := _fhir_date(result.study_date)) is not None:
        report["effectiveDateTime"] = effective
    if _signed(result):
        report["resultsInterpreter"] = [{"display": result.reader_id}]
    if result.report_text.strip():
        report["conclusion"] = result.report_text
    entries = [
        {"fullUrl": patient_url, "resource": patient,
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": urlencode({"identifier": f"{system}|{result.patient_id}"})}},
        {"fullUrl": study_url, "resource": study,
         "request": {"method": "POST", "url": "ImagingStudy",
                     "ifNoneExist": urlencode({"identifier": f"{DICOM_UID_SYSTEM}|{study_identifier['value']}"})}},
        *({"fullUrl": url, "resource": observation,
           "request": {"method": "PUT", "url": _conditional("Observation", URI_SYSTEM,
                                                             observation["identifier"][0]["value"])}}
          for url, observation in observations),
        {"fullUrl": report_url, "resource": report,
         "request": {"method": "PUT", "url": _conditional("DiagnosticReport", URI_SYSTEM,
                                                           report_identifier["value"])}},
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    validate_fhir(bundle)
    return bundle


def _path(loc: tuple[Any, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _walk(child, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _walk(child, f"{path}[{index}]")


def validate_fhir(bundle: dict[str, Any]) -> None:
    """Refuse a Bundle a FHIR R4 server would refuse, naming the path (``entry[2].resource.code``).

    Structure, cardinality and datatypes by ``fhir.resources`` (its R4B models: R4B's
    DiagnosticReport, Observation, ImagingStudy, Patient and Bundle are R4's); on top, what it
    leaves out: the required status bindings, and that every ``urn:uuid`` reference names an
    entry of this Bundle (a server refuses a transaction with a dangling one).
    """
    try:
        Bundle.model_validate(bundle)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"invalid FHIR Bundle at {_path(error['loc'])}: {error['msg']}") from None
    except (KeyError, TypeError) as exc:  # fhir.resources' lookup of an unknown resourceType
        raise ValueError(f"invalid FHIR Bundle: unknown or malformed resource ({exc})") from None
    if bundle.get("type") not in _BUNDLE_TYPES:
        raise ValueError(f"invalid FHIR Bundle at type: {bundle.get('type')!r} is not a Bundle type")
    full_urls = {entry.get("fullUrl") for entry in bundle.get("entry", [])}
    for index, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource", {})
        for field_name, allowed in _REQUIRED_CODES.get(resource.get("resourceType"), {}).items():
            if field_name in resource and resource[field_name] not in allowed:
                raise ValueError(f"invalid FHIR Bundle at entry[{index}].resource.{field_name}: "
                                 f"{resource[field_name]!r} is not one of {sorted(allowed)}")
        method = entry.get("request", {}).get("method")
        if method is not None and method not in _METHODS:
            raise ValueError(f"invalid FHIR Bundle at entry[{index}].request.method: {method!r}")
    for path, value in _walk(bundle, ""):
        if path.endswith(".reference") and isinstance(value, str) and value.startswith("urn:uuid:") \
                and value not in full_urls:
            raise ValueError(f"invalid FHIR Bundle at {path}: {value} is no entry's fullUrl")


# ---------------------------------------------------------------- webhooks

WEBHOOK_EVENTS = {ResultStatus.PRELIMINARY: "study.result.preliminary", ResultStatus.FINAL: "study.result.final",
                  ResultStatus.CORRECTED: "study.result.corrected"}


def webhook_payload(result: StudyResult) -> dict[str, Any]:
    """The revision as a JSON event. Identifiers only, no name or birth date: a webhook receiver
    matches by study UID, accession number or patient id and fetches more if entitled."""
    _check_result(result)
    return {
        "id": str(uuid.uuid5(RESULT_NAMESPACE, f"{result.trace_id}:{result.revision}")),
        "type": WEBHOOK_EVENTS[result.status],
        "trace_id": result.trace_id,
        "study_uid": result.study_uid,
        "accession_number": result.accession_number,
        "patient_id": result.patient_id,
        "source_site": result.source_site,
        "version": result.version,
        "revision": result.revision,
        "replaces": result.replaces,
        "status": result.status.value,
        "issued_at": result.issued_at.isoformat(),
        "urgent": result.critical,
        "priority": result.priority.value,
        "findings": [{
            "label": f.label,
            "codes": [{"scheme": c.scheme, "value": c.value, "meaning": c.meaning} for c in f.codes],
            "confidence": f.confidence,
            "critical": f.critical,
            "model": f.model,
            "model_version": f.model_version,
            "decision": f.decision,
            "modified_to": f.modified_to,
            "location": f.location,
            "present": not _rejected(f),
        } for f in result.findings],
        "report_text": result.report_text,
        "changes": list(result.changes),
        "reader_id": result.reader_id,
        "signed_at": result.signed_at.isoformat() if result.signed_at else None,
    }


def _signature(secret: bytes, body: bytes, timestamp: int) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign_webhook(secret: bytes, body: bytes, timestamp: int) -> str:
    """Signature header value ``t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>`` (Stripe's scheme):
    the timestamp is signed too, so a captured request cannot be replayed later with a new one."""
    return f"t={timestamp},v1={_signature(secret, body, timestamp)}"


def verify_webhook(secret: bytes, body: bytes, header: str, *, now: int, tolerance_s: int = 300) -> bool:
    """True when one ``v1`` of ``header`` signs ``body`` at its ``t`` and ``t`` is within
    ``tolerance_s`` of ``now``. Compared in constant time; several ``v1`` allow secret rotation."""
    timestamp: int | None = None
    signatures = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures or abs(now - timestamp) > tolerance_s:
        return False
    expected = _signature(secret, body, timestamp)
    return any(hmac.compare_digest(expected, signature) for signature in signatures)


def idempotency_key(trace_id: str, revision: int, destination: str) -> str:
    """The same key for every attempt of one revision to one destination (UUID form, RFC 4122 v5)."""
    return str(uuid.uuid5(RESULT_NAMESPACE, f"{trace_id}:{revision}:{destination}"))
