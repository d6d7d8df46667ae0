"""The dashboard's plots: each a named warehouse query over the last hours and the Plotly figure of its rows.

A series is one named query (``schemas/clickhouse/queries/``: the reports' own queries where they
answer per hour, ``dashboard_*.sql`` where none does) with its window as server-side parameters,
and a pure function from the query's rows to a :class:`plotly.graph_objects.Figure`, which
checks every property as it is built and is drawn in the browser by plotly.js. Every series
is per hour (UTC), over the window :func:`window` gives: the hours up to ``now``, the current
one included; an hour without rows is an hour with nothing to count (0) or to measure (a gap).
Figures hold aggregates only: hours, stages, priorities, reasons, counts and durations, never a study.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import plotly.graph_objects as go

HOUR = timedelta(hours=1)
MAX_HOURS = 168
#: the pipeline's stages in order (report_turnaround.sql's stage_order)
STAGES = ("received", "assembled", "deidentified", "routed", "ai", "opened", "signed")
#: the turnaround plot: to the worklist (routed), AI output, the signed report
TURNAROUND_STAGES = ("routed", "ai", "signed")
PRIORITIES = ("CRITICAL", "URGENT", "ROUTINE")
#: the worklist's priority colours (dashboard.css) on the plots too
PRIORITY_COLOURS = {"CRITICAL": "#c62828", "URGENT": "#ef6c00", "ROUTINE": "#1565c0"}

Row = dict[str, Any]


@dataclass(frozen=True)
class Window:
    """The hours a plot shows: from the start of the first hour to ``until`` (now)."""

    since: datetime
    until: datetime
    hours: tuple[datetime, ...]

    def ends(self) -> list[datetime]:
        """The ends of the window's hour-long steps, the last one at ``until`` (report_backlog.sql's ``ends``)."""
        steps = math.ceil((self.until - self.since) / HOUR)
        return [min(self.since + HOUR * (i + 1), self.until) for i in range(steps)]


def window(now: datetime, hours: int) -> Window:
    """The last ``hours`` hours up to ``now``, the current (partial) hour the last of them."""
    if not 1 <= hours <= MAX_HOURS:
        raise ValueError(f"a plot covers 1 to {MAX_HOURS} hours, not {hours}")
    now = now.astimezone(UTC)
    first = now.replace(minute=0, second=0, microsecond=0) - HOUR * (hours - 1)
    return Window(since=first, until=now, hours=tuple(first + HOUR * i for i in range(hours)))


def hour_of(value: datetime | str) -> datetime:
    """The UTC hour a warehouse value falls in (a DateTime, or a report's ``hour`` grouping as text)."""
    instant = datetime.fromisoformat(value) if isinstance(value, str) else value
    instant = instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)
    return instant.replace(minute=0, second=0, microsecond=0)


def _per_hour(rows: Iterable[Row], key: str, value: Callable[[Row], float | None], hours: tuple[datetime, ...],
              missing: float | None) -> list[float | None]:
    found = {hour_of(row[key]): value(row) for row in rows}
    return [found.get(hour, missing) for hour in hours]


def _layout(title: str, y_title: str, y_type: str = "linear", **extra: Any) -> go.Layout:
    return go.Layout(title={"text": title, "x": 0, "font": {"size": 15}}, height=360,
                     margin={"l": 60, "r": 60, "t": 45, "b": 80}, hovermode="x unified",
                     legend={"orientation": "h", "y": -0.3}, xaxis={"type": "date"},
                     # a log axis labels its powers of ten only: 0.1, 1, 10, 100 minutes
                     yaxis={"title": {"text": y_title}, "type": y_type,
                            **({"rangemode": "tozero"} if y_type == "linear" else {"dtick": 1})},
                     template="plotly_white", **extra)


def _percent_axis(title: str) -> dict[str, Any]:
    return {"title": {"text": title}, "overlaying": "y", "side": "right", "range": [0, 105], "tick0": 0, "dtick": 20,
            "showgrid": False}


def turnaround_figure(rows: list[Row], window: Window) -> go.Figure:
    """report_turnaround by hour of receipt: p50 and p95 minutes from receipt to the worklist,
    to the AI output and to the signed report (log scale: seconds and hours on one plot)."""
    figure = go.Figure(layout=_layout("Turnaround: minutes from receipt (p50, p95)", "minutes", y_type="log"))
    for stage in TURNAROUND_STAGES:
        of_stage = [row for row in rows if row["stage"] == stage]
        if not of_stage:
            continue
        for quantile, dash in (("p50", "solid"), ("p95", "dot")):
            column = f"since_receipt_{quantile}_s"
            figure.add_trace(go.Scatter(
                x=window.hours, y=_per_hour(of_stage, "grp", lambda row, c=column: _minutes(row[c]), window.hours,
                                            None),
                name=f"{stage} {quantile}", mode="lines+markers", line={"dash": dash}, legendgroup=stage))
    return figure


def _minutes(seconds: float | None) -> float | None:
    # a log axis has no 0: a stage done within the same second plots at one millisecond
    return None if seconds is None else round(max(float(seconds), 0.001) / 60, 4)


def sla_figure(rows: list[Row], window: Window) -> go.Figure:
    """report_sla by hour of receipt: the studies signed on time, late, open past their deadline
    and open in time (bars), and the compliance (on time / judged, line, right axis)."""
    figure = go.Figure(layout=_layout("SLA compliance by hour of receipt", "studies", barmode="stack",
                                      yaxis2=_percent_axis("compliance %")))
    for column, label, colour in (("signed_on_time", "signed on time", "#2e7d32"),
                                  ("signed_late", "signed late", "#c62828"),
                                  ("open_overdue", "open, overdue", "#ef6c00"),
                                  ("open_in_time", "open, in time", "#90a4ae")):
        figure.add_trace(go.Bar(x=window.hours, y=_per_hour(rows, "grp", lambda row, c=column: row[c], window.hours,
                                                            0),
                                name=label, marker={"color": colour}, opacity=0.8))
    figure.add_trace(go.Scatter(x=window.hours, y=_per_hour(rows, "grp", lambda row: row["compliance_pct"],
                                                            window.hours, None),
                                name="compliance %", yaxis="y2", mode="lines+markers",
                                line={"color": "#212121", "width": 3}))
    return figure


def throughput_figure(rows: list[Row], window: Window) -> go.Figure:
    """dashboard_throughput: studies finishing each stage for the first time, per hour."""
    figure = go.Figure(layout=_layout("Throughput per stage", "studies per hour"))
    for stage in STAGES:
        of_stage = [row for row in rows if row["stage"] == stage]
        if of_stage:
            figure.add_trace(go.Scatter(x=window.hours, y=_per_hour(of_stage, "hour", lambda row: row["studies"],
                                                                    window.hours, 0),
                                        name=stage, mode="lines+markers"))
    return figure


def backlog_figure(rows: list[Row], window: Window) -> go.Figure:
    """report_backlog by priority, hourly: the open studies at the end of each hour (bars) and
    how many of them were past their SLA deadline then (line)."""
    ends = window.ends()

    def step(row: Row) -> int:
        at = row["at"] if isinstance(row["at"], datetime) else datetime.fromisoformat(row["at"])
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        return max(math.ceil((at - window.since) / HOUR) - 1, 0)

    figure = go.Figure(layout=_layout("Backlog: open studies at the end of each hour", "open studies",
                                      barmode="stack"))
    overdue = [0] * len(ends)
    for priority in PRIORITIES:
        counts = [0] * len(ends)
        for row in rows:
            if row["grp"] == priority and step(row) < len(ends):
                counts[step(row)] += row["open"]
                overdue[step(row)] += row["overdue"]
        figure.add_trace(go.Bar(x=ends, y=counts, name=priority.lower(), marker={"color": PRIORITY_COLOURS[priority]}))
    figure.add_trace(go.Scatter(x=ends, y=overdue, name="overdue", mode="lines+markers",
                                line={"color": "#212121", "width": 3}))
    return figure


def ai_agreement_figure(rows: list[Row], window: Window) -> go.Figure:
    """dashboard_ai_agreement: readers' final decisions on AI findings per hour (bars) and the
    share accepted as the AI stated them (line, right axis)."""
    figure = go.Figure(layout=_layout("AI agreement: readers' decisions on AI findings", "findings decided",
                                      barmode="stack", yaxis2=_percent_axis("accepted %")))
    for column, label, colour in (("accepted", "accepted", "#2e7d32"), ("modified", "modified", "#f9a825"),
                                  ("rejected", "rejected", "#c62828")):
        figure.add_trace(go.Bar(x=window.hours, y=_per_hour(rows, "hour", lambda row, c=column: row[c],
                                                            window.hours, 0),
                                name=label, marker={"color": colour}, opacity=0.8))
    figure.add_trace(go.Scatter(x=window.hours, y=_per_hour(rows, "hour", lambda row: row["agreement_pct"],
                                                            window.hours, None),
                                name="accepted %", yaxis="y2", mode="lines+markers",
                                line={"color": "#212121", "width": 3}))
    return figure


def dead_letters_figure(rows: list[Row], window: Window) -> go.Figure:
    """dashboard_dead_letters: the events each stage dead-lettered per hour, one stacked bar per
    stage and reason."""
    figure = go.Figure(layout=_layout("Dead letters by stage and reason", "dead letters per hour", barmode="stack"))
    for stage, reason in sorted({(row["stage"], row["reason"]) for row in rows}):
        of_kind = [row for row in rows if row["stage"] == stage and row["reason"] == reason]
        figure.add_trace(go.Bar(x=window.hours, y=_per_hour(of_kind, "hour", lambda row: row["letters"],
                                                            window.hours, 0),
                                name=f"{stage}: {reason}", opacity=0.8))
    return figure


@dataclass(frozen=True)
class Series:
    """One plot: its named query, the query's parameters for a window, and its figure."""

    query: str
    parameters: Callable[[Window], dict[str, Any]]
    figure: Callable[[list[Row], Window], go.Figure]


def _span(window: Window) -> dict[str, Any]:
    return {"since": window.since, "now": window.until}


SERIES: dict[str, Series] = {
    "turnaround": Series("report_turnaround", lambda w: {**_span(w), "by": "hour"}, turnaround_figure),
    "sla": Series("report_sla", lambda w: {**_span(w), "by": "hour"}, sla_figure),
    "throughput": Series("dashboard_throughput", _span, throughput_figure),
    "backlog": Series("report_backlog", lambda w: {**_span(w), "by": "priority", "step_s": int(HOUR.total_seconds())},
                      backlog_figure),
    "ai-agreement": Series("dashboard_ai_agreement", _span, ai_agreement_figure),
    "dead-letters": Series("dashboard_dead_letters", _span, dead_letters_figure),
}


__all__ = ["MAX_HOURS", "SERIES", "Series", "Window", "ai_agreement_figure", "backlog_figure", "dead_letters_figure",
           "hour_of", "sla_figure", "throughput_figure", "turnaround_figure", "window"]
