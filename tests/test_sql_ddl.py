"""The warehouse DDL as files (schemas/sql.py): a backfill is its view's own SELECT, inserted
into the view's table once, and a backfill file that does not say so cleanly is refused with
its file named. The backfills' effect on a real warehouse is in test_reports*.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.sql import DdlError, ddl_statements

VIEW = re.compile(r"CREATE MATERIALIZED VIEW IF NOT EXISTS \S+ TO (\S+) AS\n(.+)", re.DOTALL)


def test_each_backfill_inserts_its_views_select_into_the_views_table_only_while_that_is_empty() -> None:
    statements = ddl_statements()
    texts = {s.name: s.sql for s in statements if s.only_if is None}
    backfills = [s for s in statements if s.only_if is not None]
    assert {s.name[:3] for s in backfills} == {"080", "081", "082", "083", "084", "112"}
    for backfill in backfills:
        source = Path("schemas/clickhouse", backfill.name).read_text()
        view_file = re.search(r"^-- backfill: (\S+)$", source, re.MULTILINE)[1]
        table, select = VIEW.search(texts[view_file]).groups()
        assert backfill.sql == f"INSERT INTO {table}\n{select}"
        assert re.fullmatch(rf"SELECT count\(\) = 0 FROM {table}( WHERE .+)?", backfill.only_if), backfill


def write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


VIEW_FILE = "CREATE MATERIALIZED VIEW IF NOT EXISTS v TO t AS\nSELECT a FROM s\n"


@pytest.mark.parametrize("backfill, error", [
    ("-- backfill: 010_v.sql\n-- only if: SELECT count() = 0 FROM t\nINSERT INTO t SELECT 1\n", "only comments"),
    ("-- backfill: 010_v.sql\n", "needs both"),
    ("-- only if: SELECT 1\n", "needs both"),
    ("-- backfill: 030_later.sql\n-- only if: SELECT 1\n", "not a DDL file applied before it"),
    ("-- backfill: 005_table.sql\n-- only if: SELECT 1\n", "creates no 'MATERIALIZED VIEW"),
])
def test_a_backfill_file_that_is_not_clean_is_refused_naming_it(tmp_path: Path, backfill: str, error: str) -> None:
    directory = write(tmp_path, {"005_table.sql": "CREATE TABLE IF NOT EXISTS t (a Int8) ENGINE = Memory\n",
                                 "010_v.sql": VIEW_FILE, "020_backfill.sql": backfill,
                                 "030_later.sql": VIEW_FILE})
    with pytest.raises(DdlError, match=rf"schemas/clickhouse/020_backfill\.sql: .*{re.escape(error)}"):
        ddl_statements(directory)


def test_files_without_directives_are_applied_as_written(tmp_path: Path) -> None:
    directory = write(tmp_path, {"010_v.sql": VIEW_FILE, "020_backfill.sql": "-- backfill: 010_v.sql\n"
                                 "-- only if: SELECT count() = 0 FROM t\n", "001_note.sql": "-- a comment\nSELECT 1\n"})
    assert ddl_statements(directory) == [("001_note.sql", "-- a comment\nSELECT 1\n", None),
                                         ("010_v.sql", VIEW_FILE, None),
                                         ("020_backfill.sql", "INSERT INTO t\nSELECT a FROM s\n",
                                          "SELECT count() = 0 FROM t")]
