"""Reader assignment and the roster file: filters, scores, explanations, aging, shifts, reloads.

About 410 lines: one test per filter, score term and roster mistake.
"""

from __future__ import annotations

import json
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from schemas.events import Priority
from streams.assign import (
    OpenAssignment,
    QueueBook,
    StudyToAssign,
    age,
    assign,
    deadline_of,
    off_shift,
    reassign,
)
from streams.roster import RosterError, RosterReloader, load_roster, parse_roster

#: Tuesday 1 December 2026, 15:00 UTC = 09:00 in Chicago, 07:00 in Los Angeles, 10:00 in New York.
NOW = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
DAY = [{"days": "Mon-Fri", "start": "08:00", "end": "17:00", "tz": "America/Chicago"}]


def reader(rid: str, subspecialties=("neuroradiology",), states=("NV",), sites=("SITE_A",), capacity=10,
           shifts=None, minutes=10.0) -> dict:
    return {"id": rid, "name": rid.upper(), "subspecialties": list(subspecialties), "licensed_states": list(states),
            "credentialed_sites": list(sites), "capacity": capacity, "minutes_per_study": minutes,
            "shifts": shifts or DAY}


def roster_of(*readers: dict, sla: dict | None = None):
    return parse_roster({"reader": list(readers), **({"sla": sla} if sla else {})}, "roster.toml")


def study(uid="1.2.3", priority=Priority.ROUTINE, subspecialty="neuroradiology", site="SITE_A", state="NV",
          received=NOW, **kw) -> StudyToAssign:
    return StudyToAssign(study_uid=uid, priority=priority, subspecialty=subspecialty, source_site=site,
                         received_at=received, site_state=state, **kw)


def fill(book: QueueBook, rid: str, count: int, priority=Priority.ROUTINE, prefix="open", received=NOW) -> None:
    for i in range(count):
        s = study(f"{prefix}-{rid}-{i}", priority=priority, received=received)
        book.add(OpenAssignment(study=s, reader_id=rid, deadline=deadline_of(s, roster_of(reader("x")).sla),
                                assigned_at=received))


# ---------------------------------------------------------------- hard filters


def test_a_reader_not_licensed_in_the_patients_state_is_excluded_and_the_row_says_how_many_are() -> None:
    roster = roster_of(reader("dr-ca", states=["CA"]), reader("dr-nv"), reader("dr-nv2", states=["NV", "CA"]))
    decision = assign(study(), roster, QueueBook(), NOW)
    assert decision.reader_id in {"dr-nv", "dr-nv2"}
    assert decision.explanation.why_not("dr-ca") == "not licensed in NV"
    assert "licensed in NV (site SITE_A): 2 of 3 readers" in decision.reasons


def test_the_orders_patient_state_pid11_wins_over_the_sites_state() -> None:
    roster = roster_of(reader("dr-nv"), reader("dr-az", states=["AZ"]))
    decision = assign(study(patient_state="az"), roster, QueueBook(), NOW)
    assert decision.reader_id == "dr-az"
    assert decision.explanation.license_source == "PID-11"


def test_a_study_whose_state_is_unknown_is_left_unassigned_with_the_reason() -> None:
    decision = assign(study(state=None), roster_of(reader("dr-nv")), QueueBook(), NOW)
    assert decision.reader_id is None
    assert "patient state unknown: no PID-11 and no state for the site" in decision.reasons


def test_a_reader_not_credentialed_at_the_site_is_excluded() -> None:
    roster = roster_of(reader("dr-b", sites=["SITE_B"]), reader("dr-a"))
    decision = assign(study(), roster, QueueBook(), NOW)
    assert decision.reader_id == "dr-a"
    assert decision.explanation.why_not("dr-b") == "not credentialed at SITE_A"


def test_a_reader_off_shift_is_excluded() -> None:
    late = [{"days": "Mon-Fri", "start": "13:00", "end": "21:00", "tz": "America/Chicago"}]
    roster = roster_of(reader("dr-late", shifts=late), reader("dr-now"))
    decision = assign(study(), roster, QueueBook(), NOW)
    assert decision.reader_id == "dr-now"
    assert decision.explanation.why_not("dr-late") == "off shift"


def test_a_reader_at_capacity_is_excluded_for_routine_work() -> None:
    roster = roster_of(reader("dr-full", capacity=2), reader("dr-free", capacity=2))
    book = QueueBook()
    fill(book, "dr-full", 2)
    decision = assign(study(), roster, book, NOW)
    assert decision.reader_id == "dr-free"
    assert decision.explanation.why_not("dr-full") == "at capacity"


def test_when_every_reader_is_full_a_critical_study_is_assigned_over_capacity_and_a_routine_one_waits() -> None:
    roster = roster_of(reader("dr-a", capacity=1))
    book = QueueBook()
    fill(book, "dr-a", 1)
    critical = assign(study(priority=Priority.CRITICAL), roster, book, NOW)
    assert critical.reader_id == "dr-a"
    assert any("assigned over capacity" in r for r in critical.reasons)
    routine = assign(study(), roster, book, NOW)
    assert routine.reader_id is None and any(r.startswith("unassigned") for r in routine.reasons)


def test_subspecialty_matches_when_any_eligible_reader_has_it() -> None:
    roster = roster_of(reader("dr-body", subspecialties=["body"]), reader("dr-neuro"))
    book = QueueBook()
    fill(book, "dr-neuro", 5)  # longer queue, still the only neuroradiologist
    decision = assign(study(), roster, book, NOW)
    assert decision.reader_id == "dr-neuro"
    assert "subspecialty neuroradiology matched: 1 reader(s)" in decision.reasons
    assert decision.explanation.why_not("dr-body") == "not neuroradiology"


def test_without_an_eligible_subspecialist_it_falls_back_and_records_why() -> None:
    roster = roster_of(reader("dr-body", subspecialties=["body"]), reader("dr-gen", subspecialties=["general"]),
                       reader("dr-neuro-ca", states=["CA"]))
    decision = assign(study(), roster, QueueBook(), NOW)
    assert decision.reader_id == "dr-gen"  # a general reader scores above a body reader in a fallback
    assert decision.explanation.fallback == "no eligible neuroradiology reader: fell back to 2 eligible reader(s)"
    assert decision.explanation.fallback in decision.reasons
    assert "passed over dr-neuro-ca (not licensed in NV, queue 0)" in decision.reasons


def test_subspecialty_aliases_of_the_routing_rules_match_the_roster() -> None:
    roster = roster_of(reader("dr-chest", subspecialties=["chest"]), reader("dr-neuro"))
    assert assign(study(subspecialty="thoracic"), roster, QueueBook(), NOW).reader_id == "dr-chest"


# ---------------------------------------------------------------- the must-show scenario, scores, determinism


def test_critical_head_ct_goes_to_the_licensed_neuroradiologist_passing_over_an_unlicensed_one_with_a_shorter_queue() -> None:
    roster = roster_of(reader("dr-x", states=["CA"]), reader("dr-y", states=["NV", "CA"]))
    book = QueueBook()
    fill(book, "dr-x", 1)
    fill(book, "dr-y", 5)  # earlier routine studies
    decision = assign(study(priority=Priority.CRITICAL, critical_ai=True), roster, book, NOW)
    assert decision.reader_id == "dr-y"
    assert "passed over dr-x (not licensed in NV, queue 1)" in decision.reasons
    chosen = decision.explanation.candidates[0]
    assert chosen.ahead == 0, "a critical study reads above the earlier routine studies"
    assert decision.deadline == NOW + timedelta(minutes=30)
    audit = decision.explanation.to_dict()
    assert audit["steps"][0] == {"filter": "licensed", "detail": "not licensed in NV", "passed": 1, "excluded": ["dr-x"]}


def test_a_stat_order_reads_above_earlier_urgent_studies_with_a_30_minute_deadline() -> None:
    roster = roster_of(reader("dr-a"))
    book = QueueBook()
    fill(book, "dr-a", 4, priority=Priority.URGENT, received=NOW - timedelta(minutes=30))
    decision = assign(study(priority=Priority.URGENT, stat=True), roster, book, NOW)
    assert decision.explanation.candidates[0].ahead == 0
    assert decision.deadline == NOW + timedelta(minutes=30) and decision.explanation.urgency == "stat"
    json.dumps(decision.explanation.to_dict())  # the audit record is plain JSON


def test_the_reader_whose_queue_meets_the_deadline_wins_over_a_shorter_but_slower_queue() -> None:
    roster = roster_of(reader("dr-slow", minutes=40), reader("dr-fast", minutes=5))
    book = QueueBook()
    fill(book, "dr-slow", 1, priority=Priority.URGENT)
    fill(book, "dr-fast", 3, priority=Priority.URGENT)
    decision = assign(study(priority=Priority.URGENT), roster, book, NOW)
    assert decision.reader_id == "dr-fast"
    slow = next(c for c in decision.explanation.candidates if c.reader_id == "dr-slow")
    assert not slow.meets_deadline and slow.slack_minutes == -20


def test_same_inputs_give_the_same_reader_whatever_the_roster_order() -> None:
    readers = [reader(f"dr-{i:02d}") for i in range(12)]
    first = [assign(study(f"s{i}"), roster_of(*readers), QueueBook(), NOW).reader_id for i in range(5)]
    random.Random(7).shuffle(readers)
    again = [assign(study(f"s{i}"), roster_of(*readers), QueueBook(), NOW).reader_id for i in range(5)]
    assert first == again == ["dr-00"] * 5  # equal scores and queues: the lowest id


def test_replaying_a_stream_of_studies_assigns_the_same_readers() -> None:
    roster = load_roster(Path(__file__).resolve().parent.parent / "streams/rules/roster.example.toml")
    rng = random.Random(3)
    studies = [study(f"s{i}", priority=rng.choice(list(Priority)),
                     subspecialty=rng.choice(["neuro", "body", "chest", "msk", "general"]),
                     site=rng.choice(["SITE_A", "SITE_C", "SITE_E"]), state=rng.choice(["NV", "TX", "NY"]),
                     received=NOW + timedelta(seconds=20 * i)) for i in range(60)]

    def run() -> list:
        book, out = QueueBook(), []
        for s in studies:
            decision = assign(s, roster, book, s.received_at)
            if (entry := decision.open(s, s.received_at)) is not None:
                book.add(entry)
            out.append((decision.reader_id, decision.reasons, decision.explanation.to_dict()))
        return out

    first = run()
    assert first == run()
    assert sum(1 for r, _, _ in first if r) > 30


# ---------------------------------------------------------------- shifts and time zones


def test_an_overnight_shift_covers_both_sides_of_midnight_in_the_readers_time_zone() -> None:
    night = [{"days": "Sun-Thu", "start": "22:00", "end": "07:00", "tz": "America/Chicago"}]
    roster = roster_of(reader("dr-night", shifts=night))
    chicago = ZoneInfo("America/Chicago")

    def on(y, m, d, hh, mm) -> bool:
        return "dr-night" in roster.on_shift(datetime(y, m, d, hh, mm, tzinfo=chicago))

    assert on(2026, 12, 1, 22, 30)  # Tuesday evening
    assert on(2026, 12, 2, 6, 59)  # the rest of Tuesday's shift, Wednesday morning
    assert not on(2026, 12, 2, 7, 0)
    assert not on(2026, 12, 4, 23, 0)  # Friday night: no shift starts on Friday
    assert not on(2026, 12, 5, 2, 0)  # Saturday 02:00 belongs to Friday's (absent) shift
    assert on(2026, 12, 7, 2, 0)  # Monday 02:00 belongs to Sunday's shift
    end = roster.on_shift(datetime(2026, 12, 1, 23, 0, tzinfo=chicago))["dr-night"]
    assert end == datetime(2026, 12, 2, 13, 0, tzinfo=UTC)  # 07:00 CST


def test_one_instant_is_on_shift_in_new_york_and_off_shift_in_los_angeles() -> None:
    nine_to_five = lambda tz: [{"days": "Mon-Fri", "start": "09:00", "end": "17:00", "tz": tz}]  # noqa: E731
    roster = roster_of(reader("dr-ny", shifts=nine_to_five("America/New_York")),
                       reader("dr-la", shifts=nine_to_five("America/Los_Angeles")))
    decision = assign(study(), roster, QueueBook(), NOW)  # 10:00 in New York, 07:00 in Los Angeles
    assert decision.reader_id == "dr-ny"
    assert decision.explanation.why_not("dr-la") == "off shift"


def test_an_overnight_shift_across_the_end_of_daylight_saving_ends_at_local_seven() -> None:
    night = [{"days": "Sat", "start": "22:00", "end": "07:00", "tz": "America/Chicago"}]
    roster = roster_of(reader("dr-night", shifts=night))
    ends = roster.on_shift(datetime(2026, 11, 1, 3, 30, tzinfo=UTC))["dr-night"]  # Sat 22:30 CDT
    assert ends == datetime(2026, 11, 1, 13, 0, tzinfo=UTC)  # Sun 07:00 CST, after the clocks went back


def test_the_shift_end_limits_the_slack() -> None:
    ending = [{"days": "Mon-Fri", "start": "00:00", "end": "09:10", "tz": "America/Chicago"}]
    roster = roster_of(reader("dr-leaving", shifts=ending), reader("dr-staying"))
    decision = assign(study(priority=Priority.URGENT), roster, QueueBook(), NOW)
    assert decision.reader_id == "dr-staying"
    leaving = next(c for c in decision.explanation.candidates if c.reader_id == "dr-leaving")
    assert leaving.slack_minutes == 0 and leaving.shift_ends_at == NOW + timedelta(minutes=10)


# ---------------------------------------------------------------- deadlines


def test_deadlines_per_urgency_with_per_site_overrides() -> None:
    roster = roster_of(reader("dr-a"), sla={"routine": 300, "site": {"SITE_E": {"routine": 180, "stat": 20}}})
    sla = roster.sla
    assert deadline_of(study(), sla) == NOW + timedelta(minutes=300)
    assert deadline_of(study(site="site_e"), sla) == NOW + timedelta(minutes=180)
    assert deadline_of(study(site="SITE_E", priority=Priority.URGENT, stat=True), sla) == NOW + timedelta(minutes=20)
    assert deadline_of(study(priority=Priority.URGENT), sla) == NOW + timedelta(minutes=60)
    assert deadline_of(study(critical_ai=True), sla) == NOW + timedelta(minutes=30)
    decision = assign(study(), roster, QueueBook(), NOW)
    assert any("(routine 300 min)" in r for r in decision.reasons)


# ---------------------------------------------------------------- aging and shift changes


def test_a_routine_study_nearing_its_deadline_is_promoted_and_then_reads_at_the_urgent_level() -> None:
    roster = roster_of(reader("dr-a"))
    book = QueueBook()
    old = study("old", received=NOW - timedelta(minutes=200))  # 40 of 240 minutes left
    book.add(OpenAssignment(study=old, reader_id="dr-a", deadline=deadline_of(old, roster.sla), assigned_at=NOW))
    fill(book, "dr-a", 2)
    report = age(book, roster, NOW)
    assert [(p.study_uid, p.from_level, p.to_level, p.minutes_left) for p in report.promote] == [("old", 2, 1, 40.0)]
    book.promote("old")
    assert book.open_of("dr-a")[0].study.study_uid == "old"
    assert not age(book, roster, NOW).promote


def test_a_study_its_reader_cannot_reach_in_time_is_reassigned_to_one_who_can() -> None:
    roster = roster_of(reader("dr-busy"), reader("dr-free"))
    book = QueueBook()
    fill(book, "dr-busy", 3, priority=Priority.CRITICAL)  # read first, each in time (+10, +20, +30 of 30)
    late = study("late", priority=Priority.URGENT)
    book.add(OpenAssignment(study=late, reader_id="dr-busy", deadline=NOW + timedelta(minutes=35), assigned_at=NOW))
    report = age(book, roster, NOW)  # 3 ahead at 10 min/study: reached at +40 min, deadline +35
    assert [m.study_uid for m in report.reassign] == ["late"]
    assert "dr-busy's queue cannot meet the deadline" in report.reassign[0].reason
    moved = reassign(report.reassign, book, roster, NOW)
    assert [(d.study_uid, d.previous_reader, d.reader_id) for d in moved] == [("late", "dr-busy", "dr-free")]
    assert moved[0].reasons[0].startswith("re-assigned from dr-busy")
    assert book.get("late").reader_id == "dr-free"


def test_a_late_study_stays_when_no_other_reader_reaches_it_sooner() -> None:
    roster = roster_of(reader("dr-busy"), reader("dr-busier"))
    book = QueueBook()
    fill(book, "dr-busy", 3, priority=Priority.CRITICAL)
    fill(book, "dr-busier", 3, priority=Priority.CRITICAL)
    fill(book, "dr-busier", 2, priority=Priority.URGENT, prefix="urgent")  # deadline +60: after "late"
    late = study("late", priority=Priority.URGENT)
    book.add(OpenAssignment(study=late, reader_id="dr-busy", deadline=NOW + timedelta(minutes=35), assigned_at=NOW))
    moves = age(book, roster, NOW).reassign
    assert [m.study_uid for m in moves] == ["late"]
    assert reassign(moves, book, roster, NOW) == []  # dr-busier would reach it at +40 too: not sooner
    assert book.get("late").reader_id == "dr-busy"


def test_a_reader_going_off_shift_has_their_unread_studies_reassigned_and_keeps_the_opened_one() -> None:
    morning = [{"days": "Mon-Fri", "start": "05:00", "end": "09:00", "tz": "America/Chicago"}]
    roster = roster_of(reader("dr-morning", shifts=morning), reader("dr-day"))
    book = QueueBook()
    fill(book, "dr-morning", 2)
    opened = study("opened")
    book.add(OpenAssignment(study=opened, reader_id="dr-morning", deadline=NOW + timedelta(hours=4),
                            assigned_at=NOW, status="IN_PROGRESS"))
    moves = off_shift(book, roster, NOW)  # 09:00 in Chicago: the morning shift has ended
    assert sorted(m.study_uid for m in moves) == ["open-dr-morning-0", "open-dr-morning-1"]
    assert all(m.reason == "dr-morning off shift: unread study re-assigned" for m in moves)
    moved = reassign(moves, book, roster, NOW)
    assert {d.reader_id for d in moved} == {"dr-day"}
    assert book.get("opened").reader_id == "dr-morning"
    assert off_shift(book, roster, NOW) == ()


# ---------------------------------------------------------------- the roster file


def bad(tmp_path: Path, text: str) -> str:
    path = tmp_path / "roster.toml"
    path.write_text(text)
    with pytest.raises(RosterError) as caught:
        load_roster(path)
    return str(caught.value)


GOOD = """
[[reader]]
id = "dr-a"
name = "Dr A"
subspecialties = ["neuro"]
licensed_states = ["NV"]
credentialed_sites = ["SITE_A"]
capacity = 10
shifts = [{ days = "Mon-Fri", start = "08:00", end = "17:00", tz = "America/Chicago" }]
"""


def test_a_bad_state_code_names_the_file_the_reader_and_the_key(tmp_path: Path) -> None:
    text = GOOD + GOOD.replace('"dr-a"', '"dr-b"').replace('["NV"]', '["NV", "XX"]')
    message = bad(tmp_path, text)
    assert f"{tmp_path / 'roster.toml'}: reader[1].licensed_states[1]: 'XX' is not a US state/territory code (reader 'dr-b')" == message


@pytest.mark.parametrize(("edit", "expected"), [
    (("licensed_states", "licenced_states"), "reader[0].licenced_states: unknown key"),
    (("America/Chicago", "America/Chicgo"), "reader[0].shifts[0].tz: 'America/Chicgo' is not an IANA time zone"),
    (('"Mon-Fri"', '"Mon-Fry"'), "reader[0].shifts[0].days: 'Mon-Fry' is not a day list"),
    (('"17:00"', '"17:60"'), "reader[0].shifts[0].end: '17:60' is not a time of day"),
    (('"17:00"', '"08:00"'), "reader[0].shifts[0]: starts and ends at 08:00"),
    (('["neuro"]', '["nuero"]'), "reader[0].subspecialties[0]: 'nuero' is not a known subspecialty"),
    (("capacity = 10", "capacity = 0"), "reader[0].capacity: Input should be greater than or equal to 1"),
    (("capacity = 10", 'capacity = "10"'), "reader[0].capacity: Input should be a valid integer"),
    (('name = "Dr A"\n', ""), "reader[0].name: required key is missing"),
    (('id = "dr-a"', 'id = "Dr A"'), "reader[0].id: String should match pattern"),
])
def test_roster_errors_name_the_file_and_the_key(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    message = bad(tmp_path, GOOD.replace(*edit))
    assert any(line.startswith(f"{tmp_path / 'roster.toml'}: {expected}") for line in message.splitlines()), message


def test_duplicate_ids_unknown_sections_sla_keys_and_bad_toml_are_refused(tmp_path: Path) -> None:
    assert "reader[1].id: 'dr-a' is used twice (first at reader[0])" in bad(tmp_path, GOOD + GOOD)
    assert "roster.toml: readers: unknown key" in bad(tmp_path, GOOD + "\n[readers]\nx = 1\n")
    assert "sla.site.SITE_B.routin: unknown key" in bad(tmp_path, GOOD + "\n[sla.site.SITE_B]\nroutin = 10\n")
    assert "roster.toml is not valid TOML" in bad(tmp_path, GOOD + "\n[[reader]\n")
    assert "roster.toml: reader: List should have at least 1 item" in bad(tmp_path, "reader = []\n")


def test_the_example_roster_is_valid_and_covers_the_subspecialties() -> None:
    roster = load_roster(Path(__file__).resolve().parent.parent / "streams/rules/roster.example.toml")
    assert 10 <= len(roster.readers) <= 20
    assert {"neuroradiology", "body", "msk", "thoracic", "general"} <= set(roster.by_subspecialty)
    assert any(shift.overnight for r in roster.readers for shift in r.shifts)
    assert len(roster.by_state) >= 5 and len(roster.by_site) >= 5


def test_the_roster_is_reloaded_on_change_and_a_bad_edit_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "roster.toml"
    path.write_text(GOOD)
    reloader = RosterReloader(path)
    first = reloader.current()
    assert [r.id for r in first.readers] == ["dr-a"] and reloader.current() is first

    def edit(text: str, tick: int) -> None:
        path.write_text(text)
        os.utime(path, ns=(tick * 10**9, tick * 10**9))  # a distinct mtime even on coarse clocks

    edit(GOOD.replace('["NV"]', '["ZZ"]'), 1)
    assert reloader.current() is first
    assert "reader[0].licensed_states[0]: 'ZZ' is not a US state/territory code" in reloader.last_error
    edit(GOOD + GOOD.replace('"dr-a"', '"dr-b"'), 2)
    assert [r.id for r in reloader.current().readers] == ["dr-a", "dr-b"] and reloader.last_error is None
    path.unlink()
    assert [r.id for r in reloader.current().readers] == ["dr-a", "dr-b"]
    assert "does not exist" in reloader.last_error
