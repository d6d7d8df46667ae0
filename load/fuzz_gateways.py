"""Property-based fuzzing of the gateways, on mutations of real inputs.

Over 600 lines: five properties and their mutators, shared by the tests and the long runs.

Five properties, each run on random mutations (cut, flipped, inserted, deleted,
duplicated bytes, and each protocol's own delimiters spliced in) of real input:
pydicom's CT/MR/JPEG 2000 files for the DICOM intake and its completeness walk
(:mod:`gateways.dicom_wire`); the bytes pynetdicom sends for a whole association (request,
C-STORE of CT_small, release) to the gateway's SCP over TCP (pynetdicom's state machine
and :mod:`gateways.dicom_reactor`); a STOW-RS body of two files for the multipart reader
(:mod:`gateways.stow_rs`, over real HTTP to an in-process server); framed ORM^O01 and ADT
messages for the MLLP framer (:func:`gateways.hl7_mllp.read_frame`) and the HL7 parser
(:mod:`gateways.hl7_message`). For every mutation: no uncaught exception, no hang (a
per-mutation deadline), and never a success answer for input not stored intact (a
cut-short input is never accepted; what is accepted is stored byte for byte).

``tests/test_fuzz_gateways.py`` runs each property for tens to hundreds of mutations in
``make test``; ``python -m load.fuzz_gateways --seconds N [--only NAME]`` runs them for N
seconds each and prints the mutation counts.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

#: Mutations tried per property in this process (tests report them at the session's end).
MUTATIONS: Counter[str] = Counter()
#: Per-mutation deadline: a parser that takes longer has hung.
DEADLINE = timedelta(seconds=5)


# ---------------------------------------------------------------- mutations


class Mutant:
    """Mutated bytes; ``truncated``: the only mutation was cutting the end off."""

    __slots__ = ("data", "truncated", "kinds")

    def __init__(self, data: bytes, truncated: bool, kinds: tuple[str, ...] = ()) -> None:
        self.data, self.truncated, self.kinds = data, truncated, kinds

    def __repr__(self) -> str:  # a counterexample report names it; the bytes are reproduced by the seed
        return f"Mutant({len(self.data)} bytes, {'+'.join(self.kinds)}, head={self.data[:48]!r})"


def mutants(original: bytes, tokens: list[bytes]) -> st.SearchStrategy[Mutant]:
    """1 to 3 mutations of ``original``; ``tokens`` are the protocol's delimiters to splice in."""

    @st.composite
    def build(draw: Any) -> Mutant:
        data = original
        kinds = draw(st.lists(st.sampled_from(["cut", "flip", "insert", "delete", "duplicate", "token"]),
                              min_size=1, max_size=3))
        for kind in kinds:
            at = draw(st.integers(0, max(0, len(data) - 1)))
            if kind == "cut":
                data = data[:at]
            elif kind == "flip" and data:
                data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
            elif kind == "insert":
                data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
            elif kind == "delete":
                data = data[:at] + data[at + draw(st.integers(1, 64)):]
            elif kind == "duplicate":
                span = data[at:at + draw(st.integers(1, 256))]
                to = draw(st.integers(0, len(data)))
                data = data[:to] + span + data[to:]
            elif kind == "token":
                data = data[:at] + draw(st.sampled_from(tokens)) + data[at:]
        return Mutant(data, truncated=set(kinds) == {"cut"} and len(data) < len(original), kinds=tuple(kinds))

    return build()


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=DEADLINE, database=None, derandomize=False,
                    phases=[Phase.generate], print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- fakes: the broker and the store


@dataclass
class RecordingPublisher:
    """Stands in for the acked publisher: every event and dead letter is kept."""

    events: list[Any] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, spec: Any, event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def begin(self, spec: Any, event: Any) -> Callable[[], None]:
        """:meth:`EventPublisher.begin`: kept at once, so its ack is already there."""
        self.publish(spec, event)
        return lambda: None

    def dead_letter(self, stage: str, reason: str, error: str, **fields: Any) -> None:
        with self.lock:
            self.dead_letters.append({"stage": stage, "reason": reason, "error": error, **fields})

    def clear(self) -> None:
        with self.lock:
            self.events.clear()
            self.dead_letters.clear()


def _settings(root: Path) -> Any:
    from schemas.settings import load_settings

    return load_settings(data_dir=root / "data", blobs={"backend": "local"},
                         stow={"tokens": "FUZZ=SITE_FUZZ", "max_part_bytes": 1 << 20, "max_body_bytes": 4 << 20})


def _dicom_files() -> list[bytes]:
    from pydicom.data import get_testdata_file

    names = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")
    return [Path(path).read_bytes() for name in names if (path := get_testdata_file(name, download=False))]


# ---------------------------------------------------------------- 1. the DICOM intake and its walk


class DicomIntakeProperty:
    """A mutated PS3.10 file through the shared intake (as a STOW-RS part is): refused with
    an :class:`InvalidInstance`, or stored byte for byte; a cut-short file never stored."""

    name = "dicom-intake"

    def __init__(self, root: Path) -> None:
        from adapters.blobs import LocalBlobStore
        from gateways.intake import InstanceIntake

        self.store = LocalBlobStore(root / "blobs")
        self.publisher = RecordingPublisher()
        self.intake = InstanceIntake(self.store, self.publisher, "fuzz")  # type: ignore[arg-type]
        self.originals = _dicom_files()

    def strategy(self) -> st.SearchStrategy[Mutant]:
        tokens = [b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0", b"\xfe\xff\x0d\xe0", b"\xff\xff\xff\xff",
                  b"\x20\x00\x0d\x00UI", b"\xe0\x7f\x10\x00OW\x00\x00"]
        return st.one_of(*(mutants(original, tokens) for original in self.originals))

    def check(self, mutant: Mutant) -> None:
        from gateways.intake import Received
        from gateways.validation import InvalidInstance

        MUTATIONS[self.name] += 1
        received = Received(mutant.data)
        try:
            event = self.intake.receive(received, "SITE_FUZZ")
        except InvalidInstance:
            return
        if mutant.truncated:
            # A cut at an element boundary before the image pixel module leaves a data set
            # complete in itself; from Rows (0028,0010) on, the pixel module tells.
            original = next(o for o in self.originals if o.startswith(mutant.data))
            assert len(mutant.data) <= original.find(b"\x28\x00\x10\x00US"), "a cut-short instance was stored"
        assert self.store.get(event.blob_uri) == mutant.data, "the stored blob is not the instance as received"


# ---------------------------------------------------------------- 1b. a whole association, over TCP


#: PDU and item types, lengths and message control headers (PS3.8 9.3): what a mutation splices in
PDU_TOKENS = [b"\x01\x00", b"\x02\x00", b"\x04\x00", b"\x05\x00", b"\x06\x00", b"\x07\x00", b"\x20\x00",
              b"\x21\x00", b"\x50\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x40\x00",
              b"\x03", b"\x02", b"\x01", b"\x00"]


def recorded_association(address: tuple[str, int], called_ae: str, contexts: list[tuple[str, str]],
                         work: Callable[[Any], None]) -> bytes:
    """What pynetdicom's SCU sends to ``address`` for an association (``contexts``: abstract
    and transfer syntax), ``work(assoc)`` and the release: its bytes, kept by a relay."""
    import socket

    from pynetdicom import AE

    listener = socket.create_server(("127.0.0.1", 0))
    sent = bytearray()

    def relay() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(address)

        def pump(source: socket.socket, target: socket.socket, keep: bool) -> None:
            while data := source.recv(1 << 16):
                if keep:
                    sent.extend(data)
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, client, False), daemon=True)
        back.start()
        pump(client, upstream, True)
        back.join(10)
        client.close()
        upstream.close()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    scu = AE("FUZZ_SCU")
    for abstract, transfer in contexts:
        scu.add_requested_context(abstract, transfer)
    assoc = scu.associate("127.0.0.1", listener.getsockname()[1], ae_title=called_ae)
    assert assoc.is_established, "the recording association was refused"
    try:
        work(assoc)
    finally:
        assoc.release()
        thread.join(10)
        listener.close()
    return bytes(sent)


class DicomAssociationProperty:
    """A mutated association, as a sender's bytes over TCP, to the gateway's SCP in this
    process (pynetdicom's state machine, radstream's reactor, the C-STORE handler and the
    intake): once the sender stops sending, the gateway closes the connection, and within
    the ARTIM timer holds no association; none of its threads dies of an exception; it never
    dead-letters an internal error; what it published is stored; and a real association is
    served afterwards.

    The bytes mutated are those pynetdicom sends for A-ASSOCIATE-RQ, a C-STORE of CT_small
    and A-RELEASE-RQ, recorded once through a relay."""

    name = "dicom-association"
    #: a real C-ECHO association every this many mutations (the gateway still serves)
    ECHO_EVERY = 25

    def __init__(self, root: Path) -> None:
        from adapters.blobs import LocalBlobStore
        from gateways.dicom_scp import start_gateway
        from radstream import procs
        from schemas.settings import load_settings

        # ARTIM at 1 s: an association whose A-ASSOCIATE-RQ was cut short waits for it that long
        self.settings = load_settings(data_dir=root / "data-scp", **procs.isolated_listeners(
            blobs={"backend": "local"}, dicom={"artim_timeout_s": 1.0}))
        self.store = LocalBlobStore(root / "scp-blobs")
        self.publisher = RecordingPublisher()
        self.server = start_gateway(self.settings, self.store, self.publisher)  # type: ignore[arg-type]
        self.address = (self.settings.bind_host, self.settings.dicom.port)
        self.thread_deaths: list[str] = []
        self._excepthook = threading.excepthook
        threading.excepthook = self._thread_died
        self.stream = self._record()
        self.checked = 0

    def _thread_died(self, args: Any) -> None:
        self.thread_deaths.append(f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: "
                                  f"{args.exc_value}")
        self._excepthook(args)

    def close(self) -> None:
        threading.excepthook = self._excepthook
        self.server.shutdown()

    def _record(self) -> bytes:
        """The bytes a real sender sends: pynetdicom's SCU through a relay that keeps them."""
        from pydicom import dcmread
        from pydicom.data import get_testdata_file
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

        statuses = []
        stream = recorded_association(self.address, self.settings.dicom.ae_title,
                                      [(CTImageStorage, ExplicitVRLittleEndian)],
                                      lambda assoc: statuses.append(
                                          assoc.send_c_store(dcmread(get_testdata_file("CT_small.dcm"))).Status))
        assert statuses == [0x0000] and len(self.publisher.events) == 1, "the recording C-STORE was not stored"
        self.publisher.clear()
        return stream

    def strategy(self) -> st.SearchStrategy[Mutant]:
        return mutants(self.stream, PDU_TOKENS)

    def _send(self, data: bytes) -> None:
        """As a sender would: the A-ASSOCIATE-RQ (where the original's ends), the gateway's answer
        awaited, then the rest, then the end of sending; read until the gateway closes."""
        import socket

        split = 6 + int.from_bytes(self.stream[2:6], "big")
        with socket.create_connection(self.address, timeout=2.0) as sock:
            try:
                sock.sendall(data[:split])
                sock.settimeout(0.25)
                try:
                    answered = sock.recv(1 << 16, socket.MSG_PEEK)
                except TimeoutError:
                    answered = b"?"  # still waiting for the rest of its PDU: give it the rest
                sock.settimeout(2.0)
                if answered:
                    sock.sendall(data[split:])
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the gateway closed first (a rejection or an abort): what follows is read below
            try:
                while sock.recv(1 << 16):
                    pass
            except TimeoutError:
                raise AssertionError("the gateway kept the connection open after the sender stopped") from None
            except OSError:
                pass  # reset by the gateway: closed too

    def _echo(self) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        scu = AE("FUZZ_ECHO")
        scu.add_requested_context(Verification)
        assoc = scu.associate(*self.address, ae_title=self.settings.dicom.ae_title)
        assert assoc.is_established, "the gateway no longer accepts an association"
        try:
            assert assoc.send_c_echo().Status == 0x0000, "the gateway no longer answers C-ECHO"
        finally:
            assoc.release()

    def check(self, mutant: Mutant) -> None:
        MUTATIONS[self.name] += 1
        self.publisher.clear()
        self.thread_deaths.clear()
        self._send(mutant.data)
        deadline = time.monotonic() + self.settings.dicom.artim_timeout_s + 1.0
        while self.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not self.server.active_associations, "an association outlived its connection and the ARTIM timer"
        assert not self.thread_deaths, f"a gateway thread died: {self.thread_deaths}"
        assert not any(d["reason"] == "internal_error" for d in self.publisher.dead_letters), \
            self.publisher.dead_letters
        for event in self.publisher.events:
            assert self.store.get(event.blob_uri), "an event was published for an instance not stored"
        self.checked += 1
        if self.checked % self.ECHO_EVERY == 0:
            self._echo()


# ---------------------------------------------------------------- 2. the STOW-RS multipart reader


class StowProperty:
    """A mutated STOW-RS body over real HTTP: never 5xx; 200/202 only with every referenced
    instance stored byte for byte as it appears in the body; a cut-short body never 200."""

    name = "stow-multipart"
    boundary = "fuzz-boundary-0123456789"

    def __init__(self, root: Path) -> None:
        from adapters.blobs import LocalBlobStore
        from gateways.stow_rs import StowGateway
        from radstream import procs

        self.settings = _settings(root)
        self.store = LocalBlobStore(root / "stow-blobs")
        self.publisher = RecordingPublisher()
        self.gateway = StowGateway(self.settings, self.store, self.publisher, tokens={"FUZZ": "SITE_FUZZ"})  # type: ignore[arg-type]
        self.port = procs.free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-stow", daemon=True)
        self.thread.start()
        self.runner = self._run(self._start())
        files = _dicom_files()[:2]
        self.body = b"".join(f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                             for data in files) + f"--{self.boundary}--\r\n".encode()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    async def _start(self) -> Any:
        from gateways.stow_rs import start_server

        return await start_server(self.settings, self.gateway, port=self.port)

    def close(self) -> None:
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.gateway.close()

    def strategy(self) -> st.SearchStrategy[Mutant]:
        tokens = [b"\r\n", f"--{self.boundary}".encode(), f"\r\n--{self.boundary}--\r\n".encode(), b"--",
                  b"\r\n\r\n", b"Content-Type: text/plain\r\n", b"Content-Type: application/dicom\r\n\r\n"]
        return mutants(self.body, tokens)

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer FUZZ\r\n"
                f'Content-Type: multipart/related; type="application/dicom"; boundary={self.boundary}\r\n'
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        writer.write(head + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), DEADLINE.total_seconds())
        writer.close()
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
        return status, answer.partition(b"\r\n\r\n")[2]

    def check(self, mutant: Mutant) -> None:
        import json

        from pydicom.dataset import Dataset

        MUTATIONS[self.name] += 1
        self.publisher.clear()
        status, content = self._run(self._post(mutant.data))
        assert status in (200, 202, 400, 409, 413, 415), f"answered {status}: {content[:300]!r}"
        if mutant.truncated and not mutant.data.rstrip(b"\r").endswith(f"--{self.boundary}--".encode()):
            # (only the CRLF after the close-delimiter is optional, RFC 2046 5.1.1)
            assert status != 200, "a cut-short body was answered 200"
        if status not in (200, 202):
            assert not self.publisher.events, f"answered {status} yet instances were published"
        if status in (200, 202):
            answer = Dataset.from_json(json.loads(content))
            referenced = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
            stored = {event.sop_instance_uid: event for event in self.publisher.events}
            assert referenced == set(stored), "the answer does not list exactly the instances published"
            for event in stored.values():
                assert self.store.get(event.blob_uri) in mutant.data, "an instance was not stored as sent"


# ---------------------------------------------------------------- 3. MLLP framing and 4. the HL7 parser


def _hl7_messages() -> list[bytes]:
    msh = "MSH|^~\\&|RIS|HOSP_A|RADSTREAM|RADSTREAM|20250101120000||{kind}|{control}|P|2.5"
    pid = "PID|1||12345^^^HOSP^MR||DOE^JOHN||19700101|M|||1 Main St^^Austin^TX^78701"
    orm = [msh.format(kind="ORM^O01", control="FUZZ1"), pid, "PV1|1|E|ED^12^1^HOSP_A", "ORC|NW|PL1",
           "OBR|1|PL1||CTHEAD^CT head without contrast^L||||||||||||DR1^Smith^Jane|ACC1|||||||||^^^^^S||||"
           "R51^Headache, sudden onset^I10"]
    adt = [msh.format(kind="ADT^A08", control="FUZZ2"), pid, "PV1|1|E|ED^12^1^HOSP_A"]
    return [("\r".join(segments) + "\r").encode() for segments in (orm, adt)]


HL7_TOKENS = [b"\r", b"|", b"^", b"~", b"\\", b"&", b"\x1c", b"\x0b", b"\x1c\r", b"MSH|^~\\&|", b"ORC|NW|PL2\r",
              b"OBR|1|PL2||X||||||||||||||ACC2\r", b"PID|1||9\r", b"19701332", b"yesterday", b"\xff\xfe"]


def _real_date(value: str | None) -> bool:
    """None, or YYYY[MM[DD]] naming a day of the calendar."""
    if value is None:
        return True
    formats = {4: "%Y", 6: "%Y%m", 8: "%Y%m%d"}
    if len(value) not in formats or not value.isdigit():
        return False
    try:
        datetime.strptime(value, formats[len(value)])
    except ValueError:
        return False
    return True


def _msh10(payload: bytes) -> str | None:
    first = next((s for s in re.split(rb"\r\n|\r|\n", payload) if s.strip()), b"")  # blank lines are tolerated
    if not first.startswith(b"MSH") or len(first) < 4:
        return None
    fields = first.split(first[3:4])
    return fields[9].decode("latin-1").strip() if len(fields) > 9 else None


class Hl7Property:
    """A mutated HL7 message, framed (``framing=True``: mutations may hit the MLLP bytes)
    or not, through :func:`read_frame` and the handler: every frame answered with a
    parseable ACK and never a traceback; AA only for one well-framed message whose
    events carry its own control id, one order per ORC, valid dates."""

    def __init__(self, root: Path, framing: bool) -> None:
        from gateways.hl7_mllp import Hl7Handler

        self.framing = framing
        self.name = "mllp-framer" if framing else "hl7-parser"
        self.publisher = RecordingPublisher()
        settings = _settings(root)
        self.max_bytes = settings.hl7.max_message_bytes
        from adapters.blobs import LocalBlobStore

        self.handler = Hl7Handler(settings, self.publisher,  # type: ignore[arg-type]
                                  store_factory=lambda: LocalBlobStore(root / "hl7-blobs"))

    def strategy(self) -> st.SearchStrategy[Mutant]:
        messages = _hl7_messages()
        if self.framing:
            return st.one_of(*(mutants(b"\x0b" + m + b"\x1c\r", HL7_TOKENS) for m in messages))
        return st.one_of(*(mutants(m, HL7_TOKENS) for m in messages))

    def frames(self, data: bytes) -> list[Any]:
        from gateways.hl7_mllp import read_frame

        async def read_all() -> list[Any]:
            reader = asyncio.StreamReader(limit=self.max_bytes + 4)
            reader.feed_data(data)
            reader.feed_eof()
            out = []
            while (frame := await read_frame(reader, self.max_bytes, DEADLINE.total_seconds())) is not None:
                out.append(frame)
                if frame.last:
                    break
            return out

        return asyncio.run(read_all())

    def check(self, mutant: Mutant) -> None:
        import hl7

        MUTATIONS[self.name] += 1
        frames = self.frames(mutant.data if self.framing else b"\x0b" + mutant.data + b"\x1c\r")
        for frame in frames:
            self.publisher.clear()
            answer = self.handler.handle(frame)
            ack = hl7.parse(answer.decode("utf-8"))
            code = str(ack.segment("MSA")(1))
            assert not any(d["reason"] == "internal_error" for d in self.publisher.dead_letters), \
                self.publisher.dead_letters
            if code != "AA":
                assert self.publisher.events == [], "a refused message published events"
                continue
            payload = frame.raw[1:-2]
            assert frame.error is None and frame.raw.startswith(b"\x0b") and frame.raw.endswith(b"\x1c\r")
            assert b"\x1c" not in payload and b"\x0b" not in payload, "framing bytes inside an accepted message"
            segments = [s for s in re.split(rb"\r\n|\r|\n", payload) if s.strip()]
            assert sum(s[:3] in (b"MSH", b"BHS", b"FHS") for s in segments) == 1, "several messages, one AA"
            control_id = _msh10(payload)
            assert self.publisher.events and all(e.control_id == control_id for e in self.publisher.events)
            if self.publisher.events[0].message_type.startswith("ORM"):
                assert len(self.publisher.events) == sum(s[:3] == b"ORC" for s in segments), "orders lost"
            for event in self.publisher.events:
                assert _real_date(event.patient_birth_date), f"birth date {event.patient_birth_date!r} accepted"
            if self.framing and mutant.truncated:
                raise AssertionError("a cut-short frame was accepted")


# ---------------------------------------------------------------- running


@contextmanager
def properties(root: Path) -> Iterator[list[Any]]:
    stow = StowProperty(root)
    try:
        association = DicomAssociationProperty(root)
        try:
            yield [DicomIntakeProperty(root), association, stow, Hl7Property(root, framing=True),
                   Hl7Property(root, framing=False)]
        finally:
            association.close()
    finally:
        stow.close()


def run_property(prop: Any, max_examples: int) -> None:
    """Run ``prop`` on ``max_examples`` mutations; raises on the first counterexample."""

    @fuzz_settings(max_examples)
    @given(prop.strategy())
    def property_holds(mutant: Mutant) -> None:
        prop.check(mutant)

    property_holds()


def run_for(prop: Any, seconds: float, batch: int = 200) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run_property(prop, batch)


def quiet_logs() -> None:
    """Every refused mutation is logged by the gateways; only the counts matter here."""
    import logging
    import warnings

    import structlog

    logging.getLogger().setLevel(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time per property (default 60)")
    parser.add_argument("--only", choices=["dicom-intake", "dicom-association", "stow-multipart", "mllp-framer",
                                           "hl7-parser"])
    args = parser.parse_args(argv)
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="radstream-fuzz-") as tmp, properties(Path(tmp)) as props:
        for prop in props:
            if args.only and prop.name != args.only:
                continue
            started = time.monotonic()
            run_for(prop, args.seconds)
            print(f"{prop.name}: {MUTATIONS[prop.name]} mutations in {time.monotonic() - started:.0f} s, "
                  "no counterexample", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
