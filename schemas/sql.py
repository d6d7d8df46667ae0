"""SQL as contract files: the warehouse DDL and the named queries, read from ``clickhouse/``.

The DDL in ``schemas/clickhouse/*.sql`` is applied in file order and is idempotent;
named queries live in ``schemas/clickhouse/queries/*.sql`` with ``{name:Type}``
parameters bound by the server. :mod:`adapters.warehouse` runs them.

A materialized view fills its table only from the rows inserted after it was created, so
each view over older tables has a **backfill** file: comments, and two directives that
name the view's file and the condition under which its SELECT is inserted once::

    -- backfill: 071_stage_times_from_stage_events.sql
    -- only if: SELECT count() = 0 FROM stage_times WHERE stage != 'ai'

The statement is the view's own SELECT, inserted into the view's table, so the view and
its backfill cannot drift apart. The condition runs first, as its own query, at every
start; the insert only where it holds.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from typing import NamedTuple


class UnknownQuery(LookupError):
    """No ``schemas/clickhouse/queries/<name>.sql`` exists."""


class DdlError(ValueError):
    """A DDL file cannot be read as the statement it claims to be; the message names the file."""


class DdlStatement(NamedTuple):
    """One statement of the warehouse DDL, from the file ``name``."""

    name: str
    sql: str
    #: a SELECT of one value: the statement runs only where it is true (a backfill's "once")
    only_if: str | None = None


_DIRECTIVE = re.compile(r"^-- (backfill|only if): *(.*?) *$", re.MULTILINE)
_VIEW = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS \S+ TO (?P<table>\S+) AS\n(?P<select>.+)",
                   re.MULTILINE | re.DOTALL)


def _sql_dir():
    return resources.files("schemas").joinpath("clickhouse")


def ddl_statements(directory: Traversable | None = None) -> list[DdlStatement]:
    """Every DDL statement of ``directory`` (default: ``schemas/clickhouse``), in file order,
    backfills expanded from their views; raises :class:`DdlError`."""
    files = sorted((f for f in (directory or _sql_dir()).iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    texts = {f.name: f.read_text() for f in files}
    statements = []
    for name, text in texts.items():
        directives = dict(_DIRECTIVE.findall(text))
        if not directives:
            statements.append(DdlStatement(name, text))
            continue
        statements.append(_backfill(name, text, directives, texts))
    return statements


def _backfill(name: str, text: str, directives: dict[str, str], texts: dict[str, str]) -> DdlStatement:
    where = f"schemas/clickhouse/{name}"
    if any(line.strip() and not line.startswith("--") for line in text.splitlines()):
        raise DdlError(f"{where}: a backfill file holds only comments and its two directives")
    view_file, only_if = directives.get("backfill"), directives.get("only if")
    if not view_file or not only_if:
        raise DdlError(f"{where}: a backfill needs both '-- backfill: <view file>' and '-- only if: <SELECT>'")
    if view_file not in texts or view_file >= name:
        raise DdlError(f"{where}: backfill: {view_file!r} is not a DDL file applied before it")
    view = _VIEW.search(texts[view_file])
    if view is None:
        raise DdlError(f"{where}: backfill: {view_file} creates no 'MATERIALIZED VIEW IF NOT EXISTS ... TO table AS'")
    return DdlStatement(name, f"INSERT INTO {view['table']}\n{view['select']}", only_if)


def named_query(name: str) -> str:
    try:
        return _sql_dir().joinpath("queries", f"{name}.sql").read_text()
    except FileNotFoundError:
        raise UnknownQuery(f"no named query {name!r} in schemas/clickhouse/queries") from None
