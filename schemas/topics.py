"""Topic definitions: name, schema, key and retention of every radstream topic.

Every study topic is keyed by StudyInstanceUID so that all events of a study land on
one partition and one worker; orders are keyed by accession number until they meet
their images. Topics that hold state (the worklist) are compacted. ``ensure_topics``
creates missing topics and leaves existing ones alone, so every process may call it
at start (:func:`adapters.kafka.ensure_topics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas.events import (
    AdmissionHint,
    Alert,
    AlertAck,
    AlertTimer,
    AssemblyTimer,
    AssignmentTick,
    AuditEvent,
    DeadLetter,
    InferenceResult,
    InstanceReceived,
    OrderReceived,
    PatientUpdated,
    PriorComparison,
    ReaderFeedback,
    Record,
    ResultByPatient,
    ResultDelivery,
    RoutingDecision,
    StudyAssembled,
    StudyDeidentified,
    StudyLink,
    StudyResult,
    WorklistUpdate,
)
from schemas.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    suffix: str
    event: type[Record]
    key: str  # the event field used as the Kafka key
    compacted: bool = False
    retention_ms: int | None = None
    #: every event under this one key, so one partition: the topic feeds state of the whole
    #: network (the reader assignment), kept by the one worker that owns that partition
    fixed_key: str | None = None

    def name(self, settings: Settings) -> str:
        return settings.topic(self.suffix)


INSTANCE_RECEIVED = TopicSpec("instance.received", InstanceReceived, "study_uid")
ORDER_RECEIVED = TopicSpec("order.received", OrderReceived, "accession_number")
#: HL7 ADT patient updates, keyed by patient id; the sink applies them to the worklist's demographics
PATIENT_UPDATED = TopicSpec("patient.updated", PatientUpdated, "patient_id")
STUDY_ASSEMBLED = TopicSpec("study.assembled", StudyAssembled, "study_uid")
STUDY_DEIDENTIFIED = TopicSpec("study.deidentified", StudyDeidentified, "study_uid")
#: de-identified zone: one AI pre-read per de-identified study version
INFERENCE_RESULT = TopicSpec("inference.result", InferenceResult, "study_uid")
#: de-identified zone: admission levels for the AI queue (STAT order, emergency location), from routing
INFERENCE_PRIORITY = TopicSpec("inference.priority", AdmissionHint, "study_uid", retention_ms=86_400_000)
#: de-identified zone: studies the AI queue deferred when it was full of routine work; read again later
INFERENCE_RETRY = TopicSpec("inference.retry", StudyDeidentified, "study_uid")
#: de-identified zone: a study version compared with the patient's earlier studies, keyed by de-identified study UID
PRIOR_COMPARISON = TopicSpec("prior.comparison", PriorComparison, "study_uid")
#: de-identified zone, internal: de-identified studies re-keyed by patient pseudonym for prior comparison
PRIORS_STUDY_BY_PATIENT = TopicSpec("priors.study-by-patient", StudyDeidentified, "patient_pseudonym")
#: de-identified zone, internal: AI results with their patient pseudonym, co-partitioned with the studies above
PRIORS_RESULT_BY_PATIENT = TopicSpec("priors.result-by-patient", ResultByPatient, "patient_pseudonym")
ROUTING_DECISION = TopicSpec("routing.decision", RoutingDecision, "study_uid")
WORKLIST_UPDATE = TopicSpec("worklist.update", WorklistUpdate, "study_uid", compacted=True)
ALERT = TopicSpec("alert", Alert, "study_uid")
#: identified zone: a person acknowledged a study's critical alert for a finding (reading API), read by the alerts stage
ALERT_ACK = TopicSpec("alert.ack", AlertAck, "study_uid")
#: internal: clock ticks for studies with an alert past its acknowledgement deadline, co-partitioned with alert
ALERT_TIMER = TopicSpec("alert.timer", AlertTimer, "study_uid", retention_ms=3_600_000)
AUDIT = TopicSpec("audit", AuditEvent, "trace_id")
DEAD_LETTER = TopicSpec("deadletter", DeadLetter, "key")
#: internal: clock ticks for open studies, co-partitioned with instance.received
ASSEMBLY_TIMER = TopicSpec("assembly.timer", AssemblyTimer, "study_uid", retention_ms=3_600_000)
#: internal: assembled studies re-keyed by accession number, co-partitioned with order.received
STUDY_BY_ACCESSION = TopicSpec("orders.study-by-accession", StudyAssembled, "accession_number")
#: an order joined to a study (``study_uid`` and the study's ``trace_id`` set), keyed by study for routing
STUDY_ORDER = TopicSpec("study.order", OrderReceived, "study_uid")
#: identified zone: original study UID <-> de-identified study UID, read by the worklist sink only
STUDY_LINK = TopicSpec("study.link", StudyLink, "study_uid")
#: identified zone: the same links keyed by the de-identified study UID, co-partitioned with inference.result
STUDY_LINK_BY_DEID = TopicSpec("study.link.by-deid", StudyLink, "deid_study_uid")
#: identified zone: AI results re-keyed to the original study (through the link), read by routing
STUDY_AI = TopicSpec("study.ai", InferenceResult, "study_uid")
#: identified zone: prior comparisons re-keyed to the original study (through the link), read by routing
STUDY_PRIORS = TopicSpec("study.priors", PriorComparison, "study_uid")
#: identified zone: instances held back by de-identification (possible burned-in PHI), with the reason
DEID_QUARANTINE = TopicSpec("deid.quarantine", DeadLetter, "key")
#: identified zone, internal: routed worklist rows on their way to reader assignment, one partition
WORKLIST_ROUTED = TopicSpec("worklist.routed", WorklistUpdate, "study_uid", fixed_key="network")
#: internal: the assignment clock, on the same partition as the routed rows
ASSIGNMENT_TICK = TopicSpec("assignment.tick", AssignmentTick, "at", fixed_key="network", retention_ms=7 * 86_400_000)
#: identified zone: readers' actions from the reading API, on the assignment worker's partition
READING_FEEDBACK = TopicSpec("reading.feedback", ReaderFeedback, "study_uid", fixed_key="network")
#: identified zone: the reader actions the worklist applied, in order, keyed by study (warehouse, results out)
READING_APPLIED = TopicSpec("reading.applied", ReaderFeedback, "study_uid")
#: identified zone: each revision of a study's result, the outbox every output is sent from
RESULTS_OUTBOX = TopicSpec("results.outbox", StudyResult, "study_uid")
#: identified zone: each output's delivery state (queued, sent, acked, failed, dead)
RESULTS_DELIVERY = TopicSpec("results.delivery", ResultDelivery, "study_uid")
#: the de-identified zone: every event here must be free of PHI (``radstream phi-scan`` checks)
DEIDENTIFIED_TOPICS: tuple[TopicSpec, ...] = (STUDY_DEIDENTIFIED, INFERENCE_RESULT, INFERENCE_PRIORITY, INFERENCE_RETRY,
                                              PRIOR_COMPARISON, PRIORS_STUDY_BY_PATIENT, PRIORS_RESULT_BY_PATIENT)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    INSTANCE_RECEIVED,
    ORDER_RECEIVED,
    PATIENT_UPDATED,
    STUDY_ASSEMBLED,
    STUDY_DEIDENTIFIED,
    INFERENCE_RESULT,
    INFERENCE_PRIORITY,
    INFERENCE_RETRY,
    PRIOR_COMPARISON,
    ROUTING_DECISION,
    WORKLIST_UPDATE,
    ALERT,
    ALERT_ACK,
    ALERT_TIMER,
    AUDIT,
    DEAD_LETTER,
    ASSEMBLY_TIMER,
    STUDY_BY_ACCESSION,
    STUDY_ORDER,
    STUDY_LINK,
    STUDY_LINK_BY_DEID,
    STUDY_AI,
    STUDY_PRIORS,
    DEID_QUARANTINE,
    PRIORS_STUDY_BY_PATIENT,
    PRIORS_RESULT_BY_PATIENT,
    WORKLIST_ROUTED,
    ASSIGNMENT_TICK,
    READING_FEEDBACK,
    READING_APPLIED,
    RESULTS_OUTBOX,
    RESULTS_DELIVERY,
)


def key_of(spec: TopicSpec, event: Record) -> bytes | None:
    if spec.fixed_key:
        return spec.fixed_key.encode()
    value = getattr(event, spec.key, None)
    return value.encode() if value else None


#: a record sent back from a dead letter (``radstream deadletters replay``) carries the one
#: stage it is for; every other agent reading its topic passes it by
REDRIVE_HEADER = "radstream-redrive-to"
#: and the dead letter it came from, ``<partition>:<offset>`` on the dead-letter topic
REDRIVE_OF_HEADER = "radstream-redrive-of"


def redrive_stage(headers: object) -> str | None:
    """The stage a record was sent back to, from its headers (a mapping, or the
    ``(name, value)`` pairs Kafka clients give), or None for an ordinary record."""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    for name, value in pairs:  # type: ignore[union-attr]
        if name == REDRIVE_HEADER:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None
