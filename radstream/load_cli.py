"""``radstream load record|replay``: record topic traffic to a file, replay it at a chosen speed.

The work is :mod:`radstream.recording`; this module is its command line. Long work
shows a progress bar on stderr when stderr is a terminal, and each command ends with one
summary line (records, topics, seconds, records/s). Exit codes: 0 done, 1 the broker
failed, a partition was not read to its end or a record was not delivered, 2 bad
arguments, an unknown topic or a file that is not a recording.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    @click.option("--speed", type=click.FloatRange(0), default=1.0, show_default=True,
                  help="multiple of the recorded pacing: 1 as recorded, 10 ten times faster, 0 as fast as possible")
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
        if not report.ok:
            ctx.exit(1)
