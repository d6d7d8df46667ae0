"""The worklist stage: every routed study onto a reader's list, and kept there as the network changes.

Routing (:mod:`streams.route`) decides a study's priority and subspecialty and publishes
its row on ``worklist.routed``; this stage decides whose list it goes on
(:func:`streams.assign.assign`: licensure, credentials, shift, capacity, then a score
over SLA slack, queue depth and subspecialty) and publishes the row the sink writes, on
``worklist.update``, with the reader, the SLA deadline and the reasons. Each decision
is also an :class:`AuditEvent` carrying its full explanation (every filter with the
readers it excluded, every candidate's score terms).

Assignment needs the whole network at once (every reader's queue), so its topics have
one key (``TopicSpec.fixed_key``) and one worker keeps the state: per study, a
:class:`WorklistState` in a table, and in memory a :class:`QueueBook` rebuilt from the
table whenever partitions are assigned. A clock (``assignment.tick``, read in stream
order with the studies) runs aging, shift ends and retries of unassigned studies; its
time, like a routed row's ``routed_at``, is recorded on the topic, so replaying the
topics makes the same decisions. Without a roster (``routing.roster_file`` unset) the
rows pass through unassigned, with their SLA deadline and the reason.

:class:`Worklist` is the pure part: state in, changed states out, the clock passed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from adapters.telemetry import get_logger
from schemas.events import (AssignmentTick, AuditEvent, ReaderFeedback, ReadingAction, WorklistUpdate,
                           parse_finding_text, utcnow)
from schemas.topics import ASSIGNMENT_TICK, AUDIT, READING_APPLIED, READING_FEEDBACK, WORKLIST_ROUTED, WORKLIST_UPDATE
from streams.assign import Assignment, OpenAssignment, QueueBook, StudyToAssign, age, assign, off_shift, reassign
from streams.roster import RosterReloader, SlaPolicy
from streams.runner import Output, Stage, run_stage
from streams.state import TableState, TypedTable

log = get_logger("radstream.worklist")

#: the rows' reasons (``rule_id: effect``) that make a study STAT or AI-critical for assignment
_STAT_REASON, _CRITICAL_REASON = "order-stat:", "ai-critical:"
#: open statuses: a study on a reader's list until it is signed
OPEN = ("UNREAD", "IN_PROGRESS")
NO_ROSTER = "assignment off: no reader roster (routing.roster_file)"


@dataclass(frozen=True)
class WorklistState(TableState):
    """One study's place on the worklist: its latest routed row and its assignment."""

    study_uid: str
    row: WorklistUpdate  # the latest routed row, as routing published it
    reader_id: str | None = None
    assigned_at: datetime | None = None
    deadline: datetime | None = None
    promoted: bool = False  # aging moved it up to the urgent level of its reader's list
    status: str = "UNREAD"
    reasons: list[str] = field(default_factory=list)
    updated_at: datetime | None = None
    opened_at: datetime | None = None
    signed_at: datetime | None = None
    decisions: dict[str, str] = field(default_factory=dict)  # AI finding label -> the reader's decision
    applied: list[str] = field(default_factory=list)  # feedback ids already applied (a replay applies none twice)

    def published(self) -> WorklistUpdate:
        """The worklist row the sink writes."""
        return replace(self.row, assigned_reader=self.reader_id, assigned_at=self.assigned_at,
                       sla_deadline=self.deadline, assignment_reasons=list(self.reasons), status=self.status,
                       updated_at=self.updated_at, opened_at=self.opened_at, signed_at=self.signed_at,
                       reader_decisions=[f"{label}: {self.decisions[label]}" for label in sorted(self.decisions)])


@dataclass(frozen=True)
class Change:
    """A changed state, and the audit action it is (None: the row changed, not the assignment)."""

    state: WorklistState
    action: str | None = None
    explanation: dict | None = None
    previous_reader: str | None = None
    feedback: ReaderFeedback | None = None  # the reader's action this change applies


@dataclass(frozen=True)
class Refused:
    """A reader's action the study's state does not allow (audited; the worklist is unchanged)."""

    feedback: ReaderFeedback
    reason: str


def study_of(row: WorklistUpdate, site_state: str | None) -> StudyToAssign:
    """What assignment reads of a routed row: STAT order and AI-critical come from its reasons."""
    return StudyToAssign(
        study_uid=row.study_uid, priority=row.priority, subspecialty=row.subspecialty, source_site=row.source_site,
        received_at=row.received_at, stat=any(r.startswith(_STAT_REASON) for r in row.reasons),
        critical_ai=any(r.startswith(_CRITICAL_REASON) for r in row.reasons), patient_state=row.patient_state,
        site_state=site_state, trace_id=row.trace_id)


def _later(previous: datetime | None, now: datetime) -> datetime:
    """The row's new ``updated_at``: ``now``, and always after the last one (the sink keeps the latest)."""
    return now if previous is None or now > previous else previous + timedelta(milliseconds=1)


class Worklist:
    """Assignment over the stage's states; pure but for the :class:`QueueBook` it keeps in step.

    ``roster`` is a callable giving the roster in force (re-read when its file changes), or
    None when assignment is off; ``site_state`` maps a source site to the state it scans in.
    """

    def __init__(self, roster, site_state, promote_within: float = 0.25) -> None:
        self.roster, self.site_state, self.promote_within = roster, site_state, promote_within
        self.book = QueueBook()
        self.unassigned: set[str] = set()
        self.stale = True  # the book must be rebuilt from the table before it is used

    def rebuild(self, states) -> None:
        """The book from stored states (at start and after a rebalance)."""
        self.book, self.unassigned = QueueBook(), set()
        for state in states:
            self._track(state)
        self.stale = False

    def _track(self, state: WorklistState) -> None:
        uid = state.study_uid
        self.book.remove(uid)
        self.unassigned.discard(uid)
        if state.status not in OPEN:
            return
        if state.reader_id is None:
            self.unassigned.add(uid)
        else:
            self.book.add(OpenAssignment(study=study_of(state.row, self.site_state(state.row.source_site)),
                                         reader_id=state.reader_id, deadline=state.deadline,
                                         assigned_at=state.assigned_at, status=state.status, promoted=state.promoted))

    def _decide(self, state: WorklistState, decision: Assignment, now: datetime, action: str,
                prefix: tuple[str, ...] = ()) -> Change:
        reader = decision.reader_id
        changed = replace(state, reader_id=reader, deadline=decision.deadline,
                          assigned_at=now if reader is not None else None,
                          reasons=[*prefix, *decision.reasons], updated_at=_later(state.updated_at, now))
        self._track(changed)
        return Change(changed, action if reader is not None else "unassigned", decision.explanation.to_dict(),
                      decision.previous_reader)

    def routed(self, state: WorklistState | None, row: WorklistUpdate) -> Change | None:
        """A routed row arrives (a new study, or a new routing of one: order, AI, priors).
        An unassigned study is assigned; an assigned one keeps its reader unless its
        urgency changed and it is still unread, when it is assessed again. None: stale."""
        now = row.routed_at
        if state is not None and state.row.version > row.version:
            return None
        roster = self.roster() if self.roster else None
        study = study_of(row, self.site_state(row.source_site))
        if state is None:
            state = WorklistState(study_uid=row.study_uid, row=row)
        previous = study_of(state.row, study.site_state)
        state = replace(state, row=row)
        if roster is None:
            deadline = study.received_at + SlaPolicy().target(study.urgency, study.source_site)
            changed = replace(state, deadline=deadline, reasons=[NO_ROSTER], updated_at=_later(state.updated_at, now))
            return Change(changed)
        if state.reader_id is not None and (state.status != "UNREAD" or previous.urgency == study.urgency):
            changed = replace(state, updated_at=_later(state.updated_at, now))
            self._track(changed)
            return Change(changed)
        prefix: tuple[str, ...] = ()
        if state.reader_id is not None:
            prefix = (f"re-assessed: {previous.urgency} -> {study.urgency}",)
            self.book.remove(state.study_uid)
        return self._decide(state, assign(study, roster, self.book, now), now, "assigned", prefix)

    def tick(self, states, now: datetime) -> list[Change]:
        """The clock: promote aging studies, move those their reader cannot reach in time or
        whose reader went off shift, and retry unassigned ones. ``states`` gives a study's state."""
        roster = self.roster() if self.roster else None
        if roster is None:
            return []
        changes: dict[str, Change] = {}
        aging = age(self.book, roster, now, promote_within=self.promote_within)
        for promotion in aging.promote:
            self.book.promote(promotion.study_uid)
            state = states(promotion.study_uid)
            changes[state.study_uid] = Change(
                replace(state, promoted=True, reasons=[promotion.reason, *state.reasons],
                        updated_at=_later(state.updated_at, now)), "promoted")
        moves = (*off_shift(self.book, roster, now), *aging.reassign)
        for decision in reassign(moves, self.book, roster, now):
            state = changes[decision.study_uid].state if decision.study_uid in changes else states(decision.study_uid)
            changes[state.study_uid] = self._decide(state, decision, now, "reassigned")
        for uid in sorted(self.unassigned, key=lambda u: self._urgency_order(states(u))):
            if uid in changes:
                continue
            state = states(uid)
            decision = assign(study_of(state.row, self.site_state(state.row.source_site)), roster, self.book, now,
                              deadline=state.deadline)
            if decision.reader_id is not None:
                changes[uid] = self._decide(state, decision, now, "assigned")
        return list(changes.values())

    def feedback(self, state: WorklistState | None, action: ReaderFeedback) -> Change | Refused | None:
        """A reader's action (reading API): the study's new state, or why it is refused.
        UNREAD -CLAIM-> IN_PROGRESS -SIGN-> SIGNED, RELEASE back to UNREAD; OPEN and the
        decisions on AI findings only while the reader holds the study. None: applied before."""
        if state is None:
            return Refused(action, "the study is not on the worklist")
        if action.feedback_id in state.applied:
            return None
        reader, kind = action.reader_id, action.action
        if state.status == "SIGNED":
            return Refused(action, f"signed already (by {state.reader_id})")
        holds = state.status == "IN_PROGRESS" and state.reader_id == reader
        if kind is ReadingAction.CLAIM:
            if state.status == "IN_PROGRESS":
                return None if holds else Refused(action, f"in progress by {state.reader_id}")
            changed = replace(state, status="IN_PROGRESS", reader_id=reader)
            if reader != state.reader_id:
                changed = replace(changed, assigned_at=action.at,
                                  reasons=[f"claimed by {reader} (was {state.reader_id or 'unassigned'})",
                                           *state.reasons])
            return self._apply(changed, action, previous_reader=state.reader_id)
        if not holds:
            return Refused(action, f"{reader} does not hold the study (status {state.status}, "
                                   f"reader {state.reader_id or 'none'}): claim it first")
        if kind is ReadingAction.RELEASE:
            return self._apply(replace(state, status="UNREAD"), action)
        if kind is ReadingAction.OPEN:
            return self._apply(replace(state, opened_at=state.opened_at or action.at), action)
        if kind is ReadingAction.SIGN:
            return self._apply(replace(state, status="SIGNED", signed_at=action.at,
                                       opened_at=state.opened_at or action.at), action)
        labels = {f["label"] for f in map(parse_finding_text, state.row.ai_findings) if f is not None}
        if action.finding not in labels:
            return Refused(action, f"no AI finding {action.finding!r} in version {state.row.version} "
                                   f"(findings: {', '.join(sorted(labels)) or 'none'})")
        if kind is ReadingAction.MODIFY and not action.modified_to:
            return Refused(action, "MODIFY needs what the reader reports instead (modified_to)")
        decision = f"MODIFY -> {action.modified_to}" if kind is ReadingAction.MODIFY else kind.value
        return self._apply(replace(state, decisions={**state.decisions, action.finding: decision}), action)

    def _apply(self, changed: WorklistState, action: ReaderFeedback, previous_reader: str | None = None) -> Change:
        changed = replace(changed, applied=[*changed.applied, action.feedback_id],
                          updated_at=_later(changed.updated_at, action.at))
        self._track(changed)
        return Change(changed, f"reader-{action.action.value.lower()}", previous_reader=previous_reader,
                      feedback=action)

    @staticmethod
    def _urgency_order(state: WorklistState) -> tuple:
        return (state.row.priority.rank, state.deadline or state.row.received_at, state.study_uid)


def audit_of(change: Change, now: datetime) -> AuditEvent:
    state = change.state
    detail = {"reader": state.reader_id or "", "deadline": state.deadline.isoformat() if state.deadline else "",
              "reasons": "\n".join(state.reasons), "priority": state.row.priority.value,
              "version": str(state.row.version)}
    if change.previous_reader:
        detail["previous_reader"] = change.previous_reader
    if change.explanation is not None:
        detail["explanation"] = json.dumps(change.explanation, sort_keys=True)
    if change.feedback is not None:
        detail.update(feedback_detail(change.feedback), status=state.status)
        if change.feedback.action is ReadingAction.SIGN:
            undecided = sorted({f["label"] for f in map(parse_finding_text, state.row.ai_findings) if f}
                               - set(state.decisions))
            detail["undecided_findings"] = ",".join(undecided)
        return AuditEvent(trace_id=state.row.trace_id, actor=change.feedback.reader_id, action=change.action,
                          stage="reading", at=change.feedback.at, detail=detail, study_uid=state.study_uid)
    return AuditEvent(trace_id=state.row.trace_id, actor="radstream", action=change.action, stage="worklist",
                      at=now, detail=detail, study_uid=state.study_uid)


def feedback_detail(action: ReaderFeedback) -> dict[str, str]:
    """A reader's action as audit detail: what they did, to which finding, on which version."""
    fields = {"feedback_id": action.feedback_id, "action": action.action.value, "version": str(action.version),
              "finding": action.finding, "model": action.model, "modified_to": action.modified_to,
              "comment": action.comment}
    return {key: value for key, value in fields.items() if value is not None}


def refusal_audit(refused: Refused) -> AuditEvent:
    action = refused.feedback
    return AuditEvent(trace_id=action.trace_id, actor=action.reader_id, action="reader-action-refused",
                      stage="reading", at=action.at, detail={**feedback_detail(action), "reason": refused.reason},
                      study_uid=action.study_uid)


def register(ctx) -> None:
    """Attach the worklist agent (worklist.routed + assignment.tick -> worklist.update + audit) and its clock."""
    settings = ctx.settings
    states = TypedTable.declare(ctx, "worklist-state", WorklistState)
    roster = None
    if settings.routing.roster_file is not None:
        roster = RosterReloader(settings.routing.roster_file).current  # an invalid roster stops the worker at start
    worklist = Worklist(roster, settings.hl7.state_for, settings.routing.promote_within)

    @ctx.app.on_partitions_assigned.connect
    async def _assigned(sender, *args, **kwargs) -> None:
        worklist.stale = True  # another worker may have changed the table meanwhile

    def ready() -> Worklist:
        if worklist.stale:
            worklist.rebuild(state for _, state in states.items())
        return worklist

    def publish(changes: list[Change], now: datetime) -> list[Output]:
        outputs: list[Output] = []
        for change in changes:
            states[change.state.study_uid] = change.state
            outputs.append((WORKLIST_UPDATE, change.state.published()))
            if change.feedback is not None:
                outputs.append((READING_APPLIED, change.feedback))
            if change.action is not None:
                outputs.append((AUDIT, audit_of(change, now)))
                log.info("study " + change.action, trace_id=change.state.row.trace_id, reader=change.state.reader_id,
                         priority=change.state.row.priority.value, reasons=change.state.reasons[-1:])
        return outputs

    def on_routed(row: WorklistUpdate) -> list[Output]:
        change = ready().routed(states.get(row.study_uid), row)
        return publish([change], row.routed_at) if change is not None else []

    def on_tick(tick: AssignmentTick) -> list[Output]:
        return publish(ready().tick(states.__getitem__, tick.at), tick.at)

    def on_feedback(action: ReaderFeedback) -> list[Output]:
        outcome = ready().feedback(states.get(action.study_uid), action)
        if isinstance(outcome, Refused):
            log.warning("reader action refused", trace_id=action.trace_id, reader=action.reader_id,
                        action=action.action.value, reason=outcome.reason)
            return [(AUDIT, refusal_audit(outcome))]
        return publish([outcome], action.at) if outcome is not None else []

    run_stage(ctx, Stage("worklist", (WORKLIST_ROUTED, ASSIGNMENT_TICK, READING_FEEDBACK),
                         {WorklistUpdate: on_routed, AssignmentTick: on_tick, ReaderFeedback: on_feedback}))

    if roster is not None:
        @ctx.app.timer(interval=settings.routing.assignment_tick_s, name="assignment-clock", on_leader=True)
        async def assignment_clock() -> None:
            await ctx.send(ASSIGNMENT_TICK, AssignmentTick(at=utcnow()))


__all__ = ["Change", "NO_ROSTER", "Refused", "Worklist", "WorklistState", "audit_of", "feedback_detail", "refusal_audit",
           "register", "study_of"]
