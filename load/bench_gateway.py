"""Benchmark: the radstream DICOM gateway against a bare pynetdicom storage SCP.

Both receive the same N real CT instances (copies of pydicom's CT_small.dcm with new
UIDs) from dcmtk's ``storescu`` in the same run. The bare SCP only writes each data set
to disk; the gateway also parses the header, validates it, writes the blob atomically
(fsync), publishes ``InstanceReceived`` to a real Tansu broker and waits for the ack
before answering. The ratio is what the gateway's guarantees cost per instance.

    python -m load.bench_gateway --instances 300 [--senders 4]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from schemas.blobs import LocalBlobStore
from gateways.dicom_scp import start_gateway
from gateways.publisher import EventPublisher
from radstream import procs
from schemas.settings import Settings, load_settings
from schemas.topics import INSTANCE_RECEIVED, ensure_topics

STORESCU = "/usr/bin/storescu"
CALLING_AE = "BENCH"


def make_instances(count: int, directory: Path) -> list[Path]:
    """``count`` instances of one new CT series, each a real, distinct SOP instance."""
    template = dcmread(get_testdata_file("CT_small.dcm", download=False))
    study_uid, series_uid = generate_uid(), generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
        instance = copy.deepcopy(template)  # Dataset.copy() is shallow
        instance.StudyInstanceUID, instance.SeriesInstanceUID = study_uid, series_uid
        instance.SOPInstanceUID = instance.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        instance.InstanceNumber = number
        instance.NumberOfStudyRelatedInstances = count
        path = directory / f"ct_{number:06d}.dcm"
        instance.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def start_bare_scp(host: str, port: int, directory: Path) -> ThreadedAssociationServer:
    """The peer: pynetdicom's storage SCP at its simplest, writing each data set as received."""
    directory.mkdir(parents=True, exist_ok=True)

    def handle_store(event: evt.Event) -> int:
        with open(directory / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000

    ae = AE("BARE")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = 0  # the same as the gateway
    ae.maximum_associations = 64
    server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert server is not None
    return server


def send(host: str, port: int, called_ae: str, files: Sequence[Path], senders: int) -> float:
    """Send ``files`` with ``senders`` concurrent storescu processes (one association
    each); return the wall-clock seconds until the last one finished."""
    batches = [list(files[i::senders]) for i in range(senders)]
    env = {**os.environ, "TCP_NODELAY": "1"}  # without it: Nagle + delayed ACK, ~40 ms per message
    started = time.perf_counter()
    running = [
        subprocess.Popen([STORESCU, "-aec", called_ae, "-aet", CALLING_AE, host, str(port), *map(str, batch)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for batch in batches if batch
    ]
    outputs = [(proc.communicate()[0], proc.returncode) for proc in running]
    elapsed = time.perf_counter() - started
    for output, returncode in outputs:
        if returncode != 0 or "Store Failed" in output or "Error" in output:
            raise RuntimeError(f"storescu to port {port} failed (exit {returncode}):\n{output[-2000:]}")
    return elapsed


def events_on_topic(settings: Settings) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-count",
                         "session.timeout.ms": 6000})
    try:
        total = 0
        for partition in range(settings.kafka.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(INSTANCE_RECEIVED.name(settings), partition), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=500, help="instances sent to each SCP (default 500)")
    parser.add_argument("--senders", type=int, default=1, help="concurrent storescu processes (default 1)")
    parser.add_argument("--linger-ms", type=float, default=0.0, help="the gateway producer's linger.ms")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.senders < 1:
        parser.error("--instances and --senders must be at least 1")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    host = "127.0.0.1"

    with tempfile.TemporaryDirectory(prefix="radstream-bench-") as tmp:
        root = Path(tmp)
        print(f"generating {args.instances} CT instances ...", flush=True)
        files = make_instances(args.instances, root / "outbox")
        warmup = make_instances(1, root / "warmup")  # first association / first produce not timed
        size_kb = files[0].stat().st_size / 1000
        print(f"instances: {len(files)} x {size_kb:.0f} kB CT, senders: {args.senders}, "
              f"storescu associations: {min(args.senders, len(files))}", flush=True)

        port = procs.free_port(host)
        bare = start_bare_scp(host, port, root / "bare")
        try:
            send(host, port, "BARE", warmup, 1)
            bare_s = send(host, port, "BARE", files, args.senders)
        finally:
            bare.shutdown()
        bare_rate = len(files) / bare_s
        print(f"bare pynetdicom SCP instances/s: {bare_rate:.1f}", flush=True)

        settings = load_settings(
            data_dir=root / "data",
            kafka={"embedded_port": procs.free_port(host), "topic_prefix": "bench"},
            dicom={"port": procs.free_port(host), "max_associations": max(16, args.senders)},
            metrics={"gateway_port": 0},
        )
        broker = procs.start_tansu(host, settings.kafka.embedded_port, "memory://tansu/",
                                   log_path=root / "tansu.log")
        publisher = None
        server = None
        try:
            ensure_topics(settings)
            publisher = EventPublisher(settings, linger_ms=args.linger_ms)
            server = start_gateway(settings, LocalBlobStore(settings.blob_root), publisher)
            send(host, settings.dicom.port, settings.dicom.ae_title, warmup, 1)
            handled_before = REGISTRY.get_sample_value("radstream_dicom_store_seconds_sum") or 0.0
            gateway_s = send(host, settings.dicom.port, settings.dicom.ae_title, files, args.senders)
            handled_s = (REGISTRY.get_sample_value("radstream_dicom_store_seconds_sum") or 0.0) - handled_before
            published = events_on_topic(settings) - 1  # less the warm-up instance
        finally:
            if server is not None:
                server.shutdown()
            if publisher is not None:
                publisher.close(timeout_s=5)
            procs.stop(broker, grace_s=1)
        gateway_rate = len(files) / gateway_s
        print(f"gateway instances/s: {gateway_rate:.1f}")
        print(f"gateway mean C-STORE handling ms (parse, blob, broker ack): {handled_s / len(files) * 1000:.2f}")
        print(f"events on {INSTANCE_RECEIVED.suffix}: {published}/{len(files)}")
        print(f"radstream / bare-pynetdicom = {gateway_rate / bare_rate:.2f}")
        if published != len(files):
            print("error: the gateway acknowledged instances that are not on the topic", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
