"""``radstream results deliveries|replay-dead``: where each study's outputs stand, and
sending dead-lettered outputs again once their receiver is back.

Exit codes: 0 done, 1 the warehouse or broker could not be reached or a replayed output
failed again, 2 bad arguments or an invalid destinations file.
"""

from __future__ import annotations

import click

DELIVERIES_SQL = """
SELECT study_uid, revision, destination, kind, status, attempts, result_status, document_id, error, at
FROM deliveries FINAL
WHERE ({study:String} = '' OR study_uid = {study:String}) AND ({status:String} = '' OR status = {status:String})
ORDER BY at DESC
LIMIT {limit:UInt32}
"""


def register(cli: click.Group, config_option, settings_of, format_rows, rows_table) -> None:
    @cli.group()
    def results() -> None:
        """Results out (DICOM SR, HL7 ORU, FHIR, webhooks): delivery state and dead-letter replay."""

    @results.command()
    @config_option
    @click.option("--study", default="", help="one study's outputs (StudyInstanceUID)")
    @click.option("--status", type=click.Choice(["", "QUEUED", "SENT", "ACKED", "FAILED", "DEAD"]), default="")
    @click.option("--limit", default=50, show_default=True)
    @click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
    @click.pass_context
    def deliveries(ctx: click.Context, study: str, status: str, limit: int, fmt: str) -> None:
        """Each output's latest delivery state, newest first."""
        from adapters import warehouse

        settings = settings_of(ctx)
        try:
            client = warehouse.connect(settings)
            try:
                answer = client.query(DELIVERIES_SQL, parameters={"study": study, "status": status, "limit": limit})
            finally:
                client.close()
        except Exception as exc:
            click.echo(f"error: warehouse {settings.warehouse_url}: {str(exc).strip() or type(exc).__name__}", err=True)
            ctx.exit(1)
        if fmt == "table":
            from rich.console import Console

            Console(width=200, soft_wrap=False).print(rows_table(answer.column_names, answer.result_rows))
        else:
            click.echo(format_rows(answer.column_names, answer.result_rows, fmt))

    @results.command("replay-dead")
    @config_option
    @click.option("--destination", help="only the dead letters of this destination")
    @click.option("--dry-run", is_flag=True, help="list what would be sent, send nothing")
    @click.pass_context
    def replay_dead(ctx: click.Context, destination: str | None, dry_run: bool) -> None:
        """Send dead-lettered outputs again, each once: what was delivered since is skipped."""
        from schemas.events import DeadLetter
        from schemas.topics import DEAD_LETTER
        from streams.delivery import DestinationsError, load_destinations, read_topic, replay_dead_letters

        settings = settings_of(ctx)
        if settings.results.destinations_file is None:
            click.echo("error: no results.destinations_file (RADSTREAM_RESULTS_DESTINATIONS_FILE)", err=True)
            ctx.exit(2)
        try:
            destinations = load_destinations(settings.results.destinations_file)
        except DestinationsError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        letters = [letter for letter in read_topic(settings, DEAD_LETTER)
                   if isinstance(letter, DeadLetter) and letter.stage == "delivery" and letter.key
                   and (destination is None or letter.key.endswith(f":{destination}"))]
        latest = {letter.key: letter for letter in letters}  # an output dead twice is replayed once
        click.echo(f"{len(latest)} dead-lettered output(s)", err=True)
        if dry_run:
            for key, letter in latest.items():
                click.echo(f"{key}\t{letter.error}")
            return
        counts = replay_dead_letters(settings, destinations, list(latest.values()),
                                     progress=lambda line: click.echo(line, err=True))
        click.echo(" ".join(f"{name} {count}" for name, count in counts.items()))
        if counts["failed"]:
            ctx.exit(1)
