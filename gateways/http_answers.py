"""The JSON answers of the reading API and its dashboard: a body, or a refusal with its reason.

An HTTP error is raised as a :class:`Refusal` (status, short code, what people read, the audit
action if the refusal is audited) and turned into its answer, ``{"error": code, "detail": text}``,
by the app's middleware (:class:`gateways.reading_api.ReadingApi`); query parameters that are
out of range are refused here, naming the parameter and its range.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any

from aiohttp import web


class Refusal(Exception):
    """An HTTP error answer: status, a short code, what people read, and the audit action if any."""

    def __init__(self, status: int, code: str, error: str, *, audit: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.code, self.error, self.audit, self.headers = status, code, error, audit, headers or {}


def _json(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def answer(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, default=_json), content_type="application/json")


def query_number(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    """Query parameter ``name`` as a number in [low, high]; ``default`` when absent; else 400."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise Refusal(400, "bad_request", f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise Refusal(400, "bad_request", f"{name} must be between {low:g} and {high:g}")
    return value


__all__ = ["Refusal", "answer", "query_number"]
