"""The worklist stage's decisions over routed rows: assignment, re-assessment, the clock, replay.

The roster and the rows are real (the routing stage's own rows, from :func:`streams.route.route`);
only the Faust table around :class:`streams.worklist.Worklist` is replaced by a dict.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from schemas.events import Priority, WorklistUpdate
from streams.roster import parse_roster
from streams.worklist import NO_ROSTER, Worklist, WorklistState, audit_of

NOW = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)  # Tuesday, 09:00 in Chicago
DAY = [{"days": "daily", "start": "00:00", "end": "24:00", "tz": "America/Chicago"}]


def reader(rid, states=("NV",), subspecialties=("neuroradiology",), shifts=None) -> dict:
    return {"id": rid, "name": rid, "subspecialties": list(subspecialties), "licensed_states": list(states),
            "credentialed_sites": ["SITE_A"], "capacity": 20, "minutes_per_study": 10, "shifts": shifts or DAY}


def row(uid: str, priority=Priority.ROUTINE, at=NOW, reasons=("head-ct: subspecialty=neuroradiology",),
        version=1) -> WorklistUpdate:
    return WorklistUpdate(trace_id=f"t-{uid}", study_uid=uid, version=version, modality="CT", modalities=["CT"],
                          priority=priority, subspecialty="neuroradiology", source_site="SITE_A", instance_count=3,
                          reasons=list(reasons), received_at=at, assembled_at=at, routed_at=at)


class Stage:
    """The stage's handlers over a dict instead of a Faust table."""

    def __init__(self, roster) -> None:
        self.states: dict[str, WorklistState] = {}
        self.worklist = Worklist((lambda: roster) if roster else None, {"SITE_A": "NV"}.get)
        self.worklist.rebuild([])
        self.audit = []

    def keep(self, changes) -> None:
        for change in changes:
            self.states[change.state.study_uid] = change.state
            if change.action:
                self.audit.append(audit_of(change, change.state.updated_at))

    def routed(self, update: WorklistUpdate) -> WorklistUpdate:
        change = self.worklist.routed(self.states.get(update.study_uid), update)
        self.keep([change])
        return change.state.published()

    def tick(self, at: datetime) -> None:
        self.keep(self.worklist.tick(self.states.__getitem__, at))


def test_a_critical_ai_reroute_puts_the_study_above_routine_work_with_the_licensed_reader() -> None:
    roster = parse_roster({"reader": [reader("dr-licensed"), reader("dr-unlicensed", states=["CA"])]}, "r.toml")
    stage = Stage(roster)
    for i in range(3):
        assert stage.routed(row(f"routine-{i}", at=NOW + timedelta(minutes=i))).assigned_reader == "dr-licensed"
    first = stage.routed(row("head-ct", at=NOW + timedelta(minutes=5)))
    assert first.sla_deadline == NOW + timedelta(minutes=5, hours=4)
    critical = stage.routed(replace(row("head-ct", Priority.CRITICAL, at=NOW + timedelta(minutes=5),
                                        reasons=("ai-critical: priority=CRITICAL",)),
                                    routed_at=NOW + timedelta(minutes=6)))
    assert critical.assigned_reader == "dr-licensed"
    assert critical.sla_deadline == NOW + timedelta(minutes=35)
    assert critical.assignment_reasons[0] == "re-assessed: routine -> critical"
    assert "passed over dr-unlicensed (not licensed in NV, queue 0)" in critical.assignment_reasons
    assert critical.updated_at > first.updated_at  # the sink keeps the later row
    ahead = [item.study.study_uid for item in stage.worklist.book.open_of("dr-licensed")]
    assert ahead[0] == "head-ct" and len(ahead) == 4
    explanation = json.loads(stage.audit[-1].detail["explanation"])
    licensed = next(step for step in explanation["steps"] if step["filter"] == "licensed")
    assert licensed["excluded"] == ["dr-unlicensed"]


def test_same_urgency_rerouting_keeps_the_reader_and_writes_no_new_decision() -> None:
    stage = Stage(parse_roster({"reader": [reader("dr-a"), reader("dr-b")]}, "r.toml"))
    first = stage.routed(row("s1"))
    again = stage.routed(replace(row("s1"), routed_at=NOW + timedelta(seconds=30), ai_status="OK"))
    assert again.assigned_reader == first.assigned_reader and again.assigned_at == first.assigned_at
    assert len(stage.audit) == 1 and again.ai_status == "OK"
    assert stage.worklist.routed(stage.states["s1"], row("s1", version=0)) is None  # an older version is stale


def test_without_a_roster_rows_pass_unassigned_with_their_deadline_and_the_reason() -> None:
    stage = Stage(None)
    out = stage.routed(row("s1", Priority.URGENT))
    assert out.assigned_reader is None and out.assignment_reasons == [NO_ROSTER]
    assert out.sla_deadline == NOW + timedelta(minutes=60)
    assert stage.audit == []


def test_the_clock_assigns_waiting_studies_when_a_licensed_reader_comes_on_shift() -> None:
    later = [{"days": "daily", "start": "10:00", "end": "18:00", "tz": "America/Chicago"}]  # 16:00-24:00 UTC
    stage = Stage(parse_roster({"reader": [reader("dr-late", shifts=later)]}, "r.toml"))
    waiting = stage.routed(row("s1"))
    assert waiting.assigned_reader is None and stage.audit[-1].action == "unassigned"
    stage.tick(NOW + timedelta(minutes=30))
    assert stage.states["s1"].reader_id is None
    stage.tick(NOW + timedelta(hours=1, minutes=1))
    assert stage.states["s1"].reader_id == "dr-late" and stage.audit[-1].action == "assigned"
    assert stage.states["s1"].deadline == NOW + timedelta(hours=4)  # the deadline runs from receipt


def test_a_reader_going_off_shift_has_unread_studies_moved_and_the_move_is_audited() -> None:
    early = [{"days": "daily", "start": "08:00", "end": "09:30", "tz": "America/Chicago"}]  # 14:00-15:30 UTC
    stage = Stage(parse_roster({"reader": [reader("dr-early", shifts=early), reader("dr-late", states=["NV"],
                  shifts=[{"days": "daily", "start": "09:20", "end": "18:00", "tz": "America/Chicago"}])]}, "r.toml"))
    assert stage.routed(row("s1")).assigned_reader == "dr-early"
    stage.tick(NOW + timedelta(minutes=31))
    state = stage.states["s1"]
    assert state.reader_id == "dr-late"
    assert state.reasons[0] == "re-assigned from dr-early: dr-early off shift: unread study re-assigned"
    assert stage.audit[-1].action == "reassigned" and stage.audit[-1].detail["previous_reader"] == "dr-early"


def test_a_replay_of_the_same_rows_and_ticks_makes_the_same_decisions() -> None:
    roster = parse_roster({"reader": [reader(f"dr-{i}") for i in range(4)]}, "r.toml")
    events = [row(f"s{i}", Priority.CRITICAL if i % 5 == 0 else Priority.ROUTINE, at=NOW + timedelta(minutes=i))
              for i in range(30)]

    def run():
        stage = Stage(roster)
        for i, event in enumerate(events):
            stage.routed(event)
            if i % 10 == 9:
                stage.tick(event.routed_at + timedelta(seconds=30))
        return {uid: (s.reader_id, s.deadline, tuple(s.reasons)) for uid, s in stage.states.items()}

    assert run() == run()


def test_the_book_rebuilt_from_stored_states_matches_the_one_kept_in_step() -> None:
    stage = Stage(parse_roster({"reader": [reader("dr-a"), reader("dr-b")]}, "r.toml"))
    for i in range(6):
        stage.routed(row(f"s{i}", at=NOW + timedelta(minutes=i)))
    rebuilt = Worklist(stage.worklist.roster, stage.worklist.site_state)
    rebuilt.rebuild(WorklistState.from_dict(s.to_dict()) for s in stage.states.values())
    for rid in ("dr-a", "dr-b"):
        assert rebuilt.book.open_of(rid) == stage.worklist.book.open_of(rid)
