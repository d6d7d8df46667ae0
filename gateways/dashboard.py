"""The web dashboard: the live worklist, critical alerts and the network's plots, on the reading API.

Served by the reading API's app (same port, users file and roles; :class:`Dashboard` adds its
routes). ``GET /dashboard`` is a static page with no patient data in it: it asks for the user's
bearer token, keeps it in the tab's ``sessionStorage`` and sends it as ``Authorization: Bearer``
on every fetch (no cookie: nothing for a cross-site request to ride on). The page draws what
the JSON endpoints below answer with plotly.js, served from the ``plotly`` package (no
internet needed). Each role sees what :data:`gateways.reading_access.POLICY` lets it see:

=========  ===============================================================================
reader     the open studies of their sites with their AI flags, the alerts of those sites
admin      every site's studies and alerts, and the plots
analyst    the plots only: aggregates per hour, never a study or a patient
=========  ===============================================================================

=====  ===================================================  ==========================================
GET    ``/dashboard``                                       the page (``plotly.min.js``, its JS and CSS)
GET    ``/api/v1/dashboard``                                who the token is, the panels they may see
GET    ``/api/v1/dashboard/worklist[?limit=N]``             open studies, priority then SLA deadline
GET    ``/api/v1/dashboard/series/{name}[?hours=N]``        a plot's Plotly figure (:mod:`gateways.dashboard_series`)
GET    ``/api/v1/alerts?open=false``                        the reading API's alerts, acknowledged or not
=====  ===================================================  ==========================================

A study's AI flags are AI output: listed only where the user may view the study's AI output
(``ai.view`` at its site), and each study whose flags are listed is audited as an
``ai-output-viewed`` access (``view=dashboard``), like the API's own AI endpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from gateways.dashboard_series import MAX_HOURS, SERIES, window
from gateways.http_answers import Refusal, answer, query_number
from gateways.reading_access import User
from schemas.events import parse_finding_text, utcnow

#: the page's own files (package data, ``gateways/dashboard_static/``)
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
REFRESH_S = 30
DEFAULT_HOURS = 24
#: what the worklist panel never shows: the row's internal identifiers
_NOT_SHOWN = ("trace_id",)
#: AI output: shown only with ``ai.view`` at the study's site, and audited
_AI_OUTPUT = ("ai_findings", "ai_reason")
#: the page is ours alone: scripts and data from this origin only; plotly.js sets inline styles
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Audit(Protocol):
    def __call__(self, request: web.Request, action: str, *, actor: str, trace_id: str | None = None,
                 study_uid: str | None = None, **detail: str) -> Awaitable[None]: ...


Query = Callable[..., Awaitable[list[dict[str, Any]]]]


def _static(name: str) -> bytes:
    return resources.files("gateways").joinpath("dashboard_static", name).read_bytes()


def _plotly_js() -> Path:
    """plotly.js as the ``plotly`` package ships it (``plotly.offline.get_plotlyjs()`` reads the same file)."""
    path = Path(str(resources.files("plotly").joinpath("package_data", "plotly.min.js")))
    if not path.is_file():
        raise FileNotFoundError(f"the plotly package has no {path}: reinstall it (pip install plotly)")
    return path


def study_sites(user: User) -> list[str]:
    """The sites whose studies ``user`` may see (``*``: every site); none for an analyst."""
    return sorted(site for site in user.sites if user.may("study.view", site))


def panels(user: User) -> dict[str, bool]:
    """What the page shows ``user``: the worklist, the critical alerts, the plots."""
    return {"worklist": bool(study_sites(user)), "alerts": user.may("alerts"), "plots": user.may("network")}


def shown_study(user: User, row: dict[str, Any]) -> dict[str, Any]:
    """A worklist row as the panel shows it to ``user``: AI flags parsed, where they may see them."""
    study = {key: value for key, value in row.items() if key not in _NOT_SHOWN and key not in _AI_OUTPUT}
    if user.may("ai.view", row.get("source_site")):
        study["ai_flags"] = [parsed for parsed in map(parse_finding_text, row.get("ai_findings") or [])
                             if parsed is not None]
        study["ai_reason"] = row.get("ai_reason")
    return study


class Dashboard:
    """The dashboard's page and JSON, over the reading API's authentication, warehouse reads and audit."""

    def __init__(self, authenticate: Callable[[web.Request], User], query: Query, audit: Audit,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.authenticate, self.query, self.audit, self.clock = authenticate, query, audit, clock
        self.plotly_js = _plotly_js()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/dashboard", self.page)
        app.router.add_get("/dashboard/", self.to_page)
        app.router.add_get("/dashboard/plotly.min.js", self.plotly)
        app.router.add_get(r"/dashboard/{asset:dashboard\.(?:js|css)}", self.asset)
        app.router.add_get("/api/v1/dashboard", self.me)
        app.router.add_get("/api/v1/dashboard/worklist", self.worklist)
        app.router.add_get("/api/v1/dashboard/series/{name}", self.series)

    # ------------------------------------------------------------ the page

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=_static("index.html"), content_type="text/html", charset="utf-8",
                            headers=_PAGE_HEADERS)

    async def to_page(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")  # the page's paths are absolute; one address for it

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["asset"]
        return web.Response(body=_static(name), content_type=ASSETS[name], charset="utf-8", headers=_PAGE_HEADERS)

    async def plotly(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.plotly_js, headers={"Content-Type": "text/javascript; charset=utf-8",
                                                         "Cache-Control": "public, max-age=86400",
                                                         "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------ JSON

    async def me(self, request: web.Request) -> web.Response:
        user = self.authenticate(request)
        return _private({"id": user.id, "role": user.role, "name": user.name, "sites": sorted(user.sites),
                         "panels": panels(user), "series": list(SERIES), "refresh_s": REFRESH_S,
                         "hours": DEFAULT_HOURS})

    async def worklist(self, request: web.Request) -> web.Response:
        user = self.authenticate(request)
        sites = study_sites(user)
        if not sites:
            raise Refusal(403, "forbidden", f"{user.role} {user.id} may not see studies", audit="access-denied")
        limit = int(query_number(request, "limit", 200, 1, 2000))
        rows = await self.query("dashboard_worklist", sites=sites, limit=limit)
        listed = [(row, shown_study(user, row)) for row in rows if user.may("study.view", row.get("source_site"))]
        await asyncio.gather(*(self.audit(request, "ai-output-viewed", actor=user.id, trace_id=row["trace_id"],
                                          study_uid=row["study_uid"], role=user.role, version=str(row["version"]),
                                          view="dashboard",
                                          findings=",".join(flag["label"] for flag in study.get("ai_flags", [])))
                               for row, study in listed if study.get("ai_flags") or study.get("ai_reason")))
        studies = [study for _, study in listed]
        return _private({"studies": studies, "sites": sites, "at": self.clock()})

    async def series(self, request: web.Request) -> web.Response:
        user = self.authenticate(request)
        if not user.may("network"):
            raise Refusal(403, "forbidden", f"{user.role} {user.id} may not see the network's plots",
                          audit="access-denied")
        name = request.match_info["name"]
        series = SERIES.get(name)
        if series is None:
            raise Refusal(404, "unknown_series", f"no plot {name!r}; one of {', '.join(SERIES)}")
        span = window(self.clock(), int(query_number(request, "hours", DEFAULT_HOURS, 1, MAX_HOURS)))
        rows = await self.query(series.query, **series.parameters(span))
        return _private({"name": name, "since": span.since, "until": span.until,
                         "figure": series.figure(rows, span).to_plotly_json()})


def _private(data: Any) -> web.Response:
    response = answer(data)
    response.headers["Cache-Control"] = "no-store"
    return response


__all__ = ["Dashboard", "panels", "shown_study", "study_sites"]
