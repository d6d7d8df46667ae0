"""The embedded warehouse: ClickHouse's HTTP interface served over an in-process chDB engine.

Over 400 lines: the engine and its HTTP handler share the request's life (statement, body, settings, errors).

chDB runs the ClickHouse engine inside one process and allows only one process per data
directory, while every radstream process talks to the warehouse with clickhouse-connect, over
HTTP, exactly as it would to a real ClickHouse server. This module is that single owner of
``DATA_DIR/warehouse``: it speaks enough of the ClickHouse HTTP interface
(https://clickhouse.com/docs/interfaces/http) for clickhouse-connect to work unchanged —
queries and commands with ``param_NAME`` query parameters and settings as URL arguments, the
``database`` argument, ``INSERT … FORMAT Native`` bodies sent chunked and compressed
(lz4/zstd/gzip/deflate), basic authentication, ``/ping``, and errors as ``Code: NN.
DB::Exception: …`` with the ``X-ClickHouse-Exception-Code`` header (that vocabulary is
:mod:`radstream.clickhouse_http`). In production
``warehouse.url`` points at a real ClickHouse server and this module is not started.

Run it with ``python -m radstream.warehouse_server`` (settings from ``RADSTREAM_*``).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hmac
import io
import json
import logging
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

from chdb import session as chdb_session

from radstream.clickhouse_http import (
    AUTHENTICATION_FAILED,
    Request,
    Result,
    UNKNOWN_EXCEPTION,
    UNKNOWN_SETTING,
    WarehouseError,
    READ_CHUNK,
    RESULT_STATEMENT,
    SETTING_NAME,
    SPOOL_IN_MEMORY,
    TRAILING_FORMAT,
    TRANSPORT_ARGS,
    parse_chunk_size,
    content_type_of,
    form_fields,
    quote_literal,
    quote_identifier,
    decompressed,
    split_statement,
)
from radstream.procs import PortInUseError
from schemas.settings import Settings, SettingsError, load_settings

log = logging.getLogger("radstream.warehouse_server")  # not __name__: it is "__main__" under -m

class Warehouse:
    """The one chDB session of this process; every statement runs under its lock.

    A chDB session is stateful (current database, SET settings), whereas each HTTP request
    must run in its own database with only its own settings; so before each statement the
    session is switched to the request's database and its settings are brought to exactly the
    request's (applying only the difference to what the previous request left).
    """

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        holder = _holder_of(path)
        if holder is not None:
            raise WarehouseInUseError(f"the embedded warehouse cannot open {path}: another process ({holder}) "
                                      "holds it, and chDB allows one process per data directory")
        try:
            self._session = chdb_session.Session(str(path))
        except Exception as exc:
            raise WarehouseInUseError(f"the embedded warehouse cannot open {path}: {exc}") from None
        self._lock = threading.Lock()
        self._applied: dict[str, str] = {}
        self._ignored_settings: set[str] = set()
        identity = self._session.query("SELECT version(), timezone()", "TabSeparated").bytes()
        self.version, self.timezone = identity.decode().split()
        # chDB starts with some settings changed from ClickHouse's defaults; a request's setting
        # is reset to these, not to DEFAULT, once the request is over.
        rows = self._session.query("SELECT name, value FROM system.settings WHERE changed", "JSONEachRow").bytes()
        self._startup_settings = {row["name"]: row["value"] for row in map(json.loads, rows.splitlines())}

    def execute(self, request: Request) -> Result:
        """Run a statement; its output is in ``request.default_format`` unless it has a FORMAT clause."""
        with self._lock:
            self._prepare(request)
            try:
                result = self._session.query(request.sql, request.default_format, params=dict(request.params) or None)
            except Exception as exc:
                raise WarehouseError.from_engine(exc) from None
            output = result.bytes()
            return Result(output, _summary(result.rows_read(), result.bytes_read(), result.rows_written(),
                                           result.bytes_written(), result.elapsed(), len(output)))

    def insert(self, request: Request) -> Result:
        """Stream ``request.data`` into ``INSERT …`` through chDB's streaming inserter."""
        assert request.insert_format is not None and request.data is not None
        with self._lock:
            self._prepare(request)
            try:
                with self._session.send_insert(request.sql, request.insert_format) as inserter:
                    if request.first_data:
                        inserter.append(request.first_data)
                    while chunk := request.data.read(READ_CHUNK):
                        inserter.append(chunk)
                    result = inserter.finish()
            except Exception as exc:
                raise WarehouseError.from_engine(exc) from None
            return Result(b"", _summary(0, 0, result.rows_written, result.bytes_written, result.elapsed, 0))

    def close(self) -> None:
        with self._lock:  # lets a statement in flight finish first
            self._session.close()

    def _prepare(self, request: Request) -> None:
        try:
            self._session.query(f"USE {quote_identifier(request.database)}", "TabSeparated")
        except Exception as exc:
            raise WarehouseError.from_engine(exc) from None
        wanted = {k: v for k, v in request.settings.items() if k not in self._ignored_settings}
        for name in [n for n in self._applied if n not in wanted]:
            startup = self._startup_settings.get(name)
            self._set(name, "DEFAULT" if startup is None else quote_literal(startup))
            del self._applied[name]
        for name, value in wanted.items():
            if self._applied.get(name) == value:
                continue
            if not SETTING_NAME.match(name):
                raise WarehouseError.of(UNKNOWN_SETTING, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
            try:
                self._set(name, quote_literal(value))
            except WarehouseError as err:
                if err.code != UNKNOWN_SETTING:
                    raise
                # A setting of the real server (HTTP handler, Cloud) that the embedded engine
                # lacks: it cannot matter to the engine, so it is dropped rather than refused.
                log.warning("ignoring setting %r: the embedded engine does not know it", name)
                self._ignored_settings.add(name)
                continue
            self._applied[name] = value

    def _set(self, name: str, literal: str) -> None:
        try:
            self._session.query(f"SET {name} = {literal}", "TabSeparated")
        except Exception as exc:
            raise WarehouseError.from_engine(exc) from None


class WarehouseInUseError(RuntimeError):
    """The warehouse data directory is held by another process."""


def _holder_of(path: Path) -> str | None:
    """The ``PID: N`` of the engine holding ``path``, or None when it is free.

    ClickHouse keeps an exclusive ``flock`` on ``<path>/status`` while it runs; probing it
    here gives a clear message instead of chDB's "Error initializing EmbeddedServer".
    """
    try:
        status = open(path / "status", "rb")
    except FileNotFoundError:
        return None
    with status:
        try:
            fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            first_line = status.readline().decode(errors="replace").strip()
            return first_line or "unknown PID"
        fcntl.flock(status, fcntl.LOCK_UN)
    return None


def _summary(read_rows: int, read_bytes: int, written_rows: int, written_bytes: int,
             elapsed_s: float, result_bytes: int) -> dict[str, str]:
    # The real server sends every X-ClickHouse-Summary value as a string.
    return {"read_rows": str(read_rows), "read_bytes": str(read_bytes), "written_rows": str(written_rows),
            "written_bytes": str(written_bytes), "total_rows_to_read": str(read_rows),
            "result_bytes": str(result_bytes), "elapsed_ns": str(int(elapsed_s * 1e9))}


class _Handler(BaseHTTPRequestHandler):
    """One HTTP connection; keep-alive, as clickhouse-connect pools connections."""

    protocol_version = "HTTP/1.1"
    server_version = "radstream-warehouse"
    timeout = 30  # idle keep-alive seconds, ClickHouse's keep_alive_timeout
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: _HttpServer
    _body_state = "unread"  # "reading", "done": whether the body can still be drained

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path in ("/", "/ping") and not url.query:
            self._reply(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})  # the health check
        else:
            self.do_POST()

    def do_POST(self) -> None:  # noqa: N802
        self._body_state = "unread"
        url = urlsplit(self.path)
        if url.path != "/":
            self._discard_body()
            self._reply(404, f"There is no handle {url.path}\n".encode(), {"Content-Type": "text/plain; charset=UTF-8"})
            return
        query_id = ""
        try:
            args = dict(parse_qsl(url.query, keep_blank_values=True))
            query_id = args.get("query_id") or str(uuid.uuid4())
            self._authenticate(args)
            self._serve_statement(args, query_id)
        except WarehouseError as err:
            log.info("query %s failed: Code: %d. %s", query_id, err.code, err.text)
            self._discard_body()
            self._reply(err.http_status, err.body(self.server.warehouse.version), {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": str(err.code),
                "X-ClickHouse-Query-Id": query_id,
            })
        except (ConnectionError, TimeoutError) as exc:
            log.info("query %s: client connection lost: %s", query_id, exc)
            self.close_connection = True
        except Exception:  # a bug here: still answer the way ClickHouse would, then drop the connection
            log.exception("query %s: internal error", query_id)
            self.close_connection = True
            err = WarehouseError.of(UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", "Internal error of the embedded warehouse")
            self._reply(500, err.body(self.server.warehouse.version), {
                "Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(err.code)})

    def _serve_statement(self, args: dict[str, str], query_id: str) -> None:
        warehouse = self.server.warehouse
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as body:
            # The whole body is read before the engine lock is taken: a slow client never
            # stalls the others.
            for chunk in decompressed(self._raw_body(), self.headers.get("Content-Encoding", "")):
                body.write(chunk)
            body.seek(0)
            request = self._request(args, body)
            result = warehouse.insert(request) if request.insert_format else warehouse.execute(request)
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": warehouse.timezone,
            "X-ClickHouse-Summary": json.dumps(result.summary, separators=(",", ":")),
        }
        if request.insert_format is None and RESULT_STATEMENT.match(request.sql):
            trailing = TRAILING_FORMAT.search(request.sql)
            result_format = trailing.group(1) if trailing else request.default_format
            headers["X-ClickHouse-Format"] = result_format
            headers["Content-Type"] = content_type_of(result_format)
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        self._reply(200, result.output, headers)

    def _request(self, args: dict[str, str], body: IO[bytes]) -> Request:
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            # clickhouse-connect posts a form when bound parameters are too long for the URL.
            args = {**args, **form_fields(content_type, body.read())}
            body = io.BytesIO()
        sql, insert_format, first_data = split_statement(args.get("query", ""), body)
        return Request(
            sql=sql,
            database=args.get("database") or "default",
            settings={k: v for k, v in args.items() if not k.startswith("param_") and k not in TRANSPORT_ARGS},
            params={k.removeprefix("param_"): v for k, v in args.items() if k.startswith("param_")},
            default_format=args.get("default_format") or "TabSeparated",
            insert_format=insert_format,
            first_data=first_data,
            data=body if insert_format else None,
        )

    def _authenticate(self, args: dict[str, str]) -> None:
        """Basic auth, X-ClickHouse-User/Key headers or user/password arguments; none means ``default``."""
        user = self.headers.get("X-ClickHouse-User") or args.get("user")
        password = self.headers.get("X-ClickHouse-Key") or args.get("password") or ""
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
        user = user or "default"
        expected_user, expected_password = self.server.credentials
        if not (hmac.compare_digest(user.encode(), expected_user.encode())
                and hmac.compare_digest(password.encode(), expected_password.encode())):
            raise WarehouseError.of(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED", f"{user}: Authentication failed: "
                                    "password is incorrect, or there is no user with such name")

    def _raw_body(self) -> Iterator[bytes]:
        """The request body as sent: Content-Length or chunked (RFC 9112 section 7.1)."""
        self._body_state = "reading"
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := parse_chunk_size(self.rfile.readline(65537)):
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise ConnectionError("the client closed the connection inside a chunk")
                self.rfile.readline(65537)  # the CRLF after the chunk
                yield chunk
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, READ_CHUNK))
                if not chunk:
                    raise ConnectionError("the client closed the connection inside the body")
                remaining -= len(chunk)
                yield chunk
        self._body_state = "done"

    def _discard_body(self) -> None:
        """After an error, drain the body so the connection can serve the next request."""
        if self._body_state == "unread":
            try:
                for _ in self._raw_body():
                    pass
                return
            except (OSError, WarehouseError):
                pass
        if self._body_state != "done":  # stopped mid-body: the stream position is lost
            self.close_connection = True

    def _reply(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("X-ClickHouse-Server-Display-Name", self.server.display_name)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Keep-Alive", f"timeout={self.timeout}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up shutdown
    warehouse: Warehouse  # set once the engine is open

    def __init__(self, address: tuple[str, int], credentials: tuple[str, str]) -> None:
        self.credentials = credentials
        self.display_name = socket.gethostname()
        super().__init__(address, _Handler)


class WarehouseServer:
    """The endpoint: bind, open the engine, serve; ``start()`` serves from a background thread.

    chDB is one engine per process and one process per data directory: tests run this as a
    subprocess (``python -m radstream.warehouse_server``) rather than in-process.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_path = (settings.data_dir / "warehouse").resolve()
        host, port = settings.bind_host, settings.warehouse.embedded_port
        credentials = (settings.warehouse.username, settings.warehouse.password.get_secret_value())
        # Bind first: a taken port fails fast, before the engine is opened.
        try:
            self._http = _HttpServer((host, port), credentials)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(f"the embedded warehouse cannot listen on {host}:{port}: "
                                     "the port is already in use") from None
            raise
        try:
            self.warehouse = self._http.warehouse = Warehouse(self.data_path)
            self._create_database(settings.warehouse.database)
        except BaseException:
            self._http.server_close()
            raise
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve on the calling thread until :meth:`shutdown`."""
        log.info("embedded warehouse (ClickHouse %s via chDB) serving %s for database %r, data in %s",
                 self.warehouse.version, self.url, self.settings.warehouse.database, self.data_path)
        self._http.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Make :meth:`serve_forever` return; call it from another thread than the serving one."""
        self._http.shutdown()

    def close(self) -> None:
        """Release the port, let a statement in flight finish, close the engine."""
        self._http.server_close()
        self.warehouse.close()
        log.info("embedded warehouse stopped")

    def start(self) -> WarehouseServer:
        self._thread = threading.Thread(target=self.serve_forever, name="warehouse-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        if self._thread is not None:
            self._thread.join()
        self.close()

    def _create_database(self, database: str) -> None:
        # Clients connect with ``database=settings.warehouse.database``; it must exist before the
        # first DDL is applied, as it would on a provisioned server.
        self.warehouse.execute(Request(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}"))


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then close the engine."""
    server = WarehouseServer(settings)
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("received %s, stopping", signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server.serve_forever()
    finally:
        server.close()


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    from adapters.telemetry import configure_logging

    configure_logging(settings, "warehouse")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        serve(settings)
    except (PortInUseError, WarehouseInUseError) as exc:
        print(f"radstream warehouse: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
