"""STOW-RS ingest benchmark: radstream's STOW-RS gateway beside Orthanc's own REST ingest.

Both get the same real files (pydicom's CT_small / MR_small with new UIDs per instance)
in the same run: our endpoint over STOW-RS (``multipart/related``, ``--per-request``
instances per POST, bearer token, each instance validated, stored as a blob and acked
by the Tansu broker before the answer), Orthanc over ``POST /instances`` (one instance
per request, indexed in its SQLite database and stored on disk). ``--senders`` threads
post concurrently to each. Prints instances/s of each and ``ours / orthanc = ratio``.

    python -m load.bench_stow --instances 400 [--senders 4] [--per-request 10]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from load.orthanc_peer import start_orthanc
from radstream import procs
from schemas.settings import load_settings
from adapters.kafka import ensure_topics

TOKEN = "bench-token"
BOUNDARY = "radstream-bench"


def instances(count: int) -> list[bytes]:
    samples = [dcmread(get_testdata_file(n, download=False)) for n in ("CT_small.dcm", "MR_small.dcm")]
    out, study = [], generate_uid()
    for i in range(count):
        instance = copy.deepcopy(samples[i % len(samples)])
        if i % 50 == 0:
            study = generate_uid()
        instance.StudyInstanceUID, instance.SeriesInstanceUID = study, generate_uid()
        instance.SOPInstanceUID = generate_uid()
        instance.file_meta.MediaStorageSOPInstanceUID = instance.SOPInstanceUID
        buffer = io.BytesIO()
        instance.save_as(buffer, enforce_file_format=False)
        out.append(buffer.getvalue())
    return out


def multipart(parts: list[bytes]) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + p + b"\r\n" for p in parts) + f"--{BOUNDARY}--\r\n".encode()


def timed(batches: list[list[bytes]], send, senders: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(send, batches))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--per-request", type=int, default=10)
    args = parser.parse_args()
    ours_files, peer_files = instances(args.instances), instances(args.instances)
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp_dir:
        tmp = Path(tmp_dir)
        settings = load_settings(
            data_dir=tmp / "data", blobs={"backend": "local"},
            kafka={"embedded_port": procs.free_port(), "storage": "memory://tansu/", "partitions": 4},
            stow={"port": procs.free_port(), "tokens": f"{TOKEN}=BENCH"},
            metrics={"gateway_port": 0, "worker_port": 0, "hl7_gateway_port": 0, "stow_gateway_port": 0})
        broker = procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, "memory://tansu/",
                                   log_path=tmp / "tansu.log")
        gateway = orthanc = None
        try:
            ensure_topics(settings)
            env = {**os.environ, **settings.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                   "RADSTREAM_LOG_LEVEL": "WARNING"}
            gateway = procs.spawn(procs.python_module("gateways.stow_rs"), env=env, log_path=tmp / "gateway.log")
            procs.wait_for_port("127.0.0.1", settings.stow.port, 30, gateway)
            orthanc = start_orthanc(tmp / "orthanc")
            url = f"http://127.0.0.1:{settings.stow.port}/dicomweb/studies"
            headers = {"Authorization": f"Bearer {TOKEN}",
                       "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
            session = requests.Session()

            def stow(batch: list[bytes]) -> None:
                answer = session.post(url, data=multipart(batch), headers=headers, timeout=120)
                assert answer.status_code == 200, answer.text

            def orthanc_post(batch: list[bytes]) -> None:
                for data in batch:
                    answer = session.post(orthanc.url + "/instances", data=data, timeout=120)
                    assert answer.status_code == 200, answer.text

            n = args.per_request
            stow([ours_files[0]])  # warm-up: producer connected, topics' metadata known
            orthanc_post([peer_files[0]])
            ours_s = timed([ours_files[i:i + n] for i in range(1, len(ours_files), n)], stow, args.senders)
            peer_s = timed([peer_files[i:i + n] for i in range(1, len(peer_files), n)], orthanc_post, args.senders)
        finally:
            if orthanc is not None:
                orthanc.stop()
            if gateway is not None:
                procs.stop(gateway, grace_s=5)
            procs.stop(broker, grace_s=1)
    count = args.instances - 1
    ours, peer = count / ours_s, count / peer_s
    print(f"instances: {count}, senders: {args.senders}, STOW instances per request: {n}")
    print(f"radstream STOW-RS (validate, blob, Kafka ack): {ours:8.1f} instances/s")
    print(f"Orthanc POST /instances (index, disk):         {peer:8.1f} instances/s")
    print(f"ours / orthanc = {ours / peer:.2f}")


if __name__ == "__main__":
    main()
