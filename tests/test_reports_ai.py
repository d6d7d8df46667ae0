"""AI monitoring from the readers' decisions and the discrepancy list, against a warehouse loaded
through the sink's own insert path with known studies, model runs, critical alerts and reader
actions, every batch delivered twice and one decision re-delivered on its own: exact figures,
worked out by hand in the comments, that no re-delivery changes.

The window is 2 and 3 December (since 2 Dec 00:00, until 4 Dec 00:00); the window before it,
for score drift, is 30 November and 1 December.

    study  site    mod  run (day, model, score)    critical  decisions (day)                   signed
    A1     SITE_A  CT   2 Dec ich-ct 1.0 ich 0.9   yes       dr_a ACCEPT (2 Dec)               dr_a 2 Dec
    A2     SITE_A  CT   2 Dec ich-ct 1.0 ich 0.7   yes       dr_a REJECT (2 Dec, sent 3 times) dr_a 2 Dec
                        (on the GPU backend)
    A3     SITE_A  CT   3 Dec ich-ct 1.0 ich 0.8   yes       dr_a ACCEPT, then REJECT (3 Dec)  dr_b 3 Dec
                                                             (dr_a released it, dr_b signed)
    B1     SITE_B  CT   3 Dec ich-ct 1.0 ich 0.6   yes       dr_b MODIFY -> subdural (3 Dec)   dr_b 3 Dec
    B2     SITE_B  CR   2 Dec ptx-cr 2.0 ptx 0.55  no        dr_b REJECT (3 Dec)               not yet
    P1     SITE_A  CT   30 Nov ich-ct 1.0 ich 0.5  -         -                                 -
    P2     SITE_A  CT   1 Dec ich-ct 1.0 ich 0.6   yes       dr_a REJECT (1 Dec)               dr_a 1 Dec
    P3     SITE_B  CT   1 Dec ich-ct 1.0 ich 0.4   -         -                                 -
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from adapters.warehouse import apply_ddl, connect
from radstream.cli import cli
from radstream.reports import ReportRequestError, run_report
from schemas.events import Alert, Priority, ReaderFeedback, ReadingAction
from schemas.settings import Settings
from streams.sink import group_rows, insert_rows
from streams.sink_rows import rows_for
from test_sink_warehouse import warehouse  # noqa: F401  (the fixture: the embedded warehouse with its DDL)

pytestmark = pytest.mark.integration

MIDNIGHT = datetime(2026, 11, 30, tzinfo=UTC)
SINCE, UNTIL = MIDNIGHT + timedelta(days=2), MIDNIGHT + timedelta(days=4)


def on(day: int, hour: float) -> datetime:
    """``hour`` o'clock on 30 November + ``day`` days."""
    return MIDNIGHT + timedelta(days=day, hours=hour)


STUDIES = {  # study: site, modality, day and hour of receipt, deid UID
    "A1": ("SITE_A", "CT", 2, 8), "A2": ("SITE_A", "CT", 2, 9), "A3": ("SITE_A", "CT", 3, 8),
    "B1": ("SITE_B", "CT", 3, 9), "B2": ("SITE_B", "CR", 2, 10),
    "P1": ("SITE_A", "CT", 0, 8), "P2": ("SITE_A", "CT", 1, 8), "P3": ("SITE_B", "CT", 1, 9),
}


def deid(study_uid: str) -> str:
    return f"2.25.{ord(study_uid[0])}{study_uid[1]}"


def worklist(study_uid: str, *, updated: datetime, reader: str, status: str = "IN_PROGRESS") -> tuple[str, dict]:
    site, modality, day, hour = STUDIES[study_uid]
    received = on(day, hour)
    return "worklist", {
        "study_uid": study_uid, "version": 1, "trace_id": f"t-{study_uid}", "modality": modality,
        "modalities": [modality], "priority": "CRITICAL" if modality == "CT" else "ROUTINE",
        "subspecialty": "neuro" if modality == "CT" else "chest", "source_site": site, "instance_count": 1,
        "status": status, "reasons": [], "received_at": received, "assembled_at": received + timedelta(seconds=5),
        "routed_at": received + timedelta(seconds=6), "assigned_reader": reader, "assigned_at": received,
        "updated_at": updated, "signed_at": updated if status == "SIGNED" else None,
        "row_version": (1 << 42) + int(updated.timestamp() * 1000)}


def link(study_uid: str) -> tuple[str, dict]:
    site, _, day, hour = STUDIES[study_uid]
    return "study_links", {"study_uid": study_uid, "version": 1, "deid_study_uid": deid(study_uid),
                           "trace_id": f"t-{study_uid}", "deid_trace_id": f"d-{study_uid}",
                           "patient_pseudonym": "P", "source_site": site,
                           "linked_at": on(day, hour) + timedelta(seconds=8)}


def model_run(study_uid: str, label: str, score: float, backend: str = "onnxruntime-cpu") -> tuple[str, dict]:
    model, model_version = ("ich-ct", "1.0") if label == "ich" else ("ptx-cr", "2.0")
    _, _, day, hour = STUDIES[study_uid]
    return "inference_results", {
        "study_uid": deid(study_uid), "version": 1, "trace_id": f"d-{study_uid}", "status": "OK", "model": model,
        "model_version": model_version, "model_sha256": "0" * 64, "backend": backend, "model_status": "OK",
        "silent": False, "images": 1, "labels": [label], "scores": [score], "thresholds": [0.5],
        "findings": [label] if score >= 0.5 else [], "level": 1, "queued_ms": 0.0, "decode_ms": 0.0,
        "infer_ms": 900.0, "latency_ms": 1000.0, "reason": None, "inferred_at": on(day, hour) + timedelta(seconds=20)}


def critical_alert(study_uid: str, finding: str = "ich") -> list[tuple[str, dict]]:
    _, _, day, hour = STUDIES[study_uid]
    raised = on(day, hour) + timedelta(seconds=21)
    return rows_for(Alert(trace_id=f"t-{study_uid}", study_uid=study_uid, version=1, alert_type="critical-finding",
                          severity=Priority.CRITICAL, message=f"AI critical finding {finding}", raised_at=raised,
                          ack_deadline=raised + timedelta(minutes=15), finding=finding))


def decision(feedback_id: str, study_uid: str, action: ReadingAction, at: datetime, reader: str, *, finding: str,
             score: float, modified_to: str | None = None, comment: str | None = None) -> list[tuple[str, dict]]:
    model = "ich-ct 1.0" if finding == "ich" else "ptx-cr 2.0"
    return rows_for(ReaderFeedback(
        feedback_id=feedback_id, trace_id=f"t-{study_uid}", study_uid=study_uid, version=1, reader_id=reader,
        action=action, at=at, source_site=STUDIES[study_uid][0], finding=finding, model=model, score=score,
        modified_to=modified_to, comment=comment))


def sign(feedback_id: str, study_uid: str, at: datetime, reader: str) -> list[tuple[str, dict]]:
    return rows_for(ReaderFeedback(
        feedback_id=feedback_id, trace_id=f"t-{study_uid}", study_uid=study_uid, version=1, reader_id=reader,
        action=ReadingAction.SIGN, at=at, source_site=STUDIES[study_uid][0], report_text="signed report"))


ACCEPT, REJECT, MODIFY = ReadingAction.ACCEPT, ReadingAction.REJECT, ReadingAction.MODIFY

WORKLIST = [
    worklist("A1", updated=on(2, 11), reader="dr_a", status="SIGNED"),
    worklist("A2", updated=on(2, 12), reader="dr_a", status="SIGNED"),
    worklist("A3", updated=on(3, 10), reader="dr_a"), worklist("A3", updated=on(3, 14), reader="dr_b", status="SIGNED"),
    worklist("B1", updated=on(3, 12), reader="dr_b", status="SIGNED"),
    worklist("B2", updated=on(3, 9), reader="dr_b"),
    worklist("P1", updated=on(0, 9), reader="dr_a"),
    worklist("P2", updated=on(1, 10), reader="dr_a", status="SIGNED"),
    worklist("P3", updated=on(1, 10), reader="dr_b"),
    *(link(study) for study in STUDIES),
]
AI = [
    model_run("A1", "ich", 0.9), model_run("A2", "ich", 0.7, backend="onnxruntime-cuda"), model_run("A3", "ich", 0.8),
    model_run("B1", "ich", 0.6), model_run("B2", "ptx", 0.55),
    model_run("P1", "ich", 0.5), model_run("P2", "ich", 0.6), model_run("P3", "ich", 0.4),
    *(row for study in ("A1", "A2", "A3", "B1", "P2") for row in critical_alert(study)),
]
A2_REJECTED = decision("f-a2", "A2", REJECT, on(2, 11.5), "dr_a", finding="ich", score=0.7, comment="calcification")
READING = [
    *decision("f-a1", "A1", ACCEPT, on(2, 10.5), "dr_a", finding="ich", score=0.9),
    *sign("s-a1", "A1", on(2, 11), "dr_a"),
    *A2_REJECTED, *sign("s-a2", "A2", on(2, 12), "dr_a"),
    *decision("f-a3-1", "A3", ACCEPT, on(3, 9), "dr_a", finding="ich", score=0.8),
    *decision("f-a3-2", "A3", REJECT, on(3, 9.5), "dr_a", finding="ich", score=0.8, comment="motion artefact"),
    *sign("s-a3", "A3", on(3, 14), "dr_b"),
    *decision("f-b1", "B1", MODIFY, on(3, 11), "dr_b", finding="ich", score=0.6, modified_to="subdural haematoma"),
    *sign("s-b1", "B1", on(3, 12), "dr_b"),
    *decision("f-b2", "B2", REJECT, on(3, 9), "dr_b", finding="ptx", score=0.55),
    *decision("f-p2", "P2", REJECT, on(1, 9.5), "dr_a", finding="ich", score=0.6),
    *sign("s-p2", "P2", on(1, 10), "dr_a"),
]


@pytest.fixture
def loaded(warehouse: Settings) -> Settings:
    client = connect(warehouse)
    try:
        for batch in (WORKLIST, AI, READING):
            insert_rows(client, group_rows(batch))
            insert_rows(client, group_rows(batch))  # every batch re-delivered
        insert_rows(client, group_rows(A2_REJECTED))  # and A2's rejection once more, on its own
    finally:
        client.close()
    return warehouse


def figures(report, *columns: str) -> list[tuple]:
    return [tuple(row[c] for c in columns) for row in report.as_dicts()]


def test_agreement_drift_and_false_positive_burden_per_model_version_and_site(loaded: Settings) -> None:
    report = run_report(loaded, "ai", since=SINCE, until=UNTIL, by="site")
    assert report.columns[:4] == ["model", "model_version", "label", "site"]
    # ich at SITE_A: A1 0.9, A2 0.7, A3 0.8 -> mean and p50 0.8; the two days before, P1 0.5 and
    # P2 0.6 -> 0.55, a change of +0.25. Decided in the window: A1 accepted, A2 rejected (three
    # deliveries, one finding), A3 accepted then rejected (the last word counts): 1 of 3, 33.3 %;
    # A2 and A3 had critical alerts: 2 critical findings rejected in 2 days, 1 a day (P2's
    # rejection on 1 December is before the window).
    # ich at SITE_B: B1 0.6 against P3 0.4 (+0.2); modified, so no agreement.
    # ptx at SITE_B: B2 0.55, no run before; rejected, but no critical alert was raised for it.
    assert figures(report, "model", "model_version", "label", "site", "scored", "score_mean", "score_p50",
                   "prev_score_mean", "score_mean_change", "decided", "accepted", "rejected", "modified",
                   "agreement_pct", "critical_rejected", "critical_rejected_per_day") == [
        ("ich-ct", "1.0", "ich", "SITE_A", 3, 0.8, 0.8, 0.55, 0.25, 3, 1, 2, 0, 33.3, 2, 1.0),
        ("ich-ct", "1.0", "ich", "SITE_B", 1, 0.6, 0.6, 0.4, 0.2, 1, 0, 0, 1, 0.0, 0, 0.0),
        ("ptx-cr", "2.0", "ptx", "SITE_B", 1, 0.55, 0.55, None, None, 1, 0, 1, 0, 0.0, 0, 0.0),
    ]



def test_one_day_drifts_against_the_day_before_and_counts_decisions_on_older_runs(loaded: Settings) -> None:
    report = run_report(loaded, "ai", since=on(3, 0), until=on(4, 0), by="site")
    # 3 December against 2 December: ich at SITE_A 0.8 (A3) against 0.8 (A1, A2), no change; at
    # SITE_B 0.6 (B1) with no run the day before. B2's ptx run was on 2 December, its rejection on
    # the 3rd: decided that day, with no score of that day.
    assert figures(report, "label", "site", "scored", "score_mean", "prev_score_mean", "score_mean_change",
                   "decided", "rejected", "modified", "agreement_pct", "critical_rejected",
                   "critical_rejected_per_day") == [
        ("ich", "SITE_A", 1, 0.8, 0.8, 0.0, 1, 1, 0, 0.0, 1, 1.0),
        ("ich", "SITE_B", 1, 0.6, None, None, 1, 0, 1, 0.0, 0, 0.0),
        ("ptx", "SITE_B", 0, None, None, None, 1, 1, 0, 0.0, 0, 0.0),
    ]

def test_agreement_by_modality_and_by_the_deciding_reader(loaded: Settings) -> None:
    by_modality = run_report(loaded, "ai", since=SINCE, until=UNTIL, by="modality")
    # ich on CT: 0.9, 0.7, 0.8, 0.6 -> mean 0.75, exact p50 of four the upper middle 0.8; before:
    # 0.5, 0.6, 0.4 -> 0.5. Decided 4: 1 accepted, 2 rejected (both critical), 1 modified.
    assert figures(by_modality, "label", "modality", "scored", "score_mean", "score_p50", "score_mean_change",
                   "decided", "accepted", "rejected", "modified", "agreement_pct", "critical_rejected") == [
        ("ich", "CT", 4, 0.75, 0.8, 0.25, 4, 1, 2, 1, 25.0, 2),
        ("ptx", "CR", 1, 0.55, 0.55, None, 1, 0, 1, 0, 0.0, 0),
    ]
    by_reader = run_report(loaded, "ai", since=SINCE, until=UNTIL, by="reader")
    # decisions by who took them (dr_a decided A3 before releasing it to dr_b); scores by the
    # study's reader: dr_a A1, A2 (0.8) against P1, P2; dr_b A3, B1 (0.7) against P3
    assert figures(by_reader, "label", "reader", "scored", "score_mean", "prev_score_mean", "decided", "accepted",
                   "rejected", "modified", "critical_rejected") == [
        ("ich", "dr_a", 2, 0.8, 0.55, 3, 1, 2, 0, 2),
        ("ich", "dr_b", 2, 0.7, 0.4, 1, 0, 0, 1, 0),
        ("ptx", "dr_b", 1, 0.55, None, 1, 0, 1, 0, 0),
    ]


def test_the_daily_report_shows_each_days_decisions_beside_that_days_runs(loaded: Settings) -> None:
    report = run_report(loaded, "ai", since=SINCE, until=UNTIL)
    assert report.title.startswith("AI monitoring per day")
    dec2, dec3 = on(2, 0).date(), on(3, 0).date()
    # 2 Dec at SITE_A: A1 on the CPU, A2 on the GPU; their two decisions are the model version's,
    # shown on the first backend's row. B2's run was on 2 Dec, its rejection on 3 Dec: a row of
    # its own with no run. A3's rejection is that day's critical false positive at SITE_A.
    assert figures(report, "day", "model_version", "backend", "site", "label", "runs", "score_mean", "decided",
                   "agreement_pct", "critical_rejected") == [
        (dec2, "1.0", "onnxruntime-cpu", "SITE_A", "ich", 1, 0.9, 2, 50.0, 1),
        (dec2, "1.0", "onnxruntime-cuda", "SITE_A", "ich", 1, 0.7, 0, None, 0),
        (dec2, "2.0", "onnxruntime-cpu", "SITE_B", "ptx", 1, 0.55, 0, None, 0),
        (dec3, "1.0", "onnxruntime-cpu", "SITE_A", "ich", 1, 0.8, 1, 0.0, 1),
        (dec3, "1.0", "onnxruntime-cpu", "SITE_B", "ich", 1, 0.6, 1, 0.0, 0),
        (dec3, "2.0", "", "SITE_B", "ptx", 0, None, 1, 0.0, 0),
    ]


def test_discrepancies_list_the_signed_reads_that_rejected_or_modified_an_ai_finding(loaded: Settings) -> None:
    report = run_report(loaded, "discrepancies", since=SINCE, until=UNTIL)
    # A1 was accepted; B2 is not signed yet; P2 was signed before the window. A3's last word is
    # dr_a's rejection, carried into the read dr_b signed.
    assert figures(report, "study_uid", "site", "modality", "model", "model_version", "finding", "ai_score",
                   "critical", "reader_decision", "reader", "signed_by", "comment") == [
        ("A2", "SITE_A", "CT", "ich-ct", "1.0", "ich", 0.7, True, "REJECT", "dr_a", "dr_a", "calcification"),
        ("B1", "SITE_B", "CT", "ich-ct", "1.0", "ich", 0.6, True, "MODIFY -> subdural haematoma", "dr_b", "dr_b",
         None),
        ("A3", "SITE_A", "CT", "ich-ct", "1.0", "ich", 0.8, True, "REJECT", "dr_a", "dr_b", "motion artefact"),
    ]
    assert [row["signed_at"].replace(tzinfo=UTC) for row in report.as_dicts()] == [on(2, 12), on(3, 12), on(3, 14)]


def test_a_feedback_delivered_three_times_is_one_action_in_the_table_and_the_reports(loaded: Settings) -> None:
    client = connect(loaded)
    try:
        kept = client.query("SELECT count() FROM reader_feedback FINAL WHERE feedback_id = 'f-a2'").result_rows[0][0]
    finally:
        client.close()
    assert kept == 1  # delivered three times, one action
    site_a = run_report(loaded, "ai", since=SINCE, until=UNTIL, by="site").as_dicts()[0]
    assert (site_a["decided"], site_a["rejected"]) == (3, 2)


def test_the_report_command_prints_agreement_and_discrepancies(loaded: Settings) -> None:
    runner = CliRunner()
    env = loaded.to_env()
    window = ["--since", SINCE.isoformat(), "--until", UNTIL.isoformat()]
    as_json = runner.invoke(cli, ["report", "ai", "--by", "site", "--format", "json", *window], env=env)
    assert as_json.exit_code == 0, as_json.output
    assert [(row["site"], row["agreement_pct"], row["critical_rejected_per_day"])
            for row in json.loads(as_json.output)] == [("SITE_A", 33.3, 1.0), ("SITE_B", 0.0, 0.0),
                                                         ("SITE_B", 0.0, 0.0)]
    table = runner.invoke(cli, ["report", "discrepancies", *window], env=env)
    assert table.exit_code == 0, table.output
    assert "AI and the final read disagree" in table.output
    assert all(text in table.output for text in ("A2", "A3", "B1", "calcification", "MODIFY -> subdural"))
    fixed = runner.invoke(cli, ["report", "discrepancies", "--by", "site", *window], env=env)
    assert fixed.exit_code == 2 and "grouping is fixed" in fixed.output


def test_a_grouping_the_ai_report_does_not_offer_is_refused(loaded: Settings) -> None:
    with pytest.raises(ReportRequestError, match="offers day, site, modality"):
        run_report(loaded, "ai", since=SINCE, until=UNTIL, by="hour")


def test_a_warehouse_from_before_the_decisions_view_gets_them_at_the_next_start(loaded: Settings) -> None:
    reports = {by: run_report(loaded, "ai", since=SINCE, until=UNTIL, by=by).rows for by in ("day", "site")}
    discrepancies = run_report(loaded, "discrepancies", since=SINCE, until=UNTIL).rows
    client = connect(loaded)
    try:
        client.command("TRUNCATE TABLE ai_decisions")
    finally:
        client.close()
    assert run_report(loaded, "discrepancies", since=SINCE, until=UNTIL).rows == []
    apply_ddl(loaded)  # the backfill runs where ai_decisions is empty
    apply_ddl(loaded)  # a second start finds it filled: the figures stay the same
    assert {by: run_report(loaded, "ai", since=SINCE, until=UNTIL, by=by).rows for by in reports} == reports
    assert run_report(loaded, "discrepancies", since=SINCE, until=UNTIL).rows == discrepancies
