"""Results delivery: results.outbox -> every destination of the study's site, each output
acknowledged, retried or dead-lettered, and its state on results.delivery.

``python -m streams delivery`` runs it in its own process and consumer group
(``{prefix}-delivery``): one thread per destination, so a PACS that is down holds up
only its own queue. An output is tried up to ``results.max_attempts`` times with
exponential backoff and full jitter; a destination that keeps failing has its circuit
opened (:class:`engines.breaker.CircuitBreaker`) and is tried again after
``results.breaker_reset_s``. What still fails becomes a dead letter (stage ``delivery``)
holding the result; ``radstream results replay-dead`` sends it again. An outbox offset is
committed only once every output of its result is acknowledged or dead.

Sends are idempotent by trace_id + revision + destination: the ledger of acknowledged
outputs (read back from results.delivery at start) skips what was delivered before, and
each output carries that identity to its receiver (deterministic SR UIDs, HL7 control id,
FHIR identifier, webhook idempotency key) for what a crash re-sends.
"""

from __future__ import annotations

import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from adapters.telemetry import get_logger
from engines.breaker import CircuitBreaker
from schemas.events import DeadLetter, DeliveryStatus, ResultDelivery, StudyResult, utcnow
from schemas.settings import ResultsSettings
from schemas.toml_files import read_toml

log = get_logger("radstream.delivery")

DELIVERIES = Counter("radstream_result_deliveries_total", "result outputs by destination and final state",
                     ["destination", "status"])
ATTEMPTS = Counter("radstream_result_delivery_attempts_total", "send attempts by destination and outcome",
                   ["destination", "outcome"])

KINDS = ("sr", "oru", "fhir", "webhook")
#: the outbox consumer's fetch wait: it keeps no table, so nothing of the stream workers' caution applies
DELIVERY_FETCH_WAIT_MS = 20
#: how often settled outbox offsets are committed (after flushing the states that say they settled)
COMMIT_INTERVAL_S = 0.5
_REQUIRED = {"sr": ("host", "port", "called_ae"), "oru": ("host", "port"), "fhir": ("url",), "webhook": ("url",)}
_OPTIONAL = {"sites", "kind", "calling_ae", "tls_ca", "tls_cert", "tls_key", "receiving_app", "receiving_facility",
             "token", "secret", "secret_env", "timeout_s"}


class DestinationsError(ValueError):
    """The destinations file is missing, not TOML, or a destination in it is wrong (file and key named)."""


@dataclass(frozen=True)
class Destination:
    """Where one kind of output goes, for the sites it serves (``*``: every site)."""

    name: str
    kind: str
    sites: tuple[str, ...] = ("*",)
    host: str | None = None
    port: int | None = None
    called_ae: str | None = None
    calling_ae: str = "RADSTREAM"
    receiving_app: str = "RIS"
    receiving_facility: str | None = None
    url: str | None = None
    token: str | None = None
    secret: bytes | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    timeout_s: float | None = None

    def serves(self, site: str) -> bool:
        return "*" in self.sites or site in self.sites

    def tls(self) -> ssl.SSLContext | None:
        """A client TLS context when a CA or a client certificate is configured."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return context


def load_destinations(path: Path | str, environ: dict[str, str] | None = None) -> dict[str, Destination]:
    """The ``[destinations.NAME]`` tables of ``path``, each checked; errors name the file and key."""
    import os

    environ = os.environ if environ is None else environ
    table = read_toml(path, "results destinations file", DestinationsError).get("destinations")
    if not isinstance(table, dict) or not table:
        raise DestinationsError(f"{path}: no [destinations.NAME] table")
    out = {}
    for name, entry in table.items():
        where = f"{path}: destinations.{name}"
        if not isinstance(entry, dict):
            raise DestinationsError(f"{where} must be a table")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise DestinationsError(f"{where}.kind must be one of {', '.join(KINDS)} (got {kind!r})")
        unknown = set(entry) - _OPTIONAL - set(_REQUIRED[kind])
        if unknown:
            raise DestinationsError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        missing = [key for key in _REQUIRED[kind] if not entry.get(key)]
        if missing:
            raise DestinationsError(f"{where}.{missing[0]} is required for kind {kind!r}")
        sites = entry.get("sites", ["*"])
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and s for s in sites):
            raise DestinationsError(f"{where}.sites must be a non-empty list of site names (or [\"*\"])")
        if "port" in entry and (not isinstance(entry["port"], int) or not 0 < entry["port"] < 65536):
            raise DestinationsError(f"{where}.port must be a port number")
        secret = entry.get("secret")
        if "secret_env" in entry:
            secret = environ.get(entry["secret_env"])
            if not secret:
                raise DestinationsError(f"{where}.secret_env: environment variable {entry['secret_env']} is not set")
        if kind == "webhook" and not secret:
            raise DestinationsError(f"{where}.secret (or secret_env) is required: webhooks are signed")
        fields = {k: v for k, v in entry.items() if k not in ("kind", "sites", "secret", "secret_env")}
        for key in ("tls_ca", "tls_cert", "tls_key"):
            if key in fields:
                fields[key] = Path(fields[key])
        out[name] = Destination(name=name, kind=kind, sites=tuple(sites), secret=secret.encode() if secret else None,
                                **fields)
    return out


# ---------------------------------------------------------------- one output, tried until done


def backoff_s(attempt: int, settings: ResultsSettings, rng: random.Random) -> float:
    """Full jitter over an exponential ceiling: retries of many outputs spread out instead of
    hitting a recovering receiver together."""
    return rng.uniform(0, min(settings.max_backoff_s, settings.backoff_s * 2 ** (attempt - 1)))


def delivery_key(result: StudyResult, destination: str) -> str:
    """The identity that makes a send idempotent (the ledger's key, the dead letter's key)."""
    return f"{result.trace_id}:{result.revision}:{destination}"


#: sends one result to one destination: the receiver's document id, or DeliveryError
Sender = Callable[["Destination", StudyResult], str]


@dataclass
class Ports:
    """What delivering needs from outside: sending, publishing states and dead letters, time."""

    send: Sender
    publish: Callable[[ResultDelivery], None]
    dead_letter: Callable[[DeadLetter], None]
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], datetime] = utcnow
    rng: random.Random = field(default_factory=random.Random)


def deliver(result: StudyResult, dest: Destination, breaker: CircuitBreaker, settings: ResultsSettings,
            ports: Ports, payload: bytes | None = None) -> ResultDelivery:
    """Send until acknowledged, refused for good, or out of attempts; every state published.
    ``payload`` (the result's encoded bytes) goes into the dead letter so it can be replayed."""
    from adapters.result_senders import DeliveryError

    def state(status: DeliveryStatus, attempts: int, **extra: Any) -> ResultDelivery:
        event = ResultDelivery(trace_id=result.trace_id, study_uid=result.study_uid, revision=result.revision,
                               destination=dest.name, kind=dest.kind, status=status, attempts=attempts, at=ports.now(),
                               result_status=result.status, **extra)
        ports.publish(event)
        return event

    state(DeliveryStatus.QUEUED, 0)
    attempts = 0
    while True:
        while not breaker.allows():  # the circuit is open: wait out its reset, holding this queue only
            ports.sleep(min(1.0, breaker.reset_s))
        attempts += 1
        try:
            document_id = ports.send(dest, result)
        except DeliveryError as exc:
            breaker.failed(exc.reason)
            ATTEMPTS.labels(dest.name, "failed").inc()
            if not exc.retryable or attempts >= settings.max_attempts:
                why = "refused" if not exc.retryable else f"failed {attempts} times"
                ports.dead_letter(DeadLetter(
                    stage="delivery", reason=f"delivery-{'refused' if not exc.retryable else 'exhausted'}",
                    error=f"{dest.kind} to {dest.name} {why}: {exc.reason}", failed_at=ports.now(),
                    trace_id=result.trace_id, key=delivery_key(result, dest.name), payload=payload))
                DELIVERIES.labels(dest.name, "DEAD").inc()
                log.warning("result output dead-lettered", trace_id=result.trace_id, destination=dest.name,
                            revision=result.revision, attempts=attempts, error=exc.reason)
                return state(DeliveryStatus.DEAD, attempts, error=exc.reason)
            delay = max(backoff_s(attempts, settings, ports.rng), float(getattr(exc, "retry_after_s", 0) or 0))
            state(DeliveryStatus.FAILED, attempts, error=exc.reason, next_attempt_at=ports.now() + timedelta(seconds=delay))
            ports.sleep(delay)
            continue
        breaker.succeeded()
        ATTEMPTS.labels(dest.name, "acked").inc()
        DELIVERIES.labels(dest.name, "ACKED").inc()
        log.info("result output delivered", trace_id=result.trace_id, destination=dest.name, kind=dest.kind,
                 revision=result.revision, status=result.status.value, attempts=attempts)
        return state(DeliveryStatus.ACKED, attempts, document_id=document_id)


# ---------------------------------------------------------------- building and sending each kind


def send_result(dest: Destination, result: StudyResult, timeout_s: float) -> str:
    """Build the destination's kind of document from ``result`` and send it; the document id.
    A result the document cannot be built from (an ORU needs an accession number and a
    patient id) is refused for good: retrying would build the same nothing."""
    from adapters.result_senders import DeliveryError

    try:
        return _send(dest, result, dest.timeout_s or timeout_s)
    except ValueError as exc:
        raise DeliveryError(f"cannot build the {dest.kind} document: {exc}", retryable=False) from None


def _send(dest: Destination, result: StudyResult, timeout_s: float) -> str:
    from adapters import result_documents as docs
    from adapters import result_senders as senders

    if dest.kind == "sr":
        ds = docs.build_sr(result)
        senders.store_sr(ds, host=dest.host, port=dest.port, called_ae=dest.called_ae, calling_ae=dest.calling_ae,
                         tls=dest.tls(), timeout_s=timeout_s)
        return str(ds.SOPInstanceUID)
    if dest.kind == "oru":
        control_id = docs.idempotency_key(result.trace_id, result.revision, dest.name)[:20]
        message = docs.build_oru(result, receiving_app=dest.receiving_app,
                                 receiving_facility=dest.receiving_facility or result.source_site, control_id=control_id)
        senders.send_mllp(message, host=dest.host, port=dest.port, timeout_s=timeout_s, tls=dest.tls())
        return control_id
    if dest.kind == "fhir":
        return senders.post_fhir(dest.url, docs.build_fhir(result), token=dest.token, timeout_s=timeout_s)
    import json

    key = docs.idempotency_key(result.trace_id, result.revision, dest.name)
    body = json.dumps(docs.webhook_payload(result), sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": key,
               "X-Radstream-Signature": docs.sign_webhook(dest.secret or b"", body, int(time.time()))}
    if result.critical:
        headers["X-Radstream-Urgent"] = "true"
    senders.post_json(dest.url, body, headers, timeout_s=timeout_s, ssl_context=dest.tls())
    return key


# ---------------------------------------------------------------- the worker


class Ledger:
    """The outputs acknowledged so far, by :func:`delivery_key`: read back from results.delivery."""

    def __init__(self, delivered: set[str] | None = None) -> None:
        self._keys = set(delivered or ())
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._keys

    def record(self, event: ResultDelivery) -> None:
        if event.status is DeliveryStatus.ACKED:
            with self._lock:
                self._keys.add(f"{event.trace_id}:{event.revision}:{event.destination}")


class OffsetTracker:
    """Outbox offsets whose outputs are all settled: what may be committed, per partition."""

    def __init__(self) -> None:
        self._open: dict[int, dict[int, int]] = {}  # partition -> offset -> outputs unsettled
        self._next: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, partition: int, offset: int, outputs: int) -> None:
        with self._lock:
            self._open.setdefault(partition, {})[offset] = outputs
            self._settle(partition)

    def done(self, partition: int, offset: int) -> None:
        with self._lock:
            self._open[partition][offset] -= 1
            self._settle(partition)

    def _settle(self, partition: int) -> None:
        pending = self._open[partition]
        while pending:
            first = min(pending)
            if pending[first] > 0:
                break
            del pending[first]
            self._next[partition] = first + 1

    def committable(self) -> dict[int, int]:
        with self._lock:
            return dict(self._next)


class DestinationWorker(threading.Thread):
    """One destination's queue: outputs in arrival order, one at a time."""

    def __init__(self, dest: Destination, settings: ResultsSettings, ports: Ports, ledger: Ledger) -> None:
        super().__init__(name=f"delivery-{dest.name}", daemon=True)
        self.dest, self.settings, self.ports, self.ledger = dest, settings, ports, ledger
        self.breaker = CircuitBreaker(f"delivery:{dest.name}", settings.breaker_failures, settings.breaker_reset_s)
        self.jobs: queue.Queue = queue.Queue()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            result, payload, done = job
            try:
                if delivery_key(result, self.dest.name) not in self.ledger:
                    self.ledger.record(deliver(result, self.dest, self.breaker, self.settings, self.ports, payload))
            except Exception:  # a bug in building a document must not kill the queue: dead-letter it
                log.exception("result output failed unexpectedly", trace_id=result.trace_id, destination=self.dest.name)
                self.ports.dead_letter(DeadLetter(stage="delivery", reason="delivery-error",
                                                  error=f"building or sending {self.dest.kind} failed",
                                                  failed_at=self.ports.now(), trace_id=result.trace_id,
                                                  key=delivery_key(result, self.dest.name), payload=payload))
            finally:
                done()


def read_stamped(settings, spec, timeout_s: float = 30.0) -> list[tuple[int, int, Any]]:
    """Every record on ``spec``'s topic as ``(timestamp type, timestamp ms, event)``, read from
    the beginning to its true end (the embedded broker under-reports ends, and after a restart
    may never send end-of-partition: a partition is done at the end :func:`end_offsets` found)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    from adapters.kafka import end_offsets
    from schemas.codec import Codec

    topic, codec, records = spec.name(settings), Codec(), []
    ends = end_offsets(settings.kafka_bootstrap, [(topic, p) for p in range(settings.kafka.partitions)], timeout_s)
    pending = {p for (_, p), end in ends.items() if end > 0}
    if not pending:
        return records
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.kafka.topic_prefix}-reader",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in sorted(pending)])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout_s:g}s")
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            end = ends[(topic, msg.partition())]
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF and msg.offset() >= end:
                    pending.discard(msg.partition())
                continue
            records.append((*msg.timestamp(), codec.decode(msg.value())))
            if msg.offset() + 1 >= end:
                pending.discard(msg.partition())
    finally:
        consumer.close()
    return records


def read_topic(settings, spec, timeout_s: float = 30.0) -> list:
    """Every event on ``spec``'s topic, read to its true end."""
    return [event for _, _, event in read_stamped(settings, spec, timeout_s)]


def read_ledger(settings, timeout_s: float = 30.0) -> Ledger:
    """Every output acknowledged so far, from results.delivery."""
    from schemas.topics import RESULTS_DELIVERY

    ledger = Ledger()
    for event in read_topic(settings, RESULTS_DELIVERY, timeout_s):
        if isinstance(event, ResultDelivery):
            ledger.record(event)
    return ledger


class Delivery:
    """The delivery process: the outbox consumer, a worker per destination, the producer."""

    def __init__(self, settings, destinations: dict[str, Destination]) -> None:
        from confluent_kafka import Producer

        from adapters.kafka import producer_config
        from schemas.codec import Codec

        self.settings, self.destinations = settings, destinations
        self.codec = Codec()
        self.producer = Producer(producer_config(settings, **{"client.id": "radstream-delivery"}))
        self.ledger = read_ledger(settings)
        self.offsets = OffsetTracker()
        ports = Ports(send=lambda dest, result: send_result(dest, result, settings.results.timeout_s),
                      publish=self._publish_state, dead_letter=self._publish_dead_letter)
        self.workers = {name: DestinationWorker(dest, settings.results, ports, self.ledger)
                        for name, dest in destinations.items()}

    def _produce(self, spec, event) -> None:
        from schemas.topics import key_of

        self.producer.produce(spec.name(self.settings), value=self.codec.encode(event), key=key_of(spec, event))
        self.producer.poll(0)

    def _publish_state(self, event: ResultDelivery) -> None:
        from schemas.topics import RESULTS_DELIVERY

        self._produce(RESULTS_DELIVERY, event)

    def _publish_dead_letter(self, letter: DeadLetter) -> None:
        from schemas.topics import DEAD_LETTER

        self._produce(DEAD_LETTER, letter)
        self.producer.flush(30)  # a dead letter is the only copy left: make sure it is on the broker

    def dispatch(self, result: StudyResult, payload: bytes, partition: int, offset: int) -> None:
        targets = [w for w in self.workers.values() if w.dest.serves(result.source_site)]
        self.offsets.add(partition, offset, len(targets))
        for worker in targets:
            worker.jobs.put((result, payload, lambda: self.offsets.done(partition, offset)))

    def run(self, stop: threading.Event, ready: Callable[[], None] = lambda: None) -> None:
        from confluent_kafka import Consumer

        from schemas.topics import RESULTS_OUTBOX

        for worker in self.workers.values():
            worker.start()
        topic = RESULTS_OUTBOX.name(self.settings)
        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap,
                             "group.id": f"{self.settings.kafka.topic_prefix}-delivery",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False,
                             # the embedded broker holds a fetch open for all of it even when a record
                             # arrives: at librdkafka's 500 ms default that was most of a result's latency
                             "fetch.wait.max.ms": DELIVERY_FETCH_WAIT_MS,
                             "session.timeout.ms": int(self.settings.kafka.session_timeout_s * 1000)})
        assigned = threading.Event()
        consumer.subscribe([topic], on_assign=lambda c, partitions: assigned.set())
        committed: dict[int, int] = {}
        last_commit = 0.0
        try:
            while not stop.is_set():
                msg = consumer.poll(0.5)
                if assigned.is_set():
                    ready()
                if msg is not None and msg.error() is None:
                    try:
                        result = self.codec.decode(msg.value(), StudyResult)
                    except Exception as exc:  # undecodable: dead-letter it, never stall the outbox
                        self._publish_dead_letter(DeadLetter(
                            stage="delivery", reason="undecodable", error=str(exc), failed_at=utcnow(),
                            source_topic=topic, source_partition=msg.partition(), source_offset=msg.offset(),
                            payload=msg.value()))
                        self.offsets.add(msg.partition(), msg.offset(), 0)
                    else:
                        self.dispatch(result, msg.value(), msg.partition(), msg.offset())
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:  # not per result: a flush and a
                    last_commit = time.monotonic()  # synchronous commit each cost more than the sends
                    self._commit(consumer, topic, committed)
        finally:
            for worker in self.workers.values():
                worker.jobs.put(None)
            self._commit(consumer, topic, committed)
            consumer.close()
            self.producer.flush(10)

    def _commit(self, consumer, topic: str, committed: dict[int, int]) -> None:
        """Commit the outbox offsets whose outputs all settled, once their states are on the broker."""
        from confluent_kafka import KafkaException, TopicPartition

        ready = {p: o for p, o in self.offsets.committable().items() if committed.get(p) != o}
        if not ready:
            return
        self.producer.flush(30)
        try:
            consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in ready.items()], asynchronous=False)
        except KafkaException as exc:  # e.g. partitions moved to another worker: it redelivers, the ledger skips
            log.warning("outbox offsets not committed", error=str(exc))
            return
        committed.update(ready)


def replay_dead_letters(settings, destinations: dict[str, Destination], letters: list[DeadLetter],
                        progress: Callable[[str], None] = lambda line: None) -> dict[str, int]:
    """Send the results held by delivery dead letters once more, each to its one destination;
    what the ledger says was delivered since (or by an earlier replay) is skipped."""
    from schemas.codec import Codec

    codec, counts = Codec(), {"delivered": 0, "skipped": 0, "failed": 0}
    delivery = Delivery(settings, destinations)
    for letter in letters:
        destination = (letter.key or "").rsplit(":", 1)[-1]
        dest = destinations.get(destination)
        if letter.stage != "delivery" or letter.payload is None or dest is None:
            counts["failed"] += 1
            progress(f"cannot replay {letter.key}: no result or no destination {destination!r} configured")
            continue
        result = codec.decode(letter.payload, StudyResult)
        if delivery_key(result, destination) in delivery.ledger:
            counts["skipped"] += 1
            progress(f"{letter.key}: delivered already")
            continue
        worker = delivery.workers[destination]
        outcome = deliver(result, dest, worker.breaker, settings.results, worker.ports, letter.payload)
        delivery.ledger.record(outcome)
        counts["delivered" if outcome.status is DeliveryStatus.ACKED else "failed"] += 1
        progress(f"{letter.key}: {outcome.status.value} after {outcome.attempts} attempt(s)")
    delivery.producer.flush(30)
    return counts


def main() -> int:
    """``python -m streams delivery``: deliver results until SIGTERM."""
    import signal
    from pathlib import Path as _Path

    from adapters.kafka import ensure_topics
    from adapters.process import start_component

    settings = start_component("delivery")
    path = settings.results.destinations_file
    if path is None:
        log.error("no results.destinations_file: nothing to deliver to")
        return 2
    try:
        destinations = load_destinations(path)
    except DestinationsError as exc:
        log.error(str(exc))
        return 2
    ensure_topics(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ready_file = _Path(settings.data_dir).resolve() / "run" / "delivery.ready"
    ready_file.parent.mkdir(parents=True, exist_ok=True)
    delivery = Delivery(settings, destinations)
    log.info("delivering results", destinations={n: d.kind for n, d in destinations.items()})
    try:
        delivery.run(stop, ready=lambda: ready_file.exists() or ready_file.write_text("ready\n"))
    finally:
        ready_file.unlink(missing_ok=True)
    return 0
