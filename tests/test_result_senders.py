"""Result senders against real peers that are not ours.

Orthanc stores the SR (read back over its REST API, parsed by highdicom and dcmtk's dsrdump);
the ``hl7`` package's asyncio MLLP server parses the ORU and answers AA, AE or nothing; an
HTTP receiver checks the webhook signature with :func:`verify_webhook` or answers an error.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import highdicom as hd
import hl7
import hl7.mllp
import pytest
from pydicom.uid import Comprehensive3DSRStorage, CTImageStorage
from pynetdicom import AE, evt

from adapters.result_documents import (
    build_fhir,
    build_oru,
    build_sr,
    idempotency_key,
    sign_webhook,
    verify_webhook,
    webhook_payload,
)
from adapters.result_senders import DeliveryError, post_fhir, post_json, send_mllp, store_sr
from load.hl7_peer import MllpPeer
from load.orthanc_peer import Orthanc, start_orthanc
from radstream import procs
from tests.test_result_documents import corrected_result, final_result, preliminary_result

pytestmark = pytest.mark.integration

SECRET = b"webhook-secret"


# ---------------------------------------------------------------- DICOM: Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not Path("/usr/sbin/Orthanc").exists():
        pytest.skip("Orthanc is not installed")
    peer = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield peer
    finally:
        peer.stop()


def test_sr_stored_in_orthanc_reads_back_as_the_same_report(orthanc: Orthanc, tmp_path: Path) -> None:
    ds = build_sr(corrected_result(), previous=final_result())
    port = orthanc.request("GET", "/system")["DicomPort"]

    ack = store_sr(ds, host="127.0.0.1", port=port, called_ae="ORTHANC", timeout_s=10)

    assert ack.startswith("C-STORE 0x0000") and ds.SOPInstanceUID in ack
    (found,) = orthanc.request("POST", "/tools/lookup", ds.SOPInstanceUID.encode())
    with urllib.request.urlopen(f"{orthanc.url}/instances/{found['ID']}/file", timeout=10) as response:
        stored = response.read()
    sr = hd.sr.srread(io.BytesIO(stored))
    assert (sr.SOPInstanceUID, sr.StudyInstanceUID, sr.PatientID) == (ds.SOPInstanceUID, ds.StudyInstanceUID, "1CT1")
    assert [g.finding_type.meaning for g in sr.content.get_image_measurement_groups()] == ["Hemorrhage"]
    assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID \
        == ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
    if shutil.which("dsrdump"):
        path = tmp_path / "stored.dcm"
        path.write_bytes(stored)
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=30)
        assert dump.returncode == 0 and "Certainty of Finding" in dump.stdout, dump.stderr

    again = store_sr(ds, host="127.0.0.1", port=port, called_ae="ORTHANC", timeout_s=10)
    assert again.startswith("C-STORE 0x0000")
    assert len(orthanc.request("POST", "/tools/lookup", ds.SOPInstanceUID.encode())) == 1  # a resend is one instance


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., int]]:
    """A pynetdicom Storage SCP (port 0) configured per test: its AE title check, the SOP
    classes it supports and the C-STORE status it answers."""
    servers = []

    def start(*, sop_classes: list[str], status: int = 0x0000, require_called_aet: bool = False) -> int:
        ae = AE(ae_title="PACS")
        ae.require_called_aet = require_called_aet
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class)
        handlers = [(evt.EVT_C_STORE, lambda event: status)]
        servers.append(ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers))
        return servers[-1].server_address[1]

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("status, outcome", [(0xB000, "C-STORE 0xB000"), (0xA700, "0xA700"), (0xC000, "0xC000")])
def test_c_store_status_decides_success_or_a_final_failure(pynetdicom_scp, status: int, outcome: str) -> None:
    port = pynetdicom_scp(sop_classes=[Comprehensive3DSRStorage], status=status)
    ds = build_sr(final_result())
    if status == 0xB000:  # a warning: stored
        assert store_sr(ds, host="127.0.0.1", port=port, called_ae="PACS", timeout_s=5).startswith(outcome)
        return
    with pytest.raises(DeliveryError, match=outcome) as caught:
        store_sr(ds, host="127.0.0.1", port=port, called_ae="PACS", timeout_s=5)
    assert not caught.value.retryable


def test_scp_without_the_sr_class_is_a_final_failure(pynetdicom_scp) -> None:
    port = pynetdicom_scp(sop_classes=[CTImageStorage])
    with pytest.raises(DeliveryError, match="accepts no presentation context") as caught:
        store_sr(build_sr(final_result()), host="127.0.0.1", port=port, called_ae="PACS", timeout_s=5)
    assert not caught.value.retryable


def test_permanent_association_rejection_is_a_final_failure(pynetdicom_scp) -> None:
    port = pynetdicom_scp(sop_classes=[Comprehensive3DSRStorage], require_called_aet=True)
    with pytest.raises(DeliveryError, match="rejected by WRONG.*permanent") as caught:
        store_sr(build_sr(final_result()), host="127.0.0.1", port=port, called_ae="WRONG", timeout_s=5)
    assert not caught.value.retryable


def test_no_scp_listening_is_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        store_sr(build_sr(preliminary_result()), host="127.0.0.1", port=procs.free_port(), called_ae="PACS",
                 timeout_s=3)
    assert caught.value.retryable


# ---------------------------------------------------------------- HL7: the hl7 package's MLLP server


@pytest.fixture
def mllp_peer() -> Iterator[Callable[..., MllpPeer]]:
    peers: list[MllpPeer] = []

    def start(answer: Callable[[hl7.Message], hl7.Message | None]) -> MllpPeer:
        peers.append(MllpPeer(answer))
        return peers[-1]

    yield start
    for peer in peers:
        peer.stop()


def _oru(result, control_id: str) -> str:
    return build_oru(result, receiving_app="RIS", receiving_facility="SITE-A", control_id=control_id)


def test_ris_parses_the_oru_and_acknowledges_it(mllp_peer) -> None:
    peer = mllp_peer(lambda message: message.create_ack("AA", message_id="ACK-1"))

    ack = send_mllp(_oru(corrected_result(), "R-100"), host="127.0.0.1", port=peer.port, timeout_s=5)

    assert ack == "AA R-100"
    (message,) = peer.received
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert str(message.segment("OBR")(25)) == "C"
    assert len(message.segments("OBX")) == 3  # two findings and one report line
    assert [str(o(11)) for o in message.segments("OBX")] == ["C", "D", "C"]
    assert str(message.segment("PID")(5)) == "CompressedSamples^CT1"


def test_application_error_is_retryable_and_reject_is_not(mllp_peer) -> None:
    peer = mllp_peer(lambda message: message.create_ack("AE", message_id="ACK-2"))
    with pytest.raises(DeliveryError, match="application error: AE R-101") as caught:
        send_mllp(_oru(final_result(), "R-101"), host="127.0.0.1", port=peer.port, timeout_s=5)
    assert caught.value.retryable

    rejecting = mllp_peer(lambda message: message.create_ack("AR", message_id="ACK-3"))
    with pytest.raises(DeliveryError, match="rejected: AR R-102") as caught:
        send_mllp(_oru(final_result(), "R-102"), host="127.0.0.1", port=rejecting.port, timeout_s=5)
    assert not caught.value.retryable


def test_reject_for_an_internal_error_is_retryable(mllp_peer) -> None:
    """AR with ERR-3 207 (HL7 table 0357): the receiver could not take it now, as our own gateway
    answers when its broker is down."""
    def busy(message: hl7.Message) -> hl7.Message:
        ack = str(message.create_ack("AR", message_id="ACK-4"))
        return hl7.parse(ack + "\rERR|||207^Application internal error^HL70357|E")

    peer = mllp_peer(busy)
    with pytest.raises(DeliveryError, match=r"rejected: AR R-105 \(ERR-3 207\)") as caught:
        send_mllp(_oru(final_result(), "R-105"), host="127.0.0.1", port=peer.port, timeout_s=5)
    assert caught.value.retryable


def test_silent_receiver_times_out_retryably(mllp_peer) -> None:
    peer = mllp_peer(lambda message: None)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="no ACK") as caught:
        send_mllp(_oru(final_result(), "R-103"), host="127.0.0.1", port=peer.port, timeout_s=1)
    assert caught.value.retryable and time.monotonic() - started < 5
    assert len(peer.received) == 1


def test_refused_mllp_connection_is_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        send_mllp(_oru(final_result(), "R-104"), host="127.0.0.1", port=procs.free_port(), timeout_s=2)
    assert caught.value.retryable


# ---------------------------------------------------------------- webhooks and FHIR: an HTTP receiver


@dataclass
class Receiver:
    """An HTTP endpoint in a thread: verifies the webhook signature (401 if wrong), or answers
    ``status`` with ``headers`` and ``body`` as configured."""

    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    requests: list[tuple[dict[str, str], bytes, bool]] = field(default_factory=list)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                signature = self.headers.get("Radstream-Signature", "")
                verified = verify_webhook(SECRET, body, signature, now=int(time.time()))
                receiver.requests.append((dict(self.headers.items()), body, verified))
                status = receiver.status if verified or not signature else 401
                self.send_response(status)
                for name, value in receiver.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(receiver.body)))
                self.end_headers()
                self.wfile.write(receiver.body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/hooks/results"
    finally:
        server.shutdown()
        server.server_close()


def _signed_request(result) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(webhook_payload(result)).encode()
    return body, {"Radstream-Signature": sign_webhook(SECRET, body, int(time.time())),
                  "Idempotency-Key": idempotency_key(result.trace_id, result.revision, "hook-a")}


def test_webhook_arrives_signed_and_verifies(receiver) -> None:
    state, url = receiver
    body, headers = _signed_request(final_result())

    assert post_json(url, body, headers, timeout_s=5) == "HTTP 204"
    ((received_headers, received, verified),) = state.requests
    assert verified and received == body
    assert json.loads(received)["type"] == "study.result.final"
    assert received_headers["Content-Type"] == "application/json"
    assert received_headers["Idempotency-Key"] == headers["Idempotency-Key"]


def test_tampered_webhook_is_refused_by_the_receiver(receiver) -> None:
    state, url = receiver
    body, headers = _signed_request(final_result())
    with pytest.raises(DeliveryError, match="HTTP 401") as caught:
        post_json(url, body.replace(b"dr.lee", b"dr.eve"), headers, timeout_s=5)
    assert not caught.value.retryable and state.requests[0][2] is False


@pytest.mark.parametrize("status, retryable", [(500, True), (503, True), (429, True), (400, False), (404, False)])
def test_http_status_decides_whether_to_retry(receiver, status: int, retryable: bool) -> None:
    state, url = receiver
    state.status, state.headers, state.body = status, {"Retry-After": "7"}, b'{"error": "nope"}'
    body, headers = _signed_request(final_result())
    with pytest.raises(DeliveryError, match=f"HTTP {status}") as caught:
        post_json(url, body, headers, timeout_s=5)
    assert caught.value.retryable is retryable
    assert caught.value.retry_after_s == 7.0 and "nope" in caught.value.reason


def test_redirect_is_not_followed(receiver) -> None:
    state, url = receiver
    state.status, state.headers = 302, {"Location": "http://127.0.0.1:1/elsewhere"}
    with pytest.raises(DeliveryError, match="HTTP 302") as caught:
        post_json(url, *_signed_request(final_result()), timeout_s=5)
    assert not caught.value.retryable


def test_refused_http_connection_is_retryable() -> None:
    with pytest.raises(DeliveryError) as caught:
        post_json(f"http://127.0.0.1:{procs.free_port()}/hook", b"{}", {}, timeout_s=2)
    assert caught.value.retryable


def test_fhir_transaction_response_gives_the_report_location(receiver) -> None:
    state, url = receiver
    bundle = build_fhir(final_result())
    state.status = 200
    state.body = json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "200 OK", "location": "Patient/7/_history/1"}},
        {"response": {"status": "201 Created", "location": "DiagnosticReport/42/_history/3"}},
    ]}).encode()

    assert post_fhir(url, bundle, token="t0ken", timeout_s=5) == "DiagnosticReport/42/_history/3"
    ((headers, body, _),) = state.requests
    assert headers["Authorization"] == "Bearer t0ken" and headers["Content-Type"] == "application/fhir+json"
    assert json.loads(body) == bundle



def test_an_sr_destination_with_tls_settings_stores_over_mutual_tls_and_plain_tcp_is_refused(tmp_path: Path) -> None:
    """A destination's tls_ca/tls_cert/tls_key (the destinations file) make the SR go over TLS:
    the PACS checks our client certificate, we check its certificate against the CA."""
    import ssl

    from streams.delivery import Destination, send_result
    from tests.test_dicom_security import make_pki

    pki = make_pki(tmp_path / "pki")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    server_tls.load_cert_chain(str(pki["gateway_cert"]), str(pki["gateway_key"]))
    server_tls.verify_mode = ssl.CERT_REQUIRED
    stored = []
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_tls,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: stored.append(event.dataset) or 0x0000)])
    try:
        port = server.server_address[1]
        pacs = Destination(name="pacs", kind="sr", host="127.0.0.1", port=port, called_ae="PACS",
                           tls_ca=pki["ca"], tls_cert=pki["site_cert"], tls_key=pki["site_key"])
        result = preliminary_result()
        assert send_result(pacs, result, timeout_s=10) == build_sr(result).SOPInstanceUID
        assert [ds.SOPInstanceUID for ds in stored] == [build_sr(result).SOPInstanceUID]
        plain = Destination(name="pacs", kind="sr", host="127.0.0.1", port=port, called_ae="PACS")
        with pytest.raises(DeliveryError) as caught:
            send_result(plain, result, timeout_s=5)
        assert caught.value.retryable and len(stored) == 1
    finally:
        server.shutdown()
