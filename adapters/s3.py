"""The S3 blob store: one client path for the embedded SeaweedFS and S3/MinIO/Ceph.

Objects live at ``s3://<bucket>/<key>`` with the keys of :mod:`schemas.blobs`, so an
instance stored twice is one object. Every failure is a :class:`~schemas.blobs.BlobError`
that names the URI or the endpoint (a missing object, refused credentials, an
unreachable service), never a botocore traceback.

Optional encryption at rest is done here, before bytes leave the process: AES-256-GCM
with the key from ``blobs.encryption_key`` and a random 96-bit nonce per object, so it
holds whatever the storage service does. The SHA-256 in a :class:`BlobRef` is of the
plaintext: it identifies the DICOM instance, not one encryption of it.

The embedded store's credentials are generated on first start and kept in
``DATA_DIR/secrets/s3-credentials.json`` (mode 0600); every process of the runtime
reads them from there.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from schemas.blobs import BlobError, BlobNotFound, BlobRef, sha256_hex, validate_key
from schemas.settings import Settings

_ENC_META = "radstream-encryption"
_ENC_ALGO = "AES-256-GCM"
_NONCE_BYTES = 12


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str


def credentials_path(settings: Settings) -> Path:
    return Path(settings.data_dir).resolve() / "secrets" / "s3-credentials.json"


def ensure_embedded_credentials(settings: Settings) -> S3Credentials:
    """Read the embedded store's credentials, generating them (mode 0600) on first start."""
    path = credentials_path(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        creds = {"access_key_id": "RS" + secrets.token_hex(9).upper(), "secret_access_key": secrets.token_urlsafe(30)}
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(creds, fh)
        os.replace(path.with_suffix(".tmp"), path)
    return load_credentials(settings)


def load_credentials(settings: Settings) -> S3Credentials:
    blobs = settings.blobs
    if blobs.s3_access_key_id and blobs.s3_secret_access_key:
        return S3Credentials(blobs.s3_access_key_id, blobs.s3_secret_access_key.get_secret_value())
    if not settings.embedded_objectstore:
        raise BlobError(
            f"the object store at {settings.s3_endpoint} needs credentials: set RADSTREAM_BLOBS_S3_ACCESS_KEY_ID "
            "and RADSTREAM_BLOBS_S3_SECRET_ACCESS_KEY"
        )
    path = credentials_path(settings)
    try:
        data = json.loads(path.read_text())
        return S3Credentials(data["access_key_id"], data["secret_access_key"])
    except FileNotFoundError:
        raise BlobError(f"no credentials for the embedded object store at {path}: start it with 'radstream up'") from None
    except (ValueError, KeyError) as exc:
        raise BlobError(f"credentials file {path} is damaged: {exc}") from None


def _encryption_key(settings: Settings) -> bytes | None:
    if settings.blobs.encryption_key is None:
        return None
    try:
        key = base64.b64decode(settings.blobs.encryption_key.get_secret_value(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 32:
        raise BlobError("blobs.encryption_key must be the base64 encoding of exactly 32 bytes (AES-256)")
    return key


class S3BlobStore:
    """Blob store over the S3 API (thread-safe: boto3 clients are)."""

    def __init__(self, *, endpoint: str, bucket: str, credentials: S3Credentials, region: str = "us-east-1",
                 verify: bool | str = True, timeout_s: float = 10.0, encryption_key: bytes | None = None,
                 max_connections: int = 32) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint = endpoint
        self.bucket = bucket
        self._aead = None
        # Over loopback (the embedded store) nothing can alter a body between us and the
        # store, and the SHA-256 of every instance travels in its event anyway: the body is
        # not hashed again for SigV4 (UNSIGNED-PAYLOAD) nor CRC-checksummed, which cost a
        # pass over every 0.5 MB slice here and one more in the store. Elsewhere botocore's
        # defaults stay: signed payloads over http, checksums over https.
        loopback = _is_loopback(endpoint)
        if encryption_key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aead = AESGCM(encryption_key)
        self._client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=region, verify=verify,
            aws_access_key_id=credentials.access_key_id, aws_secret_access_key=credentials.secret_access_key,
            config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, max_pool_connections=max_connections,
                          retries={"max_attempts": 3, "mode": "standard"},
                          s3={"addressing_style": "path", **({"payload_signing_enabled": False} if loopback else {})},
                          **({"request_checksum_calculation": "when_required",
                              "response_checksum_validation": "when_required"} if loopback else {})),
        )

    def __repr__(self) -> str:
        return f"S3BlobStore({self.endpoint}, bucket={self.bucket!r}, encrypted={self._aead is not None})"

    def uri_of(self, key: str) -> str:
        validate_key(key)
        return f"s3://{self.bucket}/{key}"

    def ref_for(self, key: str, data: bytes) -> BlobRef:
        """The reference ``put(key, data)`` will return, without storing anything."""
        return BlobRef(uri=self.uri_of(key), size=len(data), sha256=sha256_hex(data))

    def put(self, key: str, data: bytes) -> BlobRef:
        ref = self.ref_for(key, data)
        body, metadata = data, {"sha256": ref.sha256}
        if self._aead is not None:
            nonce = secrets.token_bytes(_NONCE_BYTES)
            body = nonce + self._aead.encrypt(nonce, data, ref.uri.encode())
            metadata[_ENC_META] = _ENC_ALGO
        self._call("store", ref.uri, self._client.put_object, Bucket=self.bucket, Key=key, Body=body, Metadata=metadata)
        return ref

    def get(self, uri: str) -> bytes:
        bucket, key = self._split(uri)
        reply = self._call("read", uri, self._client.get_object, Bucket=bucket, Key=key)
        body = reply["Body"].read()
        if reply.get("Metadata", {}).get(_ENC_META) == _ENC_ALGO:
            if self._aead is None:
                raise BlobError(f"{uri} is encrypted ({_ENC_ALGO}) but blobs.encryption_key is not set")
            from cryptography.exceptions import InvalidTag

            try:
                return self._aead.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], uri.encode())
            except InvalidTag:
                raise BlobError(f"{uri} cannot be decrypted: wrong blobs.encryption_key or a tampered object") from None
        return body

    def exists(self, uri: str) -> bool:
        bucket, key = self._split(uri)
        try:
            self._call("look up", uri, self._client.head_object, Bucket=bucket, Key=key)
        except BlobNotFound:
            return False
        return True

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (idempotent); check the credentials on the way."""
        from botocore.exceptions import ClientError

        try:
            self._call("open bucket", f"s3://{self.bucket}", self._client.head_bucket, Bucket=self.bucket)
        except BlobNotFound:
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise self._error("create bucket", f"s3://{self.bucket}", exc) from None

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (for tools such as phi-scan; not for hot paths)."""
        paginator = self._client.get_paginator("list_objects_v2")
        out: list[str] = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                out.extend(item["Key"] for item in page.get("Contents", []))
        except Exception as exc:
            raise self._error("list", f"s3://{self.bucket}/{prefix}", exc) from None
        return out

    def _split(self, uri: str) -> tuple[str, str]:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
            raise BlobError(f"{uri!r} is not an s3://bucket/key URI")
        key = parts.path.lstrip("/")
        validate_key(key)
        return parts.netloc, key

    def _call(self, action: str, uri: str, method, **kwargs):
        try:
            return method(**kwargs)
        except Exception as exc:
            raise self._error(action, uri, exc) from None

    def _error(self, action: str, uri: str, exc: Exception) -> BlobError:
        from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
                return BlobNotFound(uri)
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
                return BlobError(f"cannot {action} {uri}: the object store at {self.endpoint} refused the credentials ({code})")
            return BlobError(f"cannot {action} {uri}: {code or status} from {self.endpoint}")
        if isinstance(exc, (EndpointConnectionError, ReadTimeoutError, ConnectionError)):
            return BlobError(f"cannot {action} {uri}: the object store at {self.endpoint} is unreachable")
        if isinstance(exc, BlobError):
            return exc
        return BlobError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")


def _is_loopback(endpoint: str) -> bool:
    import ipaddress

    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_s3_store(settings: Settings) -> S3BlobStore:
    blobs = settings.blobs
    return S3BlobStore(
        endpoint=settings.s3_endpoint, bucket=blobs.bucket, credentials=load_credentials(settings),
        region=blobs.s3_region, verify=str(blobs.s3_ca_bundle) if blobs.s3_ca_bundle else blobs.s3_verify_tls,
        timeout_s=blobs.s3_timeout_s, encryption_key=_encryption_key(settings),
        max_connections=max(10, settings.dicom.max_associations * 2),
    )
