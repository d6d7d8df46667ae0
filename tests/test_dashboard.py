"""The web dashboard in a real browser: Debian's headless chromium, driven by Selenium.

Five studies were sent over the last six hours: a head CT with a critical hemorrhage flag and a
brain MR at SITE_A, a chest CR and an overdue hand CR at SITE_B, and a chest CT at SITE_A that
was read and signed hours ago. Their events went through the sink's row builders into the real
warehouse (chDB behind its ClickHouse-HTTP endpoint, as ``radstream up`` runs it); the reading
API with its dashboard listens on its own port. An admin sees the four open studies in priority
and deadline order with their AI flags, the critical alerts and five rendered Plotly plots (kept
as a screenshot in ``test-artifacts/``); a reader of SITE_A sees only SITE_A's studies and no
plots; an analyst sees the plots but no patient; a bad token gets the log-in error.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adapters.warehouse import apply_ddl, connect
from gateways import reading_api
from gateways.dashboard_series import backlog_figure, window
from gateways.reading_access import load_users, token_sha256
from radstream import procs
from schemas.events import (Alert, AlertAck, AuditEvent, CompletionReason, DeadLetter, InferenceResult,
                            InferenceStatus, LabelScore, ModelRun, Priority, ReaderFeedback, ReadingAction, Record,
                            RoutingDecision, StudyAssembled, StudyLink, WorklistUpdate, finding_text, trace_id_for,
                            utcnow)
from schemas.settings import Settings, load_settings
from schemas.topics import AUDIT
from streams.sink import group_rows, insert_rows
from streams.sink_rows import rows_for
from test_alert_ack_api import Publisher

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SERIES = ("turnaround", "sla", "throughput", "backlog", "ai-agreement", "dead-letters")
TOKENS = {"admin": "tok-dashboard-admin", "reader": "tok-dashboard-neuro", "analyst": "tok-dashboard-analyst"}
USERS_FILE = f"""
[[user]]
id = "ops"
role = "admin"
sites = ["*"]
name = "Operations"
token_sha256 = "{token_sha256(TOKENS['admin'])}"

[[user]]
id = "dr-neuro"
role = "reader"
sites = ["SITE_A"]
token_sha256 = "{token_sha256(TOKENS['reader'])}"

[[user]]
id = "qa-analyst"
role = "analyst"
token_sha256 = "{token_sha256(TOKENS['analyst'])}"
"""


@dataclass(frozen=True)
class Sent:
    """One study the test sent: what the worklist must show of it."""

    accession_number: str
    patient_name: str
    site: str
    priority: Priority
    modality: str
    description: str
    received_ago: timedelta
    deadline_after: timedelta  # from receipt
    ai_finding: tuple[str, float] | None = None
    signed_after: timedelta | None = None  # from receipt; None: still open
    reader: str = "dr-neuro"

    @property
    def study_uid(self) -> str:
        return f"1.2.826.0.1.3680043.8.498.9{self.accession_number[-1]}"


STUDIES = [
    Sent("ACC-DASH-1", "DOE^JANE", "SITE_A", Priority.CRITICAL, "CT", "CT HEAD WO CONTRAST", timedelta(minutes=50),
         timedelta(hours=1), ai_finding=("hemorrhage", 0.93)),
    Sent("ACC-DASH-2", "ROE^RICHARD", "SITE_A", Priority.URGENT, "MR", "MR BRAIN", timedelta(hours=2),
         timedelta(hours=4)),
    Sent("ACC-DASH-3", "POE^EDGAR", "SITE_B", Priority.ROUTINE, "CR", "CR CHEST 2 VIEWS", timedelta(minutes=30),
         timedelta(hours=24), ai_finding=("pneumothorax", 0.71), reader="dr-chest"),
    Sent("ACC-DASH-4", "KOE^MARIA", "SITE_A", Priority.ROUTINE, "CT", "CT CHEST", timedelta(hours=5),
         timedelta(hours=2), ai_finding=("nodule", 0.64), signed_after=timedelta(minutes=50)),
    Sent("ACC-DASH-5", "LOE^ANNA", "SITE_B", Priority.ROUTINE, "CR", "CR HAND", timedelta(hours=6),
         timedelta(minutes=30), reader="dr-chest"),
]
OPEN_IN_ORDER = ["ACC-DASH-1", "ACC-DASH-2", "ACC-DASH-5", "ACC-DASH-3"]  # priority, then SLA deadline
PATIENTS = [sent.patient_name for sent in STUDIES]


def events_of(sent: Sent, now: datetime) -> list[Record]:
    """What the pipeline published for a study: assembly, de-identification link, AI result,
    routing, its worklist rows (routed, then signed) and the reader's decision on its AI finding."""
    uid, trace = sent.study_uid, trace_id_for(sent.study_uid)
    received = now - sent.received_ago
    assembled, linked, routed = received + timedelta(seconds=8), received + timedelta(seconds=9), \
        received + timedelta(seconds=12)
    inferred = received + timedelta(seconds=20)
    deid_uid = f"2.25.77{sent.accession_number[-1]}"
    label, score = sent.ai_finding or ("", 0.0)
    findings = [finding_text(label, score, "demo", "1.0")] if sent.ai_finding else []
    row = WorklistUpdate(
        trace_id=trace, study_uid=uid, version=1, modality=sent.modality, modalities=[sent.modality],
        priority=sent.priority, subspecialty="neuroradiology" if sent.site == "SITE_A" else "chest",
        source_site=sent.site, instance_count=1, received_at=received, assembled_at=assembled, routed_at=routed,
        accession_number=sent.accession_number, patient_id=f"P{sent.accession_number[-1]}",
        patient_name=sent.patient_name, study_description=sent.description,
        reasons=[f"critical AI finding: {label}"] if sent.priority is Priority.CRITICAL else
        [f"{sent.priority.value.lower()} order"],
        ai_status="OK", ai_findings=findings, assigned_reader=sent.reader, assigned_at=routed,
        sla_deadline=received + sent.deadline_after, updated_at=routed)
    events: list[Record] = [
        StudyAssembled(trace_id=trace, study_uid=uid, version=1, source_site=sent.site, instance_count=1,
                       modalities=[sent.modality], body_parts=[], series=[], instances=[],
                       first_received_at=received, last_received_at=received + timedelta(seconds=2),
                       assembled_at=assembled, completion_reason=CompletionReason.QUIET_PERIOD_ELAPSED,
                       accession_number=sent.accession_number, patient_name=sent.patient_name),
        StudyLink(trace_id=trace, study_uid=uid, version=1, deid_study_uid=deid_uid, deid_trace_id=f"d-{trace}",
                  patient_pseudonym="PSEUDO", source_site=sent.site, linked_at=linked),
        InferenceResult(trace_id=f"d-{trace}", study_uid=deid_uid, version=1, status=InferenceStatus.OK, findings=[],
                        models=[ModelRun(model="demo", model_version="1.0", model_sha256="0" * 64,
                                         backend="onnxruntime-cpu", status=InferenceStatus.OK, silent=False, images=1,
                                         scores=[LabelScore(label=label or "hemorrhage", score=score or 0.1,
                                                            threshold=0.5)])],
                        level=2, images=1, queued_ms=0, decode_ms=1, infer_ms=5, latency_ms=6000, inferred_at=inferred),
        RoutingDecision(trace_id=trace, study_uid=uid, version=1, priority=sent.priority,
                        subspecialty=row.subspecialty, reasons=[], routed_at=routed),
        row,
    ]
    if sent.signed_after is not None:
        signed = received + sent.signed_after
        events.append(row.replace(status="SIGNED", opened_at=signed - timedelta(minutes=10), signed_at=signed,
                                  updated_at=signed))
    if sent.ai_finding:  # the reader of the study decided its flag: two accepted, the pneumothorax rejected
        action = ReadingAction.REJECT if label == "pneumothorax" else ReadingAction.ACCEPT
        events.append(ReaderFeedback(feedback_id=f"fb-{uid}", trace_id=trace, study_uid=uid, version=1,
                                     reader_id=sent.reader, action=action, at=received + timedelta(minutes=5),
                                     source_site=sent.site, finding=label, model="demo 1.0", score=score))
    return events


def alerts_of(now: datetime) -> list[Record]:
    """The hemorrhage's alert, unacknowledged past its deadline; the pneumothorax's, acknowledged."""
    alerts: list[Record] = []
    for sent, code in (STUDIES[0], "50960005"), (STUDIES[2], "36118008"):
        label = sent.ai_finding[0]
        raised = now - sent.received_ago + timedelta(seconds=21)
        alerts.append(Alert(trace_id=trace_id_for(sent.study_uid), study_uid=sent.study_uid, version=1,
                            alert_type="critical-finding", severity=Priority.CRITICAL, raised_at=raised,
                            message=f"critical AI finding {label}: acknowledge within 10 min",
                            finding_code=f"SCT:{code}", ack_deadline=raised + timedelta(minutes=10), finding=label))
    raised_at = alerts[1].raised_at
    alerts.append(AlertAck(trace_id=alerts[1].trace_id, study_uid=STUDIES[2].study_uid, version=1,
                           finding="pneumothorax", actor="ops", at=raised_at + timedelta(minutes=3), note="called"))
    return alerts


def dead_letters_of(now: datetime) -> list[Record]:
    """Two de-identifications the object store was away for (an hour ago), one routing bug and
    one undecodable instance event (three hours ago)."""
    def letter(stage: str, reason: str, ago: timedelta) -> DeadLetter:
        return DeadLetter(stage=stage, reason=reason, error="...", failed_at=now - ago, key="k")
    return [letter("deidentify", "service_unavailable", timedelta(hours=1)),
            letter("deidentify", "service_unavailable", timedelta(minutes=61)),
            letter("route", "stage_error", timedelta(hours=3)), letter("assemble", "undecodable", timedelta(hours=3))]


@dataclass
class Network:
    settings: Settings
    api: reading_api.ReadingApi
    publisher: Publisher
    sent_at: datetime


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """The warehouse with the studies' rows in it and the reading API over it (not yet listening)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    with pytest.MonkeyPatch.context() as env:
        for name in [name for name in os.environ if name.startswith("RADSTREAM_")]:
            env.delenv(name)
        settings = load_settings(data_dir=tmp / "data", **procs.isolated_listeners(blobs={"backend": "local"}))
        proc = procs.spawn(procs.python_module("radstream.warehouse_server"),
                           env={**os.environ, **settings.to_env()}, log_path=tmp / "warehouse.log")
    try:
        procs.wait_for_port(settings.bind_host, settings.warehouse.embedded_port, 30, proc)
        apply_ddl(settings)
        now = utcnow()
        client = connect(settings)
        try:
            for event in [event for sent in STUDIES for event in events_of(sent, now)] + alerts_of(now):
                insert_rows(client, group_rows(rows_for(event, 0, 0, "test")))  # the sink's path, event by event
            for offset, letter in enumerate(dead_letters_of(now)):  # each letter at its own dead-letter offset
                insert_rows(client, group_rows(rows_for(letter, 0, offset, "test.deadletter")))
        finally:
            client.close()
        users_file = tmp / "users.toml"
        users_file.write_text(USERS_FILE)
        publisher = Publisher()
        yield Network(settings, reading_api.ReadingApi(settings, publisher, users=load_users(users_file)),
                      publisher, now)
    finally:
        procs.stop(proc, grace_s=5)


# ---------------------------------------------------------------- the JSON behind the page


@pytest.mark.integration
def test_each_role_gets_its_panels_and_the_figures_count_what_was_sent(network: Network) -> None:
    async def scenario() -> dict[str, Any]:
        got: dict[str, Any] = {}
        async with TestClient(TestServer(network.api.app())) as client:
            async def get(path: str, role: str | None = None) -> tuple[int, Any]:
                headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
                response = await client.get(path, headers=headers, allow_redirects=False)
                body = await response.json() if response.content_type == "application/json" else await response.text()
                return response.status, body

            for role in TOKENS:
                got[f"me {role}"] = await get("/api/v1/dashboard", role)
                got[f"worklist {role}"] = await get("/api/v1/dashboard/worklist", role)
                got[f"throughput {role}"] = await get("/api/v1/dashboard/series/throughput", role)
            for name in SERIES:
                got[name] = await get(f"/api/v1/dashboard/series/{name}?hours=12", "admin")
            got["no token"] = await get("/api/v1/dashboard/worklist")
            got["unknown series"] = await get("/api/v1/dashboard/series/pie", "admin")
            got["too long"] = await get("/api/v1/dashboard/series/sla?hours=1000", "admin")
            got["page"] = await get("/dashboard")
            got["slash"] = await get("/dashboard/")
            plotly = await client.get("/dashboard/plotly.min.js")
            got["plotly"] = (plotly.status, plotly.headers.get("Content-Type"), (await plotly.read())[:200])
        return got

    got = asyncio.run(scenario())

    panels = {role: got[f"me {role}"][1]["panels"] for role in TOKENS}
    assert panels == {"admin": {"worklist": True, "alerts": True, "plots": True},
                      "reader": {"worklist": True, "alerts": True, "plots": False},
                      "analyst": {"worklist": False, "alerts": False, "plots": True}}
    status, admin = got["worklist admin"]
    assert status == 200 and [s["accession_number"] for s in admin["studies"]] == OPEN_IN_ORDER
    head_ct = admin["studies"][0]
    assert [(f["label"], f["score"]) for f in head_ct["ai_flags"]] == [("hemorrhage", 0.93)]
    assert head_ct["patient_name"] == "DOE^JANE" and "trace_id" not in head_ct and "ai_findings" not in head_ct
    status, reader = got["worklist reader"]
    assert status == 200 and [s["accession_number"] for s in reader["studies"]] == ["ACC-DASH-1", "ACC-DASH-2"]
    assert got["worklist analyst"][0] == 403 and got["throughput reader"][0] == 403
    assert got["no token"][0] == 401 and got["unknown series"][0] == 404 and got["too long"][0] == 400

    # the figures: every study reached routing and the AI; one was signed; two flags of three accepted
    def totals(name: str) -> dict[str, float]:
        data = got[name][1]["figure"]["data"]
        return {trace["name"]: sum(y for y in trace["y"] if y is not None) for trace in data}

    throughput = totals("throughput")
    assert throughput["routed"] == throughput["ai"] == throughput["received"] == 5 and throughput["signed"] == 1
    agreement = totals("ai-agreement")
    assert (agreement["accepted"], agreement["modified"], agreement["rejected"]) == (2, 0, 1)
    (percent,) = [trace["y"] for trace in got["ai-agreement"][1]["figure"]["data"] if trace["name"] == "accepted %"]
    assert 100.0 in percent and set(percent) <= {None, 0.0, 50.0, 100.0}  # per hour: the signed CT's hour is 100 %
    sla = totals("sla")
    assert (sla["signed on time"], sla["signed late"], sla["open, overdue"], sla["open, in time"]) == (1, 0, 1, 3)
    backlog = {trace["name"]: trace["y"][-1] for trace in got["backlog"][1]["figure"]["data"]}
    assert backlog == {"critical": 1, "urgent": 1, "routine": 2, "overdue": 1}  # at the end of the last hour: now
    assert totals("dead-letters") == {"deidentify: service_unavailable": 2, "route: stage_error": 1,
                                      "assemble: undecodable": 1}
    turnaround = {trace["name"] for trace in got["turnaround"][1]["figure"]["data"]}
    assert {"routed p50", "routed p95", "ai p50", "signed p95"} <= turnaround

    status, page = got["page"]
    assert status == 200 and "plotly.min.js" in page and not any(name in page for name in PATIENTS)
    assert got["slash"][0] == 302
    status, content_type, head = got["plotly"]
    assert status == 200 and content_type.startswith("text/javascript") and b"plotly.js" in head


def test_a_plot_covers_the_hours_up_to_now_and_the_backlog_lands_in_its_hour() -> None:
    """At 10:20 a three-hour plot shows 08:00, 09:00 and 10:00; the backlog's steps end at 09:00, 10:00 and now."""
    now = datetime(2026, 12, 1, 10, 20, tzinfo=UTC)
    span = window(now, 3)
    assert span.hours == (datetime(2026, 12, 1, 8, tzinfo=UTC), datetime(2026, 12, 1, 9, tzinfo=UTC),
                          datetime(2026, 12, 1, 10, tzinfo=UTC))
    assert span.ends() == [datetime(2026, 12, 1, 9, tzinfo=UTC), datetime(2026, 12, 1, 10, tzinfo=UTC), now]
    rows = [{"at": datetime(2026, 12, 1, 10, tzinfo=UTC), "grp": "URGENT", "open": 2, "overdue": 1},
            {"at": now, "grp": "URGENT", "open": 3, "overdue": 0},
            {"at": now, "grp": "CRITICAL", "open": 1, "overdue": 1}]
    traces = {trace.name: list(trace.y) for trace in backlog_figure(rows, span).data}
    assert traces == {"critical": [0, 0, 1], "urgent": [0, 2, 3], "routine": [0, 0, 0], "overdue": [0, 1, 1]}
    with pytest.raises(ValueError, match="1 to 168 hours"):
        window(now, 0)
    assert math.isclose((span.until - span.since).total_seconds(), 2 * 3600 + 20 * 60)


# ---------------------------------------------------------------- the page, in a real browser


class Listening:
    """The reading API with its dashboard on its own port, its event loop in a thread (Selenium blocks)."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="reading-api", daemon=True)
        self.runner: web.AppRunner | None = None

    def __enter__(self) -> str:
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(
            reading_api.start_server(self.network.settings, self.network.api), self.loop).result(30)
        settings = self.network.settings
        return f"http://{settings.bind_host}:{settings.reading.port}"

    def __exit__(self, *exc_info: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, through Debian's chromedriver (no driver download)."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install chromium chromium-driver "
                    "(scripts/bootstrap.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1500,1200", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def whole_page_png(browser: Any) -> bytes:
    """The whole page, not only the window, through the DevTools protocol (Page.captureScreenshot)."""
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    return png


@pytest.mark.integration
def test_the_dashboard_in_a_browser_shows_each_role_what_it_may_see(network: Network, browser: Any,
                                                                     tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)

    def log_in(token: str) -> None:
        field = wait.until(shown.visibility_of_element_located((By.ID, "token")))
        field.clear()
        field.send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()

    def log_out() -> None:
        browser.find_element(By.ID, "logout").click()
        wait.until(shown.visibility_of_element_located((By.ID, "login")))

    def accessions() -> list[str]:
        rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody tr[data-accession]")
        return [row.get_attribute("data-accession") for row in rows]

    def rendered_plots() -> list[str]:
        return [plot.get_attribute("id") for plot in browser.find_elements(By.CSS_SELECTOR, "#plots .js-plotly-plot")
                if plot.find_elements(By.CSS_SELECTOR, "svg.main-svg")
                and plot.find_elements(By.CSS_SELECTOR, "g.trace")]

    with Listening(network) as base:
        with urllib.request.urlopen(f"{base}/dashboard", timeout=10) as response:
            html = response.read().decode()
            policy = response.headers["Content-Security-Policy"]
        assert not any(name in html for name in PATIENTS) and "script-src 'self'" in policy

        browser.get(f"{base}/dashboard")
        log_in("not-a-token")
        error = wait.until(shown.visibility_of_element_located((By.ID, "login-error")))
        assert "not valid" in error.text, error.text

        # the admin: every open study, most urgent first, with its AI flags; the alerts; five plots
        log_in(TOKENS["admin"])
        wait.until(lambda _: accessions() == OPEN_IN_ORDER)
        head_ct = browser.find_element(By.CSS_SELECTOR, "#worklist tr[data-accession='ACC-DASH-1']")
        assert "DOE^JANE" in head_ct.text and "hemorrhage 0.93" in head_ct.text
        assert "critical AI finding: hemorrhage" in head_ct.text
        overdue = browser.find_element(By.CSS_SELECTOR, "#worklist tr[data-accession='ACC-DASH-5'] td.overdue")
        assert overdue.text.startswith("overdue")
        wait.until(lambda _: len(rendered_plots()) == len(SERIES))
        assert rendered_plots() == [f"plot-{name}" for name in SERIES]
        alerts = browser.find_element(By.ID, "alerts").text
        assert "hemorrhage" in alerts and "OPEN" in alerts and "ops" in alerts  # the pneumothorax, acknowledged
        shot = tmp_path / "dashboard.png"
        shot.write_bytes(whole_page_png(browser))
        (REPO / "test-artifacts").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "test-artifacts" / "dashboard.png")  # CI keeps test-artifacts/
        log_out()

        # a reader of SITE_A: SITE_A's open studies and alerts only, no plots
        log_in(TOKENS["reader"])
        wait.until(lambda _: accessions() == ["ACC-DASH-1", "ACC-DASH-2"])
        wait.until(lambda _: "hemorrhage" in browser.find_element(By.ID, "alerts").text)
        assert "pneumothorax" not in browser.find_element(By.ID, "alerts").text
        assert not browser.find_element(By.ID, "plots-panel").is_displayed()
        log_out()

        # an analyst: the plots, and not one patient or study
        log_in(TOKENS["analyst"])
        wait.until(lambda _: len(rendered_plots()) == len(SERIES))
        assert not browser.find_element(By.ID, "worklist-panel").is_displayed()
        assert not browser.find_element(By.ID, "alerts-panel").is_displayed()
        page = browser.execute_script("return document.documentElement.outerHTML")
        assert not any(name in page for name in PATIENTS + [sent.accession_number for sent in STUDIES])
        assert not any(sent.study_uid in page for sent in STUDIES)

        console = browser.get_log("browser")
    # the page loads and runs clean: only the bad token's 401 may show up in the console
    problems = [entry["message"] for entry in console if entry["level"] == "SEVERE" and " 401 " not in entry["message"]]
    assert not problems, problems

    audit = [event for event in network.publisher.of(AUDIT) if isinstance(event, AuditEvent)]
    viewed = {(event.actor, event.study_uid) for event in audit
              if event.action == "ai-output-viewed" and event.detail.get("view") == "dashboard"}
    flagged = {sent.study_uid for sent in STUDIES if sent.ai_finding and sent.signed_after is None}
    assert {uid for actor, uid in viewed if actor == "ops"} == flagged
    assert {uid for actor, uid in viewed if actor == "dr-neuro"} == {STUDIES[0].study_uid}
    assert not any(event.actor == "qa-analyst" and event.study_uid for event in audit)
    assert any(event.action == "unauthenticated" and event.detail["path"] == "/api/v1/dashboard" for event in audit)
