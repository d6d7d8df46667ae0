"""Who may associate with the DICOM gateway, and over what (PS3.8 9.3.4, PS3.15 Annex B.1).

The listener speaks TLS when ``dicom.tls_cert`` is set, requiring client certificates
when ``dicom.tls_ca`` is (:func:`tls_context`). Each association request is checked
against the calling-AE allow-list (``dicom.site_map`` with ``allow_unknown_ae = false``)
and optionally the called AE title (:class:`SitePolicy`); a refused one gets
A-ASSOCIATE-RJ (rejected-permanent, service-user, reason 3 or 7), a log line naming the
reason and a count in ``radstream_dicom_association_rejections``. The same policy names
the ``source_site`` of every instance a calling AE title sends. Log lines go to the
DICOM gateway's own loggers.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from prometheus_client import Counter
from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from adapters.telemetry import get_logger
from schemas.settings import Settings

log = logging.getLogger("radstream.gateways.dicom_scp")
slog = get_logger("radstream.gateways.dicom_scp")

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


def handle_accepted(event: evt.Event) -> None:
    ASSOCIATIONS.labels(outcome="accepted").inc()
    requestor = event.assoc.requestor
    log.info("association accepted from %s (%s:%s)", calling_ae_of(event), requestor.address, requestor.port)
    for context in event.assoc.rejected_contexts:
        # PS3.8 9.3.3.2: result 3 abstract syntax (SOP class) not supported, 4 no transfer syntax.
        reason = {0x03: "abstract_syntax_not_supported", 0x04: "transfer_syntaxes_not_supported"}.get(
            context.result, f"presentation_context_result_{context.result}")
        ASSOCIATION_REJECTIONS.labels(reason=reason).inc()
        slog.warning("rejected presentation context", reason=reason, calling_ae=calling_ae_of(event),
                     abstract_syntax=str(context.abstract_syntax), context_id=context.context_id)


def handle_aborted(event: evt.Event) -> None:
    ASSOCIATIONS.labels(outcome="aborted").inc()
    log.warning("association with %s aborted", calling_ae_of(event))


def handle_rejected(event: evt.Event) -> None:
    # pynetdicom's own rejections (e.g. maximum_associations reached: transient, reason 2).
    ASSOCIATIONS.labels(outcome="rejected").inc()
    ASSOCIATION_REJECTIONS.labels(reason="local_limit_exceeded").inc()
    slog.warning("rejected association", reason="local_limit_exceeded", calling_ae=calling_ae_of(event))


def calling_ae_of(event: evt.Event) -> str:
    """The calling AE title of the event's association, padding stripped ("" if unknown)."""
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return ""


# ---------------------------------------------------------------- connections before association


class SharedContexts(list):
    """The server's supported presentation contexts, handed to every association as a new
    list of the same context objects.

    pynetdicom deep-copies the server's contexts into each association it accepts: for
    every storage SOP class with every transfer syntax that is ~150 contexts and ~4,500
    UIDs, ~50 ms of CPU per association (6 % of the gateway's samples under a 4-association
    load, far more for senders that open one association per CR image). Negotiation
    (``negotiate_as_acceptor``) only reads them and builds new contexts for its result,
    and nothing changes them after the server starts, so a shallow copy is enough.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class PeerLimitedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, refusing at accept a peer address that already holds
    ``max_unassociated_per_peer`` connections without an association.

    Every accepted connection takes one of ``max_associations`` slots until it is
    associated and released, or until ARTIM expires (PS3.8 9.1.5, ``artim_timeout_s``);
    idle TCP connections from one address could otherwise hold every slot while real
    senders get A-ASSOCIATE-RJ. A refused connection is closed before any PDU: the
    standard has no answer for a peer that sent none. ``verify_request`` runs after the
    accept and before the association's thread, so TLS handshakes stay deferred to it.
    """

    def __init__(self, *args: Any, max_unassociated_per_peer: int = 4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)
        self.max_unassociated_per_peer = max_unassociated_per_peer
        # Connections (host, port) accepted and not yet past Sta2 (PS3.8 9.2: awaiting
        # A-ASSOCIATE-RQ). Kept here from the accept on, since an association's thread
        # and its state machine start a moment later and a burst of connects would slip by.
        self._waiting: set[tuple[str, int]] = set()
        self._waiting_lock = threading.Lock()
        self.bind(evt.EVT_FSM_TRANSITION, self._on_transition)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host, port = _host_port(client_address)
        with self._waiting_lock:
            waiting = sum(1 for peer in self._waiting if peer[0] == host)
            if waiting < self.max_unassociated_per_peer:
                self._waiting.add((host, port))
                return True
        ASSOCIATION_REJECTIONS.labels(reason="peer_unassociated_limit").inc()
        slog.info("closed DICOM connection at accept", peer=host, unassociated=waiting,
                  limit=self.max_unassociated_per_peer,
                  reason="the peer already holds connections without an A-ASSOCIATE-RQ")
        return False

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            super().finish_request(request, client_address)
        except BaseException:  # no association thread: nothing will leave Sta2 for it
            self._left(_host_port(client_address))
            raise

    def _on_transition(self, event: evt.Event) -> None:
        # Leaving Sta2: the A-ASSOCIATE-RQ came (Sta3), or the connection closed or ARTIM
        # expired (Sta1). A connection whose TLS handshake failed leaves it too.
        if event.current_state == "Sta2" and event.next_state != "Sta2":
            self._left((str(event.assoc.requestor.address), int(event.assoc.requestor.port)))

    def _left(self, peer: tuple[str, int]) -> None:
        with self._waiting_lock:
            self._waiting.discard(peer)


def _host_port(client_address: Any) -> tuple[str, int]:
    if isinstance(client_address, tuple):
        return str(client_address[0]), int(client_address[1])
    return str(client_address), 0


class PeerGoneIsInfo(logging.Filter):
    """pynetdicom logs a peer that closes or resets its connection mid-PDU, or fails its
    TLS handshake, as an error with a traceback (``pynetdicom.dul``). That is the peer's
    doing, not a fault of the gateway: it becomes one info line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) or record.getMessage().startswith("Connection closed before the entire PDU"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            if exc is not None:
                record.msg, record.args = f"peer connection lost: {type(exc).__name__}: {exc}", ()
                record.exc_info, record.exc_text = None, None
        return True


# ---------------------------------------------------------------- TLS


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
