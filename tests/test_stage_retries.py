"""A blocking stage outlives an object store that goes away for a few seconds.

Before, de-identification dead-lettered every study it was working on while the store
could not be reached, the embedded one's restart by the supervisor included, and each
one then needed a replay by hand. Now the runner calls the handler again after each of
``worker.transient_retries_s`` (only for failures to reach a service: a missing blob or
a bug is dead-lettered at once, as before).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from adapters.s3 import open_s3_store
from adapters.telemetry import STAGE_EVENTS
from schemas.blobs import BlobNotFound, BlobUnavailable
from schemas.deid.policy import parse_policy
from schemas.settings import Settings
from schemas.topics import STUDY_ASSEMBLED, STUDY_DEIDENTIFIED
from streams.deidentify import run
from streams.runner import GaveUp, _call_blocking
from tests.test_deidentify import KEYS, T0, _assembled

POLICY = parse_policy({"defaults": {"options": ["clean_descriptors"]}})


def _retried(stage: str) -> float:
    return STAGE_EVENTS.labels(stage, "retried")._value.get()


def test_de_identification_waits_out_an_object_store_restart(durable_settings: Settings, tmp_path: Path) -> None:
    """The real SeaweedFS stopped under a study, and started again 1.5 s later on its data."""
    from radstream.objectstore import start_embedded, stop_embedded

    proc = start_embedded(durable_settings, tmp_path / "seaweedfs-1.log")
    store = open_s3_store(durable_settings)
    try:
        study = _assembled(store, ("CT_small.dcm", "CT_small.dcm"), "SITE_A")
    finally:
        stop_embedded(proc, durable_settings)
    # the stage in a thread of its own; this thread restarts the store, so the child's
    # parent-death signal (procs.spawn) is tied to a thread that lives on
    result: list = []

    def stage() -> None:
        try:
            result.append(asyncio.run(_call_blocking(
                "deidentify-test", lambda event: run(event, store, POLICY, KEYS, T0).outputs(), study,
                (0.5, 1.0, 2.0, 4.0, 8.0), study.trace_id)))
        except BaseException as exc:  # noqa: BLE001  (said by the assertion below)
            result.append(exc)

    before, started = _retried("deidentify-test"), time.monotonic()
    worker = threading.Thread(target=stage)
    worker.start()
    time.sleep(1.5)
    proc = start_embedded(durable_settings, tmp_path / "seaweedfs-2.log")
    try:
        worker.join(30)
        assert result and not isinstance(result[0], BaseException), result
        assert time.monotonic() - started >= 1.5
        assert _retried("deidentify-test") - before >= 1
        deidentified = [event for spec, event in result[0] if spec is STUDY_DEIDENTIFIED]
        assert len(deidentified) == 1 and deidentified[0].instance_count == 2
        for ref in deidentified[0].instances:  # stored after the restart
            assert ref.blob_uri.startswith(f"s3://{durable_settings.blobs.bucket}/deid/")
            assert store.get(ref.blob_uri)[128:132] == b"DICM"
    finally:
        stop_embedded(proc, durable_settings)



def test_only_failures_to_reach_a_service_are_tried_again() -> None:
    calls: list[str] = []

    def failing(error: Exception):
        def handler(event):
            calls.append(event)
            raise error
        return handler

    # a missing blob is not going to appear: dead-lettered after one call
    with pytest.raises(BlobNotFound):
        asyncio.run(_call_blocking("retry-test", failing(BlobNotFound("s3://b/k")), "a", (0.0, 0.0), None))
    assert calls == ["a"]
    # unreachable through every retry: the dead letter says how long it was tried
    calls.clear()
    with pytest.raises(GaveUp, match=r"BlobUnavailable: gone \(still failing after 3 attempts over 0 s\)"):
        asyncio.run(_call_blocking("retry-test", failing(BlobUnavailable("gone")), "b", (0.0, 0.0), None))
    assert calls == ["b"] * 3
    # no retries configured: the error itself, at once
    calls.clear()
    with pytest.raises(BlobUnavailable, match="gone"):
        asyncio.run(_call_blocking("retry-test", failing(BlobUnavailable("gone")), "c", (), None))
    assert calls == ["c"]
    # a flaky service: the second call's outputs
    answers = iter([ConnectionResetError("reset"), [("topic", "event")]])

    def flaky(event):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert asyncio.run(_call_blocking("retry-test", flaky, "d", (0.0,), None)) == [("topic", "event")]


def test_the_dead_letter_says_whether_the_service_stayed_away_or_the_stage_failed() -> None:
    """A give-up is ``service_unavailable`` (worth sending again once the service is back),
    anything else a ``stage_error``; the worker's context is a recorder here, the runner
    real."""
    from types import SimpleNamespace

    from streams.runner import Stage, _handle

    letters: list[tuple[str, str, str]] = []

    class Recorder:
        settings = SimpleNamespace(worker=SimpleNamespace(transient_retries_s=(0.0, 0.0)))

        async def send(self, spec, event) -> None:
            raise AssertionError(f"nothing is sent: {event}")

        async def dead_letter(self, stage, reason, error, message, trace_id=None) -> None:
            letters.append((stage, reason, error))

    def failing(error: Exception):
        return Stage("retry-test", (STUDY_ASSEMBLED,), {STUDY_ASSEMBLED: lambda event: (_ for _ in ()).throw(error)},
                     blocking=True)

    event = SimpleNamespace(trace_id="t")
    asyncio.run(_handle(Recorder(), failing(BlobUnavailable("gone")), STUDY_ASSEMBLED, None, event))
    asyncio.run(_handle(Recorder(), failing(BlobNotFound("s3://b/k")), STUDY_ASSEMBLED, None, event))
    assert letters == [
        ("retry-test", "service_unavailable", "BlobUnavailable: gone (still failing after 3 attempts over 0 s)"),
        ("retry-test", "stage_error", "BlobNotFound: no blob at s3://b/k")]
