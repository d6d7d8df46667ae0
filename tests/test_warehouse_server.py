"""The embedded warehouse endpoint, driven by an unmodified clickhouse-connect client.

Each test starts ``python -m radstream.warehouse_server`` as a subprocess (chDB is one engine
per process) on the test's own port and data directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from radstream import procs
from schemas.settings import Settings

STUDIES_DDL = """
CREATE TABLE studies (
    study_uid String,
    instance_count UInt32,
    assembled_at DateTime64(3),
    accession_number Nullable(String),
    series_uids Array(String),
    modality LowCardinality(String),
    tags Map(String, String)
) ENGINE = ReplacingMergeTree(assembled_at) ORDER BY study_uid
"""
COLUMNS = ["study_uid", "instance_count", "assembled_at", "accession_number", "series_uids", "modality", "tags"]


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.to_env()}


def start_warehouse(settings: Settings, log_path: Path) -> subprocess.Popen:
    proc = procs.spawn(procs.python_module("radstream.warehouse_server"), env=_env(settings), log_path=log_path)
    url = f"http://{settings.bind_host}:{settings.warehouse.embedded_port}/ping"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"warehouse exited with {proc.returncode}: {log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.read() == b"Ok.\n":
                    return proc
        except OSError:
            time.sleep(0.05)
    procs.stop(proc, 1)
    raise TimeoutError(f"warehouse did not answer /ping: {log_path.read_text()}")


@pytest.fixture
def warehouse(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    proc = start_warehouse(settings, tmp_path / "warehouse.log")
    try:
        yield settings
    finally:
        assert procs.stop(proc, grace_s=10) == 0, (tmp_path / "warehouse.log").read_text()


def connect(settings: Settings, **kwargs) -> Client:
    kwargs.setdefault("username", "default")
    kwargs.setdefault("password", "")
    return clickhouse_connect.get_client(host=settings.bind_host, port=settings.warehouse.embedded_port, **kwargs)


def create_studies_table(settings: Settings, database: str = "reporting") -> Client:
    connect(settings).command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client = connect(settings, database=database)
    client.command(STUDIES_DDL)
    return client


def study_row(i: int, assembled_at: datetime = datetime(2024, 5, 1, 8, 30, 15, 250000)) -> list:
    return [f"1.2.840.99.{i}", i % 500, assembled_at, None if i % 3 == 0 else f"ACC{i:06d}",
            [f"1.2.840.99.{i}.{s}" for s in range(i % 4)], ("CT", "MR", "CR")[i % 3],
            {"site": f"s{i % 7}", "prio": "STAT"}]


def test_connect_reports_the_engine_version_and_creates_the_configured_database(warehouse: Settings) -> None:
    client = connect(warehouse)
    assert client.server_version.startswith("26.")
    assert client.command("SELECT version(), timezone()")[1] in ("UTC", "Etc/UTC")
    assert warehouse.warehouse.database in client.command("SHOW DATABASES").split("\n")
    assert connect(warehouse, database=warehouse.warehouse.database).command("SELECT currentDatabase()") == "radstream"


def test_thousands_of_rows_and_a_late_update_read_back_exactly_with_final(warehouse: Settings) -> None:
    client = create_studies_table(warehouse)
    rows = [study_row(i) for i in range(4000)]
    assert client.insert("studies", rows, column_names=COLUMNS).written_rows == 4000
    # A late instance re-assembles study 7: ReplacingMergeTree keeps the newer version.
    update = study_row(7, assembled_at=datetime(2024, 5, 1, 9, 0, 0, 1000))
    update[1] = 42
    client.insert("studies", [update], column_names=COLUMNS)

    result = client.query("SELECT * FROM studies FINAL ORDER BY study_uid")

    assert [t.name for t in result.column_types] == [
        "String", "UInt32", "DateTime64(3)", "Nullable(String)", "Array(String)", "LowCardinality(String)",
        "Map(String, String)"]
    by_uid = {row[0]: list(row) for row in result.result_rows}
    assert len(by_uid) == 4000
    assert by_uid["1.2.840.99.7"] == update
    for i in (0, 1, 2, 3, 1234, 3999):
        assert by_uid[f"1.2.840.99.{i}"] == study_row(i)
    assert client.command("SELECT count() FROM studies FINAL WHERE accession_number IS NULL") == 1334


def test_server_side_parameters_select_one_study(warehouse: Settings) -> None:
    client = create_studies_table(warehouse)
    client.insert("studies", [study_row(i) for i in range(50)], column_names=COLUMNS)

    result = client.query("SELECT instance_count, modality FROM studies WHERE study_uid = {study:String}",
                          parameters={"study": "1.2.840.99.10"})
    assert result.result_rows == [(10, "MR")]
    # Long parameters make clickhouse-connect post a multipart form instead of URL arguments.
    long_uids = [f"1.2.840.99.{i}" for i in range(3)] + [f"9.9.{'9' * 60}.{i}" for i in range(100)]
    assert client.query("SELECT count() FROM studies WHERE study_uid IN {uids:Array(String)}",
                        parameters={"uids": long_uids}).result_rows == [(3,)]


def test_settings_apply_to_their_own_request_only(warehouse: Settings) -> None:
    client = connect(warehouse)
    assert client.command("SELECT getSetting('max_block_size')", settings={"max_block_size": 1234}) == 1234
    assert client.command("SELECT getSetting('max_block_size')") != 1234


def test_unknown_column_raises_database_error_with_the_server_message(warehouse: Settings) -> None:
    client = create_studies_table(warehouse)
    with pytest.raises(DatabaseError) as caught:
        client.query("SELECT patient_name FROM studies")
    assert "Code: 47. DB::Exception: Unknown expression identifier `patient_name`" in str(caught.value)
    assert caught.value.code == 47

    request = urllib.request.Request(
        f"http://{warehouse.bind_host}:{warehouse.warehouse.embedded_port}/?database=reporting",
        data=b"SELECT patient_name FROM studies", method="POST")
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(request, timeout=5)
    assert http_error.value.code == 404  # what ClickHouse answers for UNKNOWN_IDENTIFIER
    assert http_error.value.headers["X-ClickHouse-Exception-Code"] == "47"
    assert http_error.value.read().startswith(b"Code: 47. DB::Exception: Unknown expression identifier")


def test_wrong_password_is_refused_with_authentication_failed(warehouse: Settings) -> None:
    with pytest.raises(DatabaseError) as caught:
        connect(warehouse, password="not-the-password")
    assert caught.value.code == 516
    assert "AUTHENTICATION_FAILED" in str(caught.value)


def test_rows_survive_a_restart_on_the_same_data_dir(settings: Settings, tmp_path: Path) -> None:
    proc = start_warehouse(settings, tmp_path / "first.log")
    try:
        create_studies_table(settings).insert("studies", [study_row(i) for i in range(100)], column_names=COLUMNS)
    finally:
        assert procs.stop(proc, grace_s=10) == 0

    proc = start_warehouse(settings, tmp_path / "second.log")
    try:
        client = connect(settings, database="reporting")
        assert client.command("SELECT count(), sum(instance_count) FROM studies") == ["100", str(sum(range(100)))]
    finally:
        procs.stop(proc, grace_s=10)


def test_two_clients_inserting_concurrently_lose_nothing(warehouse: Settings) -> None:
    create_studies_table(warehouse)
    errors: list[BaseException] = []

    def sink(worker: int) -> None:
        try:
            client = connect(warehouse, database="reporting")
            for batch in range(10):
                start = worker * 100_000 + batch * 200
                client.insert("studies", [study_row(i) for i in range(start, start + 200)], column_names=COLUMNS)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=sink, args=(worker,)) for worker in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    client = connect(warehouse, database="reporting")
    assert client.command("SELECT count(), uniqExact(study_uid) FROM studies") == ["4000", "4000"]
    assert client.query("SELECT * FROM studies WHERE study_uid = '1.2.840.99.201399'").result_rows == [
        tuple(study_row(201399))]


def test_a_raw_json_insert_carries_its_statement_in_the_body(warehouse: Settings) -> None:
    client = create_studies_table(warehouse)
    rows = b"".join(b'{"study_uid":"1.2.%d","instance_count":12,"assembled_at":"2024-05-01 08:30:15.250",'
                    b'"modality":"CT"}\n' % i for i in range(3))
    client.raw_insert("studies", ["study_uid", "instance_count", "assembled_at", "modality"], rows, fmt="JSONEachRow")
    assert client.query("SELECT study_uid, instance_count, assembled_at, accession_number, modality FROM studies "
                        "ORDER BY study_uid").result_rows == [
        (f"1.2.{i}", 12, datetime(2024, 5, 1, 8, 30, 15, 250000), None, "CT") for i in range(3)]


@pytest.mark.parametrize("compress", [False, "zstd", "gzip"])
def test_uncompressed_and_other_encodings_round_trip(warehouse: Settings, compress: str | bool) -> None:
    create_studies_table(warehouse)
    client = connect(warehouse, database="reporting", compress=compress)
    client.insert("studies", [study_row(i) for i in range(1000)], column_names=COLUMNS)
    assert client.query("SELECT * FROM studies WHERE study_uid = '1.2.840.99.999'").result_rows == [
        tuple(study_row(999))]
    assert client.command("SELECT count() FROM studies") == 1000


def test_a_taken_port_exits_2_with_one_clear_line(settings: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind((settings.bind_host, settings.warehouse.embedded_port))
        squatter.listen()
        done = subprocess.run(procs.python_module("radstream.warehouse_server"), env=_env(settings),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"radstream warehouse: the embedded warehouse cannot listen on {settings.bind_host}:"
        f"{settings.warehouse.embedded_port}: the port is already in use"]


def first_pid(settings: Settings) -> int:
    # ClickHouse writes its PID into the status file it keeps locked.
    return int((settings.data_dir / "warehouse" / "status").read_text().splitlines()[0].removeprefix("PID: "))


def test_a_second_server_on_the_same_data_dir_exits_2(warehouse: Settings) -> None:
    second = warehouse.model_copy(deep=True)
    second.warehouse.embedded_port = procs.free_port()
    done = subprocess.run(procs.python_module("radstream.warehouse_server"), env=_env(second),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    data_path = (warehouse.data_dir / "warehouse").resolve()
    assert done.stderr.strip().splitlines() == [
        f"radstream warehouse: the embedded warehouse cannot open {data_path}: another process "
        f"(PID: {first_pid(warehouse)}) holds it, and chDB allows one process per data directory"]
    assert connect(warehouse).command("SELECT 1") == 1  # the first one is unharmed
