"""``radstream topics list|lag|tail``: the Kafka topics, how far each consumer group is
behind on them, and their messages, decoded.

Registered on the ``radstream`` group by :mod:`radstream.cli`, which passes in its shared
option, settings loader and output helpers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import click

from schemas.settings import Settings


def _admin(settings: Settings) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "client.id": settings.kafka.client_id,
                        "log_level": 3})


def _consumer(settings: Settings) -> Any:
    from confluent_kafka import Consumer

    session_ms = int(settings.kafka.session_timeout_s * 1000)
    return Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "client.id": f"{settings.kafka.client_id}-cli",
        # assign() below needs no group join; the id is only required by the client.
        "group.id": f"{settings.kafka.topic_prefix}.cli",
        "enable.auto.commit": False,
        "session.timeout.ms": session_ms,
        "heartbeat.interval.ms": min(int(settings.kafka.heartbeat_interval_s * 1000), session_ms // 3),
        "enable.partition.eof": True,
        "log_level": 3,
    })


def _metadata(settings: Settings, timeout_s: float) -> Any:
    from confluent_kafka import KafkaException

    try:
        return _admin(settings).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise click.ClickException(f"broker {settings.kafka_bootstrap} did not answer: {exc.args[0]}") from None


def resolve_topic(settings: Settings, existing: Sequence[str], topic: str) -> str:
    """A full topic name, or the suffix of a radstream topic (``instance.received``)."""
    for candidate in (topic, settings.topic(topic)):
        if candidate in existing:
            return candidate
    raise click.ClickException(f"no topic {topic!r} (nor {settings.topic(topic)!r}) on {settings.kafka_bootstrap}")


def register(cli: click.Group, config_option, settings_of, console: Callable[[], Any], to_json,
             err: Callable[[str], None]) -> None:
    @cli.group()
    @config_option
    def topics() -> None:
        """Look at the Kafka topics."""

    @topics.command("list")
    @config_option
    @click.option("--all", "show_all", is_flag=True, help="also topics that are not radstream's")
    @click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True)
    @click.pass_context
    def topics_list(ctx: click.Context, show_all: bool, timeout_s: float) -> int:
        """Topics with partition and message counts (sum of exact end offsets)."""
        from rich.table import Table

        from schemas.topics import ALL_TOPICS
        from adapters.kafka import end_offsets

        settings = settings_of(ctx)
        metadata = _metadata(settings, timeout_s)
        prefix = settings.kafka.topic_prefix + "."
        names = sorted(n for n in metadata.topics if show_all or n.startswith(prefix))
        partitions = [(n, pid) for n in names for pid in sorted(metadata.topics[n].partitions)]
        ends = end_offsets(settings.kafka_bootstrap, partitions, timeout_s)
        table = Table("topic", "partitions", "messages")
        for name in names:
            total = sum(end for (topic, _pid), end in ends.items() if topic == name)
            table.add_row(name, str(len(metadata.topics[name].partitions)), str(total))
        out = console()
        out.print(table)
        missing = [spec.name(settings) for spec in ALL_TOPICS if spec.name(settings) not in metadata.topics]
        if missing:
            out.print(f"missing: {', '.join(missing)} (radstream up creates them)", highlight=False)
        return 0

    @topics.command("lag")
    @config_option
    @click.option("--all", "show_all", is_flag=True, help="also consumer groups that are not radstream's")
    @click.option("--watch", "watch_s", type=click.FloatRange(min=1), help="print again every S seconds, with rates")
    @click.option("--json", "as_json", is_flag=True, help="print a JSON list (once)")
    @click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True)
    @click.pass_context
    def topics_lag(ctx: click.Context, show_all: bool, watch_s: float | None, as_json: bool, timeout_s: float) -> int:
        """How far each consumer group is behind, by topic: the stream workers, the AI worker,
        results delivery. With --watch, how fast each reads and whether its lag grows."""
        from confluent_kafka import KafkaException
        from rich.table import Table

        from adapters.kafka import consumer_lag

        settings = settings_of(ctx)
        prefix = settings.kafka.topic_prefix

        def read() -> list:
            try:
                return consumer_lag(settings.kafka_bootstrap, lambda g: show_all or g.startswith((f"{prefix}-", f"{prefix}.")),
                                    timeout_s)
            except (KafkaException, TimeoutError) as exc:
                raise click.ClickException(f"broker {settings.kafka_bootstrap}: {exc}") from None

        rows, at = read(), time.monotonic()
        if as_json:
            click.echo(to_json([{**dataclasses.asdict(r), "lag": r.lag} for r in rows]))
            return 0
        before: dict[tuple[str, str], tuple[float, int, int]] = {}
        try:
            while True:
                table = Table("group", "topic", "partitions", "committed", "end", "lag",
                              *(("read/s", "lag change/s") if watch_s else ()))
                for r in rows:
                    rates = ()
                    if watch_s:
                        then = before.get((r.group, r.topic))
                        rates = ("", "") if then is None else (
                            f"{(r.committed - then[1]) / (at - then[0]):.1f}", f"{(r.lag - then[2]) / (at - then[0]):+.1f}")
                    table.add_row(r.group, r.topic, str(r.partitions), str(r.committed), str(r.end), str(r.lag), *rates)
                console().print(table)
                if not rows:
                    click.echo(f"no consumer group has committed offsets on {settings.kafka_bootstrap}", err=True)
                if not watch_s:
                    return 0
                before = {(r.group, r.topic): (at, r.committed, r.lag) for r in rows}
                time.sleep(max(0.0, watch_s - (time.monotonic() - at)))
                rows, at = read(), time.monotonic()
        except KeyboardInterrupt:
            return 0

    @topics.command("tail")
    @config_option
    @click.argument("topic")
    @click.option("--decode", is_flag=True, help="decode each event with the radstream Avro codec, print it as JSON")
    @click.option("--from-beginning", is_flag=True, help="start at the oldest message instead of new ones only")
    @click.option("--max", "max_messages", type=click.IntRange(1), help="stop after N messages")
    @click.option("--timeout", "timeout_s", type=float, help="stop when no message came for S seconds")
    @click.pass_context
    def topics_tail(ctx: click.Context, topic: str, decode: bool, from_beginning: bool,
                    max_messages: int | None, timeout_s: float | None) -> int:
        """Print messages of TOPIC: partition, offset, key (and the decoded event)."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

        from adapters.kafka import end_offsets

        from schemas.codec import Codec, DecodeError

        settings = settings_of(ctx)
        metadata = _metadata(settings, 10.0)
        name = resolve_topic(settings, list(metadata.topics), topic)
        partitions = sorted(metadata.topics[name].partitions)
        # "new messages only" starts at each partition's exact end (OFFSET_END trusts the
        # broker's ListOffsets, which Tansu answers with the last batch's base offset + 1)
        starts = ({pid: OFFSET_BEGINNING for pid in partitions} if from_beginning else
                  {p: end for (_, p), end in end_offsets(settings.kafka_bootstrap, [(name, p) for p in partitions]).items()})
        consumer = _consumer(settings)
        consumer.assign([TopicPartition(name, pid, starts[pid]) for pid in partitions])
        codec = Codec(settings.kafka.schema_registry_url) if decode else None
        seen = 0
        last = time.monotonic()
        try:
            while max_messages is None or seen < max_messages:
                msg = consumer.poll(0.2)
                if msg is None:
                    if timeout_s is not None and time.monotonic() - last >= timeout_s:
                        break
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        err(f"{name}: {msg.error()}")
                    continue
                last = time.monotonic()
                seen += 1
                key = msg.key().decode("utf-8", "replace") if msg.key() is not None else None
                size = len(msg.value() or b"")
                click.echo(f"{name} partition={msg.partition()} offset={msg.offset()} key={key} ({size} bytes)")
                if codec is not None:
                    try:
                        event = codec.decode(msg.value())
                    except DecodeError as exc:
                        click.echo(f"  undecodable: {exc}")
                    else:
                        click.echo(to_json({"type": type(event).__name__, **dataclasses.asdict(event)}))
        except KeyboardInterrupt:
            pass
        finally:
            consumer.close()
        return 0
