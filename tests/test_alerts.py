"""The alerts stage: a critical alert escalates, level by level, until someone acknowledges it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.codec import Codec
from schemas.events import (Alert, AlertAck, AlertTimer, AuditEvent, CodedConcept, Finding, InferenceResult,
                            InferenceStatus, Priority, trace_id_for)
from schemas.topics import ALERT, AUDIT
from streams.alerts import ESCALATED, Alerts, AlertsState, acknowledge, escalate, open_alert
from streams.state import TypedTable

STUDY = "1.2.826.0.1.3680043.8.498.7"
T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
ACK_WITHIN = timedelta(minutes=10)
CHAIN = ("the on-call supervisor", "the department chief", "the medical director")


def alert(finding: str = "ich", version: int = 1, at: datetime = T0) -> Alert:
    """A critical-finding alert as the results stage raises it."""
    return Alert(trace_id=trace_id_for(STUDY), study_uid=STUDY, version=version, alert_type="critical-finding",
                 severity=Priority.CRITICAL, message=f"AI critical finding {finding}: acknowledge by ...",
                 raised_at=at, finding_code="SCT:1386000", ack_deadline=at + ACK_WITHIN, finding=finding)


def ack(finding: str = "ich", at: datetime = T0 + timedelta(minutes=4), actor: str = "dr-neuro",
        version: int = 1) -> AlertAck:
    return AlertAck(trace_id=trace_id_for(STUDY), study_uid=STUDY, version=version, finding=finding, actor=actor,
                    at=at, note="called the ED attending")


def stage() -> Alerts:
    return Alerts(TypedTable({}, AlertsState, Codec()), ACK_WITHIN, CHAIN, ask_again=timedelta(minutes=1))


def tick(at: datetime) -> AlertTimer:
    return AlertTimer(study_uid=STUDY, due_at=at)


def of(outputs, spec) -> list:
    return [event for topic, event in outputs if topic is spec]


def test_the_results_stage_raises_each_critical_finding_with_its_label_and_deadline() -> None:
    from streams.results import ResultsState, critical_alerts

    def critical(label: str) -> Finding:
        return Finding(label=label, model="head-ct", model_version="1.0", confidence=0.9, threshold=0.5, critical=True,
                       silent=False, codes=[CodedConcept(scheme="SCT", value="1386000", meaning="ICH")])

    result = InferenceResult(trace_id=trace_id_for(STUDY), study_uid=STUDY, version=1, status=InferenceStatus.OK,
                             findings=[critical("ich"), critical("midline-shift")], models=[], level=3, images=1,
                             queued_ms=0, decode_ms=0, infer_ms=0, latency_ms=0, inferred_at=T0)
    _, raised = critical_alerts(ResultsState(study_uid=STUDY), result, ACK_WITHIN, T0)
    assert [(a.finding, a.ack_deadline, a.escalation_level, a.alert_type) for a in raised] == [
        ("ich", T0 + ACK_WITHIN, 0, "critical-finding"), ("midline-shift", T0 + ACK_WITHIN, 0, "critical-finding")]
    assert raised[0].message.endswith("acknowledge by 2025-03-01T02:10:00+00:00")
    state = open_alert(open_alert(None, raised[0]), raised[1])
    assert set(state.open) == {"ich", "midline-shift"}  # two findings of one version: two alerts to acknowledge


def test_an_alert_unacknowledged_past_its_deadline_escalates_to_the_on_call_supervisor() -> None:
    state = open_alert(None, alert())
    assert escalate(state, T0 + timedelta(minutes=9), ACK_WITHIN, CHAIN) == (state, [])  # not yet
    later, (raised,) = escalate(state, T0 + timedelta(minutes=10), ACK_WITHIN, CHAIN)
    assert raised.alert_type == ESCALATED and raised.escalation_level == 1 and raised.severity is Priority.CRITICAL
    assert (raised.study_uid, raised.version, raised.finding, raised.finding_code) == (STUDY, 1, "ich", "SCT:1386000")
    assert raised.raised_at == T0 + timedelta(minutes=10)
    assert raised.ack_deadline == T0 + timedelta(minutes=20)  # the next deadline: alert_ack_s from now
    assert "unacknowledged for 10 min: escalate to the on-call supervisor (escalation 1 of 3)" in raised.message
    assert later.open["ich"].alert == raised and later.open["ich"].first_raised_at == T0


def test_escalation_climbs_the_chain_and_stops_at_its_last_name() -> None:
    state = open_alert(None, alert())
    messages = []
    for minutes in (10, 20, 30):
        state, (raised,) = escalate(state, T0 + timedelta(minutes=minutes), ACK_WITHIN, CHAIN)
        messages.append(raised.message)
    assert "unacknowledged for 20 min: escalate to the department chief" in messages[1]
    assert "unacknowledged for 30 min: escalate to the medical director (escalation 3 of 3)" in messages[2]
    assert escalate(state, T0 + timedelta(hours=5), ACK_WITHIN, CHAIN) == (state, [])  # no one left to call
    assert state.open["ich"].alert.escalation_level == 3  # still open: on the list until acknowledged


def test_an_acknowledgement_of_the_finding_on_any_version_closes_it_and_keeps_it_closed() -> None:
    state = open_alert(open_alert(None, alert("ich")), alert("pneumothorax"))
    state, closed = acknowledge(state, ack("ich", version=2))
    assert closed.alert.finding == "ich" and set(state.open) == {"pneumothorax"}
    assert escalate(state, T0 + timedelta(minutes=10), ACK_WITHIN, CHAIN)[1][0].finding == "pneumothorax"
    # a later version's alert of the acknowledged finding stays closed
    assert open_alert(state, alert("ich", version=2, at=T0 + timedelta(minutes=30))) == state
    # the first acknowledgement stays the record
    assert acknowledge(state, ack("ich", actor="dr-late"))[0].acknowledged["ich"].actor == "dr-neuro"


def test_an_acknowledgement_before_its_alert_arrives_keeps_the_alert_closed() -> None:
    state, closed = acknowledge(None, ack())
    assert closed is None and open_alert(state, alert()) == state and state.open == {}


def test_redeliveries_and_the_stages_own_escalation_read_back_change_nothing() -> None:
    state = open_alert(None, alert())
    assert open_alert(state, alert()) == state
    escalated, (raised,) = escalate(state, T0 + timedelta(minutes=10), ACK_WITHIN, CHAIN)
    assert open_alert(escalated, raised) == escalated
    # a later version's first alert of a finding already escalating does not reset its clock
    assert open_alert(escalated, alert(version=2, at=T0 + timedelta(minutes=11))) == escalated


def test_alerts_without_a_finding_or_a_deadline_are_not_followed() -> None:
    breach = alert().replace(alert_type="turnaround-breach", finding=None, ack_deadline=None)
    assert open_alert(None, breach) is None


def test_the_stage_over_its_table_ticks_escalates_and_audits() -> None:
    """The handlers the runner calls, over a dict: the clock ticks once the deadline passes, the
    tick escalates (a new alert and its audit), an acknowledgement closes it and is audited once."""
    alerts = stage()
    assert alerts.on_alert(alert()) == []
    assert alerts.due_ticks(T0 + timedelta(minutes=9)) == []
    (due,) = alerts.due_ticks(T0 + timedelta(minutes=10))
    assert due == tick(T0 + timedelta(minutes=10))
    assert alerts.due_ticks(T0 + timedelta(minutes=10, seconds=5)) == []  # asked already
    outputs = alerts.on_tick(due)
    (raised,) = of(outputs, ALERT)
    (audit,) = of(outputs, AUDIT)
    assert raised.escalation_level == 1 and raised.ack_deadline == T0 + timedelta(minutes=20)
    assert isinstance(audit, AuditEvent) and audit.action == "alert-escalated" and audit.actor == "radstream"
    assert audit.trace_id == raised.trace_id and audit.study_uid == STUDY
    assert audit.detail["escalate_to"] == "the on-call supervisor" and audit.detail["unacknowledged_s"] == "600"
    assert alerts.on_tick(due) == []  # a tick again: the deadline moved on
    assert alerts.on_alert(raised) == []  # the escalation read back from the alert topic
    assert alerts.due_ticks(T0 + timedelta(minutes=15)) == []

    (acked,) = of(alerts.on_ack(ack(at=T0 + timedelta(minutes=12))), AUDIT)
    assert (acked.action, acked.actor, acked.stage) == ("alert-acknowledged", "dr-neuro", "alerts")
    assert acked.detail == {"finding": "ich", "version": "1", "closed_version": "1", "escalation_level": "1",
                            "acknowledged_after_s": "720", "note": "called the ED attending"}
    assert alerts.on_ack(ack(at=T0 + timedelta(minutes=12))) == []  # re-delivered: audited once
    (again,) = of(alerts.on_ack(ack(at=T0 + timedelta(minutes=13), actor="ops")), AUDIT)
    assert again.detail["closed"].startswith("none: acknowledged already by dr-neuro")
    assert alerts.due_ticks(T0 + timedelta(hours=1)) == []
    assert alerts.on_tick(tick(T0 + timedelta(hours=1))) == []


def test_the_clock_rebuilds_its_deadlines_from_the_table_when_partitions_move() -> None:
    first = stage()
    first.on_alert(alert())
    second = Alerts(first.states, ACK_WITHIN, CHAIN, ask_again=timedelta(minutes=1))  # another worker, same table
    assert [t.study_uid for t in second.due_ticks(T0 + timedelta(minutes=10))] == [STUDY]
    # a tick lost on the way is asked for again
    assert second.due_ticks(T0 + timedelta(minutes=10, seconds=30)) == []
    assert len(second.due_ticks(T0 + timedelta(minutes=11))) == 1


def test_state_round_trips_through_the_table_codec() -> None:
    state, _ = escalate(open_alert(None, alert()), T0 + timedelta(minutes=10), ACK_WITHIN, CHAIN)
    state, _ = acknowledge(open_alert(state, alert("pneumothorax")), ack("ich"))
    assert AlertsState.from_dict(state.to_dict()) == state
