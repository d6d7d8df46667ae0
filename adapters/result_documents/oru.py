"""The HL7 v2.5 ORU^R01 of a result revision: one OBX per finding, OBR-25 P/F/C, a REJECT as OBX status D."""

from __future__ import annotations

import re
from datetime import datetime


from schemas.events import Priority, ResultFinding, ResultStatus, StudyResult
from adapters.result_documents.common import (
    REPORT_NARRATIVE, check_result, finding_code, finding_sentence, patient_sex, is_rejected, is_signed,
)


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
    check_result(result)
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
           patient_sex(result.patient_sex) or "U"]
    orc = ["ORC", "RE", accession, accession]
    obr = ["OBR", "1", accession, accession, f"^{hl7_escape(service)}", priority, "", _hl7_study_time(result)]
    obr += [""] * 8 + [f"^{_xpn(result.referring_physician)}" if result.referring_physician else ""]  # OBR-16
    obr += [""] * 5 + [issued, "", "RAD", status, "", f"^^^^^{priority}"]  # OBR-22 .. OBR-27
    obr += ["", "", "", f"^{hl7_escape(result.reason_for_exam)}" if result.reason_for_exam else "",
            hl7_escape(result.reader_id) if is_signed(result) else ""]  # OBR-31, OBR-32
    segments = [msh, pid, orc, obr]
    for sub_id, finding in enumerate(result.findings, start=1):
        rejected = is_rejected(finding)
        flag = "" if rejected else ("AA" if finding.critical else "A")
        observer = hl7_escape(result.reader_id) if finding.decision and result.reader_id else ""
        segments.append(["OBX", str(len(segments) - 3), "ST", _hl7_code(finding), str(sub_id),
                         hl7_escape(finding_sentence(finding)),
                         "", "", flag, "", "", "D" if rejected else status, "", "", issued, "", observer, "",
                         hl7_escape(f"{finding.model} {finding.model_version}")])
    narrative = f"{REPORT_NARRATIVE.value}^{REPORT_NARRATIVE.meaning}^LN"
    if result.report_text.strip():
        for line in _LINE_BREAKS.split(result.report_text):
            segments.append(["OBX", str(len(segments) - 3), "TX", narrative, "1", hl7_escape(line),
                             "", "", "", "", "", status])
    return "\r".join("|".join(fields) for fields in segments)
