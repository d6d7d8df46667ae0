"""The reading API: readers claim, open, decide AI findings and sign; admins and analysts look on.

About 420 lines: every route with its role check and its one answer per outcome, so a reader's
rights can be read in one place (access rules live in :mod:`gateways.reading_access`).

JSON over HTTP (HTTPS with ``reading.tls_cert``/``tls_key``), ``Authorization: Bearer``
tokens of the users file (:mod:`gateways.reading_access`: roles reader / admin / analyst,
sites). Reads come from the warehouse (the rows the worklist stage publishes); every
action is a :class:`ReaderFeedback` published, acknowledged, on ``reading.feedback``,
where the worklist stage applies it (UNREAD -> IN_PROGRESS -> SIGNED) or refuses it
(audited with the reason). The stage is the authority, so an action is answered 202
with its ``feedback_id``; ``?wait=S`` (up to 30 s) waits for the outcome: 200 applied,
409 refused and why, 202 still on its way.

=====  =======================================  ===============================================
GET    ``/api/v1/me``                           who the token is
GET    ``/api/v1/worklist[?reader=ID]``         a reader's open studies, priority then deadline
GET    ``/api/v1/unassigned``                   open studies on no reader's list (admin)
GET    ``/api/v1/network``                      open studies per subspecialty and priority
GET    ``/api/v1/studies/{uid}``                the study's row, without its AI output
GET    ``/api/v1/studies/{uid}/ai``             its AI output and the reader's decisions (audited)
POST   ``/api/v1/studies/{uid}/claim|open|release|sign``   ``sign`` takes ``{"report": text}``
POST   ``/api/v1/studies/{uid}/findings/{label}``   ``{"decision": accept|reject|modify, ...}``
GET    ``/api/v1/alerts[?open=true|false]``     critical alerts: unacknowledged (default) or all (audited)
POST   ``/api/v1/studies/{uid}/alerts/ack``     ``{"finding": label, "note": text}``: acknowledge its alert
GET    ``/dashboard``, ``/api/v1/dashboard/...``   the web dashboard and its JSON (:mod:`gateways.dashboard`)
=====  =======================================  ===============================================

Every access to a study's AI output is an :class:`AuditEvent` with the study's trace_id
(who, what, when), and so is every refusal: 401 (no or unknown token), 403 (the role or
the study's site does not allow it). A request body that is not the JSON object an
action takes gets 400 and a dead letter with the reason.

A critical finding's alert escalates until someone acknowledges it (:mod:`streams.alerts`): readers
of the study's site and admins acknowledge it by finding; the :class:`AlertAck` is published,
acknowledged, on ``alert.ack`` and audited, and answered 200 (the alerts stage cannot refuse it: an
escalation already on its way is the only thing it may not stop).

The answers' shapes are in :mod:`gateways.http_answers`, the dashboard's routes in
:mod:`gateways.dashboard`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from aiohttp import hdrs, web

from adapters.blobs import open_blob_store
from adapters.warehouse import WarehouseError, query_rows
from gateways.dashboard import Dashboard
from gateways.deadletter import DeadLetters
from gateways.http_answers import Refusal, answer, query_number
from gateways.publisher import EventPublisher, PublishError
from gateways.reading_access import PER_SITE, User, Users, load_users
from gateways.serving import GatewayProcess, run, server_tls_context
from schemas.blobs import sha256_hex
from schemas.events import AlertAck, AuditEvent, ReaderFeedback, ReadingAction, parse_finding_text, utcnow
from schemas.settings import Settings
from schemas.topics import ALERT_ACK, AUDIT, READING_FEEDBACK

log = logging.getLogger("radstream.gateways.reading")
STAGE = "reading-api"
MAX_WAIT_S = 30.0
#: what the worklist listings leave out: AI output is read per study, where each access is audited
#: AI output, shown only by the audited AI endpoint: the draft report words the AI findings too
_NOT_LISTED = ("ai_findings", "ai_reason", "reader_decisions", "report_text")
_DECISIONS = {"accept": ReadingAction.ACCEPT, "reject": ReadingAction.REJECT, "modify": ReadingAction.MODIFY}
_ACTIONS = {"claim": ReadingAction.CLAIM, "open": ReadingAction.OPEN, "release": ReadingAction.RELEASE,
            "sign": ReadingAction.SIGN}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ReadingApi:
    """The API's handlers over a publisher (feedback, audit) and the warehouse (reads)."""

    def __init__(self, settings: Settings, publisher: EventPublisher, users: Users | None = None) -> None:
        self.settings, self.publisher = settings, publisher
        self.users = load_users(settings.reading.users_file) if users is None else users
        self.dead_letters = DeadLetters(STAGE, publisher, lambda: open_blob_store(settings),
                                        lambda raw: f"rejected/reading/{sha256_hex(raw)}.json")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.settings.reading.max_body_bytes)
        app.router.add_get("/api/v1/me", self.me)
        app.router.add_get("/api/v1/worklist", self.worklist)
        app.router.add_get("/api/v1/unassigned", self.unassigned)
        app.router.add_get("/api/v1/network", self.network)
        app.router.add_get("/api/v1/studies/{uid}", self.study)
        app.router.add_get("/api/v1/studies/{uid}/ai", self.ai_output)
        app.router.add_post("/api/v1/studies/{uid}/findings/{label}", self.decide)
        app.router.add_post("/api/v1/studies/{uid}/{action:claim|open|release|sign}", self.act)
        app.router.add_get("/api/v1/alerts", self.alerts)
        app.router.add_post("/api/v1/studies/{uid}/alerts/ack", self.acknowledge)
        Dashboard(self._user, self._query, self._audit).add_routes(app)  # GET /dashboard and its JSON
        return app

    # ------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args, **kwargs))

    async def _query(self, name: str, **parameters: Any) -> list[dict[str, Any]]:
        try:
            return await self._run(query_rows, self.settings, name, **parameters)
        except WarehouseError as exc:
            raise Refusal(503, "warehouse_unavailable", str(exc), headers={"Retry-After": "5"}) from None

    async def _publish(self, spec, event) -> None:
        try:
            await self._run(self.publisher.publish, spec, event)
        except PublishError as exc:
            raise Refusal(503, "broker_unavailable", str(exc), headers={"Retry-After": "5"}) from None

    async def _audit(self, request: web.Request, action: str, *, actor: str, trace_id: str | None = None,
                     study_uid: str | None = None, **detail: str) -> None:
        """One audit event; a request without a study gets its own trace id."""
        event = AuditEvent(trace_id=trace_id or f"request-{uuid.uuid4()}", actor=actor, action=action, stage=STAGE,
                           at=utcnow(), study_uid=study_uid,
                           detail={"method": request.method, "path": request.path,
                                   "remote": request.remote or "", **detail})
        try:
            await self._run(self.publisher.publish, AUDIT, event)
        except PublishError as exc:  # the answer stands; the lost audit event is logged loudly
            log.error("audit event not published (%s %s by %s): %s", action, request.path, actor, exc)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refusal as refusal:
            if refusal.audit is not None:
                user = request.get("user")
                study = request.get("study") or {}
                await self._audit(request, refusal.audit, actor=user.id if user else "anonymous",
                                  trace_id=study.get("trace_id"), study_uid=request.match_info.get("uid"),
                                  status=str(refusal.status), reason=refusal.error)
            log.info("%s %s -> %d %s", request.method, request.path, refusal.status, refusal.error)
            return web.Response(status=refusal.status, headers=refusal.headers, content_type="application/json",
                                text=json.dumps({"error": refusal.code, "detail": refusal.error}))

    def _user(self, request: web.Request) -> User:
        """RFC 6750: ``Authorization: Bearer <token>`` of a user in the users file, else 401 (audited)."""
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="radstream-reading"'}
        if scheme.lower() != "bearer" or not token.strip():
            raise Refusal(401, "no_token", "no bearer token (Authorization: Bearer ...)", audit="unauthenticated",
                          headers=challenge)
        user = self.users.authenticate(token.strip())
        if user is None:
            raise Refusal(401, "bad_token", "the bearer token is not valid", audit="unauthenticated",
                          headers={"WWW-Authenticate": 'Bearer realm="radstream-reading", error="invalid_token"'})
        request["user"] = user
        return user

    @staticmethod
    def _require(user: User, permission: str, site: str | None = None, audit: str = "access-denied") -> None:
        if not user.may(permission, site):
            where = f" at site {site}" if site is not None and permission in PER_SITE else ""
            raise Refusal(403, "forbidden", f"{user.role} {user.id} may not {permission}{where}", audit=audit)

    async def _study(self, request: web.Request) -> dict[str, Any]:
        uid = request.match_info["uid"]
        rows = await self._query("study_row", study_uid=uid)
        if not rows:
            raise Refusal(404, "unknown_study", f"no study {uid} on the worklist")
        request["study"] = rows[0]
        return rows[0]

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            body, error = None, f"the body is not JSON: {exc}"
        else:
            error = None if isinstance(body, dict) else "the body must be a JSON object"
        if error is not None:
            self.dead_letters.send("bad_request", f"{request.method} {request.path}: {error}",
                                   key=request.match_info.get("uid"), refused=raw)
            raise Refusal(400, "bad_request", error)
        return body

    # ------------------------------------------------------------ reads

    async def me(self, request: web.Request) -> web.Response:
        user = self._user(request)
        return answer({"id": user.id, "role": user.role, "sites": sorted(user.sites), "name": user.name})

    def _visible(self, user: User, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k not in _NOT_LISTED} for row in rows
                if user.may("study.view", row.get("source_site"))]

    async def worklist(self, request: web.Request) -> web.Response:
        user = self._user(request)
        reader = request.query.get("reader", user.id)
        self._require(user, "worklist.own" if reader == user.id else "worklist.any")
        rows = await self._query("reader_worklist", reader=reader, limit=_limit(request))
        return answer({"reader": reader, "studies": self._visible(user, rows)})

    async def unassigned(self, request: web.Request) -> web.Response:
        user = self._user(request)
        self._require(user, "worklist.unassigned")
        rows = await self._query("unassigned_studies", limit=_limit(request))
        return answer({"studies": self._visible(user, rows)})

    async def network(self, request: web.Request) -> web.Response:
        user = self._user(request)
        self._require(user, "network")
        return answer({"subspecialties": await self._query("network_by_subspecialty")})

    async def study(self, request: web.Request) -> web.Response:
        user = self._user(request)
        row = await self._study(request)
        self._require(user, "study.view", row["source_site"])
        return answer({k: v for k, v in row.items() if k not in _NOT_LISTED})

    async def ai_output(self, request: web.Request) -> web.Response:
        user = self._user(request)
        row = await self._study(request)
        self._require(user, "ai.view", row["source_site"], audit="ai-output-denied")
        decisions = dict(line.split(": ", 1) for line in row.get("reader_decisions") or [] if ": " in line)
        findings = [{**parsed, "decision": decisions.get(parsed["label"])}
                    for parsed in map(parse_finding_text, row.get("ai_findings") or []) if parsed is not None]
        await self._audit(request, "ai-output-viewed", actor=user.id, trace_id=row["trace_id"],
                          study_uid=row["study_uid"], role=user.role, version=str(row["version"]),
                          findings=",".join(f["label"] for f in findings))
        return answer({"study_uid": row["study_uid"], "version": row["version"], "trace_id": row["trace_id"],
                       "ai_status": row["ai_status"], "ai_reason": row.get("ai_reason"), "findings": findings,
                       "priority": row["priority"], "reasons": row["reasons"],
                       # the latest result: the draft preliminary report to edit and sign, or what was signed
                       "report_text": row.get("report_text"), "result_status": row.get("result_status"),
                       "result_revision": row.get("result_revision")})

    # ------------------------------------------------------------ actions

    async def act(self, request: web.Request) -> web.Response:
        action = _ACTIONS[request.match_info["action"]]
        body = await self._body(request)
        report = body.get("report")
        if action is ReadingAction.SIGN and report is not None and not isinstance(report, str):
            raise Refusal(400, "bad_request", "report must be text")
        return await self._feedback(request, action, report_text=report, comment=_text(body, "comment"))

    async def decide(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        decision = _DECISIONS.get(str(body.get("decision", "")).lower())
        if decision is None:
            raise Refusal(400, "bad_request", 'decision must be "accept", "reject" or "modify"')
        modified_to = _text(body, "modified_to")
        if decision is ReadingAction.MODIFY and not modified_to:
            raise Refusal(400, "bad_request", "a modify decision needs modified_to: what the reader reports instead")
        return await self._feedback(request, decision, finding=request.match_info["label"], modified_to=modified_to,
                                    comment=_text(body, "comment"))

    async def _feedback(self, request: web.Request, action: ReadingAction, **fields: Any) -> web.Response:
        user = self._user(request)
        row = await self._study(request)
        self._require(user, "study.read", row["source_site"])
        if row["status"] == "SIGNED":
            raise Refusal(409, "signed", f"study {row['study_uid']} is signed already")
        if action.decides_finding:
            seen = {f["label"]: f for f in map(parse_finding_text, row.get("ai_findings") or []) if f}
            finding = seen.get(fields["finding"])
            if finding is None:
                raise Refusal(409, "unknown_finding", f"no AI finding {fields['finding']!r} on version "
                                                      f"{row['version']} (findings: {', '.join(seen) or 'none'})")
            fields.update(model=f"{finding['model']} {finding['model_version']}", score=finding["score"])
        feedback = ReaderFeedback(feedback_id=str(uuid.uuid4()), trace_id=row["trace_id"], study_uid=row["study_uid"],
                                  version=row["version"], reader_id=user.id, action=action, at=utcnow(),
                                  source_site=row["source_site"], **fields)
        await self._publish(READING_FEEDBACK, feedback)
        log.info("%s %s %s (feedback %s)", user.id, action.value, row["study_uid"], feedback.feedback_id)
        body = {"feedback_id": feedback.feedback_id, "action": action.value, "study_uid": row["study_uid"],
                "outcome": "queued"}
        wait = _wait(request)
        if wait > 0:
            outcome = await self._outcome(row["study_uid"], feedback.feedback_id, wait)
            if outcome is not None:
                state, reason = outcome
                if state == "refused":
                    return answer({**body, "outcome": "refused", "reason": reason}, status=409)
                return answer({**body, "outcome": "applied"})
        return answer(body, status=202)

    # ------------------------------------------------------------ critical alerts

    async def alerts(self, request: web.Request) -> web.Response:
        """Critical alerts of the studies whose AI output the user may view, most overdue first:
        unacknowledged ones (``open=true``, the default) or every one. An alert names an AI finding,
        so each study listed is audited as an access to its AI output."""
        user = self._user(request)
        self._require(user, "alerts")
        open_only = _flag(request, "open", True)
        rows = await self._query("alerts", open_only=int(open_only), study_uid="", limit=_limit(request))
        visible = [row for row in rows if user.may("ai.view", row.get("source_site"))]
        studies = {row["study_uid"]: row["trace_id"] for row in visible}
        await asyncio.gather(*(self._audit(request, "alerts-viewed", actor=user.id, trace_id=trace_id,
                                           study_uid=study_uid, role=user.role,
                                           findings=",".join(r["finding"] for r in visible
                                                             if r["study_uid"] == study_uid))
                               for study_uid, trace_id in studies.items()))
        return answer({"open": open_only, "alerts": visible})

    async def acknowledge(self, request: web.Request) -> web.Response:
        """Acknowledge the study's critical alert for ``finding`` (any version): its escalation stops."""
        user = self._user(request)
        body = await self._body(request)
        finding, note = _text(body, "finding"), _text(body, "note")
        if not finding:
            raise Refusal(400, "bad_request", 'an acknowledgement names the alert\'s finding: {"finding": "<label>"}')
        row = await self._study(request)
        self._require(user, "alert.ack", row["source_site"], audit="alert-ack-denied")
        alerts = await self._query("alerts", open_only=0, study_uid=row["study_uid"], limit=1000)
        alert = next((a for a in alerts if a["finding"] == finding), None)
        if alert is None:
            raise Refusal(409, "unknown_alert", f"no critical alert for finding {finding!r} on study "
                                                f"{row['study_uid']} (alerts: "
                                                f"{', '.join(a['finding'] for a in alerts) or 'none'})")
        answered = {"study_uid": row["study_uid"], "finding": finding, "version": alert["version"],
                    "escalation_level": alert["escalation_level"], "ack_deadline": alert["ack_deadline"]}
        if alert["acknowledged_at"] is not None:
            return answer({**answered, "outcome": "acknowledged-already", "acknowledged_by": alert["acknowledged_by"],
                           "acknowledged_at": alert["acknowledged_at"]})
        ack = AlertAck(trace_id=alert["trace_id"], study_uid=row["study_uid"], version=alert["version"],
                       finding=finding, actor=user.id, at=utcnow(), note=note)
        await self._publish(ALERT_ACK, ack)
        await self._audit(request, "alert-ack", actor=user.id, trace_id=ack.trace_id, study_uid=ack.study_uid,
                          role=user.role, finding=finding, version=str(ack.version),
                          escalation_level=str(alert["escalation_level"]))
        log.info("%s acknowledged the %s alert of %s (level %s)", user.id, finding, ack.study_uid,
                 alert["escalation_level"])
        return answer({**answered, "outcome": "acknowledged", "acknowledged_by": user.id, "acknowledged_at": ack.at})

    async def _outcome(self, study_uid: str, feedback_id: str, wait: float) -> tuple[str, str] | None:
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            rows = await self._query("feedback_outcome", study_uid=study_uid, feedback_id=feedback_id)
            if rows:
                return rows[0]["outcome"], rows[0]["reason"]
            if asyncio.get_running_loop().time() >= deadline:
                return None
            await asyncio.sleep(0.2)


def _flag(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = {"true": True, "1": True, "false": False, "0": False}.get(raw.lower())
    if value is None:
        raise Refusal(400, "bad_request", f"{name} must be true or false, got {raw!r}")
    return value


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise Refusal(400, "bad_request", f"{key} must be text")
    return value or None


def _limit(request: web.Request) -> int:
    return int(query_number(request, "limit", 500, 1, 10_000))


def _wait(request: web.Request) -> float:
    return query_number(request, "wait", 0, 0, MAX_WAIT_S)


async def start_server(settings: Settings, api: ReadingApi, port: int | None = None) -> web.AppRunner:
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.bind_host, settings.reading.port if port is None else port,
                       ssl_context=server_tls_context(settings.reading.tls_cert, settings.reading.tls_key, "reading"),
                       reuse_address=True)
    await site.start()
    return runner


@asynccontextmanager
async def _listening(settings: Settings, publisher: EventPublisher) -> AsyncIterator[None]:
    api = ReadingApi(settings, publisher)
    runner = await start_server(settings, api)
    scheme = "https" if settings.reading.tls_cert else "http"
    log.info("reading API listening on %s://%s:%d/api/v1 (%d users, metrics port %s)", scheme, settings.bind_host,
             settings.reading.port, len(api.users), settings.metrics.reading_port or "off")
    if not len(api.users):
        log.warning("no reading API users (reading.users_file): every request gets 401")
    try:
        yield
    finally:
        await runner.cleanup()


def _prepare(settings: Settings) -> None:
    server_tls_context(settings.reading.tls_cert, settings.reading.tls_key, "reading")  # unreadable: exit 2
    load_users(settings.reading.users_file)


#: ``python -m gateways.reading_api``: the API, its metrics, its TLS and users files checked first.
PROCESS = GatewayProcess(
    component="reading-api", title="reading API", stage=STAGE, port=lambda s: s.reading.port,
    metrics_port=lambda s: s.metrics.reading_port, listening=_listening, log=log, prepare=_prepare)


if __name__ == "__main__":
    sys.exit(run(PROCESS))
