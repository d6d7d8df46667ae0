"""Claim-check blob store: instance bytes go here, Kafka events carry only the URI.

Gateways write each received DICOM instance (PS3.10 file format) once, under a key
derived from its UIDs (``{study_uid}/{series_uid}/{sop_instance_uid}.dcm``), and publish
an event holding the blob's URI, size and SHA-256 (the claim-check pattern): pixel data
never rides on a topic. Because the key is a function of the UIDs, a sender that
retries a C-STORE overwrites the same object instead of making a second one. Every
store implements the small :class:`BlobStore` protocol (the stores themselves, local
and S3, are adapters: :mod:`adapters.blobs`). Keys are validated here, before any store
turns them into a path, so no key can escape a store's root.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: PS3.5 9.1: a UID is dot-separated numeric components, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: Characters a key component may hold: enough for UIDs, hex digests and file suffixes.
_KEY_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_MAX_KEY_DEPTH = 8


class BlobError(Exception):
    """Base class of blob store failures."""


class InvalidBlobKey(BlobError, ValueError):
    """A key or URI that is malformed or would point outside the store."""


class BlobUnavailable(BlobError):
    """The store could not be reached or did not answer in time: the same call may succeed
    later (a stage tries it again before it dead-letters anything, :mod:`streams.runner`)."""


class BlobNotFound(BlobError, LookupError):
    """The URI names no stored object."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"no blob at {uri}")
        self.uri = uri


@dataclass(frozen=True)
class BlobRef:
    """Where an object was stored, and what it was: the claim check itself."""

    uri: str
    size: int
    sha256: str  # lowercase hex


#: PS3.5 A.1-A.3: the transfer syntaxes whose pixel data is native in the encoded bytes
#: (deflate, A.5, compresses the whole data set, and A.4's are encapsulated)
_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


def pixel_sample_bytes(bits_allocated: int | None, transfer_syntax_uid: str) -> int:
    """The ``sample_bytes`` hint of :meth:`BlobStore.put` for a DICOM instance: 2 when its
    pixel data is native at 16 bits allocated, as CT, MR and most CR/DX are; else 1. Its
    pixel data starts at an even offset (every element's length is even, PS3.5 7.1.1), so
    its samples are the blob's aligned byte pairs."""
    return 2 if bits_allocated == 16 and transfer_syntax_uid in _NATIVE_SYNTAXES else 1


@runtime_checkable
class BlobStore(Protocol):
    """What every claim-check store offers; implementations must be thread-safe."""

    def put(self, key: str, data: bytes, *, sample_bytes: int = 1) -> BlobRef:
        """Store ``data`` under ``key`` atomically (readers see all of it or none);
        a second put of the same key replaces the object. ``sample_bytes``: a hint for a
        store that compresses, the width of the samples most of ``data`` holds (2 for an
        instance with native 16-bit pixel data, :func:`pixel_sample_bytes`); ``get``
        returns the same bytes whatever it was."""
        ...

    def uri_of(self, key: str) -> str:
        """The claim-check URI of ``key`` in this store."""
        ...

    def ref_for(self, key: str, data: bytes) -> BlobRef:
        """The reference ``put(key, data)`` returns, computed without storing anything."""
        ...

    def get(self, uri: str) -> bytes:
        """The bytes stored at ``uri``; :class:`BlobNotFound` if there are none."""
        ...

    def exists(self, uri: str) -> bool:
        ...

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (for tools such as phi-scan; not for hot paths)."""
        ...


def is_valid_uid(value: str | None) -> bool:
    """True for a UID that conforms to PS3.5 9.1 (digits and dots, <= 64 chars)."""
    return bool(value) and len(value) <= 64 and _UID.match(value) is not None


def instance_key(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """The key of one DICOM instance: ``{study_uid}/{series_uid}/{sop_instance_uid}.dcm``.

    Raises :class:`InvalidBlobKey` naming the attribute when a UID is not a valid
    PS3.5 UID, which also guarantees the key cannot contain a path separator or ``..``.
    """
    for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                      ("SOPInstanceUID", sop_instance_uid)):
        if not is_valid_uid(uid):
            raise InvalidBlobKey(f"{name} {uid!r} is not a valid DICOM UID (PS3.5 9.1)")
    return f"{study_uid}/{series_uid}/{sop_instance_uid}.dcm"


def rejected_key(data: bytes) -> str:
    """Key for input that was refused and is too large to inline in a dead letter."""
    return f"rejected/{hashlib.sha256(data).hexdigest()}.dcm"


def validate_key(key: str) -> tuple[str, ...]:
    """Split ``key`` into its components, refusing anything that could leave the root."""
    if not isinstance(key, str) or not key:
        raise InvalidBlobKey("blob key must be a non-empty string")
    parts = tuple(key.split("/"))
    if len(parts) > _MAX_KEY_DEPTH:
        raise InvalidBlobKey(f"blob key {key!r} has more than {_MAX_KEY_DEPTH} components")
    for part in parts:
        # The pattern excludes "", ".", "..", absolute paths, backslashes, NUL and
        # anything else a filesystem or an S3 console would interpret.
        if part in (".", "..") or not _KEY_COMPONENT.match(part):
            raise InvalidBlobKey(f"blob key {key!r} has an invalid component {part!r}")
    return parts


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
