"""Warehouse sink: worklist updates, stage timestamps, alerts and dead letters into ClickHouse.

``rows_for`` is the pure mapping from an event to warehouse rows; the agents batch
events (``sink_batch_size`` / ``sink_batch_window_s``) and insert with clickhouse-connect
in a worker thread. Writes are idempotent (ReplacingMergeTree keyed by study, version
and stage), so a redelivered batch after a crash or retry collapses into the same rows.
A failed insert is retried with backoff and holds the partition: a sink that dropped
rows to keep moving would lose worklist entries silently.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from schemas.codec import DecodeError
from schemas.events import (
    Alert,
    DeadLetter,
    OrderReceived,
    Record,
    RoutingDecision,
    StudyAssembled,
    StudyLink,
    WorklistUpdate,
)
from adapters.telemetry import SINK_ROWS, STAGE_EVENTS, get_logger
from schemas.topics import (
    ALERT,
    DEAD_LETTER,
    DEID_QUARANTINE,
    ORDER_RECEIVED,
    ROUTING_DECISION,
    STUDY_ASSEMBLED,
    STUDY_LINK,
    WORKLIST_UPDATE,
)

log = get_logger("radstream.sink")

Row = dict[str, Any]


def rows_for(event: Record, partition: int = -1, offset: int = -1, topic: str = "") -> list[tuple[str, Row]]:
    """Warehouse rows ``(table, row)`` recording one event."""
    if isinstance(event, WorklistUpdate):
        row = {
            "study_uid": event.study_uid, "version": event.version, "trace_id": event.trace_id,
            "accession_number": event.accession_number, "patient_id": event.patient_id,
            "patient_name": event.patient_name, "modality": event.modality, "modalities": list(event.modalities),
            "body_part": event.body_part, "study_description": event.study_description,
            "priority": event.priority.value, "subspecialty": event.subspecialty, "source_site": event.source_site,
            "institution_name": event.institution_name, "instance_count": event.instance_count,
            "status": event.status, "reasons": list(event.reasons),
            "received_at": event.received_at, "assembled_at": event.assembled_at, "routed_at": event.routed_at,
            "reason_for_exam": event.reason_for_exam,
            # a later version always wins; within a version, the later update
            "row_version": (event.version << 42) + int(event.routed_at.timestamp() * 1000),
        }
        return [("worklist", row)]
    if isinstance(event, StudyAssembled):
        common = {"study_uid": event.study_uid, "version": event.version, "trace_id": event.trace_id,
                  "source_site": event.source_site}
        return [
            ("stage_events", {**common, "stage": "received", "started_at": event.first_received_at,
                              "finished_at": event.last_received_at,
                              "detail": {"instances": str(event.instance_count)}}),
            ("stage_events", {**common, "stage": "assembled", "started_at": event.last_received_at,
                              "finished_at": event.assembled_at,
                              "detail": {"completion_reason": event.completion_reason.value,
                                         "series": str(len(event.series))}}),
        ]
    if isinstance(event, RoutingDecision):
        return [("stage_events", {
            "study_uid": event.study_uid, "version": event.version, "trace_id": event.trace_id, "source_site": "",
            "stage": "routed", "started_at": event.routed_at, "finished_at": event.routed_at,
            "detail": {"priority": event.priority.value, "subspecialty": event.subspecialty,
                       "rules": ",".join(hit.rule_id for hit in event.reasons)},
        })]
    if isinstance(event, StudyLink):
        return [
            ("study_links", {
                "study_uid": event.study_uid, "version": event.version, "deid_study_uid": event.deid_study_uid,
                "trace_id": event.trace_id, "deid_trace_id": event.deid_trace_id,
                "patient_pseudonym": event.patient_pseudonym, "source_site": event.source_site,
                "linked_at": event.linked_at,
            }),
            ("stage_events", {
                "study_uid": event.study_uid, "version": event.version, "trace_id": event.trace_id,
                "source_site": event.source_site, "stage": "deidentified", "started_at": event.linked_at,
                "finished_at": event.linked_at, "detail": {"deid_trace_id": event.deid_trace_id},
            }),
        ]
    if isinstance(event, Alert):
        return [("alerts", {
            "study_uid": event.study_uid, "version": event.version, "trace_id": event.trace_id,
            "alert_type": event.alert_type, "severity": event.severity.value, "message": event.message,
            "finding_code": event.finding_code, "raised_at": event.raised_at,
        })]
    if isinstance(event, OrderReceived):  # every HL7 order/ADT message: orders without images stay visible
        return [("orders", {
            "accession_number": event.accession_number, "control_id": event.control_id,
            "message_type": event.message_type, "trace_id": event.trace_id, "source_site": event.source_site,
            "received_at": event.received_at, "order_control": event.order_control, "study_uid": event.study_uid,
            "patient_id": event.patient_id, "patient_name": event.patient_name, "priority": event.priority,
            "ordering_provider": event.ordering_provider, "reason_for_exam": event.reason_for_exam,
            "procedure_code": event.procedure_code, "procedure_description": event.procedure_description,
            "patient_location": event.patient_location, "patient_state": event.patient_state,
        })]
    if isinstance(event, DeadLetter):
        return [("dead_letters", {
            "failed_at": event.failed_at, "stage": event.stage, "reason": event.reason, "error": event.error,
            "trace_id": event.trace_id, "key": event.key, "source_topic": event.source_topic,
            "source_partition": event.source_partition, "source_offset": event.source_offset,
            "payload_uri": event.payload_uri, "dlq_topic": topic, "dlq_partition": partition, "dlq_offset": offset,
        })]
    return []


def group_rows(rows: list[tuple[str, Row]]) -> dict[str, list[Row]]:
    tables: dict[str, list[Row]] = defaultdict(list)
    for table, row in rows:
        tables[table].append(row)
    return tables


def insert_rows(client, tables: dict[str, list[Row]]) -> None:
    """Insert grouped rows with a clickhouse-connect client, one INSERT per table."""
    for table, rows in tables.items():
        columns = list(rows[0])
        client.insert(table, [[row[c] for c in columns] for row in rows], column_names=columns)
        SINK_ROWS.labels(table).inc(len(rows))


def register(ctx) -> None:
    """Attach one sink agent per warehouse-bound topic to the Faust app."""
    from adapters.warehouse import connect

    settings = ctx.settings
    client_holder: dict[str, Any] = {}

    def insert(tables: dict[str, list[Row]]) -> None:
        if "client" not in client_holder:
            client_holder["client"] = connect(settings)
        insert_rows(client_holder["client"], tables)

    async def write(tables: dict[str, list[Row]]) -> None:
        delay = 0.5
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, insert, tables)
                return
            except Exception as exc:  # the warehouse is down or refused: hold the partition, retry
                client_holder.pop("client", None)
                log.error("warehouse insert failed; retrying", error=str(exc), retry_in_s=delay,
                          tables=sorted(tables))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    for spec in (WORKLIST_UPDATE, STUDY_ASSEMBLED, ROUTING_DECISION, ALERT, DEAD_LETTER, ORDER_RECEIVED,
                 STUDY_LINK, DEID_QUARANTINE):
        _sink_agent(ctx, spec, write)


def _sink_agent(ctx, spec, write) -> None:
    settings = ctx.settings
    is_dlq = spec in (DEAD_LETTER, DEID_QUARANTINE)

    async def agent(stream) -> None:
        async for batch in stream.take_events(settings.worker.sink_batch_size, within=settings.worker.sink_batch_window_s):
            rows: list[tuple[str, Row]] = []
            for event in batch:
                try:
                    decoded = ctx.codec.decode(event.value, spec.event)
                except DecodeError as exc:
                    if not is_dlq:  # a broken dead letter is logged, never looped back
                        await ctx.dead_letter("sink", "undecodable", str(exc), event)
                    else:
                        log.error("undecodable dead letter", error=str(exc), offset=event.message.offset)
                    STAGE_EVENTS.labels("sink", "dead_letter").inc()
                    continue
                rows.extend(rows_for(decoded, event.message.partition, event.message.offset, event.message.topic))
            if rows:
                await write(group_rows(rows))
            STAGE_EVENTS.labels("sink", "ok").inc(len(batch))

    ctx.app.agent(ctx.topic(spec), name=f"sink-{spec.suffix}")(agent)
