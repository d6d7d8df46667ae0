"""Topic record and replay for load tests (``radstream load record|replay``).

A recording is real topic traffic kept in a JSON-Lines file (gzip when the name ends in
``.gz``): a header line naming the topics, then one line per record with its topic (the
radstream logical name, so a recording made under one topic prefix replays under
another), partition, offset, broker timestamp and base64 key, value and headers.
Recording reads every partition to its *true* end (:func:`adapters.kafka.end_offsets`:
the embedded broker's ListOffsets under-reports) and fails rather than skip a record.
Replay re-sends the records at the recorded pacing scaled by a speed, or at a fixed
rate, keyed as before so the partitioner keeps a study on one partition, and stamped
with the time of the replay (old timestamps trip ``message.timestamp.difference.max.ms``
and time-based retention); the original topic, partition, offset and timestamp travel as
``radstream-original-*`` headers. Payloads are never rewritten: a record replayed where
the pipeline has already seen it is dropped by the stages' idempotency.
"""

from __future__ import annotations

import base64
import gzip
import heapq
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from adapters.kafka import end_offsets, producer_config
from schemas.settings import Settings
from schemas.topics import ALL_TOPICS, TopicSpec

FORMAT = "radstream-recording"
VERSION = 1
#: headers a replayed record carries to name the record it was replayed from
ORIGINAL_TOPIC = "radstream-original-topic"
ORIGINAL_PARTITION = "radstream-original-partition"
ORIGINAL_OFFSET = "radstream-original-offset"
ORIGINAL_TIMESTAMP = "radstream-original-timestamp"
_ORIGINAL_PREFIX = "radstream-original-"

#: (records done, records expected or None when open-ended): how long work shows progress
Progress = Callable[[int, int | None], None]

T = TypeVar("T")


class RecordingFormatError(ValueError):
    """The file is not a radstream recording, or a line of it is damaged (names the line)."""


class UnknownTopicError(LookupError):
    """A topic to record is neither a radstream topic nor one on the broker."""


class ReplayError(ValueError):
    """The replay cannot go where it was asked to (``--keep-partitions`` onto fewer partitions)."""


# ---------------------------------------------------------------- the file format


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One Kafka record as the broker held it; ``topic`` is the logical name."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None  # None: a tombstone on a compacted topic
    headers: tuple[tuple[str, bytes | None], ...] = ()


@dataclass(frozen=True)
class RecordingHeader:
    """The first line: when, which topics (logical -> the real name recorded from), how partitioned."""

    recorded_at: datetime
    topics: dict[str, str]
    partitions: dict[str, int]


@dataclass(frozen=True)
class Recording:
    header: RecordingHeader
    messages: list[RecordedMessage]


def kafka_reason(error: object) -> str:
    """A KafkaError (or the exception wrapping one) as its message, without the struct around it."""
    if isinstance(error, Exception) and error.args:
        error = error.args[0]
    text = getattr(error, "str", None)
    return text() if callable(text) else str(error)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"{what} is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not valid base64") from None


def _open(path: Path, mode: str, compressed: bool) -> IO[str]:
    if compressed:
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def write_recording(path: Path, recording: Recording) -> None:
    """Write ``recording`` to ``path`` (gzip when it ends in ``.gz``).

    Written beside it and renamed when complete, so a file at ``path`` is always a whole
    recording, never the part an interrupted run got to.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    header = recording.header
    with _open(partial, "w", compressed=path.name.endswith(".gz")) as out:
        out.write(json.dumps({"format": FORMAT, "version": VERSION,
                              "recorded_at": header.recorded_at.isoformat(),
                              "topics": header.topics, "partitions": header.partitions}) + "\n")
        for m in recording.messages:
            out.write(json.dumps({"topic": m.topic, "partition": m.partition, "offset": m.offset,
                                  "timestamp_ms": m.timestamp_ms, "key": _b64(m.key), "value": _b64(m.value),
                                  "headers": [[name, _b64(value)] for name, value in m.headers]},
                                 separators=(",", ":")) + "\n")
    partial.replace(path)


def _header(line: str) -> RecordingHeader:
    try:
        first = json.loads(line)
    except ValueError:
        first = None
    if not isinstance(first, dict) or first.get("format") != FORMAT:
        raise ValueError(f'not a radstream recording (the first line must be {{"format": "{FORMAT}", ...}})')
    if first.get("version") != VERSION:
        raise ValueError(f"recording version {first.get('version')!r}; this radstream reads version {VERSION}")
    topics, partitions = first.get("topics"), first.get("partitions")
    if not isinstance(topics, dict) or not all(isinstance(v, str) for v in topics.values()):
        raise ValueError("the header's topics must map logical names to topic names")
    if not isinstance(partitions, dict) or not all(isinstance(v, int) for v in partitions.values()):
        raise ValueError("the header's partitions must map logical names to partition counts")
    try:
        recorded_at = datetime.fromisoformat(first["recorded_at"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("the header's recorded_at is not an ISO timestamp") from None
    return RecordingHeader(recorded_at, topics, partitions)


def _message(line: str, topics: Mapping[str, str]) -> RecordedMessage:
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError("a record line must be a JSON object")
    if row.get("topic") not in topics:
        raise ValueError(f"topic {row.get('topic')!r} is not among the header's topics")
    numbers = [row.get(name) for name in ("partition", "offset", "timestamp_ms")]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        raise ValueError("partition, offset and timestamp_ms must be integers")
    headers = row.get("headers", [])
    if not isinstance(headers, list) or not all(isinstance(h, list) and len(h) == 2 and isinstance(h[0], str)
                                                for h in headers):
        raise ValueError("headers must be a list of [name, base64 value]")
    return RecordedMessage(row["topic"], *numbers, key=_unb64(row.get("key"), "key"),
                           value=_unb64(row.get("value"), "value"),
                           headers=tuple((name, _unb64(value, f"header {name}")) for name, value in headers))


def read_recording(path: Path) -> Recording:
    """Read a whole recording; :class:`RecordingFormatError` names the file and the line at fault."""
    number = 0
    try:
        with _open(Path(path), "r", compressed=Path(path).name.endswith(".gz")) as lines:
            number = 1
            header = _header(next(lines, ""))
            messages = []
            for number, line in enumerate(lines, start=2):
                if line.strip():
                    messages.append(_message(line, header.topics))
    except (ValueError, EOFError, OSError, UnicodeDecodeError) as exc:
        where = f"{path}:{number}" if number else str(path)
        raise RecordingFormatError(f"{where}: {exc}") from None
    return Recording(header, messages)


def replay_order(per_partition: Iterable[Sequence[RecordedMessage]]) -> list[RecordedMessage]:
    """All records by timestamp, then (topic, partition, offset); each partition in offset order.

    Each partition's list must be in offset order. A timestamp earlier than one before it on
    its partition (producers' clocks disagree: CreateTime) sorts as that earlier record's
    time: sorting by raw timestamp would replay a study's events out of order.
    """
    def keyed(messages: Sequence[RecordedMessage]) -> Iterator[tuple[tuple[int, str, int, int], RecordedMessage]]:
        latest = -math.inf
        for m in messages:
            latest = max(latest, m.timestamp_ms)
            yield (latest, m.topic, m.partition, m.offset), m

    return [m for _key, m in heapq.merge(*(keyed(ms) for ms in per_partition), key=lambda pair: pair[0])]


# ---------------------------------------------------------------- recording


def resolve_topic(settings: Settings, name: str, existing: Iterable[str]) -> tuple[str, str]:
    """(logical name, real name) of ``name``: a radstream topic's logical name
    (``instance.received``), its full name under the settings' prefix, or any topic on the broker."""
    logical = {spec.suffix for spec in ALL_TOPICS}
    prefix = settings.kafka.topic_prefix + "."
    if name in logical:
        return name, settings.topic(name)
    if name.startswith(prefix) and name.removeprefix(prefix) in logical:
        return name.removeprefix(prefix), name
    if name in set(existing):
        return name, name
    raise UnknownTopicError(f"no topic {name!r}: neither a radstream topic ({', '.join(sorted(logical))}) "
                            f"nor a topic on {settings.kafka_bootstrap}")


@dataclass
class PartitionRead:
    """How far one partition was read, against the offsets it held when recording began."""

    topic: str  # logical
    partition: int
    start: int
    end: int  # the true end when recording began
    position: int = 0  # the next offset to read
    recorded: int = 0
    before_since: int = 0  # read but older than --since
    after_end: int = 0  # --follow: recorded beyond ``end``
    error: str | None = None

    @property
    def expected(self) -> int:
        return self.end - self.start

    @property
    def complete(self) -> bool:
        return self.position >= self.end


@dataclass
class RecordReport:
    partitions: list[PartitionRead]
    elapsed_s: float = 0.0
    limited: bool = False  # stopped at --limit, partitions may be cut short

    @property
    def recorded(self) -> int:
        return sum(p.recorded for p in self.partitions)

    @property
    def unfinished(self) -> list[PartitionRead]:
        return [] if self.limited else [p for p in self.partitions if not p.complete]


class RecordingIncomplete(RuntimeError):
    """A partition was not read to its end: nothing is written, the report says how far each got."""

    def __init__(self, report: RecordReport, timeout_s: float) -> None:
        names = ", ".join(f"{p.topic}[{p.partition}] at {p.position} of {p.end}" + (f" ({p.error})" if p.error else "")
                          for p in report.unfinished)
        super().__init__(f"not read to their end (no progress for {timeout_s:g} s): {names}")
        self.report = report


def record_topics(settings: Settings, names: Sequence[str], *, since_ms: int | None = None, limit: int | None = None,
                  follow: bool = False, duration_s: float | None = None, timeout_s: float = 30.0,
                  on_progress: Progress | None = None) -> tuple[Recording, RecordReport]:
    """Read ``names`` (see :func:`resolve_topic`) from the beginning, or from ``since_ms``,
    to the true end each partition had when recording began.

    ``since_ms`` starts each partition where the broker's offsets-for-times answer says
    and then keeps only records stamped at or after it: Tansu answers offset 0 for any
    time, and on Kafka a producer's clock may step back. ``limit`` stops after that many
    records (a prefix of each partition). ``follow`` keeps recording past the end until
    ``duration_s`` or Ctrl-C. Raises :class:`RecordingIncomplete` when a partition makes
    no progress for ``timeout_s`` before its end, :class:`UnknownTopicError` for a name
    that is no topic, ``KafkaException`` when the broker does not answer.
    """
    from confluent_kafka import OFFSET_END, Consumer, TopicPartition

    started = time.monotonic()
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "client.id": f"{settings.kafka.client_id}-record",
                         # assign() needs no group; the client requires an id, nothing is committed under it
                         "group.id": f"{settings.kafka.topic_prefix}.record", "enable.auto.commit": False,
                         "enable.partition.eof": True, "log_level": 3})
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
        topics = dict(resolve_topic(settings, name, metadata.topics) for name in names)
        missing = [real for real in topics.values() if real not in metadata.topics]
        if missing:
            raise UnknownTopicError(f"no topic {', '.join(missing)} on {settings.kafka_bootstrap}")
        partitions = {logical: sorted(metadata.topics[real].partitions) for logical, real in topics.items()}
        pairs = [(topics[logical], pid) for logical, pids in partitions.items() for pid in pids]
        ends = end_offsets(settings.kafka_bootstrap, pairs, timeout_s)
        lows = {pair: max(consumer.get_watermark_offsets(TopicPartition(*pair), timeout=timeout_s)[0], 0)
                for pair in pairs}
        starts = dict(lows)
        if since_ms is not None:
            found = consumer.offsets_for_times([TopicPartition(*pair, since_ms) for pair in pairs], timeout=timeout_s)
            for tp in found:
                pair = (tp.topic, tp.partition)
                # OFFSET_END: nothing stamped that late; an answer above the true end is the trap again
                starts[pair] = ends[pair] if tp.offset == OFFSET_END else min(max(tp.offset, lows[pair]), ends[pair])
        logical_of = {real: logical for logical, real in topics.items()}
        reads = {(t, p): PartitionRead(logical_of[t], p, starts[(t, p)], ends[(t, p)], position=starts[(t, p)])
                 for t, p in pairs}
        report = RecordReport(list(reads.values()))
        kept: dict[tuple[str, int], list[RecordedMessage]] = {pair: [] for pair in pairs}
        assigned = [pair for pair, read in reads.items() if follow or not read.complete]
        if assigned:
            consumer.assign([TopicPartition(t, p, reads[(t, p)].start) for t, p in assigned])
            _consume(consumer, reads, kept, report, since_ms=since_ms, limit=limit, follow=follow,
                     duration_s=duration_s, timeout_s=timeout_s, on_progress=on_progress)
    finally:
        consumer.close()
    report.elapsed_s = time.monotonic() - started
    if report.unfinished:
        raise RecordingIncomplete(report, timeout_s)
    header = RecordingHeader(datetime.now(UTC), topics, {logical: len(pids) for logical, pids in partitions.items()})
    return Recording(header, replay_order(kept.values())), report


def _consume(consumer: Any, reads: dict[tuple[str, int], PartitionRead],
             kept: dict[tuple[str, int], list[RecordedMessage]], report: RecordReport, *,
             since_ms: int | None, limit: int | None, follow: bool, duration_s: float | None, timeout_s: float,
             on_progress: Progress | None) -> None:
    """The read loop of :func:`record_topics`: until every partition reached its end (and,
    following, until ``duration_s`` or Ctrl-C), the limit, or ``timeout_s`` without progress."""
    from confluent_kafka import KafkaError

    total = None if follow else sum(r.expected for r in reads.values())
    stop_at = None if duration_s is None else time.monotonic() + duration_s
    last_progress = time.monotonic()
    done = 0
    try:
        while not report.limited:
            pending = [r for r in reads.values() if not r.complete]
            now = time.monotonic()
            if (not follow and not pending) or (stop_at is not None and now >= stop_at):
                return
            if pending and now - last_progress > timeout_s:
                return
            for msg in consumer.consume(500, 0.2):
                read = reads[(msg.topic(), msg.partition())]
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        read.position = max(read.position, msg.offset())
                    else:
                        read.error = kafka_reason(error)
                    continue
                offset = msg.offset()
                if offset < read.position or (not follow and offset >= read.end):
                    continue  # a re-fetch, or beyond the snapshot
                read.position, last_progress = offset + 1, time.monotonic()
                timestamp = msg.timestamp()[1]
                if since_ms is not None and timestamp < since_ms:
                    read.before_since += 1
                    continue
                kept[(msg.topic(), msg.partition())].append(RecordedMessage(
                    read.topic, read.partition, offset, timestamp, msg.key(), msg.value(), tuple(msg.headers() or ())))
                read.recorded += 1
                read.after_end += int(offset >= read.end)
                done += 1
                if limit is not None and done >= limit:
                    report.limited = True
                    break
            if on_progress is not None:
                on_progress(sum(r.position - r.start for r in reads.values()), total)
    except KeyboardInterrupt:
        if not follow:
            raise


# ---------------------------------------------------------------- replay


def schedule(records: Sequence[RecordedMessage], speed: float | None,
             rate: float | None = None) -> list[tuple[float, RecordedMessage]]:
    """When to send each record: (seconds after the replay starts, record), in the given order.

    ``speed`` scales the recorded pacing (1.0: as recorded, 10: ten times faster; None or
    0: all at once); ``rate`` (records per second) replaces the recorded pacing. A record
    stamped earlier than one before it is sent right after that one: the order is kept,
    never a delay below the one before.
    """
    if speed is not None and speed < 0:
        raise ValueError(f"speed must be 0 (as fast as possible) or more, not {speed}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be above 0 records/s, not {rate}")
    if rate is not None:
        return [(index / rate, record) for index, record in enumerate(records)]
    if not records or not speed:
        return [(0.0, record) for record in records]
    first = records[0].timestamp_ms
    plan, latest = [], 0.0
    for record in records:
        latest = max(latest, (record.timestamp_ms - first) / 1000.0 / speed)
        plan.append((latest, record))
    return plan


def pace(plan: Iterable[tuple[float, T]], send: Callable[[T], None], *, clock: Callable[[], float],
         wait: Callable[[float], None]) -> float:
    """Send each planned item no earlier than its delay after the start on ``clock``.

    ``wait`` may return early (the producer's poll does when delivery reports arrive): the
    time left is measured again before sending. Returns when the last item went, in
    seconds after the start (0.0 for an empty plan): against the plan's last delay, how
    closely the requested pace was kept.
    """
    started = last = clock()
    for delay, item in plan:
        while (left := started + delay - clock()) > 0:
            wait(left)
        send(item)
        last = clock()
    return last - started


def replay_targets(settings: Settings, header: RecordingHeader, *, prefix: str | None = None,
                   suffix: str = "") -> dict[str, str]:
    """Logical topic -> the topic its records are replayed into.

    A radstream topic goes to its name under these settings' prefix (a recording made
    under another prefix replays here), or under ``prefix``; any other topic to the name it
    was recorded from, or ``prefix.name``. ``suffix`` is appended to every name.
    """
    logical = {spec.suffix for spec in ALL_TOPICS}
    targets = {}
    for name, real in header.topics.items():
        if prefix:
            base = f"{prefix}.{name}"
        else:
            base = settings.topic(name) if name in logical else real
        targets[name] = base + suffix
    return targets


def _topic_config(spec: TopicSpec | None) -> dict[str, str]:
    """The live topic's cleanup and retention, so a replay topic keeps, compacts and ages like it."""
    if spec is None:
        return {"cleanup.policy": "delete"}
    config = {"cleanup.policy": "compact" if spec.compacted else "delete"}
    if spec.retention_ms is not None:
        config["retention.ms"] = str(spec.retention_ms)
    return config


@dataclass
class ReplayReport:
    delivered: Counter[str] = field(default_factory=Counter)  # target topic -> records acknowledged
    failed: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "topic: reason" -> records
    elapsed_s: float = 0.0
    planned_s: float = 0.0  # first to last send as the pace asked (every loop)
    sent_s: float = 0.0  # first to last send as it happened

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def pace_kept(self) -> float | None:
        """Achieved over requested speed (1.0: on pace; 0.9: 10 % slow); None when the
        replay was unpaced (all at once) or had one instant to keep."""
        if self.planned_s <= 0 or self.sent_s <= 0:
            return None
        return self.planned_s / self.sent_s


class Replayer:
    """Produces a recording into a broker and waits for every delivery report.

    Keyed records go through ``murmur2_random``, the partitioner of every radstream
    producer and of Faust, so a study's records land on one partition as they did when
    recorded (the same partition when the target has as many partitions), unless
    ``keep_partitions`` sends each to its recorded partition. Timestamps are the replay's
    own; the ``radstream-original-*`` headers name the record each one came from
    (replacing such headers of a recording made from a replay). Payloads are sent as
    recorded: replayed into topics whose consumers have seen them (the live topics, a
    second loop), the stages' idempotency drops them -- assembly ignores an instance it
    already holds, the warehouse keeps one row per study version.
    """

    def __init__(self, settings: Settings, recording: Recording, targets: Mapping[str, str], *,
                 keep_partitions: bool = False, timeout_s: float = 30.0, on_progress: Progress | None = None) -> None:
        self.settings = settings
        self.recording = recording
        self.targets = dict(targets)
        self.keep_partitions = keep_partitions
        self.timeout_s = timeout_s
        self.on_progress = on_progress
        self.report = ReplayReport()
        self._total = 0

    def prepare(self) -> list[str]:
        """Create missing target topics (as the live ones are: the settings' partition count,
        the topic's cleanup and retention); check they can take the records. Returns notes
        for the operator; raises :class:`ReplayError` when ``keep_partitions`` cannot hold."""
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap,
                             "client.id": self.settings.kafka.client_id, "log_level": 3})
        existing = admin.list_topics(timeout=self.timeout_s).topics
        specs = {spec.suffix: spec for spec in ALL_TOPICS}
        kafka = self.settings.kafka
        new = [NewTopic(target, kafka.partitions, kafka.replication_factor, config=_topic_config(specs.get(logical)))
               for logical, target in sorted(self.targets.items()) if target not in existing]
        notes = []
        for name, future in (admin.create_topics(new, request_timeout=self.timeout_s) if new else {}).items():
            future.result(timeout=self.timeout_s)
            notes.append(f"created {name} ({kafka.partitions} partitions)")
        counts = {target: len(existing[target].partitions) if target in existing else kafka.partitions
                  for target in self.targets.values()}
        highest: dict[str, int] = {}
        for m in self.recording.messages:
            highest[m.topic] = max(highest.get(m.topic, 0), m.partition)
        for logical, target in sorted(self.targets.items()):
            recorded = self.recording.header.partitions.get(logical)
            if self.keep_partitions and highest.get(logical, -1) >= counts[target]:
                raise ReplayError(f"--keep-partitions: {target} has {counts[target]} partitions, the recording "
                                  f"has records on partition {highest[logical]} of {logical}")
            if not self.keep_partitions and recorded is not None and recorded != counts[target]:
                notes.append(f"{target} has {counts[target]} partitions, {logical} had {recorded}: keys land on "
                             "other partitions than recorded (still one partition per key)")
        return notes

    def run(self, speed: float | None, rate: float | None = None, loops: int = 1) -> ReplayReport:
        """Replay the recording ``loops`` times, each after the one before, paced by :func:`schedule`."""
        from confluent_kafka import Producer

        producer = Producer(producer_config(self.settings, **{
            "log_level": 3, "linger.ms": 5,
            # a record not acknowledged in time is reported failed, not left in the queue
            "message.timeout.ms": int(self.timeout_s * 1000)}))
        self._total = len(self.recording.messages) * loops
        started = time.monotonic()
        plan = schedule(self.recording.messages, speed, rate)
        for _loop in range(loops):
            self.report.sent_s += pace(plan, lambda m: self._produce(producer, m), clock=time.monotonic,
                                       wait=lambda left: producer.poll(min(left, 0.5)))
            self.report.planned_s += plan[-1][0] if plan else 0.0
        left = producer.flush(self.timeout_s + 5)
        if left:
            self.report.failed["(not acknowledged)"] += left
            self.report.errors[f"{left} records not acknowledged after {self.timeout_s:g} s"] += left
        self.report.elapsed_s = time.monotonic() - started
        return self.report

    def _produce(self, producer: Any, m: RecordedMessage) -> None:
        from confluent_kafka import KafkaException

        topic = self.targets[m.topic]
        headers = [(name, value) for name, value in m.headers if not name.startswith(_ORIGINAL_PREFIX)] + [
            (ORIGINAL_TOPIC, self.recording.header.topics[m.topic].encode()),
            (ORIGINAL_PARTITION, str(m.partition).encode()),
            (ORIGINAL_OFFSET, str(m.offset).encode()),
            (ORIGINAL_TIMESTAMP, str(m.timestamp_ms).encode())]
        where = {"partition": m.partition} if self.keep_partitions else {}
        while True:
            try:
                # no timestamp: the client stamps the record now
                producer.produce(topic, m.value, m.key, headers=headers, on_delivery=self._delivered, **where)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.1)
            except KafkaException as exc:
                self.report.failed[topic] += 1
                self.report.errors[f"{topic}: {kafka_reason(exc)}"] += 1
                self._progress()
                break
        producer.poll(0)

    def _delivered(self, error: Any, msg: Any) -> None:
        if error is not None:
            self.report.failed[msg.topic()] += 1
            self.report.errors[f"{msg.topic()}: {kafka_reason(error)}"] += 1
        else:
            self.report.delivered[msg.topic()] += 1
        self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(sum(self.report.delivered.values()) + sum(self.report.failed.values()), self._total)
