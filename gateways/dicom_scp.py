"""DICOM gateway: a C-STORE / C-ECHO SCP that turns received instances into events.

Sites' PACS and modalities push studies here over DICOM (PS3.4 Annex B Storage
Service Class, PS3.4 Annex A Verification, DIMSE per PS3.7). For every C-STORE the
handler takes the dataset exactly as it was sent (no pixel decoding), reads its header,
validates the UIDs, writes the PS3.10 file to the claim-check blob store, publishes an
``InstanceReceived`` event and waits for the broker's ack: only then does the sender
get Success (0x0000). Every failure answers with the PS3.4 B.2.3 / PS3.7 C status a
sender acts on (0xA700 Out of Resources: retry later; 0xA900 / 0xC000: do not retry
as is) and is published as a ``DeadLetter`` event, unless the broker itself is
unreachable, in which case it is logged. pynetdicom runs each association in its
own thread, so stores from several senders overlap.

Security (PS3.15 Annex B.1 TLS, PS3.8 9.3.4 association rejection): the listener binds
``settings.bind_host`` (127.0.0.1 unless configured) and speaks TLS when
``dicom.tls_cert`` is set, requiring client certificates when ``dicom.tls_ca`` is. Each
association request is checked against the calling-AE allow-list (``dicom.site_map``
with ``allow_unknown_ae = false``) and optionally the called AE title; a refused one gets
A-ASSOCIATE-RJ (rejected-permanent, service-user, reason 3 or 7), a log line naming the
reason and a count in ``radstream_dicom_association_rejections``. Every instance event
carries ``source_site``, the site the calling AE title maps to.

Run it with ``python -m gateways.dicom_scp`` (settings from ``RADSTREAM_*``).
"""

from __future__ import annotations

import hashlib
import logging
import signal
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from io import BytesIO
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from gateways.dicom_wire import IncompleteDataSet, NotADataSet, check_complete
from gateways.validation import InvalidInstance, header_text, instance_metadata, instance_uids
from schemas.blobs import BlobRef, BlobStore, instance_key, is_valid_uid, rejected_key
from adapters.blobs import open_blob_store
from gateways.publisher import EventPublisher, PublishError
from schemas.events import InstanceReceived, trace_id_for, utcnow
from adapters.process import start_component
from schemas.settings import Settings
from adapters.telemetry import get_logger
from schemas.topics import INSTANCE_RECEIVED

log = logging.getLogger("radstream.gateways.dicom_scp")
slog = get_logger("radstream.gateways.dicom_scp")  # structured: fields, not formatted text

STAGE = "dicom-scp"
#: Refused instances up to this size ride inline in the dead letter; larger ones are
#: written to the blob store under ``rejected/`` and referenced by URI.
INLINE_PAYLOAD_MAX = 64 * 1024


class StoreStatus(IntEnum):
    """C-STORE response statuses this gateway answers with (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.1: general failure, an error on our side
    OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 Refused: the sender should retry later
    DATASET_MISMATCH = 0xA900  # PS3.4 B.2.3 Error: Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3 Error: Cannot understand


INSTANCES = Counter(
    "radstream_dicom_instances", "C-STORE requests answered by the DICOM gateway, by DIMSE status",
    ["status"],
)
STORE_SECONDS = Histogram(
    "radstream_dicom_store_seconds", "C-STORE handling time: header read, blob write, broker ack",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ASSOCIATIONS = Counter("radstream_dicom_associations", "DICOM associations, by outcome", ["outcome"])
ASSOCIATION_REJECTIONS = Counter(
    "radstream_dicom_association_rejections", "A-ASSOCIATE-RJ answers and refused presentation contexts, by reason",
    ["reason"],
)


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. values with Source = DICOM UL service-user (PS3.8 Table 9-21)."""

    NO_REASON_GIVEN = 0x01
    APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02
    CALLING_AE_NOT_RECOGNIZED = 0x03
    CALLED_AE_NOT_RECOGNIZED = 0x07


#: PS3.8 Table 9-21 Result and Source fields of the A-ASSOCIATE-RJ PDU.
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01


@dataclass(frozen=True)
class SitePolicy:
    """Who may associate and which site each calling AE title stands for.

    ``sites`` maps calling AE titles (exact, padding stripped; PS3.5 6.2) to site names,
    the ``source_site`` of their events (licensure and SLA analytics key on it).
    """

    ae_title: str
    sites: dict[str, str]
    allow_unknown_ae: bool = True
    require_called_ae: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> SitePolicy:
        dicom = settings.dicom
        return cls(dicom.ae_title, dicom.sites(), dicom.allow_unknown_ae, dicom.require_called_ae)

    def site_for(self, calling_ae: str) -> str:
        return self.sites.get(calling_ae, calling_ae or "UNKNOWN")

    def refusal(self, calling_ae: str, called_ae: str) -> tuple[RejectReason, str] | None:
        """Why an association from ``calling_ae`` to ``called_ae`` is refused, or None."""
        if not self.allow_unknown_ae and calling_ae not in self.sites:
            return RejectReason.CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling_ae!r} is not on the allow-list"
        if self.require_called_ae and called_ae != self.ae_title:
            return RejectReason.CALLED_AE_NOT_RECOGNIZED, (
                f"called AE title {called_ae!r} is not this gateway's {self.ae_title!r}")
        return None


class Rejected(Exception):
    """An instance the gateway refuses, with the status and reason code to report."""

    def __init__(self, status: StoreStatus, reason: str, error: str, offending: Sequence[str] = ()) -> None:
        super().__init__(error)
        self.status = status
        self.reason = reason
        self.error = error
        self.offending = tuple(offending)


@dataclass
class _Received:
    """What is known about one C-STORE so far; failure paths report as much as they can."""

    data: bytes = b""
    study_uid: str | None = None
    blob: BlobRef | None = None


# ---------------------------------------------------------------- handlers


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO: Verification Service (PS3.4 Annex A) always succeeds while we run."""
    log.debug("C-ECHO from %s", _calling_ae(event))
    return StoreStatus.SUCCESS


def handle_store(event: evt.Event, store: BlobStore, publisher: EventPublisher,
                 sites: SitePolicy | None = None) -> Dataset | int:
    """EVT_C_STORE: validate, store the blob, publish ``InstanceReceived``, then answer.

    ``sites`` names the site of the calling AE title (default: the AE title itself).

    Returns the C-STORE response status (PS3.4 B.2.3), as a Dataset carrying an
    Error Comment (0000,0902) and Offending Element (0000,0901) on failure. Never raises.
    """
    started = time.perf_counter()
    received = _Received()
    try:
        status = _store(event, store, publisher, received, sites)
        answer: Dataset | int = status
    except Rejected as rejection:
        status = rejection.status
        answer = _status_dataset(rejection)
        broker_down = rejection.reason == "broker_unavailable"
        (slog.error if broker_down else slog.warning)(
            "refused C-STORE", calling_ae=_calling_ae(event), reason=rejection.reason,
            sop_instance_uid=_requested_instance(event), status=f"0x{status:04X}",
            trace_id=_trace(received), blob=received.blob.uri if received.blob else None, error=rejection.error)
        if not broker_down:
            _dead_letter(publisher, store, received, rejection)
    except Exception as exc:  # a bug of ours: answer, dead-letter, keep serving
        log.exception("C-STORE from %s failed: trace_id=%s", _calling_ae(event), _trace(received))
        rejection = Rejected(StoreStatus.PROCESSING_FAILURE, "internal_error", f"{type(exc).__name__}: {exc}")
        status, answer = rejection.status, _status_dataset(rejection)
        _dead_letter(publisher, store, received, rejection)
    INSTANCES.labels(status=f"0x{int(status):04X}").inc()
    STORE_SECONDS.observe(time.perf_counter() - started)
    return answer


def _store(event: evt.Event, store: BlobStore, publisher: EventPublisher, received: _Received,
           sites: SitePolicy | None) -> StoreStatus:
    calling_ae = _calling_ae(event)
    try:
        received.data = _encoded_instance(event, calling_ae)
        header = dcmread(BytesIO(received.data), stop_before_pixels=True)
    except Exception as exc:
        # A cut-short data set (e.g. a truncated deflate stream) says so; anything else is noise.
        raise _incompleteness(event) or Rejected(
            StoreStatus.CANNOT_UNDERSTAND, "undecodable", f"cannot parse the data set: {exc}") from None
    if is_valid_uid(study_uid := header_text(header, "StudyInstanceUID")):
        received.study_uid = study_uid  # so a refusal below is keyed and traced by study
    # pydicom reads a cut-short value as a shorter one: check every declared length.
    if (incomplete := _incompleteness(event)) is not None:
        raise incomplete

    study_uid, series_uid, sop_instance_uid = _validated_uids(header, event.request)
    key = instance_key(study_uid, series_uid, sop_instance_uid)
    received.blob = store.ref_for(key, received.data)
    site = sites.site_for(calling_ae) if sites else (calling_ae or "UNKNOWN")
    instance = instance_received(header, received.blob, event, calling_ae, site)
    # The upload and the acked publish overlap (an acked produce costs ~4 ms on s3://
    # broker storage, an object put a few ms more): success is answered only once both
    # are durable. If the upload fails after the event was published, the sender is told
    # to retry (0xA700) and its retry writes the same key; the dead letter records it.
    upload = _uploads().submit(store.put, key, received.data)
    publish_error: PublishError | None = None
    try:
        publisher.publish(INSTANCE_RECEIVED, instance)
    except PublishError as exc:
        publish_error = exc
    try:
        upload.result()
    except Exception as exc:
        received.blob = None  # not stored: the dead letter must carry the bytes themselves
        raise Rejected(StoreStatus.OUT_OF_RESOURCES, "blob_store_failed", f"cannot store the instance: {exc}") from None
    if publish_error is not None:
        # The broker is the dead-letter channel too: the refusal is only logged, and
        # the sender retries; its retry overwrites the same blob key.
        raise Rejected(StoreStatus.OUT_OF_RESOURCES, "broker_unavailable", str(publish_error)) from None
    slog.info("stored instance", trace_id=instance.trace_id, study_uid=study_uid, sop_instance_uid=sop_instance_uid,
              modality=instance.modality, calling_ae=calling_ae, source_site=site, bytes=received.blob.size)
    return StoreStatus.SUCCESS


def _incompleteness(event: evt.Event) -> Rejected | None:
    """The refusal of a data set that is cut short or not DICOM at all, else None."""
    try:
        check_complete(event.request.DataSet.getvalue(), str(event.context.transfer_syntax))
    except NotADataSet as exc:
        return Rejected(StoreStatus.CANNOT_UNDERSTAND, "undecodable", f"not a DICOM data set: {exc}")
    except IncompleteDataSet as exc:
        return Rejected(StoreStatus.CANNOT_UNDERSTAND, "truncated", f"incomplete data set: {exc}")
    return None


_upload_pool: ThreadPoolExecutor | None = None
_upload_pool_lock = threading.Lock()


def _uploads() -> ThreadPoolExecutor:
    """Threads for blob uploads; concurrency is bounded by the associations waiting on them."""
    global _upload_pool
    with _upload_pool_lock:
        if _upload_pool is None:
            _upload_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="blob-upload")
        return _upload_pool


def _validated_uids(header: Dataset, request: Any) -> tuple[str, str, str]:
    """The study, series and SOP instance UIDs, checked against PS3.5 9.1 and the request."""
    try:
        study, series, instance, sop_class = instance_uids(header)
    except InvalidInstance as exc:
        raise Rejected(StoreStatus(int(exc.code)), exc.reason, exc.error, exc.offending) from None
    uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance,
            "SOPClassUID": sop_class}
    # PS3.4 B.2.1.x: the data set must be the instance the request announced.
    requested_instance = str(getattr(request, "AffectedSOPInstanceUID", "") or "").strip("\0 ")
    if uids["SOPInstanceUID"] != requested_instance:
        raise Rejected(StoreStatus.DATASET_MISMATCH, "sop_instance_mismatch",
                       f"SOPInstanceUID {uids['SOPInstanceUID']} differs from the request's "
                       f"AffectedSOPInstanceUID {requested_instance}", ["SOPInstanceUID"])
    requested_class = str(getattr(request, "AffectedSOPClassUID", "") or "").strip("\0 ")
    if uids["SOPClassUID"] != requested_class:
        raise Rejected(StoreStatus.DATASET_MISMATCH, "sop_class_mismatch",
                       f"SOPClassUID {uids['SOPClassUID']} differs from the request's "
                       f"AffectedSOPClassUID {requested_class}", ["SOPClassUID"])
    return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]


def instance_received(header: Dataset, blob: BlobRef, event: evt.Event, calling_ae: str,
                      source_site: str | None = None) -> InstanceReceived:
    """The ``InstanceReceived`` event for a validated header and its stored blob."""
    study_uid = header_text(header, "StudyInstanceUID") or ""
    return InstanceReceived(
        trace_id=trace_id_for(study_uid),
        study_uid=study_uid,
        series_uid=header_text(header, "SeriesInstanceUID") or "",
        sop_instance_uid=header_text(header, "SOPInstanceUID") or "",
        sop_class_uid=header_text(header, "SOPClassUID") or "",
        transfer_syntax_uid=str(event.context.transfer_syntax),
        blob_uri=blob.uri,
        blob_size=blob.size,
        blob_sha256=blob.sha256,
        source_site=source_site or calling_ae or "UNKNOWN",
        gateway=STAGE,
        received_at=utcnow(),
        calling_ae=calling_ae,
        called_ae=_called_ae(event),
        **instance_metadata(header),
    )


def _dead_letter(publisher: EventPublisher, store: BlobStore, received: _Received, rejection: Rejected) -> None:
    """Publish the refusal; the instance bytes go inline when small, else by claim check."""
    payload_uri = received.blob.uri if received.blob else None
    payload = None
    if payload_uri is None and received.data:
        if len(received.data) <= INLINE_PAYLOAD_MAX:
            payload = received.data
        else:
            try:
                payload_uri = store.put(rejected_key(received.data), received.data).uri
            except Exception as exc:
                log.error("cannot keep the refused instance (%d bytes, sha256 %s): %s", len(received.data),
                          hashlib.sha256(received.data).hexdigest(), exc)
    try:
        publisher.dead_letter(
            STAGE, rejection.reason, rejection.error,
            key=received.study_uid,
            trace_id=trace_id_for(received.study_uid) if received.study_uid else None,
            payload=payload, payload_uri=payload_uri,
        )
    except Exception as exc:
        log.error("dead letter not published (reason=%s error=%s payload_uri=%s): %s",
                  rejection.reason, rejection.error, payload_uri, exc)


def _status_dataset(rejection: Rejected) -> Dataset:
    status = Dataset()
    status.Status = int(rejection.status)
    status.ErrorComment = rejection.error[:64]  # LO: at most 64 characters (PS3.5 6.2)
    if rejection.offending:
        status.OffendingElement = [Tag(keyword) for keyword in rejection.offending]
    return status


def _encoded_instance(event: evt.Event, calling_ae: str) -> bytes:
    """The instance as a PS3.10 file: preamble, file meta and the data set as received."""
    file_meta = event.file_meta
    if calling_ae:
        file_meta.SourceApplicationEntityTitle = calling_ae
    return b"".join((b"\0" * 128, b"DICM", encode_file_meta(file_meta), event.request.DataSet.getvalue()))


# ---------------------------------------------------------------- header values


def _calling_ae(event: evt.Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return ""


def _called_ae(event: evt.Event) -> str:
    try:
        return str(event.assoc.requestor.primitive.called_ae_title).strip()
    except Exception:
        return ""


def _requested_instance(event: evt.Event) -> str | None:
    try:
        return str(event.request.AffectedSOPInstanceUID or "").strip("\0 ") or None
    except Exception:
        return None


def _trace(received: _Received) -> str:
    return trace_id_for(received.study_uid) if received.study_uid else "-"


def handle_association_request(event: evt.Event, sites: SitePolicy) -> None:
    """EVT_REQUESTED: refuse senders the site policy does not admit, before negotiation.

    Answers A-ASSOCIATE-RJ with Result rejected-permanent, Source DICOM UL service-user
    and Reason 3 (calling AE title not recognized) or 7 (called AE title not
    recognized), PS3.8 9.3.4 and Table 9-21; pynetdicom then skips its own negotiation.
    """
    primitive = event.assoc.requestor.primitive
    calling_ae = str(primitive.calling_ae_title).strip()
    called_ae = str(primitive.called_ae_title).strip()
    refusal = sites.refusal(calling_ae, called_ae)
    if refusal is None:
        return
    reason, why = refusal
    ASSOCIATIONS.labels(outcome="rejected").inc()
    ASSOCIATION_REJECTIONS.labels(reason=reason.name.lower()).inc()
    requestor = event.assoc.requestor
    slog.warning("rejected association", reason=reason.name.lower(), diagnostic=int(reason), error=why,
                 calling_ae=calling_ae, called_ae=called_ae, peer=f"{requestor.address}:{requestor.port}")
    event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, int(reason))
    # As pynetdicom does after its own rejections: wait until the DUL has sent the
    # A-ASSOCIATE-RJ, or closing the socket would reach the peer as an abort.
    event.assoc.kill()


def _on_accepted(event: evt.Event) -> None:
    ASSOCIATIONS.labels(outcome="accepted").inc()
    requestor = event.assoc.requestor
    log.info("association accepted from %s (%s:%s)", _calling_ae(event), requestor.address, requestor.port)
    for context in event.assoc.rejected_contexts:
        # PS3.8 9.3.3.2: result 3 abstract syntax (SOP class) not supported, 4 no transfer syntax.
        reason = {0x03: "abstract_syntax_not_supported", 0x04: "transfer_syntaxes_not_supported"}.get(
            context.result, f"presentation_context_result_{context.result}")
        ASSOCIATION_REJECTIONS.labels(reason=reason).inc()
        slog.warning("rejected presentation context", reason=reason, calling_ae=_calling_ae(event),
                     abstract_syntax=str(context.abstract_syntax), context_id=context.context_id)


def _on_aborted(event: evt.Event) -> None:
    ASSOCIATIONS.labels(outcome="aborted").inc()
    log.warning("association with %s aborted", _calling_ae(event))


def _on_rejected(event: evt.Event) -> None:
    # pynetdicom's own rejections (e.g. maximum_associations reached: transient, reason 2).
    ASSOCIATIONS.labels(outcome="rejected").inc()
    ASSOCIATION_REJECTIONS.labels(reason="local_limit_exceeded").inc()
    slog.warning("rejected association", reason="local_limit_exceeded", calling_ae=_calling_ae(event))


# ---------------------------------------------------------------- the AE


class GatewayAE(AE):
    """A pynetdicom AE whose servers get the gateway's event handlers bound by default."""

    def __init__(self, ae_title: str, handlers: list[Any]) -> None:
        super().__init__(ae_title)
        self.gateway_handlers = handlers

    def start_server(self, address: Any, block: bool = True, ssl_context: Any = None,
                     evt_handlers: list[Any] | None = None, ae_title: str | None = None,
                     contexts: Any = None) -> ThreadedAssociationServer | None:
        handlers = [*self.gateway_handlers, *(evt_handlers or [])]
        return super().start_server(address, block, ssl_context, handlers, ae_title, contexts)


def event_handlers(store: BlobStore, publisher: EventPublisher, sites: SitePolicy | None = None) -> list[Any]:
    """The pynetdicom ``evt_handlers`` of the gateway."""
    sites = sites or SitePolicy("", {})
    return [
        (evt.EVT_REQUESTED, handle_association_request, [sites]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store, publisher, sites]),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_ABORTED, _on_aborted),
        (evt.EVT_REJECTED, _on_rejected),
    ]


def build_ae(settings: Settings, store: BlobStore, publisher: EventPublisher) -> GatewayAE:
    """The gateway's AE: Verification and every storage SOP class, each with every
    transfer syntax pynetdicom knows (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000,
    HTJ2K, RLE, MPEG/HEVC), since the data set is stored as received and never decoded."""
    ae = GatewayAE(settings.dicom.ae_title, event_handlers(store, publisher, SitePolicy.from_settings(settings)))
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = settings.dicom.max_associations
    ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA PDUs from the sender
    ae.acse_timeout = settings.dicom.acse_timeout_s
    ae.dimse_timeout = settings.dicom.dimse_timeout_s
    ae.network_timeout = settings.dicom.network_timeout_s
    return ae


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets do the TLS handshake in the association's
    thread: pynetdicom wraps accepted sockets in its accept loop, where a blocking
    handshake would let one silent or plain-TCP client stall every other sender.

    The handshake then happens on the first read (OpenSSL completes it implicitly);
    the socket's timeout (the network timeout) bounds a peer that never finishes it.
    """

    handshake_timeout_s: float = 60.0

    def wrap_socket(self, sock: Any, server_side: bool = False, do_handshake_on_connect: bool = True,
                    *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.handshake_timeout_s)
            do_handshake_on_connect = False
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, *args, **kwargs)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context of ``dicom.tls_*`` (None without ``tls_cert``): TLS 1.2 or
    later (BCP 195, as PS3.15 B.9 profiles require); client certificates verified
    against ``tls_ca`` when it is set. Raises ``OSError``/``ssl.SSLError`` on bad files."""
    dicom = settings.dicom
    if dicom.tls_cert is None:
        return None
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout_s = dicom.network_timeout_s
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(dicom.tls_cert, dicom.tls_key)
    if dicom.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=dicom.tls_ca)
    return context


def start_gateway(settings: Settings, store: BlobStore, publisher: EventPublisher) -> ThreadedAssociationServer:
    """Start the SCP on ``settings.bind_host:settings.dicom.port`` without blocking
    (over TLS when ``dicom.tls_cert`` is set)."""
    ae = build_ae(settings, store, publisher)
    server = ae.start_server((settings.bind_host, settings.dicom.port), block=False,
                             ssl_context=tls_context(settings))
    assert server is not None
    return server


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM or SIGINT; flush the publisher on the way out."""
    store = open_blob_store(settings)
    publisher = EventPublisher(settings, client_id=f"{settings.kafka.client_id}-dicom-scp")
    if settings.metrics.gateway_port:
        start_http_server(settings.metrics.gateway_port, addr=settings.bind_host)
    server = start_gateway(settings, store, publisher)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("DICOM gateway %s listening on %s:%d%s (blobs %s, broker %s, metrics port %s, %s)",
             settings.dicom.ae_title, settings.bind_host, settings.dicom.port,
             " over TLS" if settings.dicom.tls_cert else "", store, settings.kafka_bootstrap,
             settings.metrics.gateway_port or "off",
             "any calling AE" if settings.dicom.allow_unknown_ae else f"{len(settings.dicom.sites())} allowed AEs")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()  # waits for running associations' handlers to return
        publisher.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("DICOM gateway stopped")
    return 0


def main() -> int:
    settings = start_component("dicom-gateway", lambda s: [
        (s.dicom.port, "the DICOM gateway"), (s.metrics.gateway_port, "the DICOM gateway's metrics")])
    if settings.log_level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        tls_context(settings)  # unreadable certificate or key: one line, exit 2, like a bad setting
    except (OSError, ssl.SSLError) as exc:
        print(f"error: DICOM TLS (dicom.tls_cert/tls_key/tls_ca): {exc}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
