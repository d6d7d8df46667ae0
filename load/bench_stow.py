"""STOW-RS ingest benchmark: radstream's STOW-RS gateway beside Orthanc's own REST ingest.

Both get the same real files (pydicom's CT_small / MR_small with new UIDs per instance)
in the same run: our endpoint over STOW-RS (``multipart/related``, ``--per-request``
instances per POST, bearer token, each instance validated, stored as a blob and acked
by the Tansu broker before the answer), Orthanc over ``POST /instances`` (one instance
per request, indexed in its SQLite database and stored on disk). ``--senders`` threads
post concurrently to each. Prints instances/s of each and ``ours / orthanc = ratio``.

The headline is the durable default, as ``radstream up`` runs it: blobs on the embedded
SeaweedFS and the broker's log on ``s3://``. The second line is the broker on
``memory://`` (blobs still on SeaweedFS), which shows what the durable log costs. Each
runs against its own fresh object store and broker; every acknowledged instance must be
on ``instance.received``.

    python -m load.bench_stow --instances 400 [--senders 4] [--per-request 10] [--broker-storage both|s3|memory]
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from load.orthanc_peer import start_orthanc
from load.services import BROKER_STORAGES as STORAGES, events_on_topic, running_gateway
from radstream import procs
from schemas.settings import load_settings
from schemas.topics import INSTANCE_RECEIVED

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


def run_ours(root: Path, storage: str, files: list[bytes], senders: int, per_request: int) -> tuple[float, int]:
    """(instances/s, events on instance.received) of our STOW-RS gateway on a fresh object
    store and broker whose log is on ``storage``; the first file is the untimed warm-up."""
    root.mkdir(parents=True)
    settings = load_settings(data_dir=root / "data", log_level="WARNING", **procs.isolated_listeners(
        kafka={"storage": STORAGES[storage]}, stow={"tokens": f"{TOKEN}=BENCH"}))
    with running_gateway(settings, root, "gateways.stow_rs", settings.stow.port):
        url = f"http://127.0.0.1:{settings.stow.port}/dicomweb/studies"
        headers = {"Authorization": f"Bearer {TOKEN}",
                   "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
        session = requests.Session()

        def stow(batch: list[bytes]) -> None:
            answer = session.post(url, data=multipart(batch), headers=headers, timeout=120)
            assert answer.status_code == 200, answer.text

        stow([files[0]])  # warm-up: producer connected, topics' metadata known
        elapsed = timed(per_post(files, per_request), stow, senders)
        return (len(files) - 1) / elapsed, events_on_topic(settings, INSTANCE_RECEIVED) - 1


def run_orthanc(root: Path, files: list[bytes], senders: int, per_request: int) -> float:
    """Orthanc's instances/s over ``POST /instances``, one instance per request."""
    orthanc = start_orthanc(root / "orthanc")
    try:
        session = requests.Session()

        def post(batch: list[bytes]) -> None:
            for data in batch:
                answer = session.post(orthanc.url + "/instances", data=data, timeout=120)
                assert answer.status_code == 200, answer.text

        post([files[0]])
        return (len(files) - 1) / timed(per_post(files, per_request), post, senders)
    finally:
        orthanc.stop()


def per_post(files: list[bytes], per_request: int) -> list[list[bytes]]:
    return [files[i:i + per_request] for i in range(1, len(files), per_request)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--per-request", type=int, default=10)
    parser.add_argument("--broker-storage", choices=["both", "s3", "memory"], default="both",
                        help="the broker's log: s3:// (the durable default, the headline), memory://, or both")
    args = parser.parse_args(argv)
    if args.instances < 2 or args.senders < 1 or args.per_request < 1:
        parser.error("--instances must be at least 2, --senders and --per-request at least 1")
    storages = ["s3", "memory"] if args.broker_storage == "both" else [args.broker_storage]
    count = args.instances - 1
    print(f"instances: {count} (+1 warm-up), senders: {args.senders}, STOW instances per request: "
          f"{args.per_request}", flush=True)
    rates: dict[str, float] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp:
        peer = run_orthanc(Path(tmp) / "peer", instances(args.instances), args.senders, args.per_request)
        print(f"Orthanc POST /instances (index, disk): {peer:8.1f} instances/s", flush=True)
        for storage in storages:
            rate, on_topic = run_ours(Path(tmp) / storage, storage, instances(args.instances), args.senders,
                                      args.per_request)
            rates[storage] = rate
            print(f"radstream STOW-RS, broker {STORAGES[storage]}, blobs on SeaweedFS (validate, blob, Kafka ack): "
                  f"{rate:8.1f} instances/s; {on_topic}/{count} on {INSTANCE_RECEIVED.suffix}", flush=True)
            if on_topic != count:
                print("error: the gateway acknowledged instances that are not on the topic", file=sys.stderr)
                failed = True
    for storage in storages:
        label = "ours / orthanc" if storage == "s3" else f"ours[{STORAGES[storage]}] / orthanc"
        print(f"{label} = {rates[storage] / peer:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
