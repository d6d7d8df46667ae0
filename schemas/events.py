"""Typed events: one frozen dataclass per Avro schema in ``schemas/avro``.

Over 400 lines: one dataclass per Avro schema, kept together as the contract's one Python face.

A field name means the same thing on every topic (``study_uid`` is always the
StudyInstanceUID, ``trace_id`` always the study's audit id). The dataclasses are
what stages take and return; :mod:`schemas.codec` turns them into Avro bytes and
back, validating against the ``.avsc`` file of the same name, and
``tests/test_schemas.py`` checks that every dataclass and its schema agree.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Self, get_args, get_origin, get_type_hints

#: Namespace of trace ids: ``uuid5(TRACE_NAMESPACE, study_uid)`` gives every gateway
#: the same trace id for the same study without coordination.
TRACE_NAMESPACE = uuid.UUID("6f1b1a2e-4c0a-5b57-9e4e-726164737472")


def trace_id_for(study_uid: str) -> str:
    return str(uuid.uuid5(TRACE_NAMESPACE, study_uid))


def utcnow() -> datetime:
    # Avro timestamp-millis keeps milliseconds; truncating here keeps round trips exact.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Priority(str, enum.Enum):
    """Reading priority (highest first). STAT orders and critical AI findings raise it."""

    CRITICAL = "CRITICAL"
    URGENT = "URGENT"
    ROUTINE = "ROUTINE"

    @property
    def rank(self) -> int:
        return {"CRITICAL": 0, "URGENT": 1, "ROUTINE": 2}[self.value]


class CompletionReason(str, enum.Enum):
    EXPECTED_COUNT_REACHED = "EXPECTED_COUNT_REACHED"
    QUIET_PERIOD_ELAPSED = "QUIET_PERIOD_ELAPSED"


class InferenceStatus(str, enum.Enum):
    """How an AI pre-read ended; the worklist shows it as ``ai_status`` (PENDING until one comes)."""

    OK = "OK"
    TIMEOUT = "TIMEOUT"  # past the study's latency budget, or deferred because the queue was full
    ERROR = "ERROR"  # engine failure, open circuit breaker, undecodable pixel data
    NOT_APPLICABLE = "NOT_APPLICABLE"  # no model card applies to the study


@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of all events and their nested records."""

    SCHEMA: ClassVar[str] = ""  # file stem in schemas/avro; empty for nested records

    def to_avro(self) -> dict[str, Any]:
        return {f.name: _to_avro(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        hints = _hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _from_avro(hints[f.name], data[f.name])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _to_avro(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_avro()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_to_avro(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_avro(v) for k, v in value.items()}
    return value


def _from_avro(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(hint)
    if origin in (list, tuple):
        (item,) = get_args(hint)[:1]
        return tuple(_from_avro(item, v) for v in value) if origin is tuple else [_from_avro(item, v) for v in value]
    if origin is dict:
        return dict(value)
    args = [a for a in get_args(hint) if a is not type(None)]
    if args and origin is not None:  # Optional[X] / X | None
        return _from_avro(args[0], value)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_avro(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if hint is datetime and isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


# ---------------------------------------------------------------- gateways


@dataclass(frozen=True, kw_only=True)
class InstanceReceived(Record):
    SCHEMA: ClassVar[str] = "instance_received"
    trace_id: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_uri: str
    blob_size: int
    blob_sha256: str
    source_site: str
    gateway: str
    received_at: datetime
    calling_ae: str = ""
    called_ae: str = ""
    modality: str | None = None
    body_part_examined: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    institution_name: str | None = None
    referring_physician: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None
    rows: int | None = None
    columns: int | None = None
    expected_study_instances: int | None = None
    burned_in_annotation: str | None = None


@dataclass(frozen=True, kw_only=True)
class OrderReceived(Record):
    SCHEMA: ClassVar[str] = "order_received"
    trace_id: str
    accession_number: str
    message_type: str
    control_id: str
    source_site: str
    received_at: datetime
    order_control: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    priority: str | None = None
    ordering_provider: str | None = None
    reason_for_exam: str | None = None
    procedure_code: str | None = None
    procedure_description: str | None = None
    patient_location: str | None = None
    patient_state: str | None = None


@dataclass(frozen=True, kw_only=True)
class PatientUpdated(Record):
    """An HL7 v2 ADT patient update (A01/A04/A05/A08/A31): demographics of one patient
    at one site, applied to that patient's identified worklist rows."""

    SCHEMA: ClassVar[str] = "patient_updated"
    trace_id: str
    message_type: str
    control_id: str
    source_site: str
    received_at: datetime
    patient_id: str
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    patient_location: str | None = None
    patient_state: str | None = None


# ---------------------------------------------------------------- assembly


@dataclass(frozen=True, kw_only=True)
class SeriesSummary(Record):
    series_uid: str
    instance_count: int
    series_number: int | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None


@dataclass(frozen=True, kw_only=True)
class InstanceRef(Record):
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_uri: str
    blob_size: int
    instance_number: int | None = None


@dataclass(frozen=True, kw_only=True)
class StudyAssembled(Record):
    SCHEMA: ClassVar[str] = "study_assembled"
    trace_id: str
    study_uid: str
    version: int
    source_site: str
    instance_count: int
    modalities: list[str]
    body_parts: list[str]
    series: list[SeriesSummary]
    instances: list[InstanceRef]
    first_received_at: datetime
    last_received_at: datetime
    assembled_at: datetime
    completion_reason: CompletionReason
    expected_instance_count: int | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    institution_name: str | None = None
    referring_physician: str | None = None


@dataclass(frozen=True, kw_only=True)
class StudyDeidentified(Record):
    SCHEMA: ClassVar[str] = "study_deidentified"
    trace_id: str
    study_uid: str
    version: int
    patient_pseudonym: str
    modalities: list[str]
    body_parts: list[str]
    source_site: str  # keyed site pseudonym unless the site retains institution identity (113112)
    instance_count: int
    series: list[SeriesSummary]
    instances: list[InstanceRef]
    profile_options: list[str]
    deidentified_at: datetime  # shifted by the patient's date shift: never the real processing time
    study_description: str | None = None
    patient_age: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None  # StudyDate (DA) shifted like every date of the patient; None when removed
    study_time: str | None = None  # StudyTime (TM), kept with shifted dates


# ---------------------------------------------------------------- AI and priors


@dataclass(frozen=True, kw_only=True)
class CodedConcept(Record):
    """A finding's code as results carry it (SNOMED CT ``SCT``, RadLex ``RADLEX``)."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True, kw_only=True)
class Finding(Record):
    """One label of one model at or above its operating threshold."""

    label: str
    model: str
    model_version: str
    confidence: float
    threshold: float
    critical: bool
    silent: bool  # silent mode or the canary's silent share: recorded, never used for routing
    codes: list[CodedConcept]
    location: str | None = None


@dataclass(frozen=True, kw_only=True)
class LabelScore(Record):
    label: str
    score: float
    threshold: float


@dataclass(frozen=True, kw_only=True)
class ModelRun(Record):
    """What one model card did with the study: its identity, backend, scores and outcome."""

    model: str
    model_version: str
    model_sha256: str
    backend: str
    status: InferenceStatus
    silent: bool
    images: int
    scores: list[LabelScore]
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class InferenceResult(Record):
    """The AI pre-read of one de-identified study version: every applicable model's run.

    Published in the de-identified zone (keyed by the de-identified study UID); the
    identified zone re-keys it to the original study through the de-identification link.
    """

    SCHEMA: ClassVar[str] = "inference_result"
    trace_id: str
    study_uid: str
    version: int
    status: InferenceStatus
    findings: list[Finding]
    models: list[ModelRun]
    level: int  # admission priority level it ran at (1 = highest)
    images: int
    queued_ms: float
    decode_ms: float
    infer_ms: float
    latency_ms: float  # taken by the stage -> result
    inferred_at: datetime  # the study's shifted clock (deidentified_at + elapsed), never the real time
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class AdmissionHint(Record):
    """De-identified zone: a study's admission level for the AI queue, from its clinical
    context (a STAT order, an emergency location) that only the identified zone knows."""

    SCHEMA: ClassVar[str] = "admission_hint"
    study_uid: str  # the de-identified study UID
    level: int  # 1 = highest
    reason: str  # no time here: a real time next to a study's shifted dates would give the shift away


@dataclass(frozen=True, kw_only=True)
class ResultByPatient(Record):
    """De-identified zone, internal to prior comparison: an AI result with its study's patient
    pseudonym, so it can be keyed by patient (the result itself is keyed by study)."""

    SCHEMA: ClassVar[str] = "result_by_patient"
    trace_id: str
    study_uid: str
    version: int
    patient_pseudonym: str
    status: InferenceStatus
    findings: list[Finding]
    models: list[ModelRun]
    inferred_at: datetime  # the study's shifted clock
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class PriorStudy(Record):
    """One earlier study of the patient as a candidate prior: relevant (and the rule that
    made it so) or not (and why)."""

    study_uid: str  # de-identified
    version: int
    modalities: list[str]
    body_regions: list[str]  # "Head", "Spine (Cervical spine)"
    relevant: bool
    rule: str  # rule id: same-region, adjacent-region, same-modality, other-region, look-back, last-n, ...
    reason: str  # the rule in words: "same body region Head (BodyPartExamined HEAD)"
    days_before: int  # interval to the current study: intact under the per-patient date shift
    ai_status: str  # PENDING until the prior's AI result arrives
    findings: list[str]  # the prior's active findings (labels)
    study_date: str | None = None  # shifted StudyDate (DA) when known


@dataclass(frozen=True, kw_only=True)
class PriorComparison(Record):
    """De-identified zone: a study version compared with the same patient's earlier studies.

    Published again (``revision`` + 1) whenever it changes: the study's or a prior's AI
    result arrives, or a prior arrives after the study.
    """

    SCHEMA: ClassVar[str] = "prior_comparison"
    trace_id: str
    study_uid: str
    version: int
    patient_pseudonym: str
    revision: int
    body_regions: list[str]
    priors: list[PriorStudy]  # every candidate, relevant first, most recent first
    relevant_priors: int
    new_findings: list[str]
    resolved_findings: list[str]
    persistent_findings: list[str]
    changed_findings: list[str]  # "ich 0.42 -> 0.91 (+0.49)"
    follow_up: list[str]
    follow_up_due: bool
    summary: str
    compared_at: datetime  # the patient's shifted clock, never the real time
    compared_with: str | None = None  # the relevant prior whose AI findings were compared


# ---------------------------------------------------------------- routing and results


@dataclass(frozen=True, kw_only=True)
class RuleHit(Record):
    rule_id: str
    description: str
    effect: str


@dataclass(frozen=True, kw_only=True)
class RoutingDecision(Record):
    SCHEMA: ClassVar[str] = "routing_decision"
    trace_id: str
    study_uid: str
    version: int
    priority: Priority
    subspecialty: str
    reasons: list[RuleHit]
    routed_at: datetime
    required_license_state: str | None = None
    assigned_reader: str | None = None


@dataclass(frozen=True, kw_only=True)
class WorklistUpdate(Record):
    SCHEMA: ClassVar[str] = "worklist_update"
    trace_id: str
    study_uid: str
    version: int
    modality: str
    modalities: list[str]
    priority: Priority
    subspecialty: str
    source_site: str
    instance_count: int
    reasons: list[str]
    received_at: datetime
    assembled_at: datetime
    routed_at: datetime
    status: str = "UNREAD"
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    institution_name: str | None = None
    reason_for_exam: str | None = None  # from the joined HL7 order (OBR-31)
    ai_status: str = "NONE"  # NONE (AI off), PENDING, or the result's InferenceStatus
    ai_findings: list[str] = field(default_factory=list)  # "label 0.93 (model version)", routing-effective first
    ai_reason: str | None = None  # why AI gave no result (TIMEOUT / ERROR / NOT_APPLICABLE)
    relevant_priors: int = 0  # the patient's earlier studies the relevance rules selected
    prior_summary: str | None = None  # the comparison with the most recent relevant prior
    prior_follow_up: list[str] = field(default_factory=list)
    priors: list[str] = field(default_factory=list)  # every candidate prior: the rule that made it relevant, or why not
    patient_state: str | None = None  # PID-11 state of the patient's address, from the joined order
    assigned_reader: str | None = None  # the reader the study is on the list of; None: unassigned
    assigned_at: datetime | None = None
    sla_deadline: datetime | None = None  # receipt + the SLA target of its urgency (per-site overrides)
    assignment_reasons: list[str] = field(default_factory=list)  # the filters and scores behind the assignment
    updated_at: datetime | None = None  # the row's last change (routing, assignment, aging, a reader's action)
    opened_at: datetime | None = None  # the reader first opened the study (reading API)
    signed_at: datetime | None = None
    reader_decisions: list[str] = field(default_factory=list)  # "label: ACCEPT", "label: MODIFY -> text"


class ResultStatus(str, enum.Enum):
    """Where a study's result stands, as every output says it (HL7 OBR-25/OBX-11 P, F, C;
    FHIR preliminary, final, amended; SR preliminary/verified flags)."""

    PRELIMINARY = "PRELIMINARY"  # AI findings and the draft report, nobody signed yet
    FINAL = "FINAL"  # signed by a reader
    CORRECTED = "CORRECTED"  # replaces a result already sent: a rejected finding, changes after signing, a new version


@dataclass(frozen=True, kw_only=True)
class ResultFinding(Record):
    """One AI finding as results carry it: its codes, and the reader's decision once made."""

    label: str
    model: str
    model_version: str
    confidence: float
    critical: bool
    codes: list[CodedConcept]
    decision: str | None = None  # ACCEPT / REJECT / MODIFY; None: not decided (yet)
    modified_to: str | None = None  # MODIFY: what the reader reports instead
    location: str | None = None


@dataclass(frozen=True, kw_only=True)
class StudyResult(Record):
    """Identified zone: one revision of a study's result, the one thing every output
    (DICOM SR, HL7 ORU^R01, FHIR DiagnosticReport, webhook) is built from.

    A new revision is published only when what the outputs would say changes; ``replaces``
    names the revision a CORRECTED one amends. Outputs are idempotent by
    ``trace_id`` + ``revision`` + destination.
    """

    SCHEMA: ClassVar[str] = "study_result"
    trace_id: str
    study_uid: str  # the ORIGINAL StudyInstanceUID: results go back to the site's systems
    version: int  # the assembly version the result is of
    revision: int  # 1, 2, ... per study: one per change of content
    status: ResultStatus
    issued_at: datetime
    source_site: str
    modalities: list[str]
    priority: Priority
    critical: bool
    findings: list[ResultFinding]
    instances: list[InstanceRef]  # the source images by their original UIDs
    report_text: str  # the draft preliminary report, or the signed text once FINAL
    changes: list[str]  # why this revision: "first AI result", "finding ich rejected", "signed", ...
    ai_status: str = "NONE"
    ai_reason: str | None = None
    replaces: int | None = None  # the revision a CORRECTED result amends
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    referring_physician: str | None = None
    reason_for_exam: str | None = None
    prior_summary: str | None = None
    reader_id: str | None = None
    signed_at: datetime | None = None


class DeliveryStatus(str, enum.Enum):
    QUEUED = "QUEUED"  # waiting for its first attempt (or the destination's breaker)
    SENT = "SENT"  # handed over; the protocol has no acknowledgement beyond that
    ACKED = "ACKED"  # the receiver acknowledged it (C-STORE success, HL7 AA, HTTP 2xx)
    FAILED = "FAILED"  # an attempt failed; another follows after the backoff
    DEAD = "DEAD"  # attempts ran out or the receiver refused it for good: dead-lettered


@dataclass(frozen=True, kw_only=True)
class ResultDelivery(Record):
    """One output of one result revision to one destination, each time its state changes."""

    SCHEMA: ClassVar[str] = "result_delivery"
    trace_id: str
    study_uid: str
    revision: int
    destination: str  # the destination's name in the results configuration
    kind: str  # sr / oru / fhir / webhook
    status: DeliveryStatus
    attempts: int
    at: datetime
    result_status: ResultStatus
    document_id: str | None = None  # SR SOP Instance UID, HL7 message control id, FHIR id, webhook id
    error: str | None = None
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class AssignmentTick(Record):
    """The reader-assignment clock: published by the assignment worker's timer and read back
    in stream order with the routed studies, so aging, shift changes and retries happen at
    a recorded time and a replay of the topics makes the same decisions."""

    SCHEMA: ClassVar[str] = "assignment_tick"
    at: datetime


class ReadingAction(str, enum.Enum):
    """What a reader does to a study through the reading API (:class:`ReaderFeedback`).

    CLAIM takes it onto the reader's own list and starts the read (UNREAD -> IN_PROGRESS);
    RELEASE puts it back (IN_PROGRESS -> UNREAD); OPEN records that the images were opened;
    ACCEPT, REJECT and MODIFY decide one AI finding; SIGN ends the read (-> SIGNED)."""

    CLAIM = "CLAIM"
    OPEN = "OPEN"
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    MODIFY = "MODIFY"
    RELEASE = "RELEASE"
    SIGN = "SIGN"

    @property
    def decides_finding(self) -> bool:
        return self in (ReadingAction.ACCEPT, ReadingAction.REJECT, ReadingAction.MODIFY)


#: an AI finding as the worklist row shows it: "label 0.93 (model version)" (see :func:`finding_text`)
_FINDING_TEXT = re.compile(r"^(?P<label>\S+) (?P<score>[0-9.]+) \((?P<model>\S+) (?P<version>[^)]+)\)$")


def finding_text(label: str, confidence: float, model: str, model_version: str) -> str:
    """An AI finding on the worklist row; :func:`parse_finding_text` reads it back."""
    return f"{label} {confidence:.2f} ({model} {model_version})"


def parse_finding_text(text: str) -> dict[str, Any] | None:
    """``{"label", "score", "model", "model_version"}`` of a worklist row's finding; None if not one."""
    match = _FINDING_TEXT.match(text)
    if match is None:
        return None
    return {"label": match["label"], "score": float(match["score"]), "model": match["model"],
            "model_version": match["version"]}


@dataclass(frozen=True, kw_only=True)
class ReaderFeedback(Record):
    """A reader's action on a study, from the reading API: applied by the worklist stage
    (status, decisions), kept in the warehouse (``reader_feedback``) for AI monitoring, and
    audited. ``version`` is the worklist row version the reader acted on."""

    SCHEMA: ClassVar[str] = "reader_feedback"
    feedback_id: str
    trace_id: str
    study_uid: str
    version: int
    reader_id: str
    action: ReadingAction
    at: datetime
    source_site: str
    finding: str | None = None  # ACCEPT / REJECT / MODIFY: the AI finding's label
    model: str | None = None  # "name version" of the model that made the finding
    score: float | None = None  # the finding's AI confidence, as the reader saw it
    modified_to: str | None = None  # MODIFY: what the reader reports instead
    comment: str | None = None
    report_text: str | None = None  # SIGN: the signed report


@dataclass(frozen=True, kw_only=True)
class Alert(Record):
    """Something a person must act on now. A critical finding's alert names the finding
    (its label, the key an :class:`AlertAck` answers with) and the time by which someone
    must acknowledge it; unacknowledged by then, it is raised again one
    ``escalation_level`` higher (:mod:`streams.alerts`)."""

    SCHEMA: ClassVar[str] = "alert"
    trace_id: str
    study_uid: str
    version: int
    alert_type: str
    severity: Priority
    message: str
    raised_at: datetime
    finding_code: str | None = None
    ack_deadline: datetime | None = None  # unacknowledged by then: escalated
    finding: str | None = None  # the AI finding's label
    escalation_level: int = 0  # 0: as first raised; N: raised again N times, unacknowledged


@dataclass(frozen=True, kw_only=True)
class AlertAck(Record):
    """A person acknowledged a study's critical alert for one finding (any version of the
    study): from the reading API, it stops the alert's escalation."""

    SCHEMA: ClassVar[str] = "alert_ack"
    trace_id: str
    study_uid: str
    version: int  # the version of the alert acknowledged
    finding: str  # the AI finding's label, as on the alert
    actor: str  # the user id of who acknowledged it
    at: datetime
    note: str | None = None


@dataclass(frozen=True, kw_only=True)
class AlertTimer(Record):
    """Internal: asks the alerts stage to check one study's open alerts against the clock."""

    SCHEMA: ClassVar[str] = "alert_timer"
    study_uid: str
    due_at: datetime


@dataclass(frozen=True, kw_only=True)
class AuditEvent(Record):
    SCHEMA: ClassVar[str] = "audit_event"
    trace_id: str
    actor: str
    action: str
    stage: str
    at: datetime
    detail: dict[str, str] = field(default_factory=dict)
    study_uid: str | None = None


@dataclass(frozen=True, kw_only=True)
class DeadLetter(Record):
    SCHEMA: ClassVar[str] = "dead_letter"
    stage: str
    reason: str
    error: str
    failed_at: datetime
    trace_id: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    key: str | None = None
    payload: bytes | None = None
    payload_uri: str | None = None


@dataclass(frozen=True, kw_only=True)
class StudyLink(Record):
    """Identified zone only: which de-identified study is which original study."""

    SCHEMA: ClassVar[str] = "study_link"
    trace_id: str
    study_uid: str
    version: int
    deid_study_uid: str
    deid_trace_id: str
    patient_pseudonym: str
    source_site: str
    linked_at: datetime


@dataclass(frozen=True, kw_only=True)
class AssemblyTimer(Record):
    SCHEMA: ClassVar[str] = "assembly_timer"
    study_uid: str
    due_at: datetime


EVENT_TYPES: dict[str, type[Record]] = {
    cls.SCHEMA: cls
    for cls in (
        InstanceReceived,
        OrderReceived,
        PatientUpdated,
        StudyAssembled,
        StudyDeidentified,
        InferenceResult,
        AdmissionHint,
        PriorComparison,
        ResultByPatient,
        RoutingDecision,
        WorklistUpdate,
        Alert,
        AlertAck,
        AlertTimer,
        AuditEvent,
        DeadLetter,
        AssemblyTimer,
        StudyLink,
        AssignmentTick,
        ReaderFeedback,
        StudyResult,
        ResultDelivery,
    )
}
