"""A real DICOM study in, a prioritised worklist row out, re-prioritised by AI.

``radstream up`` runs for real (Tansu broker, chDB warehouse endpoint, Faust worker, AI
worker, DICOM gateway, all as child processes); dcmtk's ``storescu`` plays the modality
and sends DICOM files that nobody here wrote (pydicom-data's chest CR and head CT, and
the same head CT with a demo finding painted in, as a study of its own); the test then
reads the worklist and stage events from the warehouse through clickhouse-connect,
exactly as an analyst would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from schemas.settings import Settings
from adapters.warehouse import connect, current_worklist, query_rows

pytestmark = pytest.mark.integration

STORESCU = "/usr/bin/storescu"

#: real files: a head CT and a chest CR, each in a study of its own (plus a painted head CT)
FILES = ["693_UNCR.dcm", "RG1_UNCR.dcm"]

RULES = """
[defaults]
priority = "ROUTINE"
subspecialty = "general"

[[subspecialty]]
id = "chest-radiography"
when = { modality = ["CR", "DX"], body_part = ["CHEST"] }
subspecialty = "thoracic"

[[priority]]
id = "chest-cr-urgent"
description = "site policy in this test: chest radiographs are read urgently"
when = { modality = ["CR"], body_part = ["CHEST"] }
priority = "URGENT"
"""


def real_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not installed (pydicom / pydicom-data)"
    return Path(path)


def start_up(settings: Settings, tmp_path: Path, **env_extra: str) -> subprocess.Popen:
    """``radstream up`` with these settings (and extra ``RADSTREAM_*``), once it says it is ready."""
    env = {**os.environ, **settings.to_env(), **env_extra}
    log = tmp_path / "up.log"
    proc = subprocess.Popen([sys.executable, "-m", "radstream", "up"], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "radstream is ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_up(proc)
            raise AssertionError(f"radstream up not ready (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.25)
    return proc


def stop_up(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def runtime(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, subprocess.Popen]]:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    proc = start_up(settings, tmp_path, RADSTREAM_ROUTING_RULES_FILE=str(rules))
    try:
        yield settings, proc
    finally:
        stop_up(proc)


def storescu(settings: Settings, paths: list[Path], calling_ae: str = "SITE_A") -> subprocess.CompletedProcess:
    return subprocess.run(
        [STORESCU, "-aet", calling_ae, "-aec", settings.dicom.ae_title, "-xs",
         settings.bind_host, str(settings.dicom.port), *map(str, paths)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=120,
    )


def wait_for_worklist(settings: Settings, studies: int, timeout_s: float = 90, ai: bool = False) -> list[dict]:
    """The worklist once it has ``studies`` rows (and, with ``ai``, each row's AI result)."""
    deadline = time.monotonic() + timeout_s
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = current_worklist(settings)
        if len(rows) >= studies and (not ai or all(row["ai_status"] != "PENDING" for row in rows)):
            return rows
        time.sleep(0.5)
    raise AssertionError(f"worklist has {len(rows)} of {studies} studies after {timeout_s}s: {rows}")


def painted_head_ct(tmp_path: Path) -> Path:
    """pydicom-data's head CT with the demo hemorrhage-like finding painted in, as a new study."""
    from pydicom.uid import generate_uid

    from engines.demo.synthetic import paint_finding

    ds = paint_finding(dcmread(real_file("693_UNCR.dcm")), "hemorrhage", 101)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "painted-head-ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.skipif(not shutil.which(STORESCU), reason="dcmtk is installed by scripts/bootstrap.sh")
def test_real_studies_sent_by_storescu_become_one_prioritised_row_each(runtime, tmp_path: Path) -> None:
    settings, _ = runtime
    paths = [real_file(name) for name in FILES] + [painted_head_ct(tmp_path)]
    expected = {}
    for path in paths:
        header = dcmread(path, stop_before_pixels=True)
        expected[header.StudyInstanceUID] = header.Modality
    assert len(expected) == len(paths), "the chosen files must be three different studies"

    # the painted (critical) study is sent last, after the routine head CT
    sent = storescu(settings, paths)
    assert sent.returncode == 0, sent.stderr

    rows = wait_for_worklist(settings, len(expected), ai=True)
    by_study = {row["study_uid"]: row for row in rows}
    assert set(by_study) == set(expected)
    for study_uid, modality in expected.items():
        row = by_study[study_uid]
        assert row["modality"] == modality
        assert row["version"] == 1 and row["instance_count"] == 1 and row["source_site"] == "SITE_A"
        assert row["received_at"] <= row["assembled_at"] <= row["routed_at"]
    chest = next(r for r in rows if r["modality"] == "CR")
    assert (chest["priority"], chest["subspecialty"]) == ("URGENT", "thoracic")
    assert any("chest-cr-urgent" in reason for reason in chest["reasons"])
    # every study was pre-read by AI; only the painted head CT has a finding, and it is critical
    assert {r["ai_status"] for r in rows} == {"OK"}, rows
    painted = by_study[dcmread(paths[-1], stop_before_pixels=True).StudyInstanceUID]
    head = by_study[dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID]
    assert painted["priority"] == "CRITICAL" and any(r.startswith("ai-critical") for r in painted["reasons"])
    assert [f.split()[0] for f in painted["ai_findings"]] == ["hemorrhage"]
    assert head["priority"] == "ROUTINE" and head["ai_findings"] == [] and chest["ai_findings"] == []
    assert [r["study_uid"] for r in rows] == [painted["study_uid"], chest["study_uid"], head["study_uid"]], \
        "the critical study, sent last, is read first; then the urgent one; then the routine one"
    # the AI results themselves are in the de-identified zone, under de-identified UIDs only
    ai_rows = connect(settings).query("SELECT study_uid, model, backend, findings FROM inference_results FINAL").result_rows
    assert len(ai_rows) == 3 and not {uid for uid, *_ in ai_rows} & set(expected)
    assert {backend for _, _, backend, _ in ai_rows} == {"onnxruntime-cpu"}

    for study_uid in expected:
        stages = query_rows(settings, "stage_events_for_study", study_uid=study_uid)
        # de-identification and routing both follow assembly and run side by side
        assert [s["stage"] for s in stages][:2] == ["received", "assembled"]
        assert {s["stage"] for s in stages} == {"received", "assembled", "deidentified", "routed"}
        assert all(s["started_at"] <= s["finished_at"] for s in stages)
        assert {s["trace_id"] for s in stages} == {by_study[study_uid]["trace_id"]}

    # the identified zone knows which de-identified study each one became, and only it does
    links = connect(settings).query("SELECT study_uid, deid_study_uid FROM study_links FINAL").result_rows
    assert {uid for uid, _ in links} == set(expected)
    assert all(deid.startswith("2.25.") and deid not in expected for _, deid in links)

    # Resending the same study changes nothing: one row per study, still version 1.
    assert storescu(settings, paths[:1]).returncode == 0
    time.sleep(settings.assembly.quiet_period_s + 2)
    again = {r["study_uid"]: r for r in current_worklist(settings)}
    assert set(again) == set(expected)
    assert {row["version"] for row in again.values()} == {1}

    # The CLI shows the same worklist.
    cli = subprocess.run([sys.executable, "-m", "radstream", "worklist", "--json"], capture_output=True, text=True,
                         env={**os.environ, **settings.to_env()}, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert all(uid in cli.stdout for uid in expected)
