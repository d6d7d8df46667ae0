"""The results-out benchmark's peers (load/bench_results.py): dcmtk's storescu and the ``hl7``
client sending the same documents straight to the same receivers, and the broker the run needs."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import hl7
import hl7.client
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from adapters.result_documents import build_oru, build_sr, idempotency_key
from load.orthanc_peer import Orthanc
from load.results_measure import SITE, STORESCU, BenchError, Figures, paced
from schemas.events import StudyResult



# ---------------------------------------------------------------- the peers


@dataclass
class Documents:
    """The SR files and ORU messages of the peers' results, built before the clock starts."""

    sr_files: list[Path]
    oru: list[str]
    sr_build_ms: list[float]


def build_documents(results: list[StudyResult], out: Path) -> Documents:
    out.mkdir(parents=True, exist_ok=True)
    files, messages, build_ms = [], [], []
    for number, result in enumerate(results):
        started = time.perf_counter()
        ds = build_sr(result)
        build_ms.append((time.perf_counter() - started) * 1000)
        path = out / f"sr-{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        control_id = idempotency_key(result.trace_id, result.revision, "ris")[:20]
        messages.append(build_oru(result, receiving_app="RIS", receiving_facility=SITE, control_id=control_id))
    return Documents(files, messages, build_ms)


def storescu(files: list[Path], port: int, rate: float, started: float) -> list[float]:
    """dcmtk's storescu, one process (and association) per SR; done times on perf_counter."""
    env, done = {**os.environ, "TCP_NODELAY": "1"}, []
    for index, _ in paced(len(files), rate, started):
        answer = subprocess.run([STORESCU, "-R", "-aec", "ORTHANC", "127.0.0.1", str(port), str(files[index])],
                                env=env, capture_output=True, text=True, timeout=60)
        if answer.returncode != 0:
            raise BenchError(f"storescu failed on {files[index].name}: {answer.stderr[-500:]}")
        done.append(time.perf_counter())
    return done


def mllp_client(messages: list[str], port: int, rate: float, started: float) -> list[float]:
    """``hl7.client.MLLPClient`` on one connection, each message then its ACK; done times."""
    done = []
    with hl7.client.MLLPClient("127.0.0.1", port) as client:
        client.socket.settimeout(30)
        for index, _ in paced(len(messages), rate, started):
            reply = client.send_message(messages[index])
            while not reply.endswith(b"\x1c\r"):  # an ACK larger than one read
                reply += client.socket.recv(4096)
            if b"MSA|AA|" not in reply:
                raise BenchError(f"the RIS did not accept ORU {index}: {reply[:200]!r}")
            done.append(time.perf_counter())
    return done


def pynetdicom_one_association(files: list[Path], port: int, rate: float) -> list[float]:
    """pynetdicom C-STOREs on one association held open; latencies in ms from each due time.
    Each SR gets a new SOP Instance UID so Orthanc stores it instead of keeping the one it has."""
    datasets = []
    for path in files:
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    ae = AE(ae_title="PEER")
    ae.add_requested_context(datasets[0].SOPClassUID, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    if not assoc.is_established:
        raise BenchError("pynetdicom: no association with Orthanc")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as our sender does
    latencies = []
    try:
        for index, due in paced(len(datasets), rate, time.perf_counter()):
            status = assoc.send_c_store(datasets[index])
            if int(status.get("Status", -1)) != 0:
                raise BenchError(f"pynetdicom: C-STORE of SR {index} answered {status.get('Status')}")
            latencies.append((time.perf_counter() - due) * 1000)
    finally:
        assoc.release()
    return latencies


def peers(docs: Documents, dicom_port: int, mllp_port: int, rate: float) -> Figures:
    """storescu and MLLPClient side by side from the same start, at the same rate."""
    started = time.perf_counter() + 0.05
    done: dict[str, list[float]] = {}
    errors: list[BaseException] = []

    def run(kind: str, send, *args) -> None:
        try:
            done[kind] = send(*args, rate, started)
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in the caller's thread)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("sr", storescu, docs.sr_files, dicom_port)),
               threading.Thread(target=run, args=("oru", mllp_client, docs.oru, mllp_port))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    due = [started + i / rate if rate else started for i in range(len(docs.oru))]
    sr = [(t - d) * 1000 for t, d in zip(done["sr"], due, strict=True)]
    oru = [(t - d) * 1000 for t, d in zip(done["oru"], due, strict=True)]
    span = max(done["sr"][-1], done["oru"][-1]) - started
    return Figures(sr, oru, [max(a, b) for a, b in zip(sr, oru, strict=True)], span)


def instance_count(orthanc: Orthanc) -> int:
    return int(orthanc.request("GET", "/statistics")["CountInstances"])


def write_destinations(path: Path, dicom_port: int, mllp_port: int) -> Path:
    """The destinations file of ours: the SR to Orthanc (the peer PACS), the ORU to the RIS peer."""
    path.write_text(
        f'[destinations.pacs]\nkind = "sr"\nhost = "127.0.0.1"\nport = {dicom_port}\ncalled_ae = "ORTHANC"\n\n'
        f'[destinations.ris]\nkind = "oru"\nhost = "127.0.0.1"\nport = {mllp_port}\nreceiving_app = "RIS"\n')
    return path
