"""How every gateway process runs: ``python -m gateways.<module>``, one way.

A gateway module describes its process as a :class:`GatewayProcess` (its names, its
ports, what it checks before starting and how it listens) and, run as ``__main__``,
exits with the status of :func:`run`: settings, logging and free ports
(:func:`adapters.process.start_component`), the gateway's own checks (an unreadable
TLS or token file: one ``error:`` line, exit 2, like a bad setting), the metrics
endpoint, one acknowledged :class:`EventPublisher`, then the listener until SIGTERM or
SIGINT. On the way out the listener stops (running requests finish and are answered)
before the publisher delivers what is still queued.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from adapters.process import start_component
from adapters.telemetry import serve_metrics
from gateways.publisher import EventPublisher
from schemas.settings import Settings, SettingsError

#: Starts a gateway's listener on entry (and logs where it listens), stops it on exit.
Listening = Callable[[Settings, EventPublisher], AbstractAsyncContextManager[object]]


def _nothing_to_check(_settings: Settings) -> None:
    return None


@dataclass(frozen=True)
class GatewayProcess:
    """One gateway process: what :func:`run` needs to know about it."""

    component: str  # the process's name in its log lines, e.g. "dicom-gateway"
    title: str  # the gateway in words, e.g. "DICOM gateway"
    stage: str  # its publisher's client id suffix, e.g. "dicom-scp"
    port: Callable[[Settings], int]
    metrics_port: Callable[[Settings], int]
    listening: Listening
    log: logging.Logger
    #: Settles what the settings name before anything starts; raises SettingsError to exit 2.
    prepare: Callable[[Settings], None] = _nothing_to_check


def server_tls_context(cert: Path | None, key: Path | None, group: str) -> ssl.SSLContext | None:
    """An HTTP gateway's TLS context from ``<group>.tls_cert`` and ``<group>.tls_key``; None
    (plain HTTP) when neither is set; SettingsError when one is missing or cannot be loaded."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        variables = f"RADSTREAM_{group.upper()}_TLS_CERT/_KEY"
        raise SettingsError(f"{group}.tls_cert and {group}.tls_key must be set together ({variables})")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"{group}.tls_cert/{group}.tls_key cannot be loaded: {exc}") from None
    return context


def run(process: GatewayProcess) -> int:
    """The process's exit status: 0 after SIGTERM or SIGINT, 2 on bad settings, files or a taken port."""
    settings = start_component(process.component, lambda s: [
        (process.port(s), f"the {process.title}"), (process.metrics_port(s), f"the {process.title}'s metrics")])
    try:
        process.prepare(settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(process, settings)


def serve(process: GatewayProcess, settings: Settings) -> int:
    """Run the gateway until SIGTERM or SIGINT; flush the publisher on the way out."""
    publisher = EventPublisher(settings, client_id=f"{settings.kafka.client_id}-{process.stage}")
    serve_metrics(process.metrics_port(settings), settings.bind_host)
    try:
        asyncio.run(_until_signalled(process.log, process.listening(settings, publisher)))
    finally:
        publisher.close()
    process.log.info("%s stopped", process.title)
    return 0


async def _until_signalled(log: logging.Logger, listening: AbstractAsyncContextManager[object]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("received %s, shutting down", signal.Signals(s).name),
                                                    stop.set()))
    async with listening:
        await stop.wait()
