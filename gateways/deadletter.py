"""The one dead-letter path of every gateway (DICOM C-STORE, STOW-RS, HL7 MLLP).

A refused instance, request or message is published as a ``DeadLetter`` on the
dead-letter topic with the stage that refused it, the reason key, the error people
read, its key and trace id, and the refused bytes as they were received: inline up to
:data:`INLINE_PAYLOAD_MAX`, else written to the claim-check blob store under the
gateway's ``rejected/`` key (the same bytes get the same key) and referenced by URI; a
refusal whose instance was already stored points at that blob instead. The broker is
the dead-letter channel too, so a refusal because it is unreachable
(:data:`BROKER_UNAVAILABLE`) is only logged by the gateway, and a dead letter that cannot
be published is logged: refusing never fails the sender's answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateways.publisher import EventPublisher
from schemas.blobs import BlobStore, sha256_hex

log = logging.getLogger("radstream.gateways.deadletter")

#: Refused bytes up to this size ride inline in the dead letter; larger ones go to the blob store.
INLINE_PAYLOAD_MAX = 64 * 1024
#: The reason of a refusal because the broker did not acknowledge: never dead-lettered.
BROKER_UNAVAILABLE = "broker_unavailable"


class DeadLetters:
    """The dead-letter channel of one gateway ``stage``.

    ``store`` keeps refused bytes too large to inline; it may be a function that opens
    the store the first time one is needed (the HL7 gateway stores nothing else).
    ``rejected_key_of`` names the blob key of refused bytes, e.g.
    :func:`schemas.blobs.rejected_key` (``rejected/{sha256}.dcm``).
    """

    def __init__(self, stage: str, publisher: EventPublisher, store: BlobStore | Callable[[], BlobStore],
                 rejected_key_of: Callable[[bytes], str]) -> None:
        self.stage = stage
        self.publisher = publisher
        self.rejected_key_of = rejected_key_of
        self._open_store: Callable[[], BlobStore] = (lambda: store) if isinstance(store, BlobStore) else store
        self._store: BlobStore | None = None

    def send(self, reason: str, error: str, *, key: str | None = None, trace_id: str | None = None,
             refused: bytes = b"", payload_uri: str | None = None,
             rejected_key_of: Callable[[bytes], str] | None = None) -> None:
        """Publish the refusal of ``refused`` (or of what ``payload_uri`` already holds). Never raises.

        ``rejected_key_of`` overrides the channel's key scheme for these bytes (a
        STOW-RS request refused as a whole is kept as ``rejected/stow/{sha256}.bin``).
        """
        if reason == BROKER_UNAVAILABLE:
            return
        payload = None
        if payload_uri is None and refused:
            if len(refused) <= INLINE_PAYLOAD_MAX:
                payload = refused
            else:
                payload_uri = self._keep(refused, rejected_key_of or self.rejected_key_of)
        try:
            self.publisher.dead_letter(self.stage, reason, error, key=key, trace_id=trace_id,
                                       payload=payload, payload_uri=payload_uri)
        except Exception as exc:
            log.error("dead letter not published (stage=%s reason=%s error=%s payload_uri=%s): %s",
                      self.stage, reason, error, payload_uri, exc)

    def _keep(self, refused: bytes, key_of: Callable[[bytes], str]) -> str | None:
        """The claim-check URI of refused bytes written to the blob store, None if they cannot be."""
        try:
            if self._store is None:
                self._store = self._open_store()
            return self._store.put(key_of(refused), refused).uri
        except Exception as exc:
            log.error("cannot keep the bytes refused by %s (%d bytes, sha256 %s): %s", self.stage, len(refused),
                      sha256_hex(refused), exc)
            return None
