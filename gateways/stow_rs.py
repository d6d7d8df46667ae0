"""DICOMweb gateway: a STOW-RS origin server that turns stored instances into events.

Sites' PACS push studies here over HTTP(S) (DICOM PS3.18 10.5 Store Transaction):
``POST /dicomweb/studies`` or ``POST /dicomweb/studies/{study}`` with a
``multipart/related; type="application/dicom"`` body, one PS3.10 instance per part.
The body is streamed part by part (never whole in memory; one part is capped by
``stow.max_part_bytes``). Each part is read completely (truncation is a failure),
validated like a C-STORE (:mod:`gateways.validation`), written to the claim-check
blob store and published as an ``InstanceReceived`` with ``gateway="stow-rs"`` and the
source site of the bearer token; up to ``stow.parts_in_flight`` parts of a request are
stored concurrently. The answer is the PS3.18 10.5.3 Store Instances Response module
(ReferencedSOPSequence, FailedSOPSequence with FailureReason (0008,1197)) as
``application/dicom+json`` (PS3.18 F.2), or ``application/dicom+xml`` (PS3.19 A.1)
when the client asks for it, with 200 (all stored), 202 (some failed) or 409 (none).
A request refused as a whole gets 400 (unparseable multipart), 401 (no or unknown
bearer token, RFC 6750), 413 (over ``stow.max_body_bytes``), 415 (not
multipart/related of application/dicom) or 503 + Retry-After while the broker does
not acknowledge (nothing was accepted; the client retries). Every refusal is logged
with its reason and, unless the broker is down, published as a ``DeadLetter`` with the
refused bytes (inline up to 64 KiB, else by claim check under ``rejected/``);
unauthenticated and oversized bodies are not kept.

Run it with ``python -m gateways.stow_rs`` (settings from ``RADSTREAM_*``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import ssl
import sys
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from prometheus_client import Counter, Histogram, start_http_server
from pydicom.dataset import Dataset

from gateways.publisher import EventPublisher, PublishError
from gateways.validation import (
    FailureReason,
    InvalidInstance,
    check_storable,
    header_text,
    instance_metadata,
    instance_uids,
    read_instance,
)
from schemas.blobs import BlobRef, BlobStore, instance_key, is_valid_uid, rejected_key
from adapters.blobs import open_blob_store
from schemas.events import InstanceReceived, trace_id_for, utcnow
from adapters.process import start_component
from schemas.settings import Settings, SettingsError
from adapters.telemetry import get_logger
from schemas.topics import INSTANCE_RECEIVED

log = logging.getLogger("radstream.gateways.stow_rs")
slog = get_logger("radstream.gateways.stow_rs")

STAGE = "stow-rs"
#: Refused bytes up to this size ride inline in the dead letter; larger ones go to the blob store.
INLINE_PAYLOAD_MAX = 64 * 1024
#: Of a request refused as a whole, at most this much of its body is kept for the dead letter.
_KEEP_REQUEST_BYTES = 16 * 1024 * 1024
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"

REQUESTS = Counter("radstream_stow_requests", "STOW-RS requests answered, by HTTP status", ["status"])
INSTANCES = Counter("radstream_stow_instances", "STOW-RS instances answered, by outcome", ["outcome"])
REQUEST_SECONDS = Histogram(
    "radstream_stow_request_seconds", "STOW-RS request handling time: stream, validate, store, broker ack",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


class RequestRefused(Exception):
    """A request refused as a whole: the HTTP status, a reason key and text for people."""

    def __init__(self, status: int, reason: str, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.reason, self.error, self.headers = status, reason, error, headers or {}


class BodyTooLarge(Exception):
    pass


class _StowMultipartReader(MultipartReader):
    """aiohttp's reader without its 70-character boundary limit (RFC 2046 5.1.1): Orthanc's
    DICOMweb plugin 1.7 sends 73-character boundaries, and refusing a real PACS over it helps no one."""

    _MAX_BOUNDARY = 200

    def _get_boundary(self) -> str:
        boundary: str = self._mimetype.parameters["boundary"]
        if len(boundary) > self._MAX_BOUNDARY:
            raise ValueError(f"boundary of {len(boundary)} characters is too long")
        return boundary


@dataclass
class PartOutcome:
    """One instance's answer: an item of ReferencedSOPSequence, or of FailedSOPSequence."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    failure: FailureReason | None = None
    reason: str = ""
    error: str = ""


# ---------------------------------------------------------------- tokens


def load_tokens(settings: Settings) -> dict[str, str]:
    """Bearer token -> source site, from ``stow.tokens`` and ``stow.tokens_file``."""
    tokens: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in settings.stow.tokens.get_secret_value().split(","))):
        token, _, site = pair.partition("=")
        tokens[token.strip()] = site.strip()
    if settings.stow.tokens_file is not None:
        try:
            with open(settings.stow.tokens_file, "rb") as fh:
                table = tomllib.load(fh).get("tokens", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"stow.tokens_file {settings.stow.tokens_file}: {exc}") from None
        if not isinstance(table, dict) or not all(isinstance(v, str) and v for v in table.values()):
            raise SettingsError(f'stow.tokens_file {settings.stow.tokens_file}: needs [tokens] "TOKEN" = "SITE"')
        tokens.update({str(k): v for k, v in table.items()})
    return tokens


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context when ``stow.tls_cert`` and ``stow.tls_key`` are set; None for HTTP."""
    cert, key = settings.stow.tls_cert, settings.stow.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise SettingsError("stow.tls_cert and stow.tls_key must be set together (RADSTREAM_STOW_TLS_CERT/_KEY)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"stow.tls_cert/stow.tls_key cannot be loaded: {exc}") from None
    return context


# ---------------------------------------------------------------- the body, streamed


class _Tap:
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


# ---------------------------------------------------------------- the gateway


class StowGateway:
    """The STOW-RS handlers: ``handle_store`` answers one request and never raises."""

    def __init__(self, settings: Settings, store: BlobStore, publisher: EventPublisher,
                 tokens: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.tokens = load_tokens(settings) if tokens is None else tokens
        self._pool = ThreadPoolExecutor(max_workers=max(8, 4 * settings.stow.parts_in_flight),
                                        thread_name_prefix="stow-part")
        self._uploads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="stow-upload")
        self._broker_down_until = 0.0

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._uploads.shutdown(wait=True)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/dicomweb/studies", self.handle_store)
        app.router.add_post("/dicomweb/studies/{study}", self.handle_store)
        return app

    # -- one request ------------------------------------------------------

    async def handle_store(self, request: web.Request) -> web.StreamResponse:
        """PS3.18 10.5 Store Instances: the response for one POST."""
        started = time.perf_counter()
        site: str | None = None
        tap = _Tap(request.content, self.settings.stow.max_body_bytes)
        try:
            site = self._site_of(request)
            target_study = request.match_info.get("study")
            if target_study is not None and not is_valid_uid(target_study):
                raise RequestRefused(400, "invalid_target_study",
                                     f"study {target_study!r} in the request URL is not a valid UID (PS3.5 9.1)")
            if request.content_length is not None and request.content_length > self.settings.stow.max_body_bytes:
                raise RequestRefused(413, "body_too_large", f"request body of {request.content_length} bytes "
                                     f"exceeds the {self.settings.stow.max_body_bytes}-byte limit")
            self._check_broker()
            self._check_media_type(request)
            xml = _wants_xml(request.headers.get(hdrs.ACCEPT, ""))
            outcomes = await self._store_parts(request, tap, site, target_study)
            response = self._answer(request, outcomes, xml)
        except RequestRefused as refusal:
            response = await self._refuse(request, tap, site, refusal)
        except BodyTooLarge as exc:
            response = await self._refuse(request, tap, site, RequestRefused(413, "body_too_large", str(exc)))
        except Exception as exc:  # a bug of ours: answer, dead-letter, keep serving
            log.exception("STOW-RS request from %s failed", request.remote)
            response = await self._refuse(request, tap, site, RequestRefused(
                500, "internal_error", f"{type(exc).__name__}: {exc}"))
        REQUESTS.labels(status=str(response.status)).inc()
        REQUEST_SECONDS.observe(time.perf_counter() - started)
        return response

    def _site_of(self, request: web.Request) -> str:
        """RFC 6750 2.1: ``Authorization: Bearer <token>``; the token names the source site."""
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestRefused(401, "no_token", "no bearer token (Authorization: Bearer ...)",
                                 {"WWW-Authenticate": 'Bearer realm="radstream"'})
        site = self.tokens.get(token.strip())
        if site is None:
            raise RequestRefused(401, "bad_token", "the bearer token is not valid",
                                 {"WWW-Authenticate": 'Bearer realm="radstream", error="invalid_token"'})
        return site

    def _check_broker(self) -> None:
        wait = self._broker_down_until - time.monotonic()
        if wait > 0:
            raise RequestRefused(503, "broker_unavailable", "the broker is unreachable; retry later",
                                 {"Retry-After": str(max(1, round(wait)))})

    @staticmethod
    def _check_media_type(request: web.Request) -> None:
        """PS3.18 10.5.1.1: ``multipart/related; type="application/dicom"; boundary=...``."""
        content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
        mime = parse_mimetype(content_type)
        if (mime.type, mime.subtype) != ("multipart", "related"):
            raise RequestRefused(415, "unsupported_media_type",
                                 f"Content-Type {content_type or '(none)'!r} is not multipart/related")
        part_type = mime.parameters.get("type", "").strip('"').lower()
        if part_type != "application/dicom":
            raise RequestRefused(415, "unsupported_media_type",
                                 f"multipart/related type {part_type or '(none)'!r} is not application/dicom "
                                 "(only PS3.10 instances are accepted)")
        if not mime.parameters.get("boundary", "").strip('"'):
            raise RequestRefused(400, "malformed_multipart", "multipart/related without a boundary parameter")

    async def _store_parts(self, request: web.Request, tap: _Tap, site: str,
                           target_study: str | None) -> list[PartOutcome]:
        """Read the parts one after another; store up to ``parts_in_flight`` at once."""
        try:
            reader = _StowMultipartReader(request.headers, tap)  # type: ignore[arg-type]
        except (ValueError, KeyError) as exc:
            raise RequestRefused(400, "malformed_multipart", f"malformed multipart/related header: {exc}") from None
        slots = asyncio.Semaphore(self.settings.stow.parts_in_flight)
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Future[PartOutcome]] = []
        try:
            while True:
                tap.mark()
                try:
                    part = await reader.next()
                except (ValueError, AssertionError, RuntimeError) as exc:
                    raise RequestRefused(400, "malformed_multipart", f"malformed multipart body: {exc}") from None
                if part is None:
                    break
                if not isinstance(part, BodyPartReader):
                    raise RequestRefused(400, "malformed_multipart", "nested multipart parts are not instances")
                data, failure = await self._read_part(part)
                await slots.acquire()
                task = loop.run_in_executor(self._pool, self.store_part, data, failure, site, target_study)
                task.add_done_callback(lambda _t: slots.release())
                tasks.append(task)
            if not tasks:
                raise RequestRefused(400, "no_instances", "the multipart body has no parts")
        except BaseException:
            if tasks:  # parts already handed over still finish and answer for themselves
                await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return list(await asyncio.gather(*tasks))

    async def _read_part(self, part: BodyPartReader) -> tuple[bytes, InvalidInstance | None]:
        """A part's bytes, or its first ``max_part_bytes`` and the failure it earns."""
        failure = None
        part_type = parse_mimetype(part.headers.get(hdrs.CONTENT_TYPE, "application/dicom"))
        if (part_type.type, part_type.subtype) != ("application", "dicom"):
            failure = InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "unsupported_part_type",
                                      f"part Content-Type {part.headers.get(hdrs.CONTENT_TYPE)!r} "
                                      "is not application/dicom")
        limit = self.settings.stow.max_part_bytes
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

    # -- one instance (runs in a worker thread) ----------------------------

    def store_part(self, data: bytes, failure: InvalidInstance | None, site: str,
                   target_study: str | None) -> PartOutcome:
        """Validate, store and publish one instance; the outcome is its response item. Never raises."""
        outcome = PartOutcome()
        blob: BlobRef | None = None
        try:
            if failure is not None:
                raise failure
            dataset = read_instance(data)
            outcome.sop_class_uid = header_text(dataset, "SOPClassUID")
            outcome.sop_instance_uid = header_text(dataset, "SOPInstanceUID")
            if is_valid_uid(study := header_text(dataset, "StudyInstanceUID")):
                outcome.study_uid = study
            study_uid, series_uid, sop_instance_uid, sop_class_uid = instance_uids(dataset)
            transfer_syntax = check_storable(dataset, sop_class_uid)
            if target_study is not None and study_uid != target_study:
                raise InvalidInstance(FailureReason.STUDY_UID_MISMATCH, "study_uid_mismatch",
                                      f"StudyInstanceUID {study_uid} is not the study {target_study} of the "
                                      "request URL (PS3.18 10.5.1)", ["StudyInstanceUID"])
            key = instance_key(study_uid, series_uid, sop_instance_uid)
            blob = self.store.ref_for(key, data)
            event = InstanceReceived(
                trace_id=trace_id_for(study_uid), study_uid=study_uid, series_uid=series_uid,
                sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid, transfer_syntax_uid=transfer_syntax,
                blob_uri=blob.uri, blob_size=blob.size, blob_sha256=blob.sha256, source_site=site, gateway=STAGE,
                received_at=utcnow(), **instance_metadata(dataset),
            )
            # As in the SCP: upload and acked publish overlap; success only once both are durable.
            # A re-sent instance (same UIDs) overwrites its own key and is published again:
            # consumers key on sop_instance_uid, so a duplicate is idempotent.
            upload = self._uploads.submit(self.store.put, key, data)
            publish_error = None
            try:
                self.publisher.publish(INSTANCE_RECEIVED, event)
            except PublishError as exc:
                publish_error = exc
            try:
                upload.result()
            except Exception as exc:
                blob = None
                raise InvalidInstance(FailureReason.OUT_OF_RESOURCES, "blob_store_failed",
                                      f"cannot store the instance: {exc}") from None
            if publish_error is not None:
                raise InvalidInstance(FailureReason.OUT_OF_RESOURCES, "broker_unavailable", str(publish_error))
            slog.info("stored instance", trace_id=event.trace_id, study_uid=study_uid,
                      sop_instance_uid=sop_instance_uid, modality=event.modality, source_site=site, bytes=blob.size)
            INSTANCES.labels(outcome="stored").inc()
            return outcome
        except InvalidInstance as refusal:
            outcome.failure, outcome.reason, outcome.error = refusal.code, refusal.reason, refusal.error
        except Exception as exc:  # a bug of ours: this instance fails, the request goes on
            log.exception("STOW-RS instance failed")
            outcome.failure, outcome.reason = FailureReason.PROCESSING_FAILURE, "internal_error"
            outcome.error = f"{type(exc).__name__}: {exc}"
        INSTANCES.labels(outcome=outcome.reason).inc()
        broker_down = outcome.reason == "broker_unavailable"
        (slog.error if broker_down else slog.warning)(
            "refused STOW-RS instance", source_site=site, reason=outcome.reason,
            failure_reason=f"0x{int(outcome.failure):04X}", sop_instance_uid=outcome.sop_instance_uid,
            study_uid=outcome.study_uid, error=outcome.error)
        if broker_down:
            # The broker is the dead-letter channel too: the client is told to retry.
            self._broker_down_until = time.monotonic() + self.settings.stow.retry_after_s
        else:
            self._dead_letter(outcome.reason, outcome.error, outcome.study_uid, data,
                              blob.uri if blob is not None else None, rejected_key)
        return outcome

    # -- answers ----------------------------------------------------------

    def _answer(self, request: web.Request, outcomes: list[PartOutcome], xml: bool) -> web.Response:
        """PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored; 503 when the broker failed them."""
        stored = [o for o in outcomes if o.failure is None]
        failed = [o for o in outcomes if o.failure is not None]
        headers: dict[str, str] = {}
        if not failed:
            status = 200
        elif stored:
            status = 202
        elif all(o.reason == "broker_unavailable" for o in failed):
            status, headers = 503, {"Retry-After": str(self.settings.stow.retry_after_s)}
        else:
            status = 409
        base = f"{request.scheme}://{request.host}/dicomweb"
        response = Dataset()
        studies = {o.study_uid for o in stored}
        if len(studies) == 1:
            response.RetrieveURL = f"{base}/studies/{studies.pop()}"
        if failed:
            response.FailedSOPSequence = [_item(o, base) for o in failed]
        response.ReferencedSOPSequence = [_item(o, base) for o in stored]
        log.info("STOW-RS answered %d: %d stored, %d failed", status, len(stored), len(failed))
        return _dataset_response(response, status, xml, headers)

    async def _refuse(self, request: web.Request, tap: _Tap, site: str | None,
                      refusal: RequestRefused) -> web.Response:
        """A request refused as a whole: log, dead-letter what was sent (if anyone may send it), answer."""
        broker_down = refusal.reason == "broker_unavailable"
        (slog.error if broker_down or refusal.status >= 500 else slog.warning)(
            "refused STOW-RS request", status=refusal.status, reason=refusal.reason, error=refusal.error,
            remote=request.remote, path=request.path, source_site=site,
            content_type=request.headers.get(hdrs.CONTENT_TYPE))
        if not broker_down:
            # Bytes are kept only from authenticated senders and within the body limit.
            keep = site is not None and refusal.status not in (401, 413)
            payload = b""
            if keep:
                try:
                    payload = await tap.rest()
                except Exception:
                    payload = bytes(tap.recent)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, self._dead_letter, refusal.reason, refusal.error, None,
                                       payload, None, rejected_request_key)
        response = web.json_response({"error": refusal.error, "reason": refusal.reason}, status=refusal.status,
                                     headers=refusal.headers)
        if refusal.status in (401, 413):  # the body was not read: do not let it be parsed as the next request
            response.force_close()
        return response

    def _dead_letter(self, reason: str, error: str, study_uid: str | None, data: bytes, payload_uri: str | None,
                     key_of: Callable[[bytes], str]) -> None:
        payload = None
        if payload_uri is None and data:
            if len(data) <= INLINE_PAYLOAD_MAX:
                payload = data
            else:
                try:
                    payload_uri = self.store.put(key_of(data), data).uri
                except Exception as exc:
                    log.error("cannot keep the refused STOW-RS bytes (%d bytes, sha256 %s): %s", len(data),
                              hashlib.sha256(data).hexdigest(), exc)
        try:
            self.publisher.dead_letter(STAGE, reason, error, key=study_uid,
                                       trace_id=trace_id_for(study_uid) if study_uid else None,
                                       payload=payload, payload_uri=payload_uri)
        except Exception as exc:
            log.error("dead letter not published (reason=%s error=%s payload_uri=%s): %s",
                      reason, error, payload_uri, exc)


def rejected_request_key(raw: bytes) -> str:
    """Blob key of a refused STOW-RS body: ``rejected/stow/{sha256}.bin`` (same bytes, same key)."""
    return f"rejected/stow/{hashlib.sha256(raw).hexdigest()}.bin"


def _item(outcome: PartOutcome, base: str) -> Dataset:
    """An item of ReferencedSOPSequence / FailedSOPSequence (PS3.18 Table 10.5.3-1)."""
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid if is_valid_uid(outcome.sop_class_uid) else ""
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid if is_valid_uid(outcome.sop_instance_uid) else ""
    if outcome.failure is not None:
        item.FailureReason = int(outcome.failure)
    elif outcome.study_uid:
        item.RetrieveURL = f"{base}/studies/{outcome.study_uid}/instances/{outcome.sop_instance_uid}"
    return item


def _wants_xml(accept: str) -> bool:
    """PS3.18 8.7.3: JSON unless the client accepts XML and not JSON."""
    kinds = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return DICOM_XML in kinds and DICOM_JSON not in kinds


def _dataset_response(dataset: Dataset, status: int, xml: bool, headers: dict[str, str]) -> web.Response:
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


# ---------------------------------------------------------------- serving


async def start_server(settings: Settings, gateway: StowGateway, port: int | None = None) -> web.AppRunner:
    """Listen on ``settings.bind_host:settings.stow.port`` (or ``port``), HTTPS when TLS is configured."""
    runner = web.AppRunner(gateway.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.bind_host, settings.stow.port if port is None else port,
                       ssl_context=tls_context(settings), reuse_address=True)
    await site.start()
    return runner


async def _serve(settings: Settings, gateway: StowGateway) -> None:
    runner = await start_server(settings, gateway)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("received %s, shutting down", signal.Signals(s).name),
                                                    stop.set()))
    scheme = "https" if settings.stow.tls_cert else "http"
    log.info("STOW-RS gateway listening on %s://%s:%d/dicomweb (%d tokens, broker %s, metrics port %s)", scheme,
             settings.bind_host, settings.stow.port, len(gateway.tokens), settings.kafka_bootstrap,
             settings.metrics.stow_gateway_port or "off")
    if not gateway.tokens:
        log.warning("no STOW-RS bearer tokens configured (stow.tokens / stow.tokens_file): every request gets 401")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM or SIGINT; flush the publisher on the way out."""
    try:
        tls_context(settings)
        tokens = load_tokens(settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = open_blob_store(settings)
    publisher = EventPublisher(settings, client_id=f"{settings.kafka.client_id}-stow-rs")
    if settings.metrics.stow_gateway_port:
        start_http_server(settings.metrics.stow_gateway_port, addr=settings.bind_host)
    gateway = StowGateway(settings, store, publisher, tokens)
    try:
        asyncio.run(_serve(settings, gateway))
    finally:
        gateway.close()
        publisher.close()
    log.info("STOW-RS gateway stopped")
    return 0


def main() -> int:
    settings = start_component("stow-gateway", lambda s: [
        (s.stow.port, "the STOW-RS gateway"), (s.metrics.stow_gateway_port, "the STOW-RS gateway's metrics")])
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
