"""Synthetic traffic sent through the real gateways, and what the warehouse says became of it.

:class:`TrafficRunner` paces a plan (:mod:`radstream.traffic`): a scheduler thread hands each
study to a pool of sender threads when it is due, so a slow association delays its own study,
not the schedule. A study's images go as a modality or PACS sends them: DICOM C-STORE over one
association per study (PS3.4 Annex B; the calling AE title is the site), or STOW-RS POSTs of
``multipart/related`` bodies, one per series (PS3.18 10.5, the bearer token names the site).
Its HL7 ORM^O01 goes over MLLP (HL7 v2.5 Appendix C) before the images or after their last
acknowledgement. What is not acknowledged is sent again (``retries``; drawing a study again
gives the same instances). Every study keeps its planned, sent and acknowledged times, its
retries and its failures: a failed instance, POST or order is counted and listed, never
dropped. :mod:`radstream.traffic_report` then finds the studies in the warehouse.
Over 400 lines: the three protocols' senders share the pacing, the retries and the record.
"""

from __future__ import annotations

import heapq
import http.client
import io
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom import Dataset, dcmwrite

from radstream.traffic import OrderTiming, PlannedStudy, Spread, Transport
from radstream.traffic_studies import MLLP_END, StudyIdentity, identity_for, order_message, run_token, study_instances
from schemas.settings import Settings



# ---------------------------------------------------------------- where to send


@dataclass(frozen=True)
class Targets:
    """The gateways' addresses and each site's credentials there."""

    host: str
    dicom_port: int
    called_ae: str
    hl7_port: int
    stow_url: str  # scheme://host:port of the STOW-RS gateway
    ae_titles: Mapping[str, str] = field(default_factory=dict)  # site -> calling AE (default: the site)
    facilities: Mapping[str, str] = field(default_factory=dict)  # site -> MSH-4 (default: the site)
    stow_tokens: Mapping[str, str] = field(default_factory=dict)  # site -> bearer token
    stow_ca: str | None = None  # CA bundle for an HTTPS gateway
    timeout_s: float = 30.0

    @classmethod
    def of(cls, settings: Settings, stow_tokens: Mapping[str, str] | None = None) -> Targets:
        """From the runtime's settings: ports, site maps inverted, STOW tokens from ``stow.tokens``."""
        from radstream.supervisor import connect_host

        host = connect_host(settings.bind_host)
        tls = settings.stow.tls_cert is not None and settings.stow.tls_key is not None
        if stow_tokens is None:
            from gateways.stow_rs import load_tokens

            stow_tokens = {site.upper(): token for token, site in load_tokens(settings).items()}
        return cls(
            host=host, dicom_port=settings.dicom.port, called_ae=settings.dicom.ae_title, hl7_port=settings.hl7.port,
            stow_url=f"{'https' if tls else 'http'}://{host}:{settings.stow.port}",
            ae_titles={site.upper(): ae for ae, site in settings.dicom.sites().items()},
            facilities={site.upper(): facility for facility, site in _pairs(settings.hl7.site_map).items()},
            stow_tokens={site.upper(): token for site, token in stow_tokens.items()},
            stow_ca=str(settings.stow.tls_cert) if tls else None,
            timeout_s=min(settings.dicom.dimse_timeout_s, settings.dicom.network_timeout_s))

    def ae_title(self, site: str) -> str:
        return self.ae_titles.get(site.upper(), site)

    def facility(self, site: str) -> str:
        return self.facilities.get(site.upper(), site)


def _pairs(text: str) -> dict[str, str]:
    pairs = (p.partition("=") for p in text.split(",") if "=" in p)
    return {key.strip(): value.strip() for key, _, value in pairs}


# ---------------------------------------------------------------- what happened to each study


@dataclass
class StudyRecord:
    planned: PlannedStudy
    identity: StudyIdentity
    due_at: float = 0.0  # epoch seconds: when the plan wanted its first image
    sent_at: float | None = None  # first image's send began
    acked_at: float | None = None  # last image acknowledged (or failed)
    order_sent_at: float | None = None
    order_acked_at: float | None = None
    instances_acked: int = 0
    failures: list[str] = field(default_factory=list)  # what was never delivered, after the retries
    retries: list[str] = field(default_factory=list)  # what failed and was sent again

    def to_json(self) -> dict[str, Any]:
        p = self.planned
        return {"index": p.index, "study_uid": self.identity.study_uid,
                "accession_number": self.identity.accession_number, "patient_id": self.identity.patient_id,
                "modality": p.modality, "site": p.site,
                "transport": p.transport.value, "instances": p.instances, "instances_acked": self.instances_acked,
                "stat": p.stat, "order": p.order.value, "planned_s": round(p.at_s, 3), "due_at": self.due_at,
                "sent_at": self.sent_at, "acked_at": self.acked_at, "order_sent_at": self.order_sent_at,
                "order_acked_at": self.order_acked_at, "failures": self.failures,
                "retries": self.retries}


@dataclass(frozen=True)
class RunProgress:
    due: int  # studies whose time has come (handed to the senders)
    studies_done: int
    studies: int
    instances_acked: int
    failures: int
    in_flight: int
    elapsed_s: float


@dataclass
class RunReport:
    records: list[StudyRecord]
    started_at: float  # epoch seconds
    finished_at: float

    @property
    def failures(self) -> list[tuple[StudyRecord, str]]:
        return [(r, f) for r in self.records for f in r.failures]

    @property
    def instances_acked(self) -> int:
        return sum(r.instances_acked for r in self.records)

    @property
    def orders_acked(self) -> int:
        return sum(r.order_acked_at is not None for r in self.records)

    def send_window_s(self) -> float:
        """First image sent to last acknowledgement."""
        sent = [r.sent_at for r in self.records if r.sent_at is not None]
        acked = [r.acked_at for r in self.records if r.acked_at is not None]
        return max(acked) - min(sent) if sent and acked else 0.0

    def schedule_lag(self) -> Spread:
        """How late each study's first image went, against the plan."""
        return Spread.of([r.sent_at - r.due_at for r in self.records if r.sent_at is not None])

    def send_time(self) -> Spread:
        """First image sent to last image acknowledged, per study."""
        return Spread.of([r.acked_at - r.sent_at for r in self.records if r.sent_at and r.acked_at])


# ---------------------------------------------------------------- the runner


class TrafficRunner:
    """Send ``studies`` at their planned times through the gateways in ``targets``."""

    def __init__(self, studies: Sequence[PlannedStudy], targets: Targets, templates: Mapping[str, Dataset], *,
                 senders: int = 8, announce_count: bool = True, stow_batch: int = 50, retries: int = 2,
                 retry_delay_s: float = 1.0, on_progress: Callable[[RunProgress], None] | None = None) -> None:
        missing = sorted({s.site for s in studies if s.transport is Transport.STOW
                          and s.site.upper() not in targets.stow_tokens})
        if missing:
            raise ValueError(f"no STOW-RS bearer token for {', '.join(missing)}: pass --stow-token SITE=TOKEN or "
                             f"set stow.tokens (RADSTREAM_STOW_TOKENS=TOKEN=SITE)")
        self.targets, self.templates, self.senders = targets, templates, senders
        self.announce_count, self.stow_batch, self.on_progress = announce_count, stow_batch, on_progress
        self.retries, self.retry_delay_s = retries, retry_delay_s
        token, now = run_token(), datetime.now()
        self.records = [StudyRecord(s, identity_for(s, token, now)) for s in studies]
        self._token = token
        self._local = threading.local()
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None], bool]] = []  # (due, tie-break, task, is a study)
        self._seq = 0
        self._in_flight = 0
        self._due = 0
        self._connections: list[http.client.HTTPConnection] = []

    # -- pacing

    def run(self) -> RunReport:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        start_mono, start_wall = time.monotonic(), time.time()
        for record in self.records:
            record.due_at = start_wall + record.planned.at_s
            self._push(record.planned.at_s, lambda r=record: self._send_images(r, start_mono), study=True)
            if record.planned.order is OrderTiming.BEFORE:
                self._push(record.planned.order_at_s or 0.0, lambda r=record: self._send_order(r))
        last_progress = 0.0
        with ThreadPoolExecutor(self.senders, thread_name_prefix="traffic") as pool:
            while True:
                with self._cond:
                    if not self._heap and self._in_flight == 0:
                        break
                    now = time.monotonic() - start_mono
                    if self._heap and self._heap[0][0] <= now:
                        _, _, task, study = heapq.heappop(self._heap)
                        self._in_flight += 1
                        self._due += study
                        pool.submit(self._run_task, task)
                        continue
                    wait = min(self._heap[0][0] - now if self._heap else 0.5, 0.5)
                    self._cond.wait(max(wait, 0.0))
                if self.on_progress and time.monotonic() - last_progress >= 0.25:
                    last_progress = time.monotonic()
                    self.on_progress(self.progress(start_mono))
        if self.on_progress:
            self.on_progress(self.progress(start_mono))
        self._close_connections()
        return RunReport(self.records, start_wall, time.time())

    def progress(self, start_mono: float) -> RunProgress:
        done = sum(r.acked_at is not None and (r.planned.order is OrderTiming.NONE or r.order_acked_at is not None
                                                or bool(r.failures)) for r in self.records)
        return RunProgress(due=self._due, studies_done=done, studies=len(self.records),
                           instances_acked=sum(r.instances_acked for r in self.records),
                           failures=sum(len(r.failures) for r in self.records), in_flight=self._in_flight,
                           elapsed_s=time.monotonic() - start_mono)

    def _push(self, at_s: float, task: Callable[[], None], study: bool = False) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (at_s, self._seq, task, study))
            self._cond.notify()

    def _run_task(self, task: Callable[[], None]) -> None:
        try:
            task()
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify()

    # -- images

    def _send_images(self, record: StudyRecord, start_mono: float) -> None:
        """Every instance of the study; those not acknowledged are sent again, at most ``retries`` times."""
        record.sent_at = time.time()
        study = record.planned
        acked: set[str] = set()
        send = self._stow if study.transport is Transport.STOW else self._c_store
        for attempt in range(self.retries + 1):
            instances = study_instances(study, record.identity, self.templates[study.modality], self.announce_count)
            try:
                problems = send(record, (ds for ds in instances if str(ds.SOPInstanceUID) not in acked), acked)
            except Exception as exc:  # a bug or an unforeseen failure: counted, never lost
                problems = [f"{type(exc).__name__}: {exc}"]
            record.instances_acked = len(acked)
            if not problems or len(acked) == study.instances:
                break
            if attempt < self.retries:
                record.retries.extend(f"attempt {attempt + 1}: {problem}" for problem in problems)
                time.sleep(self.retry_delay_s)
            else:
                record.failures.extend(problems)
        record.acked_at = time.time()
        if study.order is OrderTiming.AFTER:
            self._push(time.monotonic() - start_mono + study.order_gap_s, lambda: self._send_order(record))

    def _c_store(self, record: StudyRecord, instances: Iterable[Dataset], acked: set[str]) -> list[str]:
        """One association for the study, as a modality sends it (PS3.4 B.2; statuses PS3.7 C)."""
        from pynetdicom import AE, build_context
        from pynetdicom.status import code_to_category
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        from radstream.send import _no_delay, _status_text

        t = self.targets
        template = self.templates[record.planned.modality]
        ae = AE(ae_title=t.ae_title(record.planned.site))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = t.timeout_s
        contexts = [build_context(template.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        assoc = ae.associate(t.host, t.dicom_port, contexts=contexts, ae_title=t.called_ae)
        problems: list[str] = []
        try:
            if not assoc.is_established:
                why = "rejected" if assoc.is_rejected else "refused or aborted"
                return [f"C-STORE: association with {t.called_ae}@{t.host}:{t.dicom_port} {why}"]
            _no_delay(assoc)
            for ds in instances:
                if not assoc.is_established:
                    return [*problems, "C-STORE: association lost before every instance was sent"]
                uid = str(ds.SOPInstanceUID)
                status = assoc.send_c_store(ds)
                if "Status" not in status:
                    problems.append(f"C-STORE {uid}: no response (timeout or abort)")
                    continue
                code = int(status.Status)
                if code_to_category(code) in ("Success", "Warning"):
                    acked.add(uid)
                else:
                    problems.append(f"C-STORE {uid}: 0x{code:04X} {_status_text(code)}")
            assoc.release()
            return problems
        finally:
            if assoc.is_established:
                assoc.abort()
            ae.shutdown()

    def _stow(self, record: StudyRecord, instances: Iterable[Dataset], acked: set[str]) -> list[str]:
        """STOW-RS (PS3.18 10.5): one POST per series, at most ``stow_batch`` instances each."""
        problems: list[str] = []
        batch: list[tuple[str, bytes]] = []
        series = None
        for ds in instances:
            if batch and (ds.SeriesInstanceUID != series or len(batch) >= self.stow_batch):
                problems += self._post(record, batch, acked)
                batch = []
            series = ds.SeriesInstanceUID
            buffer = io.BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            batch.append((str(ds.SOPInstanceUID), buffer.getvalue()))
        if batch:
            problems += self._post(record, batch, acked)
        return problems

    def _post(self, record: StudyRecord, parts: list[tuple[str, bytes]], acked: set[str]) -> list[str]:
        boundary = f"radstream-traffic-{self._token}"
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
                        for _, data in parts) + f"--{boundary}--\r\n".encode()
        headers = {"Authorization": f"Bearer {self.targets.stow_tokens[record.planned.site.upper()]}",
                   "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        try:
            conn = self._http()
            conn.request("POST", "/dicomweb/studies", body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._local.http = None
            return [f"STOW-RS POST of {len(parts)} instances: {type(exc).__name__}: {exc}"]
        if response.status not in (200, 202, 409):
            text = payload[:200].decode(errors="replace")
            return [f"STOW-RS POST of {len(parts)} instances: HTTP {response.status} {text}"]
        failed = _stow_failed(payload) if response.status != 200 else {}
        if response.status == 409 and not failed:
            return [f"STOW-RS POST of {len(parts)} instances: 409 with no FailedSOPSequence"]
        acked.update(uid for uid, _ in parts if uid not in failed)
        return [f"STOW-RS {uid}: FailureReason {reason}" for uid, reason in failed.items()]

    def _http(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "http", None)
        if conn is None:
            scheme, _, rest = self.targets.stow_url.partition("://")
            host, _, port = rest.rpartition(":")
            if scheme == "https":
                context = ssl.create_default_context(cafile=self.targets.stow_ca)
                conn = http.client.HTTPSConnection(host, int(port), timeout=self.targets.timeout_s, context=context)
            else:
                conn = http.client.HTTPConnection(host, int(port), timeout=self.targets.timeout_s)
            self._local.http = conn
            with self._cond:
                self._connections.append(conn)
        return conn

    def _close_connections(self) -> None:
        for conn in self._connections:
            conn.close()

    # -- orders

    def _send_order(self, record: StudyRecord) -> None:
        """One ORM^O01 over MLLP; MSA-1 AA is success (HL7 v2.5 2.9.2)."""
        t = self.targets
        study = record.planned
        message = order_message(study, record.identity, f"G{self._token}{study.index:06d}", datetime.now())
        facility = t.facility(study.site)
        if facility != study.site:
            message = message.replace(f"|RIS|{study.site}|".encode(), f"|RIS|{facility}|".encode(), 1)
        record.order_sent_at = time.time()
        for attempt in range(self.retries + 1):
            problem = self._mllp(message, record)
            if problem is None:
                record.order_acked_at = time.time()
                return
            if attempt < self.retries:
                record.retries.append(f"attempt {attempt + 1}: {problem}")
                time.sleep(self.retry_delay_s)
        record.failures.append(problem)

    def _mllp(self, message: bytes, record: StudyRecord) -> str | None:
        """Send one framed message, read its ACK: None for AA, else what went wrong."""
        t = self.targets
        try:
            with socket.create_connection((t.host, t.hl7_port), timeout=t.timeout_s) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(message)
                answer = b""
                while not answer.endswith(MLLP_END):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        except OSError as exc:
            return f"ORM^O01 {record.identity.accession_number}: {type(exc).__name__}: {exc}"
        msa = next((s for s in answer.strip(b"\x0b\x1c\r").split(b"\r") if s.startswith(b"MSA|")), b"")
        if msa.startswith(b"MSA|AA|"):
            return None
        return f"ORM^O01 {record.identity.accession_number}: {msa.decode(errors='replace') or 'no MSA in the answer'}"


def _stow_failed(payload: bytes) -> dict[str, str]:
    """SOP Instance UID -> FailureReason of each FailedSOPSequence item (PS3.18 Table 10.5.3-1)."""
    try:
        answer = json.loads(payload)
    except ValueError:
        return {}
    failed = {}
    for item in (answer.get("00081198") or {}).get("Value", []):
        uid = ((item.get("00081155") or {}).get("Value") or ["?"])[0]
        reason = ((item.get("00081197") or {}).get("Value") or ["?"])[0]
        failed[uid] = f"0x{reason:04X}" if isinstance(reason, int) else str(reason)
    return failed
