"""Routing to a reader, whole runtime: a site's PACS (Orthanc) sends a head CT with a critical finding.

``radstream up`` runs with a reader roster. Two routine head CTs arrive first (storescu) and
go on the only licensed neuroradiologist's list. Then Orthanc, as the site's PACS, C-STOREs
a head CT with the demo hemorrhage painted in: AI makes it CRITICAL and it must go to the
neuroradiologist licensed in the site's state, at the top of their list, while the
neuroradiologist not licensed there, whose queue is shorter, is passed over with the
reason on the row and the whole decision in the audit table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from adapters.warehouse import connect, query_rows
from schemas.settings import Settings
from tests.test_dicom_security import _orthanc_request, site_pacs
from tests.test_end_to_end import (
    RULES,
    STORESCU,
    painted_head_ct,
    real_file,
    start_up,
    stop_up,
    storescu,
    wait_for_worklist,
)

pytestmark = pytest.mark.integration

#: the end-to-end rules, and head CTs read by neuroradiology (the packaged rules' head-CT rule, narrowed)
NEURO_RULES = RULES + """
[[subspecialty]]
id = "ct-neuro"
when = { modality = ["CT"] }
subspecialty = "neuroradiology"
"""
SITE = "ORTHANC_PACS"  # the PACS's calling AE title: its source site
ROSTER = f"""
[[reader]]
id = "dr-neuro-nv"
name = "Neuro, licensed in NV"
subspecialties = ["neuroradiology"]
licensed_states = ["NV"]
credentialed_sites = ["{SITE}", "SITE_A"]
capacity = 20
shifts = [{{ days = "daily", start = "00:00", end = "24:00", tz = "UTC" }}]

[[reader]]
id = "dr-neuro-ca"
name = "Neuro, licensed in CA only"
subspecialties = ["neuroradiology"]
licensed_states = ["CA"]
credentialed_sites = ["{SITE}", "SITE_A"]
capacity = 20
shifts = [{{ days = "daily", start = "00:00", end = "24:00", tz = "UTC" }}]
"""


def routine_head_ct(tmp_path: Path, n: int) -> Path:
    ds = dcmread(real_file("693_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / f"routine-{n}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.skipif(not shutil.which(STORESCU), reason="dcmtk is installed by scripts/bootstrap.sh")
def test_a_critical_head_ct_from_the_sites_pacs_goes_to_the_licensed_neuroradiologist_first(
        settings: Settings, tmp_path: Path) -> None:
    rules, roster = tmp_path / "rules.toml", tmp_path / "roster.toml"
    rules.write_text(NEURO_RULES)
    roster.write_text(ROSTER)
    proc = start_up(settings, tmp_path, RADSTREAM_ROUTING_RULES_FILE=str(rules),
                    RADSTREAM_ROUTING_ROSTER_FILE=str(roster), RADSTREAM_HL7_SITE_STATES=f"{SITE}=NV,SITE_A=NV")
    try:
        routine = [routine_head_ct(tmp_path, n) for n in range(2)]
        sent = storescu(settings, routine)
        assert sent.returncode == 0, sent.stderr
        wait_for_worklist(settings, 2, ai=True)

        painted = painted_head_ct(tmp_path)
        with site_pacs(tmp_path, settings) as (http_port, modality):
            uploaded = _orthanc_request(http_port, "POST", "/instances", painted.read_bytes())
            job = _orthanc_request(http_port, "POST", f"/modalities/{modality}/store",
                                   {"Resources": [uploaded["ParentStudy"]], "Synchronous": True})
            assert job["InstancesCount"] == 1 and job["FailedInstancesCount"] == 0, job
        rows = wait_for_worklist(settings, 3, ai=True)
        critical_uid = str(dcmread(painted, stop_before_pixels=True).StudyInstanceUID)
        deadline = time.monotonic() + 30
        while next(r for r in rows if r["study_uid"] == critical_uid)["priority"] != "CRITICAL":
            assert time.monotonic() < deadline, rows
            time.sleep(0.5)
            rows = wait_for_worklist(settings, 3, ai=True)
        mine = query_rows(settings, "reader_worklist", reader="dr-neuro-nv", limit=10)
        audit = connect(settings).query(
            "SELECT action, detail FROM audit WHERE study_uid = {uid:String} ORDER BY at",
            parameters={"uid": critical_uid}).result_rows
    finally:
        stop_up(proc)

    row = next(r for r in rows if r["study_uid"] == critical_uid)
    assert row["source_site"] == SITE and row["priority"] == "CRITICAL"
    assert row["assigned_reader"] == "dr-neuro-nv", row
    assert "passed over dr-neuro-ca (not licensed in NV, queue 0)" in row["assignment_reasons"], row
    assert (row["sla_deadline"] - row["received_at"]).total_seconds() == 30 * 60
    assert {r["assigned_reader"] for r in rows} == {"dr-neuro-nv"}  # the routine ones too: only NV readers may
    assert [r["study_uid"] for r in mine][0] == critical_uid and len(mine) == 3, mine
    assert [r["priority"] for r in mine] == ["CRITICAL", "ROUTINE", "ROUTINE"]
    actions = [action for action, _ in audit]
    assert actions[0] == "assigned", audit
    explanation = json.loads(audit[-1][1]["explanation"])
    licensed = next(step for step in explanation["steps"] if step["filter"] == "licensed")
    assert licensed["excluded"] == ["dr-neuro-ca"] and explanation["urgency"] == "critical"
