"""A RIS that is not ours: the ``hl7`` package's asyncio MLLP server, as a peer for benchmarks and tests.

It runs its own event loop in a daemon thread of the calling process, parses every message
framed by MLLP (HL7 v2.5 Appendix C.4) with ``hl7`` and answers what ``answer`` makes of it:
by default an ``AA`` ACK (``Message.create_ack``: MSA-2 echoes the message's MSH-10), or
``AE``/``AR`` or nothing when a test wants a failing receiver.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import hl7
import hl7.mllp


def accept(message: hl7.Message) -> hl7.Message:
    """An ACK with MSA-1 ``AA``: the receiver took the message."""
    return message.create_ack("AA")


@dataclass
class MllpPeer:
    """An asyncio MLLP server of the ``hl7`` package in its own thread; ``answer`` makes the ACK
    for each parsed message (None: never answer). ``received`` keeps every parsed message."""

    answer: Callable[[hl7.Message], hl7.Message | None] = accept
    received: list[hl7.Message] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hl7-mllp-peer", daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        return await hl7.mllp.start_hl7_server(self._client, self.host, self.port, encoding="utf-8",
                                               limit=1024 * 1024)

    async def _client(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.received.append(message)
                ack = self.answer(message)
                if ack is not None:
                    writer.writemessage(ack)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def __enter__(self) -> MllpPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
