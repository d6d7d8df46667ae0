"""HL7 gateway: an MLLP listener that turns ORM^O01 orders and ADT updates into events.

Sites' RIS send orders (accession number, priority such as STAT, reason for exam,
ordering provider, patient location) and patient updates over HL7 v2 with the Minimal
Lower Layer Protocol (HL7 v2.5 Appendix C.4: ``<VT 0x0B> message <FS 0x1C><CR 0x0D>``).
For every frame the handler checks the framing, then reads the message
(:mod:`gateways.hl7_message`: MSH, the text decoded by MSH-18, parsed with the ``hl7``
package), publishes one ``OrderReceived`` per ORC/OBR order group (keyed by accession
number, on ``order.received``) or the ``PatientUpdated`` of an ADT message (keyed by
patient id, on ``patient.updated``) and waits for the broker's ack: only then does the
sender get an ACK with MSA-1 ``AA``. Every refusal answers in the original
acknowledgment mode of HL7 v2.5 section 2.9.2 with an ERR segment (ERR-3 from HL7
table 0357):

* ``AR`` (application reject) for what the message header or transport makes
  unprocessable: bad MLLP framing (framing bytes inside the content included), several
  messages in one block, no MSH, an unsupported message type, event, version
  or processing id (2.9.2.2), and the broker being unreachable (0357 code 207: the
  sender should retry; nothing was published);
* ``AE`` (application error) for content errors: a required segment or field missing,
  text not valid in the declared character set, an invalid value (a DT/DTM that is no
  calendar instant, an ID not in its table), a second OBR in one ORC order group.

Each refused message is published as a ``DeadLetter`` with its reason and the raw frame
bytes (:mod:`gateways.deadletter`: inline up to 64 KiB, else in the blob store under
``rejected/hl7/{sha256}.hl7``); when the broker itself is down the refusal is only
logged. The listener never dies of bad input: each frame is answered and the
connection resynchronises on the next ``FS CR``.

Run it with ``python -m gateways.hl7_mllp`` (settings from ``RADSTREAM_*``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from adapters.blobs import open_blob_store
from adapters.telemetry import get_logger
from gateways.deadletter import BROKER_UNAVAILABLE, DeadLetters
from gateways.hl7_message import Ack, ErrorCode, Received, Rejected, build_ack, events_of
from gateways.publisher import EventPublisher, PublishError
from gateways.serving import GatewayProcess, run
from schemas.blobs import BlobStore
from schemas.events import OrderReceived, PatientUpdated, Record
from schemas.settings import Settings
from schemas.topics import ORDER_RECEIVED, PATIENT_UPDATED, TopicSpec

log = logging.getLogger("radstream.gateways.hl7_mllp")
slog = get_logger("radstream.gateways.hl7_mllp")

STAGE = "hl7-mllp"
START_BLOCK = b"\x0b"  # VT
END_BLOCK = b"\x1c\x0d"  # FS CR
#: Of an oversized frame, at most this much is kept for the dead letter.
_KEEP_OVERSIZED = 16 * 1024 * 1024
#: Where each kind of event goes: orders by accession number, patient updates by patient id.
TOPICS: dict[type[Record], TopicSpec] = {OrderReceived: ORDER_RECEIVED, PatientUpdated: PATIENT_UPDATED}

MESSAGES = Counter("radstream_hl7_messages", "HL7 messages answered by the MLLP gateway, by MSA-1 and reason",
                   ["ack", "reason"])
HANDLE_SECONDS = Histogram(
    "radstream_hl7_handle_seconds", "HL7 message handling time: parse, publish, broker ack",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONNECTIONS = Counter("radstream_hl7_connections", "MLLP connections, by outcome", ["outcome"])


# ---------------------------------------------------------------- framing (HL7 v2.5 Appendix C.4)


@dataclass(frozen=True)
class Frame:
    """One MLLP block as received: ``raw`` are the bytes on the wire, framing included."""

    raw: bytes
    error: str | None = None  # a framing fault; the frame is then refused with AR
    last: bool = False  # the peer closed its side: answer, then close


async def read_frame(reader: asyncio.StreamReader, max_bytes: int, idle_timeout_s: float) -> Frame | None:
    """The next frame, ``None`` at a clean end of stream.

    Bytes are read up to the next ``FS CR``; a block that does not begin with ``VT``, one
    with a framing byte (``VT`` or ``FS``) inside its content, a block cut short by the end of the stream and a block larger than ``max_bytes`` are
    returned with ``error`` set, so the caller answers AR and the stream resynchronises
    on the end block.
    """
    try:
        raw = await asyncio.wait_for(reader.readuntil(END_BLOCK), idle_timeout_s)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        return Frame(exc.partial, "connection closed inside an MLLP block (no FS CR end block)", last=True)
    except asyncio.LimitOverrunError:
        return await _drain_oversized(reader, max_bytes, idle_timeout_s)
    if len(raw) - 3 > max_bytes:
        return Frame(raw, f"MLLP block of {len(raw) - 3} bytes exceeds the {max_bytes}-byte limit")
    if not raw.startswith(START_BLOCK):
        where = raw.find(START_BLOCK)
        what = "no VT (0x0B) start block" if where < 0 else f"{where} bytes before the VT (0x0B) start block"
        return Frame(raw, f"bad MLLP framing: {what}")
    if START_BLOCK in raw[1:]:
        return Frame(raw, "bad MLLP framing: a VT (0x0B) start block inside the message")
    if END_BLOCK[:1] in raw[1:-2]:
        # C.4.2: FS is the end-block character and never content; a bare FS inside a field
        # (not followed by CR) would otherwise reach a patient name.
        where = raw.index(END_BLOCK[:1], 1)
        return Frame(raw, f"bad MLLP framing: an FS (0x1C) end-block byte inside the message at byte {where}")
    return Frame(raw)


async def _drain_oversized(reader: asyncio.StreamReader, max_bytes: int, idle_timeout_s: float) -> Frame:
    """Read and discard up to the end block of a block too large for the buffer."""
    kept = bytearray()
    total = 0
    while True:
        try:
            chunk = await asyncio.wait_for(reader.readuntil(END_BLOCK), idle_timeout_s)
            done = True
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.readexactly(max(1, exc.consumed))
            done = False
        except asyncio.IncompleteReadError as exc:
            chunk, done = exc.partial, True
        total += len(chunk)
        if len(kept) < _KEEP_OVERSIZED:
            kept += chunk[: _KEEP_OVERSIZED - len(kept)]
        if done:
            last = not kept.endswith(END_BLOCK)
            return Frame(bytes(kept), f"MLLP block of {total} bytes exceeds the {max_bytes}-byte limit", last=last)


def mllp_wrap(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


# ---------------------------------------------------------------- the handler


class Hl7Handler:
    """Answers one frame at a time: parse, publish, acknowledge. Thread-safe; never raises.

    ``store_factory`` opens the blob store that keeps refused frames too large to ride
    in their dead letter; it is called the first time one is refused (default: the
    configured store).
    """

    def __init__(self, settings: Settings, publisher: EventPublisher,
                 store_factory: Callable[[], BlobStore] | None = None) -> None:
        self.settings = settings
        self.publisher = publisher
        self.dead_letters = DeadLetters(STAGE, publisher, store_factory or (lambda: open_blob_store(settings)),
                                        rejected_hl7_key)

    def handle(self, frame: Frame) -> bytes:
        """The ACK message (without MLLP framing) for ``frame``."""
        started = time.perf_counter()
        received = Received()
        try:
            if frame.error:
                raise Rejected(Ack.REJECT, ErrorCode.SEGMENT_SEQUENCE, "bad_framing", frame.error)
            events = events_of(frame.raw[1:-2], self.settings, received)
            try:
                for event in events:
                    self.publisher.publish(TOPICS[type(event)], event)
            except PublishError as exc:
                # The sender keeps the message and retries (AR, 0357 code 207); the broker is
                # the dead-letter channel too, so this refusal is only logged.
                raise Rejected(Ack.REJECT, ErrorCode.INTERNAL_ERROR, BROKER_UNAVAILABLE,
                               f"broker unavailable, retry later: {exc}") from None
            answer = build_ack(received.header, Ack.ACCEPT)
            outcome = (Ack.ACCEPT, "accepted")
            slog.info("accepted HL7 message", message_type=received.header.message_type,
                      control_id=received.header.control_id, accession_number=received.accession_number,
                      events=len(events), source_site=events[0].source_site if events else None)
        except Rejected as rejection:
            answer, outcome = self._refuse(frame, received, rejection), (rejection.ack, rejection.reason)
        except Exception as exc:  # a bug of ours: answer AR, dead-letter, keep serving
            log.exception("HL7 message %s failed", received.header.control_id or "-")
            rejection = Rejected(Ack.REJECT, ErrorCode.INTERNAL_ERROR, "internal_error", f"{type(exc).__name__}: {exc}")
            answer, outcome = self._refuse(frame, received, rejection), (rejection.ack, rejection.reason)
        MESSAGES.labels(ack=outcome[0].value, reason=outcome[1]).inc()
        HANDLE_SECONDS.observe(time.perf_counter() - started)
        return answer

    def _refuse(self, frame: Frame, received: Received, rejection: Rejected) -> bytes:
        (slog.error if rejection.reason == BROKER_UNAVAILABLE else slog.warning)(
            "refused HL7 message", ack=rejection.ack.value, reason=rejection.reason, error=rejection.error,
            control_id=received.header.control_id or None, message_type=received.header.message_type or None,
            bytes=len(frame.raw))
        self.dead_letters.send(rejection.reason, rejection.error, refused=frame.raw,
                               key=received.accession_number or received.header.control_id or None)
        return build_ack(received.header, rejection.ack, rejection.error, rejection.code, rejection.location)


def rejected_hl7_key(raw: bytes) -> str:
    """Blob key of a refused HL7 frame: ``rejected/hl7/{sha256}.hl7`` (same bytes, same key)."""
    return f"rejected/hl7/{hashlib.sha256(raw).hexdigest()}.hl7"


# ---------------------------------------------------------------- the listener


async def serve_connection(handler: Hl7Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One MLLP connection: frames are answered in order, one at a time (HL7 v2.5 C.4.3)."""
    peer = writer.get_extra_info("peername")
    settings = handler.settings
    loop = asyncio.get_running_loop()
    CONNECTIONS.labels(outcome="opened").inc()
    log.info("MLLP connection from %s", peer)
    try:
        while True:
            try:
                frame = await read_frame(reader, settings.hl7.max_message_bytes, settings.hl7.idle_timeout_s)
            except TimeoutError:
                CONNECTIONS.labels(outcome="idle_timeout").inc()
                break
            if frame is None:
                break
            answer = await loop.run_in_executor(None, handler.handle, frame)
            writer.write(mllp_wrap(answer))
            await writer.drain()
            if frame.last:
                break
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        CONNECTIONS.labels(outcome="reset").inc()
        log.info("MLLP connection from %s lost: %s", peer, exc)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def start_listener(settings: Settings, handler: Hl7Handler, port: int | None = None) -> asyncio.Server:
    """Listen on ``settings.bind_host:settings.hl7.port`` (or ``port``)."""
    return await asyncio.start_server(
        lambda r, w: serve_connection(handler, r, w), settings.bind_host,
        settings.hl7.port if port is None else port,
        limit=settings.hl7.max_message_bytes + len(START_BLOCK) + len(END_BLOCK) + 1,
    )


@asynccontextmanager
async def _listening(settings: Settings, publisher: EventPublisher) -> AsyncIterator[None]:
    server = await start_listener(settings, Hl7Handler(settings, publisher))
    log.info("HL7 MLLP gateway listening on %s:%d (types %s, broker %s, metrics port %s)", settings.bind_host,
             settings.hl7.port, settings.hl7.message_types, settings.kafka_bootstrap,
             settings.metrics.hl7_gateway_port or "off")
    async with server:
        yield
        server.close()
        await server.wait_closed()


#: ``python -m gateways.hl7_mllp``: the MLLP listener and its metrics.
PROCESS = GatewayProcess(
    component="hl7-gateway", title="HL7 MLLP gateway", stage=STAGE, port=lambda s: s.hl7.port,
    metrics_port=lambda s: s.metrics.hl7_gateway_port, listening=_listening, log=log)


if __name__ == "__main__":
    sys.exit(run(PROCESS))
