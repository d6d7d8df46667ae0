"""``radstream deadletters list|replay``: the stream stages' dead letters, and sending each
back, once, to the one stage that failed it (:mod:`streams.runner` writes them). Only a
``service_unavailable`` or ``stage_error`` letter is replayed (an ``undecodable`` or
``unexpected_event`` one would fail the same way again): its event goes back onto its source
topic and partition, under its key, with :data:`~schemas.topics.REDRIVE_HEADER` naming the
stage, so that stage handles it and every other agent reading the topic passes it by. The
event may be older than what its stage handled since, which stages take in their stride as
they do Kafka's redeliveries (routing keeps a study's latest version; outputs are
idempotent). Each replay is an audit event (``deadletter-replayed``), and the audit topic is
what makes a replay happen once; one that fails between its produce and its audit event is
sent again by the next run. The results delivery's letters go back through ``radstream
results replay-dead``; the gateways' refusals were answered to their senders.

Exit codes: 0 done, 1 the broker could not be read or a letter could not be replayed,
2 bad arguments.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import click

from schemas.codec import Codec, DecodeError
from schemas.events import AuditEvent, DeadLetter, utcnow
from schemas.settings import Settings
from schemas.topics import AUDIT, DEAD_LETTER, REDRIVE_HEADER, REDRIVE_OF_HEADER, key_of

#: the reasons a replay can mend; the others would fail the same way again
REPLAYABLE = ("service_unavailable", "stage_error")
ACTION = "deadletter-replayed"
T = TypeVar("T")


@dataclass(frozen=True)
class Letter:
    """A dead letter and where it lies on the dead-letter topic."""

    partition: int
    offset: int
    letter: DeadLetter

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"


def _decoded(settings: Settings, suffix: str, kind: type[T], timeout_s: float) -> Iterator[tuple[int, int, T]]:
    """``(partition, offset, event)`` of every ``kind`` event on a topic, read to its true end
    (what does not decode is passed over: the sink logs it)."""
    from radstream.recording import record_topics

    codec = Codec()
    recording, _ = record_topics(settings, [suffix], timeout_s=timeout_s)
    for message in recording.messages:
        try:
            event = codec.decode(message.value or b"")
        except DecodeError:
            continue
        if isinstance(event, kind):
            yield message.partition, message.offset, event


def read_letters(settings: Settings, timeout_s: float = 30.0) -> list[Letter]:
    """Every dead letter on the topic."""
    return [Letter(*found) for found in _decoded(settings, DEAD_LETTER.suffix, DeadLetter, timeout_s)]


def replays(settings: Settings, timeout_s: float = 30.0) -> dict[str, AuditEvent]:
    """The replays made so far, by the position of their dead letter."""
    return {event.detail["dead_letter"]: event for _, _, event in _decoded(settings, AUDIT.suffix, AuditEvent, timeout_s)
            if event.action == ACTION and "dead_letter" in event.detail}


def select(letters: Iterable[Letter], stages: Sequence[str] = (), reasons: Sequence[str] = ()) -> list[Letter]:
    return [item for item in letters
            if (not stages or item.letter.stage in stages) and (not reasons or item.letter.reason in reasons)]


def not_replayable(letter: DeadLetter) -> str | None:
    """Why ``letter`` cannot go back to its stage, or None when it can."""
    if letter.stage == "delivery":
        return "a results delivery: `radstream results replay-dead` sends it again"
    if letter.source_topic is None or letter.source_partition is None or letter.source_offset is None:
        return "no source topic: a gateway's refusal, answered to its sender"
    if letter.reason not in REPLAYABLE:
        return f"{letter.reason}: it would fail the same way again"
    return None


def source_value(settings: Settings, letter: DeadLetter, timeout_s: float = 30.0) -> bytes | None:
    """The event as it was on its source topic: the letter's copy, or (too large to copy)
    the record itself while the topic still holds it."""
    if letter.payload is not None:
        return letter.payload
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.kafka.topic_prefix}.deadletters",
                         "enable.auto.commit": False, "log_level": 3})
    try:
        consumer.assign([TopicPartition(letter.source_topic, letter.source_partition, letter.source_offset)])
        message = consumer.poll(timeout_s)
        if message is None or message.error() is not None or message.offset() != letter.source_offset:
            return None  # gone with the topic's retention
        return message.value()
    finally:
        consumer.close()


def replay(settings: Settings, letters: Sequence[Letter], *, actor: str,
           progress: Callable[[str], None] = lambda line: None) -> dict[str, int]:
    """Send each letter's event back to its stage, once; counts of replayed, skipped (replayed
    before) and failed letters."""
    from confluent_kafka import Producer

    from adapters.kafka import producer_config

    done = replays(settings)
    codec, counts = Codec(), {"replayed": 0, "skipped": 0, "failed": 0}
    producer = Producer(producer_config(settings, **{"client.id": f"{settings.kafka.client_id}-deadletters"}))

    def acked(topic: str, **produce: object):
        answers: list = []
        producer.produce(topic, on_delivery=lambda error, msg: answers.append((error, msg)), **produce)
        producer.flush(30)
        if not answers or answers[0][0] is not None:
            raise RuntimeError(f"{topic}: {answers[0][0] if answers else 'no answer from the broker in 30 s'}")
        return answers[0][1]

    for item in letters:
        letter, where = item.letter, f"{item.position} {item.letter.stage} {item.letter.key or '-'}"
        if item.position in done:
            counts["skipped"] += 1
            progress(f"{where}: replayed already ({done[item.position].at:%Y-%m-%d %H:%M:%S}Z by "
                     f"{done[item.position].actor})")
            continue
        why = not_replayable(letter) or (None if (value := source_value(settings, letter)) is not None else
                                         "its event is neither in the letter nor on its topic any more")
        if why is not None:
            counts["failed"] += 1
            progress(f"{where}: cannot replay: {why}")
            continue
        try:
            sent = acked(letter.source_topic, key=letter.key.encode() if letter.key else None, value=value,
                         partition=letter.source_partition,
                         headers=[(REDRIVE_HEADER, letter.stage.encode()), (REDRIVE_OF_HEADER, item.position.encode())])
            audit = AuditEvent(trace_id=letter.trace_id or f"deadletter-{item.partition}-{item.offset}", actor=actor,
                               action=ACTION, stage=letter.stage, at=utcnow(),
                               detail={"dead_letter": item.position, "reason": letter.reason, "key": letter.key or "",
                                       "to": f"{sent.topic()}:{sent.partition()}:{sent.offset()}"})
            acked(AUDIT.name(settings), key=key_of(AUDIT, audit), value=codec.encode(audit))
        except Exception as exc:  # the broker went away: this letter stays to replay
            counts["failed"] += 1
            progress(f"{where}: cannot replay: {exc}")
            continue
        counts["replayed"] += 1
        progress(f"{where}: replayed to {sent.topic()} partition {sent.partition()} offset {sent.offset()}")
    return counts


def _when(at: datetime | None) -> str:
    return "" if at is None else at.strftime("%Y-%m-%d %H:%M:%S")


def register(cli: click.Group, config_option, settings_of, format_rows, rows_table) -> None:
    @cli.group()
    def deadletters() -> None:
        """The stream stages' dead letters: list them, send them back to their stage."""

    stage_option = click.option("--stage", "stages", multiple=True, help="only this stage's letters (repeatable)")

    @deadletters.command("list")
    @config_option
    @stage_option
    @click.option("--reason", "reasons", multiple=True, help="only letters with this reason (repeatable)")
    @click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
    @click.pass_context
    def list_letters(ctx: click.Context, stages: tuple[str, ...], reasons: tuple[str, ...], fmt: str) -> None:
        """Every dead letter, oldest first, and whether it was replayed."""
        settings = settings_of(ctx)
        try:
            letters, done = select(read_letters(settings), stages, reasons), replays(settings)
        except Exception as exc:
            click.echo(f"error: broker {settings.kafka_bootstrap}: {str(exc).strip() or type(exc).__name__}", err=True)
            ctx.exit(1)
        columns = ["position", "failed_at", "stage", "reason", "key", "trace_id", "source", "replayed", "error"]
        rows = [[item.position, _when(item.letter.failed_at), item.letter.stage, item.letter.reason,
                 item.letter.key or "", item.letter.trace_id or "",
                 (f"{item.letter.source_topic}:{item.letter.source_partition}:{item.letter.source_offset}"
                  if item.letter.source_topic else ""),
                 _when(done[item.position].at) if item.position in done else "", item.letter.error]
                for item in letters]
        if fmt == "table":
            from rich.console import Console
            Console(width=200, soft_wrap=False).print(rows_table(columns, rows))
        else:
            click.echo(format_rows(columns, rows, fmt))

    @deadletters.command("replay")
    @config_option
    @stage_option
    @click.option("--reason", "reasons", multiple=True, type=click.Choice(REPLAYABLE),
                  help="only letters with this reason (repeatable; default: both)")
    @click.option("--actor", default=getpass.getuser, show_default="your user name", help="who replays, for the audit")
    @click.option("--dry-run", is_flag=True, help="list what would be sent, send nothing")
    @click.pass_context
    def replay_letters(ctx: click.Context, stages: tuple[str, ...], reasons: tuple[str, ...], actor: str,
                       dry_run: bool) -> None:
        """Send dead-lettered events back to the stage that failed them, each once."""
        settings = settings_of(ctx)
        try:
            letters = select(read_letters(settings), stages, reasons or REPLAYABLE)
            if dry_run:
                done = replays(settings)
                for item in letters:
                    state = "replayed already" if item.position in done else "would replay"
                    click.echo(f"{item.position}\t{item.letter.stage}\t{item.letter.key or '-'}\t{state}\t"
                               f"{item.letter.error}")
                return
            counts = replay(settings, letters, actor=actor, progress=lambda line: click.echo(line, err=True))
        except Exception as exc:
            click.echo(f"error: broker {settings.kafka_bootstrap}: {str(exc).strip() or type(exc).__name__}", err=True)
            ctx.exit(1)
        click.echo(" ".join(f"{name} {count}" for name, count in counts.items()))
        if counts["failed"]:
            ctx.exit(1)
