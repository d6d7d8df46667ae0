"""Claim-check blob store: instance bytes go here, Kafka events carry only the URI.

Gateways write each received DICOM instance (PS3.10 file format) once, under a key
derived from its UIDs (``{study_uid}/{series_uid}/{sop_instance_uid}.dcm``), and publish
an event holding the blob's URI, size and SHA-256 (the claim-check pattern): pixel data
never rides on a topic. Because the key is a function of the UIDs, a sender that
retries a C-STORE overwrites the same object instead of making a second one. Every
store implements the small :class:`BlobStore` protocol; :class:`LocalBlobStore` keeps
files under a directory and an S3 store plugs in behind the same protocol with
``s3://bucket/key`` URIs. Keys are validated before they touch a path, so no key can
escape the store's root.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from schemas.settings import Settings

#: PS3.5 9.1: a UID is dot-separated numeric components, at most 64 characters.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: Characters a key component may hold: enough for UIDs, hex digests and file suffixes.
_KEY_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_MAX_KEY_DEPTH = 8


class BlobError(Exception):
    """Base class of blob store failures."""


class InvalidBlobKey(BlobError, ValueError):
    """A key or URI that is malformed or would point outside the store."""


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


@runtime_checkable
class BlobStore(Protocol):
    """What every claim-check store offers; implementations must be thread-safe."""

    def put(self, key: str, data: bytes) -> BlobRef:
        """Store ``data`` under ``key`` atomically (readers see all of it or none);
        a second put of the same key replaces the object."""
        ...

    def uri_of(self, key: str) -> str:
        """The claim-check URI of ``key`` in this store."""
        ...

    def ref_for(self, key: str, data: bytes) -> BlobRef:
        """The reference ``put(key, data)`` returns, computed without storing anything:
        lets a gateway publish the claim check while the upload is still running."""
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


class LocalBlobStore:
    """Blobs as files under ``root``; URIs are ``file:///abs/path``.

    Writes go to a temporary file in the target directory, are fsynced with their
    directory (unless ``fsync=False``) and renamed over the final name with :func:`os.replace`, so a
    crash never leaves a half-written object under a valid key and a gateway only
    acknowledges a C-STORE after the bytes are durable.
    """

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def path_of(self, key: str) -> Path:
        path = self.root.joinpath(*validate_key(key))
        # Belt and braces: a symlink planted inside the root must not lead outside it.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidBlobKey(f"blob key {key!r} resolves outside {self.root}")
        return path

    def ref_for(self, key: str, data: bytes) -> BlobRef:
        return BlobRef(uri=self.uri_of(key), size=len(data), sha256=sha256_hex(data))

    def uri_of(self, key: str) -> str:
        return self.path_of(key).as_uri()

    def put(self, key: str, data: bytes) -> BlobRef:
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if self.fsync:  # the rename itself is durable only once the directory is
                _fsync_dir(path.parent)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return BlobRef(uri=path.as_uri(), size=len(data), sha256=sha256_hex(data))

    def _path_from_uri(self, uri: str) -> Path:
        parts = urlsplit(uri)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise InvalidBlobKey(f"{uri!r} is not a file:// URI of this store")
        path = Path(unquote(parts.path))
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            raise InvalidBlobKey(f"{uri!r} is outside the blob root {self.root}") from None
        return self.path_of(relative.as_posix())

    def get(self, uri: str) -> bytes:
        try:
            return self._path_from_uri(uri).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(uri) from None

    def exists(self, uri: str) -> bool:
        return self._path_from_uri(uri).is_file()

    def keys(self, prefix: str = "") -> list[str]:
        return _local_keys(self.root, prefix)


def _local_keys(root: Path, prefix: str) -> list[str]:
    base = root / prefix if prefix else root
    if not base.exists():
        return []
    paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file() and ".tmp" not in p.name)
    return [p.relative_to(root).as_posix() for p in paths]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings describe: S3 (embedded SeaweedFS or a real service),
    or a local directory (``blobs.backend = "local"``, for unit tests)."""
    if settings.blobs.backend == "local":
        return LocalBlobStore(settings.blob_root)
    from schemas.blobs_s3 import open_s3_store

    return open_s3_store(settings)
