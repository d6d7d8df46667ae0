"""Wiring of the Faust app: the app itself, and each stage's agents attached in order.

Nothing here decides anything about studies; each stage module owns its pure logic
and a thin ``register(ctx)`` that declares its stage to the runner (:mod:`streams.runner`). The consumer session timeout is
a setting because Tansu's group join takes about half of it (6 s joins in ~3 s).
"""

from __future__ import annotations

from pathlib import Path

import faust

from schemas.codec import Codec
from schemas.settings import Settings
from streams import (alerts, assemble, deidentify, offsets_compat, orders, preread, priors, relink, results, route,
                     sink, worklist)
from streams.context import StreamContext

#: the stream worker's stages in pipeline order.
#: Of the stages reading one topic, the first here dead-letters its bad messages.
STAGES = (assemble, deidentify, orders, relink, priors, route, worklist, results, alerts, sink)
#: the AI worker's (``python -m streams inference``): its own process and consumer group,
#: so that GPU workers scale apart from stream workers
INFERENCE_STAGES = (preread,)


def create_app(settings: Settings, stages=STAGES, role: str = "streams") -> tuple[faust.App, StreamContext]:
    """The Faust app of one worker role: ``streams`` or ``inference`` (its consumer group is the app id)."""
    data_dir = Path(settings.data_dir).resolve() / ("faust" if role == "streams" else f"faust-{role}")
    data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.kafka.topic_prefix}-{role}",
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_client_id=settings.kafka.client_id,
        broker_session_timeout=settings.kafka.session_timeout_s,
        broker_heartbeat_interval=settings.kafka.heartbeat_interval_s,
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        table_standby_replicas=0,
        store="memory://",
        datadir=str(data_dir),
        web_enabled=role == "streams" and settings.worker.web_port != 0,
        web_port=settings.worker.web_port or 6066,
        web_bind=settings.bind_host,
        web_host=settings.bind_host,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
    )
    if settings.kafka.verify_end_offsets:
        offsets_compat.install(settings.kafka_bootstrap)
    offsets_compat.install_fetch_wait(settings.kafka.fetch_max_wait_ms)
    offsets_compat.install_complete_flush()
    offsets_compat.install_seek_unpositioned()
    ctx = StreamContext(app=app, settings=settings, codec=Codec(settings.kafka.schema_registry_url))
    for stage in stages:
        stage.register(ctx)
    return app, ctx
