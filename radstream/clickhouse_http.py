"""The ClickHouse HTTP interface's vocabulary, as the embedded warehouse speaks it.

Error codes and their ``Code: NN. DB::Exception: …`` form, the request and result of one
statement, how the statement and its insert data share the body, request-body
decompression (lz4, zstd, gzip, deflate), chunked bodies and form fields, and the
content types of result formats (https://clickhouse.com/docs/interfaces/http). The
engine and the server that use them are :mod:`radstream.warehouse_server`.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any


# URL arguments of the HTTP interface that steer the transport, not the query engine; a real
# server consumes them itself, so they are never applied as settings here.
TRANSPORT_ARGS = frozenset({
    "query", "database", "default_format", "user", "password", "quota_key", "query_id",
    "session_id", "session_timeout", "session_check", "close_session", "compress", "decompress",
    "buffer_size", "wait_end_of_query", "client_protocol_version", "role", "stacktrace",
    "enable_http_compression", "http_zlib_compression_level", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close",
    "http_native_compression_disable_checksumming_on_decompress", "http_response_buffer_size",
})

# ClickHouse error codes (src/Common/ErrorCodes.cpp) this module raises itself.
UNKNOWN_SETTING = 115
NOT_IMPLEMENTED = 48
UNKNOWN_COMPRESSION_METHOD = 89
CANNOT_DECOMPRESS = 271
CANNOT_PARSE_INPUT = 27
AUTHENTICATION_FAILED = 516
UNKNOWN_EXCEPTION = 1002

# The HTTP status the real server answers for an error code (HTTPHandler.cpp,
# exceptionCodeToHTTPStatus); everything else is 500. None of these is one clickhouse-connect
# retries (429/503/504), so a failed statement is never silently re-run.
_HTTP_STATUS = {
    **dict.fromkeys((192, 193, 164, AUTHENTICATION_FAILED), 403),  # unknown user, wrong password, readonly
    194: 401,  # REQUIRED_PASSWORD
    **dict.fromkeys((6, 26, 27, 38, 41, 53, 62, 72, 117, 457), 400),  # cannot parse, syntax, bad parameter
    **dict.fromkeys((46, 47, 50, 56, 60, 73, 81, UNKNOWN_SETTING), 404),  # unknown function/identifier/table/database
    NOT_IMPLEMENTED: 501,
}

_ENGINE_MESSAGE = re.compile(r"Code: (\d+)\. (DB::Exception: .*)", re.S)
# The statement at the head of an insert body; the data starts after the format name and one
# line break (ClickHouse skips the same). No quote may precede FORMAT, so a VALUES literal
# that happens to contain the word is never mistaken for the clause.
_INSERT_WITH_FORMAT = re.compile(rb"\s*(INSERT\s+INTO\s[^'\"]*?)\s+FORMAT\s+(\w+)[ \t]*(?:\r?\n)?", re.I | re.S)
TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.I)
# Statements that produce a result set; only their responses carry X-ClickHouse-Format, which
# is how clickhouse-connect's command() tells "empty result" from "no result".
RESULT_STATEMENT = re.compile(r"\s*\(*\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN|CHECK)\b", re.I)
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "JSON": "application/json; charset=UTF-8",
}
_BINARY_FORMATS = ("Native", "RowBinary", "Arrow", "Parquet", "ORC", "Avro")

READ_CHUNK = 1 << 20
_QUERY_HEAD = 1 << 18  # ClickHouse's default max_query_size: the statement must start within it
SPOOL_IN_MEMORY = 32 << 20


class WarehouseError(Exception):
    """An error answered the ClickHouse way: code, ``DB::Exception`` text, HTTP status."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text  # "DB::Exception: <message>. (<NAME>)", as the engine words it

    @classmethod
    def of(cls, code: int, name: str, message: str) -> WarehouseError:
        return cls(code, f"DB::Exception: {message}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> WarehouseError:
        """Wrap a chDB error, whose text carries ``Code: NN. DB::Exception: …`` somewhere."""
        match = _ENGINE_MESSAGE.search(str(exc))
        if match is None:
            return cls.of(UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", str(exc) or type(exc).__name__)
        return cls(int(match.group(1)), match.group(2).strip())

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)

    def body(self, version: str) -> bytes:
        text = f"Code: {self.code}. {self.text}"
        if "(version " not in text:
            text += f" (version {version})"
        return (text + "\n").encode()


@dataclass(frozen=True)
class Request:
    """One statement as the HTTP interface received it, credentials and transport stripped."""

    sql: str  # for an insert with data: the statement without its FORMAT clause
    database: str = "default"
    settings: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)  # query parameters, no ``param_`` prefix
    default_format: str = "TabSeparated"
    insert_format: str | None = None  # set when the body after the statement is data in this format
    first_data: bytes = b""  # data bytes already read while locating the statement
    data: IO[bytes] | None = None  # the rest of the data


@dataclass(frozen=True)
class Result:
    output: bytes
    summary: dict[str, str]  # X-ClickHouse-Summary


def split_statement(query_arg: str, body: IO[bytes]) -> tuple[str, str | None, bytes]:
    """The statement, its insert format and the data bytes read past it.

    As in ClickHouse, the ``query`` URL argument and the body form one text (joined by a line
    break); for ``INSERT … FORMAT fmt`` the data starts right after the format name's line.
    """
    head = body.read(_QUERY_HEAD)
    text = (query_arg.encode() + b"\n" + head) if query_arg else head
    match = _INSERT_WITH_FORMAT.match(text)
    if match:
        return match.group(1).decode(), match.group(2).decode(), text[match.end():]
    return (text + body.read()).decode("utf-8", errors="replace"), None, b""


def decompressed(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """Undo ``Content-Encoding``; clickhouse-connect sends one frame per block, so frames chain."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        yield from chunks
        return
    new_decoder = _DECODERS.get(encoding)
    if new_decoder is None:
        raise WarehouseError.of(UNKNOWN_COMPRESSION_METHOD, "UNKNOWN_COMPRESSION_METHOD",
                                 f"Unknown HTTP content encoding: '{encoding}'")
    decoder = new_decoder()
    try:
        for chunk in chunks:
            while chunk:
                out = decoder.decompress(chunk)
                if out:
                    yield out
                chunk = b""
                if decoder.eof:  # a frame ended: what follows is the next frame
                    chunk, decoder = decoder.unused_data, new_decoder()
    except WarehouseError:
        raise
    except Exception as exc:  # each library has its own error type
        raise WarehouseError.of(CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS",
                                f"Cannot decompress the {encoding} request body: {exc}") from None


def _decoders() -> dict[str, Callable[[], Any]]:
    decoders: dict[str, Callable[[], Any]] = {
        "gzip": lambda: zlib.decompressobj(wbits=31),
        "deflate": lambda: zlib.decompressobj(),
    }
    try:
        import lz4.frame

        decoders["lz4"] = lz4.frame.LZ4FrameDecompressor
    except ImportError:
        pass
    try:
        if sys.version_info >= (3, 14):
            from compression import zstd
        else:
            from backports import zstd
        decoders["zstd"] = zstd.ZstdDecompressor
    except ImportError:
        pass
    return decoders


_DECODERS = _decoders()


def quote_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def parse_chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";")[0].strip(), 16)
    except ValueError:
        raise WarehouseError.of(CANNOT_PARSE_INPUT, "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
                                f"Malformed chunk size line {line[:40]!r} in the chunked request body") from None


def content_type_of(result_format: str) -> str:
    if result_format.startswith(_BINARY_FORMATS):
        return "application/octet-stream"
    for prefix, content_type in _CONTENT_TYPES.items():
        if result_format.startswith(prefix):
            return content_type
    return "text/plain; charset=UTF-8"


def form_fields(content_type: str, payload: bytes) -> dict[str, str]:
    """Fields of a ``multipart/form-data`` body; external data tables are not supported."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + payload)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        if part.get_filename():
            raise WarehouseError.of(NOT_IMPLEMENTED, "NOT_IMPLEMENTED",
                                    "External data is not supported by the embedded warehouse")
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = (part.get_payload(decode=True) or b"").decode()
    return fields
