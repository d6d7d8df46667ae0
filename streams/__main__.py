"""``python -m streams worker|inference|delivery``: run a worker on the configured broker.

``worker`` runs the stream stages; ``inference`` runs the AI pre-read stage in its own
process and consumer group (``{prefix}-inference``), so that GPU workers scale apart
from stream workers. Reads settings from ``RADSTREAM_*`` (the supervisor exports them).
When the consumer group has its partitions and the tables are recovered it writes
``DATA_DIR/run/{worker,inference}.ready``, which ``radstream up`` waits for. ``delivery``
sends results to their destinations (:mod:`streams.delivery`; a plain consumer, not Faust).
"""

from __future__ import annotations

import sys
from pathlib import Path

from adapters.kafka import ensure_topics
from adapters.process import start_component
from adapters.telemetry import get_logger, serve_metrics

ROLES = {"worker": "streams", "inference": "inference"}


def main(argv: list[str]) -> int:
    if argv == ["delivery"]:
        from streams.delivery import main as delivery

        return delivery()
    if len(argv) != 1 or argv[0] not in ROLES:
        print("usage: python -m streams worker|inference|delivery", file=sys.stderr)
        return 2
    command = argv[0]

    def metrics_port(settings) -> int:
        return settings.metrics.worker_port if command == "worker" else settings.metrics.inference_port

    settings = start_component(command, lambda s: [(metrics_port(s), f"the {command}'s metrics")])
    log = get_logger(f"radstream.{command}")
    from streams.app import INFERENCE_STAGES, STAGES, create_app  # after logging: Faust logs at import

    ensure_topics(settings)
    stages = STAGES if command == "worker" else INFERENCE_STAGES
    app, _ = create_app(settings, stages, ROLES[command])
    ready_file = Path(settings.data_dir).resolve() / "run" / f"{command}.ready"
    ready_file.parent.mkdir(parents=True, exist_ok=True)
    ready_file.unlink(missing_ok=True)

    @app.on_rebalance_complete.connect
    async def _ready(sender, **kwargs) -> None:
        ready_file.write_text("ready\n")
        log.info(f"{command} ready: partitions assigned and tables recovered")

    serve_metrics(metrics_port(settings), settings.bind_host)
    import faust

    worker = faust.Worker(app, loglevel=settings.log_level.lower(), override_logging=False)
    try:
        worker.execute_from_commandline()
    finally:
        ready_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
