"""SQL as contract files: the warehouse DDL and the named queries, read from ``clickhouse/``.

The DDL in ``schemas/clickhouse/*.sql`` is applied in file order and is idempotent;
named queries live in ``schemas/clickhouse/queries/*.sql`` with ``{name:Type}``
parameters bound by the server. :mod:`adapters.warehouse` runs them.
"""

from __future__ import annotations

from importlib import resources


class UnknownQuery(LookupError):
    """No ``schemas/clickhouse/queries/<name>.sql`` exists."""


def _sql_dir():
    return resources.files("schemas").joinpath("clickhouse")


def ddl_statements() -> list[tuple[str, str]]:
    """(file name, statement) for every DDL file, in order."""
    files = sorted((f for f in _sql_dir().iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name, f.read_text()) for f in files]


def named_query(name: str) -> str:
    try:
        return _sql_dir().joinpath("queries", f"{name}.sql").read_text()
    except FileNotFoundError:
        raise UnknownQuery(f"no named query {name!r} in schemas/clickhouse/queries") from None
