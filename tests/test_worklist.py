"""The worklist stage's decisions over routed rows: assignment, re-assessment, the clock, replay.

The roster and the rows are real (the routing stage's own rows, from :func:`streams.route.route`);
only the Faust table around :class:`streams.worklist.Worklist` is replaced by a dict.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from schemas.events import Priority, ReaderFeedback, ReadingAction, WorklistUpdate, finding_text
from streams.roster import parse_roster
from streams.worklist import NO_ROSTER, Refused, Worklist, WorklistState, audit_of

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

    def act(self, uid: str, who: str, action: ReadingAction, minutes: int, fid: str | None = None, **extra):
        feedback = ReaderFeedback(feedback_id=fid or f"{uid}-{who}-{action.value}-{minutes}", trace_id=f"t-{uid}",
                                  study_uid=uid, version=1, reader_id=who, action=action,
                                  at=NOW + timedelta(minutes=minutes), source_site="SITE_A", **extra)
        outcome = self.worklist.feedback(self.states.get(uid), feedback)
        if outcome is not None and not isinstance(outcome, Refused):
            self.keep([outcome])
        return outcome


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


AI_ROW = ("ai-critical: priority=CRITICAL",)


def ai_row(uid: str) -> WorklistUpdate:
    return replace(row(uid, Priority.CRITICAL, reasons=AI_ROW), ai_status="OK",
                   ai_findings=[finding_text("hemorrhage", 0.93, "demo-head-ct", "1.0.0"),
                                finding_text("mass_effect", 0.71, "demo-head-ct", "1.0.0")])


def test_the_reading_loop_claims_decides_each_finding_and_signs_with_an_audit_of_each_step() -> None:
    stage = Stage(parse_roster({"reader": [reader("dr-a"), reader("dr-b")]}, "r.toml"))
    assigned = stage.routed(ai_row("s1")).assigned_reader
    other = "dr-b" if assigned == "dr-a" else "dr-a"
    assert isinstance(stage.act("s1", assigned, ReadingAction.OPEN, 1), Refused)  # not claimed yet
    stage.act("s1", assigned, ReadingAction.CLAIM, 2)
    assert stage.states["s1"].published().status == "IN_PROGRESS"
    refused = stage.act("s1", other, ReadingAction.CLAIM, 3)
    assert isinstance(refused, Refused) and refused.reason == f"in progress by {assigned}"
    stage.act("s1", assigned, ReadingAction.OPEN, 4)
    stage.act("s1", assigned, ReadingAction.ACCEPT, 5, finding="hemorrhage", score=0.93)
    stage.act("s1", assigned, ReadingAction.MODIFY, 6, finding="mass_effect", modified_to="mild mass effect")
    unknown = stage.act("s1", assigned, ReadingAction.REJECT, 7, finding="pneumothorax")
    assert "no AI finding 'pneumothorax' in version 1" in unknown.reason
    stage.act("s1", assigned, ReadingAction.SIGN, 9, report_text="Acute hemorrhage.")
    signed = stage.states["s1"].published()
    assert (signed.status, signed.assigned_reader) == ("SIGNED", assigned)
    assert (signed.opened_at, signed.signed_at) == (NOW + timedelta(minutes=4), NOW + timedelta(minutes=9))
    assert signed.reader_decisions == ["hemorrhage: ACCEPT", "mass_effect: MODIFY -> mild mass effect"]
    assert stage.worklist.book.get("s1") is None  # off the reader's open list
    assert [a.action for a in stage.audit[1:]] == ["reader-claim", "reader-open", "reader-accept", "reader-modify",
                                                   "reader-sign"]
    assert all(a.actor == assigned and a.stage == "reading" and a.trace_id == "t-s1" for a in stage.audit[1:])
    assert stage.audit[-1].detail["undecided_findings"] == ""
    assert isinstance(stage.act("s1", assigned, ReadingAction.RELEASE, 10), Refused)  # signed is final


def test_a_replayed_action_changes_nothing_and_a_release_puts_the_study_back_unread() -> None:
    stage = Stage(parse_roster({"reader": [reader("dr-a")]}, "r.toml"))
    stage.routed(ai_row("s1"))
    claim = stage.act("s1", "dr-a", ReadingAction.CLAIM, 1, fid="f-1")
    assert claim.action == "reader-claim"
    assert stage.act("s1", "dr-a", ReadingAction.CLAIM, 1, fid="f-1") is None  # the same feedback again
    stage.act("s1", "dr-a", ReadingAction.RELEASE, 2)
    released = stage.states["s1"].published()
    assert (released.status, released.assigned_reader) == ("UNREAD", "dr-a")
    assert stage.worklist.book.get("s1").status == "UNREAD"


def test_claiming_another_readers_study_moves_it_and_says_so() -> None:
    stage = Stage(parse_roster({"reader": [reader("dr-a")]}, "r.toml"))
    stage.routed(ai_row("s1"))
    moved = stage.act("s1", "dr-z", ReadingAction.CLAIM, 3)
    assert moved.previous_reader == "dr-a" and moved.state.reader_id == "dr-z"
    assert moved.state.reasons[0] == "claimed by dr-z (was dr-a)"
    assert stage.worklist.book.get("s1").reader_id == "dr-z"
    assert isinstance(stage.worklist.feedback(None, moved.feedback), Refused)  # unknown study
