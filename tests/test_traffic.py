"""Synthetic traffic: the seeded plan, the studies made from real templates, and one small run
through a whole ``radstream up`` (DICOM, STOW-RS and HL7 gateways) read back from the warehouse."""

from __future__ import annotations

import io
import json
import statistics
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread, dcmwrite

from radstream.traffic import (
    DEFAULT_MIX,
    DiurnalClock,
    OrderTiming,
    PlanError,
    StudySizes,
    Transport,
    diurnal_factor,
    parse_mix,
    parse_rate,
    parse_sites,
    percentile,
    plan,
    quota,
)

SITES = parse_sites("SITE_A,SITE_B,SITE_C", stow_sites=["SITE_C"])


def five_thousand_an_hour(seed: int = 1, **kwargs):
    return plan(5000, 3600, DEFAULT_MIX, SITES, 0.1, 0.5, kwargs.pop("diurnal", False), seed, **kwargs)


# ---------------------------------------------------------------- the plan


def test_the_same_seed_gives_the_same_plan_to_the_last_float() -> None:
    assert five_thousand_an_hour(7) == five_thousand_an_hour(7)
    assert five_thousand_an_hour(7) != five_thousand_an_hour(8)


def test_changing_the_stat_share_moves_no_arrival_and_no_modality() -> None:
    base = five_thousand_an_hour(3)
    more_stat = plan(5000, 3600, DEFAULT_MIX, SITES, 0.3, 0.5, False, 3)
    assert [(s.at_s, s.modality, s.site) for s in base] == [(s.at_s, s.modality, s.site) for s in more_stat]
    assert sum(s.stat for s in more_stat) > sum(s.stat for s in base)


def test_arrivals_are_poisson_at_the_asked_rate() -> None:
    studies = five_thousand_an_hour(2)
    assert abs(len(studies) - 5000) < 4 * 5000 ** 0.5  # Poisson: sd = sqrt(mean)
    times = [s.at_s for s in studies]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 3600
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(3600 / 5000, rel=0.05)
    # exponential gaps: the standard deviation equals the mean
    assert statistics.pstdev(gaps) == pytest.approx(mean, rel=0.1)


def test_modality_mix_stat_and_order_shares_are_exact_quotas() -> None:
    studies = five_thousand_an_hour(4)
    n = len(studies)
    by_modality = Counter(s.modality for s in studies)
    for modality, share in DEFAULT_MIX.items():
        assert abs(by_modality[modality] - share * n) <= 1
    assert sum(s.stat for s in studies) == round(0.1 * n)
    ordered = [s for s in studies if s.order is not OrderTiming.NONE]
    assert len(ordered) == round(0.9 * n)
    assert abs(sum(s.order is OrderTiming.BEFORE for s in ordered) - 0.5 * len(ordered)) <= 1
    assert all(s.order is not OrderTiming.NONE for s in studies if s.stat), "a STAT study always has its order"
    # ... and they are dealt in random order, not in blocks
    first_tenth = Counter(s.modality for s in studies[: n // 10])
    assert all(abs(first_tenth[m] - share * n / 10) < 0.3 * share * n / 10 + 5 for m, share in DEFAULT_MIX.items())


def test_sites_share_the_studies_and_keep_their_transport() -> None:
    studies = five_thousand_an_hour(5)
    by_site = Counter(s.site for s in studies)
    assert all(abs(count - len(studies) / 3) < 0.06 * len(studies) for count in by_site.values())
    assert {s.transport for s in studies if s.site == "SITE_C"} == {Transport.STOW}
    assert {s.transport for s in studies if s.site != "SITE_C"} == {Transport.DICOM}
    assert {s.patient_state for s in studies if s.site == "SITE_A"} == {"NV"}


def test_a_study_goes_only_to_a_site_that_has_its_modality() -> None:
    sites = parse_sites("HOSPITAL:CR+DX+CT,IMAGING_CENTER:MR", stow_sites=["IMAGING_CENTER"])
    studies = plan(2000, 600, DEFAULT_MIX, sites, 0.1, 0.5, False, 1)
    assert {s.site for s in studies if s.modality == "MR"} == {"IMAGING_CENTER"}
    assert {s.site for s in studies if s.modality != "MR"} == {"HOSPITAL"}
    with pytest.raises(PlanError, match="no site in --sites scans MR"):
        plan(2000, 600, DEFAULT_MIX, parse_sites("HOSPITAL:CR+DX+CT"), 0.1, 0.5, False, 1)


def test_study_sizes_are_realistic_and_scale_down_ct_and_mr_only() -> None:
    studies = five_thousand_an_hour(6)
    cr_views = {len(study.series) for study in studies if study.modality == "CR"}
    assert cr_views == {1, 2, 3}  # 1-3 views, each in a series of its own, all three seen at this seed
    for study in studies:
        if study.modality == "CR":
            assert set(study.series) == {1}
        elif study.modality == "DX":
            assert len(study.series) == 1 and 1 <= study.instances <= 4
        elif study.modality == "CT":
            assert study.series[0] == 1 and 100 <= study.series[1] <= 300, "a localizer, then hundreds of slices"
        else:
            assert 3 <= len(study.series) <= 6 and all(20 <= n <= 40 for n in study.series)
    small = five_thousand_an_hour(6, sizes=StudySizes(scale=0.1))
    assert [s.modality for s in small] == [s.modality for s in studies]
    for big, little in zip(studies, small):
        if big.modality == "CT":
            assert little.series == (1, int(big.series[1] * 0.1 + 0.5))
        elif big.modality in ("CR", "DX"):
            assert little.series == big.series
    assert sum(s.instances for s in small) < sum(s.instances for s in studies) / 5


def test_orders_before_lead_their_images_and_after_follow_them() -> None:
    studies = five_thousand_an_hour(8, order_gap_s=(2.0, 6.0))
    for study in studies:
        if study.order is OrderTiming.BEFORE:
            assert 2.0 <= study.order_gap_s <= 6.0
            assert study.order_at_s == max(0.0, study.at_s - study.order_gap_s)
        elif study.order is OrderTiming.AFTER:
            assert 2.0 <= study.order_gap_s <= 6.0 and study.order_at_s is None
        else:
            assert study.order_gap_s == 0.0 and study.order_at_s is None


def test_the_diurnal_curve_has_a_night_trough_and_a_day_peak_around_a_mean_of_one() -> None:
    day = [diurnal_factor(h / 10) for h in range(240)]
    assert statistics.fmean(day) == pytest.approx(1.0, abs=0.01)
    assert diurnal_factor(4) < 0.35 < 1.4 < diurnal_factor(11)
    assert diurnal_factor(23.99) == pytest.approx(diurnal_factor(0), abs=0.01), "midnight joins up"


def test_a_diurnal_run_follows_the_curve_over_one_simulated_day() -> None:
    studies = plan(2000, 86_400, DEFAULT_MIX, SITES, 0.1, 0.5, True, 9)
    assert abs(len(studies) - 48_000) < 4 * 48_000 ** 0.5, "the rate is the daily mean"
    per_hour = Counter(int(s.at_s // 3600) for s in studies)
    for hour in (3, 4, 11, 14):
        expected = 2000 * statistics.fmean(diurnal_factor(hour + k / 60) for k in range(60))
        assert per_hour[hour] == pytest.approx(expected, rel=0.12)
    assert per_hour[11] > 3 * per_hour[4]


def test_a_short_run_is_a_compressed_day_starting_at_the_asked_hour() -> None:
    clock = DiurnalClock(day_s=240, start_hour=6)
    assert clock.hour_at(0) == 6 and clock.hour_at(60) == 12 and clock.hour_at(180) == 0
    studies = plan(36_000, 240, DEFAULT_MIX, SITES, 0.1, 0.5, True, 2, clock=clock)
    morning_peak = sum(1 for s in studies if 40 <= s.at_s < 80)  # 10:00-16:00 simulated
    night = sum(1 for s in studies if 200 <= s.at_s < 240)  # 02:00-06:00 simulated
    assert morning_peak > 3 * night


def test_a_fixed_count_is_exact() -> None:
    studies = plan(1, 20, {"CR": 1, "CT": 1, "MR": 1}, SITES, 0.2, 0.5, False, 1, count=6, order_fraction=1.0)
    assert len(studies) == 6 and Counter(s.modality for s in studies) == {"CR": 2, "CT": 2, "MR": 2}
    assert sum(s.stat for s in studies) == 1 and sum(s.order is OrderTiming.BEFORE for s in studies) == 3


def test_bad_requests_fail_with_the_option_to_change() -> None:
    with pytest.raises(PlanError, match="--stat"):
        plan(100, 60, DEFAULT_MIX, SITES, 0.5, 0.5, False, 1, order_fraction=0.4)
    with pytest.raises(PlanError, match="--mix"):
        plan(100, 60, {"US": 1.0}, SITES, 0.1, 0.5, False, 1)
    with pytest.raises(PlanError, match="AE title"):
        parse_sites("A_SITE_NAME_TOO_LONG_FOR_AN_AE")
    with pytest.raises(PlanError, match="--stow-sites"):
        parse_sites("SITE_A", stow_sites=["SITE_X"])
    with pytest.raises(PlanError, match="rate"):
        parse_rate("fast")


def test_rates_mixes_and_quotas_parse_as_written() -> None:
    assert parse_rate("5000/h") == 5000 and parse_rate("90/min") == 5400 and parse_rate("2/s") == 7200
    assert parse_rate("300") == 300
    assert parse_mix("ct:3,mr:1") == {"CT": 0.75, "MR": 0.25}
    assert quota(7, {"A": 0.5, "B": 0.3, "C": 0.2}) == ["A", "A", "A", "A", "B", "B", "C"]


def test_percentiles_and_stage_latencies() -> None:
    from radstream.traffic_report import stage_latencies

    assert percentile([], 50) is None
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    assert percentile(list(range(101)), 95) == 95
    sent = {"s1": 100.0, "s2": 200.0}
    times = {"s1": {"received": (100.1, 100.5), "assembled": (100.5, 101.0), "deidentified": (101.0, 101.4),
                    "ai": (101.4, 101.6), "routed": (101.0, 101.8)},
             "s2": {"received": (200.2, 200.2), "assembled": (200.2, 202.2)}}
    latencies = {item.stage: item for item in stage_latencies(sent, times)}
    assert list(latencies) == ["received", "assembled", "deidentified", "ai", "routed"]
    assert latencies["received"].own.count == 2 and latencies["received"].own.p50 == pytest.approx(0.2)
    assert latencies["assembled"].since_sent.p50 == pytest.approx((1.0 + 2.2) / 2)
    assert latencies["ai"].own.p50 == pytest.approx(0.2) and latencies["ai"].since_sent.count == 1
    assert latencies["routed"].own.p50 == pytest.approx(0.8), "routing follows assembly, not the AI"


def test_a_study_is_complete_only_with_every_instance_its_order_and_its_ai_read() -> None:
    from radstream.traffic_report import Arrival

    row = {"instance_count": 12, "reason_for_exam": "Headache", "ai_status": "OK"}
    assert Arrival(row, 12, ordered=True, ai=True).missing is None
    assert Arrival(None, 12, True, True).missing == "not on the worklist"
    assert Arrival({**row, "instance_count": 11}, 12, True, True).missing == "11 of 12 instances on the worklist"
    assert Arrival({**row, "reason_for_exam": None}, 12, True, True).missing == "its order is not joined"
    assert Arrival({**row, "reason_for_exam": None}, 12, False, True).missing is None, "no order was sent"
    assert Arrival({**row, "ai_status": "PENDING"}, 12, True, True).missing == "AI pre-read pending"
    assert Arrival({**row, "ai_status": "PENDING"}, 12, True, False).missing is None


def test_a_stow_answer_names_each_failed_instance_and_its_reason() -> None:
    from radstream.traffic_run import _stow_failed

    answer = {"00081198": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [0xA700]}}]},
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.4"]}}]}}
    assert _stow_failed(json.dumps(answer).encode()) == {"1.2.3": "0xA700"}
    assert _stow_failed(b"not json") == {}


def test_the_dry_run_prints_the_plan_and_bad_options_exit_2(settings) -> None:
    from radstream.cli import cli

    env = settings.to_env()
    runner = CliRunner()
    dry = runner.invoke(cli, ["load", "generate", "--rate", "5000/h", "--duration", "6m", "--scale", "0.1",
                              "--stow-sites", "SITE_C", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("plan: 514 studies, 5,313 instances over 360 s")
    assert "SITE_C STOW-RS" in dry.output and "STAT 51" in dry.output
    assert runner.invoke(cli, ["load", "generate", "--dry-run"], env=env).output.split("\n")[0] != \
        dry.output.split("\n")[0], "the realistic sizes are ten times the instances"
    bad = runner.invoke(cli, ["load", "generate", "--mix", "CT:1", "--sites", "SITE_A:CR", "--dry-run"], env=env)
    assert bad.exit_code == 2 and "no site in --sites scans CT" in bad.output


# ---------------------------------------------------------------- studies from real templates


def test_a_planned_ct_becomes_real_instances_of_one_study_and_its_order_matches() -> None:
    from radstream.traffic_studies import identity_for, load_templates, order_message, study_instances

    study = next(s for s in plan(5000, 600, {"CT": 1.0}, SITES, 1.0, 1.0, False, 1, order_fraction=1.0,
                                 sizes=StudySizes(scale=0.05)))
    identity = identity_for(study, "TEST01", datetime(2026, 3, 4, 5, 6, 7))
    template = load_templates("small", {"CT"})["CT"]
    files = []
    for ds in study_instances(study, identity, template):
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        files.append(dcmread(io.BytesIO(buffer.getvalue())))
    assert len(files) == study.instances
    assert {f.StudyInstanceUID for f in files} == {identity.study_uid}
    assert len({f.SOPInstanceUID for f in files}) == len(files) and len({f.SeriesInstanceUID for f in files}) == 2
    assert {(f.AccessionNumber, f.PatientID, str(f.PatientName)) for f in files} == {
        (identity.accession_number, identity.patient_id, study.patient_name)}
    assert {f.StudyDate for f in files} == {"20260304"} and {f.NumberOfStudyRelatedInstances for f in files} == {
        study.instances}
    axial = [f for f in files if f.SeriesNumber == 2]
    assert [f.InstanceNumber for f in axial] == list(range(1, len(axial) + 1))
    assert len({float(f.ImagePositionPatient[2]) for f in axial}) == len(axial)
    assert template.SOPInstanceUID not in {f.SOPInstanceUID for f in files}, "the template is not sent"

    message = order_message(study, identity, "C1", datetime(2026, 3, 4, 5, 6, 7)).decode()
    assert message.startswith("\x0bMSH|") and message.endswith("\x1c\r")
    obr = next(s for s in message.split("\r") if s.startswith("OBR|")).split("|")
    assert obr[18] == identity.accession_number and obr[27] == "^^^^^S"
    pid = next(s for s in message.split("\r") if s.startswith("PID|")).split("|")
    assert pid[11].split("^")[3] == study.patient_state


def test_dx_is_sent_as_digital_x_ray_from_a_real_radiograph() -> None:
    from radstream.traffic_studies import DX_FOR_PRESENTATION, load_templates

    dx = load_templates("small", {"DX"})["DX"]
    assert dx.Modality == "DX" and dx.SOPClassUID == DX_FOR_PRESENTATION
    assert len(dx.PixelData) == dx.Rows * dx.Columns * 2 and dx.Rows < 600


# ---------------------------------------------------------------- a whole run


RUN_TOKEN = "traffic-test-token"


@pytest.mark.integration
def test_generated_traffic_reaches_the_worklist_through_all_three_gateways(settings, tmp_path: Path) -> None:
    """6 studies in ~10 s: 2 CR and 2 CT by C-STORE, 2 MR by STOW-RS; every one with an order,
    half before the images; one STAT. Each is on the worklist with every instance, the STAT one
    raised by its order, and the report prints the per-stage percentiles."""
    from radstream.cli import cli
    from tests.test_end_to_end import start_up, stop_up

    env = {**settings.to_env(), "RADSTREAM_STOW_TOKENS": f"{RUN_TOKEN}=SITE_C"}
    proc = start_up(settings, tmp_path, RADSTREAM_STOW_TOKENS=env["RADSTREAM_STOW_TOKENS"])
    try:
        records = tmp_path / "records.jsonl"
        result = CliRunner().invoke(cli, [
            "load", "generate", "--count", "6", "--duration", "10s", "--mix", "CR:1,CT:1,MR:1",
            "--sites", "SITE_A:CR+CT,SITE_C:MR", "--stow-sites", "SITE_C", "--orders", "1", "--orders-first", "0.5",
            "--stat", "0.2", "--order-gap", "1-2", "--scale", "0.05", "--seed", "3", "--wait-timeout", "60s",
            "--records", str(records)], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        sent = [json.loads(line) for line in records.read_text().splitlines()]
        assert Counter((r["modality"], r["transport"]) for r in sent) == {
            ("CR", "DICOM"): 2, ("CT", "DICOM"): 2, ("MR", "STOW-RS"): 2}
        assert Counter(r["order"] for r in sent) == {"before": 3, "after": 3}
        assert all(not r["failures"] and r["instances_acked"] == r["instances"] for r in sent)

        from radstream.traffic_report import worklist_rows

        rows = worklist_rows(settings, [r["study_uid"] for r in sent])
        assert set(rows) == {r["study_uid"] for r in sent}, "nothing lost"
        for record in sent:
            row = rows[record["study_uid"]]
            assert row["instance_count"] == record["instances"]
            assert row["accession_number"] == record["accession_number"]
            assert row["source_site"] == record["site"] and row["reason_for_exam"]
            stat_reason = any("order-stat" in reason for reason in row["reasons"])
            assert stat_reason == record["stat"], (record, row)
            if record["stat"]:
                assert row["priority"] in ("URGENT", "CRITICAL")
        assert sum(r["stat"] for r in sent) == 1

        out = result.output
        assert "pipeline: 6 of 6 studies sent are complete on the worklist" in out
        assert "orders joined 6 of 6; STAT prioritised 1 of 1" in out
        for stage in ("received", "assembled", "deidentified", "ai", "routed"):
            line = next(l for l in out.splitlines() if l.startswith(stage + " "))
            assert line.split()[1] == "6", line
        assert "sustained:" in out and "studies/h" in out and "instances/s" in out
    finally:
        stop_up(proc)
