"""Exact changelog end offsets for Faust table recovery, on brokers that misreport them.

Tansu 0.6 (the embedded broker) answers ListOffsets(latest) with the *base offset of
the last record batch + 1* instead of the offset after the last record: a changelog
holding offsets 0-7 written in two batches (0-4, 5-7) reports 6. Faust recovers a table
by reading its changelog up to that "highwater" and then stops, so the newest state of a
table -- an open study's last instances -- would be silently missing after a restart,
while the source offsets that produced it are already committed.

:func:`install` wraps Faust's highwater lookup: for each partition it reads from the
reported end minus one (the start of the last batch on Tansu, the last record on Kafka)
and takes the offset after the last record it finds. On a correct broker that reads one
record per changelog partition and changes nothing. ``kafka.verify_end_offsets``
switches it off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from schemas.telemetry import get_logger

log = get_logger("radstream.offsets")

_installed = False


def true_end_offsets(bootstrap: str, reported: Mapping[Any, int], idle_s: float = 0.3,
                     limit_s: float = 10.0) -> dict[Any, int]:
    """``reported`` end offsets, corrected by reading each partition's last batch."""
    ends = dict(reported)
    start = {tp: end - 1 for tp, end in reported.items() if end and end > 0}
    if not start:
        return ends
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "radstream-end-offsets",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    keys = {(tp.topic, tp.partition): tp for tp in start}
    try:
        consumer.assign([TopicPartition(tp.topic, tp.partition, offset) for tp, offset in start.items()])
        deadline, last_seen = time.monotonic() + limit_s, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_seen < idle_s:
            msg = consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            last_seen = time.monotonic()
            tp = keys[(msg.topic(), msg.partition())]
            ends[tp] = max(ends[tp], msg.offset() + 1)
    finally:
        consumer.close()
    for tp, end in ends.items():
        if end != reported[tp]:
            log.info("corrected changelog end offset", topic=tp.topic, partition=tp.partition,
                     reported=reported[tp], actual=end)
    return ends


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
