"""The HL7 MLLP gateway as a sender sees it: real TCP, real broker, real gateway process.

One gateway process (``python -m gateways.hl7_mllp``) and one Tansu broker serve the
whole module: the malformed-input corpus is sent at the same process, every case gets
its exact HL7 answer (MSA-1 AE/AR, MSA-3 text, ERR-3 table 0357 code) and a dead-letter
event carrying the raw bytes, a valid order on the same connection is still accepted
afterwards, and at the end the process is the one that started (never restarted).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import hl7
import pytest
from confluent_kafka import Consumer, TopicPartition

from gateways.hl7_mllp import Frame, Hl7Handler, start_listener
from gateways.publisher import EventPublisher
from radstream import procs
from schemas.codec import Codec
from schemas.events import DeadLetter, OrderReceived, PatientUpdated
from schemas.settings import Settings, load_settings
from schemas.topics import DEAD_LETTER, ORDER_RECEIVED, PATIENT_UPDATED, TopicSpec
from adapters.kafka import ensure_topics

pytestmark = pytest.mark.integration

VT, FS_CR = b"\x0b", b"\x1c\r"
MAX_BYTES = 4096


# ---------------------------------------------------------------- building messages


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment with ``fields[n]`` in field n (1-based, as HL7 numbers them)."""
    values = [""] * max(fields, default=0)
    for n, value in fields.items():
        values[n - 1] = value
    return "|".join([name, *values])


def msh(control_id: str = "MSG1", kind: str = "ORM^O01", *, facility: str = "HOSP_A", processing: str = "P",
        version: str = "2.5", charset: str = "") -> str:
    # MSH-1 is the field separator itself, so MSH-2 is the first field after "MSH|".
    fields = ["^~\\&", "RIS", facility, "RADSTREAM", "RADSTREAM", "20250101120000", "", kind, control_id,
              processing, version, "", "", "", "", "", charset]
    return "|".join(["MSH", *fields]).rstrip("|")


PID = segment("PID", {1: "1", 3: "12345^^^HOSP^MR", 5: "DOE^JOHN", 7: "19700101", 8: "M",
                      11: "1 Main St^^Austin^TX^78701"})
PV1 = segment("PV1", {1: "1", 2: "E", 3: "ED^12^1^HOSP_A"})


def orc(control: str = "NW", filler: str = "") -> str:
    return segment("ORC", {1: control, 2: "PL1", 3: filler})


def obr(accession: str = "ACC1", priority: str = "S", reason: str = "R51^Headache, sudden onset^I10") -> str:
    return segment("OBR", {1: "1", 2: "PL1", 4: "CTHEAD^CT head without contrast^L", 16: "DR1^Smith^Jane",
                           18: accession, 27: f"^^^^^{priority}", 31: reason})


def message(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode()


def orm(accession: str = "ACC1", control_id: str = "MSG1", **kw: str) -> bytes:
    return message(msh(control_id), PID, PV1, orc(), obr(accession, **kw))


def framed(payload: bytes) -> bytes:
    return VT + payload + FS_CR


# ---------------------------------------------------------------- an MLLP sender


class Sender:
    """A raw-socket MLLP client: it sends whatever bytes a test wants."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def send(self, data: bytes, *, half_close: bool = False) -> bytes:
        self.sock.sendall(data)
        if half_close:
            self.sock.shutdown(socket.SHUT_WR)
        return self.answer()

    def answer(self) -> bytes:
        while FS_CR not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the gateway closed the connection without answering"
            self.buffer += chunk
        frame, _, self.buffer = self.buffer.partition(FS_CR)
        assert frame.startswith(VT), frame
        return frame[1:]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Answer:
    ack: str
    control_id: str
    text: str
    error_code: str | None
    error_text: str | None


def parse_ack(raw: bytes) -> Answer:
    ack = hl7.parse(raw.decode("utf-8"))
    assert str(ack.segment("MSH")(9)).startswith("ACK")
    msa = ack.segment("MSA")
    err = ack.segments("ERR")[0] if any(str(s[0]) == "ERR" for s in ack) else None

    def text(seg, n: int) -> str:
        return ack.unescape(str(seg(n))) if len(seg) > n else ""

    return Answer(
        ack=str(msa(1)), control_id=str(msa(2)), text=text(msa, 3),
        error_code=str(err(3)(1)(1)) if err is not None else None,
        error_text=text(err, 8) if err is not None else None,
    )


# ---------------------------------------------------------------- the gateway process


@dataclass
class Gateway:
    settings: Settings
    proc: subprocess.Popen
    pid: int
    letters: list[DeadLetter]
    consumer: Consumer

    def dead_letter_with(self, raw: bytes, timeout_s: float = 15) -> DeadLetter:
        """The dead letter whose payload (inline or by blob URI) is ``raw``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for letter in self.letters:
                if letter.payload == raw or (letter.payload_uri and _blob(letter.payload_uri) == raw):
                    return letter
            assert time.monotonic() < deadline, f"no dead letter for {raw[:60]!r}; got {[l.reason for l in self.letters]}"
            msg = self.consumer.poll(0.2)
            if msg is not None and not msg.error():
                self.letters.append(Codec().decode(msg.value(), DeadLetter))

    def orders(self, *control_ids: str, timeout_s: float = 15) -> dict[str, OrderReceived]:
        """The events on order.received of the messages with these MSH-10 control ids."""
        return self.events(ORDER_RECEIVED, *control_ids, timeout_s=timeout_s)

    def patient_updates(self, *control_ids: str, timeout_s: float = 15) -> dict[str, PatientUpdated]:
        """The events on patient.updated of the ADT messages with these MSH-10 control ids."""
        return self.events(PATIENT_UPDATED, *control_ids, timeout_s=timeout_s)

    def events(self, topic: TopicSpec, *control_ids: str, timeout_s: float = 15) -> dict[str, Any]:
        """The events on ``topic`` of the messages with these MSH-10 control ids."""
        consumer = _consumer(self.settings, topic.name(self.settings))
        out: dict[str, Any] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while not set(control_ids) <= set(out) and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is not None and not msg.error():
                    event = Codec().decode(msg.value(), topic.event)
                    out[event.control_id] = event
        finally:
            consumer.close()
        return out


def _blob(uri: str) -> bytes | None:
    path = Path(unquote(urlsplit(uri).path))
    return path.read_bytes() if path.exists() else None


def _consumer(settings: Settings, topic: str) -> Consumer:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"t-{time.time()}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.kafka.partitions)])
    return consumer


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("hl7")
    for name in [n for n in os.environ if n.startswith("RADSTREAM_")]:
        os.environ.pop(name)
    settings = load_settings(
        data_dir=tmp / "data",
        kafka={"embedded_port": procs.free_port(), "partitions": 2, "topic_prefix": f"h{os.getpid()}",
               "storage": "memory://tansu/", "produce_timeout_s": 5},
        blobs={"backend": "local"},
        hl7={"port": procs.free_port(), "max_message_bytes": MAX_BYTES, "site_map": "HOSP_A=SITE_A",
             "site_states": "SITE_A=NV"},
        metrics={"gateway_port": 0, "worker_port": 0, "hl7_gateway_port": 0},
    )
    broker = procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, "memory://tansu/",
                               log_path=tmp / "tansu.log")
    proc = None
    try:
        ensure_topics(settings)
        env = {**os.environ, **settings.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
        proc = procs.spawn(procs.python_module("gateways.hl7_mllp"), env=env, log_path=tmp / "gateway.log")
        procs.wait_for_port("127.0.0.1", settings.hl7.port, 30, proc)
        consumer = _consumer(settings, DEAD_LETTER.name(settings))
        yield Gateway(settings, proc, proc.pid, [], consumer)
        consumer.close()
    finally:
        if proc is not None:
            procs.stop(proc, grace_s=5)
        procs.stop(broker, grace_s=1)


# ---------------------------------------------------------------- accepted messages


def test_stat_order_is_acked_only_once_on_kafka_with_site_and_clinical_context(gateway: Gateway) -> None:
    sender = Sender(gateway.settings.hl7.port)
    try:
        answer = parse_ack(sender.send(framed(orm("ACC-OK-1", "CTRL-OK-1"))))
    finally:
        sender.close()
    assert (answer.ack, answer.control_id, answer.error_code) == ("AA", "CTRL-OK-1", None)
    order = gateway.orders("CTRL-OK-1")["CTRL-OK-1"]
    assert order.accession_number == "ACC-OK-1" and order.message_type == "ORM^O01" and order.order_control == "NW"
    assert order.priority == "S" and order.reason_for_exam == "Headache, sudden onset"
    assert order.source_site == "SITE_A" and order.patient_state == "NV"  # MSH-4 mapped; the site's state
    assert order.ordering_provider == "Smith^Jane" and order.procedure_code == "CTHEAD"
    assert order.patient_id == "12345" and order.patient_name == "DOE^JOHN" and order.patient_location == "ED^12^1^HOSP_A"


def test_latin1_declared_in_msh18_and_an_adt_update_are_accepted(gateway: Gateway) -> None:
    latin1 = ("\r".join([msh("CTRL-L1", charset="8859/1"), segment("PID", {3: "777", 5: "MÜLLER^JÖRG"}), orc(),
                         obr("ACC-L1", priority="R", reason="^Schädel")]) + "\r").encode("latin-1")
    adt = message(msh("CTRL-ADT", "ADT^A08"), PID, PV1)
    sender = Sender(gateway.settings.hl7.port)
    try:
        answers = [parse_ack(sender.send(framed(latin1))), parse_ack(sender.send(framed(adt)))]
    finally:
        sender.close()
    assert [(a.ack, a.control_id) for a in answers] == [("AA", "CTRL-L1"), ("AA", "CTRL-ADT")]
    orders = gateway.orders("CTRL-L1")
    assert orders["CTRL-L1"].patient_name == "MÜLLER^JÖRG" and orders["CTRL-L1"].reason_for_exam == "Schädel"
    update = gateway.patient_updates("CTRL-ADT")["CTRL-ADT"]
    assert isinstance(update, PatientUpdated)
    assert update.message_type == "ADT^A08" and update.patient_id == "12345"  # PID-3 of PID: 12345^^^HOSP^MR


# ---------------------------------------------------------------- the malformed corpus


@dataclass(frozen=True)
class Bad:
    """One malformed input and the exact answer it must get."""

    raw: bytes  # the bytes on the wire
    ack: str  # MSA-1
    code: str  # ERR-3.1, HL7 table 0357
    reason: str  # dead letter reason
    error: str  # MSA-3 (first 80 characters), ERR-8 and the dead letter's error
    half_close: bool = False  # the sender closes its side after sending


def _corpus() -> dict[str, Bad]:
    ok = orm()
    non_utf8 = message(msh("CTRL-U8"), segment("PID", {3: "1", 5: "MUELLER"}), orc(), obr("ACC-U8"))
    non_utf8 = non_utf8.replace(b"MUELLER", b"M\xfcller")  # latin-1 bytes, no MSH-18
    bad_byte = non_utf8.index(b"\xfc")
    oversized = framed(message(msh("CTRL-BIG"), PID, orc(), obr("ACC-BIG", reason="X" * 70_000)))
    fs_in_name = framed(message(msh("CTRL-FS"), PID.replace("DOE^JOHN", "DOE\x1cMALLORY^JOHN"), PV1, orc(),
                                obr("ACC-FS")))
    return {
        "no start block": Bad(ok + FS_CR, "AR", "100", "bad_framing", "bad MLLP framing: no VT (0x0B) start block"),
        "junk before start block": Bad(b"junk" + framed(ok), "AR", "100", "bad_framing",
                                       "bad MLLP framing: 4 bytes before the VT (0x0B) start block"),
        "two start blocks": Bad(VT + ok + framed(ok), "AR", "100", "bad_framing",
                                "bad MLLP framing: a VT (0x0B) start block inside the message"),
        "connection closed inside a block": Bad(VT + orm("ACC-CUT"), "AR", "100", "bad_framing",
                                                "connection closed inside an MLLP block (no FS CR end block)",
                                                half_close=True),
        "block over the size limit": Bad(oversized, "AR", "100", "bad_framing",
                                         f"MLLP block of {len(oversized)} bytes exceeds the {MAX_BYTES}-byte limit"),
        "empty block": Bad(framed(b""), "AR", "100", "empty_message", "empty HL7 message"),
        # found by load.fuzz_gateways: separators Python counts as whitespace (0x1C-0x1F), none as bytes did
        "only an information separator": Bad(framed(b"\x1f\r"), "AR", "100", "empty_message", "empty HL7 message"),
        "not HL7 at all": Bad(framed(b"hello world"), "AR", "100", "no_msh",
                              "message does not start with an MSH segment (starts 'hello world')"),
        "bad encoding characters": Bad(framed(orm().replace(b"MSH|^~\\&", b"MSH|^^\\&")), "AR", "102",
                                       "bad_encoding_characters",
                                       "MSH-1/MSH-2 '|^^\\\\&' are not five distinct separator characters"),
        "no control id": Bad(framed(orm(control_id="")), "AR", "101", "missing_control_id",
                             "MSH-10 message control id is empty"),
        "unsupported message type": Bad(framed(message(msh("CTRL-ORU", "ORU^R01"), PID)), "AR", "200",
                                        "unsupported_message_type",
                                        "message type ORU^R01 is not accepted (accepted: ORM^O01,ADT^A01,ADT^A04,"
                                        "ADT^A05,ADT^A08,ADT^A31)"),
        "unsupported event": Bad(framed(message(msh("CTRL-O02", "ORM^O02"), PID)), "AR", "201",
                                 "unsupported_message_type",
                                 "message type ORM^O02 is not accepted (accepted: ORM^O01,ADT^A01,ADT^A04,"
                                 "ADT^A05,ADT^A08,ADT^A31)"),
        "unsupported processing id": Bad(framed(message(msh("CTRL-X", processing="X"), PID, orc(), obr())), "AR",
                                         "202", "unsupported_processing_id",
                                         "MSH-11 processing id 'X' is not P, T or D"),
        "unsupported version": Bad(framed(message(msh("CTRL-V3", version="3.0"), PID, orc(), obr())), "AR", "203",
                                   "unsupported_version", "MSH-12 version '3.0' is not HL7 v2.3 to v2.9"),
        "missing PID": Bad(framed(message(msh("CTRL-NOPID"), orc(), obr("ACC-NOPID"))), "AE", "100",
                           "missing_segment", "required segment PID is missing"),
        "missing ORC": Bad(framed(message(msh("CTRL-NOORC"), PID, obr("ACC-NOORC"))), "AE", "100",
                           "missing_segment", "OBR before any ORC segment (ORM^O01 requires ORC first)"),
        "missing OBR": Bad(framed(message(msh("CTRL-NOOBR"), PID, orc())), "AE", "100", "missing_segment",
                           "required segment OBR is missing in order 1"),
        "missing accession number": Bad(framed(message(msh("CTRL-NOACC"), PID, orc(), obr(""))), "AE", "101",
                                        "missing_accession",
                                        "order 1 has no accession number (OBR-18, OBR-3 and ORC-3 are empty)"),
        "text not UTF-8": Bad(framed(non_utf8), "AE", "102", "bad_charset",
                              f"text is not valid UTF-8 at byte {bad_byte} (MSH-18: none, so UTF-8)"),
        "unsupported character set": Bad(framed(message(msh("CTRL-CS", charset="ISO IR87"), PID, orc(), obr())),
                                         "AE", "103", "unsupported_charset",
                                         "MSH-18 character set 'ISO IR87' is not supported (supported: "
                                         "'UNICODE UTF-8', 'ASCII', '8859/1', '8859/15')"),
        "unknown order control": Bad(framed(message(msh("CTRL-ZZ"), PID, orc("ZZ"), obr("ACC-ZZ"))), "AE", "103",
                                     "bad_order_control",
                                     "ORC-1 order control 'ZZ' is not an HL7 table 0119 code this gateway handles"),
        "invalid ZDS study UID": Bad(framed(message(msh("CTRL-ZDS"), PID, orc(), obr("ACC-ZDS"),
                                                    "ZDS|abc.def^RIS^Application^DICOM")), "AE", "102",
                                     "bad_study_uid",
                                     "ZDS-1 study instance UID 'abc.def' is not a valid DICOM UID (PS3.5 9.1)"),
        "segment without id": Bad(framed(message(msh("CTRL-SEG"), PID, "@@@|junk", orc(), obr())), "AE", "100",
                                  "bad_segment", "segment 3 does not start with a segment id ('@@@|junk')"),
        # issue #14 (l): one ACK for two messages filed both orders under the first control id and patient
        "two messages in one block": Bad(framed(orm("ACC-TWO-1", "CTRL-TWO-1") + orm("ACC-TWO-2", "CTRL-TWO-2")),
                                         "AR", "100", "several_messages",
                                         "one MLLP block holds 2 messages (MSH/BHS/FHS at segments 1, 6); "
                                         "send one message per block (HL7 v2.5 C.4.1)"),
        # (i): ORC OBR OBR OBR was AA with only the last OBR published
        "one ORC with three OBRs": Bad(framed(message(msh("CTRL-OBRS"), PID, PV1, orc(), obr("ACC-OBR-1"),
                                                      obr("ACC-OBR-2"), obr("ACC-OBR-3"))), "AE", "100",
                                       "segment_sequence",
                                       "order 1 has a second OBR segment: one OBR per ORC "
                                       "(ORM^O01 ORDER group, HL7 v2.5 4.4.1)"),
        # (j): the end-block byte inside a patient name was published in it
        "FS end-block byte inside a field": Bad(fs_in_name, "AR", "100", "bad_framing",
                                                "bad MLLP framing: an FS (0x1C) end-block byte inside the message "
                                                f"at byte {fs_in_name.index(FS_CR[:1])}"),
        # (k): data types of the fields radstream reads
        "impossible birth date": Bad(framed(message(msh("CTRL-DOB"), PID.replace("19700101", "19701332"), PV1, orc(),
                                                    obr("ACC-DOB"))), "AE", "102", "bad_data_type",
                                     "PID-7 date/time of birth '19701332' is not a valid DTM "
                                     "(YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])"),
        "MSH-7 is not a date/time": Bad(framed(orm("ACC-YDAY", "CTRL-YDAY").replace(b"20250101120000", b"yesterday")),
                                        "AE", "102", "bad_data_type",
                                        "MSH-7 date/time of message 'yesterday' is not a valid DTM "
                                        "(YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])"),
        "sex not in table 0001": Bad(framed(message(msh("CTRL-SEX"), PID.replace("|M|", "|Q|"), PV1, orc(),
                                                    obr("ACC-SEX"))), "AE", "103", "bad_table_value",
                                     "PID-8 administrative sex 'Q' is not in HL7 table 0001 (A, F, M, N, O, U)"),
        "priority not in table 0485": Bad(framed(orm("ACC-PRIO", "CTRL-PRIO", priority="ZZ")), "AE", "103",
                                          "bad_table_value",
                                          "order 1 priority (TQ1-9 / OBR-27.6 / ORC-7.6) 'ZZ' is not in HL7 table "
                                          "0485 (A, C, P, PRN, R, S, T)"),
        "ADT without patient id": Bad(framed(message(msh("CTRL-ADT0", "ADT^A08"), segment("PID", {5: "DOE^JANE"}))),
                                      "AE", "101", "missing_patient_id", "PID-3 patient identifier is empty"),
    }


CORPUS = _corpus()


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_input_gets_its_failure_answer_and_a_dead_letter(gateway: Gateway, case: str) -> None:
    bad = CORPUS[case]
    sender = Sender(gateway.settings.hl7.port)
    try:
        answer = parse_ack(sender.send(bad.raw, half_close=bad.half_close))
        if not bad.half_close:  # the connection resynchronises: the next order is accepted
            follow_up = parse_ack(sender.send(framed(orm("ACC-NEXT", f"NEXT-{case}"))))
            assert (follow_up.ack, follow_up.control_id) == ("AA", f"NEXT-{case}")
    finally:
        sender.close()
    assert (answer.ack, answer.error_code) == (bad.ack, bad.code), answer
    assert answer.text == bad.error[:80] and answer.error_text == bad.error
    letter = gateway.dead_letter_with(bad.raw)
    assert (letter.stage, letter.reason, letter.error) == ("hl7-mllp", bad.reason, bad.error)
    if len(bad.raw) > 64 * 1024:
        assert letter.payload is None and letter.payload_uri and "/rejected/hl7/" in letter.payload_uri
    else:
        assert letter.payload == bad.raw and letter.payload_uri is None


def test_refused_messages_published_no_order(gateway: Gateway) -> None:
    """Issue #14 (i)(j)(k)(l): a refusal means nothing of the message reached order.received."""
    refused = ["CTRL-TWO-1", "CTRL-TWO-2", "CTRL-OBRS", "CTRL-FS", "CTRL-DOB", "CTRL-YDAY", "CTRL-SEX", "CTRL-PRIO"]
    assert set(gateway.orders(*refused, timeout_s=3)) & set(refused) == set()


def test_the_gateway_process_survived_the_corpus_without_restart(gateway: Gateway) -> None:
    assert len(CORPUS) >= 15
    assert gateway.proc.poll() is None and gateway.proc.pid == gateway.pid
    sender = Sender(gateway.settings.hl7.port)
    try:
        assert parse_ack(sender.send(framed(orm("ACC-LAST", "CTRL-LAST")))).ack == "AA"
    finally:
        sender.close()


# ---------------------------------------------------------------- broker down, bad start


def test_broker_down_answers_AR_so_the_sender_retries(settings: Settings) -> None:
    """No broker at all: nothing can be published, the sender gets AR with code 207."""
    down = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"produce_timeout_s": 1.0})})

    async def exchange() -> bytes:
        publisher = EventPublisher(down)
        server = await start_listener(down, Hl7Handler(down, publisher), port=0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(framed(orm("ACC-DOWN", "CTRL-DOWN")))
            raw = await asyncio.wait_for(reader.readuntil(FS_CR), 20)
            writer.close()
            return raw[1:-2]
        finally:
            server.close()
            await server.wait_closed()
            publisher.close(timeout_s=0)

    answer = parse_ack(asyncio.run(exchange()))
    assert (answer.ack, answer.control_id, answer.error_code) == ("AR", "CTRL-DOWN", "207")
    assert answer.text.startswith("broker unavailable, retry later: no acknowledgement from")


def test_a_framing_fault_is_answered_AR_even_when_its_dead_letter_cannot_be_published(settings: Settings) -> None:
    publisher = EventPublisher(settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"produce_timeout_s": 0.5})}))
    try:
        answer = parse_ack(Hl7Handler(settings, publisher).handle(Frame(b"MSH|x", "bad MLLP framing: test")))
    finally:
        publisher.close(timeout_s=0)
    assert (answer.ack, answer.error_code, answer.text) == ("AR", "100", "bad MLLP framing: test")


def test_main_exits_2_with_a_clear_message_on_a_taken_port_or_a_bad_setting(settings: Settings) -> None:
    base = {**os.environ, **settings.to_env()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**base, "RADSTREAM_HL7_PORT": str(taken.getsockname()[1])}
        busy = subprocess.run([sys.executable, "-m", "gateways.hl7_mllp"], env=env, capture_output=True, text=True,
                              timeout=60)
    assert busy.returncode == 2 and "the HL7 MLLP gateway cannot listen on" in busy.stderr
    bad = subprocess.run([sys.executable, "-m", "gateways.hl7_mllp"], env={**base, "RADSTREAM_HL7_MESSAGE_TYPES": "x"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "hl7.message_types" in bad.stderr and "RADSTREAM_HL7_MESSAGE_TYPES" in bad.stderr
