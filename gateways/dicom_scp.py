"""DICOM gateway: a C-STORE / C-ECHO SCP that turns received instances into events.

Sites' PACS and modalities push studies here over DICOM (PS3.4 Annex B Storage
Service Class, PS3.4 Annex A Verification, DIMSE per PS3.7). For every C-STORE the
handler takes the dataset exactly as it was sent (no pixel decoding), walks its encoded
elements once to check it is whole, each element once, and to read its header, checks
it came on a presentation context of its SOP class (PS3.8 9.3.5.1) and is the instance
the request announced, and hands the PS3.10 file
to the shared intake (:mod:`gateways.intake`): validated UIDs, the file in the
claim-check blob store, an ``InstanceReceived`` event acknowledged by the broker; only
then does the sender get Success (0x0000). Every failure answers with the PS3.4 B.2.3
/ PS3.7 C status a sender acts on (a :class:`~gateways.validation.FailureReason`:
0xA700 Out of Resources: retry later; 0xA900 / 0xC000: do not retry as is) and is
published as a ``DeadLetter`` event, unless the broker itself is unreachable, in which
case it is logged. pynetdicom runs each association in its own thread, so stores from
several senders overlap.

Security (PS3.15 Annex B.1 TLS, PS3.8 9.3.4 association rejection): the listener binds
``settings.bind_host`` (127.0.0.1 unless configured); who may associate, and over TLS
with which certificates, is :mod:`gateways.dicom_associations`. Every instance event
carries ``source_site``, the site the calling AE title maps to.

Run it with ``python -m gateways.dicom_scp`` (settings from ``RADSTREAM_*``).
"""

from __future__ import annotations

import logging
import ssl
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from io import BytesIO
from typing import Any

from prometheus_client import Counter, Histogram
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from adapters.blobs import open_blob_store
from adapters.telemetry import get_logger
from gateways import dicom_reactor
from gateways.deadletter import BROKER_UNAVAILABLE
from gateways.dicom_associations import (
    PeerGoneIsInfo,
    PeerLimitedServer,
    SitePolicy,
    calling_ae_of,
    handle_aborted,
    handle_accepted,
    handle_association_request,
    handle_rejected,
    tls_context,
)
from gateways.dicom_wire import encode_file_meta
from gateways.intake import InstanceIntake, Received
from gateways.publisher import EventPublisher
from gateways.serving import GatewayProcess, run
from gateways.validation import FailureReason, InstanceUids, InvalidInstance, check_encoding, walked_header
from schemas.blobs import BlobStore
from schemas.settings import Settings, SettingsError

log = logging.getLogger("radstream.gateways.dicom_scp")
slog = get_logger("radstream.gateways.dicom_scp")  # structured: fields, not formatted text

STAGE = "dicom-scp"
#: PS3.4 B.2.3 / PS3.7 C: the C-STORE and C-ECHO status Success. Every other status this
#: gateway answers with is a :class:`FailureReason`, the numbers STOW-RS reports too.
SUCCESS = 0x0000


INSTANCES = Counter(
    "radstream_dicom_instances", "C-STORE requests answered by the DICOM gateway, by DIMSE status",
    ["status"],
)
STORE_SECONDS = Histogram(
    "radstream_dicom_store_seconds", "C-STORE handling time: header read, blob write, broker ack",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


# ---------------------------------------------------------------- handlers


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO: Verification Service (PS3.4 Annex A) always succeeds while we run."""
    log.debug("C-ECHO from %s", calling_ae_of(event))
    return SUCCESS


def handle_store(event: evt.Event, intake: InstanceIntake, sites: SitePolicy | None = None) -> Dataset | int:
    """EVT_C_STORE: validate, store the blob, publish ``InstanceReceived``, then answer.

    ``sites`` names the site of the calling AE title (default: the AE title itself).

    Returns the C-STORE response status (PS3.4 B.2.3), as a Dataset carrying an
    Error Comment (0000,0902) and Offending Element (0000,0901) on failure. Never raises.
    """
    started = time.perf_counter()
    received = Received()
    refusal: InvalidInstance | None = None
    try:
        _receive(event, intake, received, sites)
    except InvalidInstance as exc:
        refusal = exc
    except Exception as exc:  # a bug of ours: answer, dead-letter, keep serving
        log.exception("C-STORE from %s failed: trace_id=%s", calling_ae_of(event), received.trace_id or "-")
        refusal = InvalidInstance.internal_error(exc)
    status, answer = SUCCESS, SUCCESS
    if refusal is not None:
        status, answer = refusal.code, _status_dataset(refusal)
        (slog.error if refusal.reason == BROKER_UNAVAILABLE else slog.warning)(
            "refused C-STORE", calling_ae=calling_ae_of(event), reason=refusal.reason,
            sop_instance_uid=_requested_instance(event), status=f"0x{status:04X}",
            trace_id=received.trace_id or "-", blob=received.blob.uri if received.blob else None,
            error=refusal.error)
        intake.refuse(received, refusal)
    INSTANCES.labels(status=f"0x{status:04X}").inc()
    STORE_SECONDS.observe(time.perf_counter() - started)
    return answer


def _receive(event: evt.Event, intake: InstanceIntake, received: Received, sites: SitePolicy | None) -> None:
    """Read the data set as sent, check it is whole and the announced instance, and take it in."""
    calling_ae = calling_ae_of(event)
    transfer_syntax = str(event.context.transfer_syntax)
    try:
        received.data = _encoded_instance(event, calling_ae)
    except Exception as exc:  # e.g. a request without its data set
        raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "undecodable",
                              f"cannot read the data set: {exc}") from None
    try:
        # The walk over every encoded element (a cut-short data set is called that before its
        # UIDs are judged) also gives the header, read without parsing the bytes again.
        shape = check_encoding(received.data, transfer_syntax, header=True)
    except InvalidInstance:
        _note_readable_header(received)  # so the refusal is keyed and traced by study, if it can be
        raise
    header = walked_header(shape) or _read_header(received)
    received.note(header)  # so a refusal below is keyed and traced by study
    _check_context(event)
    site = (sites.site_for(calling_ae) if sites else "") or calling_ae or "UNKNOWN"
    intake.receive(received, site, header=header, transfer_syntax=transfer_syntax, shape=shape,
                   calling_ae=calling_ae, called_ae=_called_ae(event),
                   check=lambda uids: _check_announced(uids, event.request))


def _read_header(received: Received) -> Dataset:
    """The header by pydicom's own reading, for a whole data set :func:`walked_header` leaves to it."""
    try:
        return dcmread(BytesIO(received.data), stop_before_pixels=True)
    except Exception as exc:
        raise InvalidInstance(FailureReason.CANNOT_UNDERSTAND, "undecodable",
                              f"cannot parse the data set: {exc}") from None


def _note_readable_header(received: Received) -> None:
    """Note the UIDs of a data set the walk refused, as far as pydicom reads them (it reads a
    cut-short value as a shorter one); nothing if it cannot."""
    try:
        received.note(_read_header(received))
    except Exception:  # the walk's refusal stands either way
        pass


def _check_context(event: evt.Event) -> None:
    """PS3.7 9.1.1.1 / PS3.8 9.3.5.1: a C-STORE's Affected SOP Class UID must be the abstract
    syntax of the presentation context it came on.

    pynetdicom hands EVT_C_STORE any C-STORE whatever its context (the Verification
    context included), so the data set would be read in a transfer syntax negotiated
    for another SOP class: it is refused 0x0122, SOP class not supported on this context.
    """
    requested_class = str(getattr(event.request, "AffectedSOPClassUID", "") or "").strip("\0 ")
    context_class = str(event.context.abstract_syntax)
    if requested_class != context_class:
        raise InvalidInstance(FailureReason.SOP_CLASS_NOT_SUPPORTED, "context_mismatch",
                              f"C-STORE of {requested_class or '(no SOP class)'} on presentation context "
                              f"{event.context.context_id}, negotiated for {context_class} (PS3.8 9.3.5.1)",
                              ["AffectedSOPClassUID"])


def _check_announced(uids: InstanceUids, request: Any) -> None:
    """PS3.4 B.2.1.x: the data set must be the instance the request announced."""
    requested_instance = str(getattr(request, "AffectedSOPInstanceUID", "") or "").strip("\0 ")
    if uids.sop_instance_uid != requested_instance:
        raise InvalidInstance(FailureReason.DATASET_MISMATCH, "sop_instance_mismatch",
                              f"SOPInstanceUID {uids.sop_instance_uid} differs from the request's "
                              f"AffectedSOPInstanceUID {requested_instance}", ["SOPInstanceUID"])
    requested_class = str(getattr(request, "AffectedSOPClassUID", "") or "").strip("\0 ")
    if uids.sop_class_uid != requested_class:
        raise InvalidInstance(FailureReason.DATASET_MISMATCH, "sop_class_mismatch",
                              f"SOPClassUID {uids.sop_class_uid} differs from the request's "
                              f"AffectedSOPClassUID {requested_class}", ["SOPClassUID"])


def _status_dataset(refusal: InvalidInstance) -> Dataset:
    status = Dataset()
    status.Status = int(refusal.code)
    status.ErrorComment = refusal.error[:64]  # LO: at most 64 characters (PS3.5 6.2)
    if refusal.offending:
        status.OffendingElement = [Tag(keyword) for keyword in refusal.offending]
    return status


def _encoded_instance(event: evt.Event, calling_ae: str) -> bytes:
    """The instance as a PS3.10 file: preamble, file meta and the data set as received.

    The file meta is pynetdicom's (``Event.file_meta``: the request's UIDs, the context's
    transfer syntax, pynetdicom's implementation UID), encoded directly: building and
    writing it as a pydicom data set cost ~0.55 ms per instance.
    """
    request = event.request
    file_meta = encode_file_meta(str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
                                 str(event.context.transfer_syntax), PYNETDICOM_IMPLEMENTATION_UID,
                                 PYNETDICOM_IMPLEMENTATION_VERSION, calling_ae)
    return b"".join((b"\0" * 128, b"DICM", file_meta, request.DataSet.getvalue()))


# ---------------------------------------------------------------- header values


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


# ---------------------------------------------------------------- the AE


class GatewayAE(AE):
    """A pynetdicom AE whose servers get the gateway's event handlers bound by default."""

    def __init__(self, ae_title: str, handlers: list[Any], max_unassociated_per_peer: int = 2) -> None:
        super().__init__(ae_title)
        self.gateway_handlers = handlers
        self.max_unassociated_per_peer = max_unassociated_per_peer

    def make_server(self, address: Any, ae_title: str | None = None, contexts: Any = None, ssl_context: Any = None,
                    evt_handlers: list[Any] | None = None, server_class: Any = None,
                    **kwargs: Any) -> ThreadedAssociationServer:
        # Threaded (as start_server asks for), with the per-peer limit at accept.
        return super().make_server(address, ae_title, contexts, ssl_context, evt_handlers,
                                   server_class=PeerLimitedServer,
                                   max_unassociated_per_peer=self.max_unassociated_per_peer, **kwargs)

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
        (evt.EVT_C_STORE, handle_store, [InstanceIntake(store, publisher, STAGE), sites]),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_ABORTED, handle_aborted),
        (evt.EVT_REJECTED, handle_rejected),
    ]


def build_ae(settings: Settings, store: BlobStore, publisher: EventPublisher) -> GatewayAE:
    """The gateway's AE: Verification and every storage SOP class, each with every
    transfer syntax pynetdicom knows (uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000,
    HTJ2K, RLE, MPEG/HEVC), since the data set is stored as received and never decoded."""
    dicom_reactor.install()  # pynetdicom's reactors wait for work instead of polling every 1 ms
    ae = GatewayAE(settings.dicom.ae_title, event_handlers(store, publisher, SitePolicy.from_settings(settings)),
                   settings.dicom.max_unassociated_per_peer)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = settings.dicom.max_associations
    ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA PDUs from the sender
    # For an acceptor, pynetdicom's ACSE timeout is the ARTIM timer (PS3.8 9.1.5): how long
    # an accepted connection may wait for its A-ASSOCIATE-RQ (or, released, for the close)
    # while holding one of max_associations slots.
    ae.acse_timeout = min(settings.dicom.acse_timeout_s, settings.dicom.artim_timeout_s)
    ae.dimse_timeout = settings.dicom.dimse_timeout_s
    ae.network_timeout = settings.dicom.network_timeout_s
    return ae


def start_gateway(settings: Settings, store: BlobStore, publisher: EventPublisher) -> ThreadedAssociationServer:
    """Start the SCP on ``settings.bind_host:settings.dicom.port`` without blocking
    (over TLS when ``dicom.tls_cert`` is set)."""
    ae = build_ae(settings, store, publisher)
    server = ae.start_server((settings.bind_host, settings.dicom.port), block=False,
                             ssl_context=tls_context(settings))
    assert server is not None
    return server


@asynccontextmanager
async def _listening(settings: Settings, publisher: EventPublisher) -> AsyncIterator[None]:
    store = open_blob_store(settings)
    server = start_gateway(settings, store, publisher)
    log.info("DICOM gateway %s listening on %s:%d%s (blobs %s, broker %s, metrics port %s, %s)",
             settings.dicom.ae_title, settings.bind_host, settings.dicom.port,
             " over TLS" if settings.dicom.tls_cert else "", store, settings.kafka_bootstrap,
             settings.metrics.gateway_port or "off",
             "any calling AE" if settings.dicom.allow_unknown_ae else f"{len(settings.dicom.sites())} allowed AEs")
    try:
        yield
    finally:
        server.shutdown()  # waits for running associations' handlers to return


def _prepare(settings: Settings) -> None:
    if settings.log_level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # pynetdicom's standard handlers of every PDU and DIMSE message only log, at INFO and
        # DEBUG, which the line above drops; unbound, they stop formatting those lines and
        # copying each C-STORE's data set to see whether it is empty.
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom.dul").addFilter(PeerGoneIsInfo())
    try:
        tls_context(settings)  # unreadable certificate or key: one line, exit 2, like a bad setting
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"DICOM TLS (dicom.tls_cert/tls_key/tls_ca): {exc}") from None


#: ``python -m gateways.dicom_scp``: the SCP, its metrics, and the TLS files checked first.
PROCESS = GatewayProcess(
    component="dicom-gateway", title="DICOM gateway", stage=STAGE, port=lambda s: s.dicom.port,
    metrics_port=lambda s: s.metrics.gateway_port, listening=_listening, log=log, prepare=_prepare)


if __name__ == "__main__":
    sys.exit(run(PROCESS))
