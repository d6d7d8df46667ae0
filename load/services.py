"""The embedded object store and broker, started as ``radstream up`` starts them, for the
benchmarks that need only those (the pre-read stage through Kafka, the results outbox, the
STOW-RS and MLLP gateways), and the count of what a gateway put on its topic."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from adapters.kafka import ensure_topics
from radstream import procs
from schemas.settings import Settings
from schemas.topics import TopicSpec


def start_services(settings: Settings, root: Path) -> ExitStack:
    """SeaweedFS when blobs or the broker's log live on S3, then Tansu; topics created.

    Returns what stops them, in reverse order: close it (or use it as a context manager)."""
    started, env = ExitStack(), dict(os.environ)
    try:
        if settings.blobs.backend == "s3" or settings.kafka.storage.startswith("s3://"):
            from adapters.s3 import load_credentials
            from radstream.objectstore import start_embedded, stop_embedded, tansu_env

            weed = start_embedded(settings, root / "seaweedfs.log")
            started.callback(stop_embedded, weed, settings)
            env.update(tansu_env(settings, load_credentials(settings)))
        broker = procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, settings.kafka.storage,
                                   log_path=root / "tansu.log", env=env)
        started.callback(procs.stop, broker, grace_s=5)
        ensure_topics(settings)
    except BaseException:
        started.close()
        raise
    return started


#: ``--broker-storage`` of the gateway benchmarks: the durable default first, the headline.
BROKER_STORAGES = {"s3": "s3://tansu/", "memory": "memory://tansu/"}


@contextmanager
def running_gateway(settings: Settings, root: Path, module: str, port: int) -> Iterator[None]:
    """The gateway ``python -m module`` listening on ``port``, on its own fresh object store and
    broker (:func:`start_services`); all stopped on exit. Logs go to ``root``."""
    services = start_services(settings, root)
    gateway = None
    try:
        # the object store's credentials are in the data dir, which settings.to_env() names
        env = {**os.environ, **settings.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
        gateway = procs.spawn(procs.python_module(module), env=env, log_path=root / f"{module}.log")
        procs.wait_for_port(settings.bind_host, port, 60, gateway)
        yield
    finally:
        if gateway is not None:
            procs.stop(gateway, grace_s=5)
        services.close()


def events_on_topic(settings: Settings, topic: TopicSpec, idle_s: float = 2.0) -> int:
    """Events on ``topic``, counted by reading them all.

    Not from watermarks: Tansu reports a partition's end as the base offset of its last
    batch + 1, which undercounts whenever the producer batched (group commit does).
    """
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"bench-count-{time.time()}",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic.name(settings), p, 0) for p in range(settings.kafka.partitions)])
        count, last = 0, time.monotonic()
        while time.monotonic() - last < idle_s:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                count, last = count + 1, time.monotonic()
        return count
    finally:
        consumer.close()
