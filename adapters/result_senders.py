"""Result senders: hand one built result document to one destination, one function per protocol.

Each returns the receiver's acknowledgement in words on success and raises
:class:`DeliveryError` otherwise, saying whether another attempt can help: the delivery
stage retries with backoff what is ``retryable`` (the network, a busy or failing receiver)
and dead-letters the rest (a receiver that refused the document for what it is). Blocking
I/O with a timeout on every wait, so a worker thread never hangs on a silent peer.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from email.utils import parsedate_to_datetime
from typing import Any

import hl7
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import code_to_category

START_BLOCK = b"\x0b"  # MLLP (HL7 v2.5 Appendix C.4): VT message FS CR
END_BLOCK = b"\x1c\x0d"
#: HL7 table 0357 "Application internal error": the receiver asks the sender to try again.
_HL7_RETRY_ERROR = "207"
#: HTTP statuses another attempt can cure (RFC 9110: timeout, too many requests, server side).
_HTTP_RETRYABLE = {408, 425, 429}


class DeliveryError(Exception):
    """A delivery attempt failed; ``retryable`` says whether a later attempt can succeed,
    ``retry_after_s`` how long the receiver asked to wait (HTTP Retry-After), when it did."""

    def __init__(self, reason: str, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s


# ---------------------------------------------------------------- DICOM C-STORE (PS3.4 Annex B)


def store_sr(ds: Dataset, *, host: str, port: int, called_ae: str, calling_ae: str = "RADSTREAM",
             tls: ssl.SSLContext | None = None, timeout_s: float = 30) -> str:
    """C-STORE one SR to a Storage SCP (a PACS), over TLS when ``tls`` is given (PS3.15 B.1).

    No association, a transient rejection (PS3.8 9.3.4, result 2) or a lost one is retryable; a
    permanent rejection (result 1: unknown AE title, say), no accepted presentation context for
    the SR class, or a C-STORE failure status (PS3.4 B.2.3: A7xx out of resources, A9xx data set
    does not match the SOP class, Cxxx cannot understand) is not: the same document would be
    refused again. Success and warning statuses (B000, B007, B006) are stored.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (tls, host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    try:
        if assoc.is_rejected:
            permanent = assoc.acceptor.primitive is not None and assoc.acceptor.primitive.result == 0x01
            raise DeliveryError(f"association rejected by {called_ae}@{host}:{port}"
                                f"{' (permanent)' if permanent else ''}", retryable=not permanent)
        accepted = assoc.acceptor.primitive is not None and assoc.acceptor.primitive.result == 0x00
        if accepted and not assoc.accepted_contexts:  # pynetdicom then aborts the association
            raise DeliveryError(f"{called_ae} accepts no presentation context for {ds.SOPClassUID}",
                                retryable=False)
        if not assoc.is_established:
            raise DeliveryError(f"no association with {called_ae}@{host}:{port} (refused, aborted or timed out)",
                                retryable=True)
        _no_delay(assoc)
        try:
            status = assoc.send_c_store(ds)
        except ValueError as exc:  # no context for the data set's encoding, or not encodable
            raise DeliveryError(f"cannot send {ds.SOPInstanceUID}: {exc}".splitlines()[0], retryable=False) from None
        if "Status" not in status:
            raise DeliveryError(f"no C-STORE response from {called_ae} (timeout or association aborted)",
                                retryable=True)
        code = int(status.Status)
        comment = f" ({status.ErrorComment})" if status.get("ErrorComment") else ""
        if code_to_category(code) not in ("Success", "Warning"):
            raise DeliveryError(f"C-STORE failed with status 0x{code:04X}{comment}", retryable=False)
        return f"C-STORE 0x{code:04X}{comment} {ds.SOPInstanceUID}"
    finally:
        if assoc.is_established:
            assoc.release()


def _no_delay(assoc: Any) -> None:
    """Disable Nagle: with delayed ACKs each small PDU write waits ~40 ms for nothing."""
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # pynetdicom internals moved, or a TLS wrapper: only slower
        pass


# ---------------------------------------------------------------- HL7 v2 over MLLP


def _read_frame(sock: socket.socket, deadline: float) -> bytes:
    """The content of the next MLLP block; bytes before its start block are skipped."""
    buffer = b""
    while True:
        start = buffer.find(START_BLOCK)
        if start >= 0 and (end := buffer.find(END_BLOCK, start + 1)) >= 0:
            return buffer[start + 1:end]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the receiver closed the connection without an ACK")
        buffer += chunk


def send_mllp(message: str, *, host: str, port: int, timeout_s: float = 30, tls: ssl.SSLContext | None = None) -> str:
    """Send one HL7 v2 message framed by MLLP and wait for its ACK (original mode, v2.5 2.9.2).

    MSA-1 ``AA``/``CA`` is success. ``AE``/``CE`` (application error) is retryable; ``AR``/``CR``
    (reject) is not, unless ERR-3 is 207 "application internal error", the receiver's way of
    saying it could not take the message now. No ACK within ``timeout_s``, a closed connection or
    an ACK for another message (MSA-2 is not our MSH-10) are retryable.
    """
    control_id = hl7.parse(message).extract_field("MSH", 1, 10)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with tls.wrap_socket(raw, server_hostname=host) if tls is not None else nullcontext(raw) as sock:
                sock.sendall(START_BLOCK + message.encode("utf-8") + END_BLOCK)
                reply = _read_frame(sock, deadline)
    except TimeoutError:
        raise DeliveryError(f"no ACK from {host}:{port} within {timeout_s:g} s", retryable=True) from None
    except OSError as exc:  # refused, reset, closed, TLS handshake
        raise DeliveryError(f"MLLP connection to {host}:{port} failed: {exc}", retryable=True) from None
    try:
        # Lenient in what it accepts: LF or CRLF segment ends and blank segments occur in the field.
        segments = reply.decode("utf-8", errors="replace").replace("\r\n", "\r").replace("\n", "\r").split("\r")
        ack = hl7.parse("\r".join(segment for segment in segments if segment))
        code, acked_id, text = (ack.extract_field("MSA", 1, n) for n in (1, 2, 3))
    except (KeyError, IndexError, ValueError, hl7.HL7Exception):
        raise DeliveryError(f"unreadable ACK from {host}:{port}: {reply[:200]!r}", retryable=True) from None
    if acked_id != control_id:
        raise DeliveryError(f"ACK for message {acked_id!r}, not {control_id!r}", retryable=True)
    if code in ("AA", "CA"):
        return f"{code} {control_id}"
    err_count = sum(1 for segment in ack if str(segment(0)) == "ERR")
    errors = [ack.extract_field("ERR", n, 3, 1, 1) for n in range(1, err_count + 1)]
    detail = f"{code} {control_id}" + (f": {text}" if text else "")
    detail += f" (ERR-3 {', '.join(errors)})" if errors else ""
    if code in ("AE", "CE"):
        raise DeliveryError(f"application error: {detail}", retryable=True)
    raise DeliveryError(f"rejected: {detail}", retryable=_HL7_RETRY_ERROR in errors)


# ---------------------------------------------------------------- HTTP (webhooks, FHIR)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would arrive as a GET without its body (urllib, 301-303): refuse instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (RFC 9110 10.2.3: delay-seconds or an HTTP-date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float,
          ssl_context: ssl.SSLContext | None) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=ssl_context))
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode("utf-8", errors="replace")
        retryable = exc.code in _HTTP_RETRYABLE or exc.code >= 500
        raise DeliveryError(f"HTTP {exc.code} from {url}: {detail}".rstrip(": "), retryable=retryable,
                            retry_after_s=_retry_after(exc.headers.get("Retry-After"))) from None
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, TLS, timeout
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"POST {url} failed: {reason}", retryable=True) from None


def post_json(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float = 15,
              ssl_context: ssl.SSLContext | None = None) -> str:
    """POST a JSON body (a webhook). 2xx is success; 408, 425, 429, 5xx and network failures are
    retryable (with the receiver's Retry-After, when sent); other statuses, redirects included,
    are not: the receiver refused this request for what it is."""
    status, _, _ = _post(url, body, {"Content-Type": "application/json", **headers}, timeout_s, ssl_context)
    return f"HTTP {status}"


def post_fhir(base_url: str, bundle: dict[str, Any], *, token: str | None = None, timeout_s: float = 15,
              ssl_context: ssl.SSLContext | None = None) -> str:
    """POST a transaction Bundle to a FHIR server's base URL (FHIR R4 3.1.0.11: transaction).

    Returns the DiagnosticReport's location from the transaction-response (``DiagnosticReport/
    <id>/_history/<n>``) when the server sends it, else the HTTP status. Errors as :func:`post_json`;
    a refused transaction's OperationOutcome is in the reason.
    """
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, _, raw = _post(base_url.rstrip("/"), json.dumps(bundle).encode(), headers, timeout_s, ssl_context)
    try:
        response = json.loads(raw) if raw else {}
    except ValueError:
        return f"HTTP {status}"
    for entry in response.get("entry", []) if isinstance(response, dict) else []:
        location = (entry.get("response") or {}).get("location", "")  # relative or absolute
        if location.startswith("DiagnosticReport/") or "/DiagnosticReport/" in location:
            return location
    return f"HTTP {status}"
