"""One DICOM instance in, one de-identified instance out (DICOM PS3.15 Annex E).

About 670 lines; why, in the last paragraph below.

Works on the encoded dataset as pydicom reads it: elements stay raw (undecoded bytes)
unless an action needs their value, so Pixel Data, and every attribute the profile
keeps, is written back byte for byte. For each attribute the action comes from the
Annex E table (:mod:`schemas.deid`), with the site's options applied on top:

* the table's action, options first (an enabled option column's K or C replaces the
  basic action); combined codes (X/Z, X/D, X/Z/D, Z/D) by the attribute's Type in the
  instance's IOD (:mod:`deid.iod`), the strictest (:func:`schemas.deid.strictest`) when
  the IOD is unknown;
* attributes the table does not list are kept, except: private attributes (removed
  unless on the site's safe-list, PS3.15 E.3.10), person names (PN, dummy), UIDs (UI,
  remapped unless a standard UID such as a SOP class), group lengths (removed);
* sequences are walked: the profile applies to attributes nested at any depth.

The result carries PatientIdentityRemoved (0012,0062) = YES, De-identification Method
(0012,0063), the De-identification Method Code Sequence (0012,0064: DCM 113100 and the
option codes) and Longitudinal Temporal Information Modified (0028,0303).

Instances that may carry burned-in PHI in their pixels are never de-identified here:
:func:`deidentify_instance` raises :class:`Quarantined` with the reason (PS3.15 E.3.1 —
cleaning pixel data is not something this stage claims to do).

Over 400 lines because the Annex E walk, the header-only read that keeps Pixel Data as the
bytes received, and the writer that copies untouched elements byte for byte are one hot path
over pydicom's raw elements: split, each half would reach into the other's positions. The
profile and option tables live in :mod:`schemas.deid`, the IOD types in :mod:`deid.iod`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import timedelta
from functools import cache

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from deid.iod import COMBINED, UNKNOWN, IodTypes, types_for
from schemas.deid import (
    DESCRIPTOR_PATTERNS,
    INSTITUTION_IDENTITY,
    NOT_FREE_TEXT,
    NUMBER_AFTER_WORD,
    NUMBERED_WORDS,
    OPTION_COLUMNS,
    load_annex_e,
    strictest,
)
from schemas.blobs import pixel_sample_bytes
from schemas.deid.keys import DeidKeys, shift_date
from schemas.deid.policy import OPTIONS, SitePolicy

DEID_METHOD = "radstream PS3.15 Annex E basic profile"

_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_ISSUER_OF_PATIENT_ID = 0x00100021
_STRING_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
_NUMBER_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"})
_BYTES_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_DUMMY = {"AE": "ANON", "AS": "000Y", "CS": "ANON", "DA": "19000101", "DS": "0", "DT": "19000101000000",
          "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "PN": "ANONYMIZED", "SH": "ANONYMIZED",
          "ST": "ANONYMIZED", "TM": "000000", "UC": "ANONYMIZED", "UR": "", "UT": "ANONYMIZED"}
#: meta attributes that name the sender (PS3.10 7.1): removed
_META_REMOVE = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)
#: punctuation stripped from the edges of a descriptor word before it is looked up
_EDGE_PUNCTUATION = ".,;:!?()[]{}\"'"


class Quarantined(Exception):
    """The instance may show PHI in its pixels (burned-in annotation); it must not pass."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotDicom(ValueError):
    """The blob is not a DICOM dataset pydicom can read."""


@dataclass(frozen=True)
class DeidentifiedInstance:
    data: bytes
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_pseudonym: str
    instance_number: int | None = None
    series_number: int | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    patient_age: str | None = None
    patient_sex: str | None = None
    #: the blob store's compression hint (:func:`schemas.blobs.pixel_sample_bytes`)
    sample_bytes: int = 1
    study_date: str | None = None  # shifted (DA), as written; priors compare intervals of these
    study_time: str | None = None
    #: how far this patient's dates moved (whole days, negative); times the stage puts on
    #: de-identified events move with them, so they do not reveal the shift
    date_shift: timedelta = timedelta(0)


@dataclass(frozen=True)
class _Plan:
    """The resolved action of every listed attribute under one site policy."""

    actions: dict[int, str]  # combined codes as their strictest action (what an unknown IOD gets)
    policy: SitePolicy
    shift_dates: bool
    combined: dict[int, str]  # tag -> X/Z, X/D, X/Z/D or Z/D, left for the IOD to resolve (deid.iod)

    def action(self, tag: int, path: tuple[int, ...] = (), vr: str = "", types: IodTypes = UNKNOWN) -> str | None:
        """The action at ``path`` (enclosing sequence tags) of an instance with ``types`` (:func:`types_for`)."""
        if (code := self.combined.get(tag)) is not None:
            return types.action(code, (*path, tag), vr)
        found = self.actions.get(tag)
        if found is None:
            group = tag >> 16
            if group & 0xFF00 == 0x5000:
                return "X"  # curve data (50xx,xxxx), retired: removed
            if group & 0xFF00 == 0x6000 and tag & 0xFFFF in (0x3000, 0x4000):
                return "X"  # overlay data and comments
        return found


@cache
def plan_for(policy: SitePolicy) -> _Plan:
    columns = {OPTIONS[name][0] for name in policy.options} - {""}
    assert columns <= set(OPTION_COLUMNS)
    actions: dict[int, str] = {}
    combined: dict[int, str] = {}
    for entry in load_annex_e():
        if entry.repeating:
            continue
        action = entry.basic
        for column in OPTION_COLUMNS:  # options relax the basic action only where their column says so
            if column in columns and entry.options[column]:
                action = entry.options[column]
        if entry.tag in NOT_FREE_TEXT and action != "K":
            action = NOT_FREE_TEXT[entry.tag]  # neither cleaned word by word nor given a made-up value
        elif action == "C" and entry.vr in _BYTES_VRS:
            action = entry.basic  # a binary value has no words to keep: the basic action
        if policy.retains_institution and entry.tag in INSTITUTION_IDENTITY:
            action = "K"
        group, element = entry.tag.split(",")
        tag = int(group, 16) << 16 | int(element, 16)
        if action in COMBINED:
            combined[tag] = action
        actions[tag] = strictest(action)
    return _Plan(actions, policy, "retain_longitudinal_modified_dates" in policy.options, combined)


def read_dataset(data: bytes) -> Dataset:
    try:
        return dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for garbage
        raise NotDicom(f"not a readable DICOM dataset: {type(exc).__name__}: {exc}") from None


def burned_in_reason(ds: Dataset, policy: SitePolicy) -> str | None:
    """Why this instance must be quarantined for possible burned-in PHI, or None.

    BurnedInAnnotation (0028,0301) = YES always; without the attribute, modalities and
    SOP classes known to carry burned-in text (ultrasound, secondary capture, screen
    captures) too. A site rule (``burned_in_safe``) overrides both.
    """
    modality = str(ds.get("Modality", "") or "").upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if any(rule.matches(modality, sop_class) for rule in policy.burned_in_safe):
        return None
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation (0028,0301) is YES"
    if flag == "NO":
        return None
    if modality in policy.burned_in_modalities:
        return f"modality {modality} often carries burned-in text and BurnedInAnnotation (0028,0301) is absent"
    for prefix in policy.burned_in_sop_classes:
        root = prefix.rstrip(".")
        if sop_class == root or sop_class.startswith(root + "."):
            return f"SOP class {sop_class} often carries burned-in text and BurnedInAnnotation (0028,0301) is absent"
    if "ConversionType" in ds:
        return "ConversionType (0008,0064) marks a secondary capture and BurnedInAnnotation (0028,0301) is absent"
    return None


def deidentify_instance(data: bytes, policy: SitePolicy, keys: DeidKeys) -> DeidentifiedInstance:
    """De-identify one PS3.10 instance; raise :class:`Quarantined` for possible burned-in PHI.

    Only the attributes before Pixel Data are parsed and rewritten; the Pixel Data
    element, header and value, is appended as the very bytes received (byte-identical
    by construction, and never copied into pydicom). Files with anything after Pixel
    Data, or deflated ones, take the slower path of parsing everything.
    """
    ds, pixels = _read_header(data)
    reason = burned_in_reason(ds, policy)
    if reason is not None:
        raise Quarantined(reason)
    if pixels is None:
        return deidentify_dataset(read_dataset(data), policy, keys)
    return deidentify_dataset(ds, policy, keys, memoryview(data)[pixels[0]:pixels[1]], source=data)


_IMPLICIT_LE, _EXPLICIT_BE, _DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR", b"SV", b"UV"})


def _read_header(data: bytes) -> tuple[Dataset, tuple[int, int] | None]:
    """The dataset up to Pixel Data, and where the Pixel Data element starts and ends when
    nothing but Data Set Trailing Padding (FFFC,FFFC) follows it (which is dropped: PS3.10
    7.2 gives it no meaning, and it could hold anything); else None, and the caller parses
    the whole file."""
    fp = io.BytesIO(data)
    try:
        ds = dcmread(fp, force=True, stop_before_pixels=True)
    except Exception as exc:
        raise NotDicom(f"not a readable DICOM dataset: {type(exc).__name__}: {exc}") from None
    offset = fp.tell()
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if offset >= len(data) or syntax == _DEFLATED:
        return ds, None
    big = syntax == _EXPLICIT_BE
    order = "big" if big else "little"
    if data[offset:offset + 4] != (b"\x7f\xe0\x00\x10" if big else b"\xe0\x7f\x10\x00"):
        return ds, None
    if syntax == _IMPLICIT_LE:
        length, position = int.from_bytes(data[offset + 4:offset + 8], order), offset + 8
    elif data[offset + 4:offset + 6] in _LONG_VRS:
        length, position = int.from_bytes(data[offset + 8:offset + 12], order), offset + 12
    else:
        length, position = int.from_bytes(data[offset + 6:offset + 8], order), offset + 8
    if length == 0xFFFFFFFF:  # encapsulated: items until the sequence delimiter (PS3.5 A.4)
        while position + 8 <= len(data):
            item = int.from_bytes(data[position:position + 2], order), int.from_bytes(data[position + 2:position + 4], order)
            size = int.from_bytes(data[position + 4:position + 8], order)
            position += 8
            if item == (0xFFFE, 0xE0DD):
                break
            if item != (0xFFFE, 0xE000):
                return ds, None
            position += size
    else:
        position += length
    padding = b"\xff\xff\xfc\xff" if big else b"\xfc\xff\xfc\xff"
    if position == len(data) or data[position:position + 4] == padding:
        return ds, (offset, position)
    return ds, None


def deidentify_dataset(ds: Dataset, policy: SitePolicy, keys: DeidKeys,
                       pixel_element: memoryview | None = None, source: bytes | None = None) -> DeidentifiedInstance:
    """De-identify a parsed dataset; ``pixel_element`` is the encoded Pixel Data element
    to append unchanged when ``ds`` was read without it; ``source`` the bytes ``ds`` was
    read from (not deflated), whose untouched elements are then copied as they are."""
    plan = plan_for(policy)
    issuer = _text(ds.get(_ISSUER_OF_PATIENT_ID))
    patient_id = _text(ds.get(_PATIENT_ID))
    walk = _Walk(plan, keys, keys.pseudonym(issuer, patient_id), keys.date_shift(issuer, patient_id), types_for(ds))
    walk.dataset(ds)
    # Written as elements of known VR, not by keyword: setting a keyword converts the
    # element it replaces first, and these values are ours, valid by construction.
    _put(ds, _PATIENT_NAME, "PN", walk.pseudonym)
    _put(ds, _PATIENT_ID, "LO", walk.pseudonym)
    _put(ds, 0x00120062, "CS", "YES")  # Patient Identity Removed
    _put(ds, 0x00120063, "LO", DEID_METHOD)  # De-identification Method
    _put(ds, 0x00120064, "SQ", Sequence(_codes(tuple(policy.codes))))
    _put(ds, 0x00280303, "CS", "MODIFIED" if plan.shift_dates else "REMOVED")  # Longitudinal Temporal ...
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for tag in _META_REMOVE:
            if tag in meta:
                del meta[tag]
        if (sop_instance_uid := ds.get_item(_SOP_INSTANCE_UID)) is not None:
            _put(meta, 0x00020003, "UI", _raw_text(ds, _SOP_INSTANCE_UID) or sop_instance_uid.value)
        # PS3.10 7.1: the implementation that wrote this file is us, not the sender's
        _put(meta, 0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID)
        _put(meta, 0x00020013, "SH", "RADSTREAM_DEID")
    if source is not None:
        header = _encode(ds, source)
    else:
        out = io.BytesIO()
        dcmwrite(out, ds)
        header = out.getvalue()
    encoded = header if pixel_element is None else b"".join((header, pixel_element))
    number = _raw_text(ds, 0x00200013)  # Instance Number
    series_number = _raw_text(ds, 0x00200011)  # Series Number
    return DeidentifiedInstance(
        data=encoded, study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=_raw_text(ds, 0x00080016) or "",
        transfer_syntax_uid=str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else "",
        patient_pseudonym=walk.pseudonym,
        instance_number=_integer(number), series_number=_integer(series_number),
        modality=_raw_text(ds, 0x00080060), body_part_examined=_raw_text(ds, 0x00180015),
        series_description=_raw_text(ds, 0x0008103E), study_description=_raw_text(ds, 0x00081030),
        patient_age=_raw_text(ds, 0x00101010), patient_sex=_raw_text(ds, 0x00100040),
        study_date=_raw_text(ds, 0x00080020), study_time=_raw_text(ds, 0x00080030), date_shift=walk.shift,
        sample_bytes=pixel_sample_bytes(_bits_allocated(ds), str(meta.TransferSyntaxUID)
                                        if meta is not None and "TransferSyntaxUID" in meta else ""),
    )


def _bits_allocated(ds: Dataset) -> int | None:
    """Bits Allocated (0028,0100), or None when absent or not one readable US value."""
    try:
        value = ds.get(0x00280100)
        return value.value if value is not None and isinstance(value.value, int) else None
    except Exception:  # a malformed value is only a compression hint lost
        return None


_SOP_INSTANCE_UID = 0x00080018


def _put(ds: Dataset, tag: int, vr: str, value) -> None:
    """Set an element whose value radstream made (a pseudonym, a code, a UID): not re-validated."""
    ds[tag] = DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)


def _raw_text(ds: Dataset, tag: int) -> str | None:
    """An element's first value as stripped text (None when absent or empty), read from its
    raw bytes when they are plain ASCII (no character set can change them), else through pydicom."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if (values := _ascii_values(elem)) is not None:
        return values[0] if values and values[0] else None
    value = ds[tag].value
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    return _text(value)


def _raw_values(ds: Dataset, tag: int, vr: str) -> list[str] | None:
    """The values of a still-raw, plain-ASCII element read as ``vr`` (multi-valued: split at
    backslashes, each stripped of padding), as pydicom would convert them; None when the
    element is not raw, not ASCII, or was read with another VR (then pydicom converts it)."""
    elem = ds.get_item(tag)
    if elem is None or elem.VR not in (vr, None) or (elem.VR is None and _dictionary_vr(tag) != vr):
        return None
    return _ascii_values(elem)


def _ascii_values(elem) -> list[str] | None:
    """A raw, plain-ASCII element's values split at backslashes and stripped of padding
    (empty: []); None for a converted or non-ASCII element."""
    if not isinstance(elem, RawDataElement) or elem.value is None or not elem.value.isascii():
        return None
    text = elem.value.decode("ascii").strip(" \0")
    return [value.strip(" \0") for value in text.split("\\")] if text else []


def _integer(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


_LONG_VR_NAMES = frozenset(vr.decode() for vr in _LONG_VRS)


def _encode(ds: Dataset, source: bytes) -> bytes:
    """The PS3.10 file of ``ds`` (preamble, meta, dataset up to Pixel Data).

    Elements the de-identification left untouched are still pydicom's raw elements,
    positioned in ``source``: in the same transfer syntax their encoding is the very
    bytes received, so they are copied as a slice. Only replaced, cleaned or new
    elements (and sequences, which may hold either) are encoded by pydicom: most of a
    header is kept, and pydicom's per-element writer was half of the stage's time.
    """
    meta = ds.file_meta
    syntax = str(meta.TransferSyntaxUID)
    out = DicomBytesIO()
    out.is_little_endian = syntax != _EXPLICIT_BE
    out.is_implicit_VR = syntax == _IMPLICIT_LE
    out.write(b"\0" * 128 + b"DICM")
    out.write(_meta_group(meta))
    _write_elements(out, ds, source, ds._character_set, 0)
    return out.getvalue()


def _write_elements(out: DicomBytesIO, ds: Dataset, source: bytes, encodings, base: int | None) -> None:
    """Write ``ds``'s elements; ``base`` is where in ``source`` the positions of its raw
    elements count from (pydicom parses a sequence from its own value, so positions
    inside items are relative to it), None when they are unknown."""
    little, implicit = out.is_little_endian, out.is_implicit_VR
    # ``_dict`` (pydicom's tag -> raw or converted element) read directly: get_item per tag
    # converted each tag again and was a tenth of the stage's time.
    for tag, elem in sorted(ds._dict.items()):
        if isinstance(elem, RawDataElement) and elem.length != 0xFFFFFFFF and elem.VR != "SQ":
            encoded = _raw_slice(source, elem, base, little, implicit)
            if encoded is not None:
                out.write(encoded)
                continue
        elem = ds[tag]
        if elem.VR == "SQ":
            items_base = base + elem.file_tell if base is not None and elem.file_tell is not None else None
            _write_sequence(out, elem, source, encodings, items_base)
            continue
        encoded = _text_element(elem, little, implicit)
        if encoded is None:
            write_data_element(out, elem, encodings)
        else:
            out.write(encoded)


def _raw_slice(source: bytes, elem: RawDataElement, base: int | None, little: bool, implicit: bool) -> bytes | None:
    """The element's bytes as received, found where its position says -- relative to the
    sequence it came from (lazily parsed items) or absolute (eagerly parsed ones) -- and
    only if its own tag and length stand there; None otherwise."""
    if elem.value_tell is None:
        return None
    order = "little" if little else "big"
    tag = (elem.tag >> 16).to_bytes(2, order) + (elem.tag & 0xFFFF).to_bytes(2, order)
    long_header = not implicit and elem.VR in _LONG_VR_NAMES
    head = 8 if implicit or not long_header else 12
    length = elem.length.to_bytes(4 if implicit or long_header else 2, order)
    for start in {base + elem.value_tell if base is not None else None, elem.value_tell} - {None}:
        header = source[start - head:start]
        if len(header) == head and header[:4] == tag and header.endswith(length):
            return source[start - head:start + elem.length]
    return None


def _write_sequence(out: DicomBytesIO, elem: DataElement, source: bytes, encodings, base: int | None) -> None:
    """A sequence and its items with undefined lengths and delimiters (PS3.5 7.5.1-7.5.2),
    so no length has to be computed; every item is written like a dataset."""
    order = "little" if out.is_little_endian else "big"

    def tag_bytes(tag: int) -> bytes:
        return (tag >> 16).to_bytes(2, order) + (tag & 0xFFFF).to_bytes(2, order)

    undefined = b"\xff\xff\xff\xff"
    out.write(tag_bytes(elem.tag) + (undefined if out.is_implicit_VR else b"SQ\0\0" + undefined))
    for item in elem.value or ():
        out.write(tag_bytes(0xFFFEE000) + undefined)
        _write_elements(out, item, source, encodings, base)
        out.write(tag_bytes(0xFFFEE00D) + b"\0\0\0\0")
    out.write(tag_bytes(0xFFFEE0DD) + b"\0\0\0\0")


#: VRs whose value is ASCII text, multiple values joined by backslash (PS3.5 6.2);
#: UI pads with NUL, the others with a space. Not :data:`_TEXT_VRS` (the descriptors
#: Clean Descriptors may clean): reusing that name once made UT attributes lose it.
_ASCII_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI"})


def _text_element(elem: DataElement, little: bool, implicit: bool) -> bytes | None:
    """The encoding of a short text element, or None when pydicom must encode it
    (another VR, a non-ASCII value that needs the character set, or a long value)."""
    if elem.VR not in _ASCII_TEXT_VRS:
        return None
    value = elem.value
    if value is None or value == "":
        text = ""
    elif isinstance(value, str):
        text = value
    elif isinstance(value, MultiValue) and all(isinstance(v, str) for v in value):
        text = "\\".join(value)
    else:
        return None
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\0" if elem.VR == "UI" else b" "
    if len(data) > 0xFFFF:
        return None
    order = "little" if little else "big"
    tag = elem.tag
    head = (tag >> 16).to_bytes(2, order) + (tag & 0xFFFF).to_bytes(2, order)
    if implicit:
        return head + len(data).to_bytes(4, order) + data
    return head + elem.VR.encode() + len(data).to_bytes(2, order) + data


def _meta_group(meta) -> bytes:
    """File Meta Information (PS3.10 7.1): always explicit VR little endian, its group
    length recomputed."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    for tag in sorted(meta.keys()):
        if tag != 0x00020000:
            elem = meta[tag]
            encoded = _text_element(elem, True, False)
            if encoded is None:
                write_data_element(body, elem)
            else:
                body.write(encoded)
    data = body.getvalue()
    return b"\x02\x00\x00\x00UL\x04\x00" + len(data).to_bytes(4, "little") + data


def _text(value) -> str | None:
    if value is None or value == "":
        return None
    return str(value).strip() or None


@cache
def _codes(codes: tuple[tuple[str, str], ...]) -> tuple[Dataset, ...]:
    """The items of the De-identification Method Code Sequence: made once per set of codes
    (the same for every instance of a site) and never changed, so instances share them."""
    return tuple(_code(value, meaning) for value, meaning in codes)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    _put(item, 0x00080100, "SH", value)  # Code Value
    _put(item, 0x00080102, "SH", "DCM")  # Coding Scheme Designator
    _put(item, 0x00080104, "LO", meaning)  # Code Meaning
    return item


def _dictionary_vr(tag: int) -> str:
    entry = DicomDictionary.get(tag)
    return entry[0] if entry else "UN"


def clean_descriptor(text: str, terms: frozenset[str]) -> str:
    """Clean Descriptors (PS3.15 E.3.5): the words of ``text`` that are vocabulary
    (``terms``) or match an allowed pattern (:data:`schemas.deid.DESCRIPTOR_PATTERNS`,
    :data:`schemas.deid.NUMBERED_WORDS`), in order; every other word is dropped whole."""
    kept: list[str] = []
    previous = ""
    for raw in text.split():
        stripped = raw.strip(_EDGE_PUNCTUATION)
        word = stripped.upper()
        if word in terms or any(pattern.match(word) for _, pattern in DESCRIPTOR_PATTERNS) or (
                previous in NUMBERED_WORDS and NUMBER_AFTER_WORD.match(word)):
            kept.append(stripped)
        previous = word
    return " ".join(kept)


class _Walk:
    """Applies a plan to a dataset and, recursively, to every sequence item in it."""

    def __init__(self, plan: _Plan, keys: DeidKeys, pseudonym: str, shift: timedelta, types: IodTypes) -> None:
        self.plan, self.keys, self.pseudonym, self.shift, self.types = plan, keys, pseudonym, shift, types
        self.keep_uids = plan.policy.keep_uid_prefixes

    def dataset(self, ds: Dataset, path: tuple[int, ...] = ()) -> None:
        # A snapshot of pydicom's tag -> element dict: each action changes only its own tag
        # (and the items of its own sequence), so every element is still current when reached.
        for tag, raw in list(ds._dict.items()):
            tag = int(tag)
            group = tag >> 16
            if group & 1:
                if not self._safe_private(ds, tag):
                    del ds[tag]
                continue
            if tag & 0xFFFF == 0:  # group length: wrong once anything changes (retired)
                del ds[tag]
                continue
            vr = raw.VR or _dictionary_vr(tag)
            action = self.plan.action(tag, path, vr, self.types)
            if action is None:
                if vr == "SQ":
                    self._items(ds, tag, path)
                elif vr == "UI":
                    self._remap(ds, tag)
                elif vr == "PN":
                    ds[tag] = DataElement(tag, "PN", _DUMMY["PN"])
                continue
            if action == "X":
                del ds[tag]
            elif action == "K":
                if vr == "SQ":
                    self._items(ds, tag, path)
            elif action == "U":
                self._remap(ds, tag, always=True)
            elif action == "Z":
                self._empty(ds, tag, vr)
            elif action == "C":
                self._clean(ds, tag, vr, path)
            else:  # D
                self._dummy(ds, tag, vr)

    def _items(self, ds: Dataset, tag: int, path: tuple[int, ...]) -> None:
        for item in ds[tag].value or ():
            self.dataset(item, (*path, tag))

    def _remap(self, ds: Dataset, tag: int, always: bool = False) -> None:
        values = _raw_values(ds, tag, "UI")
        if values is None:
            element = ds[tag]
            if element.VR != "UI":
                del ds[tag]  # a UID we cannot read as one: remove rather than pass it on
                return
            values = [str(x) for x in (element.value if isinstance(element.value, MultiValue) else [element.value])]
        mapped = [v if not v or (not always and v.startswith(self.keep_uids)) or v.startswith("1.2.840.10008.")
                  else self.keys.uid(v) for v in values]
        if mapped != values:  # else the element stays as received, byte for byte
            _put(ds, tag, "UI", mapped if len(mapped) != 1 else mapped[0])

    def _empty(self, ds: Dataset, tag: int, vr: str) -> None:
        if tag in (_PATIENT_NAME, _PATIENT_ID):
            return  # replaced by the pseudonym afterwards
        if " or " in vr or vr == "AT":
            del ds[tag]
        else:
            ds[tag] = DataElement(tag, vr, [] if vr == "SQ" else None)

    def _dummy(self, ds: Dataset, tag: int, vr: str) -> None:
        if vr == "UI":
            self._remap(ds, tag, always=True)
        elif vr in _DUMMY:
            ds[tag] = DataElement(tag, vr, _DUMMY[vr])
        elif vr in _NUMBER_VRS:
            ds[tag] = DataElement(tag, vr, 0)
        elif vr in _BYTES_VRS or vr == "SQ":
            # binary blobs and sequences: an empty value is the dummy that provably holds nothing
            ds[tag] = DataElement(tag, vr, [] if vr == "SQ" else b"")
        else:
            del ds[tag]

    def _clean(self, ds: Dataset, tag: int, vr: str, path: tuple[int, ...]) -> None:
        if vr == "SQ":
            self._items(ds, tag, path)
        elif vr == "TM":
            pass  # time of day is kept with modified dates; the shift is whole days
        elif vr in ("DA", "DT") and self.plan.shift_dates:
            values = _raw_values(ds, tag, vr)
            if values is None:
                element = ds[tag]
                values = element.value if isinstance(element.value, MultiValue) else [element.value]
            shifted = []
            for value in (str(v) for v in values if v not in (None, "")):
                moved = shift_date(value[:8], self.shift)
                if moved is None:
                    del ds[tag]  # a partial or malformed date cannot be shifted safely
                    return
                shifted.append(moved + value[8:] if vr == "DT" else moved)
            _put(ds, tag, vr, shifted if len(shifted) != 1 else shifted[0])
        elif vr in _TEXT_VRS:
            value = ds[tag].value
            values = value if isinstance(value, MultiValue) else [value]
            cleaned = [self.clean_text(str(v)) for v in values if v not in (None, "")]
            _put(ds, tag, vr, cleaned if len(cleaned) != 1 else cleaned[0])  # words of a valid value
        elif vr in ("DA", "DT"):
            self._empty(ds, tag, vr)
        else:
            # not text (OB maker notes, binary timestamps, ...): no word can be kept from it,
            # and a made-up value of its VR would pass for a real one -- removed
            del ds[tag]

    def clean_text(self, text: str) -> str:
        return clean_descriptor(text, self.plan.policy.descriptor_terms)

    def _safe_private(self, ds: Dataset, tag: int) -> bool:
        safe = self.plan.policy.private_safe
        if not safe:
            return False
        group, element = tag >> 16, tag & 0xFFFF
        if 0x0010 <= element <= 0x00FF:  # a private creator: keep if any safe attribute uses it
            creator = _text(ds[tag].value)
            return any(g == group and c == creator for g, c, _ in safe)
        if element < 0x1000:
            return False
        creator_tag = group << 16 | element >> 8
        if creator_tag not in ds:
            return False
        return (group, _text(ds[creator_tag].value), element & 0xFF) in safe
