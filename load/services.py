"""The embedded object store and broker, started as ``radstream up`` starts them, for the
benchmarks that need only those (the pre-read stage through Kafka, the results outbox)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from adapters.kafka import ensure_topics
from radstream import procs
from schemas.settings import Settings


def start_services(settings: Settings, root: Path) -> list[subprocess.Popen]:
    """SeaweedFS when blobs or the broker's log live on S3, then Tansu; topics created."""
    started, env = [], dict(os.environ)
    if settings.blobs.backend == "s3" or settings.kafka.storage.startswith("s3://"):
        from adapters.s3 import load_credentials
        from radstream.objectstore import start_embedded, tansu_env

        started.append(start_embedded(settings, root / "seaweedfs.log"))
        env.update(tansu_env(settings, load_credentials(settings)))
    try:
        started.append(procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, settings.kafka.storage,
                                         log_path=root / "tansu.log", env=env))
        ensure_topics(settings)
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(started: list[subprocess.Popen]) -> None:
    for proc in reversed(started):
        procs.stop(proc, grace_s=5)
