"""DICOMweb gateway: a STOW-RS origin server that turns stored instances into events.

Over 400 lines: one request's life (authentication, streamed parts, partial-body truth, answers) in one place.

Sites' PACS push studies here over HTTP(S) (DICOM PS3.18 10.5 Store Transaction):
``POST /dicomweb/studies`` or ``POST /dicomweb/studies/{study}`` with a
``multipart/related; type="application/dicom"`` body, one PS3.10 instance per part.
The body is streamed part by part (never whole in memory; one part is capped by
``stow.max_part_bytes``). Each part is read completely (truncation is a failure) and
taken in like a C-STORE by the shared intake (:mod:`gateways.intake`): validated,
written to the claim-check blob store and published as an ``InstanceReceived`` with
``gateway="stow-rs"`` and the source site of the bearer token; up to
``stow.parts_in_flight`` parts of a request are stored concurrently. The answer
(:mod:`gateways.dicomweb`) is the PS3.18 10.5.3 Store Instances Response module
(ReferencedSOPSequence, FailedSOPSequence with FailureReason (0008,1197)) as
``application/dicom+json`` (PS3.18 F.2), or ``application/dicom+xml`` (PS3.19 A.1)
when the client asks for it, with 200 (all stored), 202 (some failed) or 409 (none).
A request refused as a whole gets 400 (unparseable multipart or HTTP), 401 (no or unknown
bearer token, RFC 6750), 413 (over ``stow.max_body_bytes``), 415 (not
multipart/related of application/dicom) or 503 + Retry-After while the broker does
not acknowledge: nothing of it was stored. A part counts once the delimiter after it
arrived; a body that fails after some parts were handed over (malformed, cut short,
the connection closed) is answered for part by part: those parts stand, the fault is
one more FailedSOPSequence item, 202 or 409 (see README, bad input). Every refusal is logged
with its reason and, unless the broker is down, published as a ``DeadLetter`` with the
refused bytes (:mod:`gateways.deadletter`: inline up to 64 KiB, else by claim check,
an instance under ``rejected/``, a whole request under ``rejected/stow/``);
unauthenticated and oversized bodies are not kept.

Run it with ``python -m gateways.stow_rs`` (settings from ``RADSTREAM_*``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter, Histogram

from adapters.blobs import open_blob_store
from adapters.telemetry import get_logger
from gateways.deadletter import BROKER_UNAVAILABLE
from gateways.dicomweb import (
    BodyFault,
    BodyTap,
    BodyTooLarge,
    PartOutcome,
    StowMultipartReader,
    dataset_response,
    read_part,
    store_instances_response,
    wants_xml,
)
from gateways.intake import InstanceIntake, Received
from gateways.publisher import EventPublisher
from gateways.serving import GatewayProcess, run, server_tls_context
from gateways.validation import FailureReason, InstanceUids, InvalidInstance
from schemas.blobs import BlobStore, is_valid_uid
from schemas.settings import Settings, SettingsError

log = logging.getLogger("radstream.gateways.stow_rs")
slog = get_logger("radstream.gateways.stow_rs")

STAGE = "stow-rs"

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
    return server_tls_context(settings.stow.tls_cert, settings.stow.tls_key, "stow")


# ---------------------------------------------------------------- the gateway


class StowGateway:
    """The STOW-RS handlers: ``handle_store`` answers one request and never raises."""

    def __init__(self, settings: Settings, store: BlobStore, publisher: EventPublisher,
                 tokens: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.intake = InstanceIntake(store, publisher, STAGE)
        self.tokens = load_tokens(settings) if tokens is None else tokens
        self._pool = ThreadPoolExecutor(max_workers=max(8, 4 * settings.stow.parts_in_flight),
                                        thread_name_prefix="stow-part")
        self._broker_down_until = 0.0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

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
        tap = BodyTap(request.content, self.settings.stow.max_body_bytes)
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
            xml = wants_xml(request.headers.get(hdrs.ACCEPT, ""))
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
            raise RequestRefused(503, BROKER_UNAVAILABLE, "the broker is unreachable; retry later",
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

    async def _store_parts(self, request: web.Request, tap: BodyTap, site: str,
                           target_study: str | None) -> list[PartOutcome]:
        """Read the parts one after another; store up to ``parts_in_flight`` at once."""
        try:
            reader = StowMultipartReader(request.headers, tap)  # type: ignore[arg-type]
        except (ValueError, KeyError) as exc:
            raise RequestRefused(400, "malformed_multipart", f"malformed multipart/related header: {exc}") from None
        slots = asyncio.Semaphore(self.settings.stow.parts_in_flight)
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Future[PartOutcome]] = []
        try:
            while True:
                tap.mark()
                try:
                    read = await self._next_part(request, reader, tap, len(tasks) + 1)
                except BodyFault as fault:
                    if not tasks:  # nothing was handed over: the request as a whole is refused
                        raise RequestRefused(400, fault.reason, fault.error) from None
                    return await self._partly_read(tasks, tap, site, fault)
                if read is None:
                    break
                data, failure = read
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

    async def _next_part(self, request: web.Request, reader: StowMultipartReader, tap: BodyTap,
                         number: int) -> tuple[bytes, InvalidInstance | None] | None:
        """The next part, read to its delimiter; None after the close-delimiter.

        A part counts only when the delimiter after it arrived (RFC 2046 5.1.1): a part
        that ends with the body may have been cut short, so it raises :class:`BodyFault`
        like every other reason the body cannot be read on.
        """
        try:
            part = await reader.next()
            if part is None:
                return None
            if not isinstance(part, BodyPartReader):
                raise BodyFault("malformed_multipart", f"malformed multipart body: part {number} is a nested "
                                "multipart, not an instance")
            read = await read_part(part, self.settings.stow.max_part_bytes)
        except HttpProcessingError:
            raise BodyFault("malformed_multipart", f"malformed multipart body: part {number} has no valid header "
                            "block (RFC 2046 5.1.1: header fields, then an empty line)") from None
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise BodyFault("malformed_multipart", f"malformed multipart body: {str(exc)[:200]}") from None
        except (ConnectionError, asyncio.IncompleteReadError):
            declared = f" of the {request.content_length} declared" if request.content_length is not None else ""
            raise BodyFault("incomplete_body", f"the client closed the connection after {tap.total}{declared} "
                            f"bytes of the body, inside part {number}") from None
        if tap.at_eof():
            raise BodyFault("unterminated_part", f"the body ended inside part {number}: no delimiter follows it "
                            "(RFC 2046 5.1.1), so it may be cut short; it was not stored")
        return read

    async def _partly_read(self, tasks: list[asyncio.Future[PartOutcome]], tap: BodyTap, site: str,
                           fault: BodyFault) -> list[PartOutcome]:
        """A body that failed after some parts were handed over: those stand and are answered
        for one by one (PS3.18 10.5.3: 202 or 409), the fault is one more failed item, and
        its dead letter carries the bytes from where the failing part began."""
        outcomes = list(await asyncio.gather(*tasks))
        (slog.info if fault.reason == "incomplete_body" else slog.warning)(
            "STOW-RS body failed after some parts", source_site=site, reason=fault.reason, error=fault.error,
            parts_before=len(outcomes))
        try:
            payload = await tap.rest()
        except Exception:  # the connection is gone: what was read is what there is
            payload = bytes(tap.recent)
        await asyncio.get_running_loop().run_in_executor(self._pool, partial(
            self.intake.dead_letters.send, fault.reason, fault.error, refused=payload,
            rejected_key_of=rejected_request_key))
        return outcomes + [PartOutcome(refusal=InvalidInstance(FailureReason.CANNOT_UNDERSTAND, fault.reason,
                                                               fault.error))]

    def dead_letter_soon(self, reason: str, error: str, payload: bytes = b"") -> None:
        """Publish a request's dead letter from a worker thread, without waiting for it."""
        asyncio.get_running_loop().run_in_executor(self._pool, partial(
            self.intake.dead_letters.send, reason, error, refused=payload, rejected_key_of=rejected_request_key))

    # -- one instance (runs in a worker thread) ----------------------------

    def store_part(self, data: bytes, failure: InvalidInstance | None, site: str,
                   target_study: str | None) -> PartOutcome:
        """Validate, store and publish one instance; the outcome is its response item. Never raises."""
        received = Received(data)
        refusal: InvalidInstance | None = failure
        try:
            if refusal is None:
                self.intake.receive(received, site, check=partial(_check_target_study, target_study))
        except InvalidInstance as exc:
            refusal = exc
        except Exception as exc:  # a bug of ours: this instance fails, the request goes on
            log.exception("STOW-RS instance failed")
            refusal = InvalidInstance.internal_error(exc)
        outcome = PartOutcome(received.sop_class_uid, received.sop_instance_uid, received.study_uid, refusal)
        INSTANCES.labels(outcome=refusal.reason if refusal else "stored").inc()
        if refusal is None:
            return outcome
        broker_down = refusal.reason == BROKER_UNAVAILABLE
        (slog.error if broker_down else slog.warning)(
            "refused STOW-RS instance", source_site=site, reason=refusal.reason,
            failure_reason=f"0x{int(refusal.code):04X}", sop_instance_uid=received.sop_instance_uid,
            study_uid=received.study_uid, error=refusal.error)
        if broker_down:
            # The broker is the dead-letter channel too: the client is told to retry.
            self._broker_down_until = time.monotonic() + self.settings.stow.retry_after_s
        self.intake.refuse(received, refusal)
        return outcome

    # -- answers ----------------------------------------------------------

    def _answer(self, request: web.Request, outcomes: list[PartOutcome], xml: bool) -> web.Response:
        """PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored; 503 when the broker failed them."""
        stored = [o for o in outcomes if o.refusal is None]
        failed = [o for o in outcomes if o.refusal is not None]
        headers: dict[str, str] = {}
        if not failed:
            status = 200
        elif stored:
            status = 202
        elif all(o.refusal is not None and o.refusal.reason == BROKER_UNAVAILABLE for o in failed):
            status, headers = 503, {"Retry-After": str(self.settings.stow.retry_after_s)}
        else:
            status = 409
        response = store_instances_response(stored, failed, f"{request.scheme}://{request.host}/dicomweb")
        log.info("STOW-RS answered %d: %d stored, %d failed", status, len(stored), len(failed))
        return dataset_response(response, status, xml, headers)

    async def _refuse(self, request: web.Request, tap: BodyTap, site: str | None,
                      refusal: RequestRefused) -> web.Response:
        """A request refused as a whole: log, dead-letter what was sent (if anyone may send it), answer."""
        broker_down = refusal.reason == BROKER_UNAVAILABLE
        peer_gone = refusal.reason == "incomplete_body"  # the client's doing, not a fault of ours
        (slog.error if broker_down or refusal.status >= 500 else slog.info if peer_gone else slog.warning)(
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
            await asyncio.get_running_loop().run_in_executor(self._pool, partial(
                self.intake.dead_letters.send, refusal.reason, refusal.error, refused=payload,
                rejected_key_of=rejected_request_key))
        response = web.json_response({"error": refusal.error, "reason": refusal.reason}, status=refusal.status,
                                     headers=refusal.headers)
        if refusal.status in (401, 413):  # the body was not read: do not let it be parsed as the next request
            response.force_close()
        return response


def _check_target_study(target_study: str | None, uids: InstanceUids) -> None:
    """PS3.18 10.5.1: a POST to ``/studies/{study}`` stores instances of that study only."""
    if target_study is not None and uids.study_uid != target_study:
        raise InvalidInstance(FailureReason.STUDY_UID_MISMATCH, "study_uid_mismatch",
                              f"StudyInstanceUID {uids.study_uid} is not the study {target_study} of the "
                              "request URL (PS3.18 10.5.1)", ["StudyInstanceUID"])


def rejected_request_key(raw: bytes) -> str:
    """Blob key of a refused STOW-RS body: ``rejected/stow/{sha256}.bin`` (same bytes, same key)."""
    return f"rejected/stow/{hashlib.sha256(raw).hexdigest()}.bin"


# ---------------------------------------------------------------- serving


class _StowConnection(RequestHandler):
    """aiohttp's HTTP/1.1 connection, answering a request its parser refuses as the gateway
    answers any refusal: 400 with a short JSON reason, logged in one line, dead-lettered.

    aiohttp's own answer echoes the offending bytes back (a smuggled body as a header
    line); a parse error drops every request of the same read, so the answer says
    nothing was stored, which is true. The sender is unauthenticated: no bytes are kept.
    """

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        what = (exc.message or type(exc).__name__).splitlines()[0].rstrip(": ")[:100]
        error = f"malformed HTTP request ({what}); nothing in it was stored"
        slog.warning("refused STOW-RS request", status=400, reason="malformed_http", error=error,
                     remote=request.remote)
        REQUESTS.labels(status="400").inc()
        gateway: StowGateway | None = getattr(self._manager, "stow_gateway", None)
        if gateway is not None:
            gateway.dead_letter_soon("malformed_http", error)
        response = web.json_response({"error": error, "reason": "malformed_http"}, status=400)
        response.force_close()
        return response


class _StowServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _StowConnection(self, loop=self._loop, **self._kwargs)


class _StowRunner(web.AppRunner):
    def __init__(self, gateway: StowGateway) -> None:
        super().__init__(gateway.app(), access_log=None, handle_signals=False)
        self._gateway = gateway

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _StowServer  # same state, our connection class
        server.stow_gateway = self._gateway  # type: ignore[attr-defined]
        return server


async def start_server(settings: Settings, gateway: StowGateway, port: int | None = None) -> web.AppRunner:
    """Listen on ``settings.bind_host:settings.stow.port`` (or ``port``), HTTPS when TLS is configured."""
    runner = _StowRunner(gateway)
    await runner.setup()
    site = web.TCPSite(runner, settings.bind_host, settings.stow.port if port is None else port,
                       ssl_context=tls_context(settings), reuse_address=True)
    await site.start()
    return runner


@asynccontextmanager
async def _listening(settings: Settings, publisher: EventPublisher) -> AsyncIterator[None]:
    gateway = StowGateway(settings, open_blob_store(settings), publisher)
    runner = await start_server(settings, gateway)
    scheme = "https" if settings.stow.tls_cert else "http"
    log.info("STOW-RS gateway listening on %s://%s:%d/dicomweb (%d tokens, broker %s, metrics port %s)", scheme,
             settings.bind_host, settings.stow.port, len(gateway.tokens), settings.kafka_bootstrap,
             settings.metrics.stow_gateway_port or "off")
    if not gateway.tokens:
        log.warning("no STOW-RS bearer tokens configured (stow.tokens / stow.tokens_file): every request gets 401")
    try:
        yield
    finally:
        await runner.cleanup()
        gateway.close()  # waits for the parts still being stored


def _prepare(settings: Settings) -> None:
    tls_context(settings)  # a certificate, key or token file that cannot be read: exit 2
    load_tokens(settings)


#: ``python -m gateways.stow_rs``: the origin server, its metrics, TLS and token files checked first.
PROCESS = GatewayProcess(
    component="stow-gateway", title="STOW-RS gateway", stage=STAGE, port=lambda s: s.stow.port,
    metrics_port=lambda s: s.metrics.stow_gateway_port, listening=_listening, log=log, prepare=_prepare)


if __name__ == "__main__":
    sys.exit(run(PROCESS))
