"""Real DICOM files seeded with canary PHI in every Annex E attribute type, for the de-id tests."""

from __future__ import annotations

import io
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence

#: pydicom's CT/MR (explicit and implicit VR), pydicom-data's chest CR and head CT
REAL_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "RG1_UNCR.dcm", "693_UNCR.dcm")

STUDY_UID = "1.2.826.0.1.3680043.10.999.7"
SERIES_UID = "1.2.826.0.1.3680043.10.999.7.1"
SOP_UID = "1.2.826.0.1.3680043.10.999.7.1.1"
REF_UID = "1.2.826.0.1.3680043.10.999.8.42"

#: every value below must be gone after de-identification
CANARIES = (
    "CANARYPN", "CANARYREF", "CANARYOPER", "CANARYNESTPN",  # PN, top level and nested
    "19770707", "20110203", "20110204",  # DA: birth date, study date, content date
    "CANARYID", "CANARYACC", "CANARYHOSP", "CANARYSTREET", "CANARYDESC", "CANARYSERIES",  # LO/SH/ST
    "CANARYNESTID", "CANARYNESTINST", "CANARYPHONE", "CANARYPROTO",  # inside sequences
    "CANARYPRIVATE", "CANARYCREATOR",  # private tags
    STUDY_UID, SERIES_UID, SOP_UID, REF_UID,  # UI
)


def real_path(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    assert found, f"{name} missing: install pydicom-data"
    return Path(found)


def seed(ds: Dataset, *, study_uid: str = STUDY_UID, series_uid: str = SERIES_UID, sop_uid: str = SOP_UID,
         patient_id: str = "CANARYID-0001") -> Dataset:
    """Put a canary into one attribute of every kind Annex E lists."""
    ds.PatientName = "CANARYPN^ALICE"
    ds.ReferringPhysicianName = "CANARYREF^BOB"
    ds.OperatorsName = "CANARYOPER^CAROL"
    ds.PatientBirthDate = "19770707"
    ds.StudyDate = "20110203"
    ds.ContentDate = "20110204"
    ds.StudyTime = "101500"
    ds.PatientID = patient_id
    ds.AccessionNumber = "CANARYACC77"
    ds.InstitutionName = "CANARYHOSP General"
    ds.InstitutionAddress = "1 CANARYSTREET, Springfield"
    ds.StudyDescription = "CT HEAD W CONTRAST CANARYDESC"
    ds.SeriesDescription = "AXIAL 5MM CANARYSERIES"
    ds.PatientAge, ds.PatientSex, ds.PatientWeight = "045Y", "F", "61.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "CANARYNESTID", "CANARYNESTINST"
    ds.OtherPatientIDsSequence = Sequence([other])
    person = Dataset()
    person.InstitutionName = "CANARYNESTINST"
    person.PersonTelephoneNumbers = "555-CANARYPHONE"
    person.PersonName = "CANARYNESTPN^DAN"
    ds.ReferringPhysicianIdentificationSequence = Sequence([person])
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", REF_UID
    request = Dataset()
    request.RequestedProcedureID = "CANARYPROTO-RP"
    request.ReferencedStudySequence = Sequence([ref])  # two levels deep
    ds.RequestAttributesSequence = Sequence([request])
    ds.add_new(0x00290010, "LO", "CANARYCREATOR")
    ds.add_new(0x00291001, "LO", "CANARYPRIVATE value")
    return ds


def seeded_bytes(name: str, **uids) -> bytes:
    ds = seed(dcmread(real_path(name)), **uids)
    out = io.BytesIO()
    dcmwrite(out, ds)
    return out.getvalue()


#: the audit's site identity: the calling AE title and the name the site map gives it
CANARY_AE = "CANARYAE"
CANARY_SITE = "CANARYSITE Mercy"
#: numbers in free text that can form a phone number, a date or a record number
FREE_TEXT_WITH_NUMBERS = "phone 555-0100, DOB 05/23/1961, MRN 4471902, age 64"
#: each must be absent from every text attribute (digits may occur by chance inside UIDs)
NUMBER_CANARIES = ("555", "0100", "05/23", "1961", "4471902", "64")
#: every value below must be gone, in every VR Annex E lists
AUDIT_CANARIES = (
    *CANARIES, CANARY_AE, "CANARYSITE",
    "CANARYNODE",  # AE
    "CANARYGPS",  # CS
    "20110203101500",  # DT (acquisition date-time, real)
    "CANARYTELECOM",  # LT
    "CANARYSTATION",  # SH
    "CANARYADDR",  # ST
    "CANARYCAMERA",  # UT
    "CANARYXRAYSRC",  # UC
    "CANARYNOTE",  # OB
    "CANARYPHYS",  # PN, multi-valued
    "CANARYDEEP",  # three sequence levels down
    "CANARYPRIVOB",  # private OB
)


def seed_audit(ds: Dataset, **uids) -> Dataset:
    """:func:`seed` plus a canary in every VR Annex E lists, nested and private ones, free
    text with phone/date/ID numbers, and the non-text values a cleaner must not rewrite."""
    seed(ds, **uids)
    ds.StationAETitle = "CANARYNODE"
    ds.add_new(0x00160071, "CS", "CANARYGPS")  # GPSLatitudeRef
    ds.AcquisitionDateTime = "20110203101500"
    ds.add_new(0x00102155, "LT", "tel CANARYTELECOM 555-0100")  # PatientTelecomInformation
    ds.StationName = "CANARYSTATION"
    ds.ReferringPhysicianAddress = "CANARYADDR 12 Elm St"
    ds.add_new(0x0016004D, "UT", "CANARYCAMERA")  # CameraOwnerName
    ds.add_new(0x00189367, "UC", "CANARYXRAYSRC")  # XRaySourceID
    ds.add_new(0x0016002B, "OB", b"CANARYNOTE\0\0")  # MakerNote (Clean Descriptors: C, binary)
    ds.PhysiciansOfRecord = ["CANARYPHYS^ONE", "CANARYPHYS^TWO"]
    ds.ImageComments = FREE_TEXT_WITH_NUMBERS
    ds.DerivationDescription = "Lossy compression 10:1 1961"
    ds.TimezoneOffsetFromUTC = "-0500"
    ds.ContrastBolusAgent = "ISOVUE300/100"
    deep = Dataset()
    deep.PersonName = "CANARYDEEP^EVE"
    middle = Dataset()
    middle.PersonIdentificationCodeSequence = Sequence([])
    middle.add_new(0x00081049, "SQ", Sequence([deep]))  # PhysiciansOfRecordIdentificationSequence
    outer = Dataset()
    outer.RequestedProcedureDescription = "CT HEAD"
    outer.add_new(0x00400275, "SQ", Sequence([middle]))  # RequestAttributesSequence inside an item
    ds.add_new(0x00081110, "SQ", Sequence([outer]))  # ReferencedStudySequence
    ds.add_new(0x00310010, "LO", "CANARYCREATOR2")
    ds.add_new(0x00311002, "OB", b"CANARYPRIVOB")
    return ds


def audit_bytes(name: str, **uids) -> bytes:
    ds = seed_audit(dcmread(real_path(name)), **uids)
    out = io.BytesIO()
    dcmwrite(out, ds)
    return out.getvalue()
