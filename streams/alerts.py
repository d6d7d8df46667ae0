"""Critical alerts until someone acknowledges them: alert + alert.ack + alert.timer -> alert (escalated) + audit.

The results stage (:mod:`streams.results`) raises an :class:`Alert` for each critical AI finding,
with the deadline by which someone must acknowledge it. This stage keeps, per study, the alerts
still open, one per finding (the alert first raised, or its latest escalation), and the
acknowledgements (:class:`AlertAck`, from the reading API): acknowledging a finding, on any version
of the study, closes its alert and keeps later alerts of that finding closed. An alert still open
past its deadline is raised again one ``escalation_level`` higher, naming whom it now calls on
(``results.alert_escalate_to``, one name per level) with a new deadline ``results.alert_ack_s``
later, until the last name has been called. Each escalation and each acknowledgement is audited.

The clock works as assembly's does (:mod:`streams.assemble`): a timer finds the studies with an
alert past its deadline and sends each an :class:`AlertTimer` tick on ``alert.timer``, keyed by
study; the tick comes back in stream order with the study's alerts and acknowledgements and the
agent decides at the tick's time, so an acknowledgement read before the tick always wins. The
stage reads its own escalations back on ``alert``, where they change nothing.

:func:`open_alert`, :func:`acknowledge` and :func:`escalate` are the pure part: state in, state and
events out, the clock passed in; :class:`Alerts` is the stage over its table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from adapters.telemetry import get_logger
from schemas.events import Alert, AlertAck, AlertTimer, AuditEvent, utcnow
from schemas.topics import ALERT, ALERT_ACK, ALERT_TIMER, AUDIT
from streams.runner import Output, Stage, run_stage
from streams.state import TableState, TypedTable

log = get_logger("radstream.alerts")

#: the alert type of a critical-finding alert raised again, unacknowledged
ESCALATED = "critical-finding-escalated"


@dataclass(frozen=True)
class OpenAlert:
    """A finding's alert that no one has acknowledged yet."""

    alert: Alert  # the latest raised: the first, or its last escalation
    first_raised_at: datetime  # when the finding was first alerted: how long it has waited


@dataclass(frozen=True)
class AlertsState(TableState):
    """One study's critical alerts: those open, and the acknowledgements, by finding label."""

    study_uid: str
    open: dict[str, OpenAlert] = field(default_factory=dict)
    acknowledged: dict[str, AlertAck] = field(default_factory=dict)  # the first acknowledgement of each


def open_alert(state: AlertsState | None, alert: Alert) -> AlertsState | None:
    """Keep ``alert`` open under its finding. An alert without a finding or a deadline is not
    one anybody acknowledges (the state is returned as it was); an acknowledged finding stays closed; an
    alert at or below the level already open (a re-delivery, a later version's alert of the same
    finding, this stage's own escalation read back) changes nothing."""
    if alert.finding is None or alert.ack_deadline is None:
        return state
    state = state or AlertsState(study_uid=alert.study_uid)
    current = state.open.get(alert.finding)
    if alert.finding in state.acknowledged or (current and current.alert.escalation_level >= alert.escalation_level):
        return state
    first = current.first_raised_at if current else alert.raised_at
    return replace(state, open={**state.open, alert.finding: OpenAlert(alert, first)})


def acknowledge(state: AlertsState | None, ack: AlertAck) -> tuple[AlertsState, OpenAlert | None]:
    """Close the acknowledged finding's alert and remember the acknowledgement (the first one
    stays the record); returns the alert it closed, None if none was open."""
    state = state or AlertsState(study_uid=ack.study_uid)
    closed = state.open.get(ack.finding)
    return replace(state, open={finding: o for finding, o in state.open.items() if finding != ack.finding},
                   acknowledged={ack.finding: ack, **state.acknowledged}), closed


def escalates(open_: OpenAlert, now: datetime, levels: int) -> bool:
    """Past its deadline, and someone left to escalate it to."""
    deadline = open_.alert.ack_deadline
    return deadline is not None and deadline <= now and open_.alert.escalation_level < levels


def next_deadline(state: AlertsState, levels: int) -> datetime | None:
    """When the clock next has something to say about the study: its earliest deadline that escalates."""
    deadlines = [o.alert.ack_deadline for o in state.open.values()
                 if o.alert.ack_deadline is not None and o.alert.escalation_level < levels]
    return min(deadlines, default=None)


def escalate(state: AlertsState, now: datetime, ack_within: timedelta, escalate_to: tuple[str, ...]
             ) -> tuple[AlertsState, list[Alert]]:
    """Raise every open alert past its deadline again, one level up: whom it calls on now
    (``escalate_to[level - 1]``), how long it has gone unacknowledged, the next deadline."""
    still_open, raised = dict(state.open), []
    for finding, open_ in sorted(state.open.items()):
        if not escalates(open_, now, len(escalate_to)):
            continue
        level = open_.alert.escalation_level + 1
        deadline = now + ack_within
        waited = int((now - open_.first_raised_at).total_seconds() // 60)
        alert = open_.alert.replace(
            alert_type=ESCALATED, raised_at=now, ack_deadline=deadline, escalation_level=level,
            message=f"AI critical finding {finding} unacknowledged for {waited} min: escalate to "
                    f"{escalate_to[level - 1]} (escalation {level} of {len(escalate_to)}); acknowledge by "
                    f"{deadline.isoformat(timespec='seconds')}")
        still_open[finding] = replace(open_, alert=alert)
        raised.append(alert)
    return replace(state, open=still_open), raised


def escalation_audit(alert: Alert, open_: OpenAlert, escalate_to: tuple[str, ...]) -> AuditEvent:
    return AuditEvent(trace_id=alert.trace_id, actor="radstream", action="alert-escalated", stage="alerts",
                      at=alert.raised_at, study_uid=alert.study_uid,
                      detail={"finding": alert.finding or "", "version": str(alert.version),
                              "escalation_level": str(alert.escalation_level),
                              "escalate_to": escalate_to[alert.escalation_level - 1],
                              "unacknowledged_s": str(int((alert.raised_at - open_.first_raised_at).total_seconds())),
                              "ack_deadline": alert.ack_deadline.isoformat() if alert.ack_deadline else ""})


def ack_audit(ack: AlertAck, closed: OpenAlert | None, before: AlertAck | None) -> AuditEvent:
    """What an acknowledgement did: the alert it closed and after how long, or why it closed none."""
    detail = {"finding": ack.finding, "version": str(ack.version)}
    if closed is not None:
        detail.update(closed_version=str(closed.alert.version), escalation_level=str(closed.alert.escalation_level),
                      acknowledged_after_s=str(int((ack.at - closed.first_raised_at).total_seconds())))
    elif before is not None:
        detail["closed"] = f"none: acknowledged already by {before.actor} at {before.at.isoformat()}"
    else:
        detail["closed"] = "none: no alert of this finding open"
    if ack.note:
        detail["note"] = ack.note
    return AuditEvent(trace_id=ack.trace_id, actor=ack.actor, action="alert-acknowledged", stage="alerts", at=ack.at,
                      study_uid=ack.study_uid, detail=detail)


# ---------------------------------------------------------------- the stage over its table


class Alerts:
    """The handlers the runner calls, and the ticks the clock sends. ``deadlines`` indexes the
    table (study -> its next escalating deadline) so the clock never decodes every study's
    state; it is rebuilt from the table whenever partitions move (``stale``)."""

    def __init__(self, states: TypedTable[AlertsState], ack_within: timedelta, escalate_to: tuple[str, ...],
                 ask_again: timedelta) -> None:
        self.states, self.ack_within, self.escalate_to, self.ask_again = states, ack_within, escalate_to, ask_again
        self.deadlines: dict[str, datetime] = {}
        self.stale = True
        # study_uid -> (deadline, when asked): the clock asks once per deadline, again only if the tick seems lost
        self.asked: dict[str, tuple[datetime, datetime]] = {}

    def _store(self, state: AlertsState) -> None:
        self.states[state.study_uid] = state
        deadline = next_deadline(state, len(self.escalate_to))
        if deadline is None:
            self.deadlines.pop(state.study_uid, None)
        else:
            self.deadlines[state.study_uid] = deadline

    def on_alert(self, alert: Alert) -> list[Output]:
        before = self.states.get(alert.study_uid)
        state = open_alert(before, alert)
        if state is not None and state != before:
            self._store(state)
            log.info("alert open", trace_id=alert.trace_id, finding=alert.finding, level=alert.escalation_level,
                     ack_deadline=alert.ack_deadline.isoformat() if alert.ack_deadline else None)
        return []

    def on_ack(self, ack: AlertAck) -> list[Output]:
        before = self.states.get(ack.study_uid)
        first = before.acknowledged.get(ack.finding) if before else None
        if first == ack:
            return []  # a re-delivery: recorded and audited already
        state, closed = acknowledge(before, ack)
        self._store(state)
        log.info("alert acknowledged", trace_id=ack.trace_id, finding=ack.finding, actor=ack.actor,
                 closed_level=closed.alert.escalation_level if closed else None)
        return [(AUDIT, ack_audit(ack, closed, first))]

    def on_tick(self, tick: AlertTimer) -> list[Output]:
        state = self.states.get(tick.study_uid)
        if state is None:
            return []
        state, raised = escalate(state, tick.due_at, self.ack_within, self.escalate_to)
        if not raised:
            return []
        self._store(state)
        outputs: list[Output] = []
        for alert in raised:
            log.warning("alert escalated", trace_id=alert.trace_id, finding=alert.finding, level=alert.escalation_level,
                        escalate_to=self.escalate_to[alert.escalation_level - 1])
            outputs += [(ALERT, alert), (AUDIT, escalation_audit(alert, state.open[alert.finding], self.escalate_to))]
        return outputs

    def due_ticks(self, now: datetime) -> list[AlertTimer]:
        """Ticks for the studies with an alert past its deadline; reads only, because the tick
        travels through the topic to the agent, which decides again."""
        if self.stale:
            self.stale = False
            levels = len(self.escalate_to)
            self.deadlines = {uid: deadline for uid, state in self.states.items()
                              if (deadline := next_deadline(state, levels)) is not None}
        ticks = []
        for study_uid, deadline in self.deadlines.items():
            if deadline > now:
                continue
            previous = self.asked.get(study_uid)
            if previous and previous[0] == deadline and now - previous[1] < self.ask_again:
                continue
            self.asked[study_uid] = (deadline, now)
            ticks.append(AlertTimer(study_uid=study_uid, due_at=now))
        self.asked = {uid: asked for uid, asked in self.asked.items() if uid in self.deadlines}
        return ticks


def register(ctx) -> None:
    """Attach the alerts agent (alert + alert.ack + alert.timer -> alert + audit), its table and its clock."""
    settings = ctx.settings.results
    if not settings.enabled:
        return  # the results stage raises the alerts this stage follows
    alerts = Alerts(TypedTable.declare(ctx, "alerts-open", AlertsState), timedelta(seconds=settings.alert_ack_s),
                    settings.escalation_chain(), ask_again=timedelta(seconds=10 * settings.alert_scan_interval_s))

    @ctx.app.on_partitions_assigned.connect
    async def _assigned(sender, *args, **kwargs) -> None:
        alerts.stale = True  # the table holds other studies now

    @ctx.app.on_rebalance_complete.connect
    async def _recovered(sender, **kwargs) -> None:
        alerts.stale = True  # and now it holds them all (recovery done)

    # Ticks and acknowledgements share the alerts' stream: one study's events in partition order.
    run_stage(ctx, Stage("alerts", (ALERT, ALERT_ACK, ALERT_TIMER),
                         {Alert: alerts.on_alert, AlertAck: alerts.on_ack, AlertTimer: alerts.on_tick}))

    @ctx.app.timer(interval=settings.alert_scan_interval_s, name="alerts-clock")
    async def alerts_clock() -> None:
        for tick in alerts.due_ticks(utcnow()):
            await ctx.send(ALERT_TIMER, tick)
