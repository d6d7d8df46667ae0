"""HL7 v2 messages: the orders and patient updates in them, and the acknowledgments we answer.

Over 400 lines: the HL7 v2.5 fields radstream reads, each with its data-type and table check, beside the ACK.

A message (HL7 v2.5 chapter 2) is read in the order its answer depends on: the MSH
from the raw bytes (:func:`read_header`, so even undecodable text gets an ACK naming
its control id), then MSH-9/11/12 (:func:`check_header`), the text in the character
set MSH-18 declares (:func:`decode_text`) and the segments. An ORM^O01 becomes one
``OrderReceived`` per ORC/OBR order group (:func:`orders_of`), an ADT message one
``PatientUpdated`` (:func:`patient_update_of`). A refusal is a :class:`Rejected`
carrying the original-mode acknowledgment (2.9.2) to give: MSA-1 ``AR`` for what the
header makes unprocessable, ``AE`` for content errors, with the table 0357 ERR-3 code
:func:`build_ack` puts in the ACK.

Field choices (HL7 v2.5 chapter 4, IHE RAD Scheduled Workflow): the accession number is
OBR-18 (placer field 1, where IHE SWF puts it), else OBR-3 / ORC-3 (filler order
number); the StudyInstanceUID is ZDS-1 when the RIS sends one; priority is TQ1-9, else
OBR-27 / ORC-7 component 6; the reason for exam is OBR-31 (text, else code), else OBR-13;
the ordering provider OBR-16, else ORC-12. The source site is MSH-4 (sending facility,
else MSH-3), mapped by ``hl7.site_map``; the patient state for licensure is the site's
state from ``hl7.site_states``, else PID-11 component 4. The patient is PID-3 (id),
PID-5 (name), PID-7 (birth date), PID-8 (sex), located by PV1-3.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hl7

from schemas.blobs import is_valid_uid
from schemas.events import OrderReceived, PatientUpdated, trace_id_for, utcnow
from schemas.settings import Settings

#: ORC-1 order control codes (HL7 table 0119) this gateway understands.
ORDER_CONTROLS = frozenset({"NW", "CA", "DC", "OC", "XO", "SC", "SN", "NA", "OK", "CR"})
#: MSH-18 character sets (HL7 table 0211) and their Python codecs; empty: UTF-8.
CHARSETS = {"": "utf-8", "UNICODE UTF-8": "utf-8", "ASCII": "ascii", "8859/1": "latin-1", "8859/15": "iso8859-15"}
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_MAX_ACCESSION = 64
#: Segments that open a message or a batch (HL7 v2.5 2.10.3): one may only come first in a block.
_MESSAGE_STARTS = frozenset({"MSH", "BHS", "FHS"})
#: PID-8 administrative sex (HL7 v2.5 table 0001).
SEX_CODES = frozenset({"F", "M", "O", "U", "A", "N"})
#: Order priority: TQ1-9 (table 0485) and the TQ component 6 of OBR-27 / ORC-7 (table 0027).
PRIORITY_CODES = frozenset({"S", "A", "R", "P", "C", "T", "PRN"})
_PRIORITY_TIMED = re.compile(r"^T[SMHDWL]\d+$")  # table 0485 TS<n>, TM<n>, TH<n>, TD<n>, TW<n>, TL<n>
#: DTM (HL7 v2.5 2.A.22): YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ].
_DTM = re.compile(r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,4})?)?)?)?)?)?([+-]\d{4})?$")
#: DT (HL7 v2.5 2.A.21): YYYY[MM[DD]].
_DT = re.compile(r"^(\d{4})(?:(\d{2})(?:(\d{2}))?)?$")
#: SI (HL7 v2.5 2.A.72): a set id, a non-negative integer of at most 4 digits (an NM without sign or fraction).
_SI = re.compile(r"^\d{1,4}$")


class Ack(str, enum.Enum):
    """MSA-1 acknowledgment codes, original mode (HL7 v2.5 table 0008)."""

    ACCEPT = "AA"
    ERROR = "AE"
    REJECT = "AR"


class ErrorCode(enum.IntEnum):
    """ERR-3 HL7 error codes (HL7 v2.5 table 0357)."""

    SEGMENT_SEQUENCE = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION = 203
    INTERNAL_ERROR = 207


_ERROR_TEXT = {
    ErrorCode.SEGMENT_SEQUENCE: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION: "Unsupported version id",
    ErrorCode.INTERNAL_ERROR: "Application internal error",
}


class Rejected(Exception):
    """A message the gateway refuses: the MSA-1 code, the ERR-3 code, a reason key and text."""

    def __init__(self, ack: Ack, code: ErrorCode, reason: str, error: str, location: str = "") -> None:
        super().__init__(error)
        self.ack, self.code, self.reason, self.error, self.location = ack, code, reason, error, location


# ---------------------------------------------------------------- parsing


@dataclass
class Header:
    """MSH fields, read from the raw bytes before the text is decoded (for the ACK)."""

    field_sep: str = "|"
    encoding: str = "^~\\&"
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = ""  # MSH-9.1^MSH-9.2, e.g. ORM^O01
    control_id: str = ""  # MSH-10
    processing_id: str = ""  # MSH-11
    version: str = ""  # MSH-12
    charset: str = ""  # MSH-18


@dataclass
class Received:
    """What is known about one message so far; failure paths report as much as they can."""

    header: Header = field(default_factory=Header)
    accession_number: str | None = None


def _split_segments(text: str) -> list[str]:
    # HL7 v2.5 2.5.2: segments end with CR; LF and CR LF from hand-made senders are tolerated.
    return [s for s in re.split(r"\r\n|\r|\n", text) if s.strip()]


def read_header(payload: bytes) -> Header:
    """MSH of ``payload``; raises :class:`Rejected` (AR) when there is no usable MSH."""
    # whitespace as segments are split: str's, which is more than bytes' (0x1C-0x1F, 0x85, 0xA0)
    segments = _split_segments(payload.decode("latin-1"))
    if not segments:
        raise Rejected(Ack.REJECT, ErrorCode.SEGMENT_SEQUENCE, "empty_message", "empty HL7 message")
    first = segments[0]
    if not first.startswith("MSH"):
        raise Rejected(Ack.REJECT, ErrorCode.SEGMENT_SEQUENCE, "no_msh",
                       f"message does not start with an MSH segment (starts {first[:12]!r})", "MSH")
    if len(first) < 8:
        raise Rejected(Ack.REJECT, ErrorCode.DATA_TYPE, "bad_encoding_characters",
                       "MSH-1/MSH-2 field separator and encoding characters are missing", "MSH^1^1")
    sep, encoding = first[3], first[4:8]
    chars = sep + encoding
    if len(set(chars)) != 5 or any(c.isalnum() or c.isspace() for c in chars) or first[8:9] not in ("", sep):
        raise Rejected(Ack.REJECT, ErrorCode.DATA_TYPE, "bad_encoding_characters",
                       f"MSH-1/MSH-2 {chars!r} are not five distinct separator characters", "MSH^1^2")
    fields = first.split(sep)  # fields[n] is MSH-(n+1): MSH-1 is the separator itself
    component = encoding[0]

    def msh(n: int) -> str:
        return fields[n - 1].strip() if len(fields) > n - 1 else ""

    kind = msh(9).split(component)
    return Header(
        field_sep=sep, encoding=encoding,
        sending_application=msh(3).split(component)[0], sending_facility=msh(4).split(component)[0],
        message_type="^".join(part.strip().upper() for part in kind[:2]),
        control_id=msh(10), processing_id=msh(11).split(component)[0].upper(),
        version=msh(12).split(component)[0], charset=msh(18).split(encoding[1])[0].upper(),
    )


def check_header(header: Header, settings: Settings) -> None:
    """HL7 v2.5 2.9.2.2: MSH-9, MSH-11 and MSH-12 decide whether the message is processed at all."""
    if not header.control_id:
        raise Rejected(Ack.REJECT, ErrorCode.REQUIRED_FIELD_MISSING, "missing_control_id",
                       "MSH-10 message control id is empty", "MSH^1^10")
    kind, _, event = header.message_type.partition("^")
    accepted = settings.hl7.accepted_types()
    if header.message_type not in accepted:
        known_type = any(t.startswith(kind + "^") for t in accepted) and kind
        code = ErrorCode.UNSUPPORTED_EVENT if known_type else ErrorCode.UNSUPPORTED_MESSAGE_TYPE
        raise Rejected(Ack.REJECT, code, "unsupported_message_type",
                       f"message type {header.message_type or '(empty)'} is not accepted "
                       f"(accepted: {settings.hl7.message_types})", "MSH^1^9")
    if header.processing_id not in ("P", "T", "D"):
        raise Rejected(Ack.REJECT, ErrorCode.UNSUPPORTED_PROCESSING_ID, "unsupported_processing_id",
                       f"MSH-11 processing id {header.processing_id or '(empty)'!r} is not P, T or D", "MSH^1^11")
    if not re.fullmatch(r"2\.[3-9](\.\d+)?", header.version):
        raise Rejected(Ack.REJECT, ErrorCode.UNSUPPORTED_VERSION, "unsupported_version",
                       f"MSH-12 version {header.version or '(empty)'!r} is not HL7 v2.3 to v2.9", "MSH^1^12")


def decode_text(payload: bytes, header: Header) -> str:
    """The message text in the character set MSH-18 declares (HL7 table 0211; none: UTF-8)."""
    codec = CHARSETS.get(header.charset)
    if codec is None:
        raise Rejected(Ack.ERROR, ErrorCode.TABLE_VALUE_NOT_FOUND, "unsupported_charset",
                       f"MSH-18 character set {header.charset!r} is not supported "
                       f"(supported: {', '.join(repr(c) for c in CHARSETS if c)})", "MSH^1^18")
    try:
        return payload.decode(codec)
    except UnicodeDecodeError as exc:
        declared = header.charset or "none, so UTF-8"
        raise Rejected(Ack.ERROR, ErrorCode.DATA_TYPE, "bad_charset",
                       f"text is not valid {codec.upper()} at byte {exc.start} (MSH-18: {declared})", "MSH^1^18") from None


class _Segment:
    """Safe access to one parsed segment: ``value(18)`` is OBR-18 component 1, or None."""

    def __init__(self, message: hl7.Message, segment: Any, header: Header) -> None:
        self.id = str(segment[0])
        self._message, self._segment, self._header = message, segment, header

    def raw(self, n: int) -> str:
        try:
            return str(self._segment(n)) if n < len(self._segment) or self.id == "MSH" else ""
        except (IndexError, KeyError):
            return ""

    def components(self, n: int, repetition: int = 0) -> list[str]:
        enc = self._header.encoding
        repetitions = self.raw(n).split(enc[1])
        if repetition >= len(repetitions):
            return []
        parts = repetitions[repetition].split(enc[0])
        return [self._message.unescape(p.split(enc[3])[0]).strip() for p in parts]

    def value(self, n: int, component: int = 1, repetition: int = 0) -> str | None:
        parts = self.components(n, repetition)
        return (parts[component - 1] or None) if len(parts) >= component else None

    def repetitions(self, n: int) -> int:
        return len(self.raw(n).split(self._header.encoding[1])) if self.raw(n) else 0


@dataclass
class OrderGroup:
    orc: _Segment
    obr: _Segment | None = None
    tq1: _Segment | None = None
    zds: _Segment | None = None


def parse_message(text: str, header: Header) -> tuple[hl7.Message, list[_Segment]]:
    segments = _split_segments(text)
    for index, line in enumerate(segments, start=1):
        if not _SEGMENT_ID.match(line[:3]) or line[3:4] not in ("", header.field_sep):
            raise Rejected(Ack.ERROR, ErrorCode.SEGMENT_SEQUENCE, "bad_segment",
                           f"segment {index} does not start with a segment id ({line[:8]!r})", f"{line[:3]}^{index}")
    try:
        message = hl7.parse("\r".join(segments))
    except Exception as exc:  # hl7 raises several types on malformed text
        raise Rejected(Ack.ERROR, ErrorCode.SEGMENT_SEQUENCE, "unparseable", f"HL7 parse error: {exc}") from None
    starts = [index for index, line in enumerate(segments, start=1) if line[:3] in _MESSAGE_STARTS]
    if starts != [1]:
        # HL7 v2.5 C.4.1: an MLLP block carries exactly one message. One ACK for two would
        # file the second under the first's control id and patient.
        raise Rejected(Ack.REJECT, ErrorCode.SEGMENT_SEQUENCE, "several_messages",
                       f"one MLLP block holds {len(starts)} messages (MSH/BHS/FHS at segments "
                       f"{', '.join(map(str, starts))}); send one message per block (HL7 v2.5 C.4.1)",
                       f"{segments[starts[1] - 1][:3]}^{starts[1]}" if len(starts) > 1 else "MSH")
    return message, [_Segment(message, seg, header) for seg in message]


# ---------------------------------------------------------------- data types (HL7 v2.5 2.A)


def _valid_date_time(match: re.Match[str] | None) -> bool:
    if match is None:
        return False
    year, month, day, hour, minute, second, zone = (*match.groups(), None, None, None, None)[:7]
    try:
        datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError:
        return False
    return zone is None or (int(zone[1:3]) <= 14 and int(zone[3:5]) < 60)


def check_date_time(value: str | None, kind: str, what: str, location: str) -> None:
    """``value`` is a valid ``kind`` (``DTM``/``TS`` or ``DT``) naming a real calendar instant."""
    if value is None:
        return
    pattern, form = (_DT, "YYYY[MM[DD]]") if kind == "DT" else (_DTM, "YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]")
    if not _valid_date_time(pattern.match(value)):
        raise Rejected(Ack.ERROR, ErrorCode.DATA_TYPE, "bad_data_type",
                       f"{what} {value[:40]!r} is not a valid {kind} ({form})",
                       location)


def check_coded(value: str | None, table: str, codes: frozenset[str], what: str, location: str,
                also: re.Pattern[str] | None = None) -> None:
    """``value`` (an ID/IS/CWE code) is one of HL7 table ``table``'s ``codes``."""
    if value is None or value.upper() in codes or (also is not None and also.match(value.upper())):
        return
    raise Rejected(Ack.ERROR, ErrorCode.TABLE_VALUE_NOT_FOUND, "bad_table_value",
                   f"{what} {value[:40]!r} is not in HL7 table {table} "
                   f"({', '.join(sorted(codes))})", location)


def check_set_id(value: str | None, segment_id: str, location: str) -> None:
    if value is not None and not _SI.match(value):
        raise Rejected(Ack.ERROR, ErrorCode.DATA_TYPE, "bad_data_type",
                       f"{segment_id}-1 set id {value[:40]!r} is not a valid SI (a number of 1 to 4 digits)",
                       location)


def check_data_types(segments: list[_Segment]) -> None:
    """The data types of the message-level fields radstream reads: MSH-7, PID-1/7/8."""
    msh = segments[0]
    sent_at = msh.value(7)
    if sent_at is None:
        raise Rejected(Ack.ERROR, ErrorCode.REQUIRED_FIELD_MISSING, "missing_field",
                       "MSH-7 date/time of message is empty", "MSH^1^7")
    check_date_time(sent_at, "DTM", "MSH-7 date/time of message", "MSH^1^7")
    for pid in (s for s in segments if s.id == "PID"):
        check_set_id(pid.value(1), "PID", "PID^1^1")
        check_date_time(pid.value(7), "DTM", "PID-7 date/time of birth", "PID^1^7")
        check_coded(pid.value(8), "0001", SEX_CODES, "PID-8 administrative sex", "PID^1^8")


def _required(segments: list[_Segment], segment_id: str) -> _Segment:
    for segment in segments:
        if segment.id == segment_id:
            return segment
    raise Rejected(Ack.ERROR, ErrorCode.SEGMENT_SEQUENCE, "missing_segment",
                   f"required segment {segment_id} is missing", segment_id)


def _order_groups(segments: list[_Segment]) -> list[OrderGroup]:
    """ORM^O01 ORDER groups: ORC, then its OBR (and TQ1, ZDS) (HL7 v2.5 4.4.1)."""
    groups: list[OrderGroup] = []
    for segment in segments:
        if segment.id == "ORC":
            groups.append(OrderGroup(orc=segment))
        elif segment.id in ("OBR", "TQ1", "ZDS"):
            if not groups:
                raise Rejected(Ack.ERROR, ErrorCode.SEGMENT_SEQUENCE, "missing_segment",
                               f"{segment.id} before any ORC segment (ORM^O01 requires ORC first)", "ORC")
            group = groups[-1]
            if segment.id == "TQ1":  # TIMING repeats (4.4.1); the first carries the order's priority
                group.tq1 = group.tq1 or segment
                continue
            if getattr(group, segment.id.lower()) is not None:
                # An ORM^O01 ORDER group has one ORC and at most one OBR: a second OBR (or ZDS)
                # would silently replace the first and one order of two would be lost.
                raise Rejected(Ack.ERROR, ErrorCode.SEGMENT_SEQUENCE, "segment_sequence",
                               f"order {len(groups)} has a second {segment.id} segment: one {segment.id} per ORC "
                               "(ORM^O01 ORDER group, HL7 v2.5 4.4.1)", f"{segment.id}^{len(groups)}")
            setattr(group, segment.id.lower(), segment)
    if not groups:
        raise Rejected(Ack.ERROR, ErrorCode.SEGMENT_SEQUENCE, "missing_segment", "required segment ORC is missing", "ORC")
    for index, group in enumerate(groups, start=1):
        if group.obr is None:
            raise Rejected(Ack.ERROR, ErrorCode.SEGMENT_SEQUENCE, "missing_segment",
                           f"required segment OBR is missing in order {index}", f"OBR^{index}")
    return groups


def _person(parts: list[str]) -> str | None:
    """XCN/XPN as a DICOM-style person name FAMILY^GIVEN (the id when there is no name)."""
    name = "^".join(p for p in parts[:2] if p)
    return name or None


def _located(segment: _Segment, n: int) -> str | None:
    parts = segment.components(n)
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts) or None


def _patient(pid: _Segment) -> dict[str, str | None]:
    birth = pid.value(7)
    return {
        "patient_id": pid.value(3),
        "patient_name": _person(pid.components(5)),
        "patient_birth_date": birth[:8] if birth else None,
        "patient_sex": pid.value(8),
    }


def _source_site(header: Header, settings: Settings) -> str:
    return settings.hl7.site_for(header.sending_facility or header.sending_application or "UNKNOWN")


def orders_of(header: Header, segments: list[_Segment], settings: Settings, received: Received) -> list[OrderReceived]:
    """The ``OrderReceived`` events of a parsed ORM^O01 (one per order group), validated."""
    pid = _required(segments, "PID")
    pv1 = next((s for s in segments if s.id == "PV1"), None)
    site = _source_site(header, settings)
    state = settings.hl7.state_for(site) or pid.value(11, 4)
    events = []
    for index, group in enumerate(_order_groups(segments), start=1):
        obr, orc = group.obr, group.orc
        assert obr is not None
        control = (orc.value(1) or "").upper()
        if control not in ORDER_CONTROLS:
            raise Rejected(Ack.ERROR, ErrorCode.TABLE_VALUE_NOT_FOUND, "bad_order_control",
                           f"ORC-1 order control {control or '(empty)'!r} is not an HL7 table 0119 code "
                           f"this gateway handles", f"ORC^{index}^1")
        accession = obr.value(18) or obr.value(3) or orc.value(3)
        if not accession:
            raise Rejected(Ack.ERROR, ErrorCode.REQUIRED_FIELD_MISSING, "missing_accession",
                           f"order {index} has no accession number (OBR-18, OBR-3 and ORC-3 are empty)",
                           f"OBR^{index}^18")
        if len(accession) > _MAX_ACCESSION or any(ord(c) < 0x20 for c in accession):
            raise Rejected(Ack.ERROR, ErrorCode.DATA_TYPE, "bad_accession",
                           f"accession number {accession[:20]!r} is longer than {_MAX_ACCESSION} characters "
                           "or holds control characters", f"OBR^{index}^18")
        received.accession_number = received.accession_number or accession
        check_set_id(obr.value(1), "OBR", f"OBR^{index}^1")
        study_uid = group.zds.value(1) if group.zds is not None else None
        if study_uid is not None and not is_valid_uid(study_uid):
            raise Rejected(Ack.ERROR, ErrorCode.DATA_TYPE, "bad_study_uid",
                           f"ZDS-1 study instance UID {study_uid[:64]!r} is not a valid DICOM UID (PS3.5 9.1)",
                           f"ZDS^{index}^1")
        priority = (group.tq1.value(9) if group.tq1 is not None else None) or obr.value(27, 6) or orc.value(7, 6)
        check_coded(priority, "0485", PRIORITY_CODES, f"order {index} priority (TQ1-9 / OBR-27.6 / ORC-7.6)",
                    f"OBR^{index}^27", also=_PRIORITY_TIMED)
        reasons = [(obr.value(31, 2, r) or obr.value(31, 1, r)) for r in range(obr.repetitions(31))]
        reason_for_exam = "; ".join(r for r in reasons if r) or obr.value(13)
        events.append(OrderReceived(
            trace_id=trace_id_for(study_uid) if study_uid else trace_id_for(f"order:{site}:{accession}"),
            accession_number=accession, message_type=header.message_type, control_id=header.control_id,
            source_site=site, received_at=utcnow(), order_control=control, study_uid=study_uid,
            priority=priority.upper() if priority else None,
            ordering_provider=_person(obr.components(16)[1:]) or _person(orc.components(12)[1:])
            or obr.value(16) or orc.value(12),
            reason_for_exam=reason_for_exam,
            procedure_code=obr.value(4, 1), procedure_description=obr.value(4, 2),
            patient_location=_located(pv1, 3) if pv1 is not None else None,
            patient_state=state, **_patient(pid),
        ))
    return events


def patient_update_of(header: Header, segments: list[_Segment], settings: Settings) -> PatientUpdated:
    """The ``PatientUpdated`` of an ADT message (A01/A04/A05/A08/A31): PID and PV1, validated."""
    pid = _required(segments, "PID")
    pv1 = next((s for s in segments if s.id == "PV1"), None)
    site = _source_site(header, settings)
    patient = _patient(pid)
    if not patient["patient_id"]:
        raise Rejected(Ack.ERROR, ErrorCode.REQUIRED_FIELD_MISSING, "missing_patient_id",
                       "PID-3 patient identifier is empty", "PID^1^3")
    return PatientUpdated(
        trace_id=trace_id_for(f"patient:{site}:{patient['patient_id']}"),
        message_type=header.message_type, control_id=header.control_id, source_site=site, received_at=utcnow(),
        patient_location=_located(pv1, 3) if pv1 is not None else None,
        patient_state=settings.hl7.state_for(site) or pid.value(11, 4), **patient,
    )


def events_of(payload: bytes, settings: Settings, received: Received) -> list[OrderReceived | PatientUpdated]:
    """Validate and parse one HL7 message; raises :class:`Rejected` with the answer to give."""
    received.header = header = read_header(payload)
    check_header(header, settings)
    text = decode_text(payload, header)
    message, segments = parse_message(text, header)
    check_data_types(segments)
    if header.message_type.startswith("ORM^"):
        return orders_of(header, segments, settings, received)
    return [patient_update_of(header, segments, settings)]


# ---------------------------------------------------------------- acknowledgments


def _escape(text: str) -> str:
    """HL7 v2.5 2.7.4 escape sequences for the default delimiters."""
    return (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
            .replace("&", "\\T\\").replace("~", "\\R\\").replace("\r", " ").replace("\n", " "))


def build_ack(header: Header, ack: Ack, text: str = "", code: ErrorCode | None = None, location: str = "",
              now: datetime | None = None) -> bytes:
    """An ACK (HL7 v2.5 2.14.1) to ``header``'s message: MSH, MSA and, for AE/AR, ERR.

    MSA-3 (text message, ST, 80 characters) carries the reason; ERR-3 the table 0357
    code, ERR-4 severity E and ERR-8 (user message) the full reason.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
    event = header.message_type.partition("^")[2]
    msh = "|".join([
        "MSH", "^~\\&", "RADSTREAM", "RADSTREAM", _escape(header.sending_application), _escape(header.sending_facility),
        stamp, "", f"ACK^{_escape(event)}^ACK" if event else "ACK", uuid.uuid4().hex[:20],
        header.processing_id if header.processing_id in ("P", "T", "D") else "P",
        header.version if re.fullmatch(r"2\.[3-9](\.\d+)?", header.version) else "2.5",
    ])
    segments = [msh, "|".join(["MSA", ack.value, _escape(header.control_id), _escape(text[:80])])]
    if ack is not Ack.ACCEPT and code is not None:
        segments.append("|".join(["ERR", "", _escape(location).replace("\\S\\", "^"),
                                  f"{int(code)}^{_ERROR_TEXT[code]}^HL70357", "E", "", "", "", _escape(text[:250])]))
    return "\r".join(segments).encode("utf-8") + b"\r"

