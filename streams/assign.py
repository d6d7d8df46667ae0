"""Reader assignment: which radiologist reads a routed study, and why; pure, the clock passed in.

Over 400 lines: the decision, its explanation and the aging that re-enters it are one piece of logic.

Hard filters first, each a set intersection over the roster's indexes (ACR guidance: the
reader must be licensed in the state where the patient is imaged and credentialed at the
sending facility): licensed in the patient's state (PID-11 when the order gives it, else
the site's state), credentialed at the site, on shift now (in the reader's time zone),
below capacity (a STAT/critical study may exceed it when every eligible reader is full);
then the study's subspecialty whenever any eligible reader has it, else a fallback with
the reason. The survivors are scored over SLA slack (would this reader reach the study,
behind what is ahead of it on their list, before its deadline and before their shift
ends?), worklist depth and subspecialty match; ties break on queue depth, then reader id,
so a replay assigns the same readers. A reader's list reads STAT/critical first, then
urgent, then routine, by deadline within a level. Every :class:`Assignment` carries an
:class:`Explanation` (each filter with the readers it excluded, each candidate's score
terms) for the audit, and short reasons for the worklist row. :func:`age` finds studies
nearing their deadline (promoted) and those whose reader cannot meet it (re-assigned);
:func:`off_shift` finds the unread studies of readers whose shift ended; :func:`reassign`
moves them. :class:`QueueBook` is the caller's state of open assignments per reader.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.events import Priority
from streams.roster import Roster, SlaPolicy, canonical_subspecialty

__all__ = ["Assignment", "Candidate", "Explanation", "FilterStep", "OpenAssignment", "Promotion", "QueueBook",
           "Reassignment", "AgingReport", "ScoreWeights", "SlaPolicy", "StudyToAssign", "age", "assign",
           "deadline_of", "license_state", "off_shift", "reassign"]

#: reading levels on a reader's list: 0 STAT/critical, 1 urgent, 2 routine
LEVEL_NAMES = ("STAT/critical", "urgent", "routine")


@dataclass(frozen=True)
class StudyToAssign:
    """What assignment needs of a routed study (RoutingDecision + its order + site table)."""

    study_uid: str
    priority: Priority
    subspecialty: str
    source_site: str
    received_at: datetime  # SLA clock starts at receipt (the turnaround view's start)
    stat: bool = False  # the order says STAT (OBR-27 / TQ1-9 "S")
    critical_ai: bool = False  # an active model's critical finding
    patient_state: str | None = None  # PID-11 state of the patient's address, when given
    site_state: str | None = None  # the state the site scans in (hl7.site_states)
    trace_id: str = ""

    @property
    def urgency(self) -> str:
        if self.priority is Priority.CRITICAL or self.critical_ai:
            return "critical"
        if self.stat:
            return "stat"
        return "urgent" if self.priority is Priority.URGENT else "routine"

    @property
    def level(self) -> int:
        return {"critical": 0, "stat": 0, "urgent": 1, "routine": 2}[self.urgency]


def license_state(study: StudyToAssign) -> tuple[str | None, str]:
    """The state a reader must be licensed in, and where it came from."""
    if study.patient_state:
        return study.patient_state.strip().upper(), "PID-11"
    if study.site_state:
        return study.site_state.strip().upper(), f"site {study.source_site}"
    return None, "unknown"


def deadline_of(study: StudyToAssign, sla: SlaPolicy) -> datetime:
    return study.received_at + sla.target(study.urgency, study.source_site)


@dataclass(frozen=True)
class OpenAssignment:
    """A study on a reader's list, not yet signed."""

    study: StudyToAssign
    reader_id: str
    deadline: datetime
    assigned_at: datetime
    status: str = "UNREAD"  # UNREAD | IN_PROGRESS (an opened study stays with its reader)
    promoted: bool = False  # aging moved it up a level

    @property
    def level(self) -> int:
        return min(self.study.level, 1) if self.promoted else self.study.level

    @property
    def order_key(self) -> tuple:
        """Reading order on the reader's list: opened first, then level, deadline, study."""
        return (self.status != "IN_PROGRESS", self.level, self.deadline, self.study.study_uid)


class QueueBook:
    """Open assignments per reader: the caller's state, updated with :meth:`add` / :meth:`remove`.

    Per reader and level it keeps the deadlines sorted, so "how many studies are ahead of
    a new one on this list" is a bisect, not a scan.
    """

    def __init__(self, assignments: Iterable[OpenAssignment] = ()) -> None:
        self._by_study: dict[str, OpenAssignment] = {}
        self._levels: dict[str, tuple[list, list, list]] = {}
        self._depth: dict[str, int] = {}
        for item in assignments:
            self.add(item)

    def add(self, item: OpenAssignment) -> None:
        if item.study.study_uid in self._by_study:
            self.remove(item.study.study_uid)
        self._by_study[item.study.study_uid] = item
        levels = self._levels.setdefault(item.reader_id, ([], [], []))
        insort(levels[item.level], (item.deadline, item.study.study_uid))
        self._depth[item.reader_id] = self._depth.get(item.reader_id, 0) + 1

    def remove(self, study_uid: str) -> OpenAssignment | None:
        item = self._by_study.pop(study_uid, None)
        if item is not None:
            levels = self._levels[item.reader_id]
            levels[item.level].remove((item.deadline, study_uid))
            self._depth[item.reader_id] -= 1
            if not self._depth[item.reader_id]:
                del self._levels[item.reader_id], self._depth[item.reader_id]
        return item

    def promote(self, study_uid: str) -> None:
        """Apply an aging :class:`Promotion`: the study reads at the urgent level."""
        item = self._by_study.get(study_uid)
        if item is not None and not item.promoted:
            self.add(replace(item, promoted=True))

    def get(self, study_uid: str) -> OpenAssignment | None:
        return self._by_study.get(study_uid)

    def depth(self, reader_id: str) -> int:
        return self._depth.get(reader_id, 0)

    def ahead(self, reader_id: str, level: int, deadline: datetime) -> int:
        """Studies a new one at (level, deadline) would read after on this reader's list."""
        levels = self._levels.get(reader_id)
        if not levels:
            return 0
        return sum(len(levels[i]) for i in range(level)) + bisect_right(levels[level], (deadline, "\uffff"))

    def readers(self) -> list[str]:
        return sorted(self._levels)

    def open_of(self, reader_id: str) -> list[OpenAssignment]:
        """The reader's open studies in reading order."""
        levels = self._levels.get(reader_id, ([], [], []))
        return sorted((self._by_study[uid] for level in levels for _, uid in level), key=lambda a: a.order_key)

    def __len__(self) -> int:
        return len(self._by_study)


# ---------------------------------------------------------------- the decision and its explanation


@dataclass(frozen=True)
class ScoreWeights:
    meets_deadline: float = 4.0  # can reach the study before its deadline and shift end
    slack: float = 2.0  # x slack / SLA target, clipped to [-1, 1]
    depth: float = 1.0  # x open studies / capacity (a penalty)
    subspecialty: float = 1.0  # x match: 1 subspecialist, 0.5 general reader in a fallback, else 0


@dataclass(frozen=True)
class FilterStep:
    """One filter: the readers it was given and those it kept (its exclusions are the difference,
    computed when asked: most decisions are never audited reader by reader)."""

    name: str  # licensed | credentialed | on_shift | capacity | subspecialty
    detail: str  # why a reader it removed was removed: "not licensed in NV"
    before: frozenset[str] = field(repr=False)
    after: frozenset[str] = field(repr=False)

    @property
    def passed(self) -> int:
        return len(self.after)

    @property
    def excluded(self) -> frozenset[str]:
        return self.before - self.after

    def excludes(self, reader_id: str) -> bool:
        return reader_id in self.before and reader_id not in self.after


@dataclass(frozen=True)
class Candidate:
    reader_id: str
    score: float
    meets_deadline: bool
    slack_minutes: float
    ahead: int
    depth: int
    capacity: int
    subspecialty_match: float
    expected_at: datetime  # when this reader would reach the study
    shift_ends_at: datetime


@dataclass(frozen=True)
class Explanation:
    urgency: str
    deadline: datetime
    sla_minutes: float
    license_state: str | None
    license_source: str
    subspecialty: str
    steps: tuple[FilterStep, ...]
    candidates: tuple[Candidate, ...]  # ranked, best first
    fallback: str | None = None

    def why_not(self, reader_id: str) -> str | None:
        """The filter that excluded ``reader_id``, or None if it was a candidate."""
        for step in self.steps:
            if step.excludes(reader_id):
                return step.detail
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready and deterministic (sorted ids): the audit's record of the decision."""
        return {
            "urgency": self.urgency, "deadline": self.deadline.isoformat(), "sla_minutes": self.sla_minutes,
            "license_state": self.license_state, "license_source": self.license_source,
            "subspecialty": self.subspecialty, "fallback": self.fallback,
            "steps": [{"filter": s.name, "detail": s.detail, "passed": s.passed, "excluded": sorted(s.excluded)}
                      for s in self.steps],
            "candidates": [{"reader": c.reader_id, "score": c.score, "meets_deadline": c.meets_deadline,
                            "slack_minutes": c.slack_minutes, "ahead": c.ahead, "depth": c.depth,
                            "capacity": c.capacity, "subspecialty_match": c.subspecialty_match,
                            "expected_at": c.expected_at.isoformat(), "shift_ends_at": c.shift_ends_at.isoformat()}
                           for c in self.candidates],
        }


@dataclass(frozen=True)
class Assignment:
    study_uid: str
    reader_id: str | None  # None: no eligible reader; the study stays unassigned and is retried
    deadline: datetime
    reasons: tuple[str, ...]  # short, for the worklist row
    explanation: Explanation
    previous_reader: str | None = None

    def open(self, study: StudyToAssign, now: datetime) -> OpenAssignment | None:
        """The queue entry to add to the caller's :class:`QueueBook`."""
        if self.reader_id is None:
            return None
        return OpenAssignment(study=study, reader_id=self.reader_id, deadline=self.deadline, assigned_at=now)


def _hhmm(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%MZ")


def assign(study: StudyToAssign, roster: Roster, book: QueueBook, now: datetime, *,
           exclude: frozenset[str] = frozenset(), promoted: bool = False, deadline: datetime | None = None,
           weights: ScoreWeights = ScoreWeights()) -> Assignment:
    """Choose a reader for ``study``; pure (reads ``book``, never changes it). ``exclude``:
    readers not to consider (the one a study is moving from); ``promoted``: aging moved the
    study up to the urgent level of reading lists; ``deadline``: the one it was given when
    first assigned (a moved study keeps it, whatever the SLA policy says now)."""
    if now.tzinfo is None or study.received_at.tzinfo is None:
        raise ValueError("now and received_at must be timezone-aware")
    urgency, site = study.urgency, study.source_site.upper()
    level = min(study.level, 1) if promoted else study.level
    target = roster.sla.target(urgency, site)
    deadline = deadline or study.received_at + target
    subspecialty = canonical_subspecialty(study.subspecialty)
    state, source = license_state(study)
    pool = roster.all_ids - exclude if exclude else roster.all_ids
    steps: list[FilterStep] = []

    def step(name: str, detail: str, before: frozenset[str], after: frozenset[str]) -> frozenset[str]:
        steps.append(FilterStep(name, detail, before, after))
        return after

    licensed = step("licensed", f"not licensed in {state}" if state else "patient state unknown (no PID-11, no site state)",
                    pool, pool & roster.licensed_in(state) if state else frozenset())
    credentialed = step("credentialed", f"not credentialed at {site}", licensed, licensed & roster.credentialed_at(site))
    shift_ends = roster.on_shift(now)
    on_shift = step("on_shift", "off shift", credentialed, frozenset(credentialed & shift_ends.keys()))
    fallbacks = []
    depth, by_id = book.depth, roster.by_id
    below = frozenset(r for r in on_shift if depth(r) < by_id[r].capacity)
    if not below and on_shift and level == 0:
        below = on_shift
        fallbacks.append(f"every eligible reader at capacity: {urgency} study assigned over capacity")
    eligible = step("capacity", "at capacity", on_shift, below)
    specialists = eligible & roster.with_subspecialty(subspecialty)
    if specialists:
        final = step("subspecialty", f"not {subspecialty}", eligible, specialists)
    else:
        final = eligible
        if eligible:
            fallbacks.append(f"no eligible {subspecialty} reader: fell back to {len(eligible)} eligible reader(s)")
    generalists = roster.with_subspecialty("general")
    candidates = sorted(
        (_score(rid, roster, book, now, level, deadline, target, shift_ends[rid], weights,
                1.0 if specialists else 0.5 if rid in generalists else 0.0) for rid in final),
        key=lambda c: (-c.score, c.depth, c.reader_id))
    explanation = Explanation(urgency=urgency, deadline=deadline, sla_minutes=target.total_seconds() / 60,
                              license_state=state, license_source=source, subspecialty=subspecialty,
                              steps=tuple(steps), candidates=tuple(candidates), fallback="; ".join(fallbacks) or None)
    chosen = candidates[0] if candidates else None
    reasons = _reasons(explanation, roster, book, len(pool), chosen, state, site, shift_ends.keys())
    return Assignment(study_uid=study.study_uid, reader_id=chosen.reader_id if chosen else None,
                      deadline=deadline, reasons=reasons, explanation=explanation)


def _score(rid: str, roster: Roster, book: QueueBook, now: datetime, level: int, deadline: datetime,
           target: timedelta, shift_end: datetime, weights: ScoreWeights, match: float) -> Candidate:
    reader = roster.by_id[rid]
    ahead, depth = book.ahead(rid, level, deadline), book.depth(rid)
    expected_at = now + timedelta(minutes=(ahead + 1) * reader.minutes_per_study)
    slack = (min(deadline, shift_end) - expected_at).total_seconds() / 60
    meets = slack >= 0
    score = (weights.meets_deadline * meets
             + weights.slack * max(-1.0, min(1.0, slack / (target.total_seconds() / 60)))
             - weights.depth * depth / reader.capacity
             + weights.subspecialty * match)
    return Candidate(reader_id=rid, score=round(score, 6), meets_deadline=meets, slack_minutes=round(slack, 2),
                     ahead=ahead, depth=depth, capacity=reader.capacity, subspecialty_match=match,
                     expected_at=expected_at, shift_ends_at=shift_end)


def _reasons(explanation: Explanation, roster: Roster, book: QueueBook, total: int, chosen: Candidate | None,
             state: str | None, site: str, on_shift: AbstractSet[str]) -> tuple[str, ...]:
    steps = {s.name: s for s in explanation.steps}
    reasons = [
        f"licensed in {state} ({explanation.license_source}): {steps['licensed'].passed} of {total} readers"
        if state else "patient state unknown: no PID-11 and no state for the site",
        f"credentialed at {site}: {steps['credentialed'].passed}",
        f"on shift: {steps['on_shift'].passed}, below capacity: {steps['capacity'].passed}",
    ]
    subspecialty = explanation.subspecialty
    if "subspecialty" in steps:
        reasons.append(f"subspecialty {subspecialty} matched: {steps['subspecialty'].passed} reader(s)")
    if explanation.fallback:
        reasons.append(explanation.fallback)
    deadline = f"deadline {_hhmm(explanation.deadline)} ({explanation.urgency} {explanation.sla_minutes:g} min)"
    if chosen is None:
        reasons.append(f"unassigned: no eligible reader; {deadline}")
    else:
        reasons.append(f"assigned {chosen.reader_id}: {chosen.ahead} ahead, queue {chosen.depth}/{chosen.capacity}, "
                       f"slack {chosen.slack_minutes:g} min, {deadline}")
    # Subspecialists on shift whom licensure, credentials or capacity excluded, with a shorter
    # queue than the chosen reader's (all of them when none was eligible: they are why the
    # study fell back): say why. Off-shift readers' short queues are no news.
    limit = chosen.depth if chosen and "subspecialty" in steps else None
    passed_over = []
    available = roster.with_subspecialty(subspecialty) & on_shift
    for step in explanation.steps[:4]:  # the hard filters, in order: each reader is in one step's excluded
        for rid in (available & step.before) - step.after:
            depth = book.depth(rid)
            if limit is None or depth < limit:
                passed_over.append((depth, rid, step.detail))
    for depth, rid, why in sorted(passed_over)[:3]:
        reasons.append(f"passed over {rid} ({why}, queue {depth})")
    if len(passed_over) > 3:
        reasons.append(f"passed over {len(passed_over) - 3} more {subspecialty} reader(s) with shorter queues")
    return tuple(reasons)


# ---------------------------------------------------------------- aging and shift changes


@dataclass(frozen=True)
class Promotion:
    study_uid: str
    reader_id: str
    from_level: int
    to_level: int
    minutes_left: float
    reason: str


@dataclass(frozen=True)
class Reassignment:
    study_uid: str
    from_reader: str
    reason: str
    expected_at: datetime | None = None  # when the current reader would reach it (None: never)
    must_move: bool = False  # off shift / off the roster: move whatever the alternative


@dataclass(frozen=True)
class AgingReport:
    promote: tuple[Promotion, ...]
    reassign: tuple[Reassignment, ...]


def age(book: QueueBook, roster: Roster, now: datetime, *, promote_within: float = 0.25) -> AgingReport:
    """Studies to promote (a routine study with under ``promote_within`` of its SLA left moves
    up to urgent) and, with promotions applied, studies their reader will not reach before
    the deadline or the end of their shift: re-assign them (:func:`reassign`). Pure."""
    promote: list[Promotion] = []
    moves: list[Reassignment] = []
    shift_ends = roster.on_shift(now)
    for rid in book.readers():
        items = book.open_of(rid)
        aged = []
        for item in items:
            left = item.deadline - now
            target = item.deadline - item.study.received_at
            if item.status == "UNREAD" and item.level == 2 and left <= target * promote_within:
                promote.append(Promotion(item.study.study_uid, rid, 2, 1, round(left.total_seconds() / 60, 2),
                                         f"promoted to urgent: {left.total_seconds() / 60:.0f} min left of "
                                         f"{target.total_seconds() / 60:.0f}"))
                item = replace(item, promoted=True)
            aged.append(item)
        reader = roster.by_id.get(rid)
        if reader is None or rid not in shift_ends:
            continue  # off shift or off the roster: off_shift() moves these
        for position, item in enumerate(sorted(aged, key=lambda a: a.order_key)):
            if item.status != "UNREAD":
                continue
            expected = now + timedelta(minutes=(position + 1) * reader.minutes_per_study)
            limit = min(item.deadline, shift_ends[rid])
            if expected > limit:
                why = "deadline" if item.deadline <= shift_ends[rid] else "shift end"
                moves.append(Reassignment(item.study.study_uid, rid, f"{rid}'s queue cannot meet the {why}: "
                                          f"{position} ahead, expected {_hhmm(expected)}, {why} {_hhmm(limit)}",
                                          expected_at=expected))
    return AgingReport(tuple(promote), tuple(moves))


def off_shift(book: QueueBook, roster: Roster, now: datetime) -> tuple[Reassignment, ...]:
    """Unread studies of readers who are off shift now, or no longer on the roster."""
    shift_ends = roster.on_shift(now)
    moves = []
    for rid in book.readers():
        if rid in shift_ends:
            continue
        why = "off shift" if rid in roster.by_id else "no longer on the roster"
        moves.extend(Reassignment(item.study.study_uid, rid, f"{rid} {why}: unread study re-assigned", must_move=True)
                     for item in book.open_of(rid) if item.status == "UNREAD")
    return tuple(moves)


def reassign(moves: Sequence[Reassignment], book: QueueBook, roster: Roster, now: datetime, *,
             weights: ScoreWeights = ScoreWeights()) -> list[Assignment]:
    """Move each study of ``moves`` (in order) and update ``book`` as it goes, so later moves
    see earlier ones. A study leaves its reader only for one who reaches it sooner (aging)
    or, when it must move, for anyone eligible; if no one is, it stays unassigned (off the
    book, reader None) and is retried like any unassigned study. Returns what changed."""
    changed = []
    for move in moves:
        current = book.get(move.study_uid)
        if current is None or current.reader_id != move.from_reader:
            continue  # signed, opened or moved since the report
        decision = assign(current.study, roster, book, now, exclude=frozenset({move.from_reader}),
                          promoted=current.promoted, deadline=current.deadline, weights=weights)
        best = decision.explanation.candidates[0] if decision.explanation.candidates else None
        if not move.must_move and (best is None or move.expected_at is None or best.expected_at >= move.expected_at):
            continue  # nobody reaches it sooner: it stays, promoted if aging said so
        book.remove(move.study_uid)
        decision = replace(decision, previous_reader=move.from_reader,
                           reasons=(f"re-assigned from {move.from_reader}: {move.reason}", *decision.reasons))
        if decision.reader_id is not None:
            book.add(OpenAssignment(study=current.study, reader_id=decision.reader_id, deadline=current.deadline,
                                    assigned_at=now, promoted=current.promoted))
        changed.append(decision)
    return changed
