"""Benchmark: results out, latency from the AI result to the SR stored in Orthanc and the ORU ACKed.

Ours: :class:`streams.delivery.Delivery` (a thread of this process, as ``python -m streams
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

Peers, same run, same Orthanc and RIS, the same kind of documents: N more results from the
same generator (other studies: Orthanc keeps, and does not store again, an SR it already
holds), their SR files and ORU messages built beforehand by the same ``build_sr`` and
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

    python -m load.bench_results [--results 150] [--rate 5] [--storage s3|memory] [--one-association]

``--rate 0`` publishes every result at once (a burst): the latencies then include the
queue behind it, for ours and the peers alike, and the throughput line is the headline.
The default rate, 5/s, is below what ours sustains on 2 cores (~7-8 results/s: the SR
worker spends ~110-140 ms per output), so the default figures are latency, not a backlog
growing with N; at 20/s ours falls behind and its latencies grow with the run's length.

Measured 2026-12-02 on the 2-core dev machine (load ~2), one run each:

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
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hl7
import hl7.client
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from adapters.kafka import ensure_topics, producer_config
from adapters.result_documents import build_oru, build_sr, idempotency_key
from adapters.telemetry import configure_logging
from load.hl7_peer import MllpPeer
from load.orthanc_peer import Orthanc, start_orthanc
from radstream import procs
from schemas.codec import Codec
from schemas.events import (
    CodedConcept,
    DeliveryStatus,
    InstanceRef,
    Priority,
    ResultDelivery,
    ResultFinding,
    ResultStatus,
    StudyResult,
    trace_id_for,
    utcnow,
)
from schemas.settings import Settings, load_settings
from schemas.topics import RESULTS_DELIVERY, RESULTS_OUTBOX, key_of
from streams.delivery import Delivery, load_destinations

STORESCU = "/usr/bin/storescu"  # dcmtk's, not pynetdicom's of the same name in the venv
SITE = "SITE_A"
KINDS = ("sr", "oru")


class BenchError(RuntimeError):
    """The run did not deliver what it must: an output not ACKED, an SR or ORU missing."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the results


def sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(scheme="SCT", value=value, meaning=meaning)


#: what a CT of each region is read for: (label, model, critical, SNOMED CT code)
REGIONS = {
    "CT HEAD WO CONTRAST": [
        ("intracranial_hemorrhage", "ich_ct", True, sct("1386000", "Intracranial hemorrhage")),
        ("large_vessel_occlusion", "lvo_cta", True, sct("20059004", "Occlusion of cerebral artery")),
        ("lesion", "brain_lesion_ct", False, sct("52988006", "Lesion")),
    ],
    "CT CHEST W CONTRAST": [
        ("pulmonary_embolism", "pe_ctpa", True, sct("59282003", "Pulmonary embolism")),
        ("pneumothorax", "ptx_ct", True, sct("36118008", "Pneumothorax")),
        ("lung_nodule", "nodule_ct", False, sct("52988006", "Lesion")),
    ],
    "CT ABDOMEN PELVIS W CONTRAST": [
        ("free_air", "free_air_ct", True, sct("25756005", "Pneumoperitoneum")),
        ("lesion", "liver_lesion_ct", False, sct("52988006", "Lesion")),
        ("hemorrhage", "bleed_ct", True, sct("50960005", "Hemorrhage")),
    ],
}


def make_results(count: int, rng: random.Random, tag: str) -> list[StudyResult]:
    """``count`` result revisions: mostly the first, preliminary AI result of a new CT study;
    every 4th the reader's signed FINAL revision of the one three before it."""
    results: list[StudyResult] = []
    now = datetime.now(UTC)
    for number in range(count):
        if number % 4 == 3:
            first = results[number - 3]
            results.append(first.replace(
                revision=2, status=ResultStatus.FINAL, reader_id="dr.lee", signed_at=now,
                findings=[f.replace(decision="ACCEPT") for f in first.findings], changes=["signed"],
                report_text="Findings confirmed by the reader.\n" + first.report_text))
            continue
        description = rng.choice(sorted(REGIONS))
        chosen = rng.sample(REGIONS[description], rng.randint(1, 3))
        findings = [ResultFinding(label=label, model=model, model_version="1.4.2", critical=critical,
                                  confidence=round(rng.uniform(0.55, 0.99), 3), codes=[code])
                    for label, model, critical, code in chosen]
        critical = any(f.critical for f in findings)
        study_uid, series_uid = generate_uid(), generate_uid()
        instances = [InstanceRef(sop_instance_uid=generate_uid(), series_uid=series_uid, sop_class_uid=CTImageStorage,
                                 transfer_syntax_uid=ExplicitVRLittleEndian, blob_size=526_000, instance_number=n,
                                 blob_uri=f"s3://radstream/instances/{study_uid}/{n}.dcm")
                     for n in range(1, rng.randint(20, 100) + 1)]
        results.append(StudyResult(
            trace_id=trace_id_for(study_uid), study_uid=study_uid, version=1, revision=1,
            status=ResultStatus.PRELIMINARY, issued_at=now, source_site=SITE, modalities=["CT"],
            priority=Priority.CRITICAL if critical else Priority.ROUTINE, critical=critical,
            findings=findings, instances=instances, changes=["first AI result"], ai_status="OK",
            report_text="\n".join(f"AI: {f.codes[0].meaning} suspected ({f.confidence:.0%})." for f in findings),
            accession_number=f"{tag}{number:07d}", patient_id=f"MRN{tag}{number:06d}",
            patient_name=f"DOE^{rng.choice(['JANE', 'JOHN', 'ALEX', 'SAM'])}", patient_birth_date="19610214",
            patient_sex=rng.choice("MF"), study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S"),
            study_description=description, referring_physician="SMITH^ANNA", reason_for_exam="ED, acute symptoms"))
    return results


def output_key(trace_id: str, revision: int, kind: str) -> tuple[str, int, str]:
    return trace_id, revision, kind


# ---------------------------------------------------------------- figures


def percentile(values: Sequence[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def paced(count: int, rate: float, started: float) -> Iterator[tuple[int, float]]:
    """(index, due time on the perf_counter clock) at ``rate`` per second from ``started``,
    sleeping until each is due; ``rate`` 0: all due at once."""
    for index in range(count):
        due = started + index / rate if rate else started
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield index, due


@dataclass
class Figures:
    """Latencies in ms of each kind of output and of whole results, and the span of the run."""

    sr: list[float]
    oru: list[float]
    results: list[float]
    span_s: float
    #: ours only, per kind: (ms until the destination's worker took it up, ms from then to the ACK)
    stages: dict[str, tuple[list[float], list[float]]] | None = None

    def throughput(self) -> float:
        return len(self.results) / self.span_s if self.span_s > 0 else float("inf")


# ---------------------------------------------------------------- ours


class DeliveryStates(threading.Thread):
    """Tails results.delivery from its start: every output's final state (ACKED or DEAD) and
    every FAILED attempt, as the delivery worker publishes them."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="bench-delivery-states", daemon=True)
        self.settings = settings
        self.final: dict[tuple[str, int, str], ResultDelivery] = {}
        self.queued: dict[tuple[str, int, str], ResultDelivery] = {}
        self.failed: list[ResultDelivery] = []
        self.changed = threading.Condition()
        self.stop = threading.Event()

    def run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        codec, topic = Codec(), RESULTS_DELIVERY.name(self.settings)
        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap, "enable.auto.commit": False,
                             "group.id": f"{self.settings.kafka.topic_prefix}-bench-results"})
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(self.settings.kafka.partitions)])
        try:
            while not self.stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None or msg.error() is not None:
                    continue
                state = codec.decode(msg.value())
                if not isinstance(state, ResultDelivery):
                    continue
                with self.changed:
                    if state.status in (DeliveryStatus.ACKED, DeliveryStatus.DEAD):
                        self.final[output_key(state.trace_id, state.revision, state.kind)] = state
                    elif state.status is DeliveryStatus.QUEUED:
                        self.queued[output_key(state.trace_id, state.revision, state.kind)] = state
                    elif state.status is DeliveryStatus.FAILED:
                        self.failed.append(state)
                    self.changed.notify_all()
        finally:
            consumer.close()

    def wait_for(self, keys: set[tuple[str, int, str]], timeout_s: float) -> dict[tuple[str, int, str], ResultDelivery]:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not keys <= self.final.keys():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = len(keys - self.final.keys())
                    raise BenchError(f"{missing} of {len(keys)} outputs had no final state after {timeout_s:g} s")
                self.changed.wait(min(remaining, 0.5))
            return {key: self.final[key] for key in keys}


class Outbox:
    """Produces results onto results.outbox as the results stage does: one long-lived,
    idempotent producer (a fresh one spends its first ~0.5 s getting a producer id)."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Producer

        self.codec, self.topic = Codec(), RESULTS_OUTBOX.name(settings)
        self.producer = Producer(producer_config(settings, **{"client.id": "bench-results"}))

    def publish(self, results: list[StudyResult], rate: float) -> list[StudyResult]:
        """Produce ``results`` at ``rate``, each stamped ``issued_at`` as it is produced."""
        issued = []
        for index, _ in paced(len(results), rate, time.perf_counter()):
            result = results[index].replace(issued_at=utcnow())
            self.producer.produce(self.topic, value=self.codec.encode(result), key=key_of(RESULTS_OUTBOX, result))
            self.producer.poll(0)
            issued.append(result)
        if self.producer.flush(30) != 0:
            raise BenchError("results.outbox: the broker did not take every result")
        return issued


def ours(outbox: Outbox, states: DeliveryStates, results: list[StudyResult], rate: float,
         timeout_s: float) -> tuple[Figures, dict[tuple[str, int, str], ResultDelivery]]:
    issued = outbox.publish(results, rate)
    keys = {output_key(r.trace_id, r.revision, kind) for r in issued for kind in KINDS}
    final = states.wait_for(keys, timeout_s)
    dead = [s for s in final.values() if s.status is not DeliveryStatus.ACKED]
    if dead:
        raise BenchError(f"{len(dead)} outputs not ACKED, e.g. {dead[0].kind} to {dead[0].destination}: "
                         f"{dead[0].status.value} {dead[0].error}")

    def ms(later: datetime, earlier: datetime) -> float:
        return (later - earlier) / timedelta(milliseconds=1)

    acked = {kind: [ms(final[output_key(r.trace_id, r.revision, kind)].at, r.issued_at) for r in issued]
             for kind in KINDS}
    per_result = [max(a, b) for a, b in zip(acked["sr"], acked["oru"], strict=True)]
    span = max(s.at for s in final.values()) - min(r.issued_at for r in issued)
    stages = {}
    for kind in KINDS:  # QUEUED is published as the destination's worker starts on the output
        taken = [states.queued[output_key(r.trace_id, r.revision, kind)] for r in issued]
        stages[kind] = ([ms(q.at, r.issued_at) for q, r in zip(taken, issued, strict=True)],
                        [ms(final[output_key(q.trace_id, q.revision, kind)].at, q.at) for q in taken])
    return Figures(acked["sr"], acked["oru"], per_result, span.total_seconds(), stages), final


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


# ---------------------------------------------------------------- the run


def start_broker(settings: Settings, root: Path) -> list:
    """Tansu on ``settings.kafka.storage``; for ``s3://``, the embedded SeaweedFS first. Topics made."""
    started, env = [], dict(os.environ)
    if settings.kafka.storage.startswith("s3://"):
        from adapters.s3 import load_credentials
        from radstream.objectstore import start_embedded, tansu_env

        started.append(start_embedded(settings, root / "seaweedfs.log"))
        env.update(tansu_env(settings, load_credentials(settings)))
    try:
        started.append(procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, settings.kafka.storage,
                                         log_path=root / "tansu.log", env=env))
        ensure_topics(settings)
    except BaseException:
        for proc in reversed(started):
            procs.stop(proc, grace_s=5)
        raise
    return started


def instance_count(orthanc: Orthanc) -> int:
    return int(orthanc.request("GET", "/statistics")["CountInstances"])


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def ratio_line(what: str, ours_ms: list[float], peer: str, peer_ms: list[float]) -> str:
    lines = []
    for q in (50, 99):
        mine, theirs = percentile(ours_ms, q), percentile(peer_ms, q)
        lines.append(f"{what:<3} p{q} ours {mine:.1f} ms / {peer} {theirs:.1f} ms = {mine / theirs:.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace, root: Path) -> None:
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
    services = start_broker(settings, root)
    orthanc, ris, delivery, outbox, delivery_thread = None, None, None, None, None
    stop, states = threading.Event(), DeliveryStates(settings)
    one_assoc: list[float] = []
    try:
        orthanc = start_orthanc(root / "orthanc")
        dicom_port = int(orthanc.request("GET", "/system")["DicomPort"])
        ris = MllpPeer()
        destinations_file.write_text(
            f'[destinations.pacs]\nkind = "sr"\nhost = "127.0.0.1"\nport = {dicom_port}\ncalled_ae = "ORTHANC"\n\n'
            f'[destinations.ris]\nkind = "oru"\nhost = "127.0.0.1"\nport = {ris.port}\nreceiving_app = "RIS"\n')
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
        for proc in reversed(services):
            procs.stop(proc, grace_s=5)

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=int, default=150,
                        help="result revisions to deliver (default 150: the run takes about 2 x N / rate + 25 s)")
    parser.add_argument("--rate", type=float, default=5.0,
                        help="results published per second (default 5, below ours' ~8/s SR capacity); 0: all at once")
    parser.add_argument("--storage", choices=("s3", "memory"), default="s3",
                        help="broker storage: s3 (Tansu on SeaweedFS, durable, the default) or memory")
    parser.add_argument("--one-association", action="store_true",
                        help="also time the lower bound: pynetdicom C-STOREs on one association (adds N / rate s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every output's ACK")
    parser.add_argument("--seed", type=int, default=7, help="seed of the results' shapes")
    args = parser.parse_args(argv)
    if args.results < 2 or args.rate < 0:
        parser.error("--results must be at least 2 and --rate not negative")
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        try:
            run(args, Path(tmp))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
