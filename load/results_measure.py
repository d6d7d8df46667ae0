"""The results-out benchmark's shared parts (load/bench_results.py): the result revisions it
delivers, its figures, and how ours is timed: the delivery states read back off ``results.delivery``."""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from adapters.kafka import producer_config
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
from schemas.settings import Settings
from schemas.topics import RESULTS_DELIVERY, RESULTS_OUTBOX, key_of

STORESCU = "/usr/bin/storescu"  # dcmtk's, not pynetdicom's of the same name in the venv (used by the peers)
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

    def wait_for_studies(self, study_uids: set[str], timeout_s: float,
                         revision: int = 1) -> dict[tuple[str, str], ResultDelivery]:
        """Each study's final state of each kind of output of ``revision``, keyed (study UID, kind),
        once every one has one (pipeline mode: the trace IDs are the pipeline's to choose)."""
        deadline, wanted = time.monotonic() + timeout_s, len(study_uids) * len(KINDS)
        with self.changed:
            while True:
                found = {(s.study_uid, s.kind): s for s in self.final.values()
                         if s.revision == revision and s.study_uid in study_uids}
                if len(found) >= wanted:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waiting = sorted(uid for uid in study_uids if any((uid, k) not in found for k in KINDS))
                    raise BenchError(f"{wanted - len(found)} of {wanted} outputs had no final state after "
                                     f"{timeout_s:g} s (studies without both: {len(waiting)}, e.g. "
                                     f"{waiting[:1]}); {len(self.failed)} FAILED attempts seen")
                self.changed.wait(min(remaining, 0.5))

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


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def ratio_line(what: str, ours_ms: list[float], peer: str, peer_ms: list[float]) -> str:
    lines = []
    for q in (50, 99):
        mine, theirs = percentile(ours_ms, q), percentile(peer_ms, q)
        lines.append(f"{what:<3} p{q} ours {mine:.1f} ms / {peer} {theirs:.1f} ms = {mine / theirs:.2f}")
    return "\n".join(lines)
