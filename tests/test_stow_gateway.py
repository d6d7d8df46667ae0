"""The STOW-RS gateway as DICOMweb senders see it: real HTTP(S), real broker, real peers.

One gateway process (``python -m gateways.stow_rs``) and one Tansu broker serve the
module. dicomweb-client and Orthanc (its DICOMweb plugin pushing a study to us) STOW
real files; the malformed-input corpus is sent at the same process, and every case
gets its exact HTTP status, PS3.18 FailureReason and dead-letter event; at the end the
process is the one that started. HTTPS and the broker being down are checked on their
own gateways.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import io
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import requests
from confluent_kafka import Consumer, TopicPartition
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydantic import SecretStr

from gateways.publisher import EventPublisher
from gateways.stow_rs import StowGateway, start_server
from load.orthanc_peer import start_orthanc
from radstream import procs
from adapters.blobs import LocalBlobStore
from schemas.codec import Codec
from schemas.events import DeadLetter, InstanceReceived
from schemas.settings import Settings, load_settings
from schemas.topics import DEAD_LETTER, INSTANCE_RECEIVED
from adapters.kafka import ensure_topics

pytestmark = pytest.mark.integration

TOKEN_A, TOKEN_B = "token-site-a-0123456789", "token-site-b-9876543210"
MAX_PART = 2 * 1024 * 1024
MAX_BODY = 8 * 1024 * 1024
BOUNDARY = "radstream-test-boundary"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


# ---------------------------------------------------------------- instances


def sample(name: str = "CT_small.dcm") -> Dataset:
    return dcmread(get_testdata_file(name, download=False))


def new_instance(name: str = "CT_small.dcm", study_uid: str | None = None, **changes: object) -> Dataset:
    """A new instance (new UIDs) of a real file; pydicom's copy() is shallow, so deepcopy."""
    instance = copy.deepcopy(sample(name))
    instance.StudyInstanceUID = study_uid or generate_uid()
    instance.SeriesInstanceUID = generate_uid()
    instance.SOPInstanceUID = generate_uid()
    instance.file_meta.MediaStorageSOPInstanceUID = instance.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            delattr(instance, keyword)
        else:
            setattr(instance, keyword, value)
    return instance


def encoded(instance: Dataset) -> bytes:
    buffer = io.BytesIO()
    instance.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def multipart(*parts: bytes, boundary: str = BOUNDARY, part_type: str = "application/dicom") -> bytes:
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


# ---------------------------------------------------------------- the gateway process


@dataclass
class Stack:
    settings: Settings
    proc: subprocess.Popen
    pid: int
    letters: list[DeadLetter] = field(default_factory=list)
    instances: dict[str, InstanceReceived] = field(default_factory=dict)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.stow.port}/dicomweb"

    def post(self, body: bytes, content_type: str = STOW_TYPE, token: str | None = TOKEN_A, path: str = "/studies",
             accept: str = "application/dicom+json", **headers: str) -> requests.Response:
        headers = {"Content-Type": content_type, "Accept": accept, **headers}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(self.url + path, data=body, headers=headers, timeout=60)

    def _drain(self) -> None:
        for name, consumer in self.consumers.items():
            while (msg := consumer.poll(0.05)) is not None:
                if msg.error():
                    continue
                if name == "dead":
                    self.letters.append(Codec().decode(msg.value(), DeadLetter))
                else:
                    event = Codec().decode(msg.value(), InstanceReceived)
                    self.instances[event.sop_instance_uid] = event

    def instance(self, sop_instance_uid: str, timeout_s: float = 15) -> InstanceReceived:
        deadline = time.monotonic() + timeout_s
        while sop_instance_uid not in self.instances:
            assert time.monotonic() < deadline, f"no instance.received for {sop_instance_uid}"
            self._drain()
        return self.instances[sop_instance_uid]

    def dead_letter(self, match: Callable[[DeadLetter], bool], timeout_s: float = 15) -> DeadLetter:
        deadline = time.monotonic() + timeout_s
        while True:
            found = [letter for letter in self.letters if match(letter)]
            if found:
                self.letters.remove(found[0])
                return found[0]
            assert time.monotonic() < deadline, f"no such dead letter; got {[l.reason for l in self.letters]}"
            self._drain()


def blob(uri: str) -> bytes:
    return Path(unquote(urlsplit(uri).path)).read_bytes()


def payload_of(letter: DeadLetter) -> bytes | None:
    if letter.payload is not None:
        return letter.payload
    return blob(letter.payload_uri) if letter.payload_uri else None


def _consumer(settings: Settings, topic: str) -> Consumer:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{time.time()}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.kafka.partitions)])
    return consumer


def _stack_settings(tmp: Path, **stow: object) -> Settings:
    return load_settings(
        data_dir=tmp / "data",
        kafka={"embedded_port": procs.free_port(), "partitions": 2, "topic_prefix": f"s{os.getpid()}",
               "storage": "memory://tansu/", "produce_timeout_s": 5},
        blobs={"backend": "local"},
        stow={"port": procs.free_port(), "tokens": f"{TOKEN_A}=SITE_A,{TOKEN_B}=SITE_B",
              "max_part_bytes": MAX_PART, "max_body_bytes": MAX_BODY, **stow},
        metrics={"gateway_port": 0, "worker_port": 0, "hl7_gateway_port": 0, "stow_gateway_port": 0},
    )


def _spawn_gateway(settings: Settings, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
    proc = procs.spawn(procs.python_module("gateways.stow_rs"), env=env, log_path=log_path)
    procs.wait_for_port("127.0.0.1", settings.stow.port, 30, proc)
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stow")
    for name in [n for n in os.environ if n.startswith("RADSTREAM_")]:
        os.environ.pop(name)
    settings = _stack_settings(tmp)
    broker = procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, "memory://tansu/",
                               log_path=tmp / "tansu.log")
    proc = None
    try:
        ensure_topics(settings)
        proc = _spawn_gateway(settings, tmp / "gateway.log")
        consumers = {"dead": _consumer(settings, DEAD_LETTER.name(settings)),
                     "instances": _consumer(settings, INSTANCE_RECEIVED.name(settings))}
        yield Stack(settings, proc, proc.pid, consumers=consumers, log_path=tmp / "gateway.log")
        for consumer in consumers.values():
            consumer.close()
    finally:
        if proc is not None:
            procs.stop(proc, grace_s=5)
        procs.stop(broker, grace_s=1)


# ---------------------------------------------------------------- real senders


def test_dicomweb_client_stows_a_study_and_each_instance_is_an_event_with_the_token_site(stack: Stack) -> None:
    study = generate_uid()
    instances = [new_instance("CT_small.dcm", study), new_instance("MR_small.dcm", study)]
    client = DICOMwebClient(stack.url, headers={"Authorization": f"Bearer {TOKEN_B}"})
    answer = client.store_instances(instances, study_instance_uid=study)
    referenced = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
    assert referenced == {str(i.SOPInstanceUID) for i in instances}
    assert "FailedSOPSequence" not in answer and answer.RetrieveURL.endswith(f"/studies/{study}")
    for instance in instances:
        event = stack.instance(str(instance.SOPInstanceUID))
        assert (event.gateway, event.source_site, event.study_uid) == ("stow-rs", "SITE_B", study)
        assert event.sop_class_uid == str(instance.SOPClassUID) and event.modality == instance.Modality
        stored = dcmread(io.BytesIO(blob(event.blob_uri)))
        assert stored.SOPInstanceUID == instance.SOPInstanceUID and stored.PixelData == instance.PixelData


def test_orthanc_pushes_a_study_over_its_dicomweb_servers_entry(stack: Stack, tmp_path: Path) -> None:
    study = generate_uid()
    files = [encoded(new_instance(name, study)) for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")]
    orthanc = start_orthanc(tmp_path / "orthanc", {"radstream": {
        "Url": stack.url + "/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN_A}"}}})
    try:
        studies = set()
        for data in files:
            studies.add(orthanc.request("POST", "/instances", data)["ParentStudy"])
        job = orthanc.request("POST", "/dicom-web/servers/radstream/stow", {"Resources": sorted(studies)})
    finally:
        orthanc.stop()
    assert job is not None
    for data in files:
        sent = dcmread(io.BytesIO(data), stop_before_pixels=True)
        event = stack.instance(str(sent.SOPInstanceUID))
        assert (event.source_site, event.gateway, event.study_uid) == ("SITE_A", "stow-rs", study)
        assert dcmread(io.BytesIO(blob(event.blob_uri))).SOPInstanceUID == sent.SOPInstanceUID


# ---------------------------------------------------------------- the malformed corpus


@dataclass(frozen=True)
class Bad:
    """One malformed request and the exact answer it must get."""

    status: int
    reason: str  # the dead letter's reason
    body: bytes = b""
    content_type: str = STOW_TYPE
    token: str | None = TOKEN_A
    path: str = "/studies"
    failure_reason: int | None = None  # FailureReason (0008,1197) of the one failed instance
    kept: bytes | None = None  # what the dead letter must carry (None: nothing)
    headers: tuple[tuple[str, str], ...] = ()


def _corpus() -> dict[str, Bad]:
    ct = encoded(new_instance())
    no_sop = encoded(new_instance(SOPInstanceUID=None))
    bad_study = encoded(new_instance(StudyInstanceUID="1.2.abc"))
    private_class = new_instance()
    private_class.SOPClassUID = "1.2.826.0.1.3680043.8.498.999"
    unknown_syntax = new_instance()
    unknown_syntax.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.8.498.1234"
    media_mismatch = new_instance()
    media_mismatch.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other_study = encoded(new_instance())
    big = os.urandom(MAX_PART + 4096)
    text = b"this is a text document, not a DICOM instance" * 10

    def part_fails(data: bytes, code: int, reason: str, **kw: object) -> Bad:
        return Bad(409, reason, multipart(data), failure_reason=code, kept=kw.pop("kept", data), **kw)  # type: ignore[arg-type]

    return {
        "no token": Bad(401, "no_token", multipart(ct), token=None),
        "unknown token": Bad(401, "bad_token", multipart(ct), token="not-a-token"),
        "body over the limit": Bad(413, "body_too_large", b"x" * (MAX_BODY + 1)),
        "single part, not multipart": Bad(415, "unsupported_media_type", ct, content_type="application/dicom",
                                          kept=ct),
        "multipart of JSON metadata": Bad(415, "unsupported_media_type", multipart(b"{}"),
                                          content_type=f'multipart/related; type="application/dicom+json"; '
                                                       f"boundary={BOUNDARY}", kept=multipart(b"{}")),
        "no boundary parameter": Bad(400, "malformed_multipart", multipart(ct),
                                     content_type='multipart/related; type="application/dicom"', kept=multipart(ct)),
        "boundary not in body": Bad(400, "malformed_multipart", multipart(ct, boundary="other"),
                                    kept=multipart(ct, boundary="other")),
        "no parts": Bad(400, "no_instances", f"--{BOUNDARY}--\r\n".encode(), kept=f"--{BOUNDARY}--\r\n".encode()),
        "invalid study UID in the URL": Bad(400, "invalid_target_study", multipart(ct), path="/studies/1.2.x",
                                            kept=multipart(ct)),
        "non-DICOM part": part_fails(text, 0xC000, "undecodable"),
        "part declared text/plain": Bad(409, "unsupported_part_type", multipart(ct, part_type="text/plain"),
                                        failure_reason=0xC000, kept=ct),
        "truncated part": part_fails(ct[: len(ct) // 2], 0xC000, "truncated"),
        "missing SOP Instance UID": part_fails(no_sop, 0xC000, "missing_uid"),
        "invalid Study Instance UID": part_fails(bad_study, 0xC000, "invalid_uid"),
        "unknown SOP class": part_fails(encoded(private_class), 0x0122, "unknown_sop_class"),
        "unknown transfer syntax": part_fails(encoded(unknown_syntax), 0xC122, "unknown_transfer_syntax"),
        "file meta names another instance": part_fails(encoded(media_mismatch), 0xA900, "sop_instance_mismatch"),
        "instance of another study than the URL": part_fails(other_study, 0xC409, "study_uid_mismatch",
                                                             path=f"/studies/{generate_uid()}"),
        "part over the per-instance limit": part_fails(big, 0xA700, "part_too_large", kept=big[:MAX_PART]),
    }


CORPUS = _corpus()


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_request_gets_its_ps3_18_answer_and_a_dead_letter(stack: Stack, case: str) -> None:
    bad = CORPUS[case]
    answer = stack.post(bad.body, bad.content_type, bad.token, bad.path, **dict(bad.headers))
    assert answer.status_code == bad.status, answer.text
    if bad.failure_reason is not None:
        assert answer.headers["Content-Type"].startswith("application/dicom+json")
        response = Dataset.from_json(answer.json())
        assert [item.FailureReason for item in response.FailedSOPSequence] == [bad.failure_reason]
        assert len(response.ReferencedSOPSequence) == 0
    if bad.status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    letter = stack.dead_letter(lambda l: l.reason == bad.reason and (bad.kept is None or payload_of(l) == bad.kept))
    assert letter.stage == "stow-rs" and letter.error
    if bad.kept is None or not bad.kept:
        assert payload_of(letter) in (None, b"")
    elif len(bad.kept) > 64 * 1024:
        assert letter.payload is None and "/rejected/" in (letter.payload_uri or "")


def test_a_mixed_request_is_202_and_xml_when_asked(stack: Stack) -> None:
    good, bad = new_instance(), new_instance(SeriesInstanceUID=None)
    answer = stack.post(multipart(encoded(good), encoded(bad)), accept="application/dicom+xml")
    assert answer.status_code == 202 and answer.headers["Content-Type"].startswith("application/dicom+xml")
    assert f"<Value number=\"1\">{good.SOPInstanceUID}</Value>" in answer.text
    assert 'tag="00081197" vr="US" keyword="FailureReason"><Value number="1">49152</Value>' in answer.text
    assert stack.instance(str(good.SOPInstanceUID)).source_site == "SITE_A"
    letter = stack.dead_letter(lambda l: l.reason == "missing_uid" and payload_of(l) == encoded(bad))
    assert "SeriesInstanceUID is missing" in letter.error


def test_a_resent_instance_is_accepted_again_idempotently(stack: Stack) -> None:
    instance = new_instance()
    data = encoded(instance)
    first, second = stack.post(multipart(data)), stack.post(multipart(data, data))
    assert (first.status_code, second.status_code) == (200, 200)
    assert len(Dataset.from_json(second.json()).ReferencedSOPSequence) == 2
    event = stack.instance(str(instance.SOPInstanceUID))
    assert blob(event.blob_uri) == data  # one blob key per instance: re-sending overwrites the same bytes


# ---------------------------------------------------------------- bodies that fail part-way (issue #14)


def _part(data: bytes) -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"


def _raw_request(stack: Stack, head: bytes, body: bytes, *, half_close: bool = False) -> bytes:
    """Send bytes as they are (no HTTP client fixes them up); what comes back before close."""
    with socket.create_connection(("127.0.0.1", stack.settings.stow.port), timeout=30) as sock:
        sock.sendall(head + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def _head(content_length: int, *extra: str) -> bytes:
    lines = ["POST /dicomweb/studies HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {TOKEN_A}",
             f"Content-Type: {STOW_TYPE}", f"Content-Length: {content_length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _published(stack: Stack, sop_instance_uid: str, wait_s: float = 3) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and sop_instance_uid not in stack.instances:
        stack._drain()
    return sop_instance_uid in stack.instances


def test_a_body_whose_close_delimiter_never_comes_is_202_naming_exactly_the_parts_stored(stack: Stack) -> None:
    """(e): the part the body ended inside is not stored; the answer lists what was."""
    first, second = new_instance(), new_instance()
    body = _part(encoded(first)) + _part(encoded(second))  # no "--boundary--"
    answer = stack.post(body)
    assert answer.status_code == 202, answer.text
    response = Dataset.from_json(answer.json())
    assert [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence] == [str(first.SOPInstanceUID)]
    assert [(i.FailureReason, i.ReferencedSOPInstanceUID) for i in response.FailedSOPSequence] == [(0xC000, "")]
    assert stack.instance(str(first.SOPInstanceUID)).source_site == "SITE_A"
    assert not _published(stack, str(second.SOPInstanceUID))
    letter = stack.dead_letter(lambda l: l.reason == "unterminated_part")
    assert letter.error == ("the body ended inside part 2: no delimiter follows it (RFC 2046 5.1.1), so it may be "
                            "cut short; it was not stored")
    assert payload_of(letter) == _part(encoded(second))  # the failing part as it was sent


def test_a_part_without_a_header_block_is_400_naming_the_part(stack: Stack) -> None:
    """(f): was 500 internal_error from the parser's exception."""
    instance = new_instance()
    body = f"--{BOUNDARY}\r\n".encode() + encoded(instance) + f"\r\n--{BOUNDARY}--\r\n".encode()
    answer = stack.post(body)
    error = ("malformed multipart body: part 1 has no valid header block (RFC 2046 5.1.1: header fields, "
             "then an empty line)")
    assert (answer.status_code, answer.json()) == (400, {"error": error, "reason": "malformed_multipart"})
    letter = stack.dead_letter(lambda l: l.reason == "malformed_multipart" and l.error == error)
    assert payload_of(letter) == body
    assert not _published(stack, str(instance.SOPInstanceUID), wait_s=1)


def test_a_request_smuggling_attempt_is_400_without_echo_and_nothing_stored(stack: Stack) -> None:
    """(g): Content-Length and Transfer-Encoding together (RFC 9112 6.3): aiohttp echoed the body."""
    instance = new_instance()
    body = multipart(encoded(instance)) + b"0\r\n\r\n" + b"GET /smuggled HTTP/1.1\r\n" + os.urandom(136_000)
    raw = _raw_request(stack, _head(len(body), "Transfer-Encoding: chunked"), body)
    head, _, content = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 ") and raw.count(b" HTTP/1.") == 0 and len(content) < 300
    error = "malformed HTTP request (Transfer-Encoding can't be present with Content-Length); nothing in it was stored"
    assert json.loads(content) == {"error": error, "reason": "malformed_http"}
    letter = stack.dead_letter(lambda l: l.reason == "malformed_http" and l.error == error)
    assert payload_of(letter) in (None, b"")  # unauthenticated: the parser never got to the token
    assert not _published(stack, str(instance.SOPInstanceUID), wait_s=1)


def test_a_client_that_half_closes_inside_its_declared_body_is_an_info_line_and_a_dead_letter(stack: Stack) -> None:
    """(h): was logged as an internal error with a traceback."""
    body = multipart(encoded(new_instance()))
    sent = body[:500]
    declared = len(body) + 100_000
    _raw_request(stack, _head(declared), sent, half_close=True)
    error = f"the client closed the connection after 500 of the {declared} declared bytes of the body, inside part 1"
    letter = stack.dead_letter(lambda l: l.reason == "incomplete_body")
    assert (letter.error, payload_of(letter)) == (error, sent)
    assert stack.log_path is not None
    log = stack.log_path.read_text()
    assert "internal_error" not in log and "Traceback" not in log
    assert any("refused STOW-RS request" in line and "incomplete_body" in line and "[info" in line
               for line in log.splitlines())


def test_the_gateway_process_survived_the_corpus_without_restart(stack: Stack) -> None:
    assert len(CORPUS) >= 15
    assert stack.proc.poll() is None and stack.proc.pid == stack.pid
    instance = new_instance()
    assert stack.post(multipart(encoded(instance))).status_code == 200


# ---------------------------------------------------------------- HTTPS, broker down


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "stow.crt", tmp / "stow.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_stow_over_https_with_dicomweb_client_verifying_the_certificate(stack: Stack, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    settings = stack.settings.model_copy(update={"stow": stack.settings.stow.model_copy(
        update={"port": procs.free_port(), "tls_cert": cert, "tls_key": key})})
    proc = _spawn_gateway(settings, tmp_path / "https-gateway.log")
    try:
        url = f"https://127.0.0.1:{settings.stow.port}/dicomweb"
        with pytest.raises(requests.exceptions.SSLError):  # an unverified peer is refused by the client
            requests.post(url + "/studies", data=b"", timeout=10)
        session = requests.Session()
        session.verify = str(cert)
        session.trust_env = False  # else requests prefers $REQUESTS_CA_BUNDLE over session.verify
        client = DICOMwebClient(url, session=session, headers={"Authorization": f"Bearer {TOKEN_A}"})
        instance = new_instance()
        answer = client.store_instances([instance])
        assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [str(instance.SOPInstanceUID)]
        assert stack.instance(str(instance.SOPInstanceUID)).source_site == "SITE_A"
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP is not served on the TLS port
            requests.post(f"http://127.0.0.1:{settings.stow.port}/dicomweb/studies", data=b"", timeout=10)
    finally:
        procs.stop(proc, grace_s=5)


def test_broker_down_answers_503_retry_after_then_recovers_when_it_is_back(settings: Settings, tmp_path: Path) -> None:
    down = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"produce_timeout_s": 1.5}),
        "stow": settings.stow.model_copy(update={"tokens": SecretStr(TOKEN_A + "=SITE_A"), "retry_after_s": 1})})

    async def scenario() -> list[tuple[int, str | None]]:
        publisher = EventPublisher(down)
        gateway = StowGateway(down, LocalBlobStore(down.blob_root), publisher)
        runner = await start_server(down, gateway)
        url = f"http://127.0.0.1:{down.stow.port}/dicomweb/studies"
        headers = {"Authorization": f"Bearer {TOKEN_A}", "Content-Type": STOW_TYPE}
        loop = asyncio.get_running_loop()

        def post() -> tuple[int, str | None]:
            answer = requests.post(url, data=multipart(encoded(new_instance())), headers=headers, timeout=30)
            return answer.status_code, answer.headers.get("Retry-After")

        seen = [await loop.run_in_executor(None, post)]  # the publish times out: 503
        seen.append(await loop.run_in_executor(None, post))  # circuit open: 503 at once, body unread
        broker = procs.start_tansu(down.bind_host, down.kafka.embedded_port, "memory://tansu/",
                                   log_path=tmp_path / "tansu.log")
        try:
            await loop.run_in_executor(None, ensure_topics, down)
            deadline = time.monotonic() + 30
            while True:  # the sender retries after Retry-After until it is accepted
                await asyncio.sleep(1)
                status = await loop.run_in_executor(None, post)
                if status[0] == 200 or time.monotonic() > deadline:
                    seen.append(status)
                    break
        finally:
            await runner.cleanup()
            gateway.close()
            publisher.close(timeout_s=0)
            procs.stop(broker, grace_s=1)
        return seen

    first, second, recovered = asyncio.run(scenario())
    assert first == (503, "1") and second[0] == 503 and second[1] is not None
    assert recovered == (200, None)
