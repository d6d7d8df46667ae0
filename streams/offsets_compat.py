"""Exact changelog end offsets for Faust table recovery, on brokers that misreport them.

Tansu 0.6 (the embedded broker) answers ListOffsets(latest) with the *base offset of
the last record batch + 1* instead of the offset after the last record: a changelog
holding offsets 0-7 written in two batches (0-4, 5-7) reports 6. Faust recovers a table
by reading its changelog up to that "highwater" and then stops, so the newest state of a
table -- an open study's last instances -- would be silently missing after a restart,
while the source offsets that produced it are already committed.

:func:`install` wraps Faust's highwater lookup: for each partition it reads from the
reported end minus one to end-of-partition (:func:`adapters.kafka.end_offsets`). On a correct broker that reads one
record per changelog partition and changes nothing. ``kafka.verify_end_offsets``
switches it off.

:func:`install_fetch_wait` is the other broker accommodation: Faust creates its consumer
with ``fetch_max_wait_ms=1500``, and Tansu answers a fetch only when that wait runs out,
even when records arrived meanwhile -- so each hop of a study through the stages cost up
to 1.5 s. It sets ``kafka.fetch_max_wait_ms`` on the worker's consumer instead.

:func:`install_complete_flush` closes a loss under a crash: Faust commits source offsets after
``producer.flush()``, but its buffer's flush gives up as soon as one message takes longer than
0.1 s to leave it (a busy machine, a broker just back), so the commit could go ahead with table
changelog writes still buffered. A SIGKILL then lost them while their source events counted as
done: a study's instances vanished from the assembly (tests/test_durability.py, 1 run in ~4
here under load). The flush now waits until the buffer is empty.

:func:`install_seek_unpositioned` resumes each source partition the group never committed an
offset for from its beginning, explicitly, instead of leaving it to the offset reset: after a
SIGKILL within a second of a topic's first records, a restarted worker was seen resuming past
every record of such a partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from adapters.telemetry import get_logger
from adapters.kafka import EndOffsetsTimeout, end_offsets

log = get_logger("radstream.offsets")

_installed = False


def true_end_offsets(bootstrap: str, reported: Mapping[Any, int], *, attempts: int = 6,
                     timeout_s: float = 10.0) -> dict[Any, int]:
    """``reported`` end offsets (keyed by Faust/aiokafka TopicPartition), made exact."""
    keys = {(tp.topic, tp.partition): tp for tp in reported}
    for attempt in range(1, attempts + 1):
        try:
            exact = end_offsets(bootstrap, list(keys), timeout_s=timeout_s)
            break
        except EndOffsetsTimeout as exc:
            # recovering to a short end would leave the table without its newest state while the
            # source offsets that made it are committed: wait for the broker, never settle for less
            if attempt == attempts:
                raise
            log.warning("changelog end offsets not confirmed yet; retrying", attempt=attempt, error=str(exc))
    ends = {}
    for key, tp in keys.items():
        ends[tp] = max(reported[tp] or 0, exact.get(key, 0))
        if ends[tp] != reported[tp]:
            log.info("corrected changelog end offset", topic=tp.topic, partition=tp.partition,
                     reported=reported[tp], actual=ends[tp])
    return ends


def install_complete_flush() -> None:
    """Make Faust's producer-buffer flush wait until every buffered message has left it."""
    from faust.transport.producer import ProducerBuffer

    async def flush(self) -> None:
        while self.size:
            if self.state != "running":
                raise RuntimeError("Cannot flush: Producer not Running")
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=0.1)
            except asyncio.TimeoutError:
                continue  # still sending: a commit must not overtake what it depends on

    ProducerBuffer.flush = flush


def install_fetch_wait(fetch_max_wait_ms: int) -> None:
    """Give Faust's worker consumer our fetch wait instead of its hard-coded 1500 ms."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = getattr(AIOKafkaConsumerThread._create_worker_consumer, "__wrapped__",
                       AIOKafkaConsumerThread._create_worker_consumer)

    def _create_worker_consumer(self, transport):
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms  # read by the fetcher it creates in start()
        return consumer

    _create_worker_consumer.__wrapped__ = original
    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def install_seek_unpositioned() -> None:
    """Resume every source partition the group has no committed offset for from its beginning,
    explicitly, and log where each source partition resumes.

    Faust leaves such a partition to the consumer's offset reset ("earliest"). After a SIGKILL of
    everything within a second of a topic's first records -- no commit yet -- a restarted worker
    was seen resuming ``instance.received`` past all six of its records without reading one (the
    group's committed offsets still none minutes later, and a new group reading all six from the
    same broker). Seeking to the beginning asks the broker for the log start itself, so the
    records no commit covers are read again, as the offset reset promises.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = getattr(AIOKafkaConsumerThread.seek_to_committed, "__wrapped__", AIOKafkaConsumerThread.seek_to_committed)

    async def seek_to_committed(self):
        committed = await original(self)
        sources = {tp: offset for tp, offset in committed.items()
                   if not tp.topic.endswith("-changelog") and "__assignor" not in tp.topic}
        unpositioned = sorted((tp for tp, offset in sources.items() if offset is None or offset < 0),
                              key=lambda tp: (tp.topic, tp.partition))
        if unpositioned:
            await self.call_thread(self._ensure_consumer().seek_to_beginning, *unpositioned)
        log.info("source partitions resume", committed={f"{tp.topic}[{tp.partition}]": offset for tp, offset
                                                        in sorted(sources.items(), key=lambda i: (i[0].topic, i[0].partition))
                                                        if offset is not None and offset >= 0},
                 from_the_beginning=[f"{tp.topic}[{tp.partition}]" for tp in unpositioned])
        return committed

    seek_to_committed.__wrapped__ = original
    AIOKafkaConsumerThread.seek_to_committed = seek_to_committed


def install(bootstrap: str) -> None:
    """Make Faust's highwater lookup (table recovery) use exact end offsets."""
    global _installed
    if _installed:
        return
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = AIOKafkaConsumerThread._highwaters

    async def _highwaters(self, partitions):
        reported = await original(self, partitions)
        if self.consumer.in_transaction:
            return reported
        return await asyncio.get_running_loop().run_in_executor(None, true_end_offsets, bootstrap, reported)

    AIOKafkaConsumerThread._highwaters = _highwaters
    _installed = True
