"""What became of a synthetic traffic run: the warehouse's view of every study sent, and the report.

:func:`await_pipeline` polls the worklist for the studies a :class:`~radstream.traffic_run.TrafficRunner`
sent until each is complete there -- every acknowledged instance, its order joined (the reason
for exam is the order's), its AI pre-read done -- or the wait times out; what is still missing
is listed study by study. :func:`stage_times` reads when each stage first started and finished
for those studies (named query ``traffic_stage_times``) and :func:`stage_latencies` turns them
into p50/p95/p99 per stage: the stage's own time, from the stage it follows, and the time since
the generator sent the study's first image. :func:`sent_lines` and :func:`pipeline_lines` are
the command's report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from radstream.traffic import OrderTiming, Spread
from radstream.traffic_run import RunReport
from schemas.settings import Settings

#: Studies per warehouse query (their UIDs travel as one Array(String) URL parameter).
_UIDS_PER_QUERY = 200

#: Pipeline stages in the order a study passes them, and the stage each one's own time starts
#: from: de-identification and routing both follow assembly; the AI pre-read follows
#: de-identification and re-routes the study when it is done.
STAGES = ("received", "assembled", "deidentified", "ai", "routed")
WAITS_ON = {"received": None, "assembled": "received", "deidentified": "assembled", "ai": "deidentified",
            "routed": "assembled"}


@dataclass(frozen=True)
class StageLatency:
    stage: str
    own: Spread  # from the stage it waits on (received: first to last instance received)
    since_sent: Spread  # from the generator's first send of the study


def stage_latencies(sent_at: Mapping[str, float],
                    times: Mapping[str, Mapping[str, tuple[float, float]]]) -> list[StageLatency]:
    """Per stage, in pipeline order, over the studies that reached it."""
    out = []
    for stage in STAGES:
        own, since = [], []
        for uid, stages in times.items():
            if stage not in stages or uid not in sent_at:
                continue
            started, finished = stages[stage]
            before = WAITS_ON[stage]
            if before is None:
                own.append(finished - started)
            elif before in stages:
                own.append(finished - stages[before][1])
            since.append(finished - sent_at[uid])
        out.append(StageLatency(stage, Spread.of(own), Spread.of(since)))
    return out


@dataclass(frozen=True)
class Arrival:
    """One sent study as the warehouse has it."""

    row: dict[str, Any] | None
    expected_instances: int
    ordered: bool  # its order was acknowledged
    ai: bool  # the AI stage runs

    @property
    def missing(self) -> str | None:
        """Why the study is not (yet) complete on the worklist, or None."""
        if self.row is None:
            return "not on the worklist"
        if self.row["instance_count"] < self.expected_instances:
            return f"{self.row['instance_count']} of {self.expected_instances} instances on the worklist"
        if self.ordered and not self.row.get("reason_for_exam"):
            return "its order is not joined"
        if self.ai and self.row.get("ai_status") == "PENDING":
            return "AI pre-read pending"
        return None


def worklist_rows(settings: Settings, study_uids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The worklist row of each of ``study_uids`` that has one."""
    from adapters.warehouse import query_rows

    rows = {}
    for i in range(0, len(study_uids), _UIDS_PER_QUERY):
        for row in query_rows(settings, "traffic_worklist", study_uids=list(study_uids[i:i + _UIDS_PER_QUERY])):
            rows[row["study_uid"]] = row
    return rows


def await_pipeline(settings: Settings, report: RunReport, timeout_s: float,
                   on_progress: Callable[[int, int], None] | None = None) -> dict[str, Arrival]:
    """Poll the worklist until every study sent is complete on it, or ``timeout_s`` passes."""
    expected = {r.identity.study_uid: r for r in report.records if r.instances_acked}
    deadline = time.monotonic() + timeout_s
    while True:
        rows = worklist_rows(settings, list(expected))
        arrivals = {uid: Arrival(rows.get(uid), r.instances_acked, r.order_acked_at is not None, settings.ai.enabled)
                    for uid, r in expected.items()}
        complete = sum(a.missing is None for a in arrivals.values())
        if on_progress:
            on_progress(complete, len(expected))
        if complete == len(expected) or time.monotonic() >= deadline:
            return arrivals
        time.sleep(1.0)


def stage_times(settings: Settings, study_uids: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """study -> stage -> (first started, first finished), epoch seconds, from ``stage_times``."""
    from adapters.warehouse import query_rows

    times: dict[str, dict[str, tuple[float, float]]] = {}
    for i in range(0, len(study_uids), _UIDS_PER_QUERY):
        for row in query_rows(settings, "traffic_stage_times", study_uids=list(study_uids[i:i + _UIDS_PER_QUERY])):
            started, finished = _epoch(row["started_at"]), _epoch(row["finished_at"])
            times.setdefault(row["study_uid"], {})[row["stage"]] = (started, finished)
    return times


def _epoch(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


# ---------------------------------------------------------------- the report, as lines of text


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def spread_text(spread: Spread) -> str:
    return f"p50 {_s(spread.p50)} s, p95 {_s(spread.p95)} s, p99 {_s(spread.p99)} s"


def sent_lines(report: RunReport) -> list[str]:
    """What was sent, what failed, the sustained rate and how the schedule held."""
    records = report.records
    failed = [r for r in records if r.failures]
    window = report.send_window_s()
    studies_acked = sum(r.acked_at is not None and r.instances_acked > 0 for r in records)
    orders = sum(r.planned.order is not OrderTiming.NONE for r in records)
    planned = sum(r.planned.instances for r in records)
    lines = [f"sent {len(records)} studies: {report.instances_acked:,} of {planned:,} instances acknowledged, "
             f"{report.orders_acked} of {orders} orders acknowledged; "
             f"{len(failed)} studies with failures ({len(report.failures)} failures)"]
    if window > 0:
        lines.append(f"sustained: {studies_acked * 3600 / window:,.0f} studies/h, "
                     f"{report.instances_acked / window:,.1f} instances/s over {window:.1f} s "
                     "(first image sent to last acknowledged)")
    lag = report.schedule_lag()
    lines.append(f"schedule lag (first image sent - planned): {spread_text(lag)}")
    if lag.p95 is not None and lag.p95 > 5:
        lines.append("note: studies waited for a free sender: the gateways did not keep up with the plan "
                     "(more --senders only helps when they have capacity left)")
    lines.append(f"send time per study (first image sent to last acknowledged): {spread_text(report.send_time())}")
    retried = [(r, note) for r in records for note in r.retries]
    if retried:
        lines.append(f"retried: {len(retried)} sends in {len({r.planned.index for r, _ in retried})} studies "
                     "(sent again; what still failed is listed as failed)")
        for record, note in retried[:10]:
            lines.append(f"  retry: study {record.planned.index} {record.identity.accession_number} "
                         f"({record.planned.modality}, {record.planned.site}): {note}")
        if len(retried) > 10:
            lines.append(f"  ... and {len(retried) - 10} more (--records lists every one)")
    for record, failure in report.failures:
        lines.append(f"failed: study {record.planned.index} {record.identity.accession_number} "
                     f"({record.planned.modality}, {record.planned.site}, {record.planned.transport.value}): {failure}")
    return lines


def pipeline_lines(report: RunReport, arrivals: Mapping[str, Arrival], waited_s: float,
                   latencies: Sequence[StageLatency]) -> list[str]:
    """Nothing lost? Every sent study on the worklist, its order joined, STAT prioritised; then the stages."""
    by_uid = {r.identity.study_uid: r for r in report.records}
    complete = [uid for uid, a in arrivals.items() if a.missing is None]
    ordered = [uid for uid, a in arrivals.items() if a.ordered]
    joined = [uid for uid in ordered if arrivals[uid].row and arrivals[uid].row.get("reason_for_exam")]
    stat = [uid for uid in arrivals if by_uid[uid].planned.stat and by_uid[uid].order_acked_at is not None]
    prioritised = [uid for uid in stat if (row := arrivals[uid].row) and row["priority"] in ("URGENT", "CRITICAL")
                   and any("order-stat" in reason for reason in row.get("reasons") or [])]
    lines = [f"pipeline: {len(complete)} of {len(arrivals)} studies sent are complete on the worklist "
             f"(every instance, order joined, AI done); orders joined {len(joined)} of {len(ordered)}; "
             f"STAT prioritised {len(prioritised)} of {len(stat)}; waited {waited_s:.1f} s after the last send"]
    routed = [a.row["routed_at"] for a in arrivals.values() if a.row]
    received = [a.row["received_at"] for a in arrivals.values() if a.row]
    if len(routed) > 1:
        span = _epoch(max(routed)) - _epoch(min(received))
        if span > 0:
            lines.append(f"through the pipeline: {len(routed)} studies routed in {span:.1f} s "
                         f"(first received to last routed) = {len(routed) * 3600 / span:,.0f} studies/h")
    lines.append(f"{'stage':<13} {'studies':>7}  {'own p50':>8} {'p95':>7} {'p99':>7}  {'since sent p50':>14} "
                 f"{'p95':>7} {'p99':>7}")
    for item in latencies:
        own, since = item.own, item.since_sent
        lines.append(f"{item.stage:<13} {since.count:>7}  {_s(own.p50):>8} {_s(own.p95):>7} {_s(own.p99):>7}  "
                     f"{_s(since.p50):>14} {_s(since.p95):>7} {_s(since.p99):>7}")
    lines.append("(seconds; own: from the stage it follows -- received: first to last instance; "
                 "since sent: from the study's first image sent)")
    for uid, arrival in sorted(arrivals.items(), key=lambda kv: by_uid[kv[0]].planned.index):
        if arrival.missing is not None:
            r = by_uid[uid]
            lines.append(f"missing: study {r.planned.index} {r.identity.accession_number} {uid} "
                         f"({r.planned.modality}, {r.planned.site}): {arrival.missing}")
    return lines
