"""Smoke test of the AI pre-read benchmark (load/bench_preread.py): a tiny run on a real broker.

Checks that the report has every figure and that the stage, run as its own process,
gave one OK result per study. Never asserts on speed: that is the benchmark's business.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

FIGURES = {
    "engine": {"images", "max_batch", "rounds", "ours_images_s", "peer_images_s", "ratio", "overhead_us_per_image"},
    "decode": {"images", "workers", "ours_images_s", "peer_images_s", "ratio", "untuned_pool_images_s"},
    "stage": {"studies", "images", "seconds", "images_s", "studies_s", "latency_p50_ms", "latency_p99_ms",
              "queued_ms_p50", "decode_ms_p50", "infer_ms_p50", "latency_ms_p50", "cpu_s", "cpu_ms_per_image",
              "ratio_images_s", "ratio_studies_s", "statuses", "reasons", "backends"},
    "peer": {"studies", "images", "seconds", "images_s", "studies_s", "cpu_s", "cpu_ms_per_image"},
}


def test_a_tiny_run_reports_every_figure_and_one_ok_result_per_study() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    done = subprocess.run(
        [sys.executable, "-m", "load.bench_preread", "--studies", "3", "--slices", "2", "--chest", "1",
         "--engine-studies", "4", "--rounds", "2", "--memory", "--json"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout)
    for part, keys in FIGURES.items():
        assert keys <= set(figures[part]), (part, keys - set(figures[part]))
        for key in keys - {"statuses", "reasons", "backends"}:
            value = figures[part][key]
            assert isinstance(value, int | float) and math.isfinite(value) and value >= 0, (part, key, value)
    stage, peer = figures["stage"], figures["peer"]
    assert stage["studies"] == peer["studies"] == 4  # 3 head CT + 1 chest CR
    assert stage["statuses"] == {"OK": 4} and stage["reasons"] == []
    assert stage["images"] == peer["images"] == 3 * 2 + 1
    assert stage["backends"] == ["onnxruntime-cpu"]
    assert figures["engine"]["images"] == 4 * 2 and figures["config"]["durable"] is False
