"""Result documents: one study result revision as each receiving system reads it.

Pure builders (no I/O) from :class:`schemas.events.StudyResult`, the identified zone's
result with the ORIGINAL UIDs and real demographics: a DICOM SR Measurement Report
(PS3.16 TID 1500) for PACS, an HL7 v2.5 ORU^R01 for the RIS, a FHIR R4 transaction
Bundle with a DiagnosticReport for EHRs, and a signed JSON webhook. Every builder is
deterministic in the result: a resend of the same revision is the same SR SOP instance,
the same FHIR conditional update and the same webhook idempotency key, so receivers
deduplicate it. A reader's REJECT is told the same way everywhere: the SR states the
finding as absent instead of listing it, HL7 sends its OBX with status ``D``, FHIR marks
its Observation ``entered-in-error``.

One module per receiving system (``sr``, ``oru``, ``fhir``, ``webhook``) over what they share
(``common``); this package's namespace is the API.
"""

from __future__ import annotations

from adapters.result_documents.common import RESULT_NAMESPACE, derived_uid, finding_code
from adapters.result_documents.fhir import FHIR_STATUS, build_fhir, validate_fhir
from adapters.result_documents.oru import build_oru, hl7_escape
from adapters.result_documents.sr import SrUids, build_sr, sr_uids
from adapters.result_documents.webhook import (
    WEBHOOK_EVENTS, idempotency_key, sign_webhook, verify_webhook, webhook_payload,
)

__all__ = [
    "FHIR_STATUS", "RESULT_NAMESPACE", "WEBHOOK_EVENTS", "SrUids", "build_fhir", "build_oru", "build_sr",
    "derived_uid", "finding_code", "hl7_escape", "idempotency_key", "sign_webhook", "sr_uids", "validate_fhir",
    "verify_webhook", "webhook_payload",
]
