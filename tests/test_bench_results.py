"""Smoke tests of the results-out benchmark (load/bench_results.py): tiny runs, every peer real.

Outbox mode: five results go through the delivery worker on the durable broker (Tansu on
SeaweedFS) to Orthanc and the ``hl7`` MLLP server, then the same documents through
storescu, MLLPClient and pynetdicom. Pipeline mode (the default): two painted head CTs go
through the whole ``radstream up`` (DICOM gateway, assembly, de-identification, AI, routing,
results, delivery), timed from each one's AI result. Each checks that every output was
ACKED, every SR stored and every ratio line printed. Never asserts on speed: that is the
benchmark's business.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists() or not shutil.which("storescu"),
                                 reason="needs Orthanc and dcmtk's storescu")]

NUMBER = r"\d+(\.\d+)?"


def ratio_line(what: str, quantile: str, peer: str) -> re.Pattern[str]:
    return re.compile(rf"^{what}\s+{quantile} ours {NUMBER} ms / {re.escape(peer)} {NUMBER} ms = {NUMBER}$",
                      re.MULTILINE)


def bench(*args: str, timeout_s: float) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    done = subprocess.run([sys.executable, "-m", "load.bench_results", *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def assert_ratio_lines(out: str, *pairs: tuple[str, str]) -> None:
    for what, peer in pairs:
        for quantile in ("p50", "p99"):
            assert ratio_line(what, quantile, peer).search(out), (what, quantile, peer, out)


def test_outbox_mode_acks_every_output_stores_every_sr_and_prints_each_ratio() -> None:
    out = bench("--mode", "outbox", "--results", "5", "--one-association", timeout_s=180)

    assert_ratio_lines(out, ("SR", "storescu"), ("SR", "pynetdicom-1-assoc"), ("ORU", "MLLPClient"),
                       ("E2E", "storescu+MLLPClient"))
    assert re.search(rf"^throughput ours {NUMBER} results/s / peers {NUMBER} results/s = {NUMBER}", out, re.MULTILINE)
    assert "config: 5 results" in out and "broker tansu s3://tansu/ on SeaweedFS" in out
    assert "checks: 10/10 outputs ACKED, 0 DEAD" in out
    assert "Orthanc +5 SRs from ours, +5 from storescu, +5 from pynetdicom; RIS +5 ORUs from ours" in out


def test_pipeline_mode_times_two_studies_from_their_ai_result_to_both_acks() -> None:
    out = bench("--results", "2", "--rate", "0", timeout_s=300)  # the default mode

    assert_ratio_lines(out, ("SR", "storescu"), ("ORU", "MLLPClient"), ("E2E", "storescu+MLLPClient"))
    assert re.search(rf"^ours results stage alone \(study\.ai -> results\.outbox\): p50 -?{NUMBER} ms", out,
                     re.MULTILINE), out
    assert "config: pipeline, 2 studies" in out and "broker tansu s3://tansu/ on SeaweedFS" in out
    assert "checks: 4/4 outputs ACKED, 0 DEAD" in out and "every result revision 1 with a critical finding" in out
    assert "Orthanc +2 SRs from ours, +2 from storescu; RIS +2 ORUs from ours" in out
