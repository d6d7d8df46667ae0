"""The results-out benchmark's outbox mode (load/bench_results.py --mode outbox): result revisions
published onto ``results.outbox``, timing the delivery worker alone against the same sends by the peers."""

from __future__ import annotations

import argparse
import gc
import os
import random
import threading
from pathlib import Path

import hl7
import hl7.client

from adapters.telemetry import configure_logging
from load.hl7_peer import MllpPeer
from load.orthanc_peer import start_orthanc
from load.results_measure import DeliveryStates, Outbox, expect, log, make_results, ours, percentile, ratio_line
from load.results_peers import (
    Documents, build_documents, instance_count, peers, pynetdicom_one_association, write_destinations,
)
from load.services import start_services
from radstream import procs
from schemas.settings import load_settings
from streams.delivery import Delivery, load_destinations



def run_outbox(args: argparse.Namespace, root: Path) -> None:
    rng = random.Random(args.seed)
    ours_results, warmup = make_results(args.results, rng, "R"), make_results(1, rng, "W")
    peer_results, peer_warmup = make_results(args.results, rng, "P"), make_results(1, rng, "V")
    built: dict[str, Documents] = {}
    # the peers' documents are built while the services start (a thread: those are other processes)
    builder = threading.Thread(target=lambda: built.update(
        warmup=build_documents(peer_warmup, root / "peer-warmup-sr"),  # first: highdicom's first build is slow
        timed=build_documents(peer_results, root / "peer-sr")), name="bench-build-documents")
    log(f"building the peers' {args.results} SRs and ORUs ...")
    builder.start()

    storage = "s3://tansu/" if args.storage == "s3" else "memory://tansu/"
    destinations_file = root / "destinations.toml"
    settings = load_settings(data_dir=root / "data", log_level="WARNING", **procs.isolated_listeners(
        kafka={"topic_prefix": "bench", "storage": storage},
        blobs={"backend": "s3" if args.storage == "s3" else "local"},
        results={"destinations_file": destinations_file}))
    configure_logging(settings, "bench")
    log(f"starting {'SeaweedFS + ' if args.storage == 's3' else ''}Tansu ({storage}), Orthanc, the RIS peer ...")
    services = start_services(settings, root)
    orthanc, ris, delivery, outbox, delivery_thread = None, None, None, None, None
    stop, states = threading.Event(), DeliveryStates(settings)
    one_assoc: list[float] = []
    try:
        orthanc = start_orthanc(root / "orthanc")
        dicom_port = int(orthanc.request("GET", "/system")["DicomPort"])
        ris = MllpPeer()
        write_destinations(destinations_file, dicom_port, ris.port)
        delivery = Delivery(settings, load_destinations(destinations_file))
        ready = threading.Event()
        delivery_thread = threading.Thread(target=delivery.run, args=(stop, ready.set), name="delivery", daemon=True)
        delivery_thread.start()
        states.start()
        outbox = Outbox(settings)
        expect(ready.wait(60), "the delivery worker did not join its consumer group within 60 s")
        builder.join()
        expect({"warmup", "timed"} <= built.keys(), "building the peers' documents failed (see above)")
        docs = built["timed"]

        log("warm-up: one result through ours and one document through each peer ...")
        ours(outbox, states, warmup, 0, args.timeout)
        peers(built["warmup"], dicom_port, ris.port, 0)
        stored_before, received_before = instance_count(orthanc), len(ris.received)

        offered = f"{args.rate:g}/s" if args.rate else "all at once"
        log(f"ours: {args.results} results, {offered} ...")
        mine, final = ours(outbox, states, ours_results, args.rate, args.timeout)
        stored_ours, received_ours = instance_count(orthanc) - stored_before, len(ris.received) - received_before
        expect(stored_ours == args.results, f"Orthanc holds {stored_ours} new SRs after ours, not {args.results}")
        expect(received_ours == args.results, f"the RIS received {received_ours} ORUs from ours, not {args.results}")
        retried = sum(1 for state in final.values() if state.attempts > 1)

        log("peers: storescu (a process per SR) beside hl7 MLLPClient ...")
        theirs = peers(docs, dicom_port, ris.port, args.rate)
        stored_peer = instance_count(orthanc) - stored_before - stored_ours
        expect(stored_peer == args.results, f"Orthanc holds {stored_peer} new SRs after storescu, not {args.results}")
        if args.one_association:
            log("peer: pynetdicom, one association ...")
            one_assoc = pynetdicom_one_association(docs.sr_files, dicom_port, args.rate)
            stored_one = instance_count(orthanc) - stored_before - stored_ours - stored_peer
            expect(stored_one == args.results, f"Orthanc holds {stored_one} new SRs after pynetdicom, "
                                               f"not {args.results}")
        version = orthanc.request("GET", "/system")["Version"]
    finally:
        stop.set()
        states.stop.set()
        builder.join()
        if delivery_thread is not None:
            delivery_thread.join(15)
        states.join(5)
        # librdkafka clients that outlive the broker log every reconnect attempt: drop them first
        delivery = outbox = None
        gc.collect()
        if ris is not None:
            ris.stop()
        if orthanc is not None:
            orthanc.stop()
        services.close()

    refs = [len(r.instances) for r in ours_results]
    findings = [len(r.findings) for r in ours_results]
    print(f"config: {args.results} results ({findings.count(1)}/{findings.count(2)}/{findings.count(3)} with 1/2/3 "
          f"findings, {min(refs)}-{max(refs)} source instances, every 4th a signed FINAL revision), offered "
          f"{offered}; broker tansu {storage}{' on SeaweedFS' if args.storage == 's3' else ''}; PACS Orthanc "
          f"{version}; RIS hl7 {hl7.__version__} asyncio MLLP server; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(ratio_line("SR", mine.sr, "storescu", theirs.sr))
    if one_assoc:
        print(ratio_line("SR", mine.sr, "pynetdicom-1-assoc", one_assoc))
    print(ratio_line("ORU", mine.oru, "MLLPClient", theirs.oru))
    print(ratio_line("E2E", mine.results, "storescu+MLLPClient", theirs.results))
    print(f"throughput ours {mine.throughput():.1f} results/s / peers {theirs.throughput():.1f} results/s = "
          f"{mine.throughput() / theirs.throughput():.2f} (offered {offered})")
    for kind, (waited, worked) in (mine.stages or {}).items():
        print(f"ours {kind.upper():<3} p50 {percentile(waited, 50):.1f} ms results.outbox -> its worker + "
              f"{percentile(worked, 50):.1f} ms build, send, ACK (p99 {percentile(waited, 99):.1f} + "
              f"{percentile(worked, 99):.1f})")
    print(f"SR build alone (highdicom; inside ours' SR latency, the peers send prebuilt files): "
          f"p50 {percentile(docs.sr_build_ms, 50):.1f} ms, p99 {percentile(docs.sr_build_ms, 99):.1f} ms")
    print(f"checks: {len(final)}/{2 * args.results} outputs ACKED, 0 DEAD, {retried} needed a retry; Orthanc "
          f"+{stored_ours} SRs from ours, +{stored_peer} from storescu"
          f"{f', +{args.results} from pynetdicom' if one_assoc else ''}; RIS +{received_ours} ORUs from ours",
          flush=True)
