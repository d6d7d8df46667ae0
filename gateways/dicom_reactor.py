"""Event-driven waits and whole-PDU reads for pynetdicom's two reactors.

pynetdicom runs two threads per association, and both poll: the DUL reactor sleeps
1 ms whenever a pass found nothing to do (``DULServiceProvider._run_loop_delay``, with
its own "TODO: try and make this event based"), and the association reactor sleeps
1 ms before every pass (``Association._run_reactor``). Each wake takes the GIL. Measured
on the 2-core dev machine (2026-12-07): four idle associations cost the SCP process
0.33 CPU cores, and under load the wakes compete for the GIL with the threads that are
receiving, hashing and uploading instances.

:func:`install` makes both waits block until there is something to do:

- the DUL reactor waits in ``select()`` on the association's socket and on a wake-up
  pipe, written whenever another thread queues a primitive to send
  (``to_provider_queue``) or a state-machine event (``event_queue``);
- the association reactor waits on a :class:`threading.Event`, set whenever the DUL
  hands it a primitive (``to_user_queue``: a release or abort request) or the DIMSE
  provider a decoded message (``msg_queue``).

Both waits still time out after :data:`MAX_WAIT_S`, so what the reactors check by
polling alone (the ARTIM and network timers, a DUL thread that died, a kill flag) is
seen within that time. Only the two reactor sleeps change: every other
``time.sleep`` of those modules (an SCU waiting on a paused reactor, ``stop_dul``)
behaves as before, and a pynetdicom whose reactors are named differently simply
keeps polling.

It also replaces ``AssociationSocket.recv``, with which the DUL reactor reads each PDU:
pynetdicom's reads 4,096 bytes per ``socket.recv`` call, so a 526 kB CT slice took ~130
calls, each a bytes object, a ``bytearray.extend`` and a GIL release and re-take while
three other associations' threads wanted it. :func:`read_exactly` reads into one buffer
with ``recv_into`` for as much as the socket holds. The buffer grows with what arrives,
never to a PDU length the peer merely declared (up to 4 GiB when, as here, the
maximum PDU size is unlimited).

And it encodes each plain C-STORE-RSP directly (:func:`gateways.dicom_wire.encode_c_store_rsp`):
pynetdicom builds the response's command set as a pydicom data set, encodes it twice (once
for its group length) and cuts it into fragments, ~0.8 ms per response on the 2-core dev
machine for ~150 bytes. Responses with optional status elements (a failure's Error Comment
or Offending Element), responses some handler watches (``EVT_DIMSE_SENT``, bound when
pynetdicom logs at DEBUG) and every other message still go pynetdicom's way.

Last, the DUL reactor no longer dies of what a peer sends: pynetdicom calls its state machine
outside the handler that aborts on errors, so a response meeting an association the peer had
just broken (or a command set without its Command Field) ended the thread with a traceback.
:func:`_end_broken_association` ends such an association as that handler would.
"""

from __future__ import annotations

import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

#: The longest either reactor waits without a wake-up (its timers' granularity).
MAX_WAIT_S = 0.05
#: The most :func:`read_exactly` allocates before the bytes arrive to fill it.
FIRST_READ_BYTES = 1 << 20

_installed = False
_install_lock = threading.Lock()


class _WakingQueue(queue.Queue):
    """A queue that calls ``wake`` after every put (``put_nowait`` goes through ``put``)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _swap(old: queue.Queue, wake: Callable[[], None]) -> _WakingQueue:
    new = _WakingQueue(wake)
    while True:  # nothing should be queued yet at construction; keep it if there is
        try:
            new.queue.append(old.get_nowait())
        except queue.Empty:
            return new


class _WakePipe:
    """A non-blocking pipe one thread waits on and any thread writes to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self._pending = False  # a byte is in the pipe that the waiter has not drained yet

    def wake(self) -> None:
        with self._lock:  # never write to a closed (and perhaps reused) descriptor
            if self._pending or self._closed:
                return  # the waiter wakes for the byte already there, then sees this put too
            self._pending = True
            try:
                os.write(self._write_fd, b"\0")
            except BlockingIOError:  # full: a wake-up is pending anyway
                pass

    def drain(self) -> None:
        with self._lock:  # cleared before reading: a wake from now on writes again
            self._pending = False
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.read_fd)
                os.close(self._write_fd)


def _association_event(assoc: Any) -> threading.Event:
    event = assoc.__dict__.get("_radstream_wake")
    if event is None:
        event = assoc.__dict__.setdefault("_radstream_wake", threading.Event())
    return event


def _dul_wait(dul: Any, timeout_s: float) -> None:
    """Block the DUL reactor until its socket is readable, a primitive or event is queued, or ``timeout_s``."""
    pipe: _WakePipe | None = dul.__dict__.get("_radstream_pipe")
    if pipe is None:
        time.sleep(timeout_s)
        return
    waiting = [pipe.read_fd]
    sock = getattr(dul.socket, "socket", None)
    try:
        if sock is not None and sock.fileno() >= 0:
            pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
            if pending is not None and pending():
                return
            waiting.append(sock.fileno())
        select.select(waiting, [], [], timeout_s)
    except (OSError, ValueError):  # the socket closed under us: the next pass sees it
        pass
    pipe.drain()


class _ReactorTime(SimpleNamespace):
    """Stands in for the ``time`` module inside pynetdicom's ``dul`` and ``association``
    modules: ``sleep`` called by a reactor loop waits for work instead."""

    def __init__(self, reactor: str, wait: Callable[[Any, float], None]) -> None:
        super().__init__(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__") and name != "sleep"})
        self._reactor = reactor
        self._wait = wait

    def sleep(self, seconds: float) -> None:
        caller = sys._getframe(1)
        if caller.f_code.co_name == self._reactor:
            owner = caller.f_locals.get("self")
            if owner is not None and owner is threading.current_thread():
                self._wait(owner, MAX_WAIT_S)
                return
        time.sleep(seconds)


def _assoc_wait(assoc: Any, timeout_s: float) -> None:
    event = _association_event(assoc)
    event.wait(timeout_s)
    event.clear()  # before the reactor's checks, so a put after them wakes the next wait


def read_exactly(sock: Any, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from ``sock``, or fewer if the peer closed the connection first.

    What pynetdicom's ``AssociationSocket.recv`` returns, in as few calls as the socket
    allows: each ``recv_into`` takes all the socket holds, up to what is still missing.
    The buffer starts at :data:`FIRST_READ_BYTES` at most and doubles as it fills.
    """
    buffer = bytearray(min(nr_bytes, FIRST_READ_BYTES))
    received = 0
    while received < nr_bytes:
        if received == len(buffer):
            buffer += bytearray(min(nr_bytes - received, len(buffer)))
        with memoryview(buffer) as whole, whole[received:] as rest:
            count = sock.recv_into(rest)
        if not count:
            break
        received += count
    del buffer[received:]
    return buffer


def _association_socket_recv(self: Any, nr_bytes: int) -> bytearray:
    return read_exactly(self.socket, nr_bytes)


def install() -> None:
    """Make pynetdicom's reactors event-driven, and their reads whole, in this process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from pynetdicom import association, dimse, dul, transport

        dul_init = dul.DULServiceProvider.__init__
        run_reactor = dul.DULServiceProvider.run_reactor
        dimse_init = dimse.DIMSEServiceProvider.__init__

        def dul_init_waking(self: Any, assoc: Any) -> None:
            dul_init(self, assoc)
            pipe = self.__dict__["_radstream_pipe"] = _WakePipe()
            self.event_queue = _swap(self.event_queue, pipe.wake)
            self.to_provider_queue = _swap(self.to_provider_queue, pipe.wake)
            self.to_user_queue = _swap(self.to_user_queue, _association_event(assoc).set)

        def run_reactor_closing(self: Any) -> None:
            try:
                run_reactor(self)
            except Exception as exc:  # noqa: BLE001  (any: the thread would die with the association half-open)
                _end_broken_association(self, exc)
            finally:
                pipe = self.__dict__.get("_radstream_pipe")
                if pipe is not None:
                    pipe.close()

        def dimse_init_waking(self: Any, assoc: Any) -> None:
            dimse_init(self, assoc)
            self.msg_queue = _swap(self.msg_queue, _association_event(assoc).set)

        dimse.DIMSEServiceProvider.send_msg = _direct_store_responses(dimse.DIMSEServiceProvider.send_msg)
        dul.DULServiceProvider.__init__ = dul_init_waking
        dul.DULServiceProvider.run_reactor = run_reactor_closing
        dimse.DIMSEServiceProvider.__init__ = dimse_init_waking
        dul.time = _ReactorTime("run_reactor", _dul_wait)
        association.time = _ReactorTime("_run_reactor", _assoc_wait)
        transport.AssociationSocket.recv = _association_socket_recv
        _installed = True


def _end_broken_association(dul: Any, error: Exception) -> None:
    """End an association whose state machine failed on what the peer sent.

    pynetdicom's DUL reactor calls its state machine outside the handler that aborts on
    errors (``DULServiceProvider.run_reactor``), so an exception there ended the thread with
    a traceback and left the association half-open until the association's own thread saw
    it. Peers do it: one that sends P-DATA before our A-ASSOCIATE-AC (it arrives in Sta3,
    the DUL aborts, AA-8 to Sta13, and the gateway's own accept, Evt7, then finds Sta13:
    ``InvalidEventError``), or a command set without its Command Field (``AttributeError``
    in the DIMSE decoding of DT-2). This does what that handler does: one line in the log,
    an A-ABORT unless one was sent already (Sta13, PS3.8 9.2.3, waits only for the close),
    and the connection closed.
    """
    import logging

    from pynetdicom.pdu import A_ABORT_RQ

    state = getattr(dul.state_machine, "current_state", None)
    logging.getLogger("radstream.gateways.dicom_scp").warning(
        "association aborted: what the peer sent broke pynetdicom's state machine in %s (%s: %s)",
        state, type(error).__name__, error)
    if dul.socket is not None and state != "Sta13":
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, 0x00  # service provider, reason not specified
        try:
            dul.socket.send(abort.encode())
        except Exception:  # noqa: BLE001  (the peer is gone already)
            pass
    dul.assoc.is_aborted, dul.assoc.is_established = True, False
    dul.assoc._kill = True
    dul._kill_thread = True
    if dul.socket is not None:
        dul.socket.close()


def _direct_store_responses(send_msg: Callable[..., None]) -> Callable[..., None]:
    """``DIMSEServiceProvider.send_msg``, sending a plain C-STORE-RSP as one P-DATA it encodes itself."""
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    from gateways.dicom_wire import encode_c_store_rsp

    # the status elements a response may carry (PS3.7 9.1.1.1.9), which the direct encoding leaves out
    optional = C_STORE.STATUS_OPTIONAL_KEYWORDS

    def send(self: Any, primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status is not None and primitive.AffectedSOPClassUID
                and primitive.AffectedSOPInstanceUID and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
                and all(getattr(primitive, keyword) is None for keyword in optional)):
            try:
                command = encode_c_store_rsp(primitive.MessageIDBeingRespondedTo, str(primitive.AffectedSOPClassUID),
                                             str(primitive.AffectedSOPInstanceUID), primitive.Status)
            except ValueError:
                command = b""
            limit = self.maximum_pdu_size
            if command and (not limit or len(command) <= limit - 6):  # one PDV: its 6-byte header (PS3.8 9.3.5.1)
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
                self.dul.send_pdu(pdata)
                return
        send_msg(self, primitive, context_id)

    return send
