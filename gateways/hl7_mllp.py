"""HL7 gateway: an MLLP listener that turns ORM^O01 orders and ADT updates into events.

Sites' RIS send orders (accession number, priority such as STAT, reason for exam,
ordering provider, patient location) and patient updates over HL7 v2 with the Minimal
Lower Layer Protocol (HL7 v2.5 Appendix C.4: ``<VT 0x0B> message <FS 0x1C><CR 0x0D>``).
For every frame the handler checks the framing, decodes the text by MSH-18, parses it
with the ``hl7`` package, publishes one ``OrderReceived`` per ORC/OBR order group (keyed
by accession number) and waits for the broker's ack: only then does the sender get an
ACK with MSA-1 ``AA``. Every refusal answers in the original acknowledgment mode of
HL7 v2.5 section 2.9.2 with an ERR segment (ERR-3 from HL7 table 0357):

* ``AR`` (application reject) for what the message header or transport makes
  unprocessable: bad MLLP framing, no MSH, an unsupported message type, event, version
  or processing id (2.9.2.2), and the broker being unreachable (0357 code 207: the
  sender should retry; nothing was published);
* ``AE`` (application error) for content errors: a required segment or field missing,
  text not valid in the declared character set, an invalid value.

Each refused message is published as a ``DeadLetter`` with its reason and the raw frame
bytes (inline up to 64 KiB, else in the blob store under ``rejected/hl7/{sha256}.hl7``);
when the broker itself is down the refusal is only logged. The listener never dies of
bad input: each frame is answered and the connection resynchronises on the next
``FS CR``.

Field choices (HL7 v2.5 chapter 4, IHE RAD Scheduled Workflow): the accession number is
OBR-18 (placer field 1, where IHE SWF puts it), else OBR-3 / ORC-3 (filler order
number); the StudyInstanceUID is ZDS-1 when the RIS sends one; priority is TQ1-9, else
OBR-27 / ORC-7 component 6; the reason for exam is OBR-31 (text, else code), else OBR-13;
the ordering provider OBR-16, else ORC-12. The source site is MSH-4 (sending facility,
else MSH-3), mapped by ``hl7.site_map``; the patient state for licensure is the site's
state from ``hl7.site_states``, else PID-11 component 4.

Run it with ``python -m gateways.hl7_mllp`` (settings from ``RADSTREAM_*``).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hl7
from prometheus_client import Counter, Histogram, start_http_server

from gateways.publisher import EventPublisher, PublishError
from schemas.blobs import BlobStore, is_valid_uid, sha256_hex
from adapters.blobs import open_blob_store
from schemas.events import OrderReceived, trace_id_for, utcnow
from adapters.process import start_component
from schemas.settings import Settings
from adapters.telemetry import get_logger
from schemas.topics import ORDER_RECEIVED

log = logging.getLogger("radstream.gateways.hl7_mllp")
slog = get_logger("radstream.gateways.hl7_mllp")

STAGE = "hl7-mllp"
START_BLOCK = b"\x0b"  # VT
END_BLOCK = b"\x1c\x0d"  # FS CR
#: Refused frames up to this size ride inline in the dead letter; larger ones go to the blob store.
INLINE_PAYLOAD_MAX = 64 * 1024
#: Of an oversized frame, at most this much is kept for the dead letter.
_KEEP_OVERSIZED = 16 * 1024 * 1024
#: ORC-1 order control codes (HL7 table 0119) this gateway understands.
ORDER_CONTROLS = frozenset({"NW", "CA", "DC", "OC", "XO", "SC", "SN", "NA", "OK", "CR"})
#: MSH-18 character sets (HL7 table 0211) and their Python codecs; empty: UTF-8.
CHARSETS = {"": "utf-8", "UNICODE UTF-8": "utf-8", "ASCII": "ascii", "8859/1": "latin-1", "8859/15": "iso8859-15"}
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_MAX_ACCESSION = 64


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

MESSAGES = Counter("radstream_hl7_messages", "HL7 messages answered by the MLLP gateway, by MSA-1 and reason",
                   ["ack", "reason"])
HANDLE_SECONDS = Histogram(
    "radstream_hl7_handle_seconds", "HL7 message handling time: parse, publish, broker ack",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONNECTIONS = Counter("radstream_hl7_connections", "MLLP connections, by outcome", ["outcome"])


class Rejected(Exception):
    """A message the gateway refuses: the MSA-1 code, the ERR-3 code, a reason key and text."""

    def __init__(self, ack: Ack, code: ErrorCode, reason: str, error: str, location: str = "") -> None:
        super().__init__(error)
        self.ack, self.code, self.reason, self.error, self.location = ack, code, reason, error, location


# ---------------------------------------------------------------- framing (HL7 v2.5 Appendix C.4)


@dataclass(frozen=True)
class Frame:
    """One MLLP block as received: ``raw`` are the bytes on the wire, framing included."""

    raw: bytes
    error: str | None = None  # a framing fault; the frame is then refused with AR
    last: bool = False  # the peer closed its side: answer, then close


async def read_frame(reader: asyncio.StreamReader, max_bytes: int, idle_timeout_s: float) -> Frame | None:
    """The next frame, ``None`` at a clean end of stream.

    Bytes are read up to the next ``FS CR``; a block that does not begin with ``VT``, a
    block cut short by the end of the stream and a block larger than ``max_bytes`` are
    returned with ``error`` set, so the caller answers AR and the stream resynchronises
    on the end block.
    """
    try:
        raw = await asyncio.wait_for(reader.readuntil(END_BLOCK), idle_timeout_s)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        return Frame(exc.partial, "connection closed inside an MLLP block (no FS CR end block)", last=True)
    except asyncio.LimitOverrunError:
        return await _drain_oversized(reader, max_bytes, idle_timeout_s)
    if len(raw) - 3 > max_bytes:
        return Frame(raw, f"MLLP block of {len(raw) - 3} bytes exceeds the {max_bytes}-byte limit")
    if not raw.startswith(START_BLOCK):
        where = raw.find(START_BLOCK)
        what = "no VT (0x0B) start block" if where < 0 else f"{where} bytes before the VT (0x0B) start block"
        return Frame(raw, f"bad MLLP framing: {what}")
    if START_BLOCK in raw[1:]:
        return Frame(raw, "bad MLLP framing: a VT (0x0B) start block inside the message")
    return Frame(raw)


async def _drain_oversized(reader: asyncio.StreamReader, max_bytes: int, idle_timeout_s: float) -> Frame:
    """Read and discard up to the end block of a block too large for the buffer."""
    kept = bytearray()
    total = 0
    while True:
        try:
            chunk = await asyncio.wait_for(reader.readuntil(END_BLOCK), idle_timeout_s)
            done = True
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(max(1, exc.consumed))
            done = False
        except asyncio.IncompleteReadError as exc:
            chunk, done = exc.partial, True
        total += len(chunk)
        if len(kept) < _KEEP_OVERSIZED:
            kept += chunk[: _KEEP_OVERSIZED - len(kept)]
        if done:
            last = not kept.endswith(END_BLOCK)
            return Frame(bytes(kept), f"MLLP block of {total} bytes exceeds the {max_bytes}-byte limit", last=last)


def mllp_wrap(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


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
    """What is known about one frame so far; failure paths report as much as they can."""

    frame: Frame
    header: Header = field(default_factory=Header)
    accession_number: str | None = None


def _split_segments(text: str) -> list[str]:
    # HL7 v2.5 2.5.2: segments end with CR; LF and CR LF from hand-made senders are tolerated.
    return [s for s in re.split(r"\r\n|\r|\n", text) if s.strip()]


def read_header(payload: bytes) -> Header:
    """MSH of ``payload``; raises :class:`Rejected` (AR) when there is no usable MSH."""
    if not payload.strip():
        raise Rejected(Ack.REJECT, ErrorCode.SEGMENT_SEQUENCE, "empty_message", "empty HL7 message")
    first = _split_segments(payload.decode("latin-1"))[0]
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
    return message, [_Segment(message, seg, header) for seg in message]


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
            setattr(groups[-1], segment.id.lower(), segment)
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
        study_uid = group.zds.value(1) if group.zds is not None else None
        if study_uid is not None and not is_valid_uid(study_uid):
            raise Rejected(Ack.ERROR, ErrorCode.DATA_TYPE, "bad_study_uid",
                           f"ZDS-1 study instance UID {study_uid[:64]!r} is not a valid DICOM UID (PS3.5 9.1)",
                           f"ZDS^{index}^1")
        priority = (group.tq1.value(9) if group.tq1 is not None else None) or obr.value(27, 6) or orc.value(7, 6)
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


def patient_update_of(header: Header, segments: list[_Segment], settings: Settings) -> OrderReceived:
    """An ADT message as an ``OrderReceived`` without accession number (patient context only)."""
    pid = _required(segments, "PID")
    pv1 = next((s for s in segments if s.id == "PV1"), None)
    site = _source_site(header, settings)
    patient = _patient(pid)
    if not patient["patient_id"]:
        raise Rejected(Ack.ERROR, ErrorCode.REQUIRED_FIELD_MISSING, "missing_patient_id",
                       "PID-3 patient identifier is empty", "PID^1^3")
    return OrderReceived(
        trace_id=trace_id_for(f"patient:{site}:{patient['patient_id']}"), accession_number="",
        message_type=header.message_type, control_id=header.control_id, source_site=site, received_at=utcnow(),
        patient_location=_located(pv1, 3) if pv1 is not None else None,
        patient_state=settings.hl7.state_for(site) or pid.value(11, 4), **patient,
    )


def events_of(payload: bytes, settings: Settings, received: Received) -> list[OrderReceived]:
    """Validate and parse one HL7 message; raises :class:`Rejected` with the answer to give."""
    received.header = header = read_header(payload)
    check_header(header, settings)
    text = decode_text(payload, header)
    message, segments = parse_message(text, header)
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


# ---------------------------------------------------------------- the handler


class Hl7Handler:
    """Answers one frame at a time: parse, publish, acknowledge. Thread-safe; never raises."""

    def __init__(self, settings: Settings, publisher: EventPublisher,
                 store_factory: Callable[[], BlobStore] | None = None) -> None:
        self.settings = settings
        self.publisher = publisher
        self._store_factory = store_factory or (lambda: open_blob_store(settings))
        self._store: BlobStore | None = None

    def handle(self, frame: Frame) -> bytes:
        """The ACK message (without MLLP framing) for ``frame``."""
        started = time.perf_counter()
        received = Received(frame)
        try:
            if frame.error:
                raise Rejected(Ack.REJECT, ErrorCode.SEGMENT_SEQUENCE, "bad_framing", frame.error)
            events = events_of(frame.raw[1:-2], self.settings, received)
            try:
                for event in events:
                    self.publisher.publish(ORDER_RECEIVED, event)
            except PublishError as exc:
                # The sender keeps the message and retries (AR, 0357 code 207); the broker is
                # the dead-letter channel too, so this refusal is only logged.
                raise Rejected(Ack.REJECT, ErrorCode.INTERNAL_ERROR, "broker_unavailable",
                               f"broker unavailable, retry later: {exc}") from None
            answer = build_ack(received.header, Ack.ACCEPT)
            outcome = (Ack.ACCEPT, "accepted")
            slog.info("accepted HL7 message", message_type=received.header.message_type,
                      control_id=received.header.control_id, accession_number=received.accession_number,
                      orders=len(events), source_site=events[0].source_site if events else None)
        except Rejected as rejection:
            answer, outcome = self._refuse(received, rejection), (rejection.ack, rejection.reason)
        except Exception as exc:  # a bug of ours: answer AR, dead-letter, keep serving
            log.exception("HL7 message %s failed", received.header.control_id or "-")
            rejection = Rejected(Ack.REJECT, ErrorCode.INTERNAL_ERROR, "internal_error", f"{type(exc).__name__}: {exc}")
            answer, outcome = self._refuse(received, rejection), (rejection.ack, rejection.reason)
        MESSAGES.labels(ack=outcome[0].value, reason=outcome[1]).inc()
        HANDLE_SECONDS.observe(time.perf_counter() - started)
        return answer

    def _refuse(self, received: Received, rejection: Rejected) -> bytes:
        broker_down = rejection.reason == "broker_unavailable"
        (slog.error if broker_down else slog.warning)(
            "refused HL7 message", ack=rejection.ack.value, reason=rejection.reason, error=rejection.error,
            control_id=received.header.control_id or None, message_type=received.header.message_type or None,
            bytes=len(received.frame.raw))
        if not broker_down:
            self._dead_letter(received, rejection)
        return build_ack(received.header, rejection.ack, rejection.error, rejection.code, rejection.location)

    def _dead_letter(self, received: Received, rejection: Rejected) -> None:
        raw = received.frame.raw
        payload, payload_uri = (raw, None) if len(raw) <= INLINE_PAYLOAD_MAX else (None, None)
        if payload is None:
            try:
                if self._store is None:
                    self._store = self._store_factory()
                payload_uri = self._store.put(rejected_hl7_key(raw), raw).uri
            except Exception as exc:
                log.error("cannot keep the refused HL7 message (%d bytes, sha256 %s): %s", len(raw), sha256_hex(raw), exc)
        try:
            self.publisher.dead_letter(
                STAGE, rejection.reason, rejection.error,
                key=received.accession_number or received.header.control_id or None,
                payload=payload, payload_uri=payload_uri,
            )
        except Exception as exc:
            log.error("dead letter not published (reason=%s error=%s payload_uri=%s): %s",
                      rejection.reason, rejection.error, payload_uri, exc)


def rejected_hl7_key(raw: bytes) -> str:
    """Blob key of a refused HL7 frame: ``rejected/hl7/{sha256}.hl7`` (same bytes, same key)."""
    return f"rejected/hl7/{hashlib.sha256(raw).hexdigest()}.hl7"


# ---------------------------------------------------------------- the listener


async def serve_connection(handler: Hl7Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One MLLP connection: frames are answered in order, one at a time (HL7 v2.5 C.4.3)."""
    peer = writer.get_extra_info("peername")
    settings = handler.settings
    loop = asyncio.get_running_loop()
    CONNECTIONS.labels(outcome="opened").inc()
    log.info("MLLP connection from %s", peer)
    try:
        while True:
            try:
                frame = await read_frame(reader, settings.hl7.max_message_bytes, settings.hl7.idle_timeout_s)
            except TimeoutError:
                CONNECTIONS.labels(outcome="idle_timeout").inc()
                break
            if frame is None:
                break
            answer = await loop.run_in_executor(None, handler.handle, frame)
            writer.write(mllp_wrap(answer))
            await writer.drain()
            if frame.last:
                break
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        CONNECTIONS.labels(outcome="reset").inc()
        log.info("MLLP connection from %s lost: %s", peer, exc)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def start_listener(settings: Settings, handler: Hl7Handler, port: int | None = None) -> asyncio.Server:
    """Listen on ``settings.bind_host:settings.hl7.port`` (or ``port``)."""
    return await asyncio.start_server(
        lambda r, w: serve_connection(handler, r, w), settings.bind_host,
        settings.hl7.port if port is None else port,
        limit=settings.hl7.max_message_bytes + len(START_BLOCK) + len(END_BLOCK) + 1,
    )


async def _serve(settings: Settings, handler: Hl7Handler) -> None:
    server = await start_listener(settings, handler)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("received %s, shutting down", signal.Signals(s).name),
                                                    stop.set()))
    log.info("HL7 MLLP gateway listening on %s:%d (types %s, broker %s, metrics port %s)", settings.bind_host,
             settings.hl7.port, settings.hl7.message_types, settings.kafka_bootstrap,
             settings.metrics.hl7_gateway_port or "off")
    async with server:
        await stop.wait()
        server.close()
        await server.wait_closed()


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM or SIGINT; flush the publisher on the way out."""
    publisher = EventPublisher(settings, client_id=f"{settings.kafka.client_id}-hl7-mllp")
    if settings.metrics.hl7_gateway_port:
        start_http_server(settings.metrics.hl7_gateway_port, addr=settings.bind_host)
    try:
        asyncio.run(_serve(settings, Hl7Handler(settings, publisher)))
    finally:
        publisher.close()
    log.info("HL7 MLLP gateway stopped")
    return 0


def main() -> int:
    settings = start_component("hl7-gateway", lambda s: [
        (s.hl7.port, "the HL7 MLLP gateway"), (s.metrics.hl7_gateway_port, "the HL7 gateway's metrics")])
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
