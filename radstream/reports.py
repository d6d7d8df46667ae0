"""Turnaround, SLA, backlog, AI and discrepancy reports over the warehouse's incremental analytics.

The figures are computed by ClickHouse from the aggregate tables that materialized views
keep up to date (``schemas/clickhouse/070_*.sql`` onward); each report is a named query
(``queries/report_<name>.sql``, or one per grouping where a grouping changes the grain, as
``ai`` per day or per model version and site) with its window, grouping and clock as
server-side parameters. This module validates the request (which report, which grouping, which
window), runs the query and hands back a :class:`Report`: columns and rows, rendered as a
rich table, CSV or JSON by :func:`render`. The clock is passed in, so a report over a
fixed window is reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.settings import Settings

#: the groupings of studies: what a study is (site, modality, ...), who read it, when it came
_STUDY_GROUPINGS = ("site", "modality", "priority", "subspecialty", "reader", "hour")
#: the groupings ``--by`` offers, as the queries name them
GROUPINGS = (*_STUDY_GROUPINGS, "day")


@dataclass(frozen=True)
class Grain:
    """A report's second named query, for the groupings that change what one row is."""

    query: str
    title: str
    groupings: tuple[str, ...]


@dataclass(frozen=True)
class ReportSpec:
    """What one report is: its title, the groupings it accepts and its default one."""

    title: str
    groupings: tuple[str, ...]
    default_by: str | None = None
    #: why the report cannot be produced yet (a feature it needs is not built); None: it can
    unavailable: str | None = None
    #: the groupings answered by another named query than ``report_<name>``
    other_grain: Grain | None = None

    def query_of(self, name: str, by: str | None) -> tuple[str, str]:
        """The named query answering this report grouped ``by``, and its title."""
        if self.other_grain is not None and by in self.other_grain.groupings:
            return self.other_grain.query, self.other_grain.title
        return f"report_{name}", self.title


REPORTS: dict[str, ReportSpec] = {
    "turnaround": ReportSpec("Stage latencies (seconds): each stage's own duration and the time since receipt",
                             _STUDY_GROUPINGS),
    "sla": ReportSpec("SLA compliance: deadline from assignment, else receipt + the priority's target",
                      _STUDY_GROUPINGS),
    "backlog": ReportSpec("Worklist depth: open studies on each list at the end of each step",
                          ("site", "modality", "priority", "subspecialty", "reader"), default_by="reader"),
    # per day (the default) at the grain drift is seen at: model version, backend, site and label;
    # grouped by site, modality, ... the window as a whole per model version and label
    "ai": ReportSpec(
        "AI monitoring per day, model version, site and label, with the readers' agreement",
        ("day", "site", "modality", "priority", "subspecialty", "reader"), default_by="day",
        other_grain=Grain("report_ai_summary", "AI monitoring per model version and label: score drift against "
                          "the window before, readers' agreement and critical findings rejected",
                          ("site", "modality", "priority", "subspecialty", "reader"))),
    "discrepancies": ReportSpec("Studies where AI and the final read disagree: AI findings rejected or modified "
                                "in signed reads, for peer review", ()),
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ReportRequestError(ValueError):
    """A report asked for in a way it cannot answer; the message says what to give instead."""


class ReportUnavailable(RuntimeError):
    """The report needs data that no stage produces yet; the message says which."""


@dataclass(frozen=True)
class Report:
    name: str
    title: str
    since: datetime
    until: datetime
    columns: list[str]
    rows: list[list[Any]]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w`` as a timedelta."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ReportRequestError(f"{text!r} is not a duration like 30m, 24h, 7d")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])


def parse_instant(text: str, now: datetime) -> datetime:
    """A duration back from ``now`` (``24h``) or an ISO 8601 timestamp (UTC when it names no zone)."""
    if _DURATION.match(text):
        return now - parse_duration(text)
    try:
        instant = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReportRequestError(f"{text!r} is neither a duration like 24h or 7d nor an ISO timestamp "
                                 "like 2026-12-01T08:00") from None
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


def run_report(settings: Settings, name: str, *, since: datetime, until: datetime, by: str | None = None,
               step: timedelta = timedelta(hours=1)) -> Report:
    """Run report ``name`` over studies (or days, or steps) in [since, until), grouped ``by``."""
    spec = REPORTS.get(name)
    if spec is None:
        raise ReportRequestError(f"no report {name!r}; one of {', '.join(REPORTS)}")
    if spec.unavailable:
        raise ReportUnavailable(spec.unavailable)
    by = by or spec.default_by
    if by is not None and by not in spec.groupings:
        offered = f"it offers {', '.join(spec.groupings)}" if spec.groupings else "its grouping is fixed"
        raise ReportRequestError(f"the {name} report cannot be grouped by {by}; {offered}")
    if since >= until:
        raise ReportRequestError(f"the window is empty: --since {since.isoformat()} is not before {until.isoformat()}")
    query, title = spec.query_of(name, by)
    parameters: dict[str, Any] = {"since": since, "now": until, "by": by or ""}  # a query may ignore by
    if name == "backlog":
        if step.total_seconds() < 1:
            raise ReportRequestError("--every must be at least 1s")
        steps = (until - since) / step
        if steps > 2000:
            raise ReportRequestError(f"{steps:.0f} steps of {step} from {since.isoformat()}: give a longer --every")
        parameters["step_s"] = int(step.total_seconds())
    columns, rows = _query(settings, query, parameters)
    if "grp" in columns:  # the grouping column is named after what it groups by, or left out
        at = columns.index("grp")
        if by is None:
            columns, rows = columns[:at] + columns[at + 1:], [row[:at] + row[at + 1:] for row in rows]
        else:
            columns[at] = by
    return Report(name, title, since, until, columns, rows)


def _query(settings: Settings, name: str, parameters: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Column names (also of an empty result) and rows of a named query."""
    from adapters.warehouse import connect
    from schemas.sql import named_query

    client = connect(settings)
    try:
        result = client.query(named_query(name), parameters=parameters)
        return list(result.column_names), [list(row) for row in result.result_rows]
    finally:
        client.close()


def render_table(report: Report, rows_table: Callable[[Sequence[str], Sequence[Sequence[Any]]], Any]) -> Any:
    """The rich table of a report, titled with what it shows and its window."""
    table = rows_table(report.columns, report.rows)
    table.title = (f"{report.name}: {report.title}\n"
                   f"{report.since:%Y-%m-%d %H:%M} .. {report.until:%Y-%m-%d %H:%M} UTC")
    return table
