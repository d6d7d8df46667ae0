"""Avro codec for every radstream topic.

Two wire formats, chosen by settings:

* **Avro single-object encoding** (Avro 1.11 spec, "Single-object encoding"):
  ``C3 01`` + the writer schema's CRC-64-AVRO fingerprint (8 bytes, little endian)
  + the Avro body. Self-describing without any server; the default.
* **Confluent wire format** when ``kafka.schema_registry_url`` is set: ``00`` +
  the registry's 4-byte schema id (big endian) + the Avro body. Schemas are registered
  under the subject ``<topic>-value`` (TopicNameStrategy).

``encode`` refuses an event that does not match its schema, naming the field, so a
bad event fails at the producer and never reaches a topic; ``decode`` raises
:class:`DecodeError` for bytes that are not a known radstream event, which callers
turn into a dead-letter event.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypeVar

import fastavro
from fastavro.validation import ValidationError as _AvroValidationError
from fastavro.validation import validate

from schemas.events import EVENT_TYPES, Record

R = TypeVar("R", bound=Record)

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"


class CodecError(ValueError):
    """Base class of codec failures."""


class EncodeError(CodecError):
    """The event does not match its Avro schema."""


class DecodeError(CodecError):
    """The bytes are not a radstream event of a known schema."""


# CRC-64-AVRO (Avro spec, "Schema Fingerprints").
_EMPTY64 = 0xC15D213AA4D7A795
_FP_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_EMPTY64 & -(_fp & 1))
    _FP_TABLE.append(_fp)


def fingerprint64(data: bytes) -> int:
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


@dataclass(frozen=True)
class SchemaInfo:
    name: str  # file stem, e.g. "instance_received"
    raw: dict[str, Any]
    parsed: Any
    canonical: str
    fingerprint: bytes  # 8 bytes, little endian


@cache
def load_schema(name: str) -> SchemaInfo:
    try:
        text = resources.files("schemas").joinpath("avro", f"{name}.avsc").read_text()
    except FileNotFoundError:
        raise CodecError(f"no Avro schema named {name!r} in schemas/avro") from None
    raw = json.loads(text)
    parsed = fastavro.parse_schema(raw, named_schemas={})
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    fp = fingerprint64(canonical.encode()).to_bytes(8, "little")
    return SchemaInfo(name, raw, parsed, canonical, fp)


@cache
def _by_fingerprint() -> dict[bytes, SchemaInfo]:
    return {info.fingerprint: info for info in (load_schema(n) for n in EVENT_TYPES)}


class SchemaRegistryClient:
    """Minimal Confluent Schema Registry REST client (register, fetch by id), cached."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, str] = {}
        self._lock = threading.Lock()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise CodecError(f"schema registry {self.url}{path}: HTTP {exc.code} {exc.read()[:200]!r}") from None
        except OSError as exc:
            raise CodecError(f"schema registry {self.url} unreachable: {exc}") from None

    def register(self, subject: str, info: SchemaInfo) -> int:
        key = (subject, info.canonical)
        with self._lock:
            if key not in self._ids:
                reply = self._call("POST", f"/subjects/{subject}/versions", {"schema": json.dumps(info.raw)})
                self._ids[key] = int(reply["id"])
                self._schemas[self._ids[key]] = json.dumps(info.raw)
            return self._ids[key]

    def schema(self, schema_id: int) -> str:
        with self._lock:
            if schema_id not in self._schemas:
                self._schemas[schema_id] = self._call("GET", f"/schemas/ids/{schema_id}")["schema"]
            return self._schemas[schema_id]


class Codec:
    """Encode and decode radstream events; thread-safe."""

    def __init__(self, schema_registry_url: str | None = None) -> None:
        self.registry = SchemaRegistryClient(schema_registry_url) if schema_registry_url else None

    def encode(self, event: Record, topic: str | None = None) -> bytes:
        info = _schema_of(type(event))
        record = event.to_avro()
        # The boolean check first: with raise_errors, fastavro builds (and JSON-dumps) a
        # ValidationError for every union branch a value does not take, ~8x the cost.
        if not validate(record, info.parsed, raise_errors=False):
            try:
                validate(record, info.parsed, raise_errors=True)
            except _AvroValidationError as exc:
                raise EncodeError(f"{type(event).__name__} does not match schemas/avro/{info.name}.avsc: {exc}") from None
            raise EncodeError(f"{type(event).__name__} does not match schemas/avro/{info.name}.avsc")
        buf = io.BytesIO()
        if self.registry is not None:
            schema_id = self.registry.register(f"{topic or info.name}-value", info)
            buf.write(CONFLUENT_MAGIC + struct.pack(">I", schema_id))
        else:
            buf.write(SINGLE_OBJECT_MAGIC + info.fingerprint)
        fastavro.schemaless_writer(buf, info.parsed, record)
        return buf.getvalue()

    def decode(self, data: bytes | None, expected: type[R] | None = None) -> R | Record:
        """Decode ``data``; with ``expected``, refuse any other event type."""
        if not data or len(data) < 5:
            raise DecodeError(f"message of {len(data or b'')} bytes is too short to be an Avro event")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            info = _by_fingerprint().get(bytes(data[2:10]))
            if info is None:
                raise DecodeError(f"unknown schema fingerprint {bytes(data[2:10]).hex()}")
            writer, body = info.parsed, data[10:]
        elif data[:1] == CONFLUENT_MAGIC:
            if self.registry is None:
                raise DecodeError("Confluent-framed message but no schema registry is configured")
            schema_id = struct.unpack(">I", data[1:5])[0]
            writer_raw = json.loads(self.registry.schema(schema_id))
            info = _by_canonical().get(
                fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(writer_raw, named_schemas={}))
            )
            if info is None:
                raise DecodeError(f"registry schema id {schema_id} is not a radstream event schema")
            writer, body = info.parsed, data[5:]
        else:
            raise DecodeError(f"not an Avro event (first bytes {bytes(data[:4]).hex()})")
        cls = EVENT_TYPES[info.name]
        if expected is not None and cls is not expected:
            raise DecodeError(f"expected {expected.__name__} but the message is {cls.__name__}")
        try:
            record = fastavro.schemaless_reader(io.BytesIO(body), writer, info.parsed)
        except Exception as exc:  # fastavro raises several types on truncated bodies
            raise DecodeError(f"corrupt {cls.__name__} body: {exc}") from None
        return cls.from_avro(record)


def _schema_of(cls: type[Record]) -> SchemaInfo:
    if not cls.SCHEMA:
        raise EncodeError(f"{cls.__name__} is a nested record, not a topic event")
    return load_schema(cls.SCHEMA)


@cache
def _by_canonical() -> dict[str, SchemaInfo]:
    return {info.canonical: info for info in (load_schema(n) for n in EVENT_TYPES)}
