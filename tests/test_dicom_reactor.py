"""pynetdicom's reactors, made event-driven by :mod:`gateways.dicom_reactor`: they still
answer, release and abort, and an idle association no longer wakes them every millisecond."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from gateways import dicom_reactor
from radstream import procs


class _Counting:
    """Counts the reactor waits (each is one wake-up of a reactor thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.waits = 0
        self._lock = threading.Lock()
        for name in ("_dul_wait", "_assoc_wait"):
            original = getattr(dicom_reactor, name)

            def counted(owner, timeout_s, _original=original):
                with self._lock:
                    self.waits += 1
                return _original(owner, timeout_s)

            monkeypatch.setattr(dicom_reactor, name, counted)
        # the module-level _ReactorTime objects hold the functions they were made with
        from pynetdicom import association, dul

        monkeypatch.setattr(dul.time, "_wait", dicom_reactor._dul_wait)
        monkeypatch.setattr(association.time, "_wait", dicom_reactor._assoc_wait)


@pytest.fixture
def scp():
    dicom_reactor.install()
    stored = []

    def on_store(event):
        stored.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE("REACTOR_SCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage)
    port = procs.free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, stored
    finally:
        server.shutdown()


def test_an_association_answers_stores_and_releases(scp) -> None:
    port, stored = scp
    ae = AE("REACTOR_SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="REACTOR_SCP")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    for _ in range(3):
        assert assoc.send_c_store(dataset).Status == 0x0000
    started = time.monotonic()
    assoc.release()
    assert assoc.is_released
    assert time.monotonic() - started < 5  # released, not left to a timeout
    assert stored == [dataset.SOPInstanceUID] * 3


def test_an_abort_ends_the_association(scp) -> None:
    port, _ = scp
    ae = AE("REACTOR_SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="REACTOR_SCP")
    assert assoc.is_established
    assoc.abort()
    assert assoc.is_aborted
    # the SCP's side of it ends too: a new association is served afterwards
    again = ae.associate("127.0.0.1", port, ae_title="REACTOR_SCP")
    assert again.is_established and again.send_c_echo().Status == 0x0000
    again.release()


def test_an_idle_association_waits_instead_of_polling(scp, monkeypatch) -> None:
    """Four reactor threads (two per side) of one idle association: pynetdicom's own loops
    wake about 1,000 times a second each; these wake on their 50 ms timeout at most."""
    port, _ = scp
    ae = AE("REACTOR_SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="REACTOR_SCP")
    assert assoc.is_established
    counting = _Counting(monkeypatch)
    time.sleep(1.0)
    waits = counting.waits
    assoc.release()
    assert assoc.is_released
    # every reactor thread waited (so its sleeps go through the event-driven wait) ...
    assert waits >= 4, waits
    # ... and woke on the timeout, not every millisecond (4 threads x 20/s, with slack)
    assert waits < 4 * (1.0 / dicom_reactor.MAX_WAIT_S) * 2, waits


class _CountingSocket:
    """One end of a socket pair whose ``recv_into`` calls are counted."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.calls = 0

    def recv_into(self, buffer) -> int:
        self.calls += 1
        return self.sock.recv_into(buffer)


def _pair_with_sender(payload: bytes, close_after: bool = True):
    import socket

    ours, theirs = socket.socketpair()

    def send() -> None:
        theirs.sendall(payload)
        if close_after:
            theirs.close()

    sender = threading.Thread(target=send)
    sender.start()
    return ours, theirs, sender


def test_a_pdu_is_read_in_a_few_calls_not_4_kB_at_a_time() -> None:
    """pynetdicom's recv asks for 4,096 bytes a call: 600 kB would be 147 calls."""
    payload = bytes(range(256)) * 2400  # 614,400 bytes, patterned so an offset error shows
    ours, theirs, sender = _pair_with_sender(payload, close_after=False)
    counted = _CountingSocket(ours)
    try:
        data = dicom_reactor.read_exactly(counted, len(payload))
    finally:
        sender.join()
        ours.close()
        theirs.close()
    assert bytes(data) == payload
    assert counted.calls < 147 // 4, counted.calls


def test_the_buffer_grows_past_its_first_size(monkeypatch) -> None:
    monkeypatch.setattr(dicom_reactor, "FIRST_READ_BYTES", 1000)
    payload = bytes(range(256)) * 20  # 5,120 bytes: 1,000 then doubled to 2,000, 4,000, then 5,120
    ours, theirs, sender = _pair_with_sender(payload, close_after=False)
    try:
        assert bytes(dicom_reactor.read_exactly(ours, len(payload))) == payload
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_a_declared_length_is_not_allocated_before_its_bytes_arrive() -> None:
    """A hostile A-ASSOCIATE or P-DATA header may declare 4 GiB (the maximum PDU size is
    unlimited) and send 10 bytes: the read returns those 10 once the peer closes,
    having allocated at most the first buffer, as pynetdicom's own read returns short."""
    import tracemalloc

    ours, theirs, sender = _pair_with_sender(b"0123456789")
    tracemalloc.start()
    try:
        data = dicom_reactor.read_exactly(ours, 0xFFFFFFFF)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sender.join()
        ours.close()
    assert bytes(data) == b"0123456789"
    assert peak < 2 * dicom_reactor.FIRST_READ_BYTES, peak
