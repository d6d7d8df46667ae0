"""DICOM gateway: real senders (dcmtk storescu/echoscu, pynetdicom) against the SCP and
a real Tansu broker; the instance-received and dead-letter topics are read back."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from schemas.blobs import BlobNotFound, InvalidBlobKey, instance_key, validate_key
from adapters.blobs import LocalBlobStore
from gateways.dicom_scp import start_gateway
from gateways.publisher import EventPublisher
from radstream import procs
from schemas.codec import Codec
from schemas.events import DeadLetter, InstanceReceived, Record, trace_id_for
from schemas.settings import Settings
from schemas.topics import DEAD_LETTER, INSTANCE_RECEIVED, TopicSpec
from adapters.kafka import ensure_topics

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
CALLING_AE = "SITE_A"

#: pydicom's and pydicom-data's real files: CT, MR, J2K, JPEG 12-bit, RT plan, chest CR, head CT.
SAMPLE_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm", "rtplan.dcm",
                "RG1_UNCR.dcm", "693_UNCR.dcm")


def sample_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(path)


def with_new_uids(dataset: Dataset) -> Dataset:
    """A new instance of a new study: pydicom's copy() is shallow, so deepcopy."""
    instance = copy.deepcopy(dataset)
    instance.StudyInstanceUID = generate_uid()
    instance.SeriesInstanceUID = generate_uid()
    instance.SOPInstanceUID = generate_uid()
    instance.file_meta.MediaStorageSOPInstanceUID = instance.SOPInstanceUID
    return instance


@dataclass
class Gateway:
    settings: Settings
    store: LocalBlobStore
    publisher: EventPublisher


@pytest.fixture
def gateway(broker: Settings) -> Iterator[Gateway]:
    """The SCP in this process (pynetdicom's server threads) against the test broker."""
    store = LocalBlobStore(broker.blob_root)
    publisher = EventPublisher(broker)
    server = start_gateway(broker, store, publisher)
    try:
        yield Gateway(broker, store, publisher)
    finally:
        server.shutdown()
        publisher.close(timeout_s=2)


# ---------------------------------------------------------------- senders and readers


def storescu(settings: Settings, files: Sequence[Path], *inputs: str | Path, config_dir: Path,
             extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu, proposing each file's own transfer syntax (one presentation
    context per SOP class and syntax, so compressed files are sent as they are)."""
    cfg = config_dir / "storescu.cfg"
    cfg.write_text(_storescu_profile(files))
    argv = [STORESCU, "-v", "-xf", str(cfg), "Gateway", "-aec", settings.dicom.ae_title, "-aet", CALLING_AE,
            *extra, settings.bind_host, str(settings.dicom.port), *map(str, inputs or files)]
    # TCP_NODELAY=1: without it Nagle + delayed ACK cost ~40 ms per message.
    return subprocess.run(argv, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True,
                          timeout=120)


def _storescu_profile(files: Sequence[Path]) -> str:
    pairs = sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))
                    for h in (dcmread(f, stop_before_pixels=True) for f in files)})
    syntaxes = sorted({ts for _, ts in pairs} | {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2"})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    contexts = sorted({(sop, ts) for sop, ts in pairs} | {(sop, "1.2.840.10008.1.2.1") for sop, _ in pairs})
    for n, (sop, ts) in enumerate(contexts, start=1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Gateway]", "PresentationContexts = Contexts"]
    return "\n".join(lines) + "\n"


def c_store(settings: Settings, instance: Dataset | Path, calling_ae: str = CALLING_AE) -> Dataset:
    """One C-STORE with pynetdicom as the SCU; returns the response status dataset."""
    header = instance if isinstance(instance, Dataset) else dcmread(instance, stop_before_pixels=True)
    scu = AE(ae_title=calling_ae)
    scu.add_requested_context(header.file_meta.MediaStorageSOPClassUID, header.file_meta.TransferSyntaxUID)
    assoc = scu.associate(settings.bind_host, settings.dicom.port, ae_title=settings.dicom.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(instance)
    finally:
        assoc.release()


def c_echo(settings: Settings) -> int:
    scu = AE(ae_title=CALLING_AE)
    scu.add_requested_context(Verification)
    assoc = scu.associate(settings.bind_host, settings.dicom.port, ae_title=settings.dicom.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def consume(settings: Settings, spec: TopicSpec, count: int, timeout_s: float = 30.0,
            linger_s: float = 0.5) -> list[Record]:
    """Read ``spec``'s topic from the beginning until ``count`` events arrived (and a
    short while after, so duplicates would show)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"test-{time.time_ns()}",
                         "session.timeout.ms": 6000, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    # Explicit assignment: no group join to wait for.
    consumer.assign([TopicPartition(spec.name(settings), p, OFFSET_BEGINNING)
                     for p in range(settings.kafka.partitions)])
    codec, events = Codec(), []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            events.append(codec.decode(message.value(), spec.event))
            if len(events) >= count:
                deadline = min(deadline, time.monotonic() + linger_s)
    finally:
        consumer.close()
    return events


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- scenarios


def test_storescu_folder_of_real_instances_becomes_one_event_and_one_blob_each(gateway: Gateway,
                                                                               tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    (outbox / "nested").mkdir(parents=True)
    originals = {}
    for name in SAMPLE_FILES:
        target = outbox / ("nested" if name.startswith("RG1") else "") / name
        target.write_bytes(sample_file(name).read_bytes())
    # RLE and deflated variants, as new instances so their UIDs do not collide.
    rle = with_new_uids(dcmread(sample_file("MR_small_RLE.dcm")))
    rle.save_as(outbox / "mr_rle.dcm", enforce_file_format=True)
    deflated = with_new_uids(dcmread(sample_file("CT_small.dcm")))
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated.save_as(outbox / "ct_deflated.dcm", enforce_file_format=True)
    files = sorted(p for p in outbox.rglob("*.dcm"))
    for path in files:
        original = dcmread(path)
        originals[str(original.SOPInstanceUID)] = original

    sent = storescu(gateway.settings, files, outbox, "+sd", "+r", config_dir=tmp_path)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stderr.count("Received Store Response (Success)") == len(files), sent.stderr

    events = consume(gateway.settings, INSTANCE_RECEIVED, count=len(files))
    assert all(isinstance(e, InstanceReceived) for e in events)
    assert Counter(e.sop_instance_uid for e in events) == Counter(list(originals))
    for event in events:
        original = originals[event.sop_instance_uid]
        assert event.study_uid == original.StudyInstanceUID
        assert event.series_uid == original.SeriesInstanceUID
        assert event.sop_class_uid == original.SOPClassUID
        assert event.modality == original.Modality
        assert event.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        assert event.trace_id == trace_id_for(event.study_uid)
        assert (event.source_site, event.calling_ae, event.called_ae) == (CALLING_AE, CALLING_AE, "RADSTREAM")
        assert event.gateway == "dicom-scp"
        assert event.patient_id == (original.get("PatientID") or None)
        assert event.patient_name == (str(original.PatientName).strip() or None)
        assert event.rows == original.get("Rows") and event.columns == original.get("Columns")

        assert gateway.store.exists(event.blob_uri)
        blob = gateway.store.get(event.blob_uri)
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (event.blob_size, event.blob_sha256)
        stored = dcmread(io.BytesIO(blob))
        assert stored.SOPInstanceUID == event.sop_instance_uid
        assert stored.file_meta.SourceApplicationEntityTitle.strip() == CALLING_AE
        if "PixelData" in original:
            assert stored.PixelData == original.PixelData
    ct_uid = dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True).SOPInstanceUID
    ct = next(e for e in events if e.sop_instance_uid == ct_uid)
    assert (ct.rows, ct.columns, ct.instance_number, ct.study_date) == (128, 128, 1, "20040119")
    assert (dcmread(io.BytesIO(gateway.store.get(ct.blob_uri))).pixel_array
            == originals[ct.sop_instance_uid].pixel_array).all()


def test_the_gateway_process_unbinds_pynetdicom_s_logging_handlers_unless_debugging(settings: Settings,
                                                                                     monkeypatch) -> None:
    """pynetdicom's standard handlers format a log line for every PDU and DIMSE message (and
    copy each C-STORE's data set to see that it is not empty) at INFO and DEBUG, which the
    gateway's pynetdicom logger drops unless radstream logs at DEBUG."""
    import logging

    from gateways.dicom_scp import _prepare

    pynetdicom_log, dul_log = logging.getLogger("pynetdicom"), logging.getLogger("pynetdicom.dul")
    level, filters = pynetdicom_log.level, list(dul_log.filters)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    try:
        _prepare(settings.model_copy(update={"log_level": "DEBUG"}))
        assert _config.LOG_HANDLER_LEVEL == "standard"
        _prepare(settings.model_copy(update={"log_level": "INFO"}))
        assert _config.LOG_HANDLER_LEVEL == "none"
        assert pynetdicom_log.level == logging.WARNING
    finally:
        pynetdicom_log.setLevel(level)
        dul_log.filters[:] = filters


def test_echoscu_against_the_gateway_process_then_sigterm_stops_it_cleanly(broker: Settings,
                                                                           tmp_path: Path) -> None:
    env = {**os.environ, **broker.to_env()}
    child = procs.spawn(procs.python_module("gateways.dicom_scp"), env=env, log_path=tmp_path / "gateway.log")
    try:
        procs.wait_for_port(broker.bind_host, broker.dicom.port, 30, child)
        echo = subprocess.run([ECHOSCU, "-v", "-aec", "RADSTREAM", "-aet", CALLING_AE, broker.bind_host,
                               str(broker.dicom.port)], env={**os.environ, "TCP_NODELAY": "1"},
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        assert "Received Echo Response (Success)" in echo.stderr
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=20) == 0
    finally:
        procs.stop(child, grace_s=1)
    assert "DICOM gateway stopped" in (tmp_path / "gateway.log").read_text()


def test_gateway_refuses_to_start_on_a_taken_port(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((settings.bind_host, settings.dicom.port))
        taken.listen()
        run = subprocess.run(procs.python_module("gateways.dicom_scp"), env={**os.environ, **settings.to_env()},
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert f"{settings.bind_host}:{settings.dicom.port}" in run.stderr and "already in use" in run.stderr


def test_instance_without_study_uid_is_refused_and_dead_lettered(gateway: Gateway) -> None:
    instance = with_new_uids(dcmread(sample_file("CT_small.dcm")))
    del instance.StudyInstanceUID
    refused_before = metric("radstream_dicom_instances_total", status="0xC000")

    status = c_store(gateway.settings, instance)

    assert status.Status == 0xC000
    assert "StudyInstanceUID" in status.ErrorComment
    assert metric("radstream_dicom_instances_total", status="0xC000") == refused_before + 1
    (letter,) = consume(gateway.settings, DEAD_LETTER, count=1)
    assert isinstance(letter, DeadLetter)
    assert (letter.stage, letter.reason) == ("dicom-scp", "missing_uid")
    assert "StudyInstanceUID" in letter.error
    assert letter.key is None and letter.payload_uri is None
    assert dcmread(io.BytesIO(letter.payload)).SOPInstanceUID == instance.SOPInstanceUID
    assert consume(gateway.settings, INSTANCE_RECEIVED, count=1, timeout_s=1) == []


def test_bytes_that_are_not_a_data_set_are_refused_and_dead_lettered(gateway: Gateway, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    instance = with_new_uids(dcmread(sample_file("CT_small.dcm")))
    instance.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    encoded = (tmp_path / "ct.dcm").read_bytes()
    meta_end = 132 + 12 + int.from_bytes(encoded[140:144], "little")  # preamble, DICM, group length
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(encoded[:meta_end] + b"\x08\x00\x18\x00UI\xff\xff" + os.urandom(2000))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are

    status = c_store(gateway.settings, garbage)

    assert status.Status == 0xC000
    (letter,) = consume(gateway.settings, DEAD_LETTER, count=1)
    assert letter.reason in ("undecodable", "truncated", "missing_uid", "invalid_uid") and letter.payload


def test_large_refused_instance_is_kept_by_claim_check(gateway: Gateway) -> None:
    chest = with_new_uids(dcmread(sample_file("RG1_UNCR.dcm")))  # 7 MB: too large to inline
    del chest.StudyInstanceUID

    assert c_store(gateway.settings, chest).Status == 0xC000

    (letter,) = consume(gateway.settings, DEAD_LETTER, count=1)
    assert letter.payload is None and "/rejected/" in letter.payload_uri
    kept = dcmread(io.BytesIO(gateway.store.get(letter.payload_uri)))
    assert kept.SOPInstanceUID == chest.SOPInstanceUID and kept.PixelData == chest.PixelData


class FailingStore(LocalBlobStore):
    def put(self, key: str, data: bytes, **hints):  # type: ignore[override]
        if not key.startswith("rejected/"):
            raise OSError(28, "No space left on device")
        return super().put(key, data, **hints)


def test_blob_store_failure_answers_out_of_resources_and_is_dead_lettered(broker: Settings) -> None:
    publisher = EventPublisher(broker)
    server = start_gateway(broker, FailingStore(broker.blob_root), publisher)
    try:
        instance = with_new_uids(dcmread(sample_file("CT_small.dcm")))
        status = c_store(broker, instance)
        assert status.Status == 0xA700 and "No space left" in status.ErrorComment
        (letter,) = consume(broker, DEAD_LETTER, count=1)
        assert (letter.reason, letter.key) == ("blob_store_failed", instance.StudyInstanceUID)
        assert dcmread(io.BytesIO(letter.payload)).SOPInstanceUID == instance.SOPInstanceUID
        assert consume(broker, INSTANCE_RECEIVED, count=1, timeout_s=2) == []  # no event names the missing blob
    finally:
        server.shutdown()
        publisher.close(timeout_s=2)


class WatchedStore(LocalBlobStore):
    """Each put first watches the instance.received topic for a while: what a consumer could
    read while the blob is still being stored."""

    def __init__(self, root: Path, settings: Settings) -> None:
        super().__init__(root)
        self.settings = settings
        self.seen_while_storing: list[Record] = []

    def put(self, key: str, data: bytes, **hints):  # type: ignore[override]
        self.seen_while_storing += consume(self.settings, INSTANCE_RECEIVED, count=1, timeout_s=2, linger_s=0)
        return super().put(key, data, **hints)


def test_the_event_is_published_only_once_its_blob_is_stored(broker: Settings) -> None:
    # Assembly completes a study at its last instance and de-identification reads every blob
    # at once: an event visible before its blob made de-identification fail "BlobNotFound".
    store = WatchedStore(broker.blob_root, broker)
    publisher = EventPublisher(broker)
    server = start_gateway(broker, store, publisher)
    try:
        instance = with_new_uids(dcmread(sample_file("CT_small.dcm")))
        assert c_store(broker, instance).Status == 0x0000
        assert store.seen_while_storing == []
        (event,) = consume(broker, INSTANCE_RECEIVED, count=1)
        assert dcmread(io.BytesIO(store.get(event.blob_uri))).SOPInstanceUID == instance.SOPInstanceUID
    finally:
        server.shutdown()
        publisher.close(timeout_s=2)


class RendezvousStore(LocalBlobStore):
    """Each put waits until another put is in progress: only overlapping stores pass."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.barrier = threading.Barrier(2, timeout=20)

    def put(self, key: str, data: bytes, **hints):  # type: ignore[override]
        self.barrier.wait()
        return super().put(key, data, **hints)


def test_associations_from_two_senders_are_served_at_the_same_time(broker: Settings, tmp_path: Path) -> None:
    publisher = EventPublisher(broker)
    server = start_gateway(broker, RendezvousStore(broker.blob_root), publisher)
    try:
        files = []
        for site in ("a", "b"):
            path = tmp_path / f"{site}.dcm"
            with_new_uids(dcmread(sample_file("CT_small.dcm"))).save_as(path, enforce_file_format=True)
            files.append(path)
        env = {**os.environ, "TCP_NODELAY": "1"}
        senders = [subprocess.Popen([STORESCU, "-aec", "RADSTREAM", "-aet", f"SITE_{site.upper()}",
                                     broker.bind_host, str(broker.dicom.port), str(path)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                   for site, path in zip("ab", files)]
        assert [proc.wait(timeout=60) for proc in senders] == [0, 0]
        events = consume(broker, INSTANCE_RECEIVED, count=2)
        assert sorted(e.source_site for e in events) == ["SITE_A", "SITE_B"]
    finally:
        server.shutdown()
        publisher.close(timeout_s=2)


def test_data_set_that_is_not_the_announced_instance_is_refused(gateway: Gateway, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    instance = with_new_uids(dcmread(sample_file("CT_small.dcm")))
    instance.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # what the request will announce
    path = tmp_path / "mismatch.dcm"
    instance.save_as(path, enforce_file_format=False)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file as is

    status = c_store(gateway.settings, path)

    assert status.Status == 0xA900
    (letter,) = consume(gateway.settings, DEAD_LETTER, count=1)
    assert letter.reason == "sop_instance_mismatch" and letter.key == instance.StudyInstanceUID
    assert letter.trace_id == trace_id_for(instance.StudyInstanceUID)


@pytest.mark.filterwarnings("ignore:(Failed to decode|Unknown encoding):UserWarning")
def test_odd_character_sets_are_decoded_without_refusing_the_instance(gateway: Gateway,
                                                                      tmp_path: Path) -> None:
    instance = with_new_uids(dcmread(sample_file("CT_small.dcm")))
    instance.SpecificCharacterSet = "ISO_IR 100"
    instance.PatientName = "Müller^Jörg"
    latin1 = tmp_path / "latin1.dcm"
    instance.save_as(latin1, enforce_file_format=True)
    # Same bytes, wrong declarations: Latin-1 bytes declared UTF-8, and an unknown set.
    for declared in (b"ISO_IR 192", b"ISO_IR 999"):
        relabelled = with_new_uids(dcmread(latin1))
        buffer = tmp_path / "relabelled.dcm"
        relabelled.save_as(buffer, enforce_file_format=True)
        buffer.write_bytes(buffer.read_bytes().replace(b"ISO_IR 100", declared))
        assert c_store(gateway.settings, buffer).Status == 0x0000

    names = [e.patient_name for e in consume(gateway.settings, INSTANCE_RECEIVED, count=2)]
    assert len(names) == 2
    assert all(name and name.startswith("M") and "ller^J" in name for name in names), names


def test_broker_down_answers_out_of_resources_and_the_gateway_keeps_serving(settings: Settings,
                                                                            tmp_path: Path) -> None:
    settings.kafka.produce_timeout_s = 2.0
    host, port = settings.bind_host, settings.kafka.embedded_port
    broker = procs.start_tansu(host, port, "memory://tansu/", log_path=tmp_path / "tansu.log")
    store = LocalBlobStore(settings.blob_root)
    publisher = EventPublisher(settings)
    server = start_gateway(settings, store, publisher)
    try:
        ensure_topics(settings)
        ct = dcmread(sample_file("CT_small.dcm"))
        assert c_store(settings, with_new_uids(ct)).Status == 0x0000

        procs.stop(broker, grace_s=0.5)
        refused_before = metric("radstream_dicom_instances_total", status="0xA700")
        status = c_store(settings, with_new_uids(ct))
        assert status.Status == 0xA700
        assert metric("radstream_dicom_instances_total", status="0xA700") == refused_before + 1
        assert c_echo(settings) == 0x0000

        # The broker returns (memory storage: empty, topics recreated); the sender's retry succeeds.
        broker = procs.start_tansu(host, port, "memory://tansu/", log_path=tmp_path / "tansu2.log")
        ensure_topics(settings)
        retried = with_new_uids(ct)
        deadline = time.monotonic() + 60
        while (result := c_store(settings, retried).Status) != 0x0000 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert result == 0x0000
        events = consume(settings, INSTANCE_RECEIVED, count=1)
        assert [e.sop_instance_uid for e in events] == [retried.SOPInstanceUID]
    finally:
        server.shutdown()
        publisher.close(timeout_s=1)
        procs.stop(broker, grace_s=0.5)


def test_storing_the_same_instance_twice_keeps_one_blob(gateway: Gateway, tmp_path: Path) -> None:
    ct = sample_file("CT_small.dcm")
    sent = storescu(gateway.settings, [ct], ct, ct, config_dir=tmp_path)
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.count("Received Store Response (Success)") == 2

    events = consume(gateway.settings, INSTANCE_RECEIVED, count=2)
    assert len(events) == 2 and len({e.blob_uri for e in events}) == 1
    assert len({e.blob_sha256 for e in events}) == 1
    sop_instance_uid = dcmread(ct, stop_before_pixels=True).SOPInstanceUID
    assert [p.name for p in gateway.store.root.rglob("*") if p.is_file()] == [f"{sop_instance_uid}.dcm"]


# ---------------------------------------------------------------- blob store unit tests


def test_blob_keys_are_derived_from_valid_uids_only() -> None:
    assert instance_key("1.2.3", "1.2.3.4", "1.2.3.4.5") == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    for study, series, sop in [("..", "1.2", "1.3"), ("1.2/../..", "1.2", "1.3"), ("1.2", "", "1.3"),
                               ("1.02", "1.2", "1.3"), ("1.2", "1.2", "1." + "1" * 70), ("1.2", "1.2", "1.3\0")]:
        with pytest.raises(InvalidBlobKey):
            instance_key(study, series, sop)


@pytest.mark.parametrize("key", ["../etc/passwd", "/etc/passwd", "a//b", "a/./b", "a\\b", ".hidden",
                                 "a/../../b", "", "a/b\0", "caf\u00e9"])
def test_blob_keys_cannot_leave_the_root(key: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidBlobKey):
        validate_key(key)
    with pytest.raises(InvalidBlobKey):
        LocalBlobStore(tmp_path / "blobs").put(key, b"x")


def test_local_blob_store_round_trip_and_refusals(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    ref = store.put("1.2/3.4/5.6.dcm", b"first")
    again = store.put("1.2/3.4/5.6.dcm", b"second")
    assert ref.uri == again.uri and ref.uri.startswith("file:///")
    assert store.get(ref.uri) == b"second" and store.exists(ref.uri)
    assert again.size == 6 and again.sha256 == hashlib.sha256(b"second").hexdigest()
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == ["5.6.dcm"]  # no temp files left

    missing = store.uri_of("1.2/3.4/9.9.dcm")
    with pytest.raises(BlobNotFound, match="9.9.dcm"):
        store.get(missing)
    assert not store.exists(missing)

    outside = tmp_path / "secret.txt"
    outside.write_text("not a blob")
    for uri in (outside.as_uri(), "s3://bucket/1.2/3.4/5.6.dcm", ref.uri.replace("/5.6.dcm", "/../../secret.txt")):
        with pytest.raises(InvalidBlobKey):
            store.get(uri)

    (store.root / "escape").symlink_to(tmp_path)  # a link planted inside the root
    with pytest.raises(InvalidBlobKey):
        store.put("escape/secret.txt", b"overwrite")
    assert outside.read_text() == "not a blob"


# ---------------------------------------------------------------- file meta unit tests


@pytest.mark.parametrize("sop_instance, transfer_syntax, source_ae", [
    ("1.2.3.4", "1.2.840.10008.1.2.1", "STORESCU"),  # even UID, odd AE title
    ("1.2.345", "1.2.840.10008.1.2", ""),  # odd UID, no source AE
    ("1.2.3", "1.2.840.10008.1.2.4.90", "EVEN"),
])
def test_file_meta_is_encoded_as_pynetdicom_would(sop_instance: str, transfer_syntax: str, source_ae: str) -> None:
    from pydicom.uid import UID
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import create_file_meta, encode_file_meta as pynetdicom_encode

    from gateways.dicom_wire import encode_file_meta

    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    theirs = create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                              transfer_syntax=UID(transfer_syntax))
    if source_ae:
        theirs.SourceApplicationEntityTitle = source_ae
    ours = encode_file_meta(sop_class, sop_instance, transfer_syntax, PYNETDICOM_IMPLEMENTATION_UID,
                            PYNETDICOM_IMPLEMENTATION_VERSION, source_ae)
    assert ours == pynetdicom_encode(theirs)
    meta = dcmread(io.BytesIO(b"\0" * 128 + b"DICM" + ours)).file_meta
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (sop_instance, transfer_syntax)


def test_file_meta_refuses_a_value_its_two_byte_length_cannot_hold() -> None:
    from gateways.dicom_wire import encode_file_meta

    with pytest.raises(ValueError, match=r"\(0002,0003\) of 70000 bytes"):
        encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1" * 70_000, "1.2.840.10008.1.2", "1.2", "X")


def test_a_publish_made_while_others_wait_lingers_to_share_their_request_and_one_alone_does_not(
        broker: Settings) -> None:
    from schemas.events import utcnow

    letter = lambda n: DeadLetter(stage="test", reason="group-commit", error=str(n), failed_at=utcnow(),  # noqa: E731
                                  key=f"k{n}")
    publisher = EventPublisher(broker, group_commit_ms=5000)  # long enough to see what lingers
    try:
        first = publisher.begin(DEAD_LETTER, letter(0))  # nobody else waits: sent at once
        joined = [publisher.begin(DEAD_LETTER, letter(n)) for n in (1, 2, 3)]  # while it waits: they linger
        assert len(publisher._group.producer) == 3
        first()
        assert len(publisher._group.producer) == 3  # the first one's ack did not wait for them
        for wait in joined:
            wait()
        # A caller's ack is its delivery report's callback, and librdkafka frees (and stops
        # counting) the message only after that callback returns: let the poll thread finish.
        deadline = time.monotonic() + 5
        while len(publisher._group.producer) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(publisher._group.producer) == 0
        alone = publisher.begin(DEAD_LETTER, letter(4))  # alone again: not held back
        assert len(publisher._group.producer) == 0
        alone()
        assert sorted(e.error for e in consume(broker, DEAD_LETTER, 5)) == ["0", "1", "2", "3", "4"]
    finally:
        publisher.close(timeout_s=5)
    # turned off, one producer serves everyone
    single = EventPublisher(broker, group_commit_ms=0)
    try:
        assert single._group is single._solo
    finally:
        single.close(timeout_s=5)
