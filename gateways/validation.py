"""Checks every DICOM gateway applies to an instance before it is stored and published.

Whatever protocol brought it (C-STORE, STOW-RS), an instance must be a complete PS3.10
data set, each element once (:func:`check_encoding`), whose native Pixel Data holds
every pixel the Image Pixel Module declares (:func:`check_pixel_data`), with valid Study, Series and SOP Instance UIDs (PS3.5 9.1), a storage SOP
class this network accepts (PS3.4 Annex B) and a transfer syntax DICOM defines
(PS3.5 Annex A). A refusal is an :class:`InvalidInstance` carrying the failure code the
protocols share: the PS3.4 C-STORE status and the PS3.18 STOW-RS FailureReason
(0008,1197) use the same numbers. The header helpers turn odd values (bad character
sets, malformed IS) into ``None`` rather than errors: only the UIDs decide acceptance.
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Sequence
from enum import IntEnum
from io import BytesIO
from typing import Any, NamedTuple

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import VR
from pynetdicom import AllStoragePresentationContexts

from gateways.dicom_wire import (
    DataSetShape,
    DuplicateElement,
    IncompleteDataSet,
    NotADataSet,
    check_complete,
    data_set_offset,
)
from schemas.blobs import is_valid_uid

_INT32 = (-(2**31), 2**31 - 1)
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Storage SOP classes (PS3.4 Annex B.5) this network accepts: every one pynetdicom knows.
STORAGE_SOP_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts)


class FailureReason(IntEnum):
    """Failure codes shared by C-STORE statuses (PS3.4 B.2.3, PS3.7 C) and STOW-RS
    FailureReason (0008,1197) values (PS3.18 Table 10.5.3-1 / I.2.2-1)."""

    PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.1: an error on our side
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # Referenced SOP Class not supported
    OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (retry later)
    DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # Referenced Transfer Syntax not supported
    #: PS3.18 10.5.1 asks a study-level STOW to refuse instances of other studies without
    #: assigning a code; 0xC409 is the one dcm4chee-arc answers with.
    STUDY_UID_MISMATCH = 0xC409


class InvalidInstance(Exception):
    """An instance a gateway refuses: the failure code, a reason key, a message, the culprits."""

    def __init__(self, code: FailureReason, reason: str, error: str, offending: Sequence[str] = ()) -> None:
        super().__init__(error)
        self.code, self.reason, self.error, self.offending = code, reason, error, tuple(offending)

    @classmethod
    def internal_error(cls, exc: Exception) -> InvalidInstance:
        """The refusal of an instance a bug of ours failed (PS3.7 C.4.1 processing failure)."""
        return cls(FailureReason.PROCESSING_FAILURE, "internal_error", f"{type(exc).__name__}: {exc}")


class InstanceUids(NamedTuple):
    """The UIDs that identify an instance (PS3.3 C.7.2.1, C.7.3.1, C.12.1), each validated."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


def read_instance(data: bytes) -> Dataset:
    """The data set of a PS3.10 file (preamble, ``DICM``, file meta), checked to be complete.

    pydicom reads a truncated file without complaint, returning short values; here an
    element whose value is shorter than its length, or encapsulated pixel data without
    its sequence delimiter, makes the instance :data:`FailureReason.CANNOT_UNDERSTAND`.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = dcmread(BytesIO(data))
    except Exception as exc:
        raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "undecodable",
                              f"not a DICOM PS3.10 file: {exc}") from None
    for tag in dataset.keys():
        try:
            raw = dataset.get_item(tag)
        except Exception as exc:  # e.g. an unknown VR (PS3.5 6.2): pydicom raises NotImplementedError
            raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "undecodable",
                                  f"element {tag} cannot be read: {exc}") from None
        if (isinstance(raw, RawDataElement) and raw.length != _UNDEFINED_LENGTH and raw.value is not None
                and len(raw.value) < raw.length):
            raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "truncated",
                                  f"truncated: element {tag} has {len(raw.value)} of its {raw.length} bytes")
    for warning in caught:
        if "End of file reached" in str(warning.message):
            raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "truncated", f"truncated: {warning.message}")
    return dataset


def instance_uids(header: Dataset) -> InstanceUids:
    """Study, series, SOP instance and SOP class UIDs, each present and valid (PS3.5 9.1)."""
    uids = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = header_text(header, keyword)
        if value is None:
            raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "missing_uid", f"{keyword} is missing", [keyword])
        if not is_valid_uid(value):
            raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "invalid_uid",
                                  f"{keyword} {value!r} is not a valid UID (PS3.5 9.1)", [keyword])
        uids.append(value)
    return InstanceUids(*uids)


def check_storable(header: Dataset, sop_class_uid: str) -> str:
    """The transfer syntax UID, once the SOP class is a storage class and the syntax a DICOM one."""
    if sop_class_uid not in STORAGE_SOP_CLASSES:
        raise InvalidInstance(FailureReason.SOP_CLASS_NOT_SUPPORTED, "unknown_sop_class",
                              f"SOPClassUID {sop_class_uid} is not a storage SOP class this gateway accepts",
                              ["SOPClassUID"])
    transfer_syntax = header_text(getattr(header, "file_meta", Dataset()), "TransferSyntaxUID")
    if transfer_syntax is None or not UID(transfer_syntax).is_transfer_syntax:
        raise InvalidInstance(FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED, "unknown_transfer_syntax",
                              f"TransferSyntaxUID {transfer_syntax!r} is not a DICOM transfer syntax (PS3.5 Annex A)",
                              ["TransferSyntaxUID"])
    media_sop = header_text(header.file_meta, "MediaStorageSOPInstanceUID")
    if media_sop is not None and media_sop != header_text(header, "SOPInstanceUID"):
        raise InvalidInstance(FailureReason.DATASET_MISMATCH, "sop_instance_mismatch",
                              f"MediaStorageSOPInstanceUID {media_sop} differs from SOPInstanceUID "
                              f"{header_text(header, 'SOPInstanceUID')} (PS3.10 7.1)", ["SOPInstanceUID"])
    return transfer_syntax


def check_encoding(part10: bytes, transfer_syntax: str, *, header: bool = False) -> DataSetShape:
    """The data set of the PS3.10 file ``part10`` is whole and holds each element once
    (:func:`gateways.dicom_wire.check_complete`); its shape for :func:`check_pixel_data`,
    with its header elements for :func:`walked_header` if ``header``."""
    try:
        return check_complete(part10[data_set_offset(part10):], transfer_syntax, header=header)
    except NotADataSet as exc:
        raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "undecodable", f"not a DICOM data set: {exc}") from None
    except IncompleteDataSet as exc:
        raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "truncated", f"incomplete data set: {exc}") from None
    except DuplicateElement as exc:
        raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "duplicate_element", str(exc)) from None


#: VRs pydicom reads; an element with any other (a hostile or broken stream) is left to dcmread
_KNOWN_VRS = frozenset(vr.value for vr in VR)


def walked_header(shape: DataSetShape) -> Dataset | None:
    """The data set's header (its top-level elements before the pixel data) as
    ``dcmread(..., stop_before_pixels=True)`` reads it, from what the walk of
    :func:`check_encoding` with ``header=True`` kept, without parsing the bytes again
    (dcmread took ~0.9 ms of a 526 kB CT slice's ~10 ms in the gateway). Values stay raw
    until read, as dcmread leaves them; sequences of undefined length are read by pydicom's
    own element reader. None where pydicom might read the elements otherwise (an unknown VR,
    another value of undefined length than a sequence, a sequence pydicom ends elsewhere):
    the caller then reads the header with dcmread.
    """
    data, implicit, little = shape.walked, shape.implicit, shape.little
    elements: dict[BaseTag, Any] = {}
    encoding: str | list[str] = default_encoding
    try:
        for tag, vr, length, start, value, end in shape.header:
            if vr is not None and vr not in _KNOWN_VRS:
                return None
            if length == _UNDEFINED_LENGTH:  # a sequence: read now, in the character set so far, as dcmread does
                if (vr or dictionary_VR(tag)) != "SQ":
                    return None
                stream = BytesIO(data[start:end])
                element = next(data_element_generator(stream, implicit, little, encoding=encoding))
                if stream.tell() != end - start:  # pydicom ends it elsewhere than the walk did
                    return None
            else:
                element = RawDataElement(BaseTag(tag), vr, length, data[value:end], value, implicit, little)
            elements[element.tag] = element
            if tag == 0x00080005:
                encoding = convert_encodings(convert_raw_data_element(element).value)
    except Exception:  # let dcmread read it, and refuse it, as it always did
        return None
    dataset = Dataset(elements)
    dataset.set_original_encoding(implicit, little, encoding)
    return dataset


def check_pixel_data(header: Dataset, shape: DataSetShape, transfer_syntax: str) -> None:
    """PS3.5 8.1.1 / PS3.3 C.7.6.3: native (uncompressed) Pixel Data holds Rows × Columns ×
    Samples per Pixel × Bits Allocated bits per frame, for Number of Frames frames.

    pydicom and the blob store take a shorter value as it is; a viewer then shows a
    partial or empty image as if it were the study. Encapsulated pixel data (compressed
    syntaxes, PS3.5 A.4) has no fixed length and is checked by the walk only.
    """
    rows, columns = header_int(header, "Rows"), header_int(header, "Columns")
    if rows and columns and not shape.has_pixel_data:
        # An image pixel module without its pixels: a file cut off at an element boundary.
        raise InvalidInstance(FailureReason.DATASET_MISMATCH, "pixel_data_length",
                              f"Rows {rows} and Columns {columns} but no Pixel Data (PS3.3 C.7.6.3)", ["PixelData"])
    length = shape.pixel_data_length
    if length is None or UID(transfer_syntax).is_compressed:
        return
    bits = header_int(header, "BitsAllocated")
    samples = header_int(header, "SamplesPerPixel") or 1
    frames = header_int(header, "NumberOfFrames") or 1
    if not rows or not columns or not bits or rows < 0 or columns < 0 or bits < 0 or samples < 0 or frames < 0:
        raise InvalidInstance(FailureReason.DATASET_MISMATCH, "pixel_data_length",
                              f"Pixel Data of {length} bytes without Rows, Columns and Bits Allocated "
                              "(PS3.3 C.7.6.3)", ["PixelData"])
    if header_text(header, "PhotometricInterpretation") == "YBR_FULL_422":
        samples = 2  # PS3.3 C.7.6.3.1.2: two chrominance samples shared by each pair of pixels
    needed = (rows * columns * samples * bits * frames + 7) // 8
    if length < needed:
        raise InvalidInstance(FailureReason.DATASET_MISMATCH, "pixel_data_length",
                              f"Pixel Data holds {length} bytes; {rows} rows x {columns} columns x {samples} "
                              f"samples x {bits} bits x {frames} frames need {needed} (PS3.5 8.1.1)", ["PixelData"])


def instance_metadata(header: Dataset) -> dict[str, Any]:
    """The optional ``InstanceReceived`` fields read from the header."""
    texts = {
        "modality": "Modality", "body_part_examined": "BodyPartExamined", "accession_number": "AccessionNumber",
        "patient_id": "PatientID", "patient_name": "PatientName", "patient_birth_date": "PatientBirthDate",
        "patient_sex": "PatientSex", "study_date": "StudyDate", "study_time": "StudyTime",
        "study_description": "StudyDescription", "series_description": "SeriesDescription",
        "institution_name": "InstitutionName", "referring_physician": "ReferringPhysicianName",
        "burned_in_annotation": "BurnedInAnnotation",
    }
    ints = {
        "series_number": "SeriesNumber", "instance_number": "InstanceNumber", "number_of_frames": "NumberOfFrames",
        "rows": "Rows", "columns": "Columns", "expected_study_instances": "NumberOfStudyRelatedInstances",
    }
    return {**{field: header_text(header, kw) for field, kw in texts.items()},
            **{field: header_int(header, kw) for field, kw in ints.items()}}


def header_text(header: Dataset, keyword: str) -> str | None:
    """A header value as clean text: padding stripped, odd character sets never fatal."""
    raw, _ = _plain(header, keyword, _PLAIN_TEXT_VRS)
    if raw is not None and (not raw.value or _PLAIN_VALUE.fullmatch(raw.value)):
        # what pydicom's conversion gives for such a value, without it (~25 us a value)
        return (raw.value.decode("ascii").strip(" \0") or None) if raw.value else None
    return pydicom_text(header, keyword)


def pydicom_text(header: Dataset, keyword: str) -> str | None:
    """:func:`header_text` the long way, through pydicom's conversion of the value."""
    try:
        value = header.get(keyword)
    except Exception:  # undecodable under its Specific Character Set: keep the raw bytes
        value = _raw_value(header, keyword)
    if value is None:
        return None
    try:
        if isinstance(value, MultiValue):
            text = "\\".join(str(item) for item in value)
        elif isinstance(value, bytes):
            text = value.decode("latin-1", "replace")
        else:
            text = str(value)
    except Exception:
        raw = _raw_value(header, keyword)
        text = raw.decode("latin-1", "replace") if raw is not None else ""
    return text.strip(" \0") or None


def header_int(header: Dataset, keyword: str) -> int | None:
    """A header value as a 32-bit integer; None when absent or malformed."""
    raw, vr = _plain(header, keyword, _PLAIN_INT_VRS)
    if raw is not None:
        if not raw.value:
            return None
        if vr == "US":
            if len(raw.value) == 2:  # one value; pydicom decides what several, or odd bytes, are
                return struct.unpack_from("<H" if raw.is_little_endian else ">H", raw.value)[0]
        elif _PLAIN_VALUE.fullmatch(raw.value):
            try:  # IS: one value; anything int() cannot read takes pydicom's way
                return _in_int32(int(raw.value.decode("ascii").strip(" \0")))
            except ValueError:
                pass
    return pydicom_int(header, keyword)


def pydicom_int(header: Dataset, keyword: str) -> int | None:
    """:func:`header_int` the long way, through pydicom's conversion of the value."""
    try:
        value = header.get(keyword)
        if isinstance(value, MultiValue):
            value = value[0] if value else None
        if value is None or value == "":
            return None
        number = int(value)
    except Exception:  # malformed IS/US values are not worth refusing an instance for
        return None
    return _in_int32(number)


def _in_int32(number: int) -> int | None:
    return number if _INT32[0] <= number <= _INT32[1] else None


#: VRs whose values are ASCII whatever the Specific Character Set (PS3.5 6.1.2.3 applies
#: it only to SH, LO, UC, ST, LT, UT and PN): read straight from the raw bytes.
_PLAIN_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI"})
_PLAIN_INT_VRS = frozenset({"IS", "US"})
#: one value of those VRs in their own repertoire (PS3.5 6.2), padded: anything else
#: (a backslash, a control character, lower case) is left to pydicom to interpret
_PLAIN_VALUE = re.compile(rb"[0-9A-Z._:+\- ]*\0?")


def _plain(header: Dataset, keyword: str, vrs: frozenset[str]) -> tuple[RawDataElement | None, str | None]:
    """The still-unconverted element ``keyword`` of ``header`` and its VR, if that is one of
    ``vrs`` (from the stream, or the dictionary's for implicit VR); else (None, None), and the
    caller asks pydicom. Only for the header helpers, whose answers it does not change."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None, None
    try:
        raw = header.get_item(tag)
    except Exception:
        return None, None
    if not isinstance(raw, RawDataElement) or not (raw.value is None or isinstance(raw.value, bytes)):
        return None, None
    try:
        vr = raw.VR or dictionary_VR(tag)
    except KeyError:
        return None, None
    return (raw, vr) if vr in vrs else (None, None)


def _raw_value(header: Dataset, keyword: str) -> bytes | None:
    try:
        raw = header.get_item(keyword)
    except Exception:
        return None
    value = getattr(raw, "value", None)
    return value if isinstance(value, bytes) else None
