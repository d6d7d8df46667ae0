"""Structured logging and Prometheus metrics, the same in every process.

Every log line is a structured event (console or JSON, by ``log_format``) carrying the
component and, wherever a study is involved, its ``trace_id``: grep one id and you see
the study's whole path. Libraries that log through the stdlib (Faust, pynetdicom,
aiokafka) go through the same formatter. Metric names are part of the contract too, so
they are declared here, once, and imported by each stage.
"""

from __future__ import annotations

import logging
import sys

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from schemas.settings import Settings

_configured = False


def configure_logging(settings: Settings, component: str) -> None:
    global _configured
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    structlog.contextvars.bind_contextvars(component=component)
    _configured = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


def serve_metrics(port: int, host: str) -> None:
    """Expose /metrics on ``host:port``; 0 disables."""
    if port:
        start_http_server(port, addr=host)


# -- stage metrics: one family per concern, labelled by stage -------------------------

STAGE_EVENTS = Counter(
    "radstream_stage_events_total", "Events processed by a stream stage, by outcome", ["stage", "outcome"]
)
STAGE_SECONDS = Histogram(
    "radstream_stage_seconds", "Time a stage spent on one event", ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
DEAD_LETTERS = Counter("radstream_dead_letters_total", "Events sent to the dead-letter topic", ["stage", "reason"])
STUDIES_ASSEMBLED = Counter("radstream_studies_assembled_total", "Study versions assembled", ["reason"])
SINK_ROWS = Counter("radstream_sink_rows_total", "Rows written to the warehouse", ["table"])
AI_RESULTS = Counter("radstream_ai_results_total", "AI pre-reads published, by status", ["status"])
AI_STUDY_SECONDS = Histogram(
    "radstream_ai_study_seconds", "Time from the AI stage taking a study to its result", ["level"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 6, 8, 10, 15, 30, 60),
)
AI_DECODE_SECONDS = Histogram(
    "radstream_ai_decode_seconds", "Fetch, decode and preprocessing of one study's selected images",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8),
)
AI_DEFERRED = Counter("radstream_ai_deferred_total", "Routine studies deferred to inference.retry (queue full)")
AI_WAITING = Gauge("radstream_ai_admission_waiting", "Studies waiting for an AI lane, by level", ["level"])
