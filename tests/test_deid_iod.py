"""Combined Annex E actions (X/Z, X/D, X/Z/D, Z/D) resolved by the IOD (issue #15, finding 6).

On real enhanced instances -- pydicom-data's Enhanced CT (eCT_Supplemental.dcm) and
Enhanced MR (emri_small.dcm) -- a combined-action attribute that the IOD makes Type 1
gets a dummy, Type 2 an empty value, Type 3 is removed; the same attributes in a plain
CT Image (CT_small.dcm) are Type 3 and removed. dciodvfy (dicom3tools) finds no error in
a de-identified enhanced instance that its input did not have.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence

from deid import iod
from deid.engine import deidentify_instance, plan_for
from schemas.deid.keys import DeidKeys
from schemas.deid.policy import parse_policy
from tests.deid_fixtures import real_path
from tests.test_deid_audit import DCIODVFY, POLICIES, assert_no_new_dciodvfy_errors, dciodvfy_errors

KEYS = DeidKeys(bytes(range(32)))
BASIC = parse_policy({"defaults": {"options": []}}).defaults
ENHANCED = ("eCT_Supplemental.dcm", "emri_small.dcm")
SEGMENTATION = "liver_1frame.dcm"  # pydicom-data's Segmentation: X/Z/U* SourceImageSequence, Type 2 per frame


def item(**values) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def with_equipment(name: str) -> bytes:
    """A real file with identifying equipment attributes at the top level and nested where
    the IOD gives them different Types."""
    ds = dcmread(real_path(name))
    ds.DeviceSerialNumber = "CANARYSERIAL-77"  # X/Z/D: Type 1 Enhanced General Eq., Type 3 General Eq.
    ds.StationName = "CANARYSTATION"  # X/Z/D: Type 3
    ds.InstitutionName = "CANARYHOSP General"  # X/Z/D: Type 3
    ds.OperatorsName = "CANARYOPER^CAROL"  # X/Z/D: Type 3
    ds.AcquisitionContextSequence = Sequence([])  # X/Z: Type 2 in Acquisition Context (enhanced IODs)
    ds.DeviceSequence = Sequence([item(  # Device module: DeviceSerialNumber Type 3 in its items
        CodeValue="C-1", CodingSchemeDesignator="DCM", CodeMeaning="device", DeviceSerialNumber="CANARYNESTSERIAL")])
    ds.PatientTreatmentPreparationSequence = Sequence([item(PatientTreatmentPreparationProcedureSequence=Sequence([
        item(PatientTreatmentPreparationDeviceSequence=Sequence([item(DeviceSerialNumber="CANARYPREPSERIAL")]))]))])
    out = io.BytesIO()
    dcmwrite(out, ds)
    return out.getvalue()


def deidentified(data: bytes, policy=BASIC) -> Dataset:
    return dcmread(io.BytesIO(deidentify_instance(data, policy, KEYS).data))


def preparation_device(ds: Dataset) -> Dataset:
    return (ds.PatientTreatmentPreparationSequence[0].PatientTreatmentPreparationProcedureSequence[0]
            .PatientTreatmentPreparationDeviceSequence[0])


@pytest.mark.parametrize("name", ENHANCED)
def test_enhanced_iod_type_1_gets_a_dummy_type_2_is_emptied_type_3_is_removed(name) -> None:
    out = deidentified(with_equipment(name))
    # Type 1 (Enhanced General Equipment): present, non-empty, not the original
    assert out.DeviceSerialNumber not in ("", None, "CANARYSERIAL-77")
    # Type 2 (Acquisition Context): present and empty
    assert "AcquisitionContextSequence" in out and len(out.AcquisitionContextSequence) == 0
    # Type 2 inside nested sequences (the path decides): present and empty
    assert "DeviceSerialNumber" in preparation_device(out) and preparation_device(out).DeviceSerialNumber in ("", None)
    # Type 3: removed, at the top level and inside the Device Sequence
    assert not {"StationName", "InstitutionName", "OperatorsName"} & set(out.dir())
    assert "DeviceSerialNumber" not in out.DeviceSequence[0]
    # Z/D ContentDate is Type 1 in the enhanced functional groups module: a dummy, not the original
    assert out.ContentDate not in ("", None) and out.ContentDate != dcmread(real_path(name)).ContentDate


def test_enhanced_mr_type_1c_acquisition_datetime_gets_a_dummy() -> None:
    source = dcmread(real_path("emri_small.dcm"))
    out = deidentified(real_path("emri_small.dcm").read_bytes())
    assert out.AcquisitionDateTime not in ("", None) and out.AcquisitionDateTime != source.AcquisitionDateTime


def test_in_a_plain_ct_image_the_same_attributes_are_type_3_and_removed() -> None:
    out = deidentified(with_equipment("CT_small.dcm"))
    assert not {"DeviceSerialNumber", "StationName", "InstitutionName", "OperatorsName",
                "AcquisitionContextSequence"} & set(out.dir())  # not in the CT Image IOD: removed
    assert "DeviceSerialNumber" not in out.DeviceSequence[0]
    # nested Type 2 is Type 2 in the CT Image module too
    assert preparation_device(out).DeviceSerialNumber in ("", None)
    # Z/D ContentDate is Type 2C in General Image: emptied, not given a dummy
    assert out.ContentDate in ("", None)


def test_a_type_2_reference_sequence_x_z_u_is_emptied_where_it_occurs(tmp_path: Path) -> None:
    """X/Z/U*: SourceImageSequence is Type 2 in a Segmentation's Derivation Image functional
    group (emptied), Type 3 at the top level of a CT Image (removed)."""
    data = deidentify_instance(real_path(SEGMENTATION).read_bytes(), BASIC, KEYS).data
    derivation = dcmread(io.BytesIO(data)).PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert "SourceImageSequence" in derivation and len(derivation.SourceImageSequence) == 0
    if Path(DCIODVFY).exists():  # (Common Instance Reference still names the series: a separate finding)
        (tmp_path / "seg.dcm").write_bytes(data)
        assert not [e for e in dciodvfy_errors(tmp_path / "seg.dcm") if "<SourceImageSequence>" in e]
    ct = dcmread(real_path("CT_small.dcm"))
    ct.SourceImageSequence = Sequence([item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                                            ReferencedSOPInstanceUID="1.2.826.0.1.3680043.10.999.8.42")])
    buffer = io.BytesIO()
    dcmwrite(buffer, ct)
    assert "SourceImageSequence" not in deidentified(buffer.getvalue())


def test_an_unknown_sop_class_keeps_the_strictest_action() -> None:
    """The same instance: under its Enhanced CT SOP class the IOD decides; under a private
    SOP class (no IOD to look up) every combined action is the strictest, as before."""
    enhanced = deidentified(with_equipment("eCT_Supplemental.dcm"))
    assert {"DeviceSerialNumber", "AcquisitionContextSequence"} <= set(enhanced.dir())
    ds = dcmread(io.BytesIO(with_equipment("eCT_Supplemental.dcm")))
    ds.SOPClassUID = "1.2.826.0.1.3680043.10.999.1"
    out_bytes = io.BytesIO()
    dcmwrite(out_bytes, ds)
    out = deidentified(out_bytes.getvalue())
    assert not {"DeviceSerialNumber", "AcquisitionContextSequence", "StationName"} & set(out.dir())
    assert "DeviceSerialNumber" not in preparation_device(out)  # X/Z/D nested: X too
    assert out.ContentDate == "19000101"  # Z/D: D


def test_a_conditional_module_counts_only_when_its_own_attributes_are_present() -> None:
    """ContentDate is Type 2C in General Image, Type 1 in the Multi-frame Grayscale Byte SC
    functional groups module (U): that module counts only with an attribute of its own."""
    content_date = 0x00080023
    ds = item(SOPClassUID="1.2.840.10008.5.1.4.1.1.7.2", ContentDate="20110204")
    assert iod.types_for(ds).action("Z/D", (content_date,), "DA") == "Z"
    ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    assert iod.types_for(ds).action("Z/D", (content_date,), "DA") == "D"
    assert iod.types_for(item(SOPClassUID="1.2.3.4")).action("X/Z/D", (content_date,), "DA") == "X"


def test_the_plan_resolves_a_combined_action_for_other_readers_such_as_phi_scan() -> None:
    """plan.action with the instance's Types and the attribute's path gives what the engine
    did; without them the strictest, as before."""
    ds = dcmread(real_path("eCT_Supplemental.dcm"))
    plan, types, serial, station = plan_for(BASIC), iod.types_for(ds), 0x00181000, 0x00081010
    assert plan.action(serial, (), "LO", types) == "D" and plan.action(station, (), "SH", types) == "X"
    assert plan.action(0x00400555, (), "SQ", types) == "Z"  # AcquisitionContextSequence
    assert plan.action(serial) == "X"


@pytest.mark.parametrize("name", ENHANCED)
def test_phi_scan_takes_the_iods_dummies_and_empties_for_what_they_are(name) -> None:
    """The scanner resolves X/Z/D like the engine: a required dummy is not a leak, a canary still is."""
    from radstream.phi_scan import scan_blob

    data = deidentify_instance(with_equipment(name), BASIC, KEYS).data
    findings = scan_blob(data, name, ["CANARYSERIAL-77"], BASIC)
    assert not [f for f in findings if "Annex E says remove" in f.problem], findings
    assert not [f for f in findings if "canary" in f.problem]


def test_missing_standard_tables_fail_with_a_clear_error() -> None:
    with pytest.raises(iod.StandardTablesMissing, match=r"highdicom>=0.28"):
        iod._read("no_such_table.json")


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy missing: run scripts/bootstrap.sh (dicom3tools)")
@pytest.mark.parametrize("seeded", [False, True], ids=["as-received", "equipment-seeded"])
@pytest.mark.parametrize("options", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("name", ENHANCED)
def test_dciodvfy_finds_no_error_in_a_deidentified_enhanced_instance_that_its_input_did_not_have(
        tmp_path: Path, name, options, seeded) -> None:
    assert_no_new_dciodvfy_errors(tmp_path, with_equipment(name) if seeded else real_path(name).read_bytes(), options)
