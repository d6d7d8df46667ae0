"""What every result document shares: the codes that name findings, the reader's decisions in words,
the checks every output needs, and UIDs derived from a result (so a resend is the same thing)."""

from __future__ import annotations

import uuid

import highdicom as hd
from pydicom.sr.codedict import codes

from schemas.events import CodedConcept, ResultFinding, ResultStatus, StudyResult


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


def is_rejected(finding: ResultFinding) -> bool:
    return (finding.decision or "").upper() == "REJECT"


def is_signed(result: StudyResult) -> bool:
    return result.status is not ResultStatus.PRELIMINARY and bool(result.reader_id) and result.signed_at is not None


def check_result(result: StudyResult) -> None:
    """What every output needs; refused here with the field to fix, not deep in a library."""
    if result.status is ResultStatus.CORRECTED and result.replaces is None:
        raise ValueError(f"result {result.trace_id} revision {result.revision}: CORRECTED needs 'replaces'")
    if result.replaces is not None and result.replaces >= result.revision:
        raise ValueError(f"result {result.trace_id}: revision {result.revision} cannot replace {result.replaces}")
    if result.status is ResultStatus.FINAL and not is_signed(result):
        raise ValueError(f"result {result.trace_id} revision {result.revision}: FINAL needs reader_id and signed_at")
    for finding in result.findings:
        finding_code(finding)


def decision_text(finding: ResultFinding) -> str:
    decision = (finding.decision or "").upper()
    if decision == "MODIFY":
        return f"modified by the reader to: {finding.modified_to or '(no text)'}"
    if decision == "ACCEPT":
        return "accepted by the reader"
    if decision == "REJECT":
        return "rejected by the reader: not present"
    return "not yet reviewed by a reader"


def finding_sentence(finding: ResultFinding) -> str:
    code = finding_code(finding)
    where = f", location {finding.location}" if finding.location else ""
    return (f"{finding.label} ({code.meaning}, {code.scheme} {code.value}){where}: AI {finding.model} "
            f"{finding.model_version} confidence {finding.confidence:.2f}; {decision_text(finding)}")


def derived_uid(*names: str) -> str:
    """A UID that is a function of ``names``: ``2.25.<integer of a name-based UUID>`` (PS3.5 B.2).

    Not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with no prefix it ignores the
    entropy sources and returns a random UUID UID."""
    return f"2.25.{uuid.uuid5(RESULT_NAMESPACE, '|'.join(names)).int}"


def pn_value(name: str) -> str:
    # A PN without "^" is a family name only; highdicom wants that said explicitly.
    return name if "^" in name else f"{name}^"


def patient_sex(sex: str | None) -> str | None:
    value = (sex or "").upper()
    return value if value in ("M", "F", "O") else None
