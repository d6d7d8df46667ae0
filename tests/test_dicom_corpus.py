"""A corpus of malformed DICOM input sent to one running gateway (never restarted): each
case gets its exact DICOM answer (PS3.4 B.2.3 status, or the presentation context's
PS3.8 9.3.3.2 result) and, where the data set reached the gateway, a dead-letter event
with the reason and the raw bytes (inline or by claim check)."""

from __future__ import annotations

import io
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from gateways.dicom_scp import start_gateway
from gateways.publisher import EventPublisher
from radstream import procs
from radstream.objectstore import free_port_base
from adapters.blobs import LocalBlobStore
from schemas.codec import Codec
from schemas.events import DeadLetter
from schemas.settings import Settings, load_settings
from schemas.topics import DEAD_LETTER, INSTANCE_RECEIVED
from adapters.kafka import ensure_topics
from tests.test_dicom_gateway import (
    CALLING_AE,
    c_echo,
    consume,
    metric,
    sample_file,
    with_new_uids,
)

# The corpus builds invalid UIDs on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning"),
              pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")]


@dataclass
class Gateway:
    settings: Settings
    store: LocalBlobStore


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One broker and one gateway for the whole corpus: bad input must not need a restart."""
    root = tmp_path_factory.mktemp("corpus")
    settings = load_settings(
        data_dir=root / "data", blobs={"backend": "local"},
        kafka={"embedded_port": procs.free_port(), "partitions": 2, "topic_prefix": f"corpus{os.getpid()}",
               "storage": "memory://tansu/", "produce_timeout_s": 5},
        seaweedfs={"s3_port": procs.free_port(), "port_base": free_port_base()},
        dicom={"port": procs.free_port()}, metrics={"gateway_port": 0, "worker_port": 0, "hl7_gateway_port": 0},
    )
    broker = procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, "memory://tansu/",
                               log_path=root / "tansu.log")
    publisher = None
    server = None
    try:
        ensure_topics(settings)
        store = LocalBlobStore(settings.blob_root)
        publisher = EventPublisher(settings)
        server = start_gateway(settings, store, publisher)
        yield Gateway(settings, store)
    finally:
        if server is not None:
            server.shutdown()
        if publisher is not None:
            publisher.close(timeout_s=2)
        procs.stop(broker, grace_s=1)


def send_as_is(settings: Settings, path: Path) -> Dataset:
    """C-STORE ``path``'s bytes unchanged (pynetdicom would re-encode a Dataset), proposing
    the SOP class and transfer syntax of its file meta; returns the response status."""
    meta = read_file_meta_info(path)
    scu = AE(ae_title=CALLING_AE)
    scu.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = scu.associate(settings.bind_host, settings.dicom.port, ae_title=settings.dicom.ae_title)
        assert assoc.is_established
        try:
            return assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def dead_letter_with(settings: Settings, marker: bytes, timeout_s: float = 15) -> DeadLetter:
    """The dead letter whose raw bytes (inline or claim-checked) contain ``marker``."""
    store = LocalBlobStore(settings.blob_root)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"corpus-{time.time_ns()}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(DEAD_LETTER.name(settings), p, OFFSET_BEGINNING)
                     for p in range(settings.kafka.partitions)])
    codec, deadline = Codec(), time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            letter = codec.decode(message.value(), DeadLetter)
            raw = letter.payload or (store.get(letter.payload_uri) if letter.payload_uri else b"")
            if marker in raw:
                return letter
    finally:
        consumer.close()
    raise AssertionError(f"no dead letter carries {marker!r}")


def encoded(instance: Dataset, directory: Path, name: str) -> Path:
    path = directory / name
    instance.save_as(path, enforce_file_format=True)
    return path


def ct_instance(marker: str) -> Dataset:
    """A new CT instance whose PatientID is ``marker``, to find its dead letter by."""
    instance = with_new_uids(dcmread(sample_file("CT_small.dcm")))
    instance.PatientID = marker
    return instance


def data_set_offset(path: Path) -> int:
    data = path.read_bytes()
    return 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, DICM, meta group length


# Each case: builds a file in a directory -> (file, marker in its bytes).
def truncated_pixel_data(d: Path) -> tuple[Path, str]:
    path = encoded(ct_instance("CASE-TRUNC-PIXELS"), d, "cut.dcm")
    path.write_bytes(path.read_bytes()[:-100])  # a dropped connection or a partial copy
    return path, "CASE-TRUNC-PIXELS"


def truncated_header(d: Path) -> tuple[Path, str]:
    path = encoded(ct_instance("CASE-TRUNC-HEADER"), d, "cut.dcm")
    data = path.read_bytes()
    marker_at = data.index(b"CASE-TRUNC-HEADER")
    path.write_bytes(data[:marker_at + 40])  # ends inside the header, after PatientID
    return path, "CASE-TRUNC-HEADER"


def truncated_encapsulated(d: Path) -> tuple[Path, str]:
    instance = with_new_uids(dcmread(sample_file("JPEG2000.dcm")))
    instance.PatientID = "CASE-TRUNC-J2K"
    path = encoded(instance, d, "j2k.dcm")
    path.write_bytes(path.read_bytes()[:-300])  # inside a fragment: no sequence delimiter
    return path, "CASE-TRUNC-J2K"


def truncated_deflated(d: Path) -> tuple[Path, str]:
    instance = ct_instance("CASE-TRUNC-DEFLATE")
    instance.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = encoded(instance, d, "deflated.dcm")
    path.write_bytes(path.read_bytes()[:-200])
    return path, str(instance.SOPInstanceUID)  # the marker is deflated; the meta names the instance


def pydicom_truncated_file(d: Path) -> tuple[Path, str]:
    path = d / "MR_truncated.dcm"  # pydicom's own truncated MR, sent as is
    path.write_bytes(sample_file("MR_truncated.dcm").read_bytes())
    return path, str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def not_a_data_set(d: Path) -> tuple[Path, str]:
    path = encoded(ct_instance("X"), d, "garbage.dcm")
    meta_end = data_set_offset(path)
    path.write_bytes(path.read_bytes()[:meta_end] + b"CASE-NOT-DICOM: %PDF-1.7 this is a report, not an image\n")
    return path, "CASE-NOT-DICOM"


def _without(keyword: str) -> Callable[[Path], tuple[Path, str]]:
    def case(d: Path) -> tuple[Path, str]:
        instance = ct_instance(f"CASE-NO-{keyword}")
        delattr(instance, keyword)
        return encoded_as_is(instance, d), f"CASE-NO-{keyword}"
    case.__name__ = f"missing_{keyword}"
    return case


def encoded_as_is(instance: Dataset, d: Path) -> Path:
    path = d / "as_is.dcm"
    instance.save_as(path, enforce_file_format=False)
    return path


def invalid_uid_syntax(d: Path) -> tuple[Path, str]:
    instance = ct_instance("CASE-BAD-UID")
    instance.SeriesInstanceUID = "1.2.03.series-one"  # PS3.5 9.1: digits only, no leading zeros
    return encoded_as_is(instance, d), "CASE-BAD-UID"


def sop_instance_mismatch(d: Path) -> tuple[Path, str]:
    instance = ct_instance("CASE-SOP-MISMATCH")
    instance.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # what the request announces
    return encoded_as_is(instance, d), "CASE-SOP-MISMATCH"


def sop_class_mismatch(d: Path) -> tuple[Path, str]:
    instance = ct_instance("CASE-CLASS-MISMATCH")
    instance.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # says MR; the request announces CT
    return encoded_as_is(instance, d), "CASE-CLASS-MISMATCH"


def _with_pixel_data(marker: str, keep: int) -> Callable[[Path], tuple[Path, str]]:
    """Issue #14 (a): well-formed Pixel Data (its length says what it holds) shorter than
    Rows x Columns x Samples x Bits Allocated needs (CT_small: 128 x 128 x 1 x 16 bits)."""
    def case(d: Path) -> tuple[Path, str]:
        instance = ct_instance(marker)
        instance.PixelData = instance.PixelData[:keep]
        return encoded_as_is(instance, d), marker
    case.__name__ = f"pixel_data_of_{keep}_bytes"
    return case


def duplicate_study_uid(d: Path) -> tuple[Path, str]:
    """Issue #14 (c): the same element twice with different values (two StudyInstanceUIDs)."""
    path = encoded(ct_instance("CASE-DUP-STUDY"), d, "dup.dcm")
    data = path.read_bytes()
    at = data.index(b"\x20\x00\x0d\x00UI")  # (0020,000D) in explicit VR little endian
    length = int.from_bytes(data[at + 6:at + 8], "little")
    other = generate_uid().encode()
    other += b"\0" * (len(other) % 2)
    second = data[at:at + 4] + b"UI" + len(other).to_bytes(2, "little") + other
    path.write_bytes(data[:at + 8 + length] + second + data[at + 8 + length:])
    return path, "CASE-DUP-STUDY"


CORPUS = [
    # (case, DIMSE status, dead-letter reason, Offending Element)
    (_with_pixel_data("CASE-SHORT-PIXELS", 4096), 0xA900, "pixel_data_length", "PixelData"),
    (_with_pixel_data("CASE-NO-PIXELS", 0), 0xA900, "pixel_data_length", "PixelData"),
    (duplicate_study_uid, 0xC000, "duplicate_element", None),
    (truncated_pixel_data, 0xC000, "truncated", None),
    (truncated_header, 0xC000, "truncated", None),
    (truncated_encapsulated, 0xC000, "truncated", None),
    (truncated_deflated, 0xC000, "truncated", None),
    (pydicom_truncated_file, 0xC000, "truncated", None),
    (not_a_data_set, 0xC000, "undecodable", None),
    (_without("StudyInstanceUID"), 0xC000, "missing_uid", "StudyInstanceUID"),
    (_without("SeriesInstanceUID"), 0xC000, "missing_uid", "SeriesInstanceUID"),
    (_without("SOPInstanceUID"), 0xC000, "missing_uid", "SOPInstanceUID"),
    (invalid_uid_syntax, 0xC000, "invalid_uid", "SeriesInstanceUID"),
    (sop_instance_mismatch, 0xA900, "sop_instance_mismatch", "SOPInstanceUID"),
    (sop_class_mismatch, 0xA900, "sop_class_mismatch", "SOPClassUID"),
]


@pytest.mark.parametrize("case, status, reason, offending", CORPUS, ids=[c[0].__name__ for c in CORPUS])
def test_malformed_instance_gets_its_status_and_a_dead_letter(gateway: Gateway, tmp_path: Path, case, status: int,
                                                              reason: str, offending: str | None) -> None:
    path, marker = case(tmp_path)
    answered_before = metric("radstream_dicom_instances_total", status=f"0x{status:04X}")

    answer = send_as_is(gateway.settings, path)

    assert answer.Status == status, answer
    assert answer.ErrorComment
    if offending:
        assert [str(tag) for tag in ([answer.OffendingElement] if not isinstance(
            answer.OffendingElement, list) else answer.OffendingElement)] == [str(dcmread_tag(offending))]
    assert metric("radstream_dicom_instances_total", status=f"0x{status:04X}") == answered_before + 1
    letter = dead_letter_with(gateway.settings, marker.encode())
    assert (letter.stage, letter.reason) == ("dicom-scp", reason)
    assert letter.error and (letter.payload or letter.payload_uri)
    raw = letter.payload or gateway.store.get(letter.payload_uri)
    assert raw[128:132] == b"DICM" and path.read_bytes()[data_set_offset(path):] in raw  # the bytes as received
    assert c_echo(gateway.settings) == 0x0000  # still serving


def test_the_gateway_process_answers_the_whole_corpus_and_is_never_restarted(gateway: Gateway,
                                                                               tmp_path: Path) -> None:
    """The same corpus against ``python -m gateways.dicom_scp`` as production runs it: every
    case gets its status, and at the end the process is the one that started (same PID)."""
    settings = gateway.settings.model_copy(update={"dicom": gateway.settings.dicom.model_copy(
        update={"port": procs.free_port()})})
    env = {**os.environ, **settings.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
    proc = procs.spawn(procs.python_module("gateways.dicom_scp"), env=env, log_path=tmp_path / "gateway.log")
    try:
        procs.wait_for_port("127.0.0.1", settings.dicom.port, 30, proc)
        pid = proc.pid
        # Issue #14 (d): idle connections from another address stay open the whole time.
        idle = [socket.create_connection((settings.bind_host, settings.dicom.port), source_address=("127.0.0.2", 0))
                for _ in range(20)]
        answers = {}
        for case, status, _reason, _offending in CORPUS:
            directory = tmp_path / case.__name__
            directory.mkdir()
            path, _marker = case(directory)
            answers[case.__name__] = (int(send_as_is(settings, path).Status), status)
        assert {name: got for name, (got, _) in answers.items()} == {
            name: expected for name, (_, expected) in answers.items()}
        # A peer that resets its connection inside a PDU header: an info line, not a traceback.
        with socket.create_connection((settings.bind_host, settings.dicom.port)) as reset:
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.sendall(b"\x01\x00\x00")
            time.sleep(0.3)
        time.sleep(0.5)
        assert proc.poll() is None and proc.pid == pid
        assert c_echo(settings) == 0x0000
        log = (tmp_path / "gateway.log").read_text()
        assert "Traceback" not in log and "[error" not in log, log[-2000:]
        assert "[info     ] peer connection lost: ConnectionResetError" in log
        for sock in idle:
            sock.close()
    finally:
        procs.stop(proc, grace_s=5)


def dcmread_tag(keyword: str):
    from pydicom.tag import Tag

    return Tag(keyword)


def test_sop_class_the_gateway_does_not_store_is_refused_at_negotiation(gateway: Gateway) -> None:
    private_class = "1.2.826.0.1.3680043.8.498.4242"  # no storage SOP class of PS3.4 Annex B
    refused_before = metric("radstream_dicom_association_rejections_total", reason="abstract_syntax_not_supported")
    scu = AE(ae_title=CALLING_AE)
    scu.add_requested_context(private_class)
    scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    assoc = scu.associate(gateway.settings.bind_host, gateway.settings.dicom.port, ae_title="RADSTREAM")
    assert assoc.is_established
    try:
        # PS3.8 9.3.3.2: result 3, abstract syntax not supported; the CT context is accepted.
        assert [(str(c.abstract_syntax), c.result) for c in assoc.rejected_contexts] == [(private_class, 0x03)]
        assert [str(c.abstract_syntax) for c in assoc.accepted_contexts] == ["1.2.840.10008.5.1.4.1.1.2"]
    finally:
        assoc.release()
    assert metric("radstream_dicom_association_rejections_total",
                  reason="abstract_syntax_not_supported") == refused_before + 1


@pytest.mark.parametrize("context_class", ["1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.4"],
                         ids=["verification_context", "mr_storage_context"])
def test_a_c_store_on_a_context_negotiated_for_another_sop_class_is_refused_0x0122(
        gateway: Gateway, context_class: str) -> None:
    """Issue #14 (b): PS3.8 9.3.5.1: the CT instance rides a context negotiated for Verification / MR."""
    marker = f"CASE-CONTEXT-{context_class[-3:]}"
    instance = ct_instance(marker)
    scu = AE(ae_title=CALLING_AE)
    scu.add_requested_context(context_class, "1.2.840.10008.1.2")
    scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2")  # CT, also accepted
    assoc = scu.associate(gateway.settings.bind_host, gateway.settings.dicom.port, ae_title="RADSTREAM")
    assert assoc.is_established
    wrong = next(c for c in assoc.accepted_contexts if str(c.abstract_syntax) == context_class)
    assoc._get_valid_context = lambda *args, **kwargs: wrong  # what a faulty SCU does
    try:
        answer = assoc.send_c_store(instance)
    finally:
        assoc.release()
    assert (answer.Status, str(answer.OffendingElement)) == (0x0122, str(dcmread_tag("AffectedSOPClassUID")))
    error = (f"C-STORE of 1.2.840.10008.5.1.4.1.1.2 on presentation context {wrong.context_id}, negotiated for "
             f"{context_class} (PS3.8 9.3.5.1)")
    assert answer.ErrorComment == error[:64].rstrip()  # LO, 64 characters, trailing space dropped
    letter = dead_letter_with(gateway.settings, marker.encode())
    assert (letter.stage, letter.reason, letter.error) == ("dicom-scp", "context_mismatch", error)
    stored = [p for p in gateway.store.root.rglob(f"{instance.SOPInstanceUID}.dcm")]
    assert stored == []


def test_the_same_instance_twice_is_idempotent_one_blob_two_identical_events(gateway: Gateway,
                                                                                 tmp_path: Path) -> None:
    path = encoded(ct_instance("CASE-DUPLICATE"), tmp_path, "dup.dcm")
    sop_instance_uid = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
    assert [send_as_is(gateway.settings, path).Status for _ in range(2)] == [0x0000, 0x0000]

    events = [e for e in consume(gateway.settings, INSTANCE_RECEIVED, count=10**6, timeout_s=4)
              if e.sop_instance_uid == sop_instance_uid]
    # At-least-once into the topic; downstream keys on sop_instance_uid and the claim check is the same.
    assert len(events) == 2
    assert len({(e.blob_uri, e.blob_sha256, e.study_uid) for e in events}) == 1
    blobs = [p for p in gateway.store.root.rglob(f"{sop_instance_uid}.dcm")]
    assert len(blobs) == 1
    assert dcmread(io.BytesIO(blobs[0].read_bytes())).PatientID == "CASE-DUPLICATE"
