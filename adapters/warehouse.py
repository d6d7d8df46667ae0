"""The one client path to the warehouse: clickhouse-connect, for both modes.

Production points ``warehouse.url`` at a ClickHouse server; the embedded runtime
serves the same HTTP protocol over chDB (``radstream.warehouse_server``). The SQL
itself is contract (:mod:`schemas.sql`): DDL applied in file order, idempotently, and
named queries with ``{name:Type}`` parameters bound by the server.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from schemas.settings import Settings
from schemas.sql import UnknownQuery, ddl_statements, named_query


class WarehouseError(RuntimeError):
    """The warehouse cannot be reached or refused a statement; the message says which."""


def connect(settings: Settings, *, database: str | None = None):
    """A clickhouse-connect client for the configured warehouse (``database`` None: the settings')."""
    import clickhouse_connect

    url = urlparse(settings.warehouse_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise WarehouseError(f"warehouse.url {settings.warehouse_url!r} must look like http(s)://host:port")
    try:
        return clickhouse_connect.get_client(
            host=url.hostname,
            port=url.port or (8443 if url.scheme == "https" else 8123),
            secure=url.scheme == "https",
            username=url.username or settings.warehouse.username,
            password=url.password or settings.warehouse.password.get_secret_value(),
            database=settings.warehouse.database if database is None else database,
            connect_timeout=settings.warehouse.connect_timeout_s,
            autogenerate_session_id=False,
        )
    except Exception as exc:
        raise WarehouseError(f"cannot reach the warehouse at {settings.warehouse_url}: {exc}") from None


def apply_ddl(settings: Settings) -> None:
    """Create the database and every table/view; safe to run at every start."""
    admin = connect(settings, database="default")
    try:
        admin.command(f"CREATE DATABASE IF NOT EXISTS {settings.warehouse.database}")
    finally:
        admin.close()
    client = connect(settings)
    try:
        for statement in ddl_statements():
            try:
                if statement.only_if is None or client.query(statement.only_if).first_row[0]:
                    client.command(statement.sql)
            except Exception as exc:
                raise WarehouseError(f"applying schemas/clickhouse/{statement.name} failed: {exc}") from None
    finally:
        client.close()


def query_rows(settings: Settings, name: str, **parameters: Any) -> list[dict[str, Any]]:
    """Run a named query and return its rows as dicts."""
    client = connect(settings)
    try:
        try:
            sql = named_query(name)
        except UnknownQuery as exc:
            raise WarehouseError(str(exc)) from None
        result = client.query(sql, parameters=parameters)
        return [dict(zip(result.column_names, row)) for row in result.result_rows]
    finally:
        client.close()


def current_worklist(settings: Settings, limit: int = 1000) -> list[dict[str, Any]]:
    """Latest version of every study on the worklist, most urgent first."""
    return query_rows(settings, "current_worklist", limit=limit)
