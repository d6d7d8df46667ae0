"""Smoke test of the end-to-end latency benchmark (load/bench_e2e.py): a tiny run through the whole
durable ``radstream up`` -- three announced studies, three without a count (a 2 s quiet period,
as the tests' settings have), 10 s of mixed traffic (8 studies) at a small scale. Checks that
the three rows print numeric p50/p95/p99 with their targets, that nothing was lost and that
every child's memory is printed. Never asserts on speed: that is the benchmark's business.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from schemas.settings import Settings

pytestmark = pytest.mark.integration

NUMBER = r"\d+(\.\d+)?"
SPREAD = rf"p50 {NUMBER} s, p95 {NUMBER} s, p99 {NUMBER} s"


def test_three_rows_with_targets_nothing_lost_and_memory_per_child(durable_settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    env.update({k: v for k, v in durable_settings.to_env().items() if k.startswith("RADSTREAM_ASSEMBLY_")})
    done = subprocess.run([sys.executable, "-m", "load.bench_e2e", "--studies", "3", "--interval", "1",
                           "--rate", "2400/h", "--duration", "10", "--scale", "0.05", "--wait-timeout", "60"],
                          env=env, capture_output=True, text=True, timeout=240)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]

    assert "blobs s3, broker s3://tansu/; quiet period 2 s" in out, out
    for row, target in (("announced", r"target p99 <= 2\.0 s: (met|MISSED)"),
                        ("quiet period", r"target p99 <= 4\.0 s: (met|MISSED)"),
                        ("sustained", r"target: nothing lost: met")):
        assert re.search(rf"^{row}: [1-9]\d* studies \(.*\), last C-STORE response -> routed {SPREAD}; {target}; "
                         rf"lost 0 of [1-9]\d*$", out, re.MULTILINE), (row, out)
    assert len(re.findall(rf"^  bottleneck: (assembled|routed) \(p95 {NUMBER} s", out, re.MULTILINE)) == 3, out
    assert re.search(r"^  sustained: [1-9]\d* studies, .* inst/s .*; send failures 0$", out, re.MULTILINE), out
    assert re.search(r"^  backlog .*: backlog (bounded|GREW)$", out, re.MULTILINE), out
    assert re.search(r"^highest sustained rate without backlog growth: ", out, re.MULTILINE), out
    for child in ("worker", "dicom-gateway", "objectstore", "broker", "warehouse", "all"):
        assert re.search(rf"^  memory {child}\s+peak\s+{NUMBER}\s+rss\s+{NUMBER} ->\s+{NUMBER} \([+-]{NUMBER}\)$",
                         out, re.MULTILINE), (child, out)


def test_a_lost_study_is_shown_with_what_the_runtime_logged_of_it(tmp_path) -> None:
    from load.bench_e2e import lost_evidence
    from schemas.events import trace_id_for

    uid = "1.2.3.4"
    (tmp_path / "worker.log").write_text(
        f"t1 [info     ] study assembled [radstream.assemble] trace_id={trace_id_for(uid)}\n"
        "t2 [info     ] another study [radstream.assemble] trace_id=other\n"
        f"t3 [error    ] stage failed [radstream.streams] stage=deidentify trace_id={trace_id_for(uid)}\n"
        "Traceback (most recent call last):\n")
    (tmp_path / "dicom-gateway.log").write_text(f"t0 [info     ] stored instance study_uid={uid}\n")
    lines = lost_evidence(tmp_path, [uid])
    assert lines[:4] == [f"  logs of lost {uid}: 3 lines",
                         f"    dicom-gateway: t0 [info     ] stored instance study_uid={uid}",
                         f"    worker: t1 [info     ] study assembled [radstream.assemble] trace_id={trace_id_for(uid)}",
                         f"    worker: t3 [error    ] stage failed [radstream.streams] stage=deidentify "
                         f"trace_id={trace_id_for(uid)}"]
    assert lines[4:] == ["  worker log: 2 error lines, the last:",
                         f"    t3 [error    ] stage failed [radstream.streams] stage=deidentify "
                         f"trace_id={trace_id_for(uid)}", "    Traceback (most recent call last):"]
