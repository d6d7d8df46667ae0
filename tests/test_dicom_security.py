"""DICOM gateway security, site identity and backpressure with real peers: dcmtk's storescu
over TLS (PS3.15 B.1) with certificates made here, the calling-AE allow-list answered by
A-ASSOCIATE-RJ (PS3.8 9.3.4, Table 9-21), Orthanc C-STOREing a study as a site's PACS,
and a broker that stops answering (0xA700 until it answers again)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pynetdicom import AE

from gateways.dicom_scp import start_gateway
from gateways.publisher import EventPublisher
from radstream import procs
from adapters.blobs import LocalBlobStore
from schemas.settings import Settings
from schemas.topics import DEAD_LETTER, INSTANCE_RECEIVED
from adapters.kafka import ensure_topics
from tests.test_dicom_gateway import (
    ECHOSCU,
    STORESCU,
    c_echo,
    c_store,
    consume,
    metric,
    sample_file,
    with_new_uids,
)

SITES = "SITE_A=Mercy General,ORTHANC_PACS=St Luke Imaging"


def dicom_settings(settings: Settings, **dicom: object) -> Settings:
    """``settings`` with the gateway's DICOM group changed, validated like a config file would be."""
    return settings.model_copy(update={"dicom": settings.dicom.model_validate(
        {**settings.dicom.model_dump(), **dicom})})


@dataclass
class Running:
    settings: Settings
    store: LocalBlobStore


@pytest.fixture
def run_gateway(broker: Settings) -> Iterator:
    """Start the SCP in this process with DICOM settings of the test's choosing."""
    started: list = []

    def start(**dicom: object) -> Running:
        settings = dicom_settings(broker, **dicom)
        store, publisher = LocalBlobStore(settings.blob_root), EventPublisher(settings)
        started.append((start_gateway(settings, store, publisher), publisher))
        return Running(settings, store)

    yield start
    for server, publisher in started:
        server.shutdown()
        publisher.close(timeout_s=2)


def dcmtk(tool: str, settings: Settings, *args: str | Path, calling_ae: str = "SITE_A",
          called_ae: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [tool, "-v", "-aet", calling_ae, "-aec", called_ae or settings.dicom.ae_title, *map(str, args),
            settings.bind_host, str(settings.dicom.port)]
    if tool == STORESCU:  # files go last
        files = [a for a in argv[:-2] if str(a).endswith(".dcm")]
        argv = [a for a in argv if a not in files] + files
    # TCP_NODELAY=1: without it Nagle + delayed ACK cost ~40 ms per message.
    return subprocess.run(argv, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=60,
                          check=False)


def rejection_of(settings: Settings, calling_ae: str, called_ae: str) -> tuple[int, int, int]:
    """(Result, Source, Reason/Diag.) of the A-ASSOCIATE-RJ the gateway answers."""
    scu = AE(ae_title=calling_ae)
    scu.add_requested_context("1.2.840.10008.1.1")
    assoc = scu.associate(settings.bind_host, settings.dicom.port, ae_title=called_ae)
    assert assoc.is_rejected and not assoc.is_established
    answer = assoc.acceptor.primitive
    return answer.result, answer.result_source, answer.diagnostic


# ---------------------------------------------------------------- sites and the allow-list


def test_only_listed_sites_may_associate_and_each_event_names_its_site(run_gateway, capsys, caplog) -> None:
    gateway = run_gateway(site_map=SITES, allow_unknown_ae=False, require_called_ae=True)
    rejected_before = metric("radstream_dicom_association_rejections_total", reason="calling_ae_not_recognized")
    called_before = metric("radstream_dicom_association_rejections_total", reason="called_ae_not_recognized")

    # PS3.8 Table 9-21: rejected-permanent (1), DICOM UL service-user (1), reason 3 / reason 7.
    assert rejection_of(gateway.settings, "INTRUDER", "RADSTREAM") == (0x01, 0x01, 0x03)
    assert rejection_of(gateway.settings, "SITE_A", "SOMEONE_ELSE") == (0x01, 0x01, 0x07)
    intruder = dcmtk(STORESCU, gateway.settings, sample_file("CT_small.dcm"), calling_ae="INTRUDER")
    assert intruder.returncode != 0
    assert "Calling AE Title Not Recognized" in intruder.stderr, intruder.stderr

    assert metric("radstream_dicom_association_rejections_total",
                  reason="calling_ae_not_recognized") == rejected_before + 2
    assert metric("radstream_dicom_association_rejections_total",
                  reason="called_ae_not_recognized") == called_before + 1
    logged = capsys.readouterr().out + caplog.text
    assert "rejected association" in logged and "'INTRUDER' is not on the allow-list" in logged
    assert "'SOMEONE_ELSE' is not this gateway's 'RADSTREAM'" in logged

    # The listed site, on the same running gateway: stored, and the event names the site.
    instance = with_new_uids(dcmread(sample_file("CT_small.dcm")))
    assert c_store(gateway.settings, instance, calling_ae="SITE_A").Status == 0x0000
    (event,) = consume(gateway.settings, INSTANCE_RECEIVED, count=1)
    assert (event.source_site, event.calling_ae, event.called_ae) == ("Mercy General", "SITE_A", "RADSTREAM")
    assert consume(gateway.settings, DEAD_LETTER, count=1, timeout_s=1) == []


def test_by_default_any_sender_is_accepted_and_named_by_its_ae_title(run_gateway) -> None:
    gateway = run_gateway(site_map=SITES)
    for calling_ae in ("SITE_A", "NEW_CLINIC"):
        assert c_store(gateway.settings, with_new_uids(dcmread(sample_file("CT_small.dcm"))),
                       calling_ae=calling_ae).Status == 0x0000
    events = consume(gateway.settings, INSTANCE_RECEIVED, count=2)
    assert sorted((e.calling_ae, e.source_site) for e in events) == [
        ("NEW_CLINIC", "NEW_CLINIC"), ("SITE_A", "Mercy General")]


def test_the_gateway_listens_on_loopback_unless_configured(run_gateway) -> None:
    gateway = run_gateway()
    assert gateway.settings.bind_host == "127.0.0.1"
    with socket.socket() as elsewhere:  # the same port on another local address is still free
        elsewhere.bind(("127.0.0.2", gateway.settings.dicom.port))
    if shutil.which("ss"):
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{gateway.settings.dicom.port}"],
                                   capture_output=True, text=True, check=False).stdout.splitlines()
        assert [line.split()[3] for line in listening] == [f"127.0.0.1:{gateway.settings.dicom.port}"]


# ---------------------------------------------------------------- TLS


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey]
                 | None, *, ca: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signing_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, the gateway's certificate and a sending site's certificate (PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("radstream test CA", ca_key, None, ca=True)
    files = {"ca": directory / "ca.pem"}
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for who in ("gateway", "site"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"{who}.radstream.test", key, (ca_cert.subject, ca_key), ca=False)
        files[f"{who}_key"] = directory / f"{who}.key"
        files[f"{who}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))
        files[f"{who}_cert"] = directory / f"{who}.pem"
        files[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def test_storescu_over_mutual_tls_is_stored_and_plain_tcp_is_refused_cleanly(run_gateway, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    gateway = run_gateway(tls_cert=pki["gateway_cert"], tls_key=pki["gateway_key"], tls_ca=pki["ca"],
                          site_map=SITES, allow_unknown_ae=False)
    settings = gateway.settings
    tls = ("+tls", pki["site_key"], pki["site_cert"], "+cf", pki["ca"])
    ct = tmp_path / "ct.dcm"
    with_new_uids(dcmread(sample_file("CT_small.dcm"))).save_as(ct, enforce_file_format=True)

    # A client that connects and never speaks must not hold up anyone else's handshake.
    with socket.create_connection((settings.bind_host, settings.dicom.port)):
        sent = dcmtk(STORESCU, settings, *tls, ct)
    assert sent.returncode == 0, sent.stderr
    assert "Received Store Response (Success)" in sent.stderr

    plain = dcmtk(ECHOSCU, settings)  # plain DICOM to the TLS port
    assert plain.returncode != 0 and "Success" not in plain.stderr
    anonymous = dcmtk(ECHOSCU, settings, "+tla", "+cf", pki["ca"])  # TLS without a client certificate
    assert anonymous.returncode != 0 and "Success" not in anonymous.stderr
    untrusting = dcmtk(ECHOSCU, settings, "+tls", pki["site_key"], pki["site_cert"])  # no CA: gateway unverified
    assert untrusting.returncode != 0

    # Still serving: a second TLS sender succeeds, and the first instance arrived once.
    echo = dcmtk(ECHOSCU, settings, *tls)
    assert echo.returncode == 0 and "Received Echo Response (Success)" in echo.stderr, echo.stderr
    (event,) = consume(settings, INSTANCE_RECEIVED, count=1)
    assert event.source_site == "Mercy General"
    assert event.sop_instance_uid == dcmread(ct, stop_before_pixels=True).SOPInstanceUID


# ---------------------------------------------------------------- connections that never associate


def _idle_connection(settings: Settings, source_host: str) -> socket.socket:
    """A TCP connection that never sends A-ASSOCIATE-RQ, from ``source_host`` (a loopback alias)."""
    sock = socket.create_connection((settings.bind_host, settings.dicom.port), timeout=10,
                                    source_address=(source_host, 0))
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_hold_no_slot_a_real_sender_needs(run_gateway) -> None:
    """Issue #14 (d): idle TCP connections held every association slot ~30 s, and a real
    sender meanwhile got A-ASSOCIATE-RJ. Now one peer address holds at most
    ``max_unassociated_per_peer`` of them (more are closed at accept) and ARTIM
    (PS3.8 9.1.5) closes those after ``artim_timeout_s``."""
    gateway = run_gateway(max_associations=3, artim_timeout_s=1.0, max_unassociated_per_peer=2)
    settings = gateway.settings
    refused_before = metric("radstream_dicom_association_rejections_total", reason="peer_unassociated_limit")
    idle = [_idle_connection(settings, "127.0.0.2") for _ in range(5)]
    try:
        time.sleep(0.3)  # let the server accept them all
        closed_at_accept = [_closed_within(sock, 0.3) for sock in idle]
        assert closed_at_accept.count(False) == 2 and closed_at_accept.count(True) == 3
        assert metric("radstream_dicom_association_rejections_total",
                      reason="peer_unassociated_limit") == refused_before + 3
        assert c_echo(settings) == 0x0000  # a real sender while the two idle ones are still open
        held = [sock for sock, closed in zip(idle, closed_at_accept) if not closed]
        assert all(_closed_within(sock, 5) for sock in held)  # ARTIM closes them (1 s)
    finally:
        for sock in idle:
            sock.close()
    assert c_echo(settings) == 0x0000


# ---------------------------------------------------------------- Orthanc as a site's PACS


def _orthanc_request(port: int, method: str, path: str, body: bytes | dict | list | None = None) -> object:
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture
def orthanc(tmp_path: Path, broker: Settings) -> Iterator[tuple[int, str]]:
    with site_pacs(tmp_path, broker) as pacs:
        yield pacs


@contextlib.contextmanager
def site_pacs(tmp_path: Path, broker: Settings) -> Iterator[tuple[int, str]]:
    """Debian's Orthanc on free high ports, local only, with the gateway as a DICOM modality."""
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        pytest.skip("Orthanc is not installed (scripts/bootstrap.sh installs it)")
    http_port, dicom_port = procs.free_port(), procs.free_port()
    config = tmp_path / "orthanc" / "orthanc.json"
    (tmp_path / "orthanc" / "db").mkdir(parents=True)
    config.write_text(json.dumps({
        "Name": "site-pacs", "StorageDirectory": str(tmp_path / "orthanc" / "db"),
        "IndexDirectory": str(tmp_path / "orthanc" / "db"), "HttpPort": http_port, "DicomPort": dicom_port,
        "DicomAet": "ORTHANC_PACS", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [], "DicomModalities": {
            "radstream": [broker.dicom.ae_title, broker.bind_host, broker.dicom.port]},
    }))
    log = tmp_path / "orthanc" / "orthanc.log"
    proc = procs.spawn([binary, str(config)], env={**os.environ, "TCP_NODELAY": "1"}, log_path=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _orthanc_request(http_port, "GET", "/system")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield http_port, "radstream"
    finally:
        procs.stop(proc, grace_s=5)


def test_orthanc_pushes_a_study_to_the_gateway_as_a_listed_site(run_gateway, orthanc, tmp_path: Path) -> None:
    gateway = run_gateway(site_map=SITES, allow_unknown_ae=False)
    http_port, modality = orthanc
    study = with_new_uids(dcmread(sample_file("CT_small.dcm")))
    second = with_new_uids(study)
    second.StudyInstanceUID, second.SeriesInstanceUID = study.StudyInstanceUID, study.SeriesInstanceUID
    sop_uids = set()
    for number, instance in enumerate((study, second), start=1):
        instance.InstanceNumber = number
        path = tmp_path / f"ct{number}.dcm"
        instance.save_as(path, enforce_file_format=True)
        uploaded = _orthanc_request(http_port, "POST", "/instances", path.read_bytes())
        assert uploaded["Status"] == "Success", uploaded
        study_id = uploaded["ParentStudy"]
        sop_uids.add(str(instance.SOPInstanceUID))

    job = _orthanc_request(http_port, "POST", f"/modalities/{modality}/store",
                           {"Resources": [study_id], "Synchronous": True})
    assert job["InstancesCount"] == 2 and job["FailedInstancesCount"] == 0, job

    events = consume(gateway.settings, INSTANCE_RECEIVED, count=2)
    assert {e.sop_instance_uid for e in events} == sop_uids
    assert {(e.study_uid, e.source_site, e.calling_ae) for e in events} == {
        (str(study.StudyInstanceUID), "St Luke Imaging", "ORTHANC_PACS")}
    assert all(gateway.store.exists(e.blob_uri) for e in events)


# ---------------------------------------------------------------- backpressure


def test_a_broker_that_stops_answering_gets_out_of_resources_then_recovery(settings: Settings,
                                                                           tmp_path: Path) -> None:
    settings.kafka.produce_timeout_s = 2.0
    broker = procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, "memory://tansu/",
                               log_path=tmp_path / "tansu.log")
    publisher = EventPublisher(settings)
    server = start_gateway(settings, LocalBlobStore(settings.blob_root), publisher)
    ct = dcmread(sample_file("CT_small.dcm"))
    try:
        ensure_topics(settings)
        assert c_store(settings, with_new_uids(ct)).Status == 0x0000

        broker.send_signal(signal.SIGSTOP)  # alive and connected, but answers nothing: a hung broker
        try:
            refused_before = metric("radstream_dicom_instances_total", status="0xA700")
            started = time.monotonic()
            status = c_store(settings, with_new_uids(ct))
            assert status.Status == 0xA700 and "acknowledgement" in status.ErrorComment
            assert time.monotonic() - started < 30  # answered from the produce timeout, not hung
            assert metric("radstream_dicom_instances_total", status="0xA700") == refused_before + 1
            assert c_echo(settings) == 0x0000
        finally:
            broker.send_signal(signal.SIGCONT)

        retried = with_new_uids(ct)
        deadline = time.monotonic() + 60
        while (result := c_store(settings, retried).Status) != 0x0000 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert result == 0x0000
        # At-least-once: the refused instance's event may still land once the broker
        # resumes (the sender retries it and consumers key on sop_instance_uid); the
        # retried one is certainly there.
        events = consume(settings, INSTANCE_RECEIVED, count=3, timeout_s=10)
        assert str(retried.SOPInstanceUID) in {e.sop_instance_uid for e in events}
    finally:
        server.shutdown()
        publisher.close(timeout_s=1)
        procs.stop(broker, grace_s=0.5)


def test_associations_get_the_servers_contexts_without_a_deep_copy_and_leave_them_unchanged(
        settings: Settings) -> None:
    """pynetdicom deep-copies the supported contexts per association (~50-115 ms for every
    storage class with every transfer syntax); the gateway's server shares them instead."""
    import copy

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from gateways.dicom_scp import build_ae

    server = build_ae(settings, None, None).start_server((settings.bind_host, settings.dicom.port), block=False)
    try:
        def snapshot() -> list[tuple]:
            return [(cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role, cx.context_id)
                    for cx in server.contexts]

        before = snapshot()
        shared = copy.deepcopy(server.contexts)
        assert shared is not server.contexts and all(a is b for a, b in zip(shared, server.contexts, strict=True))
        for syntax in (JPEG2000Lossless, ExplicitVRLittleEndian, JPEG2000Lossless):
            sender = AE("CONTEXTS")
            sender.add_requested_context(CTImageStorage, [syntax])
            sender.add_requested_context(Verification)
            assoc = sender.associate(settings.bind_host, settings.dicom.port, ae_title=settings.dicom.ae_title)
            assert assoc.is_established
            accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
            assert accepted[CTImageStorage] == syntax
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        assert snapshot() == before, "negotiation must not change the contexts every association shares"
    finally:
        server.shutdown()
