"""DICOMweb messages of the STOW-RS gateway: the request body as it streams in, the answer out.

The request is ``multipart/related; type="application/dicom"`` (PS3.18 10.5.1.1), read
part by part through a :class:`BodyTap` that counts it against ``stow.max_body_bytes``
and keeps the stretch since the current part began, so a malformed one can be
dead-lettered as it was sent. The answer is the Store Instances Response module
(PS3.18 10.5.3, Table 10.5.3-1) in DICOM JSON (PS3.18 F.2) or, when the client asks
for it, the Native DICOM Model XML (PS3.19 A.1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from pydicom.dataset import Dataset

from gateways.validation import FailureReason, InvalidInstance
from schemas.blobs import is_valid_uid

#: Of a request refused as a whole, at most this much of its body is kept for the dead letter.
_KEEP_REQUEST_BYTES = 16 * 1024 * 1024
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"


# ---------------------------------------------------------------- the body, streamed


class BodyTooLarge(Exception):
    """More request body than ``stow.max_body_bytes`` allows (HTTP 413)."""


class BodyFault(Exception):
    """The multipart body cannot be read on from here (malformed, cut short, connection
    gone): a reason key and a text naming the part. What was read before it stands."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason, self.error = reason, error


class StowMultipartReader(MultipartReader):
    """aiohttp's reader without its 70-character boundary limit (RFC 2046 5.1.1): Orthanc's
    DICOMweb plugin 1.7 sends 73-character boundaries, and refusing a real PACS over it helps no one."""

    _MAX_BOUNDARY = 200

    def _get_boundary(self) -> str:
        boundary: str = self._mimetype.parameters["boundary"]
        if len(boundary) > self._MAX_BOUNDARY:
            raise ValueError(f"boundary of {len(boundary)} characters is too long")
        return boundary


class BodyTap:
    """``request.content`` as :class:`MultipartReader` reads it, counting every byte against
    ``max_body_bytes`` and keeping the bytes since the current part began (up to a cap),
    so a malformed stretch can be dead-lettered as it was sent."""

    def __init__(self, content: Any, max_body_bytes: int) -> None:
        self._content = content
        self.max_body_bytes = max_body_bytes
        self.total = 0
        self.recent = bytearray()

    def mark(self) -> None:
        self.recent.clear()

    def _seen(self, data: bytes) -> bytes:
        self.total += len(data)
        if self.total > self.max_body_bytes:
            raise BodyTooLarge(f"request body exceeds the {self.max_body_bytes}-byte limit")
        if len(self.recent) < _KEEP_REQUEST_BYTES:
            self.recent += data[: _KEEP_REQUEST_BYTES - len(self.recent)]
        return data

    async def read(self, n: int = -1) -> bytes:
        return self._seen(await self._content.read(n))

    async def readline(self, *args: Any, **kwargs: Any) -> bytes:
        return self._seen(await self._content.readline(*args, **kwargs))

    async def readany(self) -> bytes:
        return self._seen(await self._content.readany())

    async def readexactly(self, n: int) -> bytes:
        return self._seen(await self._content.readexactly(n))

    def unread_data(self, data: bytes) -> None:
        self.total -= len(data)
        if data and self.recent.endswith(data):
            del self.recent[-len(data):]
        self._content.unread_data(data)

    def at_eof(self) -> bool:
        return self._content.at_eof()

    async def rest(self) -> bytes:
        """What is left of the body, kept up to the cap (the rest is drained)."""
        while chunk := await self._content.read(65536):
            self.total += len(chunk)
            if len(self.recent) < _KEEP_REQUEST_BYTES:
                self.recent += chunk[: _KEEP_REQUEST_BYTES - len(self.recent)]
            if self.total > self.max_body_bytes:
                break
        return bytes(self.recent)


async def read_part(part: BodyPartReader, limit: int) -> tuple[bytes, InvalidInstance | None]:
    """A part's bytes, or its first ``limit`` bytes and the failure it earns."""
    failure = None
    part_type = parse_mimetype(part.headers.get(hdrs.CONTENT_TYPE, "application/dicom"))
    if (part_type.type, part_type.subtype) != ("application", "dicom"):
        failure = InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "unsupported_part_type",
                                  f"part Content-Type {part.headers.get(hdrs.CONTENT_TYPE)!r} "
                                  "is not application/dicom")
    chunks, size = [], 0
    while chunk := await part.read_chunk(1024 * 1024):
        if size < limit:
            chunks.append(chunk[: limit - size])
        size += len(chunk)
    data = b"".join(chunks)
    if size > limit:
        failure = InvalidInstance(FailureReason.OUT_OF_RESOURCES, "part_too_large",
                                  f"part of {size} bytes exceeds the {limit}-byte limit per instance")
    return data, failure


# ---------------------------------------------------------------- the answer


@dataclass
class PartOutcome:
    """One instance's answer: an item of ReferencedSOPSequence, or (refused) of FailedSOPSequence."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    refusal: InvalidInstance | None = None


def store_instances_response(stored: Sequence[PartOutcome], failed: Sequence[PartOutcome], base: str) -> Dataset:
    """The Store Instances Response module (PS3.18 10.5.3) of a request to ``base`` (``.../dicomweb``)."""
    response = Dataset()
    studies = {o.study_uid for o in stored}
    if len(studies) == 1:
        response.RetrieveURL = f"{base}/studies/{studies.pop()}"
    if failed:
        response.FailedSOPSequence = [_item(o, base) for o in failed]
    response.ReferencedSOPSequence = [_item(o, base) for o in stored]
    return response


def _item(outcome: PartOutcome, base: str) -> Dataset:
    """An item of ReferencedSOPSequence / FailedSOPSequence (PS3.18 Table 10.5.3-1)."""
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid if is_valid_uid(outcome.sop_class_uid) else ""
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid if is_valid_uid(outcome.sop_instance_uid) else ""
    if outcome.refusal is not None:
        item.FailureReason = int(outcome.refusal.code)
    elif outcome.study_uid:
        item.RetrieveURL = f"{base}/studies/{outcome.study_uid}/instances/{outcome.sop_instance_uid}"
    return item


def wants_xml(accept: str) -> bool:
    """PS3.18 8.7.3: JSON unless the client accepts XML and not JSON."""
    kinds = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return DICOM_XML in kinds and DICOM_JSON not in kinds


def dataset_response(dataset: Dataset, status: int, xml: bool, headers: dict[str, str]) -> web.Response:
    # The bare media type, no charset parameter: DICOMweb clients compare it exactly.
    if xml:
        return web.Response(body=to_native_xml(dataset).encode(), status=status,
                            headers={**headers, "Content-Type": DICOM_XML})
    return web.Response(body=json.dumps(dataset.to_json_dict()).encode(), status=status,
                        headers={**headers, "Content-Type": DICOM_JSON})


def to_native_xml(dataset: Dataset) -> str:
    """The data set in the Native DICOM Model (PS3.19 A.1), enough for a Store Instances Response."""

    def attributes(ds: Dataset) -> list[str]:
        out = []
        for element in ds:
            tag = f"{element.tag.group:04X}{element.tag.element:04X}"
            open_ = f'<DicomAttribute tag="{tag}" vr="{element.VR}" keyword="{element.keyword}">'
            if element.VR == "SQ":
                items = "".join(f'<Item number="{n}">{"".join(attributes(i))}</Item>'
                                for n, i in enumerate(element.value, start=1))
                out.append(f"{open_}{items}</DicomAttribute>")
            else:
                values = element.value if isinstance(element.value, list) else [element.value]
                body = "".join(f'<Value number="{n}">{xml_escape(str(v))}</Value>'
                               for n, v in enumerate(values, start=1) if v not in (None, ""))
                out.append(f"{open_}{body}</DicomAttribute>")
        return out

    return ('<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/'
            f'NativeDICOM">{"".join(attributes(dataset))}</NativeDicomModel>')
