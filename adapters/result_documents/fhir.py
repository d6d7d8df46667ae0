"""The FHIR R4 transaction Bundle of a result revision: a DiagnosticReport, one Observation per finding,
the ImagingStudy it reads, conditional updates so a resend is the same resource; validated before it leaves."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pydantic
from fhir.resources.R4B.bundle import Bundle

from schemas.events import CodedConcept, ResultFinding, ResultStatus, StudyResult
from adapters.result_documents.common import (
    CERTAINTY_OF_FINDING, DIAGNOSTIC_IMAGING_STUDY, DICOM_UID_SYSTEM, FHIR_SYSTEMS, PRESENT, URI_SYSTEM,
    check_result, finding_code, finding_sentence, patient_sex, is_rejected, is_signed,
)


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
        "status": "entered-in-error" if is_rejected(finding) else FHIR_STATUS[result.status],
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
        "note": [{"text": finding_sentence(finding)}],
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
    check_result(result)
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
    patient["gender"] = _GENDER.get(patient_sex(result.patient_sex) or "", "unknown")
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
    if is_signed(result):
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
