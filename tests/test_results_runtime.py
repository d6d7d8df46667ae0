"""Results out, whole runtime: a critical head CT's AI result reaches a PACS (Orthanc, as DICOM
SR), a RIS (the ``hl7`` package's MLLP server, as ORU^R01), an EHR (a FHIR endpoint that
validates what it gets) and a platform (a webhook receiver that checks the signature); a
reader's rejection of the finding amends all four, and the signature makes all four final.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import threading
from pathlib import Path

import highdicom as hd
import pytest
from click.testing import CliRunner
from pydicom import dcmread

from adapters.result_documents import validate_fhir, verify_webhook
from adapters.warehouse import connect, query_rows
from load.hl7_peer import MllpPeer
from load.orthanc_peer import start_orthanc
from radstream.cli import cli
from radstream.reading_cli import api_url
from schemas.settings import Settings
from tests.test_assignment_runtime import users_file
from tests.test_end_to_end import RULES, STORESCU, painted_head_ct, start_up, stop_up, storescu, wait_for_worklist

pytestmark = pytest.mark.integration
SECRET = "platform-secret"


class Receiver:
    """An HTTP endpoint that keeps what it accepts; ``check`` refuses a request (401/422) first."""

    def __init__(self, check) -> None:
        self.accepted: list[tuple[dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = check(dict(self.headers), body)
                if status == 200:
                    outer.accepted.append((dict(self.headers), json.loads(body)))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _signed(headers: dict, body: bytes) -> int:
    return 200 if verify_webhook(SECRET.encode(), body, headers["X-Radstream-Signature"], now=int(time.time())) else 401


def _valid_fhir(headers: dict, body: bytes) -> int:
    try:
        validate_fhir(json.loads(body))
    except ValueError:
        return 422
    return 200


def _until(condition, timeout_s: float, what):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what() if callable(what) else what}"
            return value
        time.sleep(0.5)


@pytest.mark.skipif(not shutil.which(STORESCU) or not Path("/usr/sbin/Orthanc").exists(),
                    reason="dcmtk and Orthanc are installed by scripts/bootstrap.sh")
def test_a_rejected_finding_amends_the_sr_the_oru_the_fhir_report_and_the_webhook(settings: Settings,
                                                                                  tmp_path: Path) -> None:
    orthanc = start_orthanc(tmp_path / "orthanc")
    ris = MllpPeer()
    ehr, platform = Receiver(_valid_fhir), Receiver(_signed)
    destinations = tmp_path / "destinations.toml"
    destinations.write_text(f"""
[destinations.pacs]
kind = "sr"
host = "127.0.0.1"
port = {orthanc.request("GET", "/system")["DicomPort"]}
called_ae = "ORTHANC"
[destinations.ris]
kind = "oru"
host = "127.0.0.1"
port = {ris.port}
[destinations.ehr]
kind = "fhir"
url = "{ehr.url}"
[destinations.platform]
kind = "webhook"
url = "{platform.url}"
secret = "{SECRET}"
""")
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    painted = painted_head_ct(tmp_path)
    ds = dcmread(painted)
    ds.AccessionNumber, ds.PatientID = "ACC-CRIT-1", "PID-CRIT-1"
    ds.save_as(painted, enforce_file_format=True)
    uid = str(ds.StudyInstanceUID)
    proc = start_up(settings, tmp_path, RADSTREAM_ROUTING_RULES_FILE=str(rules),
                    RADSTREAM_READING_USERS_FILE=str(users_file(tmp_path)),
                    RADSTREAM_RESULTS_DESTINATIONS_FILE=str(destinations),
                    RADSTREAM_RESULTS_BACKOFF_S="0.2", RADSTREAM_RESULTS_MAX_BACKOFF_S="1")
    try:
        sent = storescu(settings, [painted], calling_ae="SITE_A")
        assert sent.returncode == 0, sent.stderr
        wait_for_worklist(settings, 1, ai=True)

        def outputs(revision: int) -> dict[str, str]:
            rows = connect(settings).query(
                "SELECT destination, status FROM deliveries FINAL WHERE study_uid = {uid:String} "
                "AND revision = {revision:UInt32}", parameters={"uid": uid, "revision": revision}).result_rows
            return dict(rows)

        every = {"pacs": "ACKED", "ris": "ACKED", "ehr": "ACKED", "platform": "ACKED"}
        _until(lambda: outputs(1) == every, 120, lambda: f"revision 1 delivered: {outputs(1)}")
        alerts = connect(settings).query("SELECT severity, message FROM alerts WHERE study_uid = {uid:String}",
                                         parameters={"uid": uid}).result_rows
        assert alerts and alerts[0][0] == "CRITICAL" and "acknowledge by" in alerts[0][1]
        revisions = connect(settings).query("SELECT revision, status, changes FROM results FINAL "
                                            "WHERE study_uid = {uid:String} ORDER BY revision",
                                            parameters={"uid": uid}).result_rows
        assert [status for _, status, _ in revisions] == ["PRELIMINARY"], revisions  # nothing amended yet
        first_row = query_rows(settings, "current_worklist", limit=10)[0]
        assert "pacs r1 ACKED (1)" in first_row["deliveries"], first_row

        # the reader rejects the AI's finding: every output already sent is amended
        runner, env = CliRunner(), {"RADSTREAM_READING_TOKEN": "tok-neuro"}
        base = api_url(settings)
        for args in (["claim", uid], ["decide", uid, "hemorrhage", "reject", "--comment", "calcification"]):
            done = runner.invoke(cli, ["read", "--url", base, "--wait", "20", *args], env=env)
            assert done.exit_code == 0, done.output
        _until(lambda: outputs(2) == every, 60, lambda: f"revision 2 delivered: {outputs(2)}")

        def study_view() -> dict:
            return json.loads(runner.invoke(cli, ["read", "--url", base, "study", uid], env=env).output)

        # The deliveries and the results are two topics the sink writes apart: the delivered
        # rows of revision 2 can be in the warehouse a moment before its result row.
        _until(lambda: study_view()["result_status"] == "CORRECTED", 30,
               lambda: f"the study view at CORRECTED: {study_view()['result_status']}")
        assert "report_text" not in study_view()  # AI output: audited view only
        ai = json.loads(runner.invoke(cli, ["read", "--url", base, "ai", uid], env=env).output)
        assert ai["result_revision"] == 2 and "was not confirmed by the reader" in ai["report_text"]

        # ... and the signature (the draft, unedited) makes them final
        done = runner.invoke(cli, ["read", "--url", base, "--wait", "20", "sign", uid], env=env)
        assert done.exit_code == 0, done.output
        _until(lambda: outputs(3) == every, 60, lambda: f"revision 3 delivered: {outputs(3)}")

        srs = orthanc.request("GET", f"/studies/{orthanc.request('POST', '/tools/lookup', uid.encode())[0]['ID']}"
                                     f"/instances")
    finally:
        stop_up(proc)
        ris.stop()
        ehr.close()
        platform.close()

    try:
        # DICOM SR: three documents in the study's own Study Instance UID, each amending the one before
        raw = []
        for instance in srs:
            with urllib.request.urlopen(f"{orthanc.url}/instances/{instance['ID']}/file", timeout=10) as response:
                raw.append(response.read())
    finally:
        orthanc.stop()
    documents = [hd.sr.srread(io.BytesIO(data)) for data in raw if dcmread(io.BytesIO(data)).Modality == "SR"]
    assert len(documents) == 3 and all(d.StudyInstanceUID == uid for d in documents)
    successors = {d.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
                  .ReferencedSOPInstanceUID: d for d in documents if "PredecessorDocumentsSequence" in d}
    (preliminary,) = [d for d in documents if "PredecessorDocumentsSequence" not in d]
    corrected = successors[preliminary.SOPInstanceUID]
    final = successors[corrected.SOPInstanceUID]
    assert (preliminary.PreliminaryFlag, corrected.PreliminaryFlag) == ("PRELIMINARY", "PRELIMINARY")
    assert (final.PreliminaryFlag, final.VerificationFlag) == ("FINAL", "VERIFIED")
    assert [g.finding_type.meaning for g in preliminary.content.get_image_measurement_groups()] == ["Hemorrhage"]
    assert corrected.content.get_image_measurement_groups() == []  # rejected: stated absent, not reported

    # HL7 ORU^R01: P, then C with the finding deleted, then F
    assert [str(m.segment("OBR")(25)) for m in ris.received] == ["P", "C", "F"]
    assert "D" in [str(o(11)) for o in ris.received[1].segments("OBX")]
    assert all(str(m.segment("MSH")(9)) == "ORU^R01^ORU_R01" for m in ris.received)

    # FHIR: each bundle validated on arrival; the report preliminary, amended, final
    reports = [next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
               for _, bundle in ehr.accepted]
    assert [r["status"] for r in reports] == ["preliminary", "amended", "final"]
    observations = [e["resource"] for e in ehr.accepted[1][1]["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert [o["status"] for o in observations] == ["entered-in-error"]

    # webhooks: signed (the receiver checked), one per revision, idempotency keys distinct
    payloads = [body for _, body in platform.accepted]
    assert [p["type"] for p in payloads] == ["study.result.preliminary", "study.result.corrected",
                                             "study.result.final"]
    assert payloads[0]["urgent"] is True and payloads[1]["replaces"] == 1
    assert payloads[1]["findings"][0]["present"] is False
    assert len({headers["Idempotency-Key"] for headers, _ in platform.accepted}) == 3
