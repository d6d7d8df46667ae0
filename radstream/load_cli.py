"""``radstream load record|replay|generate``: record topic traffic to a file, replay it at a chosen
speed, or generate synthetic studies and orders through the gateways.

The work is :mod:`radstream.recording` and :mod:`radstream.traffic` (with
:mod:`radstream.traffic_studies`, :mod:`radstream.traffic_run` and
:mod:`radstream.traffic_report`); this module is their command line. Long work
shows a progress bar on stderr when stderr is a terminal, and each command ends with one
summary line (records, topics, seconds, records/s). Exit codes: 0 done, 1 the broker
failed, a partition was not read to its end, a record was not delivered, or a generated
study failed or did not reach the worklist, 2 bad arguments, an unknown topic or a file
that is not a recording.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
import click

from radstream.recording import Progress, RecordReport


def _err(message: str) -> None:
    click.echo(f"error: {message}", err=True)


@contextmanager
def _progress_bar(label: str) -> Iterator[Progress]:
    """A rich bar on stderr when it is a terminal (piped runs and tests get none), as ``radstream send``."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda _done, _total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

    with Bar(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
             transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


class SpeedType(click.ParamType):
    """A replay speed: ``10x`` or ``10`` (ten times the recorded pacing), ``0`` for unpaced."""

    name = "SPEED"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            number = float(value)
        else:
            text = str(value).strip().lower()
            try:
                number = float(text[:-1] if text.endswith("x") else text)
            except ValueError:
                self.fail(f"{value!r} is not a speed: a multiple like 10x, 0.5x or 0 (as fast as possible)",
                          param, ctx)
        if not number >= 0 or number == float("inf"):
            self.fail(f"{value!r}: a speed is 0 (as fast as possible) or a finite multiple above 0", param, ctx)
        return number


def _per_second(count: int, seconds: float) -> str:
    return f"{count / seconds:.0f} records/s" if seconds > 0 else "- records/s"


def _print_partitions(report: RecordReport, err: bool) -> None:
    """One line per partition: recorded against what it held when recording began, and why not all."""
    for p in report.partitions:
        notes = []
        if p.before_since:
            notes.append(f"{p.before_since} older than --since")
        if p.after_end:
            notes.append(f"{p.after_end} after the start")
        if not p.complete:
            notes.append(f"read to {p.position} only" + (f": {p.error}" if p.error else ""))
        click.echo(f"  {p.topic}[{p.partition}]: {p.recorded} of {p.expected} recorded (offsets {p.start}..{p.end})"
                   + "".join(f", {note}" for note in notes), err=err)


def register(cli: click.Group, config_option, settings_of) -> None:
    @cli.group()
    @config_option
    def load() -> None:
        """Record topic traffic to a file and replay it into a broker (load and soak tests)."""

    @load.command("record")
    @config_option
    @click.argument("topics", nargs=-1, required=True)
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="the recording (JSON Lines; gzip when it ends in .gz)")
    @click.option("--since", help="only records stamped from then on: a duration back from now (30m, 1h, 7d) "
                                  "or an ISO timestamp [default: everything on the topics]")
    @click.option("--limit", type=click.IntRange(1), help="stop after N records (a prefix of each partition)")
    @click.option("--follow", is_flag=True, help="after the records on the topics now, keep recording new ones "
                                                 "until Ctrl-C or --duration")
    @click.option("--duration", help="with --follow: stop after this long (90s, 10m, 1h)")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(0, min_open=True), default=30.0,
                  show_default=True, help="fail when a partition not yet read to its end makes no progress this long")
    @click.pass_context
    def record(ctx: click.Context, topics: tuple[str, ...], output: Path, since: str | None, limit: int | None,
               follow: bool, duration: str | None, timeout_s: float) -> None:
        """Record TOPICS (radstream names like instance.received, or any topic) from the beginning to
        their true end.

        Every record is read: the end of each partition is taken when recording begins
        (exact, not the embedded broker's under-reported one), each partition's count is
        printed against it, and a partition not read to its end fails the command and
        writes nothing.
        """
        from confluent_kafka import KafkaException

        from adapters.kafka import EndOffsetsTimeout
        from radstream.recording import (RecordingIncomplete, UnknownTopicError, kafka_reason, record_topics,
                                         write_recording)
        from radstream.reports import ReportRequestError, parse_duration, parse_instant

        settings = settings_of(ctx)
        if duration is not None and not follow:
            _err("--duration needs --follow")
            ctx.exit(2)
        try:
            since_ms = int(parse_instant(since, datetime.now(UTC)).timestamp() * 1000) if since else None
            duration_s = parse_duration(duration).total_seconds() if duration else None
        except ReportRequestError as exc:
            _err(str(exc))
            ctx.exit(2)
        try:
            with _progress_bar("recording") as progress:
                recording, report = record_topics(settings, topics, since_ms=since_ms, limit=limit, follow=follow,
                                                  duration_s=duration_s, timeout_s=timeout_s, on_progress=progress)
        except UnknownTopicError as exc:
            _err(str(exc))
            ctx.exit(2)
        except RecordingIncomplete as exc:
            _print_partitions(exc.report, err=True)
            _err(f"{exc}; nothing written to {output}")
            ctx.exit(1)
        except (KafkaException, EndOffsetsTimeout) as exc:  # no answer, or no true end to read up to
            _err(f"broker {settings.kafka_bootstrap}: {kafka_reason(exc)}")
            ctx.exit(1)
        write_recording(output, recording)
        _print_partitions(report, err=False)
        limited = f" (stopped at --limit {limit})" if report.limited else ""
        click.echo(f"recorded {report.recorded} records of {len(recording.header.topics)} topics to {output} "
                   f"in {report.elapsed_s:.1f} s ({_per_second(report.recorded, report.elapsed_s)}){limited}")

    @load.command("replay")
    @config_option
    @click.argument("recording_path", metavar="RECORDING", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--speed", type=SpeedType(), default="1x", show_default=True,
                  help="multiple of the recorded pacing: 1x as recorded, 10x ten times faster, 0 as fast as possible")
    @click.option("--rate", type=click.FloatRange(0, min_open=True),
                  help="a fixed number of records per second instead of the recorded pacing")
    @click.option("--keep-partitions", is_flag=True,
                  help="each record to its recorded partition [default: the partitioner by key, as every producer]")
    @click.option("--target-prefix", help="replay into PREFIX.<topic> instead of the settings' topics")
    @click.option("--topic-suffix", default="", help="append this to every target topic (e.g. .replay)")
    @click.option("--loop", "loops", type=click.IntRange(1), default=1, show_default=True,
                  help="replay the recording N times, one after the other (soak tests); the same events "
                       "each time, so the stages' idempotency drops the repeats")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(0, min_open=True), default=30.0,
                  show_default=True, help="a record not acknowledged this long counts as failed")
    @click.pass_context
    def replay(ctx: click.Context, recording_path: Path, speed: float, rate: float | None, keep_partitions: bool,
               target_prefix: str | None, topic_suffix: str, loops: int, timeout_s: float) -> None:
        """Produce RECORDING's records again, stamped now, with keys and headers as recorded.

        Each record gets headers radstream-original-topic, -partition, -offset and
        -timestamp. Payloads are replayed byte for byte, never rewritten (there is no
        option for fresh ids): replayed into topics whose pipeline has seen them (the live
        topics, or a second --loop), the stages' idempotency drops them -- assembly
        ignores instances it holds, the warehouse keeps one row per study version. Use
        --target-prefix or --topic-suffix to replay into topics of their own (created
        when missing, as the live ones are).
        """
        from confluent_kafka import KafkaException

        from radstream.recording import (RecordingFormatError, Replayer, ReplayError, kafka_reason, read_recording,
                                         replay_targets)

        settings = settings_of(ctx)
        try:
            recording = read_recording(recording_path)
        except RecordingFormatError as exc:
            _err(str(exc))
            ctx.exit(2)
        targets = replay_targets(settings, recording.header, prefix=target_prefix, suffix=topic_suffix)
        try:
            with _progress_bar("replaying") as progress:
                replayer = Replayer(settings, recording, targets, keep_partitions=keep_partitions,
                                    timeout_s=timeout_s, on_progress=progress)
                for note in replayer.prepare():
                    click.echo(f"note: {note}", err=True)
                report = replayer.run(speed, rate, loops)
        except ReplayError as exc:
            _err(str(exc))
            ctx.exit(2)
        except KafkaException as exc:
            _err(f"broker {settings.kafka_bootstrap}: {kafka_reason(exc)}")
            ctx.exit(1)
        for error, count in report.errors.most_common(10):
            click.echo(f"failed: {error} ({count} records)", err=True)
        delivered, failed = sum(report.delivered.values()), sum(report.failed.values())
        click.echo(f"replayed {delivered} records of {len(targets)} topics to "
                   f"{', '.join(sorted(set(targets.values())))} in {report.elapsed_s:.1f} s "
                   f"({_per_second(delivered, report.elapsed_s)}), failed {failed}")
        if report.pace_kept is not None:
            click.echo(f"pace: sent over {report.sent_s:.2f} s against {report.planned_s:.2f} s asked "
                       f"({report.pace_kept:.1%} of the requested {'rate' if rate else 'speed'})")
        if not report.ok:
            ctx.exit(1)

    @load.command("generate")
    @config_option
    @click.option("--rate", default="5000/h", show_default=True, help="mean study arrival rate: 5000/h, 90/min, 2/s")
    @click.option("--duration", default="6m", show_default=True, help="how long arrivals go on (90s, 6m, 1h)")
    @click.option("--count", type=click.IntRange(0),
                  help="exactly N studies, spread over --duration (instead of --rate)")
    @click.option("--mix", default="CR:0.35,DX:0.15,CT:0.3,MR:0.2", show_default=True,
                  help="share of studies per modality (CR, DX, CT, MR)")
    @click.option("--sites", default="SITE_A,SITE_B,SITE_C", show_default=True,
                  help="sending sites, each optionally with the modalities it has: SITE_A,SITE_B:CR+DX,SITE_C:MR "
                       "(the calling AE title, STOW token site and HL7 sending facility)")
    @click.option("--site-states", default="", help="SITE=ST,...: the state each site scans in (PID-11) "
                                                  "[default: NV, CA, TX, NY, FL, AZ, IL in turn]")
    @click.option("--stow-sites", default="", help="sites that send by STOW-RS (the others by C-STORE)")
    @click.option("--stow-token", default="", help="bearer token of the STOW-RS sites: TOKEN (one site) or "
                                                 "SITE=TOKEN,... [default: the stow.tokens setting, inverted]")
    @click.option("--stat", "stat_fraction", type=click.FloatRange(0, 1), default=0.1, show_default=True,
                  help="share of studies ordered STAT (ORC-7 / OBR-27 ^^^^^S)")
    @click.option("--orders", "order_fraction", type=click.FloatRange(0, 1), default=0.9, show_default=True,
                  help="share of studies with an HL7 ORM^O01 order")
    @click.option("--orders-first", "order_first_fraction", type=click.FloatRange(0, 1), default=0.5,
                  show_default=True, help="share of the orders sent before their images (the rest after)")
    @click.option("--order-gap", default="1-10", show_default=True,
                  help="seconds between an order and its images: MIN-MAX, drawn per study")
    @click.option("--diurnal", is_flag=True, help="modulate the rate by the simulated hour of day "
                                                  "(night trough, 09:00-16:00 peak; --rate is the daily mean)")
    @click.option("--day-length", help="with --diurnal: run time per simulated 24 h [default: --duration]")
    @click.option("--start-hour", type=click.FloatRange(0, 24, max_open=True), default=0.0, show_default=True,
                  help="with --diurnal: the simulated hour at which the run starts")
    @click.option("--seed", type=int, default=1, show_default=True, help="the same seed gives the same plan")
    @click.option("--scale", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
                  help="multiply CT slices and MR images per series (0.1: a tenth)")
    @click.option("--ct-slices", default="100-300", show_default=True, help="slices of a CT's axial series: MIN-MAX")
    @click.option("--mr-images", default="20-40", show_default=True, help="images per MR series (3-6 series): MIN-MAX")
    @click.option("--images", type=click.Choice(["small", "full"]), default="small", show_default=True,
                  help="small: 128x128 CT, 64x64 MR, radiographs at a quarter width; full: 512x512 CT and MR, "
                       "radiographs as acquired (6-7 MB)")
    @click.option("--announce-count/--no-announce-count", default=True, show_default=True,
                  help="send NumberOfStudyRelatedInstances, so a study completes at its last instance "
                       "(without: after the assembly quiet period)")
    @click.option("--senders", type=click.IntRange(1, 64), default=8, show_default=True,
                  help="studies sent at once (threads; one association or HTTP connection each)")
    @click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True,
                  help="send instances and orders not acknowledged again, this many times (1 s apart)")
    @click.option("--dry-run", is_flag=True, help="print the plan's summary and send nothing")
    @click.option("--wait/--no-wait", default=True, show_default=True,
                  help="after sending, wait for the studies on the worklist and report per-stage latency")
    @click.option("--wait-timeout", default="2m", show_default=True,
                  help="give up waiting this long after the last send (studies not there are listed missing)")
    @click.option("--records", "records_path", type=click.Path(dir_okay=False, path_type=Path),
                  help="write one JSON line per study: UIDs, accession, plan, sent and ack times, failures")
    @click.pass_context
    def generate(ctx: click.Context, rate: str, duration: str, count: int | None, mix: str, sites: str,
                 site_states: str, stow_sites: str, stow_token: str, stat_fraction: float, order_fraction: float,
                 order_first_fraction: float, order_gap: str, diurnal: bool, day_length: str | None,
                 start_hour: float, seed: int, scale: float, ct_slices: str, mr_images: str, images: str,
                 announce_count: bool, senders: int, retries: int, dry_run: bool, wait: bool, wait_timeout: str,
                 records_path: Path | None) -> None:
        """Send synthetic studies and HL7 orders through the DICOM, STOW-RS and HL7 gateways of a
        running radstream, then report throughput and per-stage latency from the warehouse.

        Studies arrive as a Poisson process (seeded: --seed gives the same plan) in the
        --mix of modalities: CR with 1-3 views, DX with 1-4 images, CT with a localizer and
        --ct-slices axial slices, MR with 3-6 series of --mr-images. Each is built from real
        DICOM files (pydicom, pydicom-data) with new UIDs, one accession number and one
        patient; C-STORE sites send each study over one association, --stow-sites POST it
        per series. --orders of the studies get an ORM^O01 over MLLP, --orders-first of
        them before the images, --stat of all studies STAT. Studies are paced by the plan
        with --senders threads, so a slow send does not delay the next study.

        At the end: studies and instances sent, every failure, the sustained rate; then
        (unless --no-wait) how many studies reached the worklist complete -- every
        instance, order joined, AI done; the missing ones are listed -- and p50/p95/p99
        per stage (received, assembled, deidentified, ai, routed) from stage_times.

        Capacity: the realistic sizes (the defaults) at 5,000 studies/h are about 130
        instances/s, more than a 2-core machine ingests. Measured on one (durable
        `radstream up` and the generator side by side, other work running): --rate 5000/h
        --scale 0.1 (about 10 instances per study, 15 instances/s) went through with every
        study complete; at --scale 0.3 (39 instances/s) de-identification fell a minute
        behind and the senders fell behind the plan. --dry-run prints the load a plan needs.
        """
        from radstream.reports import ReportRequestError, parse_duration
        from radstream.traffic import (DiurnalClock, PlanError, StudySizes, parse_mix, parse_pairs, parse_range,
                                       parse_rate, parse_sites, plan, plan_lines, summarise)

        try:
            duration_s = parse_duration(duration).total_seconds()
            wait_timeout_s = parse_duration(wait_timeout).total_seconds()
            day_s = parse_duration(day_length).total_seconds() if day_length else duration_s
            stow_names = [s.strip() for s in stow_sites.split(",") if s.strip()]
            site_list = parse_sites(sites, stow_names, parse_pairs(site_states, "--site-states"))
            sizes = StudySizes(scale=scale, ct_slices=parse_range(ct_slices, "--ct-slices"),
                               mr_images=parse_range(mr_images, "--mr-images"))
            gap = parse_range(order_gap, "--order-gap")
            studies = plan(parse_rate(rate), duration_s, parse_mix(mix), site_list, stat_fraction,
                           order_first_fraction, diurnal, seed, count=count, order_fraction=order_fraction,
                           sizes=sizes, order_gap_s=(float(gap[0]), float(gap[1])),
                           clock=DiurnalClock(day_s=day_s, start_hour=start_hour))
            tokens = _stow_tokens(stow_token, stow_names)
        except (PlanError, ReportRequestError) as exc:
            _err(str(exc))
            ctx.exit(2)
        for line in plan_lines(summarise(studies, duration_s), seed):
            click.echo(line)
        if dry_run:
            return
        _run_traffic(ctx, settings_of(ctx), studies, tokens, images, announce_count, senders, retries, wait,
                     wait_timeout_s, records_path)


def _stow_tokens(text: str, stow_sites: list[str]) -> dict[str, str] | None:
    """``--stow-token``: None (use the settings), one token for the one STOW site, or SITE=TOKEN pairs."""
    from radstream.traffic import PlanError, parse_pairs

    if not text:
        return None
    if "=" not in text:
        if len(stow_sites) != 1:
            raise PlanError("--stow-token TOKEN needs exactly one --stow-sites site; else SITE=TOKEN,...")
        return {stow_sites[0]: text.strip()}
    return parse_pairs(text, "--stow-token")


def _run_traffic(ctx: click.Context, settings, studies, tokens, images: str, announce_count: bool, senders: int,
                 retries: int, wait: bool, wait_timeout_s: float, records_path: Path | None) -> None:
    import json
    import time

    from adapters.warehouse import WarehouseError
    from radstream.traffic_report import await_pipeline, pipeline_lines, sent_lines, stage_latencies, stage_times
    from radstream.traffic_run import Targets, TrafficRunner
    from radstream.traffic_studies import TemplateMissing, load_templates

    try:
        templates = load_templates(images, {s.modality for s in studies})
        runner = TrafficRunner(studies, Targets.of(settings, tokens), templates, senders=senders,
                               announce_count=announce_count, retries=retries)
    except (TemplateMissing, ValueError) as exc:
        _err(str(exc))
        ctx.exit(2)
    with _live_status("sending") as status:
        runner.on_progress = lambda p: status(
            p.studies_done, p.studies, f"studies; {p.due} due, {p.in_flight} sending, "
            f"{p.instances_acked:,} instances, {p.failures} failed")
        report = runner.run()
    for line in sent_lines(report):
        click.echo(line)
    if records_path is not None:
        with open(records_path, "w") as out:
            for record in report.records:
                out.write(json.dumps(record.to_json()) + "\n")
    missing = False
    if wait and report.instances_acked:
        started = time.monotonic()
        try:
            with _live_status("on the worklist") as status:
                arrivals = await_pipeline(settings, report, wait_timeout_s,
                                          lambda done, total: status(done, total, "studies complete"))
            waited_s = time.monotonic() - started
            sent_at = {r.identity.study_uid: r.sent_at for r in report.records if r.sent_at is not None}
            latencies = stage_latencies(sent_at, stage_times(settings, list(arrivals)))
        except WarehouseError as exc:
            _err(f"warehouse {settings.warehouse_url}: {exc}")
            ctx.exit(1)
        for line in pipeline_lines(report, arrivals, waited_s, latencies):
            click.echo(line)
        missing = any(a.missing is not None for a in arrivals.values())
    if report.failures or missing:
        ctx.exit(1)


@contextmanager
def _live_status(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """Live progress on stderr: a rich bar on a terminal (as ``load record``), else a plain line every 30 s."""
    import time

    from rich.console import Console

    console = Console(stderr=True)
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        with Bar(TextColumn(label), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(),
                 TextColumn("{task.description}"), console=console, transient=True) as bar:
            task = bar.add_task("", total=None)
            yield lambda done, total, text: bar.update(task, completed=done, total=total, description=text)
        return
    last = [0.0]

    def line(done: int, total: int, text: str) -> None:
        if time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            click.echo(f"{label} {done}/{total}: {text}", err=True)

    yield line
