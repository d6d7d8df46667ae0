"""Acknowledging a critical alert through the reading API and its CLI, without the runtime.

A head CT has two critical AI findings; the results stage raised an alert for each 15 minutes
ago and the alerts stage escalated the hemorrhage one. The warehouse is the real schema and the
API's named queries on the ClickHouse engine in process (chDB), filled with the sink's rows; the
publisher is a list. The neuroradiologist of the study's site lists the open alerts and
acknowledges the hemorrhage; a reader of another site, an analyst and bad requests are refused.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from chdb import session as chdb_session
from click.testing import CliRunner

from gateways import reading_api
from gateways.reading_access import User, Users, token_sha256
from radstream.cli import cli
from schemas.codec import Codec
from schemas.events import (AlertTimer, AuditEvent, CodedConcept, Finding, InferenceResult, InferenceStatus,
                            Priority, Record, WorklistUpdate, trace_id_for, utcnow)
from schemas.settings import Settings, load_settings
from schemas.sql import ddl_statements, named_query
from schemas.topics import ALERT, ALERT_ACK, AUDIT
from streams.alerts import Alerts, AlertsState
from streams.results import ResultsState, critical_alerts
from streams.sink_rows import rows_for
from streams.state import TypedTable

STUDY = "1.2.826.0.1.3680043.8.498.42"
ACK_WITHIN = timedelta(minutes=10)
CHAIN = ("the on-call supervisor", "the department chief", "the medical director")
#: token -> user
USERS = {"tok-neuro": User("dr-neuro", "reader", frozenset({"SITE_A"})),
         "tok-other": User("dr-elsewhere", "reader", frozenset({"SITE_Z"})),
         "tok-analyst": User("qa-analyst", "analyst", frozenset()),
         "tok-admin": User("ops", "admin", frozenset({"*"}))}


class Warehouse:
    """The warehouse schema on the ClickHouse engine in this process: the sink's rows go in, the
    named queries come out as rows of Python values (what clickhouse-connect gives the API)."""

    def __init__(self, path: Path) -> None:
        self.session = chdb_session.Session(str(path))
        self.lock = threading.Lock()  # the API queries from its executor threads
        for statement in ddl_statements():  # the backfills insert nothing into an empty warehouse
            self.session.query(statement.sql)

    def write(self, *events: Record) -> None:
        for event in events:
            for table, row in rows_for(event, 0, 0, "topic"):
                line = json.dumps(row, default=lambda v: v.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])
                with self.lock:
                    self.session.query(f"INSERT INTO {table} FORMAT JSONEachRow {line}")

    def query_rows(self, settings: Settings, name: str, **parameters: Any) -> list[dict[str, Any]]:
        with self.lock:
            table = self.session.query(named_query(name), "ArrowTable",
                                       params={key: str(value) for key, value in parameters.items()})
        return table.to_pylist()


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, Record]] = []

    def publish(self, spec, event: Record) -> None:
        self.sent.append((spec, event))

    def of(self, spec) -> list[Record]:
        return [event for topic, event in self.sent if topic is spec]


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[Warehouse]:
    engine = Warehouse(tmp_path / "warehouse")
    try:
        yield engine
    finally:
        engine.session.close()


def critical(label: str, code: str) -> Finding:
    return Finding(label=label, model="head-ct", model_version="1.0", confidence=0.93, threshold=0.5, critical=True,
                   silent=False, codes=[CodedConcept(scheme="SCT", value=code, meaning=label)])


def worklist_row(now: datetime) -> WorklistUpdate:
    return WorklistUpdate(trace_id=trace_id_for(STUDY), study_uid=STUDY, version=1, modality="CT", modalities=["CT"],
                          priority=Priority.CRITICAL, subspecialty="neuroradiology", source_site="SITE_A",
                          instance_count=1, reasons=[], received_at=now, assembled_at=now, routed_at=now,
                          status="UNREAD", assigned_reader="dr-neuro")


def test_the_reader_of_the_site_lists_the_open_alerts_and_acknowledges_one(
        warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = utcnow()
    raised_at = now - timedelta(minutes=15)

    def ai(version: int, at: datetime, *findings: Finding) -> InferenceResult:
        return InferenceResult(trace_id=trace_id_for(STUDY), study_uid=STUDY, version=version,
                               status=InferenceStatus.OK, findings=list(findings), models=[], level=3, images=1,
                               queued_ms=0, decode_ms=0, infer_ms=0, latency_ms=0, inferred_at=at)

    # the hemorrhage alerted 15 min ago and escalated 5 min ago; a late instance made version 2,
    # whose AI result 2 min ago found the hemorrhage again and a midline shift
    hemorrhage, shift = critical("hemorrhage", "50960005"), critical("midline-shift", "247404003")
    alerted, first = critical_alerts(ResultsState(study_uid=STUDY), ai(1, raised_at, hemorrhage), ACK_WITHIN,
                                     raised_at)
    _, second = critical_alerts(ResultsState(study_uid=STUDY, alerted=alerted), ai(2, now, hemorrhage, shift),
                                ACK_WITHIN, now - timedelta(minutes=2))
    alerts = Alerts(TypedTable({}, AlertsState, Codec()), ACK_WITHIN, CHAIN, ask_again=timedelta(minutes=1))
    alerts.on_alert(first[0])
    (escalated,) = of(alerts.on_tick(AlertTimer(study_uid=STUDY, due_at=raised_at + ACK_WITHIN)), ALERT)
    for alert in second:
        alerts.on_alert(alert)
    warehouse.write(worklist_row(raised_at), *first, escalated, *second)

    publisher = Publisher()
    api = reading_api.ReadingApi(load_settings(data_dir=tmp_path / "data", blobs={"backend": "local"}), publisher,
                                 users=Users({token_sha256(token): user for token, user in USERS.items()}))
    monkeypatch.setattr(reading_api, "query_rows", warehouse.query_rows)

    async def scenario() -> dict[str, Any]:
        got: dict[str, Any] = {}
        async with TestClient(TestServer(api.app())) as client:
            async def call(method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
                response = await client.request(method, f"/api/v1{path}", json=body,
                                                headers={"Authorization": f"Bearer {token}"})
                return response.status, await response.json()

            ack = f"/studies/{STUDY}/alerts/ack"
            got["open"] = await call("GET", "/alerts", "tok-neuro")
            got["elsewhere_list"] = await call("GET", "/alerts?open=true", "tok-other")
            got["analyst_list"] = await call("GET", "/alerts", "tok-analyst")
            got["bad_flag"] = await call("GET", "/alerts?open=maybe", "tok-neuro")
            got["elsewhere_ack"] = await call("POST", ack, "tok-other", {"finding": "hemorrhage"})
            got["no_finding"] = await call("POST", ack, "tok-neuro", {"note": "seen"})
            got["unknown_finding"] = await call("POST", ack, "tok-neuro", {"finding": "pneumothorax"})
            got["unknown_study"] = await call("POST", "/studies/9.9.9/alerts/ack", "tok-neuro", {"finding": "x"})
            # the reader's CLI, in a thread: this loop serves the API it calls
            base = str(client.make_url("/api/v1"))

            def read(*args: str) -> tuple[int, Any]:
                result = CliRunner().invoke(cli, ["read", "--url", base, "--token", "tok-neuro", *args])
                return result.exit_code, json.loads(result.output)

            got["cli_ack"] = await asyncio.to_thread(read, "ack", STUDY, "--finding", "hemorrhage",
                                                     "--note", "called the ED attending")
            (got["ack"],) = publisher.of(ALERT_ACK)
            warehouse.write(got["ack"])  # the sink's part
            got["stage_audit"] = alerts.on_ack(got["ack"])  # the alerts stage's part
            got["cli_open"] = await asyncio.to_thread(read, "alerts")
            got["all"] = await call("GET", "/alerts?open=false", "tok-admin")
            got["again"] = await call("POST", ack, "tok-admin", {"finding": "hemorrhage"})
        return got

    got = asyncio.run(scenario())

    status, listed = got["open"]
    assert status == 200 and listed["open"] is True
    # one alert per finding, whatever the version, at its latest level; the nearest deadline first
    assert [(a["finding"], a["version"], a["escalation_level"], a["alert_type"]) for a in listed["alerts"]] == [
        ("hemorrhage", 1, 1, "critical-finding-escalated"), ("midline-shift", 2, 0, "critical-finding")]
    hemorrhage = listed["alerts"][0]
    assert hemorrhage["source_site"] == "SITE_A" and hemorrhage["finding_code"] == "SCT:50960005"
    assert datetime.fromisoformat(hemorrhage["ack_deadline"]) == escalated.ack_deadline
    assert datetime.fromisoformat(hemorrhage["first_raised_at"]) == raised_at
    assert "escalate to the on-call supervisor" in hemorrhage["message"]
    assert got["elsewhere_list"] == (200, {"open": True, "alerts": []})
    assert got["analyst_list"][0] == 403 and got["bad_flag"][0] == 400
    assert got["elsewhere_ack"][0] == 403 and "alert.ack at site SITE_A" in got["elsewhere_ack"][1]["detail"]
    assert got["no_finding"][0] == 400
    assert got["unknown_finding"][0] == 409 and "hemorrhage, midline-shift" in got["unknown_finding"][1]["detail"]
    assert got["unknown_study"][0] == 404

    code, answered = got["cli_ack"]
    assert code == 0 and answered["outcome"] == "acknowledged" and answered["escalation_level"] == 1, answered
    ack = got["ack"]
    assert (ack.study_uid, ack.finding, ack.version, ack.actor, ack.note) == (
        STUDY, "hemorrhage", 1, "dr-neuro", "called the ED attending")
    ((_, stage_audit),) = got["stage_audit"]
    assert stage_audit.action == "alert-acknowledged" and stage_audit.detail["escalation_level"] == "1"
    assert set(alerts.states[STUDY].open) == {"midline-shift"}  # the stage stopped the hemorrhage's escalation

    code, still_open = got["cli_open"]
    assert code == 0 and [a["finding"] for a in still_open["alerts"]] == ["midline-shift"]
    status, every = got["all"]
    acknowledged = {a["finding"]: a["acknowledged_by"] for a in every["alerts"]}
    assert status == 200 and acknowledged == {"midline-shift": None, "hemorrhage": "dr-neuro"}
    status, again = got["again"]
    assert status == 200 and again["outcome"] == "acknowledged-already" and again["acknowledged_by"] == "dr-neuro"
    assert len(publisher.of(ALERT_ACK)) == 1  # an acknowledged alert is not acknowledged twice

    audit = [(event.actor, event.action) for event in publisher.of(AUDIT) if isinstance(event, AuditEvent)]
    for expected in [("dr-neuro", "alerts-viewed"), ("dr-elsewhere", "alert-ack-denied"), ("dr-neuro", "alert-ack"),
                     ("ops", "alerts-viewed")]:
        assert expected in audit, (expected, audit)
    assert ("dr-elsewhere", "alerts-viewed") not in audit  # saw nothing
    assert {event.trace_id for event in publisher.of(AUDIT) if event.actor != "qa-analyst"} == {trace_id_for(STUDY)}


def of(outputs, spec) -> list:
    return [event for topic, event in outputs if topic is spec]
