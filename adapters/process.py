"""Start-up of every radstream process: settings, logging and port checks, one way.

Each entry point (gateways, worker, warehouse) begins with :func:`start_component`: a
bad setting or a port already taken ends the process with one clear line and exit
code 2, never a traceback, so the supervisor can show it verbatim.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable

from schemas.settings import Settings, SettingsError, load_settings
from adapters.telemetry import configure_logging


class PortInUseError(RuntimeError):
    """A port radstream must listen on is already taken."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def require_free(host: str, port: int, what: str) -> None:
    """Raise :class:`PortInUseError` naming ``what`` if ``host:port`` is taken (0: not used)."""
    if port and not port_is_free(host, port):
        raise PortInUseError(f"{what} cannot listen on {host}:{port}: the port is already in use")


def start_component(component: str, ports: Iterable[tuple[int, str]] = ()) -> Settings:
    """Settings from ``RADSTREAM_*``, logging configured, every ``(port, what)`` checked free.

    Exits with status 2 and a one-line message on any failure.
    """
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings, component)
    try:
        for port, what in ports(settings) if callable(ports) else ports:
            require_free(settings.bind_host, port, what)
    except PortInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings
