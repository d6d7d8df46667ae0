"""``radstream report turnaround|sla|backlog|ai|discrepancies``: the analytics as tables.

Each report is :func:`radstream.reports.run_report` over the warehouse, printed as a rich
table (``--format table``), CSV (a header line, then a line per row) or JSON (a list of
objects). ``--since`` takes a duration back from now (``24h``, ``7d``) or an ISO
timestamp, ``--until`` the window's end (default now). Exit codes: 0 printed, 1 the
warehouse failed, 2 a request the report cannot answer, or a report that needs data no
stage records yet.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import click

from radstream.reports import GROUPINGS, REPORTS


def register(cli: click.Group, config_option, settings_of, format_rows, rows_table) -> None:
    @cli.command()
    @config_option
    @click.argument("name", metavar="|".join(REPORTS), type=click.Choice(list(REPORTS)))
    @click.option("--since", default="24h", show_default=True,
                  help="start of the window: a duration back from --until (30m, 24h, 7d) or an ISO timestamp")
    @click.option("--until", help="end of the window, an ISO timestamp [default: now]")
    @click.option("--by", type=click.Choice(GROUPINGS),
                  help="group by (backlog: reader unless given; ai: day unless given, else the window per model)")
    @click.option("--every", default="1h", show_default=True, help="backlog: the step between two depths")
    @click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
                  show_default=True)
    @click.pass_context
    def report(ctx: click.Context, name: str, since: str, until: str | None, by: str | None, every: str,
               fmt: str) -> None:
        """Turnaround, SLA compliance, worklist backlog, AI monitoring and AI/reader discrepancies."""
        from radstream.reports import (ReportRequestError, ReportUnavailable, parse_duration, parse_instant,
                                       render_table, run_report)

        settings = settings_of(ctx)
        try:
            end = parse_instant(until, datetime.now(UTC)) if until else datetime.now(UTC)
            result = run_report(settings, name, since=parse_instant(since, end), until=end, by=by,
                                step=parse_duration(every))
        except ReportUnavailable as exc:
            click.echo(f"report {name}: {exc}", err=True)
            ctx.exit(2)
        except ReportRequestError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except Exception as exc:  # the warehouse: unreachable, or it refused the query
            click.echo(f"error: warehouse {settings.warehouse_url}: {str(exc).strip() or type(exc).__name__}",
                       err=True)
            ctx.exit(1)
        if fmt == "table":
            from rich.console import Console

            # piped output gets a wide page instead of 80 columns, as the other commands do
            Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False).print(render_table(result, rows_table))
        else:
            click.echo(format_rows(result.columns, result.rows, fmt))
