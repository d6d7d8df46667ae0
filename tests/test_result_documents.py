"""Result documents: a study result revision as SR, ORU^R01, FHIR Bundle and signed webhook.

Every document is read back by a parser that is not ours: highdicom and dcmtk's dsrdump /
dicom3tools' dciodvfy for the SR, the ``hl7`` package for the ORU, ``fhir.resources`` for FHIR.
The study is pydicom's CT_small.dcm (its original UIDs and demographics).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import hl7
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file

from adapters.result_documents import (
    build_fhir,
    build_oru,
    build_sr,
    derived_uid,
    idempotency_key,
    sign_webhook,
    sr_uids,
    validate_fhir,
    verify_webhook,
    webhook_payload,
)
from schemas.events import (
    CodedConcept,
    InstanceRef,
    Priority,
    ResultFinding,
    ResultStatus,
    StudyResult,
    trace_id_for,
)

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
ISSUED = datetime(2024, 5, 1, 10, 0, 0, 123000, tzinfo=UTC)
SIGNED = datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
HEMORRHAGE = [CodedConcept(scheme="SCT", value="50960005", meaning="Hemorrhage"),
              CodedConcept(scheme="RADLEX", value="RID4700", meaning="hemorrhage")]
LESION = [CodedConcept(scheme="SCT", value="52988006", meaning="Lesion")]


def preliminary_result() -> StudyResult:
    """Revision 1 of CT_small's result: two AI findings (one critical), nobody signed yet.

    The study's one real instance plus a second slice in its series, so the evidence has to list
    more than one instance."""
    ds = dcmread(CT_SMALL, stop_before_pixels=True)
    real = InstanceRef(sop_instance_uid=ds.SOPInstanceUID, series_uid=ds.SeriesInstanceUID,
                       sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                       blob_uri="file:///blobs/ct_small.dcm", blob_size=Path(CT_SMALL).stat().st_size,
                       instance_number=1)
    second = real.replace(sop_instance_uid=derived_uid("ct_small slice 2"),
                          instance_number=2)
    return StudyResult(
        trace_id=trace_id_for(ds.StudyInstanceUID), study_uid=ds.StudyInstanceUID, version=1, revision=1,
        status=ResultStatus.PRELIMINARY, issued_at=ISSUED, source_site="site-a", modalities=[ds.Modality],
        priority=Priority.CRITICAL, critical=True,
        findings=[
            ResultFinding(label="hemorrhage", model="ich_ct_demo", model_version="1.2.0", confidence=0.91,
                          critical=True, codes=HEMORRHAGE),
            ResultFinding(label="lesion", model="mr_brain_demo", model_version="0.3.1", confidence=0.62,
                          critical=False, codes=LESION, location="left frontal"),
        ],
        instances=[real, second],
        report_text="AI pre-read: acute hemorrhage suspected.\nLesion left frontal.",
        changes=["first AI result"], ai_status="OK", accession_number="ACC-0001",
        patient_id=ds.PatientID, patient_name=str(ds.PatientName), patient_birth_date="19700102",
        patient_sex=ds.PatientSex, study_date=ds.StudyDate, study_time=ds.StudyTime,
        study_description="CT HEAD WO CONTRAST", referring_physician="Doe^John",
        reason_for_exam="fall, on anticoagulants",
    )


def final_result() -> StudyResult:
    """Revision 2: the reader accepted both findings and signed."""
    result = preliminary_result()
    return result.replace(revision=2, status=ResultStatus.FINAL, reader_id="dr.lee", signed_at=SIGNED,
                          findings=[f.replace(decision="ACCEPT") for f in result.findings],
                          report_text="Acute subdural hemorrhage.\nSmall left frontal lesion.", changes=["signed"])


def corrected_result() -> StudyResult:
    """Revision 3 amends 2: the lesion was rejected after signing."""
    result = final_result()
    return result.replace(revision=3, status=ResultStatus.CORRECTED, replaces=2,
                          findings=[result.findings[0], result.findings[1].replace(decision="REJECT")],
                          report_text="Acute subdural hemorrhage.", changes=["finding lesion rejected"])


def sr_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_sr(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    return hd.sr.srread(io.BytesIO(sr_bytes(ds)))


def evaluations(sr: hd.sr.Comprehensive3DSR) -> list[Dataset]:
    container = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    return list(container.ContentSequence)


# ---------------------------------------------------------------- DICOM SR


def test_preliminary_result_becomes_a_tid1500_report_with_one_group_per_finding() -> None:
    result = preliminary_result()
    sr = read_sr(build_sr(result))

    assert (sr.PreliminaryFlag, sr.CompletionFlag, sr.VerificationFlag) == ("PRELIMINARY", "PARTIAL", "UNVERIFIED")
    assert (sr.StudyInstanceUID, sr.PatientID, str(sr.PatientName)) == (
        result.study_uid, "1CT1", "CompressedSamples^CT1")
    assert (sr.AccessionNumber, sr.PatientBirthDate, sr.StudyDate) == ("ACC-0001", "19700102", "20040119")
    assert str(sr.ReferringPhysicianName) == "Doe^John"
    groups = sr.content.get_image_measurement_groups()
    assert [(g.finding_type.value, g.finding_type.scheme_designator) for g in groups] == [
        ("50960005", "SCT"), ("52988006", "SCT")]
    certainty = groups[0].get_measurements()[0]
    assert (certainty.name.value, certainty.value, certainty.unit.value) == ("111012", 91.0, "%")
    algorithm = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
                 for item in groups[0][0].ContentSequence if item.ValueType == "TEXT"}
    assert algorithm["Algorithm Name"] == "ich_ct_demo" and algorithm["Algorithm Version"] == "1.2.0"
    assert algorithm["Comment"] == "Not yet reviewed by a reader"
    evidence = {(series, sop) for _, series, sop, _ in sr.get_evidence()}
    assert evidence == {(i.series_uid, i.sop_instance_uid) for i in result.instances}
    narrative = [item.TextValue for item in evaluations(sr) if item.ConceptNameCodeSequence[0].CodeValue == "18782-3"]
    assert narrative == [result.report_text]


def test_signed_result_is_verified_by_its_reader_at_signing_time() -> None:
    sr = read_sr(build_sr(final_result()))

    assert (sr.PreliminaryFlag, sr.CompletionFlag, sr.VerificationFlag) == ("FINAL", "COMPLETE", "VERIFIED")
    observer = sr.VerifyingObserverSequence[0]
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == ("dr.lee^", "radstream")
    assert observer.VerificationDateTime.startswith("20240501103000")
    assert "PredecessorDocumentsSequence" not in sr


def test_a_resend_of_the_same_revision_is_the_same_sop_instance() -> None:
    result = final_result()
    first, again = build_sr(result), build_sr(result)

    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == sr_uids(result.trace_id, 2)[::-1]
    assert sr_bytes(first) == sr_bytes(again)
    other = build_sr(corrected_result())
    assert other.SOPInstanceUID != first.SOPInstanceUID and other.SeriesInstanceUID != first.SeriesInstanceUID


def test_correction_names_its_predecessor_and_states_the_rejected_finding_absent() -> None:
    result = corrected_result()
    sr = read_sr(build_sr(result, previous=final_result()))

    predecessor = sr.PredecessorDocumentsSequence[0]
    replaced = sr_uids(result.trace_id, 2)
    assert predecessor.StudyInstanceUID == result.study_uid
    assert predecessor.ReferencedSeriesSequence[0].SeriesInstanceUID == replaced.series_uid
    reference = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == replaced.sop_instance_uid
    assert [g.finding_type.meaning for g in sr.content.get_image_measurement_groups()] == ["Hemorrhage"]
    items = evaluations(sr)
    absent = [i for i in items if i.ValueType == "CODE"]
    assert [(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue) for i in absent] == [
        ("52988006", "272519000")]
    comments = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert "Amends revision 2: finding lesion rejected" in comments
    assert any("lesion" in c and "rejected by the reader: not present" in c for c in comments)


def test_finding_dropped_by_a_new_study_version_is_stated_withdrawn() -> None:
    final = final_result()
    result = final.replace(revision=3, status=ResultStatus.CORRECTED, replaces=2, version=2,
                           findings=final.findings[:1], changes=["new study version 2"])
    comments = [i.TextValue for i in evaluations(read_sr(build_sr(result, previous=final)))
                if i.ValueType == "TEXT"]
    assert any(c.startswith("lesion (Lesion) reported in revision 2 is withdrawn") for c in comments)


def test_every_finding_rejected_leaves_no_measurement_group() -> None:
    result = corrected_result()
    result = result.replace(findings=[f.replace(decision="REJECT") for f in result.findings])
    sr = read_sr(build_sr(result))

    assert sr.content.get_image_measurement_groups() == []
    assert len([i for i in evaluations(sr) if i.ValueType == "CODE"]) == 2


@pytest.mark.parametrize("change, message", [
    ({"status": ResultStatus.CORRECTED, "replaces": None}, "CORRECTED needs 'replaces'"),
    ({"reader_id": None}, "FINAL needs reader_id and signed_at"),
    ({"instances": []}, "no source instances"),
])
def test_results_the_standard_cannot_express_are_refused_at_the_edge(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_sr(final_result().replace(**change))


def test_previous_must_be_the_replaced_revision() -> None:
    with pytest.raises(ValueError, match="replaces 2"):
        build_sr(corrected_result(), previous=preliminary_result())


@pytest.mark.skipif(not (shutil.which("dsrdump") and shutil.which("dciodvfy")), reason="dcmtk / dicom3tools absent")
@pytest.mark.parametrize("make", [preliminary_result, final_result, corrected_result])
def test_dcmtk_and_dicom3tools_accept_the_sr(make, tmp_path: Path) -> None:
    path = tmp_path / "result.dcm"
    path.write_bytes(sr_bytes(build_sr(make())))

    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    assert "E:" not in dump.stderr and "Imaging Measurement Report" in dump.stdout
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=30)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


# ---------------------------------------------------------------- HL7 v2.5 ORU^R01


def oru(result: StudyResult) -> hl7.Message:
    return hl7.parse(build_oru(result, receiving_app="RIS", receiving_facility="SITE-A", control_id="R-42"))


def test_preliminary_oru_carries_each_finding_and_the_report_lines() -> None:
    message = oru(preliminary_result())

    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert [str(message.segment("MSH")(n)) for n in (10, 11, 12)] == ["R-42", "P", "2.5"]
    pid = message.segment("PID")
    assert (str(pid(3)(1)(1)), str(pid(5)(1)(1)), str(pid(5)(1)(2)), str(pid(7)), str(pid(8))) == (
        "1CT1", "CompressedSamples", "CT1", "19700102", "O")
    obr = message.segment("OBR")
    assert (str(obr(2)), str(obr(3)), str(obr(25)), str(obr(5)), str(obr(7))) == (
        "ACC-0001", "ACC-0001", "P", "S", "20040119072730")
    assert str(obr(27)(1)(6)) == "S" and str(obr(22)) == "20240501100000+0000"
    assert (str(obr(16)), str(obr(31))) == ("^Doe^John", "^fall, on anticoagulants")
    obx = message.segments("OBX")
    assert [str(o(2)) for o in obx] == ["ST", "ST", "TX", "TX"]
    assert str(obx[0](3)) == "50960005^Hemorrhage^SCT^RID4700^hemorrhage^RADLEX"
    assert [str(o(8)) for o in obx[:2]] == ["AA", "A"]
    assert {str(o(11)) for o in obx} == {"P"}
    assert [str(o(5)) for o in obx[2:]] == ["AI pre-read: acute hemorrhage suspected.", "Lesion left frontal."]


def test_correction_deletes_the_rejected_findings_obx() -> None:
    message = oru(corrected_result())

    assert str(message.segment("OBR")(25)) == "C" and str(message.segment("OBR")(32)) == "dr.lee"
    obx = message.segments("OBX")
    statuses = {str(o(3)(1)(1)): str(o(11)) for o in obx if str(o(2)) == "ST"}
    assert statuses == {"50960005": "C", "52988006": "D"}
    rejected = next(o for o in obx if str(o(11)) == "D")
    assert str(rejected(8)) == "" and "rejected by the reader" in str(rejected(5))


def test_delimiters_in_text_are_escaped() -> None:
    text = r"left | right ^ up & down ~ back \ slash"
    result = final_result().replace(reason_for_exam=text, report_text=text, patient_name="O'Brien & Co^Ann")
    raw = build_oru(result, receiving_app="RIS", receiving_facility="SITE-A", control_id="R-43")
    message = hl7.parse(raw)

    assert r"left \F\ right \S\ up \T\ down \R\ back \E\ slash" in raw
    narrative = next(o for o in message.segments("OBX") if str(o(2)) == "TX")
    assert len(narrative) == 12  # the escaped "|" did not add a field
    assert message.unescape(str(narrative(5))) == text
    assert message.unescape(str(message.segment("PID")(5)(1)(1))) == "O'Brien & Co"


def test_oru_without_accession_number_is_refused() -> None:
    with pytest.raises(ValueError, match="accession_number"):
        oru(final_result().replace(accession_number=None))


# ---------------------------------------------------------------- FHIR R4


def entries(bundle: dict, resource_type: str) -> list[dict]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


@pytest.mark.parametrize("make, status", [(preliminary_result, "preliminary"), (final_result, "final"),
                                          (corrected_result, "amended")])
def test_fhir_bundle_is_a_valid_idempotent_transaction(make, status: str) -> None:
    result = make()
    bundle = build_fhir(result)

    assert bundle["type"] == "transaction"
    (report_entry,) = entries(bundle, "DiagnosticReport")
    report = report_entry["resource"]
    assert report["status"] == status and report["code"]["coding"][0]["code"] == "18748-4"
    assert report["identifier"][0] == {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{result.trace_id}"}
    assert report_entry["request"]["method"] == "PUT"
    assert report_entry["request"]["url"].startswith("DiagnosticReport?identifier=urn%3Aietf%3Arfc%3A3986%7C")
    (study,) = entries(bundle, "ImagingStudy")
    assert study["resource"]["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_uid}"}
    assert report["imagingStudy"] == [{"reference": study["fullUrl"]}]
    assert report["conclusion"] == result.report_text
    observations = entries(bundle, "Observation")
    assert [r["reference"] for r in report["result"]] == [o["fullUrl"] for o in observations]
    assert all(o["request"]["method"] == "PUT" for o in observations)
    assert observations[0]["resource"]["interpretation"][0]["coding"][0]["code"] == "AA"
    assert build_fhir(result) == bundle  # the same revision is the same request


def test_fhir_marks_a_rejected_finding_entered_in_error() -> None:
    bundle = build_fhir(corrected_result())
    statuses = {o["resource"]["code"]["text"]: o["resource"]["status"] for o in entries(bundle, "Observation")}
    assert statuses == {"hemorrhage": "amended", "lesion": "entered-in-error"}


def test_invalid_fhir_is_refused_with_its_path() -> None:
    bundle = build_fhir(final_result())
    index = bundle["entry"].index(entries(bundle, "DiagnosticReport")[0])

    missing_code = json.loads(json.dumps(bundle))
    del missing_code["entry"][index]["resource"]["code"]
    with pytest.raises(ValueError, match=rf"entry\[{index}\]\.resource\.code"):
        validate_fhir(missing_code)
    bad_status = json.loads(json.dumps(bundle))
    bad_status["entry"][index]["resource"]["status"] = "signed"
    with pytest.raises(ValueError, match=rf"entry\[{index}\]\.resource\.status"):
        validate_fhir(bad_status)
    dangling = json.loads(json.dumps(bundle))
    dangling["entry"][index]["resource"]["imagingStudy"][0]["reference"] = f"urn:uuid:{uuid.UUID(int=0)}"
    with pytest.raises(ValueError, match="is no entry's fullUrl"):
        validate_fhir(dangling)


# ---------------------------------------------------------------- webhooks


def test_webhook_payload_is_json_with_the_event_type_and_urgency() -> None:
    payload = json.loads(json.dumps(webhook_payload(corrected_result())))

    assert (payload["type"], payload["urgent"], payload["replaces"], payload["revision"]) == (
        "study.result.corrected", True, 2, 3)
    assert [(f["label"], f["present"]) for f in payload["findings"]] == [("hemorrhage", True), ("lesion", False)]
    assert payload["findings"][0]["codes"][0] == {"scheme": "SCT", "value": "50960005", "meaning": "Hemorrhage"}
    assert webhook_payload(preliminary_result())["type"] == "study.result.preliminary"


def test_signed_webhook_verifies_and_tampering_or_staleness_does_not() -> None:
    secret, body, now = b"s3cret", json.dumps(webhook_payload(final_result())).encode(), 1_714_557_600
    header = sign_webhook(secret, body, now)

    assert header.startswith(f"t={now},v1=")
    assert verify_webhook(secret, body, header, now=now + 10)
    assert not verify_webhook(secret, body.replace(b"dr.lee", b"dr.eve"), header, now=now)
    assert not verify_webhook(b"other", body, header, now=now)
    assert not verify_webhook(secret, body, header, now=now + 301)
    assert not verify_webhook(secret, body, header.replace(f"t={now}", f"t={now + 1}"), now=now)
    assert not verify_webhook(secret, body, "garbage", now=now)
    rotated = f"t={now},v1={'0' * 64},{header.split(',')[1]}"
    assert verify_webhook(secret, body, rotated, now=now)


def test_idempotency_key_is_one_per_revision_and_destination() -> None:
    key = idempotency_key("d7c126ba-c14a-5131-834c-506313f4c58f", 2, "ris-a")

    assert key == idempotency_key("d7c126ba-c14a-5131-834c-506313f4c58f", 2, "ris-a")
    assert len(key) == 36 and key.count("-") == 4
    assert key != idempotency_key("d7c126ba-c14a-5131-834c-506313f4c58f", 3, "ris-a")
    assert key != idempotency_key("d7c126ba-c14a-5131-834c-506313f4c58f", 2, "ris-b")
