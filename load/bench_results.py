"""Benchmark: results out, latency from the AI result to the SR stored in Orthanc and the ORU ACKed.

About 440 lines, much of it the measured figures; the measuring, the peers and the pipeline
mode are in ``load/results_measure.py``, ``results_peers.py`` and ``results_pipeline.py``.

Two modes, the same two destinations and the same peers:

* ``--mode pipeline`` (the default: the issue's definition) times the whole path from the AI
  result: studies go into ``radstream up`` through its DICOM gateway, and the clock starts
  at each one's AI result, so the results stage (streams/results.py) is inside the figure.
* ``--mode outbox`` publishes StudyResult revisions straight onto ``results.outbox``: the
  delivery worker alone, isolated (it skips the results stage and everything before it).

Pipeline mode. The whole embedded runtime, ``radstream up`` on its own data dir and free ports
(:func:`radstream.procs.isolated_listeners`) with the durable defaults (blobs on the embedded
SeaweedFS, Tansu on ``s3://tansu/``), the routing rules of tests/test_end_to_end.py
(:data:`load.results_pipeline.RULES`), its default assembly quiet period (5 s) and
``results.destinations_file`` naming the Orthanc (``pacs``, kind ``sr``) and the RIS peer
(``ris``, kind ``oru``, :mod:`load.hl7_peer`) described below. N studies (default 30) are sent
at an offered rate (default 0.5/s, one every 2 s) with :func:`radstream.send.send_files`, one
association each: pydicom-data's head CT ``693_UNCR.dcm`` with the demo hemorrhage painted in
(:func:`engines.demo.synthetic.paint_finding`), new UIDs, an AccessionNumber and PatientID of
its own, so the demo ICH model flags it and a PRELIMINARY result with a critical finding
goes out. Per study: ``t_ai`` = the broker timestamp of its ``study.ai`` record (the AI result
re-identified into the identified zone, keyed by the original study UID), read with a
confluent consumer from the beginning to the true end (:func:`adapters.kafka.end_offsets`);
``t_sr`` and ``t_oru`` = the ``at`` of the ACKED :class:`ResultDelivery` of revision 1 for
``pacs`` and ``ris`` on ``results.delivery``. Printed: p50/p99 of ``t_sr - t_ai``,
``t_oru - t_ai`` and their later one as ``ours / peer = ratio`` lines; the results stage
alone (the ``results.outbox`` record's timestamp - ``t_ai``), split at routing's worklist row
that carries the AI result (``worklist.update``); and, as in outbox mode, each output's wait
from ``results.outbox`` to its destination worker and that worker's build + send + ACK. Clock:
broker timestamps are CreateTime (each producer's, checked and printed) and ``at`` is the
delivery worker's: all from this machine's clock, at the millisecond. The run fails unless every
study has an AI result, a revision 1 with a critical finding, both outputs ACKED, its SR in
Orthanc and its ORU at the RIS. One warm-up study goes through first (the AI model's first
run, highdicom's first SR) and is left out. The peers send the documents of the very results
ours issued, as other studies (new study UID and trace ID), built beforehand, at the same
offered rate while the runtime idles. ``--storage memory``: local blobs and a ``memory://``
broker.

Outbox mode. Ours: :class:`streams.delivery.Delivery` (a thread of this process, as ``python -m streams
delivery`` runs it: one worker per destination) on the embedded broker, consuming
``results.outbox`` and sending each revision to two destinations: ``pacs`` (kind ``sr``,
a TID 1500 SR built by highdicom and C-STOREd to a real Orthanc) and ``ris`` (kind ``oru``,
an HL7 v2.5 ORU^R01 over MLLP to the ``hl7`` package's asyncio server, :mod:`load.hl7_peer`,
which answers AA). N StudyResult revisions (CT studies, 1-3 coded findings of the study's
region, 20-100 source instances with their original UIDs, patient and accession set;
every 4th one the reader's signed FINAL revision of an earlier one) are published onto
``results.outbox`` at a steady offered rate, ``issued_at`` stamped as each is produced:
that is "the AI result". An output's latency is its ACKED state's ``at`` on
``results.delivery`` minus ``issued_at`` (both from this process's clock, at the Avro
millisecond); a result's end-to-end latency is its later ACK. Every output must be
ACKED (none DEAD), the RIS must have received every ORU and Orthanc must hold every SR
(``/statistics``), or the run fails.

Broker: Tansu on ``s3://`` with the embedded SeaweedFS as its object store (durable: the
default of ``radstream up``), started with :func:`radstream.objectstore.start_embedded` and
:func:`radstream.procs.start_tansu` rather than the whole ``radstream up``: the delivery
worker needs only the broker, and the other children would compete for the 2 cores
without taking part. ``--storage memory`` runs Tansu on ``memory://`` instead.

Peers, same run, same Orthanc and RIS, the same kind of documents (outbox mode: N more
results from the same generator; pipeline mode: ours' own results, see above; either way
other studies, since Orthanc keeps, and does not store again, an SR it already holds), their SR files and ORU messages built beforehand by the same ``build_sr`` and
``build_oru``, so the peers do not pay for building them. They are paced at the same
offered rate; latency runs from the moment a result is due to its acknowledgement:

* SR, headline: dcmtk's ``storescu -R`` (``TCP_NODELAY=1``), one process per document,
  the way a script-based sender hands each SR to a PACS. It opens one association per
  document, as our sender does (a result's SR may go anywhere, and an idle association
  would hold a PACS slot), so the two do the same protocol work.
* SR, lower bound (``--one-association``; it adds N / rate seconds): pynetdicom
  ``send_c_store`` on one association kept open for the whole run, ``TCP_NODELAY``: no
  process start, no association setup per document. It sends storescu's SR files with new
  SOP Instance UIDs (for Orthanc to store them again); everything else in them is the same.
* ORU: ``hl7.client.MLLPClient`` on one connection, sending each message and waiting for
  its ACK; it runs beside storescu (two threads), as our two destination workers do.

    python -m load.bench_results [--mode pipeline|outbox] [--results N] [--rate R] [--storage s3|memory]
                                 [--one-association]

(pipeline: N 30, R 0.5, about 3 minutes on 2 cores: ~25 s to start the runtime, N / R twice, for
ours then the peers, and ~30 s of warm-up, the last study's way through and the stop; outbox:
N 150, R 5, about 2 x N / R + 25 s.) In outbox mode ``--rate 0`` publishes every result at once (a burst): the latencies then include the
queue behind it, for ours and the peers alike, and the throughput line is the headline.
The default rate, 5/s, is below what ours sustains on 2 cores (~7-8 results/s: the SR
worker spends ~110-140 ms per output), so the default figures are latency, not a backlog
growing with N; at 20/s ours falls behind and its latencies grow with the run's length.

Measured 2026-12-02 on the 2-core dev machine, pipeline mode, defaults (30 studies, 0.5/s,
durable), one run per line; other sessions' tests shared the 2 cores (load at the end of each run):

    run (load)            SR p50 / p99 ms (ours, storescu)       ORU p50 / p99 ms (ours, MLLPClient)   results stage p50 / p99
    02:17 (1.3)           2498 / 2931 vs 53 / 153: 48 / 19       2438 / 2767 vs 3.8 / 7.5: 634 / 369   2375 / 2613 ms
    02:05 (3.0)           2550 / 2687 vs 44 / 70: 57 / 38        2488 / 2623 vs 2.7 / 5.5: 924 / 474   2399 / 2540 ms
    01:56 (7.7)           2547 / 3308 vs 71 / 378: 36 / 8.8      2483 / 3191 vs 2.8 / 10: 889 / 316    2396 / 3063 ms
    02:00 (16.8)          2775 / 8089 vs 79 / 415: 35 / 20       2614 / 8085 vs 2.9 / 94: 887 / 86     2499 / 7002 ms
    kafka.fetch_max_wait_ms=50 on Faust's consumer (not the default, see below), delivery's at 20 ms
    10 studies, 02:40 (~2)  348 / 482 vs 50 / 66: 7.0 / 7.3        264 / 454 vs 3.5 / 7.7: 75 / 59       220 / 412 ms
    experiment before it: Faust's consumer fetch wait 1500 -> 20 ms (a sitecustomize shim)
    12 studies (7.0)      580 / 1417 vs 53 / 66: 11 / 21         436 / 1045 vs 2.8 / 9.7: 158 / 108    361 / 865 ms
    30 studies (15.6)     1424 / 9923 vs 109 / 433: 13 / 23      1156 / 9420 vs 3.6 / 82: 321 / 115    929 / 8587 ms
    for comparison, a burst: 2 studies, --rate 0, --storage memory
    (5.2)                 606 / 643 vs 63 / 86: 9.6 / 7.5        519 / 534 vs 4.0 / 5.3: 130 / 102     469 / 498 ms

Where ours' ~2.5 s goes (02:05 run, p50): ~2.4 s is the results stage, and almost all of that
is waiting between stream stages, not work. From ``study.ai`` to ``results.outbox`` a result
crosses three Faust hops of the stream worker (route -> ``worklist.routed`` -> worklist ->
``worklist.update`` -> results): 1592 ms to routing's row with the AI result, 806 ms from that
row to the outbox, ~0.8 s a hop, steady from run to run. The likely cause: Faust's aiokafka
driver hard-codes ``fetch_max_wait_ms=1500`` for its consumer, and Tansu does not answer a held
fetch as soon as a record arrives (the outbox analysis below found that for librdkafka's 500 ms).
With that wait clamped to 20 ms the results stage fell to 361 ms p50 and SR to 580 ms (12
studies, load 7), at the cost of the stream workers' idle polling. It is the setting
``kafka.fetch_max_wait_ms`` (streams/offsets_compat.install_fetch_wait): at 50 ms the results
stage is ~220 ms p50 and the SR ~350 ms from the AI result. Its default was Faust's 1500 ms
while a SIGKILL of the runtime inside the quiet period lost acknowledged instances at 50 ms (2
runs of 3); since unpositioned source partitions are sought explicitly
(streams/offsets_compat.install_seek_unpositioned) that test passes at 50 ms under load, and
the default is 250 ms (see the setting for why not 50). The figures above are from the
1500 ms default; run the bench with RADSTREAM_KAFKA_FETCH_MAX_WAIT_MS=50 to see the 50 ms ones. Not the whole story: in a burst
of 2 studies the three hops took 0.44-0.47 s together without the clamp, so when a held
fetch ends early is still to be found.
The delivery part is what outbox mode measures: ~60 ms from the outbox to the destination's
worker, then ~95 ms (SR) / ~24 ms (ORU) to build, send and get the ACK. The peers' figures
are one send each of a prebuilt document; the ratios above are therefore the price of the
pipeline's hops, most of all the fetch waits, and not of building or sending the documents.
For reference (outside the figures), a study's way from the gateway's answer to its AI
result took 7.8 s p50 (5 s of it assembly's quiet period); 5.7 s with the 20 ms fetch wait.

Outbox mode, measured 2026-12-02 on the 2-core dev machine (load ~2), one run each:

    run                         SR p50 / p99 ms (ours, storescu)   ORU p50 / p99 ms (ours, MLLPClient)
    default (150, 5/s, s3)      316 / 607  vs 51 / 61: 6.2 / 9.9    190 / 417 vs 2.4 / 5.1: 77 / 82
      with fetch.wait.max.ms 20
      and commits every 0.5 s   133 / 190  vs 53 / 130: 2.5 / 1.5   53 / 88 vs 2.1 / 6.2: 25 / 14   (60 results)
    --storage memory            269 / 526  vs 59 / 193: 4.6 / 2.7   170 / 328 vs 2.8 / 15: 61 / 22  (before)
    --rate 0 (burst of 150)     ours 6.7 results/s vs peers 11.8: 0.57 (before); pynetdicom on one
                                association stores the 150 SRs with p50 1.1 s vs storescu 8.5 s

Where ours' time went before (default run, p50): an output waited 160-190 ms from
results.outbox until its destination's worker started on it -- Tansu holds a fetch until
``fetch.wait.max.ms`` (librdkafka's default 500) instead of answering when a record
arrives, and the consumer loop flushed and committed synchronously per settled offset
(~13 ms per record in a burst). The delivery consumer now asks for 20 ms and commits every
0.5 s: the wait is ~30 ms. What is left of the SR's ~105 ms is highdicom's build_sr
(~50 ms) and store_sr (~50 ms, ~35 ms of it a new association per SR).

The pipeline mode and the command line are here; the outbox mode is :mod:`load.results_outbox`,
the peers :mod:`load.results_peers`, the results and figures both modes share
:mod:`load.results_measure`, and the runtime the pipeline mode starts :mod:`load.results_pipeline`.
"""


from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import hl7
import hl7.client
from pydicom.uid import generate_uid

from adapters.telemetry import configure_logging
from load.hl7_peer import MllpPeer
from load.orthanc_peer import start_orthanc
from load.results_measure import (
    KINDS, SITE, BenchError, DeliveryStates, Figures, expect, log, paced, percentile, ratio_line,
)
from load.results_outbox import run_outbox
from load.results_peers import (
    build_documents, instance_count, peers, pynetdicom_one_association, write_destinations,
)
from load.results_pipeline import RULES, Runtime, Study, painted_head_cts, read_stamped
from radstream import procs
from schemas.events import DeliveryStatus, StudyResult, trace_id_for
from schemas.settings import Settings, load_settings
from schemas.topics import RESULTS_OUTBOX, STUDY_AI, WORKLIST_UPDATE



def peer_copies(results: list[StudyResult], tag: str) -> list[StudyResult]:
    """The peers' results: ours as the results stage issued them, as other studies (a new study
    UID and trace ID, hence a new SR SOP Instance UID; an accession and patient of their own)."""
    copies = []
    for number, result in enumerate(results):
        uid = generate_uid()
        copies.append(result.replace(study_uid=uid, trace_id=trace_id_for(uid), accession_number=f"{tag}{number:07d}",
                                     patient_id=f"MRN{tag}{number:06d}"))
    return copies


def send_studies(studies: list[Study], settings: Settings, rate: float) -> list[float]:
    """Each study through the DICOM gateway on an association of its own, at ``rate``;
    the wall-clock time (``time.time``) each send was answered."""
    from radstream.send import send_files
    from radstream.supervisor import connect_host

    host, done = connect_host(settings.bind_host), []
    for index, _ in paced(len(studies), rate, time.perf_counter()):
        report = send_files([studies[index].path], host, settings.dicom.port, SITE, settings.dicom.ae_title,
                            progress=False, timeout_s=30)
        expect(report.sent == 1 and not report.failed,
               f"the DICOM gateway did not take study {index}: {[str(f) for f in report.failed]}")
        done.append(time.time())
    return done


@dataclass
class Pipeline:
    """Ours in pipeline mode, per study, in ms: AI result (study.ai) -> SR ACKED, -> ORU ACKED,
    -> results.outbox; and the delivery's two parts per kind (outbox -> its worker, worker -> ACK)."""

    figures: Figures
    results_stage: list[float]
    #: the results stage's two hops, where the worklist row is still on its compacted topic:
    #: study.ai -> routing's row with the AI result applied, that row -> results.outbox
    routed: tuple[list[float], list[float]]
    results: list[StudyResult]  # revision 1 of each study, as the results stage issued it
    sent_to_ai_s: list[float]
    timestamp_types: set[int]
    retried: int  # outputs that needed more than one attempt


def measure_pipeline(settings: Settings, states: DeliveryStates, studies: list[Study], sent_at: list[float],
                     timeout_s: float) -> Pipeline:
    """Wait for every study's two outputs of revision 1, then read each one's AI result and
    result revision with their broker timestamps; fail unless all went out ACKED with a finding."""
    uids = {s.study_uid for s in studies}
    final = states.wait_for_studies(uids, timeout_s)
    wrong = [s for s in final.values() if s.status is not DeliveryStatus.ACKED]
    expect(not wrong, f"{len(wrong)} outputs not ACKED, e.g. {wrong[0].kind} to {wrong[0].destination}: "
                      f"{wrong[0].status.value} {wrong[0].error}" if wrong else "")
    t_ai: dict[str, int] = {}
    types = set()
    for record in read_stamped(settings, STUDY_AI):
        uid = getattr(record.event, "study_uid", None)
        if uid in uids and record.event.version == 1:
            t_ai[uid] = min(t_ai.get(uid, record.timestamp_ms), record.timestamp_ms)
            types.add(record.timestamp_type)
    issued: dict[str, tuple[int, StudyResult]] = {}
    for record in read_stamped(settings, RESULTS_OUTBOX):
        result = record.event
        if isinstance(result, StudyResult) and result.study_uid in uids and result.revision == 1:
            issued.setdefault(result.study_uid, (record.timestamp_ms, result))
            types.add(record.timestamp_type)
    rows: dict[str, int] = {}  # the first worklist row of version 1 that has the AI result
    for record in read_stamped(settings, WORKLIST_UPDATE):
        row = record.event
        if getattr(row, "study_uid", None) in uids and row.version == 1 and row.ai_status != "PENDING":
            rows.setdefault(row.study_uid, record.timestamp_ms)
    expect(uids <= t_ai.keys(), f"{len(uids - t_ai.keys())} of {len(uids)} studies have no study.ai record")
    expect(uids <= issued.keys(), f"{len(uids - issued.keys())} of {len(uids)} studies have no result revision 1")
    unflagged = [uid for uid in uids if not any(f.critical for f in issued[uid][1].findings)]
    expect(not unflagged, f"{len(unflagged)} of {len(uids)} results carry no critical finding (the painted "
                          f"hemorrhage was missed), e.g. {unflagged[0]}" if unflagged else "")

    def since(at: datetime, stamp_ms: int) -> float:
        return at.timestamp() * 1000 - stamp_ms

    order = [s.study_uid for s in studies]
    acked = {kind: [since(final[(uid, kind)].at, t_ai[uid]) for uid in order] for kind in KINDS}
    queued = {(q.study_uid, q.kind): q for q in states.queued.values() if q.revision == 1 and q.study_uid in uids}
    stages = {}
    for kind in KINDS:
        expect(all((uid, kind) in queued for uid in order), f"a {kind} output was ACKED without a QUEUED state")
        stages[kind] = ([since(queued[(uid, kind)].at, issued[uid][0]) for uid in order],
                        [(final[(uid, kind)].at - queued[(uid, kind)].at) / timedelta(milliseconds=1)
                         for uid in order])
    first_ai = min(t_ai[uid] for uid in order)
    span_s = (max(s.at for s in final.values()).timestamp() * 1000 - first_ai) / 1000
    figures = Figures(acked["sr"], acked["oru"], [max(a, b) for a, b in zip(acked["sr"], acked["oru"], strict=True)],
                      span_s, stages)
    routed = [uid for uid in order if uid in rows]
    return Pipeline(figures, [issued[uid][0] - t_ai[uid] for uid in order],
                    ([rows[uid] - t_ai[uid] for uid in routed], [issued[uid][0] - rows[uid] for uid in routed]),
                    [issued[uid][1] for uid in order],
                    [t_ai[uid] / 1000 - sent for uid, sent in zip(order, sent_at, strict=True)], types,
                    sum(1 for state in final.values() if state.attempts > 1))


def run_pipeline(args: argparse.Namespace, root: Path) -> None:
    studies_built: dict[str, list[Study]] = {}
    painter = threading.Thread(target=lambda: studies_built.update(
        warmup=painted_head_cts(1, root / "studies", "W"), timed=painted_head_cts(args.results, root / "studies", "S")),
        name="bench-paint-studies")
    painter.start()

    storage = "s3://tansu/" if args.storage == "s3" else "memory://tansu/"
    destinations_file, rules_file = root / "destinations.toml", root / "rules.toml"
    rules_file.write_text(RULES)
    settings = load_settings(data_dir=root / "data", **procs.isolated_listeners(
        kafka={"topic_prefix": "bench", "storage": storage},
        blobs={"backend": "s3" if args.storage == "s3" else "local"},
        results={"destinations_file": destinations_file}, routing={"rules_file": rules_file},
        runtime={"stop_grace_s": 1.0}))  # a throw-away runtime: no need to wait 5 s per child at the end
    configure_logging(settings.model_copy(update={"log_level": "WARNING"}), "bench")
    orthanc, ris, runtime, states = None, None, None, None
    one_assoc: list[float] = []
    try:
        log("starting Orthanc and the RIS peer ...")
        orthanc = start_orthanc(root / "orthanc")
        dicom_port = int(orthanc.request("GET", "/system")["DicomPort"])
        ris = MllpPeer()
        write_destinations(destinations_file, dicom_port, ris.port)
        log(f"starting radstream up ({'SeaweedFS blobs, ' if args.storage == 's3' else ''}tansu {storage}) ...")
        runtime = Runtime(settings, root / "up.log")
        up_s = runtime.start()
        log(f"radstream up ready in {up_s:.0f} s")
        states = DeliveryStates(settings)
        states.start()
        painter.join()
        expect({"warmup", "timed"} <= studies_built.keys(), "painting the studies failed (see above)")
        studies = studies_built["timed"]

        # the warm-up study: the AI model's first run, highdicom's first SR, each consumer's first fetch
        log("warm-up: one study through the pipeline ...")
        stored_before, received_before = instance_count(orthanc), len(ris.received)
        warm_sent = send_studies(studies_built["warmup"], settings, 0)
        states.wait_for_studies({s.study_uid for s in studies_built["warmup"]}, args.timeout)
        offered = f"{args.rate:g}/s" if args.rate else "all at once"
        log(f"ours: {args.results} painted head CTs through the DICOM gateway, {offered} ...")
        sent_at = send_studies(studies, settings, args.rate)
        warm = measure_pipeline(settings, states, studies_built["warmup"], warm_sent, args.timeout)
        mine = measure_pipeline(settings, states, studies, sent_at, args.timeout)
        stored_ours = instance_count(orthanc) - stored_before - 1
        received_ours = len(ris.received) - received_before - 1
        expect(stored_ours == args.results, f"Orthanc holds {stored_ours} new SRs after ours, not {args.results}")
        expect(received_ours == args.results, f"the RIS received {received_ours} ORUs from ours, not {args.results}")
        peers(build_documents(peer_copies(warm.results, "V"), root / "peer-warmup-sr"), dicom_port, ris.port, 0)
        peer_base = instance_count(orthanc)  # after the peers' warm-up SR

        log("peers: storescu (a process per SR) beside hl7 MLLPClient, on the same results as other studies ...")
        docs = build_documents(peer_copies(mine.results, "P"), root / "peer-sr")
        theirs = peers(docs, dicom_port, ris.port, args.rate)
        stored_peer = instance_count(orthanc) - peer_base
        expect(stored_peer == args.results, f"Orthanc holds {stored_peer} new SRs after storescu, not {args.results}")
        if args.one_association:
            log("peer: pynetdicom, one association ...")
            one_assoc = pynetdicom_one_association(docs.sr_files, dicom_port, args.rate)
            stored_one = instance_count(orthanc) - peer_base - stored_peer
            expect(stored_one == args.results, f"Orthanc holds {stored_one} new SRs after pynetdicom, "
                                               f"not {args.results}")
        version = orthanc.request("GET", "/system")["Version"]
        log("stopping radstream up ...")
    finally:
        painter.join()
        if states is not None:
            states.stop.set()
            states.join(5)
        if runtime is not None:
            runtime.stop()
        if ris is not None:
            ris.stop()
        if orthanc is not None:
            orthanc.stop()

    stamps = {1: "CreateTime (set by each producer)", 2: "LogAppendTime (set by the broker)"}
    print(f"config: pipeline, {args.results} studies (one-instance head CTs, the demo hemorrhage painted in) sent "
          f"through the DICOM gateway, an association each, offered {offered}; radstream up with blobs on "
          f"{'SeaweedFS' if args.storage == 's3' else 'local disk'}, broker tansu {storage}"
          f"{' on SeaweedFS' if args.storage == 's3' else ''}; PACS Orthanc {version}; RIS hl7 {hl7.__version__} "
          f"asyncio MLLP server; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"clock: from each study's study.ai record (its AI result, re-identified) to the ACKED states' `at`; broker "
          f"timestamps are {', '.join(stamps.get(t, str(t)) for t in sorted(mine.timestamp_types))}; both from this "
          f"machine's clock")
    print(ratio_line("SR", mine.figures.sr, "storescu", theirs.sr))
    if one_assoc:
        print(ratio_line("SR", mine.figures.sr, "pynetdicom-1-assoc", one_assoc))
    print(ratio_line("ORU", mine.figures.oru, "MLLPClient", theirs.oru))
    print(ratio_line("E2E", mine.figures.results, "storescu+MLLPClient", theirs.results))
    print(f"ours results stage alone (study.ai -> results.outbox): p50 {percentile(mine.results_stage, 50):.1f} ms, "
          f"p99 {percentile(mine.results_stage, 99):.1f} ms")
    to_row, to_outbox = mine.routed
    if to_row:
        print(f"  of which study.ai -> routing's worklist row with it p50 {percentile(to_row, 50):.1f} ms "
              f"(p99 {percentile(to_row, 99):.1f}), that row -> results.outbox p50 {percentile(to_outbox, 50):.1f} ms "
              f"(p99 {percentile(to_outbox, 99):.1f}); {len(to_row)} of {len(mine.results_stage)} studies")
    for kind, (waited, worked) in (mine.figures.stages or {}).items():
        print(f"ours {kind.upper():<3} p50 {percentile(waited, 50):.1f} ms results.outbox -> its worker + "
              f"{percentile(worked, 50):.1f} ms build, send, ACK (p99 {percentile(waited, 99):.1f} + "
              f"{percentile(worked, 99):.1f})")
    print(f"for reference, not in the figures: gateway send answered -> study.ai p50 "
          f"{percentile(mine.sent_to_ai_s, 50):.1f} s, p99 {percentile(mine.sent_to_ai_s, 99):.1f} s (assembly's "
          f"{settings.assembly.quiet_period_s:g} s quiet period, de-identification, the AI pre-read); "
          f"radstream up ready in {up_s:.0f} s")
    print(f"SR build alone (highdicom; inside ours' SR latency, the peers send prebuilt files): "
          f"p50 {percentile(docs.sr_build_ms, 50):.1f} ms, p99 {percentile(docs.sr_build_ms, 99):.1f} ms")
    print(f"checks: {2 * args.results}/{2 * args.results} outputs ACKED, 0 DEAD, {mine.retried} needed a retry; every "
          f"result revision 1 with a critical finding; Orthanc +{stored_ours} SRs from ours, +{stored_peer} from "
          f"storescu{f', +{args.results} from pynetdicom' if one_assoc else ''}; RIS +{received_ours} ORUs from ours",
          flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pipeline", "outbox"), default="pipeline",
                        help="pipeline (the default): studies through the DICOM gateway of `radstream up`, timed "
                             "from each one's AI result; outbox: result revisions published onto results.outbox, "
                             "timing the delivery worker alone")
    parser.add_argument("--results", type=int, default=None,
                        help="studies (pipeline, default 30) or result revisions (outbox, default 150) to deliver")
    parser.add_argument("--rate", type=float, default=None,
                        help="studies sent (pipeline, default 0.5: one every 2 s) or results published (outbox, "
                             "default 5, below ours' ~8/s SR capacity) per second; 0: all at once")
    parser.add_argument("--storage", choices=("s3", "memory"), default="s3",
                        help="broker storage: s3 (Tansu on SeaweedFS, durable, the default; pipeline: blobs there "
                             "too) or memory (pipeline: blobs on local disk)")
    parser.add_argument("--one-association", action="store_true",
                        help="also time the lower bound: pynetdicom C-STOREs on one association (adds N / rate s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every output's ACK")
    parser.add_argument("--seed", type=int, default=7, help="seed of the results' shapes (outbox)")
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = 30 if args.mode == "pipeline" else 150
    if args.rate is None:
        args.rate = 0.5 if args.mode == "pipeline" else 5.0
    if args.results < 2 or args.rate < 0:
        parser.error("--results must be at least 2 and --rate not negative")
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        try:
            (run_pipeline if args.mode == "pipeline" else run_outbox)(args, Path(tmp))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
