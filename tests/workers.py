"""Starting the stream worker (or the AI worker) as the tests' child process."""

from __future__ import annotations

import os
import time
from pathlib import Path

from radstream import procs
from schemas.settings import Settings


def start_worker(settings: Settings, log: Path, role: str = "worker"):
    """Start ``python -m streams worker`` (or ``inference``) and wait until its group has its partitions."""
    env = {**os.environ, **settings.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "RADSTREAM_WAREHOUSE_URL": f"http://127.0.0.1:{procs.free_port()}"}
    ready = Path(settings.data_dir).resolve() / "run" / f"{role}.ready"
    ready.unlink(missing_ok=True)
    proc = procs.spawn(procs.python_module("streams", role), env=env, log_path=log)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{role} not ready in 60 s:\n" + log.read_text()[-3000:]
        time.sleep(0.2)
    return proc
