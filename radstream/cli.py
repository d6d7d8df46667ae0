"""The ``radstream`` command line: run the runtime, send studies, look at the worklist.

About 450 lines: one short function per operator command, with the output helpers they share;
the command groups (``topics``, ``report``, ``read``, ``load``, ``results``, ``deadletters``,
``models``) are modules of their own that register here.

Settings are loaded lazily by each command (``--help`` works with a broken
configuration); an invalid setting or a taken port ends the command with a one-line
error and exit code 2, never a traceback. Heavy imports (Kafka, DICOM, ClickHouse)
happen inside the commands that need them.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import click

from radstream.procs import PortInUseError
from schemas.settings import Settings, SettingsError, load_settings


def _err(message: str) -> None:
    click.echo(f"error: {message}", err=True)


# ---------------------------------------------------------------- settings and JSON


class _State:
    def __init__(self) -> None:
        self.config: Path | None = None
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings


def _set_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        ctx.ensure_object(_State).config = value
    return value


def config_option(func: Callable) -> Callable:
    """``--config FILE`` on the group and on every command (``radstream up --config x.toml``)."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="RADSTREAM_CONFIG",
        callback=_set_config,
        expose_value=False,
        is_eager=True,
        help="TOML settings file (env RADSTREAM_CONFIG).",
    )(func)


def _settings(ctx: click.Context) -> Settings:
    return ctx.ensure_object(_State).settings


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def to_json(value: Any, indent: int | None = 2) -> str:
    return json.dumps(value, default=_json_default, indent=indent, ensure_ascii=False)


# ---------------------------------------------------------------- the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def cli(ctx: click.Context) -> None:
    """radstream: DICOM/HL7 in, a prioritised, routed radiology worklist out."""
    ctx.ensure_object(_State)


@cli.command()
@config_option
@click.option("--demo", is_flag=True, help="once ready, send pydicom's sample studies and print the worklist")
@click.pass_context
def up(ctx: click.Context, demo: bool) -> int:
    """Start broker, warehouse, stream worker and DICOM gateway; stop them on Ctrl-C."""
    from adapters.telemetry import configure_logging
    from radstream.runtime import default_specs
    from radstream.supervisor import AlreadyRunningError, Supervisor

    settings = _settings(ctx)
    configure_logging(settings, "supervisor")
    try:
        supervisor = Supervisor(settings, default_specs(settings))
        return supervisor.run(after_ready=(lambda: run_demo(settings)) if demo else None)
    except AlreadyRunningError as exc:
        _err(str(exc))
        return 2


#: Real studies shipped with pydicom and pydicom-data: CT, MR, several studies of the
#: same patients (priors), a chest CR and a head CT.
DEMO_FILES = ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "693_UNCR.dcm")
DEMO_FOLDERS = ("dicomdirtests",)


def demo_paths() -> list[Path]:
    from pydicom.data import get_testdata_file

    paths = []
    for name in DEMO_FILES:
        # download=False: without pydicom-data the default tries the internet for ~21 s.
        found = get_testdata_file(name, download=False)
        if found:
            paths.append(Path(found))
    ct = get_testdata_file("CT_small.dcm", download=False)
    if ct:
        paths += [Path(ct).parent / folder for folder in DEMO_FOLDERS if (Path(ct).parent / folder).is_dir()]
    return paths


def demo_painted(folder: Path) -> list[Path]:
    """pydicom-data's head CT with the demo model's synthetic finding painted in, as a study
    of its own (same UIDs every run): the demo shows AI moving it to the top."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from engines.demo.synthetic import paint_finding

    source = get_testdata_file("693_UNCR.dcm", download=False)
    if not source:
        return []
    path = folder / "painted-head-ct.dcm"
    if not path.exists():
        ds = paint_finding(dcmread(source), "hemorrhage", 101)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
            generate_uid(entropy_srcs=["radstream demo painted head CT", part]) for part in ("study", "series", "sop"))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber, ds.StudyDescription = "DEMO-AI-1", "CT HEAD (demo: synthetic finding painted in)"
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return [path]


def run_demo(settings: Settings) -> None:
    """``up --demo``: send the sample studies, wait for them on the worklist, print it."""
    from pydicom import dcmread

    from radstream.send import iter_files, send_files
    from radstream.supervisor import connect_host
    from adapters import warehouse

    paths = [*demo_paths(), *demo_painted(settings.data_dir.resolve() / "demo")]
    studies = set()
    for path, _named in iter_files(paths):
        try:
            studies.add(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
        except Exception:  # DICOMDIRs, non-DICOM files: send_files skips them too
            continue
    report = send_files(paths, connect_host(settings.bind_host), settings.dicom.port, "DEMO",
                        settings.dicom.ae_title, progress=False, timeout_s=settings.dicom.network_timeout_s)
    console = _console()
    console.print(f"demo: sent {report.sent} instances of {len(studies)} studies, failed {len(report.failed)}",
                  highlight=False)
    for failure in report.failed:
        console.print(f"  failed {failure}", highlight=False)
    # Studies complete after the quiet period; then routing, AI and the warehouse sink.
    deadline = time.monotonic() + settings.assembly.quiet_period_s + 60
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = list(warehouse.current_worklist(settings, 1000))
        if studies <= {row.get("study_uid") for row in rows} and all(r.get("ai_status") != "PENDING" for r in rows):
            break
        time.sleep(1)
    console.print(worklist_table(sort_worklist(rows)))
    console.print(f"demo: {len(rows)} studies on the worklist; radstream keeps running (Ctrl-C to stop)",
                  highlight=False)


@cli.command()
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--host", help="gateway host [default: settings.bind_host]")
@click.option("--port", type=click.IntRange(1, 65535), help="gateway port [default: settings.dicom.port]")
@click.option("--aet", default="SITE", show_default=True, help="our (calling) AE title")
@click.option("--aec", help="the gateway's (called) AE title [default: settings.dicom.ae_title]")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.pass_context
def send(ctx: click.Context, paths: Sequence[Path], host: str | None, port: int | None, aet: str,
         aec: str | None, no_progress: bool) -> int:
    """C-STORE every DICOM file under PATHS (files or folders) to the gateway."""
    from rich.console import Console

    from radstream.send import send_files
    from radstream.supervisor import connect_host

    settings = _settings(ctx)
    host = host or connect_host(settings.bind_host)
    port = port or settings.dicom.port
    aec = aec or settings.dicom.ae_title
    report = send_files(paths, host, port, aet, aec, progress=not no_progress,
                        timeout_s=settings.dicom.network_timeout_s)
    console = Console(soft_wrap=True)
    for warning in report.warnings:
        console.print(f"[yellow]warning[/] {warning}", markup=True, highlight=False)
    for failure in report.failed:
        console.print(f"[red]failed[/]  {failure}", markup=True, highlight=False)
    skipped = f", skipped {report.skipped_non_dicom} non-DICOM files" if report.skipped_non_dicom else ""
    if report.skipped_dicomdir:
        skipped += f", skipped {report.skipped_dicomdir} DICOMDIR files"
    console.print(
        f"sent {report.sent}, failed {len(report.failed)}{skipped} to {aec}@{host}:{port} "
        f"in {report.elapsed_s:.1f}s over {report.associations} association(s)",
        highlight=False,
    )
    return 0 if report.ok else 1


# ---------------------------------------------------------------- warehouse


def sort_worklist(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reading order: CRITICAL, URGENT, ROUTINE, then oldest received first."""
    from schemas.events import Priority

    def key(row: dict[str, Any]) -> tuple[int, str]:
        received = row.get("received_at")
        received_key = received.isoformat() if isinstance(received, datetime) else str(received or "")
        try:
            rank = Priority(str(row.get("priority") or "").upper()).rank
        except ValueError:  # unknown priority: after every known one
            rank = len(Priority)
        return rank, received_key

    return sorted(rows, key=key)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


#: (key, title) of the table; ``--json`` has every field.
WORKLIST_COLUMNS = (
    ("priority", "priority"), ("received_at", "received"), ("accession_number", "accession"),
    ("modality", "mod"), ("body_part", "body part"), ("study_description", "description"),
    ("reason_for_exam", "indication"),
    ("subspecialty", "subspecialty"), ("source_site", "site"), ("instance_count", "inst"),
    ("status", "status"), ("ai_status", "AI"), ("ai_findings", "AI findings"), ("deliveries", "results out"),
    ("study_uid", "study"),
    ("reasons", "reasons"),
)


def worklist_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    colours = {"CRITICAL": "bold red", "URGENT": "yellow"}
    table = Table(title=f"worklist: {len(rows)} studies")
    for key, title in WORKLIST_COLUMNS:
        table.add_column(title, overflow="fold", no_wrap=key in ("priority", "received_at"),
                         justify="right" if key == "instance_count" else "left")
    for row in rows:
        cells = {k: _cell(row.get(k)) for k, _ in WORKLIST_COLUMNS}
        if row.get("version") and row["version"] != 1:
            cells["study_uid"] += f" v{row['version']}"
        style = colours.get(str(row.get("priority") or "").upper())
        table.add_row(*(cells[k] for k, _ in WORKLIST_COLUMNS), style=style)
    return table


def _console() -> Any:
    """Rich console on stdout; piped output gets a wide page instead of 80 columns."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.pass_context
def worklist(ctx: click.Context, as_json: bool, limit: int) -> int:
    """The current worklist (latest version of each study), in reading order."""
    from adapters import warehouse

    settings = _settings(ctx)
    try:
        rows = sort_worklist(list(warehouse.current_worklist(settings, limit)))
    except Exception as exc:
        return _warehouse_error(settings, exc)
    if as_json:
        click.echo(to_json(rows))
    else:
        _console().print(worklist_table(rows))
    return 0


def _warehouse_error(settings: Settings, exc: Exception) -> int:
    message = str(exc).strip() or type(exc).__name__
    _err(f"warehouse {settings.warehouse_url}: {message}")
    return 1


_RESULT_PREFIXES = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "(")


@cli.command()
@config_option
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.pass_context
def query(ctx: click.Context, sql: str, fmt: str) -> int:
    """Run SQL against the warehouse and print the result."""
    from adapters import warehouse

    settings = _settings(ctx)
    try:
        client = warehouse.connect(settings)
        if sql.lstrip().upper().startswith(_RESULT_PREFIXES):
            result = client.query(sql)
            columns, rows = list(result.column_names), [list(r) for r in result.result_rows]
        else:
            summary = client.command(sql)
            click.echo(_cell(summary) if summary not in (None, "") else "ok")
            return 0
    except Exception as exc:
        return _warehouse_error(settings, exc)
    if fmt == "table":
        _console().print(rows_table(columns, rows))
    else:
        click.echo(format_rows(columns, rows, fmt))
    return 0


def format_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> str:
    """``json``: a list of objects; ``csv``: a header line, then one line per row."""
    if fmt == "json":
        return to_json([dict(zip(columns, row, strict=True)) for row in rows])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    return buf.getvalue().rstrip("\n")


def rows_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    from rich.table import Table

    table = Table(*columns, caption=f"{len(rows)} rows")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    return table


# ---------------------------------------------------------------- PHI scan


@cli.command("phi-scan")
@config_option
@click.option("--canaries", "canary_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="file with one PHI canary value per line")
@click.option("--topic", "topic_names", multiple=True,
              help="topic (suffix or full name) to scan [default: every de-identified topic]")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_context
def phi_scan(ctx: click.Context, canary_file: Path, topic_names: Sequence[str], as_json: bool) -> int:
    """Scan de-identified topics and blobs for PHI canaries and attributes the profile removes.

    Exit code 1 when anything is found.
    """
    from adapters.blobs import open_blob_store
    from schemas.topics import DEIDENTIFIED_TOPICS
    from schemas.deid.policy import load_policy
    from radstream.phi_scan import load_canaries, scan
    from schemas.deid.keys import key_path, load_keys

    settings = _settings(ctx)
    names = [t if t.startswith(settings.kafka.topic_prefix + ".") else settings.topic(t) for t in topic_names] \
        or [spec.name(settings) for spec in DEIDENTIFIED_TOPICS]
    # the key maps the events' site pseudonyms to the sites' policies; never created here
    keys = load_keys(settings) if settings.deid.key is not None or key_path(settings).exists() else None
    report = scan(settings, load_canaries(canary_file), names, open_blob_store(settings),
                  load_policy(settings.deid.policy_file), keys)
    read = ", ".join(f"{topic} {done}/{total}" for topic, (done, total) in report.read.items()) or "no events"
    if as_json:
        click.echo(to_json({"events": report.events, "blobs": report.blobs, "findings": report.findings,
                            "read": {topic: {"read": done, "on_topic": total}
                                     for topic, (done, total) in report.read.items()}}))
    else:
        for finding in report.findings:
            click.echo(f"{finding.where}  {finding.attribute}  {finding.problem}")
        click.echo(f"phi-scan: {report.events} events on {', '.join(names)}, {report.blobs} blobs, "
                   f"{len(report.findings)} findings; read/on topic (true partition ends): {read}")
    return 1 if report.findings else 0


# ---------------------------------------------------------------- entry point

from radstream import models_cli  # noqa: E402  (its command joins the group above)

models_cli.register(cli, config_option, _settings, to_json)
from radstream import report_cli  # noqa: E402

report_cli.register(cli, config_option, _settings, format_rows, rows_table)
from radstream import reading_cli  # noqa: E402
reading_cli.register(cli, config_option, _settings)
from radstream import load_cli, results_cli  # noqa: E402
load_cli.register(cli, config_option, _settings)
results_cli.register(cli, config_option, _settings, format_rows, rows_table)
from radstream import deadletters  # noqa: E402
deadletters.register(cli, config_option, _settings, format_rows, rows_table)
from radstream import topics_cli  # noqa: E402
topics_cli.register(cli, config_option, _settings, _console, to_json, _err)


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``radstream``: clean one-line errors, exit codes 0/1/2."""
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="radstream",
                        standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        _err("aborted")
        sys.exit(1)
    except (SettingsError, PortInUseError, TimeoutError) as exc:  # TimeoutError: a broker not answering in time
        _err(str(exc))
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
