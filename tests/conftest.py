"""Shared fixtures: isolated settings (own data dir, free ports) and a real broker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from radstream import procs
from schemas.settings import Settings, load_settings
from adapters.kafka import ensure_topics
from tests.workers import start_worker


@pytest.fixture(autouse=True)
def _no_radstream_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own settings; a developer's RADSTREAM_* must not leak in."""
    for name in list(os.environ):
        if name.startswith("RADSTREAM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for one test: its own data dir and free ports for every listener.

    Blobs go to a local directory and the broker keeps its log in memory: fast, for the
    tests that are not about durability. Those use the ``durable_settings`` fixture.
    """
    return load_settings(data_dir=tmp_path / "data", **procs.isolated_listeners(
        kafka={"session_timeout_s": 6, "partitions": 2, "topic_prefix": f"t{os.getpid()}",
               "storage": "memory://tansu/"},
        blobs={"backend": "local"},
        assembly={"quiet_period_s": 2.0, "scan_interval_s": 0.25},
    ))


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


@pytest.fixture
def durable_settings(settings: Settings) -> Settings:
    """The production defaults: blobs on S3 (embedded SeaweedFS), the broker's log on it."""
    return settings.model_copy(update={
        "blobs": settings.blobs.model_copy(update={"backend": "s3"}),
        "kafka": settings.kafka.model_copy(update={"storage": "s3://tansu/"}),
    })


@pytest.fixture
def objectstore(durable_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A real SeaweedFS (``weed mini``) with the radstream buckets, as ``radstream up`` runs it."""
    from radstream.objectstore import start_embedded, stop_embedded

    proc = start_embedded(durable_settings, tmp_path / "seaweedfs.log")
    try:
        yield durable_settings
    finally:
        stop_embedded(proc, durable_settings)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report how many mutations each fuzzed parser survived (tests/test_fuzz_gateways.py)."""
    import sys

    fuzz = sys.modules.get("load.fuzz_gateways")
    if fuzz is None or not fuzz.MUTATIONS:
        return
    terminalreporter.section("gateway fuzzing")
    for name, count in sorted(fuzz.MUTATIONS.items()):
        terminalreporter.write_line(f"{name}: {count} mutations, no counterexample")


@pytest.fixture
def worker(broker: Settings, tmp_path: Path) -> Iterator[Settings]:
    proc = start_worker(broker, tmp_path / "worker.log")
    try:
        yield broker
    finally:
        procs.stop(proc, grace_s=5)
