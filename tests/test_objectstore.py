"""The claim-check store over S3, against a real SeaweedFS (``weed mini``)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import obstore
import pytest
from pydantic import SecretStr

from schemas.blobs import BlobError, BlobNotFound, BlobUnavailable, instance_key, pixel_sample_bytes
from adapters.s3 import S3BlobStore, S3Credentials, credentials_path, load_credentials, open_s3_store
from schemas.settings import Settings

pytestmark = pytest.mark.integration

KEY = instance_key("1.2.840.1", "1.2.840.1.2", "1.2.840.1.2.3")


def test_put_is_idempotent_and_get_by_claim_check_uri_returns_the_bytes(objectstore: Settings) -> None:
    store = open_s3_store(objectstore)
    first = store.put(KEY, b"DICM" * 1000)
    second = store.put(KEY, b"DICM" * 1000)
    assert first == second and first.uri == f"s3://{objectstore.blobs.bucket}/{KEY}"
    assert store.keys("1.2.840.1/") == [KEY], "storing the same instance twice is one object"
    assert store.keys("1.2.840") == store.keys("1.2.840.1/1.2") == [KEY], "a prefix need not end at a '/'"
    assert store.keys("1.2.840.1/9") == store.keys("9") == []
    assert store.get(first.uri) == b"DICM" * 1000
    assert store.exists(first.uri) and first.size == 4000


def test_a_missing_object_is_a_clear_error_naming_the_uri(objectstore: Settings) -> None:
    store = open_s3_store(objectstore)
    uri = f"s3://{objectstore.blobs.bucket}/1.2/3.4/5.6.dcm"
    with pytest.raises(BlobNotFound, match="1.2/3.4/5.6.dcm"):
        store.get(uri)
    assert not store.exists(uri)
    with pytest.raises(BlobError, match="is not an s3://bucket/key URI"):
        store.get("file:///etc/passwd")


def test_bad_credentials_and_an_unreachable_store_are_named(objectstore: Settings) -> None:
    wrong = S3BlobStore(endpoint=objectstore.s3_endpoint, bucket=objectstore.blobs.bucket,
                        credentials=S3Credentials("NOTAKEY", "nope"), timeout_s=3)
    with pytest.raises(BlobError, match="refused the credentials"):
        wrong.put(KEY, b"x")
    gone = S3BlobStore(endpoint="http://127.0.0.1:9", bucket="radstream",
                       credentials=load_credentials(objectstore), timeout_s=1)
    with pytest.raises(BlobUnavailable, match="127.0.0.1:9 is unreachable"):  # a stage tries it again
        gone.get(f"s3://radstream/{KEY}")


def test_credentials_are_generated_once_and_readable_only_by_the_owner(objectstore: Settings) -> None:
    path = credentials_path(objectstore)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert load_credentials(objectstore) == load_credentials(objectstore)


def test_encryption_at_rest_stores_ciphertext_and_reads_plaintext(objectstore: Settings) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    encrypted = open_s3_store(objectstore.model_copy(update={
        "blobs": objectstore.blobs.model_copy(update={"encryption_key": SecretStr(key)})}))
    plain = open_s3_store(objectstore)
    payload = b"PATIENT^CANARY" * 100
    ref = encrypted.put(KEY, payload)
    assert encrypted.get(ref.uri) == payload
    assert ref.sha256 == plain.ref_for(KEY, payload).sha256, "the digest identifies the instance, not its ciphertext"
    raw = bytes(obstore.get(plain._objects, KEY).bytes())  # the object as stored, not through the store
    assert b"CANARY" not in raw and len(raw) == len(payload) + 12 + 16
    with pytest.raises(BlobError, match="encryption_key is not set"):
        plain.get(ref.uri)


def test_phi_scan_opens_deidentified_blobs_on_s3_that_no_event_references(objectstore: Settings) -> None:
    """The scanner lists the store's deid/ prefix itself: an orphaned blob still counts."""
    import io

    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from schemas.deid.policy import load_policy
    from radstream.phi_scan import scan

    store = open_s3_store(objectstore)
    ds = dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.PatientName = "CANARY^LEAKED"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    store.put("deid/2.25.1/2.25.2/2.25.3.dcm", buffer.getvalue())
    report = scan(objectstore, ["CANARY^LEAKED"], topics=[], store=store, policy=load_policy())
    assert report.blobs == 1
    assert any(f.where == f"s3://{objectstore.blobs.bucket}/deid/2.25.1/2.25.2/2.25.3.dcm"
               and "CANARY" in f.problem.upper() for f in report.findings), report.findings


def test_blobs_are_stored_lz4_framed_where_it_pays_and_read_back_as_sent(objectstore: Settings) -> None:
    from pydicom.data import get_testdata_file

    slice_ = open(get_testdata_file("693_UNCR.dcm", download=False), "rb").read()  # a real 526 kB CT slice
    noise = os.urandom(64 * 1024)  # incompressible: stored as sent
    store, bucket = open_s3_store(objectstore), objectstore.blobs.bucket
    for key, data, framed in ((KEY, slice_, True), (KEY.replace(".dcm", "-noise.dcm"), noise, False)):
        ref = store.put(key, data)
        stored = obstore.get(store._objects, key)
        raw = bytes(stored.bytes())
        assert (stored.attributes.get("radstream-compression") == "lz4-frame") is framed
        assert len(raw) < 0.6 * len(data) if framed else raw == data
        assert store.get(ref.uri) == data and ref.size == len(data)
        assert ref.sha256 == store.ref_for(key, data).sha256, "the digest is of the instance as sent"
    plain = open_s3_store(objectstore.model_copy(update={
        "blobs": objectstore.blobs.model_copy(update={"compression": "none"})}))
    assert plain.get(f"s3://{bucket}/{KEY}") == slice_, "a store set to 'none' still reads framed blobs"
    plain.put(KEY, slice_)
    assert bytes(obstore.get(store._objects, KEY).bytes()) == slice_

    key = base64.b64encode(os.urandom(32)).decode()
    sealed = open_s3_store(objectstore.model_copy(update={
        "blobs": objectstore.blobs.model_copy(update={"encryption_key": SecretStr(key)})}))
    ref = sealed.put(KEY, slice_)
    raw = bytes(obstore.get(store._objects, KEY).bytes())
    assert len(raw) < 0.6 * len(slice_), "compressed before it is encrypted (ciphertext does not compress)"
    assert sealed.get(ref.uri) == slice_


def test_16_bit_pixel_data_is_shuffled_before_lz4_smaller_and_read_back_byte_for_byte(objectstore: Settings) -> None:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file("693_UNCR.dcm", download=False)
    slice_ = open(path, "rb").read()
    header = dcmread(path, stop_before_pixels=True)
    hint = pixel_sample_bytes(header.BitsAllocated, str(header.file_meta.TransferSyntaxUID))
    assert hint == 2, "a native 16-bit CT slice"
    store = open_s3_store(objectstore)
    plain_ref = store.put(KEY, slice_)
    plain = len(bytes(obstore.get(store._objects, KEY).bytes()))
    odd = slice_ + b"\x7f"  # an odd length keeps its last byte where it was
    for data in (slice_, odd):
        ref = store.put(KEY, data, sample_bytes=hint)
        stored = obstore.get(store._objects, KEY)
        assert stored.attributes.get("radstream-compression") == "shuffle2+lz4-frame"
        assert store.get(ref.uri) == data
    shuffled = len(bytes(obstore.get(store._objects, KEY).bytes()))
    assert shuffled < 0.85 * plain, (shuffled, plain)  # measured: 214 kB against 274 kB
    assert store.put(KEY, slice_, sample_bytes=2).sha256 == plain_ref.sha256, "the digest is of the instance as sent"

    noise = os.urandom(64 * 1024)  # incompressible however grouped: stored as sent
    ref = store.put(KEY, noise, sample_bytes=2)
    assert "radstream-compression" not in obstore.get(store._objects, KEY).attributes
    assert store.get(ref.uri) == noise
    # the hint only for native 16-bit pixel data
    assert pixel_sample_bytes(8, "1.2.840.10008.1.2.1") == 1
    assert pixel_sample_bytes(16, "1.2.840.10008.1.2.4.90") == 1  # JPEG 2000: encapsulated
    assert pixel_sample_bytes(16, "1.2.840.10008.1.2.1.99") == 1  # deflated: the bytes are not samples
    assert pixel_sample_bytes(None, "1.2.840.10008.1.2") == 1


def test_stopping_the_embedded_store_removes_the_unix_sockets_it_leaves_in_tmp(durable_settings: Settings,
                                                                              tmp_path) -> None:
    """weed mini makes seaweedfs-<server>-<port>.sock in /tmp and leaves them when it stops:
    without clean-up, every test run and every `radstream up` left a handful there for good."""
    import socket

    from radstream.objectstore import socket_paths, start_embedded, stop_embedded
    from radstream.runtime import objectstore_spec

    proc = start_embedded(durable_settings, tmp_path / "seaweedfs.log")
    try:
        while_running = socket_paths(durable_settings)
        assert len(while_running) >= 3, while_running  # S3, filer and the gRPC servers at least
    finally:
        stop_embedded(proc, durable_settings)
    assert socket_paths(durable_settings) == []
    assert not any(path.exists() for path in while_running)

    # radstream up: the supervisor runs the child's reset after the final stop (and before a restart)
    spec = objectstore_spec(durable_settings)
    assert spec is not None and spec.reset is not None
    stale = socket.socket(socket.AF_UNIX)
    try:
        stale.bind(str(while_running[0]))
        assert socket_paths(durable_settings) == [while_running[0]]
        spec.reset()
        assert socket_paths(durable_settings) == []
    finally:
        stale.close()


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on, read from /proc (its socket inodes in the tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:  # closed since it was listed
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_embedded_store_listens_only_where_settings_say_and_its_workers_reach_its_admin(
        durable_settings: Settings, tmp_path: Path) -> None:
    """weed mini's maintenance workers dial the admin server's gRPC port at its HTTP port +
    10000, whatever -admin.port.grpc says: with another port they retried every 5 s for the
    life of the runtime, logging each try, and would have spoken to whatever listened there.
    Its Iceberg and Lance catalogue servers listened too, its master would report cluster
    statistics to seaweedfs.com, and glog wrote log files of its own into /tmp."""
    import time

    from radstream.objectstore import argv, ports, start_embedded, stop_embedded

    assert "-master.telemetry=false" in argv(durable_settings)
    log_path = tmp_path / "seaweedfs.log"
    proc = start_embedded(durable_settings, log_path)
    try:
        time.sleep(2.0)  # the admin server and its workers start after S3 answers
        assert _listening_ports(proc.pid) == set(ports(durable_settings).values())
    finally:
        stop_embedded(proc, durable_settings)
    log = log_path.read_text(errors="replace")
    assert "Admin        ready" in log
    # glog's own files (weed.<host>.<user>.log.<level>.<time>.<pid>) no longer litter $TMPDIR
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    assert not list(tmp.glob(f"weed.*.log.*.{proc.pid}"))
    for failure in ("connection refused", "INITIAL CONNECTION FAILED", "stream ended"):
        assert failure not in log, log[-2000:]
