"""The JSON webhook of a result revision, signed with HMAC-SHA256 over timestamp + body, with an
idempotency key per revision and destination."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any


from schemas.events import ResultStatus, StudyResult
from adapters.result_documents.common import RESULT_NAMESPACE, check_result, is_rejected


WEBHOOK_EVENTS = {ResultStatus.PRELIMINARY: "study.result.preliminary", ResultStatus.FINAL: "study.result.final",
                  ResultStatus.CORRECTED: "study.result.corrected"}


def webhook_payload(result: StudyResult) -> dict[str, Any]:
    """The revision as a JSON event. Identifiers only, no name or birth date: a webhook receiver
    matches by study UID, accession number or patient id and fetches more if entitled."""
    check_result(result)
    return {
        "id": str(uuid.uuid5(RESULT_NAMESPACE, f"{result.trace_id}:{result.revision}")),
        "type": WEBHOOK_EVENTS[result.status],
        "trace_id": result.trace_id,
        "study_uid": result.study_uid,
        "accession_number": result.accession_number,
        "patient_id": result.patient_id,
        "source_site": result.source_site,
        "version": result.version,
        "revision": result.revision,
        "replaces": result.replaces,
        "status": result.status.value,
        "issued_at": result.issued_at.isoformat(),
        "urgent": result.critical,
        "priority": result.priority.value,
        "findings": [{
            "label": f.label,
            "codes": [{"scheme": c.scheme, "value": c.value, "meaning": c.meaning} for c in f.codes],
            "confidence": f.confidence,
            "critical": f.critical,
            "model": f.model,
            "model_version": f.model_version,
            "decision": f.decision,
            "modified_to": f.modified_to,
            "location": f.location,
            "present": not is_rejected(f),
        } for f in result.findings],
        "report_text": result.report_text,
        "changes": list(result.changes),
        "reader_id": result.reader_id,
        "signed_at": result.signed_at.isoformat() if result.signed_at else None,
    }


def _signature(secret: bytes, body: bytes, timestamp: int) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign_webhook(secret: bytes, body: bytes, timestamp: int) -> str:
    """Signature header value ``t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>`` (Stripe's scheme):
    the timestamp is signed too, so a captured request cannot be replayed later with a new one."""
    return f"t={timestamp},v1={_signature(secret, body, timestamp)}"


def verify_webhook(secret: bytes, body: bytes, header: str, *, now: int, tolerance_s: int = 300) -> bool:
    """True when one ``v1`` of ``header`` signs ``body`` at its ``t`` and ``t`` is within
    ``tolerance_s`` of ``now``. Compared in constant time; several ``v1`` allow secret rotation."""
    timestamp: int | None = None
    signatures = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures or abs(now - timestamp) > tolerance_s:
        return False
    expected = _signature(secret, body, timestamp)
    return any(hmac.compare_digest(expected, signature) for signature in signatures)


def idempotency_key(trace_id: str, revision: int, destination: str) -> str:
    """The same key for every attempt of one revision to one destination (UUID form, RFC 4122 v5)."""
    return str(uuid.uuid5(RESULT_NAMESPACE, f"{trace_id}:{revision}:{destination}"))
