"""Which warehouse rows each event becomes: one declared table, event type -> (table, row builder).

:data:`SINK_TABLES` names, for every event type on a topic the sink reads
(:data:`SINK_TOPICS`), the ClickHouse tables it lands in (``schemas/clickhouse/*.sql``)
and the builder of each row; most rows are the event's fields under the same names
(:func:`columns`), the rest say what they derive. :func:`rows_for` is the whole mapping as
one pure function; adding an event to the warehouse is one entry here and its DDL file.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.events import (
    Alert,
    AlertAck,
    AuditEvent,
    DeadLetter,
    InferenceResult,
    OrderReceived,
    PatientUpdated,
    ReaderFeedback,
    Record,
    ResultDelivery,
    RoutingDecision,
    StudyAssembled,
    StudyLink,
    StudyResult,
    WorklistUpdate,
)
from schemas.topics import (
    ALERT,
    ALERT_ACK,
    AUDIT,
    DEAD_LETTER,
    DEID_QUARANTINE,
    INFERENCE_RESULT,
    ORDER_RECEIVED,
    PATIENT_UPDATED,
    READING_APPLIED,
    RESULTS_DELIVERY,
    RESULTS_OUTBOX,
    ROUTING_DECISION,
    STUDY_ASSEMBLED,
    STUDY_LINK,
    WORKLIST_UPDATE,
)

Row = dict[str, Any]


@dataclass(frozen=True)
class Position:
    """Where the sink read the event; a dead letter's row records it (``dlq_*``)."""

    topic: str
    partition: int
    offset: int


#: one row, or several of one table (an AI result has a row per model run)
RowBuilder = Callable[[Any, Position], Row | list[Row]]


def columns(*names: str) -> RowBuilder:
    """Rows of the event's fields of these names, enum members as their values."""

    def build(event: Record, position: Position) -> Row:
        return {name: _column(getattr(event, name)) for name in names}

    return build


def _column(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


_worklist_columns = columns(
    "study_uid", "version", "trace_id", "accession_number", "patient_id", "patient_name", "modality", "modalities",
    "body_part", "study_description", "priority", "subspecialty", "source_site", "institution_name",
    "instance_count", "status", "reasons", "received_at", "assembled_at", "routed_at", "reason_for_exam",
    "ai_status", "ai_findings", "ai_reason", "relevant_priors", "prior_summary", "prior_follow_up", "priors",
    "patient_state", "assigned_reader", "assigned_at", "sla_deadline", "assignment_reasons", "updated_at",
    "opened_at", "signed_at", "reader_decisions",
)


def worklist_row(event: WorklistUpdate, position: Position) -> Row:
    # a later version always wins; within a version, the later update (routing, assignment, aging)
    row_version = (event.version << 42) + int((event.updated_at or event.routed_at).timestamp() * 1000)
    return {**_worklist_columns(event, position), "row_version": row_version}


def _stage_row(event: Record, stage: str, started_at, finished_at, detail: dict[str, str], source_site: str) -> Row:
    return {"study_uid": event.study_uid, "version": event.version, "trace_id": event.trace_id,
            "source_site": source_site, "stage": stage, "started_at": started_at, "finished_at": finished_at,
            "detail": detail}


def reading_stages(event: WorklistUpdate, position: Position) -> list[Row]:
    """The reading loop's stages of a worklist row: 'opened' and 'signed', once they happened."""
    detail = {"reader": event.assigned_reader or ""}
    return [_stage_row(event, stage, at, at, detail, event.source_site)
            for stage, at in (("opened", event.opened_at), ("signed", event.signed_at)) if at is not None]


def received_stage(study: StudyAssembled, position: Position) -> Row:
    return _stage_row(study, "received", study.first_received_at, study.last_received_at,
                      {"instances": str(study.instance_count)}, study.source_site)


def assembled_stage(study: StudyAssembled, position: Position) -> Row:
    return _stage_row(study, "assembled", study.last_received_at, study.assembled_at,
                      {"completion_reason": study.completion_reason.value, "series": str(len(study.series))},
                      study.source_site)


def deidentified_stage(link: StudyLink, position: Position) -> Row:
    return _stage_row(link, "deidentified", link.linked_at, link.linked_at, {"deid_trace_id": link.deid_trace_id},
                      link.source_site)


def routed_stage(decision: RoutingDecision, position: Position) -> Row:
    detail = {"priority": decision.priority.value, "subspecialty": decision.subspecialty,
              "rules": ",".join(hit.rule_id for hit in decision.reasons)}
    return _stage_row(decision, "routed", decision.routed_at, decision.routed_at, detail, source_site="")


def model_run_rows(result: InferenceResult, position: Position) -> list[Row]:
    """One row per model run of an AI pre-read (AI monitoring reads these)."""
    common = {"study_uid": result.study_uid, "version": result.version, "trace_id": result.trace_id,
              "status": result.status.value, "level": result.level, "queued_ms": result.queued_ms,
              "decode_ms": result.decode_ms, "infer_ms": result.infer_ms, "latency_ms": result.latency_ms,
              "inferred_at": result.inferred_at}
    return [
        {**common, "model": run.model, "model_version": run.model_version, "model_sha256": run.model_sha256,
         "backend": run.backend, "model_status": run.status.value, "silent": run.silent, "images": run.images,
         "labels": [s.label for s in run.scores], "scores": [s.score for s in run.scores],
         "thresholds": [s.threshold for s in run.scores],
         "findings": [f.label for f in result.findings if f.model == run.model],
         "reason": run.reason or result.reason}
        for run in result.models
    ] or [{**common, "model": "", "model_version": "", "model_sha256": "", "backend": "", "model_status":
           result.status.value, "silent": False, "images": 0, "labels": [], "scores": [], "thresholds": [],
           "findings": [], "reason": result.reason}]


_dead_letter_columns = columns(
    "failed_at", "stage", "reason", "error", "trace_id", "key", "source_topic", "source_partition", "source_offset",
    "payload_uri",
)


def dead_letter_row(letter: DeadLetter, position: Position) -> Row:
    return {**_dead_letter_columns(letter, position),
            "dlq_topic": position.topic, "dlq_partition": position.partition, "dlq_offset": position.offset}


_result_columns = columns("study_uid", "revision", "trace_id", "version", "status", "replaces", "issued_at",
                          "source_site", "priority", "critical", "changes", "report_text", "reader_id", "signed_at")


def result_row(result: StudyResult, position: Position) -> Row:
    return {**_result_columns(result, position),
            "findings": [f"{f.label} {f.decision or 'UNDECIDED'} ({f.model} {f.model_version}) {f.confidence:.2f}"
                         for f in result.findings]}


_alert_columns = columns("study_uid", "version", "trace_id", "alert_type", "severity", "message", "finding_code",
                         "raised_at", "ack_deadline", "escalation_level")


def alert_row(alert: Alert, position: Position) -> Row:
    # the finding is in the table's sorting key, which cannot be nullable: '' for an alert about no finding
    return {**_alert_columns(alert, position), "finding": alert.finding or ""}


#: event type -> the rows it becomes, each (warehouse table, row builder)
SINK_TABLES: dict[type[Record], tuple[tuple[str, RowBuilder], ...]] = {
    WorklistUpdate: (("worklist", worklist_row), ("stage_events", reading_stages)),
    StudyAssembled: (("stage_events", received_stage), ("stage_events", assembled_stage)),
    RoutingDecision: (("stage_events", routed_stage),),
    StudyLink: (
        ("study_links", columns("study_uid", "version", "deid_study_uid", "trace_id", "deid_trace_id",
                                "patient_pseudonym", "source_site", "linked_at")),
        ("stage_events", deidentified_stage),
    ),
    Alert: (("alerts", alert_row),),
    AlertAck: (("alert_acks", columns("study_uid", "finding", "at", "actor", "trace_id", "version", "note")),),
    # every HL7 order message: orders without images stay visible
    OrderReceived: (("orders", columns(
        "accession_number", "control_id", "message_type", "trace_id", "source_site", "received_at", "order_control",
        "study_uid", "patient_id", "patient_name", "priority", "ordering_provider", "reason_for_exam",
        "procedure_code", "procedure_description", "patient_location", "patient_state")),),
    AuditEvent: (("audit", columns("at", "trace_id", "study_uid", "actor", "action", "stage", "detail")),),
    PatientUpdated: (("patient_updates", columns(
        "source_site", "patient_id", "control_id", "message_type", "trace_id", "received_at", "patient_name",
        "patient_birth_date", "patient_sex", "patient_location", "patient_state")),),
    DeadLetter: (("dead_letters", dead_letter_row),),
    InferenceResult: (("inference_results", model_run_rows),),  # a row per model run
    StudyResult: (("results", result_row),),
    ResultDelivery: (("deliveries", columns(
        "study_uid", "revision", "destination", "trace_id", "kind", "status", "attempts", "at", "result_status",
        "document_id", "error", "next_attempt_at")),),
    ReaderFeedback: (("reader_feedback", columns(
        "feedback_id", "at", "trace_id", "study_uid", "version", "reader_id", "action", "source_site", "finding",
        "model", "score", "modified_to", "comment", "report_text")),),
}

#: the topics the sink writes to the warehouse; dead letters and quarantined instances among them
SINK_TOPICS = (WORKLIST_UPDATE, STUDY_ASSEMBLED, ROUTING_DECISION, ALERT, ALERT_ACK, DEAD_LETTER, ORDER_RECEIVED,
               PATIENT_UPDATED, STUDY_LINK, DEID_QUARANTINE, INFERENCE_RESULT, AUDIT, READING_APPLIED, RESULTS_OUTBOX,
               RESULTS_DELIVERY)


def rows_for(event: Record, partition: int = -1, offset: int = -1, topic: str = "") -> list[tuple[str, Row]]:
    """Warehouse rows ``(table, row)`` recording one event read at ``topic``/``partition``/``offset``."""
    position = Position(topic, partition, offset)
    rows: list[tuple[str, Row]] = []
    for table, build in SINK_TABLES.get(type(event), ()):
        built = build(event, position)
        rows.extend((table, row) for row in (built if isinstance(built, list) else [built]))
    return rows
