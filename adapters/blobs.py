"""Claim-check blob stores: a local directory (tests, single machine) and S3.

Both implement :class:`schemas.blobs.BlobStore` with the key scheme of
:mod:`schemas.blobs`; :func:`open_blob_store` picks the one the settings describe.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from schemas.blobs import BlobNotFound, BlobRef, BlobStore, InvalidBlobKey, sha256_hex, validate_key
from schemas.settings import Settings


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

    def put(self, key: str, data: bytes, *, sample_bytes: int = 1) -> BlobRef:
        path = self.path_of(key)  # stored as it is: sample_bytes is only a compression hint
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
    from adapters.s3 import open_s3_store

    return open_s3_store(settings)
