"""``radstream read ...`` (a reader's client of the reading API) and ``radstream users token``.

``read`` speaks to the reading API (:mod:`gateways.reading_api`) with the bearer token of
``--token`` or ``RADSTREAM_READING_TOKEN``; actions wait up to ``--wait`` seconds for the
worklist to apply them. Exit codes: 0 done, 1 the API could not be reached or failed,
2 refused (401, 403, 404, 409) or bad arguments, 3 still on its way after ``--wait``.
"""

from __future__ import annotations

import json
import secrets
import ssl
import sys
import urllib.error
import urllib.request
from urllib.parse import quote, urlencode

import click

from gateways.reading_access import ROLES, token_sha256


def api_url(settings) -> str:
    scheme = "https" if settings.reading.tls_cert and settings.reading.tls_key else "http"
    host = "127.0.0.1" if settings.bind_host in ("0.0.0.0", "::") else settings.bind_host
    return f"{scheme}://{host}:{settings.reading.port}/api/v1"


def call(url: str, token: str, method: str = "GET", body: dict | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    """One API request: (status, the JSON answer); OSError when the API cannot be reached."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except ValueError:
            return error.code, {"error": "http", "detail": error.reason}


def register(cli: click.Group, config_option, settings_of) -> None:
    @cli.group()
    def users() -> None:
        """Reading API users (reading.users_file)."""

    @users.command("token")
    @click.option("--id", "uid", required=True, help="the user's id (a reader: their roster id)")
    @click.option("--role", type=click.Choice(ROLES), required=True)
    @click.option("--sites", default="", help="comma-separated source sites, or * for every site")
    def token(uid: str, role: str, sites: str) -> None:
        """Make a bearer token; print it (give it to the user) and the [[user]] entry for the users file."""
        new = secrets.token_urlsafe(32)
        listed = ", ".join(json.dumps(s.strip()) for s in sites.split(",") if s.strip())
        click.echo(f"token (give it to {uid}; it is not stored anywhere): {new}", err=True)
        click.echo(f'[[user]]\nid = "{uid}"\nrole = "{role}"\nsites = [{listed}]\n'
                   f'token_sha256 = "{token_sha256(new)}"')

    @cli.group()
    @config_option
    @click.option("--token", envvar="RADSTREAM_READING_TOKEN", required=True,
                  help="bearer token [env RADSTREAM_READING_TOKEN]")
    @click.option("--url", help="the reading API [default: from the settings]")
    @click.option("--wait", default=10.0, show_default=True, help="seconds an action waits for the worklist")
    @click.pass_context
    def read(ctx: click.Context, token: str, url: str | None, wait: float) -> None:
        """Read studies through the reading API: worklist, AI output, claim, open, decide, sign; critical alerts."""
        ctx.obj = {"token": token, "url": url or api_url(settings_of(ctx)), "wait": wait}

    def run(ctx: click.Context, path: str, method: str = "GET", body: dict | None = None, **query) -> None:
        obj = ctx.obj
        if method == "POST" and obj["wait"] > 0:
            query["wait"] = obj["wait"]
        url = obj["url"] + path + (f"?{urlencode(query)}" if query else "")
        try:
            status, answer = call(url, obj["token"], method, body)
        except OSError as exc:
            click.echo(f"error: cannot reach the reading API at {obj['url']}: {exc}", err=True)
            sys.exit(1)
        click.echo(json.dumps(answer, indent=2))
        if status >= 500:
            sys.exit(1)
        if status >= 400:
            sys.exit(2)
        if status == 202:
            sys.exit(3)

    study = click.argument("uid")

    @read.command("worklist")
    @click.option("--reader", help="another reader's list (admins)")
    @click.pass_context
    def worklist(ctx: click.Context, reader: str | None) -> None:
        """My worklist: open studies, priority then SLA deadline."""
        run(ctx, "/worklist", **({"reader": reader} if reader else {}))

    @read.command("study")
    @study
    @click.pass_context
    def show(ctx: click.Context, uid: str) -> None:
        """The study's worklist row (the AI output and the draft report: read ai)."""
        run(ctx, f"/studies/{quote(uid)}")

    @read.command("ai")
    @study
    @click.pass_context
    def ai(ctx: click.Context, uid: str) -> None:
        """The study's AI output, the decisions taken on it and the draft report to edit and sign (audited)."""
        run(ctx, f"/studies/{quote(uid)}/ai")

    for name, summary in (("claim", "Take the study and start reading it."), ("open", "Record that it was opened."),
                          ("release", "Put it back, unread.")):
        def action(ctx: click.Context, uid: str, _name: str = name) -> None:
            run(ctx, f"/studies/{quote(uid)}/{_name}", "POST", {})

        action.__doc__ = summary
        read.command(name)(study(click.pass_context(action)))

    @read.command("decide")
    @study
    @click.argument("label")
    @click.argument("decision", type=click.Choice(["accept", "reject", "modify"]))
    @click.option("--to", "modified_to", help="modify: what you report instead")
    @click.option("--comment")
    @click.pass_context
    def decide(ctx: click.Context, uid: str, label: str, decision: str, modified_to: str | None,
               comment: str | None) -> None:
        """Accept, reject or modify one AI finding."""
        body = {"decision": decision, **({"modified_to": modified_to} if modified_to else {}),
                **({"comment": comment} if comment else {})}
        run(ctx, f"/studies/{quote(uid)}/findings/{quote(label)}", "POST", body)

    @read.command("sign")
    @study
    @click.option("--report", "report", help="the report text")
    @click.option("--report-file", type=click.File(), help="the report text, from a file")
    @click.pass_context
    def sign(ctx: click.Context, uid: str, report: str | None, report_file) -> None:
        """Sign the study (ends the read)."""
        text = report_file.read() if report_file is not None else report
        run(ctx, f"/studies/{quote(uid)}/sign", "POST", {"report": text} if text else {})

    @read.command("alerts")
    @click.option("--all", "every", is_flag=True, help="acknowledged ones too")
    @click.option("--limit", type=click.IntRange(1, 10_000), default=500, show_default=True)
    @click.pass_context
    def alerts(ctx: click.Context, every: bool, limit: int) -> None:
        """Critical alerts no one has acknowledged, most overdue first, with their deadline and escalation level."""
        run(ctx, "/alerts", open="false" if every else "true", limit=limit)

    @read.command("ack")
    @study
    @click.option("--finding", required=True, help="the alert's finding (its AI label)")
    @click.option("--note", help="what was done: who was called, what was said")
    @click.pass_context
    def ack(ctx: click.Context, uid: str, finding: str, note: str | None) -> None:
        """Acknowledge the study's critical alert for a finding: its escalation stops."""
        run(ctx, f"/studies/{quote(uid)}/alerts/ack", "POST", {"finding": finding, **({"note": note} if note else {})})
