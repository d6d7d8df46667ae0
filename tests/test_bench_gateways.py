"""Smoke tests of the STOW-RS and MLLP gateway benchmarks (load/bench_stow.py, load/bench_mllp.py):
tiny runs on the durable default (blobs on SeaweedFS, Tansu's log on ``s3://``), every peer real.

Each checks that the headline names the durable broker, that every acknowledged instance or
order is on its topic (counted by reading the topic: Tansu's watermarks undercount batched
produces, which group commit makes), and that the ratio line is printed. Never asserts on
speed: that is the benchmark's business.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NUMBER = r"\d+(\.\d+)?"


def bench(module: str, *args: str, timeout_s: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    done = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(), reason="needs Orthanc")
def test_stow_headline_is_the_durable_default_with_every_instance_on_the_topic() -> None:
    out = bench("load.bench_stow", "--instances", "11", "--senders", "2", "--per-request", "5",
                "--broker-storage", "s3")

    assert re.search(rf"^Orthanc POST /instances \(index, disk\):\s+{NUMBER} instances/s$", out, re.MULTILINE), out
    assert re.search(rf"^radstream STOW-RS, broker s3://tansu/, blobs on SeaweedFS .*:\s+{NUMBER} instances/s; "
                     r"10/10 on instance\.received$", out, re.MULTILINE), out
    assert re.search(rf"^ours / orthanc = {NUMBER}$", out, re.MULTILINE), out


def test_mllp_headline_is_the_durable_default_with_every_order_on_the_topic() -> None:
    out = bench("load.bench_mllp", "--messages", "20", "--connections", "1", "3", "--broker-storage", "s3")

    for connections in (1, 3):
        assert re.search(rf"^\[{connections} connection\(s\)\] hl7 asyncio echo server messages/s: {NUMBER} "
                         r"\(AA 20/20\)$", out, re.MULTILINE), out
        assert re.search(rf"^\[{connections} connection\(s\)\] radstream HL7 gateway, broker s3://tansu/, "
                         rf"messages/s: {NUMBER} \(AA 20/20\)$", out, re.MULTILINE), out
        ratio = rf"^\[{connections} connection\(s\)\] radstream / hl7-echo = {NUMBER}$"
        assert re.search(ratio, out, re.MULTILINE), out
    assert "orders on order.received (broker s3://tansu/): 40/40" in out
