"""The reports over the warehouse's materialized views, against a warehouse loaded with known
rows through the sink's own insert path, every batch delivered twice: exact figures, worked
out by hand in the comments, that a re-delivery does not change."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from adapters.warehouse import apply_ddl, connect
from radstream.cli import cli
from radstream.reports import ReportRequestError, parse_instant, run_report
from schemas.settings import Settings
from streams.sink import group_rows, insert_rows
from test_sink_warehouse import warehouse  # noqa: F401  (the fixture: the embedded warehouse with its DDL)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stage(study_uid: str, name: str, started: float, finished: float, site: str = "") -> tuple[str, dict]:
    return "stage_events", {"study_uid": study_uid, "version": 1, "trace_id": f"t-{study_uid}", "stage": name,
                            "source_site": site, "started_at": at(started), "finished_at": at(finished),
                            "detail": {}}


def worklist(study_uid: str, *, site: str, modality: str, priority: str, subspecialty: str, received: float,
             routed: float, updated: float, status: str = "UNREAD", reader: str | None = None,
             sla_deadline: datetime | None = None) -> tuple[str, dict]:
    return "worklist", {
        "study_uid": study_uid, "version": 1, "trace_id": f"t-{study_uid}", "modality": modality,
        "modalities": [modality], "priority": priority, "subspecialty": subspecialty, "source_site": site,
        "instance_count": 1, "status": status, "reasons": [], "received_at": at(received),
        "assembled_at": at(routed - 1), "routed_at": at(routed), "assigned_reader": reader,
        "assigned_at": at(updated) if reader else None, "sla_deadline": sla_deadline, "updated_at": at(updated),
        "row_version": (1 << 42) + int(at(updated).timestamp() * 1000)}


def link(study_uid: str, deid_study_uid: str, site: str, linked: float) -> tuple[str, dict]:
    return "study_links", {"study_uid": study_uid, "version": 1, "deid_study_uid": deid_study_uid,
                           "trace_id": f"t-{study_uid}", "deid_trace_id": f"d-{study_uid}",
                           "patient_pseudonym": "P", "source_site": site, "linked_at": at(linked)}


def model_run(deid_study_uid: str, model: str, model_version: str, *, inferred: float, latency_ms: float,
              label: str | None = None, score: float = 0.0, status: str = "OK") -> tuple[str, dict]:
    return "inference_results", {
        "study_uid": deid_study_uid, "version": 1, "trace_id": f"d-{deid_study_uid}", "status": status,
        "model": model, "model_version": model_version, "model_sha256": "0" * 64, "backend": "onnxruntime-cpu",
        "model_status": status, "silent": False, "images": 1, "labels": [label] if label else [],
        "scores": [score] if label else [], "thresholds": [0.5] if label else [],
        "findings": [label] if label and score >= 0.5 else [], "level": 2, "queued_ms": 0.0, "decode_ms": 0.0,
        "infer_ms": latency_ms, "latency_ms": latency_ms, "reason": None, "inferred_at": at(inferred)}


# S1: CT at SITE_A, CRITICAL, assigned to dr_a with a deadline 30 min after receipt.
# S2: CR at SITE_B, ROUTINE, assigned to dr_b. S3: MR at SITE_A, URGENT, on nobody's list.
# S4: CR at SITE_B, ROUTINE, dr_b, signed at 40 min (the row the reading loop will write).
STUDIES = [
    stage("S1", "received", 0, 10, "SITE_A"), stage("S1", "assembled", 10, 15, "SITE_A"),
    stage("S1", "deidentified", 17, 17, "SITE_A"), stage("S1", "routed", 18, 18),
    stage("S2", "received", 60, 61, "SITE_B"), stage("S2", "assembled", 61, 66, "SITE_B"),
    stage("S2", "deidentified", 70, 70, "SITE_B"), stage("S2", "routed", 72, 72),
    stage("S3", "received", 120, 150, "SITE_A"), stage("S3", "assembled", 150, 160, "SITE_A"),
    stage("S3", "deidentified", 162, 162, "SITE_A"), stage("S3", "routed", 163, 163),
    worklist("S1", site="SITE_A", modality="CT", priority="CRITICAL", subspecialty="neuro", received=0, routed=18,
             updated=18),
    worklist("S1", site="SITE_A", modality="CT", priority="CRITICAL", subspecialty="neuro", received=0, routed=18,
             updated=20, reader="dr_a", sla_deadline=at(30 * 60)),
    worklist("S2", site="SITE_B", modality="CR", priority="ROUTINE", subspecialty="chest", received=60, routed=72,
             updated=73, reader="dr_b", sla_deadline=at(60 + 4 * 3600)),
    worklist("S3", site="SITE_A", modality="MR", priority="URGENT", subspecialty="neuro", received=120,
             routed=163, updated=163),
    worklist("S4", site="SITE_B", modality="CR", priority="ROUTINE", subspecialty="chest", received=600,
             routed=605, updated=605, reader="dr_b", sla_deadline=at(600 + 4 * 3600)),
    worklist("S4", site="SITE_B", modality="CR", priority="ROUTINE", subspecialty="chest", received=600,
             routed=605, updated=40 * 60, status="SIGNED", reader="dr_b", sla_deadline=at(600 + 4 * 3600)),
    link("S1", "2.25.1", "SITE_A", 17), link("S2", "2.25.2", "SITE_B", 70), link("S3", "2.25.3", "SITE_A", 162),
    link("S5", "2.25.5", "SITE_A", 86400),
]
# links first: the AI stage finds its study through them as it is inserted (as in the pipeline)
AI_RUNS = [
    model_run("2.25.1", "ich-ct", "1.0", inferred=25, latency_ms=5000, label="ich", score=0.8),
    model_run("2.25.3", "ich-ct", "1.0", inferred=170, latency_ms=3000, label="ich", score=0.2),
    model_run("2.25.2", "ptx-cr", "2.0", inferred=75, latency_ms=1000, label="ptx", score=0.6),
    model_run("2.25.9", "ich-ct", "1.0", inferred=200, latency_ms=10000, status="ERROR"),  # no link
    model_run("2.25.5", "ich-ct", "1.0", inferred=86400 + 60, latency_ms=4000, label="ich", score=0.4),  # day 2
]


@pytest.fixture
def loaded(warehouse: Settings) -> Settings:
    client = connect(warehouse)
    try:
        for batch in (STUDIES, AI_RUNS):
            insert_rows(client, group_rows(batch))
            insert_rows(client, group_rows(batch))  # every batch re-delivered
    finally:
        client.close()
    return warehouse


def figures(report, *columns: str) -> list[tuple]:
    return [tuple(row[c] for c in columns) for row in report.as_dicts()]


def test_stage_latencies_are_each_stage_from_the_one_it_waits_on_and_from_receipt(loaded: Settings) -> None:
    report = run_report(loaded, "turnaround", since=T0, until=at(7200))
    # received: first to last instance: S1 10 s, S2 1 s, S3 30 s -> p50 10, p95 30 (same since receipt)
    # assembled after the last instance: 5, 5, 10; since receipt: 15, 6, 40
    # deidentified after assembly: 2, 4, 2; since receipt: 17, 10, 42
    # routed after de-identification: 1, 2, 1; since receipt: 18, 12, 43
    # ai: from leaving de-identification (the link's real time) for its own latency_ms -- inferred_at is
    # on the shifted clock and never used: 5, 1, 3; since receipt: 22 (17+5), 11 (70+1-60), 45 (162+3-120)
    assert figures(report, "stage", "studies", "p50_s", "p95_s", "since_receipt_p50_s", "since_receipt_p95_s") == [
        ("received", 3, 10, 30, 10, 30),
        ("assembled", 3, 5, 10, 15, 40),
        ("deidentified", 3, 2, 4, 17, 42),
        ("routed", 3, 1, 2, 18, 43),
        ("ai", 3, 3, 5, 22, 45),
    ]


def test_the_ai_stage_is_timed_on_the_real_clock_whether_its_link_comes_before_or_after_it(
        warehouse: Settings) -> None:
    """inferred_at is the de-identified zone's shifted clock (here a year off); the stage is timed from
    the link's real time, and a run whose link reaches the warehouse after it is counted all the same."""
    shifted = -365 * 86400
    client = connect(warehouse)
    try:
        insert_rows(client, group_rows([model_run("2.25.7", "ich-ct", "1.0", inferred=shifted, latency_ms=4000)]))
        insert_rows(client, group_rows([link("S7", "2.25.7", "SITE_A", 100)]))  # the link after the run
        insert_rows(client, group_rows([link("S8", "2.25.8", "SITE_A", 200)]))
        insert_rows(client, group_rows([model_run("2.25.8", "ich-ct", "1.0", inferred=shifted, latency_ms=2000)]))
        rows = client.query("SELECT study_uid, min(first_started_at), min(first_finished_at) FROM stage_times "
                            "WHERE stage = 'ai' GROUP BY study_uid ORDER BY study_uid").result_rows
    finally:
        client.close()
    assert [(uid, started.replace(tzinfo=UTC), finished.replace(tzinfo=UTC)) for uid, started, finished in rows] == [
        ("S7", at(100), at(104)), ("S8", at(200), at(202))]


def test_turnaround_by_site_groups_studies_by_their_site(loaded: Settings) -> None:
    report = run_report(loaded, "turnaround", since=T0, until=at(7200), by="site")
    assert report.columns[0] == "site"
    # SITE_A: S1 and S3 (assembled 5 and 10 s after their last instance: exact p50 of two is the upper);
    # SITE_B: S2 alone
    assembled = [r for r in report.as_dicts() if r["stage"] == "assembled"]
    assert [(r["site"], r["studies"], r["p50_s"]) for r in assembled] == [("SITE_A", 2, 10), ("SITE_B", 1, 5)]


def test_sla_compliance_by_priority_counts_each_study_once(loaded: Settings) -> None:
    report = run_report(loaded, "sla", since=T0, until=at(7200), by="priority")
    # at 2 h: S1 (CRITICAL) past its assigned 30 min deadline, S3 (URGENT, no assignment) past
    # receipt + 60 min, S2 (ROUTINE) within receipt + 4 h, S4 signed at 40 min, deadline 4 h 10 min
    assert figures(report, "priority", "studies", "signed_on_time", "signed_late", "open_overdue", "open_in_time",
                   "compliance_pct") == [
        ("CRITICAL", 1, 0, 0, 1, 0, 0.0),
        ("ROUTINE", 2, 1, 0, 0, 1, 100.0),
        ("URGENT", 1, 0, 0, 1, 0, 0.0),
    ]
    overall = run_report(loaded, "sla", since=T0, until=at(7200))
    assert "priority" not in overall.columns
    # 1 on time of 3 whose outcome is known (S4 signed, S1 and S3 overdue)
    assert figures(overall, "studies", "signed_on_time", "open_overdue", "compliance_pct") == [(4, 1, 2, 33.3)]


def test_backlog_is_each_readers_open_list_at_each_step(loaded: Settings) -> None:
    report = run_report(loaded, "backlog", since=T0, until=at(7200), step=timedelta(minutes=30))
    rows = {(r["at"].replace(tzinfo=UTC), r["reader"]): (r["open"], r["overdue"]) for r in report.as_dicts()}
    # at 30 min: dr_a has S1 (deadline exactly then: not yet overdue), dr_b S2 and S4 (signed at
    # 40 min), S3 is on nobody's list; at 1 h S4 is signed and S1 overdue
    assert {k: v for k, v in rows.items() if k[0] == at(1800)} == {
        (at(1800), "dr_a"): (1, 0), (at(1800), "dr_b"): (2, 0), (at(1800), "(unassigned)"): (1, 0)}
    assert {k: v for k, v in rows.items() if k[0] == at(3600)} == {
        (at(3600), "dr_a"): (1, 1), (at(3600), "dr_b"): (1, 0), (at(3600), "(unassigned)"): (1, 0)}
    assert sorted({k[0] for k in rows}) == [at(1800), at(3600), at(5400), at(7200)]


def test_ai_monitoring_counts_distinct_runs_and_shows_score_drift(loaded: Settings) -> None:
    report = run_report(loaded, "ai", since=T0, until=at(2 * 86400))
    # day 1 at SITE_A: S1 0.8 (flagged at threshold 0.5) and S3 0.2: mean 0.5; day 2: 0.4;
    # the mean over both days 0.45, so the shift is +0.05 then -0.05; the run with no link (an
    # engine error) is not counted until its link comes: its real day and site are not known yet
    assert figures(report, "day", "model", "site", "label", "runs", "ok", "flagged", "score_p50", "score_mean",
                   "mean_shift", "latency_p50_ms", "latency_p95_ms") == [
        (T0.date(), "ich-ct", "SITE_A", "ich", 2, 2, 1, 0.8, 0.5, 0.05, 5000.0, 5000.0),
        (T0.date(), "ptx-cr", "SITE_B", "ptx", 1, 1, 1, 0.6, 0.6, 0.0, 1000.0, 1000.0),
        (T0.date() + timedelta(days=1), "ich-ct", "SITE_A", "ich", 1, 1, 0, 0.4, 0.4, -0.05, 4000.0, 4000.0),
    ]


def test_the_raw_tables_hold_the_duplicates_the_reports_do_not_count(loaded: Settings) -> None:
    client = connect(loaded)
    try:
        raw = client.query("SELECT count() FROM inference_results").result_rows[0][0]
    finally:
        client.close()
    assert raw in (len(AI_RUNS), 2 * len(AI_RUNS))  # a merge may already have collapsed them
    runs = sum(r["runs"] for r in run_report(loaded, "ai", since=T0, until=at(2 * 86400)).as_dicts())
    assert runs == len(AI_RUNS) - 1  # each linked run once; 2.25.9 has no link yet


def test_ai_monitoring_counts_each_run_on_its_real_day_and_site_whether_its_link_comes_before_or_after_it(
        warehouse: Settings) -> None:
    """AI monitoring buckets a run by the real day of its study's link, not by inferred_at (the
    de-identified zone's clock, here a year off): a day taken from it would put the run a year
    away. A run whose link comes after it is counted then, once, under its site."""
    shifted = -365 * 86400
    late = [model_run("2.25.7", "ich-ct", "1.0", inferred=shifted, latency_ms=4000, label="ich", score=0.7)]
    early = [model_run("2.25.8", "ich-ct", "1.0", inferred=shifted, latency_ms=2000, label="ich", score=0.3)]
    client = connect(warehouse)
    try:
        for batch in (late, [link("S7", "2.25.7", "SITE_A", 100)], [link("S8", "2.25.8", "SITE_B", 200)], early):
            insert_rows(client, group_rows(batch))
            insert_rows(client, group_rows(batch))  # every batch re-delivered
    finally:
        client.close()
    report = run_report(warehouse, "ai", since=T0, until=at(86400))
    assert figures(report, "day", "model", "site", "label", "runs", "flagged", "score_p50", "latency_p50_ms") == [
        (T0.date(), "ich-ct", "SITE_A", "ich", 1, 1, 0.7, 4000.0),
        (T0.date(), "ich-ct", "SITE_B", "ich", 1, 0, 0.3, 2000.0),
    ]
    a_year_before = run_report(warehouse, "ai", since=at(shifted - 86400), until=at(shifted + 86400))
    assert a_year_before.as_dicts() == []


def test_a_request_a_report_cannot_answer_is_refused_with_the_reason(loaded: Settings) -> None:
    with pytest.raises(ReportRequestError, match="grouping is fixed"):
        run_report(loaded, "discrepancies", since=T0, until=at(60), by="reader")
    with pytest.raises(ReportRequestError, match="cannot be grouped by hour; it offers day, site"):
        run_report(loaded, "ai", since=T0, until=at(60), by="hour")
    assert parse_instant("2h", at(7200)) == T0 and parse_instant("2026-11-30T08:00", at(0)) == T0
    with pytest.raises(ReportRequestError, match="neither a duration"):
        parse_instant("yesterday", T0)


def test_the_report_command_prints_table_csv_and_json(loaded: Settings) -> None:
    runner = CliRunner()
    env = loaded.to_env()
    window = ["--since", T0.isoformat(), "--until", at(7200).isoformat()]
    as_csv = runner.invoke(cli, ["report", "sla", "--by", "priority", "--format", "csv", *window], env=env)
    assert as_csv.exit_code == 0, as_csv.output
    lines = list(csv.reader(io.StringIO(as_csv.output)))
    assert lines[0][:2] == ["priority", "studies"] and [line[:2] for line in lines[1:]] == [
        ["CRITICAL", "1"], ["ROUTINE", "2"], ["URGENT", "1"]]
    as_json = runner.invoke(cli, ["report", "backlog", "--every", "1h", "--format", "json", *window], env=env)
    assert as_json.exit_code == 0, as_json.output
    depth = {(row["at"][11:16], row["reader"]): row["open"] for row in json.loads(as_json.output)}
    assert depth == {("09:00", "dr_a"): 1, ("09:00", "dr_b"): 1, ("09:00", "(unassigned)"): 1,
                     ("10:00", "dr_a"): 1, ("10:00", "dr_b"): 1, ("10:00", "(unassigned)"): 1}
    table = runner.invoke(cli, ["report", "turnaround", "--by", "modality", *window], env=env)
    assert table.exit_code == 0, table.output
    assert "Stage latencies" in table.output and all(m in table.output for m in ("CT", "CR", "MR", "deidentified"))
    none = runner.invoke(cli, ["report", "discrepancies", "--format", "json", *window], env=env)
    assert none.exit_code == 0 and json.loads(none.output) == []  # no reader has decided anything here
    bad = runner.invoke(cli, ["report", "ai", "--by", "hour", *window], env=env)
    assert bad.exit_code == 2 and "cannot be grouped by hour" in bad.output


def test_a_warehouse_from_before_the_views_gets_its_history_at_the_next_start(loaded: Settings) -> None:
    reports = {name: run_report(loaded, name, since=T0, until=at(2 * 86400)).rows
               for name in ("turnaround", "sla", "backlog", "ai")}
    client = connect(loaded)
    try:
        for table in ("stage_times", "study_facts", "worklist_changes", "ai_daily"):
            client.command(f"TRUNCATE TABLE {table}")
    finally:
        client.close()
    assert run_report(loaded, "turnaround", since=T0, until=at(2 * 86400)).rows == []
    apply_ddl(loaded)  # the backfills run where the aggregate tables are empty
    apply_ddl(loaded)  # a second start finds them filled: the figures stay the same
    assert {name: run_report(loaded, name, since=T0, until=at(2 * 86400)).rows for name in reports} == reports
