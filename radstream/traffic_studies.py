"""Planned studies made real: DICOM instances from real templates, and the HL7 order of each.

The templates are real files shipped with pydicom and pydicom-data (:data:`TEMPLATES`): a
chest CR and an extremity radiograph (sent as DX, Digital X-Ray For Presentation, PS3.3
A.26), a head or body CT and a brain MR. Each study gets new Study, Series and SOP Instance
UIDs, one accession number, one patient (the plan's name, sex and age, an MRN of the site)
and today's StudyDate/StudyTime; each instance its InstanceNumber and slice position.
NumberOfStudyRelatedInstances (0020,1208) announces the study's size, as a PACS forwarding a
study does, unless the caller says the sender does not. Instances are built in memory: one
data set per series is rewritten for each instance (a deep copy per slice would cost more
than sending it); drawing a study again gives the same UIDs, so a sender can resend. The
order is an HL7 v2.5 ORM^O01 (chapter 4.4) with the accession number in OBR-18, the
priority in ORC-7 and OBR-27 (component 6, table 0027: S for STAT, R routine), the
patient's state in PID-11 and the location in PV1-3.
"""

from __future__ import annotations

import copy
import secrets
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom import Dataset, dcmread
from pydicom.uid import UID, generate_uid

from radstream.traffic import PlannedStudy

#: Digital X-Ray Image Storage - For Presentation (PS3.4 B.5).
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")

#: Template file and pixel-grid reduction per modality. ``small``: pydicom's small CT and MR,
#: pydicom-data's radiographs at a quarter of their width (about 0.4 MB): a 2-core machine
#: sustains it; ``full``: the radiographs as acquired (6-7 MB), the 512x512 head CT, a 512x512
#: MR (pydicom-data's 1024x1024 shoulder MR halved).
TEMPLATES: Mapping[str, Mapping[str, tuple[str, int]]] = {
    "small": {"CR": ("RG1_UNCR.dcm", 4), "DX": ("RG3_UNCR.dcm", 4), "CT": ("CT_small.dcm", 1),
              "MR": ("MR_small.dcm", 1)},
    "full": {"CR": ("RG1_UNCR.dcm", 1), "DX": ("RG3_UNCR.dcm", 1), "CT": ("693_UNCR.dcm", 1),
             "MR": ("MR2_UNCR.dcm", 2)},
}


class TemplateMissing(RuntimeError):
    """A template file is not installed (pydicom-data provides the radiographs and the head CT)."""


def load_templates(kind: str = "small", modalities: frozenset[str] | set[str] | None = None) -> dict[str, Dataset]:
    """The template data set of each modality (only ``modalities`` when given)."""
    from pydicom.data import get_testdata_file

    templates = {}
    for modality, (name, reduce_by) in TEMPLATES[kind].items():
        if modalities is not None and modality not in modalities:
            continue
        # download=False: without pydicom-data the default tries the internet for ~21 s.
        path = get_testdata_file(name, download=False)
        if not path:
            raise TemplateMissing(f"the {modality} template {name} is not installed (pip install pydicom-data)")
        ds = dcmread(path)
        if reduce_by > 1:
            _reduce(ds, reduce_by)
        if modality == "DX":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
            ds.Modality = "DX"
            ds.PresentationIntentType = "FOR PRESENTATION"
        templates[modality] = ds
    return templates


def _reduce(ds: Dataset, factor: int) -> None:
    """Keep every ``factor``-th row and column: the same real image on a coarser grid."""
    pixels = ds.pixel_array[::factor, ::factor].copy()
    ds.PixelData = pixels.tobytes()
    ds.Rows, ds.Columns = pixels.shape
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds and ds[keyword].VM == 2:
            ds[keyword].value = [float(v) * factor for v in ds[keyword].value]


@dataclass(frozen=True)
class StudyIdentity:
    """What the site's systems know the study by: UIDs, accession number and patient."""

    study_uid: str
    accession_number: str  # SH, at most 16 characters
    patient_id: str
    birth_date: str  # YYYYMMDD
    study_at: datetime  # StudyDate/StudyTime, local time as a modality writes them


def run_token() -> str:
    """Six random characters naming one run: accession numbers and MRNs of different runs never meet."""
    return "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(6))


def identity_for(study: PlannedStudy, token: str, now: datetime) -> StudyIdentity:
    return StudyIdentity(
        study_uid=generate_uid(), accession_number=f"G{token}{study.index:05d}"[:16],
        patient_id=f"{token}{study.index:06d}",
        birth_date=(now - timedelta(days=365.25 * study.patient_age)).strftime("%Y%m%d"),
        study_at=now)


def study_instances(study: PlannedStudy, identity: StudyIdentity, template: Dataset,
                    announce_count: bool = True) -> Iterator[Dataset]:
    """Every instance of ``study``, series by series.

    The data set yielded is rewritten for the next instance: send or encode each one before
    drawing the next.
    """
    date, time = identity.study_at.strftime("%Y%m%d"), identity.study_at.strftime("%H%M%S")
    for series_index, count in enumerate(study.series, start=1):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID = identity.study_uid
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[identity.study_uid, "series", str(series_index)])
        ds.StudyID = str(study.index)
        ds.AccessionNumber = identity.accession_number
        ds.PatientID = identity.patient_id
        ds.PatientName = study.patient_name
        ds.PatientBirthDate = identity.birth_date
        ds.PatientSex = study.patient_sex
        ds.PatientAge = f"{min(study.patient_age, 999):03d}Y"
        ds.InstitutionName = study.site
        ds.StationName = f"{study.site}_{study.modality}"[:16]
        ds.ReferringPhysicianName = "SMITH^JANE"
        ds.StudyDescription = study.procedure.description
        ds.BodyPartExamined = study.procedure.body_part
        ds.SeriesNumber = series_index
        ds.SeriesDescription = _series_description(study, series_index)
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            setattr(ds, keyword, date)
        for keyword in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
            setattr(ds, keyword, time)
        if announce_count:
            ds.NumberOfStudyRelatedInstances = study.instances
        elif "NumberOfStudyRelatedInstances" in ds:
            del ds.NumberOfStudyRelatedInstances
        origin = [float(v) for v in ds.ImagePositionPatient] if "ImagePositionPatient" in ds else None
        thickness = float(ds.get("SliceThickness") or 1.0)
        for number in range(1, count + 1):
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[identity.study_uid, str(series_index), str(number)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = number
            if origin is not None:
                z = origin[2] + (number - 1) * thickness
                ds.ImagePositionPatient = [origin[0], origin[1], round(z, 4)]
                ds.SliceLocation = round(z, 4)
            yield ds


_MR_SERIES = ("AX T1", "AX T2", "AX FLAIR", "SAG T1", "AX DWI", "AX T1 POST", "COR T2", "AX SWI")


def _series_description(study: PlannedStudy, series_index: int) -> str:
    if study.modality == "CT":
        return "LOCALIZER" if series_index == 1 else "AXIAL 5MM"
    if study.modality == "MR":
        return _MR_SERIES[(series_index - 1) % len(_MR_SERIES)]
    if study.modality == "CR":
        return ("PA", "LATERAL", "AP")[(series_index - 1) % 3]
    return study.procedure.description


# ---------------------------------------------------------------- HL7 v2.5 ORM^O01

#: MLLP framing (HL7 v2.5 Appendix C.4.3): <VT> message <FS><CR>.
MLLP_START, MLLP_END = b"\x0b", b"\x1c\r"


def order_message(study: PlannedStudy, identity: StudyIdentity, control_id: str, now: datetime) -> bytes:
    """The study's new order (ORC-1 NW) as one MLLP-framed ORM^O01."""
    priority = "S" if study.stat else "R"
    placer = f"PL{identity.accession_number}"
    proc = study.procedure
    obr = ["OBR", "1", placer, "", f"{proc.code}^{proc.description}^L"] + [""] * 11
    obr += ["DR1^SMITH^JANE", "", identity.accession_number] + [""] * 8
    obr += [f"^^^^^{priority}", "", "", "", proc.reason]
    location = f"ED^1^1^{study.site}" if study.stat else f"RAD^^^{study.site}"
    segments = [
        f"MSH|^~\\&|RIS|{study.site}|RADSTREAM|RADSTREAM|{now:%Y%m%d%H%M%S}||ORM^O01|{control_id}|P|2.5",
        f"PID|1||{identity.patient_id}^^^{study.site}^MR||{study.patient_name}||{identity.birth_date}|"
        f"{study.patient_sex}|||1 Main St^^Springfield^{study.patient_state}^00000",
        f"PV1|1|{'E' if study.stat else 'O'}|{location}",
        f"ORC|NW|{placer}||||^^^^^{priority}",
        "|".join(obr),
    ]
    return MLLP_START + ("\r".join(segments) + "\r").encode() + MLLP_END
