"""Shared fixtures: isolated settings (own data dir, free ports) and a real broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from radstream import procs
from schemas.settings import Settings, load_settings
from schemas.topics import ensure_topics


@pytest.fixture(autouse=True)
def _no_radstream_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own settings; a developer's RADSTREAM_* must not leak in."""
    for name in list(os.environ):
        if name.startswith("RADSTREAM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: its own data dir and free ports for every listener."""
    return load_settings(
        data_dir=tmp_path / "data",
        kafka={"embedded_port": procs.free_port(), "session_timeout_s": 6, "partitions": 2,
               "topic_prefix": f"t{os.getpid()}"},
        warehouse={"embedded_port": procs.free_port()},
        dicom={"port": procs.free_port()},
        worker={"web_port": procs.free_port()},
        metrics={"gateway_port": 0, "worker_port": 0},
        assembly={"quiet_period_s": 2.0, "scan_interval_s": 0.25},
    )


@pytest.fixture
def broker(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A real Tansu broker (memory storage) with every radstream topic created."""
    proc = procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, "memory://tansu/",
                             log_path=tmp_path / "tansu.log")
    try:
        ensure_topics(settings)
        yield settings
    finally:
        procs.stop(proc, grace_s=1)
