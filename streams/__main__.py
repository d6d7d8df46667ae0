"""``python -m streams worker``: run the Faust worker on the configured broker.

Reads settings from ``RADSTREAM_*`` (the supervisor exports them). When the consumer
group has its partitions and the tables are recovered it writes
``DATA_DIR/run/worker.ready``, which ``radstream up`` waits for.
"""

from __future__ import annotations

import sys
from pathlib import Path

from adapters.process import start_component
from adapters.telemetry import get_logger, serve_metrics
from adapters.kafka import ensure_topics


def main(argv: list[str]) -> int:
    if argv[:1] != ["worker"]:
        print("usage: python -m streams worker", file=sys.stderr)
        return 2
    settings = start_component("worker", lambda s: [(s.metrics.worker_port, "the worker's metrics")])
    log = get_logger("radstream.worker")
    from streams.app import create_app  # after logging: Faust logs at import

    ensure_topics(settings)
    app, _ = create_app(settings)
    ready_file = Path(settings.data_dir).resolve() / "run" / "worker.ready"
    ready_file.parent.mkdir(parents=True, exist_ok=True)
    ready_file.unlink(missing_ok=True)

    @app.on_rebalance_complete.connect
    async def _ready(sender, **kwargs) -> None:
        ready_file.write_text("ready\n")
        log.info("worker ready: partitions assigned and tables recovered")

    serve_metrics(settings.metrics.worker_port, settings.bind_host)
    import faust

    worker = faust.Worker(app, loglevel=settings.log_level.lower(), override_logging=False)
    try:
        worker.execute_from_commandline()
    finally:
        ready_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
