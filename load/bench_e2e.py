"""Benchmark: end-to-end latency of the whole durable ``radstream up``, from the last C-STORE
response to the study's worklist row, and whether it sustains mixed traffic (issue 20).

In one run it starts ``radstream up`` on its durable default (blobs and the broker's log on
the embedded SeaweedFS) on its own data dir and free ports, sends one warm-up study, and then
three rows, each through the real DICOM gateway (and, for the third, HL7 orders over MLLP) with
the synthetic-traffic sender of ``radstream load generate`` (:mod:`radstream.traffic_run`):

1. **announced**: ``--studies`` small CT studies (pydicom's CT_small, a localizer and two
   slices) one every ``--interval`` s, NumberOfStudyRelatedInstances (0020,1208) in every
   instance, so assembly completes at the last one. Target: p99 <= 2 s.
2. **quiet period**: the same studies without it: assembly completes after
   ``assembly.quiet_period_s`` (read from the settings). Target: p99 <= quiet period + 2 s.
3. **sustained**: ``--rate`` studies/h (default 5,000) of the default mix (CR 1-3 views, DX,
   CT 100-300 slices after a localizer, MR 3-6 series of 20-40 images, each count times
   ``--scale``), 90 % with an HL7 order, Poisson arrivals over ``--duration`` s. Nothing may be
   lost: every acknowledged study must reach the worklist with all its instances (and its
   order joined, its AI pre-read done). Whether the backlog grew: the studies acknowledged
   but not yet routed at each quarter of the sending, and the latency of the last third of
   the studies against the first third's; grown when that rose by more than max(2 s, 50 %)
   or the senders fell behind the plan (p95 over 5 s). It prints the rate sustained and, as far
   as one run tells, the highest rate without backlog growth: the achieved rate when the
   backlog stayed bounded (a lower bound), else the rate the pipeline routed at while
   backlogged (about its capacity).

Latency per study is ``routed - last C-STORE response``: the response time is the sender's
wall clock (time.time()) when pynetdicom returned the study's last C-STORE status; ``routed``
is the first ``routed`` time in the warehouse's ``stage_times`` table, which is the
``routed_at`` of the study's first worklist row version (the routing stage's wall clock on
this same machine; later versions, re-routed by the order or the AI result, do not count).
The bottleneck of each row is the stage with the largest p95 of its own time on the path to
that row: ``assembled`` (last instance received -> assembled) or ``routed`` (assembled ->
routed); de-identification and the AI pre-read run beside routing (AI never holds a study
back) and are printed for reference. Memory: each child of ``radstream up``'s peak RSS
(VmHWM, summed over the child and its descendants), and its RSS at the start and the end of
the sustained sending, so growth over the run shows.

    python -m load.bench_e2e [--studies 20] [--interval 2] [--rate 5000/h] [--duration 300]
                             [--scale 0.1] [--wait-timeout 300]

The default ``--scale`` is 0.1 (CT 10-30 slices, MR 2-4 images per series): at the issue's
sizes (``--scale 1``) 5,000 studies/h is about 130 instances/s, over twice what the whole
runtime ingests on the 2-core dev machine (``load/bench_ingest.py``).

Measured 2026-12-06 on the 2-core dev machine, defaults but ``--duration 120`` (a shorter
sustained phase than the issue's 5 minutes; 165 studies, 1,714 instances planned), another
engineer's work running beside it (load average 2.0 at the start), one run:

    row            p50     p95     p99    target              bottleneck (own p95)
    announced      1.18    1.40    1.61   p99 <= 2 s: met     routed 0.83 s (56 %); assembled 0.65
    quiet period   6.82    7.19    7.21   p99 <= 7 s: MISSED  assembled 6.43 s (89 %): the 5 s quiet
                                                              period + its 0.5 s scan; routed 0.83
    sustained      5.00   13.09   14.85   nothing lost: met   routed 8.34 s (51 %), assembled 8.17;
                                                              deidentified 43.8 s beside the path

Sustained: 165 of 165 studies complete on the worklist (lost 0, send failures 0), but sent at
3,134 studies/h (9.0 inst/s) against 4,950/h offered: the senders fell behind the plan (p95
30.8 s: the DICOM gateway did not keep up) and the latency of the last third of the studies
(p50 10.65 s) was five times the first third's (2.12 s): backlog GREW; the pipeline routed
3,573 studies/h while backlogged, about its capacity at ``--scale 0.1`` on this machine
(``radstream load generate`` sustained 5,000/h at that scale on a quieter machine). Every
assembled-to-routed time of the latency rows is the same ~0.8 s, the flat interval issue 20
reports. Peak RSS (VmHWM, MB) and RSS at the start -> end of the sustained sending:
objectstore 550 (401 -> 515), inference 401 (350 -> 401), warehouse 392 (352 -> 388), worker
291 (274 -> 291), dicom-gateway 166 (129 -> 163), stow-gateway 121, reading-api 64,
hl7-gateway 56, broker 23; all 2,064 (1,767 -> 2,022, +255 over the 3 minutes of sending,
most of it SeaweedFS).

Re-measured 2026-12-07 on the same machine, ``--duration 60``, one run each, after the
assembly clock began waking when the next study falls quiet instead of every 0.5 s, by the
stream workers' fetch wait (``kafka.fetch_max_wait_ms``), p50 / p99 in seconds:

    fetch wait       announced     quiet period   sustained: routed/h while backlogged
    1500 ms          1.05 / 1.42   6.40 / 7.07    3,495  (MISSED quiet target by 0.07 s)
    250 ms (default) 0.22 / 0.27   5.30 / 5.42    3,515
    50 ms            0.07 / 0.30   5.13 / 5.19    2,653  (idle fetches load the object store)

At 1500 ms every hop took ~0.8 s (the flat routed - assembled interval of issue 20): Tansu
holds a fetch to its end even when records arrive. The sustained row's backlog grew at every
setting (offered 4,320 studies/h at ``--scale 0.1``); its bottleneck is CPU, shared on 2 cores
by the object store, the gateway and de-identification (``load/bench_ingest.py``).

Re-measured 2026-12-07 later, defaults (300 s sustained, the issue's 5 minutes), one run,
after producers stopped being idempotent and blobs went through obstore, LZ4-framed
(``load/bench_ingest.md`` has the A/B): announced p50 / p95 / p99 0.22 / 0.26 / 0.29 s (met),
quiet period 5.28 / 5.37 / 5.39 s (met). Sustained: 427 studies, 4,289 instances acknowledged
in 300.6 s = 5,114 studies/h (5,124/h offered, senders on plan, send failures 0), lost 0 of
427; latency p50 / p95 / p99 3.80 / 13.13 / 20.85 s, bottleneck assembled (own p95 10.70 s),
de-identification p95 6.98 s beside the path. The studies waiting to be routed at 25/50/75/100 %
of the sending were 11/9/8/5, but the last third's p50 latency (6.10 s) was 3.5x the first
third's (1.75 s), so the row reports growth; the pipeline routed 5,082 studies/h, about the
offered rate (it was 3,515-3,573 before). A 60 s run at 4,320/h offered kept the backlog
bounded (1/1/5/2; last third p50 1.61 s). Peak RSS (MB): objectstore 593 (397 -> 588 over
the sending), inference 397, warehouse 394, worker 292, dicom-gateway 126; all 2,049.

Re-measured 2026-12-07 later still, defaults, one run, with ``kafka.partitions`` at its new
default of 1 and the gateway's cheaper header, file meta and encode (``load/bench_ingest.py``);
the machine was also faster than in the run above, so the two are not an A/B. Announced
p50 / p95 / p99 0.21 / 0.25 / 0.25 s (met); quiet period 5.28 / 5.34 / 5.38 s (met).
Sustained: 427 studies, 4,289 instances acknowledged in 300.1 s = 5,121 studies/h (5,124/h
offered, send failures 0), lost 0 of 427; latency p50 / p95 / p99 0.49 / 1.29 / 1.68 s,
bottleneck routed (own p95 0.86 s), de-identification p95 1.20 s beside the path; backlog
at 25/50/75/100 % of the sending 0/0/0/1 and last third's p50 0.54 s against the first
third's 0.33 s: bounded, so >= 5,121 studies/h is sustained at this scale. Peak RSS (MB):
objectstore 584 (392 -> 561 over the sending), warehouse 405, inference 393, worker 289,
dicom-gateway 122; all 2,041.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from load.bench_ingest import family, log, start_runtime, wait_until_idle
from radstream import procs
from radstream.traffic import PlanError, Spread, StudySizes, parse_mix, parse_rate, parse_sites, plan, percentile
from radstream.traffic_report import await_pipeline, spread_text, stage_latencies, stage_times
from radstream.traffic_run import RunReport, Targets, TrafficRunner
from radstream.traffic_studies import load_templates
from schemas.events import trace_id_for
from schemas.settings import Settings, load_settings

#: Stages on the path from the last instance to the first worklist row (routing follows assembly).
PATH_STAGES = ("assembled", "routed")
SIDE_STAGES = ("deidentified", "ai")
#: a structured log's error line, a traceback's first line, or another library's ERROR
_ERROR_LINE = re.compile(r"\[(error|critical) *\]|^Traceback|\bERROR\b")


class TimedRunner(TrafficRunner):
    """The traffic sender, noting when each study's last C-STORE response arrived."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_response: dict[str, float] = {}

    def _c_store(self, record, instances, acked):
        def timed():
            yield from instances  # asked for the next one only once the previous one's response is in
            self.last_response[record.identity.study_uid] = time.time()
        return super()._c_store(record, timed(), acked)

    def responded_at(self) -> dict[str, float]:
        """Study UID -> its last C-STORE response, for every study acknowledged in full."""
        return {r.identity.study_uid: self.last_response.get(r.identity.study_uid, r.acked_at)
                for r in self.records if r.instances_acked == r.planned.instances and r.acked_at}


@dataclasses.dataclass
class Row:
    """What one row measured."""

    runner: TimedRunner
    report: RunReport
    lost: dict[str, str]  # study UID -> why: each acknowledged study not complete on the worklist after the wait
    routed: dict[str, float]  # study UID -> first routed, epoch seconds
    times: dict[str, dict[str, tuple[float, float]]]

    @property
    def latencies(self) -> dict[str, float]:
        responded = self.runner.responded_at()
        return {uid: self.routed[uid] - at for uid, at in responded.items() if uid in self.routed}

    def spread(self) -> Spread:
        return Spread.of(list(self.latencies.values()))

    def stage_p95(self) -> dict[str, float]:
        sent = {r.identity.study_uid: r.sent_at for r in self.report.records if r.sent_at is not None}
        return {item.stage: item.own.p95 for item in stage_latencies(sent, self.times) if item.own.p95 is not None}


def send(settings: Settings, studies, templates, announce: bool, wait_timeout_s: float, senders: int = 8) -> Row:
    runner = TimedRunner(studies, Targets.of(settings), templates, senders=senders, announce_count=announce)
    return collect(settings, runner, runner.run(), wait_timeout_s)


def collect(settings: Settings, runner: TimedRunner, report: RunReport, wait_timeout_s: float) -> Row:
    """Wait for the studies sent on the worklist; read when each stage first finished for them."""
    arrivals = await_pipeline(settings, report, wait_timeout_s)
    times = stage_times(settings, list(arrivals))
    routed = {uid: stages["routed"][1] for uid, stages in times.items() if "routed" in stages}
    lost = {uid: arrival.missing for uid, arrival in arrivals.items() if arrival.missing is not None}
    return Row(runner, report, lost, routed, times)


def small_ct_studies(count: int, interval_s: float, seed: int):
    """``count`` three-instance CT studies (a localizer, two slices), one every ``interval_s``, no orders."""
    studies = plan(3600.0, max(count * interval_s, 1.0), {"CT": 1.0}, parse_sites("SITE_A"), 0.0, 0.0, False, seed,
                   count=count, order_fraction=0.0, sizes=StudySizes(ct_slices=(2, 2)))
    return [dataclasses.replace(s, at_s=i * interval_s) for i, s in enumerate(studies)]


# ---------------------------------------------------------------- memory


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def memory_mb(children: Mapping[str, int], field: str) -> dict[str, float]:
    """Child -> ``field`` (VmRSS, VmHWM) of it and its descendants, summed, in MB."""
    return {name: sum(_status_kb(p, field) for p in family(pid)) / 1024 for name, pid in children.items()}


# ---------------------------------------------------------------- the report


def latency_line(name: str, row: Row, target_s: float | None, what: str) -> list[str]:
    """The row's p50/p95/p99 against its target (None: the target is that nothing is lost), and its bottleneck."""
    spread = row.spread()
    acked = len(row.runner.responded_at())
    if target_s is None:
        target = f"target: nothing lost: {'met' if not row.lost and acked else 'MISSED'}"
    else:
        met = spread.p99 is not None and spread.p99 <= target_s
        target = f"target p99 <= {target_s:.1f} s: {'met' if met else 'MISSED'}"
    return [f"{name}: {spread.count} studies ({what}), last C-STORE response -> routed {spread_text(spread)}; "
            f"{target}; lost {len(row.lost)} of {acked}",
            bottleneck_line(row)] + [f"  lost: {uid}: {why}" for uid, why in row.lost.items()]


def bottleneck_line(row: Row) -> str:
    p95 = row.stage_p95()
    path = {stage: p95[stage] for stage in PATH_STAGES if stage in p95}
    if not path:
        return "  bottleneck: - (no stage times)"
    stage = max(path, key=path.get)
    share = path[stage] / sum(path.values()) if sum(path.values()) > 0 else 1.0
    own = ", ".join(f"{s} {p95[s]:.2f}" for s in (*PATH_STAGES, *SIDE_STAGES) if s in p95)
    return (f"  bottleneck: {stage} (p95 {path[stage]:.2f} s, {share:.0%} of the path's p95); "
            f"own p95 per stage, s: {own} (deidentified, ai: beside the path)")


def sustained_lines(row: Row, offered_per_h: float) -> list[str]:
    """The rate sustained; acknowledged-but-not-routed studies over the sending and the lag of the
    last third of the studies against the first third's; the highest rate without backlog growth."""
    responded, latencies = row.runner.responded_at(), row.latencies
    if not responded:
        return ["  sustained: nothing acknowledged", "highest sustained rate without backlog growth: -"]
    start, end = row.report.started_at, max(responded.values())
    window = max(end - start, 1e-9)  # the run's start (its first arrival is due at 0 + a gap) to the last response
    achieved, per_second = len(responded) * 3600 / window, row.report.instances_acked / window
    lines = [f"  sustained: {len(responded)} studies, {row.report.instances_acked:,} instances acknowledged in "
             f"{window:.1f} s = {achieved:,.0f} studies/h, {per_second:.1f} inst/s ({offered_per_h:,.0f}/h offered); "
             f"send failures {len(row.report.failures)}"]
    points = []
    for q in (0.25, 0.5, 0.75, 1.0):
        t = start + window * q
        points.append(sum(at <= t for at in responded.values()) - sum(at <= t for at in row.routed.values()))
    order = sorted(latencies, key=responded.get)
    third = max(len(order) // 3, 1)
    first = percentile([latencies[u] for u in order[:third]], 50) or 0.0
    last = percentile([latencies[u] for u in order[-third:]], 50) or 0.0
    behind = row.report.schedule_lag().p95 or 0.0
    grew = last - first > max(2.0, 0.5 * first) or behind > 5 or bool(row.lost)
    lines.append(f"  backlog (studies acknowledged, not yet routed) at 25/50/75/100 % of the sending: "
                 f"{'/'.join(map(str, points))}; latency p50 first third {first:.2f} s, last third {last:.2f} s; "
                 f"senders behind plan p95 {behind:.2f} s: backlog {'GREW' if grew else 'bounded'}")
    if not grew:
        lines.append(f"highest sustained rate without backlog growth: >= {achieved:,.0f} studies/h ({per_second:.1f} "
                     "inst/s at this scale; a lower bound: a higher --rate finds the limit)")
    else:
        routed = sorted(row.routed.values())
        capacity = len(routed) * 3600 / (routed[-1] - start) if routed and routed[-1] > start else 0.0
        lines.append(f"highest sustained rate without backlog growth: below {achieved:,.0f} studies/h at this scale; "
                     f"the pipeline routed {capacity:,.0f} studies/h while backlogged (about its capacity)")
    return lines


def memory_lines(children: Sequence[str], peak: Mapping[str, float], start: Mapping[str, float],
                 end: Mapping[str, float]) -> list[str]:
    lines = ["memory per child of radstream up (MB; peak = VmHWM over the whole run, RSS at the start -> end "
             "of the sustained sending):"]
    for name in sorted(children, key=lambda n: -peak[n]):
        lines.append(f"  memory {name:<16} peak {peak[name]:8.1f}  rss {start[name]:8.1f} -> {end[name]:8.1f} "
                     f"({end[name] - start[name]:+.1f})")
    lines.append(f"  memory {'all':<16} peak {sum(peak.values()):8.1f}  rss {sum(start.values()):8.1f} -> "
                 f"{sum(end.values()):8.1f} ({sum(end.values()) - sum(start.values()):+.1f})")
    return lines


# ---------------------------------------------------------------- the run


def lost_evidence(log_dir: Path, study_uids: Sequence[str], per_study: int = 15, errors: int = 10) -> list[str]:
    """What the runtime's logs say of each lost study (its UID or trace id; the last ``per_study``
    lines), and the last ``errors`` error lines of each log: read before the data dir goes."""
    logs = {path.stem: path.read_text(errors="replace").splitlines() for path in sorted(log_dir.glob("*.log"))}
    lines = []
    for uid in study_uids:
        marks = (uid, trace_id_for(uid))
        said = [f"    {name}: {line[:300]}" for name, text in logs.items() for line in text
                if any(mark in line for mark in marks)]
        lines += [f"  logs of lost {uid}: {len(said)} lines{', the last ' + str(per_study) if len(said) > per_study else ''}",
                  *said[-per_study:]]
    for name, text in logs.items():
        failed = [line for line in text if _ERROR_LINE.search(line)]
        if failed:
            lines += [f"  {name} log: {len(failed)} error lines, the last:", *(f"    {line[:300]}" for line in failed[-errors:])]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20, help="studies per latency row (default 20)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between them (default 2)")
    parser.add_argument("--rate", default="5000/h", help="sustained arrival rate: 5000/h, 90/min (default 5000/h)")
    parser.add_argument("--duration", type=float, default=300.0, help="sustained sending, seconds (default 300)")
    parser.add_argument("--scale", type=float, default=0.1, help="CT slices and MR images x this (default 0.1)")
    parser.add_argument("--mix", default="CR:0.35,DX:0.15,CT:0.3,MR:0.2", help="modality shares of the sustained row")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--wait-timeout", type=float, default=300.0,
                        help="after each row's last send, wait this long for its studies on the worklist")
    args = parser.parse_args(argv)
    try:
        rate = parse_rate(args.rate)
        sustained = plan(rate, args.duration, parse_mix(args.mix), parse_sites("SITE_A,SITE_B,SITE_C"), 0.1, 0.5,
                         False, args.seed, sizes=StudySizes(scale=args.scale))
    except PlanError as exc:
        parser.error(str(exc))
    if args.studies < 1:
        parser.error("--studies must be at least 1")
    templates = load_templates("small", {s.modality for s in sustained} | {"CT"})
    sizes = sum(s.instances for s in sustained)

    with tempfile.TemporaryDirectory(prefix="radstream-e2e-") as tmp:
        root = Path(tmp)
        settings = load_settings(data_dir=root / "data", **procs.isolated_listeners())
        quiet = settings.assembly.quiet_period_s
        print(f"config: radstream up, blobs {settings.blobs.backend}, broker {settings.kafka.storage}; "
              f"quiet period {quiet:g} s; latency rows {args.studies} studies of 3 CT instances every "
              f"{args.interval:g} s; sustained {len(sustained)} studies, {sizes:,} instances over "
              f"{args.duration:g} s ({rate:,.0f} studies/h, {sizes / args.duration:.1f} inst/s, scale {args.scale:g})",
              flush=True)
        runtime = start_runtime(settings, root / "up.log")
        try:
            children = runtime.children()
            log("warm-up study ...")
            send(settings, small_ct_studies(1, 0.0, args.seed + 10), templates, True, args.wait_timeout)
            wait_until_idle(children, timeout_s=60)
            rows: dict[str, Row] = {}
            for name, announce, seed in (("announced", True, args.seed + 20), ("quiet period", False, args.seed + 30)):
                log(f"{name}: {args.studies} studies ...")
                rows[name] = send(settings, small_ct_studies(args.studies, args.interval, seed), templates, announce,
                                  args.wait_timeout, senders=2)
                wait_until_idle(children, timeout_s=60)
            log(f"sustained: {len(sustained)} studies over {args.duration:g} s ...")
            rss_start = memory_mb(children, "VmRSS")
            runner = TimedRunner(sustained, Targets.of(settings), templates, senders=8)
            report = runner.run()
            rss_end = memory_mb(children, "VmRSS")
            log("waiting for the sustained studies on the worklist ...")
            rows["sustained"] = collect(settings, runner, report, args.wait_timeout)
            peak = memory_mb(children, "VmHWM")
        finally:
            log("stopping radstream up ...")
            runtime.stop()
        lost_uids = [uid for row in rows.values() for uid in row.lost]
        evidence = lost_evidence(settings.data_dir / "logs", lost_uids) if lost_uids else []

    lines = latency_line("announced", rows["announced"], 2.0, "NumberOfStudyRelatedInstances in every instance")
    lines += latency_line("quiet period", rows["quiet period"], quiet + 2.0, f"no count; quiet period {quiet:g} s")
    lines += latency_line("sustained", rows["sustained"], None,
                          f"mix {args.mix}, 90 % with an order, scale {args.scale:g}")
    lines += sustained_lines(rows["sustained"], len(sustained) * 3600 / args.duration)
    lines += memory_lines(list(children), peak, rss_start, rss_end)
    print("\n".join(lines + evidence))
    lost = sum(len(r.lost) for r in rows.values()) + sum(len(r.report.failures) for r in rows.values())
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
