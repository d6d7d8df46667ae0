"""Smoke test of the results-out benchmark (load/bench_results.py): a tiny run, every peer real.

Five results go through the delivery worker on the durable broker (Tansu on SeaweedFS) to
Orthanc and the ``hl7`` MLLP server, then the same documents through storescu, MLLPClient
and pynetdicom. Checks that every output was ACKED, every SR stored and every ratio line
printed. Never asserts on speed: that is the benchmark's business.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NUMBER = r"\d+(\.\d+)?"


def ratio_line(what: str, quantile: str, peer: str) -> re.Pattern[str]:
    return re.compile(rf"^{what}\s+{quantile} ours {NUMBER} ms / {re.escape(peer)} {NUMBER} ms = {NUMBER}$",
                      re.MULTILINE)


@pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists() or not shutil.which("storescu"),
                    reason="needs Orthanc and dcmtk's storescu")
def test_a_tiny_run_acks_every_output_stores_every_sr_and_prints_each_ratio() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    done = subprocess.run([sys.executable, "-m", "load.bench_results", "--results", "5", "--one-association"],
                          env=env, capture_output=True, text=True, timeout=180)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for what, peer in (("SR", "storescu"), ("SR", "pynetdicom-1-assoc"), ("ORU", "MLLPClient"),
                       ("E2E", "storescu+MLLPClient")):
        for quantile in ("p50", "p99"):
            assert ratio_line(what, quantile, peer).search(out), (what, quantile, peer, out)
    assert re.search(rf"^throughput ours {NUMBER} results/s / peers {NUMBER} results/s = {NUMBER}", out, re.MULTILINE)
    assert "config: 5 results" in out and "broker tansu s3://tansu/ on SeaweedFS" in out
    assert "checks: 10/10 outputs ACKED, 0 DEAD" in out
    assert "Orthanc +5 SRs from ours, +5 from storescu, +5 from pynetdicom; RIS +5 ORUs from ours" in out
