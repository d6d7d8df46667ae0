"""Confluent wire format: schemas registered under <topic>-value, ids in the frame.

No Confluent Schema Registry runs here, so a minimal one speaks the two REST calls the
codec uses (POST /subjects/{s}/versions, GET /schemas/ids/{id}) on loopback.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from schemas.codec import Codec, CodecError, DecodeError
from schemas.events import AuditEvent, utcnow


class _Registry(BaseHTTPRequestHandler):
    schemas: list[str] = []
    subjects: dict[str, list[int]] = {}

    def log_message(self, *args) -> None:
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "subjects" or parts[2] != "versions":
            return self._reply(404, {"error_code": 404, "message": "not found"})
        schema = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["schema"]
        if schema not in self.schemas:
            self.schemas.append(schema)
        schema_id = self.schemas.index(schema) + 1
        self.subjects.setdefault(parts[1], []).append(schema_id)
        self._reply(200, {"id": schema_id})

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["schemas", "ids"] and 0 < int(parts[2]) <= len(self.schemas):
            return self._reply(200, {"schema": self.schemas[int(parts[2]) - 1]})
        self._reply(404, {"error_code": 40403, "message": "Schema not found"})


@pytest.fixture
def registry_url():
    _Registry.schemas, _Registry.subjects = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_confluent_frame_carries_the_registry_id_and_round_trips(registry_url: str) -> None:
    event = AuditEvent(trace_id="t1", actor="reader-7", action="opened", stage="worklist", at=utcnow(),
                       detail={"ip": "127.0.0.1"}, study_uid="1.2.3")
    writer = Codec(registry_url)
    data = writer.encode(event, topic="radstream.audit")
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == 1
    assert _Registry.subjects == {"radstream.audit-value": [1]}
    # a fresh codec (another process) resolves the id through the registry
    assert Codec(registry_url).decode(data, AuditEvent) == event
    # registration is cached: a second event does not register again
    writer.encode(event, topic="radstream.audit")
    assert _Registry.subjects == {"radstream.audit-value": [1]}


def test_confluent_frame_without_a_registry_is_a_clear_decode_error(registry_url: str) -> None:
    data = Codec(registry_url).encode(AuditEvent(trace_id="t", actor="a", action="b", stage="c", at=utcnow()))
    with pytest.raises(DecodeError, match="no schema registry is configured"):
        Codec().decode(data)


def test_unknown_schema_id_and_unreachable_registry_name_the_registry(registry_url: str) -> None:
    with pytest.raises(CodecError, match="HTTP 404"):
        Codec(registry_url).decode(b"\x00\x00\x00\x00\x63" + b"\x00" * 8)
    with pytest.raises(CodecError, match="unreachable"):
        Codec("http://127.0.0.1:9").encode(AuditEvent(trace_id="t", actor="a", action="b", stage="c", at=utcnow()))
