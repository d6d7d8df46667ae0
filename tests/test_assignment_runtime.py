"""Routing to a reader and reading, whole runtime: a site's PACS (Orthanc) sends a head CT with a critical finding.

``radstream up`` runs with a reader roster. Two routine head CTs arrive first (storescu) and
go on the only licensed neuroradiologist's list. Then Orthanc, as the site's PACS, C-STOREs
a head CT with the demo hemorrhage painted in: AI makes it CRITICAL and it must go to the
neuroradiologist licensed in the site's state, at the top of their list, while the
neuroradiologist not licensed there, whose queue is shorter, is passed over with the
reason on the row and the whole decision in the audit table. The neuroradiologist then reads
it through the reading API (claim, open, AI output, accept the finding, sign) while a reader
of another site, an analyst and a request without a token are refused and audited.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from click.testing import CliRunner

from adapters.warehouse import connect, query_rows
from gateways.reading_access import token_sha256
from radstream.cli import cli
from radstream.reading_cli import api_url, call
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


#: the reading API's users: token -> (id, role, sites)
USERS = {"tok-neuro": ("dr-neuro-nv", "reader", [SITE, "SITE_A"]), "tok-other": ("dr-elsewhere", "reader", ["SITE_Z"]),
         "tok-analyst": ("qa-analyst", "analyst", []), "tok-admin": ("ops", "admin", ["*"])}


def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.toml"
    path.write_text("".join(f'[[user]]\nid = "{uid}"\nrole = "{role}"\nsites = {json.dumps(sites)}\n'
                            f'token_sha256 = "{token_sha256(token)}"\n\n'
                            for token, (uid, role, sites) in USERS.items()))
    return path


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
                    RADSTREAM_ROUTING_ROSTER_FILE=str(roster), RADSTREAM_HL7_SITE_STATES=f"{SITE}=NV,SITE_A=NV",
                    RADSTREAM_READING_USERS_FILE=str(users_file(tmp_path)))
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
        while True:  # the audit has its own sink agent: it may trail the worklist row
            audit = connect(settings).query(
                "SELECT action, detail FROM audit WHERE study_uid = {uid:String} AND stage = 'worklist' ORDER BY at",
                parameters={"uid": critical_uid}).result_rows
            if '"urgency": "critical"' in (audit[-1][1].get("explanation", "") if audit else "") \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        read = read_the_critical_study(settings, critical_uid)
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

    check_the_read(read, critical_uid)


def read_the_critical_study(settings: Settings, uid: str) -> dict:
    """The reading loop over the API and its CLI; returns what the checks need."""
    base = api_url(settings)
    ai_url = f"{base}/studies/{uid}/ai"
    got = {"anonymous": call(ai_url, ""), "elsewhere": call(ai_url, "tok-other"),
           "analyst": call(ai_url, "tok-analyst"),
           "elsewhere_claim": call(f"{base}/studies/{uid}/claim?wait=10", "tok-other", "POST", {}),
           "sign_before_claim": call(f"{base}/studies/{uid}/sign?wait=10", "tok-neuro", "POST", {}),
           "bad_json": call(f"{base}/studies/{uid}/findings/hemorrhage", "tok-neuro", "POST", ["accept"])}
    runner, env = CliRunner(), {"RADSTREAM_READING_TOKEN": "tok-neuro"}

    def cli_read(*args: str):
        result = runner.invoke(cli, ["read", "--url", base, "--wait", "20", *args], env=env)
        return result.exit_code, json.loads(result.output) if result.output.strip() else {}

    got["claim"], got["open"] = cli_read("claim", uid), cli_read("open", uid)
    got["ai"] = cli_read("ai", uid)
    label = got["ai"][1]["findings"][0]["label"]
    got["accept"] = cli_read("decide", uid, label, "accept", "--comment", "agree")
    got["sign"] = cli_read("sign", uid, "--report", "Acute intraparenchymal hemorrhage.")
    got["admin_ai"] = call(ai_url, "tok-admin")
    got["after_sign"] = call(f"{base}/studies/{uid}/release?wait=10", "tok-neuro", "POST", {})
    client = connect(settings)
    deadline = time.monotonic() + 30
    while True:  # the sink writes the audit of the last requests asynchronously
        got["audit"] = client.query("SELECT actor, action, trace_id, detail FROM audit WHERE study_uid = {uid:String} "
                                    "AND stage IN ('reading-api', 'reading') ORDER BY at",
                                    parameters={"uid": uid}).result_rows
        if sum(1 for _, action, _, _ in got["audit"] if action == "ai-output-viewed") >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    got["row"] = query_rows(settings, "study_row", study_uid=uid)[0]
    got["stages"] = {stage for stage, in client.query("SELECT stage FROM stage_events WHERE study_uid = {uid:String}",
                                                     parameters={"uid": uid}).result_rows}
    got["feedback"] = client.query("SELECT action, finding, reader_id FROM reader_feedback WHERE study_uid = {uid:String} "
                                   "ORDER BY at", parameters={"uid": uid}).result_rows
    return got


def check_the_read(got: dict, uid: str) -> None:
    assert got["anonymous"][0] == 401
    assert got["elsewhere"][0] == 403 and "at site ORTHANC_PACS" in got["elsewhere"][1]["detail"]
    assert got["analyst"][0] == 403 and got["elsewhere_claim"][0] == 403
    assert got["sign_before_claim"][0] == 409 and "claim it first" in got["sign_before_claim"][1]["reason"]
    assert got["bad_json"][0] == 400
    for step in ("claim", "open", "accept", "sign"):
        assert got[step][0] == 0 and got[step][1]["outcome"] == "applied", (step, got[step])
    code, ai = got["ai"]
    assert code == 0 and ai["ai_status"] == "OK" and ai["findings"][0]["label"] == "hemorrhage", ai
    assert got["admin_ai"][1]["findings"][0]["decision"] == "ACCEPT"
    assert got["after_sign"][0] == 409
    row = got["row"]
    assert (row["status"], row["assigned_reader"]) == ("SIGNED", "dr-neuro-nv"), row
    assert row["reader_decisions"] == ["hemorrhage: ACCEPT"] and row["opened_at"] <= row["signed_at"]
    assert {"opened", "signed"} <= got["stages"]
    assert [(a, f) for a, f, _ in got["feedback"]] == [("CLAIM", None), ("OPEN", None), ("ACCEPT", "hemorrhage"),
                                                       ("SIGN", None)]
    trail = [(actor, action) for actor, action, _, _ in got["audit"]]
    for expected in [("anonymous", "unauthenticated"), ("dr-elsewhere", "ai-output-denied"),
                     ("qa-analyst", "ai-output-denied"), ("dr-elsewhere", "access-denied"),
                     ("dr-neuro-nv", "reader-action-refused"), ("dr-neuro-nv", "reader-claim"),
                     ("dr-neuro-nv", "ai-output-viewed"), ("dr-neuro-nv", "reader-accept"),
                     ("dr-neuro-nv", "reader-sign"), ("ops", "ai-output-viewed")]:
        assert expected in trail, (expected, trail)
    denied = next(detail for actor, action, _, detail in got["audit"] if action == "ai-output-denied")
    assert denied["status"] == "403"
    traced = {trace for actor, action, trace, _ in got["audit"] if action != "unauthenticated"}
    assert traced == {row["trace_id"]}  # every audited access carries the study's trace_id
