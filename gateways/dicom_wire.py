"""Structural completeness of an encoded DICOM data set, checked without decoding it.

pydicom reads a data set leniently: a value cut short by a dropped connection or a
truncated file comes back as a shorter value, and an item or sequence missing its
delimiter ends silently at end of file. A gateway that stores instances as received
must not acknowledge such bytes, so :func:`check_complete` walks the element stream
(PS3.5 7.1 data elements, 7.5 nesting of data sets, A.4 encapsulated pixel data) and
raises :class:`IncompleteDataSet` naming the first element whose declared length runs
past the end, or :class:`DuplicateElement` for a tag a data set holds twice (PS3.5 7.1:
each element once, so two StudyInstanceUIDs cannot be filed under one); it returns the
:class:`DataSetShape` the pixel checks need. It handles implicit and explicit VR Little Endian, Explicit VR Big Endian
(retired) and Deflated Explicit VR Little Endian (PS3.5 A.5); every compressed syntax
is explicit VR Little Endian with encapsulated pixel data. Values are only skipped,
never parsed, so the cost is one pass over the element headers. Asked to, the walk also
keeps where each top-level element before the pixel data lies, from which the gateway
reads the header (:func:`gateways.validation.walked_header`) instead of parsing the data
set a second time with pydicom. :func:`encode_file_meta`
and :func:`encode_c_store_rsp` are the writers here: the PS3.10 file meta a gateway puts
before each data set it stores, and the command set of the response it answers with.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
#: PS3.5 7.1.2: explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_MAX_DEPTH = 32
PIXEL_DATA = 0x7FE00010
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})  # float, double float, pixel data


#: One top-level element as the walk found it: (tag, VR (None when implicit), declared
#: length, offset of its header, of its value, and just after its value, delimiter included).
WalkedElement = tuple[int, "str | None", int, int, int, int]


@dataclass(frozen=True)
class DataSetShape:
    """What the walk learnt: the top-level Pixel Data value length (None: absent or
    encapsulated), and whether any pixel data element (7FE0,0008/0009/0010) is there.

    With ``header=True`` it also keeps where each top-level element before the pixel data
    lies in ``walked`` (the data set's bytes, inflated if they were deflated), read in
    ``implicit`` VR and ``little`` endian, so the header can be read without a second parse
    (:func:`gateways.validation.walked_header`).
    """

    pixel_data_length: int | None = None
    has_pixel_data: bool = False
    header: tuple[WalkedElement, ...] = ()
    walked: bytes = b""
    implicit: bool = False
    little: bool = True


class IncompleteDataSet(ValueError):
    """The bytes end before the data set does."""


class NotADataSet(IncompleteDataSet):
    """Not even the first element of the data set is whole: these bytes are not DICOM."""


class DuplicateElement(ValueError):
    """A data set (or an item of a sequence) holds the same tag twice (PS3.5 7.1)."""


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     implementation_uid: str, implementation_version: str, source_ae: str = "") -> bytes:
    """PS3.10 7.1 File Meta Information, group length first: what pydicom writes for the same
    values (explicit VR little endian, UIDs padded with NUL, text with a space), without
    building a data set for it -- a gateway writes one per instance it receives.

    Raises ``ValueError`` for a value too long for its 2-byte length (a hostile request UID).
    """
    body = b"".join((
        _element(0x0001, b"OB", b"\0\1"),
        _element(0x0002, b"UI", sop_class_uid), _element(0x0003, b"UI", sop_instance_uid),
        _element(0x0010, b"UI", transfer_syntax_uid), _element(0x0012, b"UI", implementation_uid),
        _element(0x0013, b"SH", implementation_version),
        _element(0x0016, b"AE", source_ae) if source_ae else b"",
    ))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _element(element: int, vr: bytes, value: str | bytes) -> bytes:
    """One group 0002 element in explicit VR little endian."""
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
        if len(value) % 2:
            value += b"\0" if vr == b"UI" else b" "
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"(0002,{element:04X}) of {len(value)} bytes does not fit its 2-byte length")
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


#: PS3.7 E.1: a C-STORE-RSP's Command Field, and Command Data Set Type "no data set".
_C_STORE_RSP, _NO_DATA_SET = 0x8001, 0x0101


def encode_c_store_rsp(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """The command set of a C-STORE-RSP without optional status elements (PS3.7 9.3.1.2):
    Implicit VR Little Endian (PS3.7 6.3.1), group length first, UIDs padded with NUL --
    the bytes pynetdicom writes for the same values, without building a data set for them,
    which cost it ~0.8 ms per response here.

    Raises ``ValueError`` for a UID that is not ASCII or is too long, or a number that
    is not an unsigned short.
    """
    def uid(element: int, value: str) -> bytes:
        encoded = value.encode("ascii")
        if len(encoded) > 64:
            raise ValueError(f"(0000,{element:04X}) {value!r} is longer than a UID may be")
        if len(encoded) % 2:
            encoded += b"\0"
        return struct.pack("<HHI", 0x0000, element, len(encoded)) + encoded

    def us(element: int, value: int) -> bytes:
        return struct.pack("<HHIH", 0x0000, element, 2, value)

    if not (0 <= message_id <= 0xFFFF and 0 <= status <= 0xFFFF):
        raise ValueError(f"message ID {message_id} or status {status} is not an unsigned short")
    body = b"".join((
        uid(0x0002, sop_class_uid), us(0x0100, _C_STORE_RSP), us(0x0120, message_id),
        us(0x0800, _NO_DATA_SET), us(0x0900, status), uid(0x1000, sop_instance_uid),
    ))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def data_set_offset(part10: bytes) -> int:
    """Where the data set of a PS3.10 file begins: after the preamble, ``DICM`` and the
    group 0002 file meta elements (always Explicit VR Little Endian, PS3.10 7.1)."""
    offset = 132 if part10[128:132] == b"DICM" else 0
    while offset + 8 <= len(part10) and struct.unpack_from("<H", part10, offset)[0] == 0x0002:
        vr = part10[offset + 4:offset + 6]
        if vr in _LONG_VRS or not _looks_like_vr(vr):
            (length,) = struct.unpack_from("<I", part10, offset + 8)
            offset += 12 + length
        else:
            offset += 8 + struct.unpack_from("<H", part10, offset + 6)[0]
    return min(offset, len(part10))


def check_complete(encoded: bytes, transfer_syntax_uid: str, *, header: bool = False) -> DataSetShape:
    """Raise :class:`IncompleteDataSet` unless ``encoded`` (a data set without file meta,
    in ``transfer_syntax_uid``) holds every element it declares in full, and
    :class:`DuplicateElement` if one of its data sets holds a tag twice. ``header``: keep
    the top-level elements before the pixel data in the shape."""
    transfer_syntax_uid = str(transfer_syntax_uid).strip("\0 ")
    if transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            encoded = inflater.decompress(encoded) + inflater.flush()
        except zlib.error as exc:
            raise IncompleteDataSet(f"the deflated data set cannot be inflated: {exc}") from None
        if not inflater.eof:
            raise IncompleteDataSet("the deflated data set ends before its deflate stream does")
    walker = _Walker(encoded, implicit=transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN,
                     little=transfer_syntax_uid != EXPLICIT_VR_BIG_ENDIAN, header=header)
    try:
        end = walker.elements(0, len(encoded), depth=0, until=None)
    except IncompleteDataSet as exc:
        if walker.top_level_elements == 0:
            raise NotADataSet(f"no DICOM data element could be read: {exc}") from None
        raise
    if end != len(encoded):  # pragma: no cover - elements() consumes to the limit or raises
        raise IncompleteDataSet(f"{len(encoded) - end} trailing bytes after the data set")
    if not header:
        return DataSetShape(walker.pixel_data_length, walker.has_pixel_data)
    return DataSetShape(walker.pixel_data_length, walker.has_pixel_data, tuple(walker.header or ()), encoded,
                        walker.top_implicit, walker.order == "<")


def _looks_like_vr(two: bytes) -> bool:
    return len(two) == 2 and 0x41 <= two[0] <= 0x5A and 0x41 <= two[1] <= 0x5A


class _Walker:
    def __init__(self, data: bytes, *, implicit: bool, little: bool, header: bool = False) -> None:
        self.data = data
        self.implicit = implicit
        self.top_implicit = implicit
        self.order = "<" if little else ">"
        self.top_level_elements = 0
        self.pixel_data_length: int | None = None
        self.has_pixel_data = False
        #: the top-level elements before the first pixel data element, while collecting
        self.header: list[WalkedElement] | None = [] if header else None

    def _need(self, offset: int, count: int, limit: int, what: str) -> None:
        if offset + count > limit:
            raise IncompleteDataSet(f"{what} needs {count} bytes at offset {offset}, "
                                    f"only {max(0, limit - offset)} remain")

    def _tag(self, offset: int) -> int:
        group, element = struct.unpack_from(self.order + "HH", self.data, offset)
        return (group << 16) | element

    def elements(self, offset: int, limit: int, depth: int, until: int | None, implicit: bool | None = None) -> int:
        """Walk elements from ``offset`` to ``limit``, or to the ``until`` delimiter
        (undefined-length item); return the offset after the last byte consumed."""
        implicit = self.implicit if implicit is None else implicit
        if not implicit and offset + 6 <= limit and not _looks_like_vr(self.data[offset + 4:offset + 6]):
            # Declared explicit, encoded implicit: a known sender bug pydicom also reads.
            implicit = True
            if depth == 0:
                self.top_implicit = True
        if depth > _MAX_DEPTH:
            raise IncompleteDataSet(f"sequences nested deeper than {_MAX_DEPTH} levels")
        seen: set[int] = set()
        while offset < limit:
            self._need(offset, 8, limit, "an element header")
            start, tag = offset, self._tag(offset)
            if tag == until:  # (FFFE,E00D) with its zero length
                return offset + 8
            name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            if tag in (ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER):
                raise IncompleteDataSet(f"unexpected delimiter {name} at offset {offset}")
            if tag in seen:
                where = "the data set" if depth == 0 else f"an item at depth {depth}"
                raise DuplicateElement(f"element {name} occurs twice in {where} (PS3.5 7.1), "
                                       f"the second time at offset {offset}")
            seen.add(tag)
            vr = b""
            if implicit or (tag >> 16) == 0xFFFE:
                (length,) = struct.unpack_from(self.order + "I", self.data, offset + 4)
                offset += 8
            else:
                vr = self.data[offset + 4:offset + 6]
                if vr in _LONG_VRS:
                    self._need(offset, 12, limit, f"the header of {name}")
                    (length,) = struct.unpack_from(self.order + "I", self.data, offset + 8)
                    offset += 12
                else:
                    (length,) = struct.unpack_from(self.order + "H", self.data, offset + 6)
                    offset += 8
            value = offset
            if length == UNDEFINED_LENGTH:
                # SQ, encapsulated pixel data (OB/OW), or UN holding implicit VR items.
                inner_implicit = True if vr == b"UN" else implicit
                offset = self.items(offset, limit, depth + 1, name, inner_implicit)
            else:
                self._need(offset, length, limit, f"the value of {name} ({length} bytes)")
                offset += length
                if depth == 0 and tag == PIXEL_DATA:
                    self.pixel_data_length = length
            if depth == 0:
                self.top_level_elements += 1
                if tag in _PIXEL_DATA_TAGS:
                    self.has_pixel_data = True
                elif self.header is not None and not self.has_pixel_data:
                    self.header.append((tag, vr.decode("latin-1") if vr else None, length, start, value, offset))
        if until is not None:
            raise IncompleteDataSet(f"the data ends before an item delimiter at depth {depth}")
        return offset

    def items(self, offset: int, limit: int, depth: int, owner: str, implicit: bool) -> int:
        """Walk the items of an undefined-length value up to its sequence delimiter."""
        while True:
            self._need(offset, 8, limit, f"an item of {owner}")
            tag = self._tag(offset)
            (length,) = struct.unpack_from(self.order + "I", self.data, offset + 4)
            offset += 8
            if tag == SEQUENCE_DELIMITER:
                return offset
            if tag != ITEM:
                raise IncompleteDataSet(f"{owner} holds ({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item belongs")
            if length == UNDEFINED_LENGTH:
                offset = self.elements(offset, limit, depth + 1, until=ITEM_DELIMITER, implicit=implicit)
            else:
                self._need(offset, length, limit, f"an item of {owner} ({length} bytes)")
                offset += length
