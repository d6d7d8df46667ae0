"""Warehouse sink: worklist updates, stage timestamps, orders, alerts and dead letters into ClickHouse.

:func:`streams.sink_rows.rows_for` is the declared mapping from an event to warehouse
rows; one agent per topic in :data:`streams.sink_rows.SINK_TOPICS` batches events
(``sink_batch_size`` / ``sink_batch_window_s``) and inserts them with clickhouse-connect
in a worker thread. Writes are idempotent (ReplacingMergeTree keyed by study, version
and stage), so a redelivered batch after a crash or retry collapses into the same rows.
A failed insert is retried with backoff and holds the partition: a sink that dropped
rows to keep moving would lose worklist entries silently.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from adapters.telemetry import SINK_ROWS, STAGE_EVENTS, get_logger
from schemas.events import DeadLetter
from schemas.topics import TopicSpec
from streams.runner import Intake
from streams.sink_rows import SINK_TOPICS, Row, rows_for

log = get_logger("radstream.sink")


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

    for spec in SINK_TOPICS:
        _sink_agent(ctx, spec, write)


def _sink_agent(ctx, spec: TopicSpec, write) -> None:
    settings = ctx.settings
    # A bad message on a topic a stage also reads is that stage's dead letter; a broken
    # dead letter is logged, never looped back.
    intake = Intake.of(ctx, "sink", (spec,), answers=spec.event is not DeadLetter)

    async def agent(stream) -> None:
        async for batch in stream.take_events(settings.worker.sink_batch_size, within=settings.worker.sink_batch_window_s):
            rows: list[tuple[str, Row]] = []
            for message in batch:
                event = await intake.accept(ctx, message)
                if event is not None:
                    rows.extend(rows_for(event, message.message.partition, message.message.offset, message.message.topic))
            if rows:
                await write(group_rows(rows))
            STAGE_EVENTS.labels("sink", "ok").inc(len(batch))

    ctx.app.agent(ctx.topic(spec), name=f"sink-{spec.suffix}")(agent)
