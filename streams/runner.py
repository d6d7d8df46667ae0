"""The one stage runner: every stream stage is a :class:`Stage` declaration run by :func:`run_stage`.

A stage declares its source topics and, per event type it accepts, a handler that takes
the decoded event and returns what to publish as ``(topic, event)`` pairs; the handler
calls the stage's pure functions and reads and writes its typed tables, nothing else.
The runner owns the rest, once for every stage: decoding, the type check, timing,
metrics, sending, and the dead letter with its reason, source topic and offset
(``undecodable``, ``unexpected_event``, ``stage_error`` with the trace id). A handler
that raises never stops the agent, because Faust would not restart it. A blocking
handler that failed because a service could not be reached (:data:`TRANSIENT`: the
object store restarting, say) is called again after each of
``worker.transient_retries_s``, holding its partition, before the event is
dead-lettered as ``service_unavailable`` (a letter worth sending again once the service
is back, unlike a ``stage_error``); blocking handlers write no tables, so calling one
again is safe.

A handler may also be a coroutine function, for a stage whose work waits on others
(the AI stage's events wait for a shared, priority-ordered batch); with ``concurrency``
N such handlers run at once, and Faust commits an offset only once every earlier one
of its partition is done.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapters.telemetry import STAGE_EVENTS, STAGE_SECONDS, get_logger
from schemas.blobs import BlobUnavailable
from schemas.codec import DecodeError
from schemas.events import Record
from schemas.topics import TopicSpec, redrive_stage

if TYPE_CHECKING:
    import faust

    from streams.context import StreamContext

log = get_logger("radstream.streams")

#: one event to publish, and where
Output = tuple[TopicSpec, Record]
Handler = Callable[[Any], list[Output] | Awaitable[list[Output]]]


#: failures of a blocking handler worth trying again: a service it needs could not be reached
TRANSIENT: tuple[type[BaseException], ...] = (BlobUnavailable, ConnectionError, TimeoutError)


class Unexpected(Exception):
    """An event of an accepted type that this stage still has no business with
    (dead-lettered as ``unexpected_event``, like an event of another type)."""


@dataclass(frozen=True)
class Stage:
    """One stream stage: what it reads, and its handler for the event type of each source."""

    name: str  # the agent's name, the metrics label and the dead letter's ``stage``
    sources: tuple[TopicSpec, ...]
    #: by event type, or by source topic where two sources carry one type
    handlers: Mapping[type[Record] | TopicSpec, Handler]
    #: the handlers block (blob I/O, DICOM parsing): they run in a thread so the event
    #: loop keeps heartbeating; such a stage must not write tables
    blocking: bool = False
    #: events handled at once (Faust actors); more than one only for coroutine handlers
    concurrency: int = 1

    def __post_init__(self) -> None:
        unhandled = [spec.suffix for spec in self.sources if spec not in self.handlers and spec.event not in self.handlers]
        unread = [getattr(key, "__name__", None) or key.suffix for key in self.handlers
                  if key not in self.sources and key not in {spec.event for spec in self.sources}]
        if unhandled or unread:
            raise ValueError(f"stage {self.name!r} has no handler for {unhandled} and handlers for what it does not "
                             f"read: {unread}")

    def handler(self, spec: TopicSpec) -> Handler:
        return self.handlers[spec] if spec in self.handlers else self.handlers[spec.event]


def run_stage(ctx: StreamContext, stage: Stage) -> None:
    """Attach ``stage``'s agent to the Faust app."""
    intake = Intake.of(ctx, stage.name, stage.sources)

    async def agent(stream) -> None:
        async for message in stream.events():
            event = await intake.accept(ctx, message)
            if event is not None:
                await _handle(ctx, stage, intake.topics[message.message.topic], message, event)

    ctx.app.agent(ctx.source(*stage.sources), name=stage.name, concurrency=stage.concurrency)(agent)


@dataclass(frozen=True)
class Intake:
    """What one agent reads, and the topics whose bad messages it answers for: several
    agents read ``study.assembled``, and one bad message must give one dead letter."""

    stage: str
    topics: Mapping[str, TopicSpec]  # by topic name
    answered: frozenset[str]

    @classmethod
    def of(cls, ctx: StreamContext, stage: str, sources: tuple[TopicSpec, ...], answers: bool = True) -> Intake:
        topics = {spec.name(ctx.settings): spec for spec in sources}
        answered = {name for name, spec in topics.items() if answers and ctx.owns_bad_messages(spec, stage)}
        return cls(stage, topics, frozenset(answered))

    async def accept(self, ctx: StreamContext, message: faust.EventT) -> Record | None:
        """The message's event if it is what its topic carries; else None, after the dead
        letter if this agent answers for the topic. A record sent back from a dead letter
        to another stage is passed by (None, no dead letter)."""
        topic = message.message.topic
        redriven_to = redrive_stage(message.message.headers)
        if redriven_to is not None and redriven_to != self.stage:
            STAGE_EVENTS.labels(self.stage, "redriven_elsewhere").inc()
            return None
        try:
            event = ctx.codec.decode(message.value)
        except DecodeError as exc:
            event, reason, error = None, "undecodable", str(exc)
        else:
            if type(event) is self.topics[topic].event:
                return event
            reason, error = "unexpected_event", f"{type(event).__name__} does not belong on {topic}"
        STAGE_EVENTS.labels(self.stage, reason).inc()
        if topic in self.answered:
            await ctx.dead_letter(self.stage, reason, error, message, trace_id=getattr(event, "trace_id", None))
        elif topic in ctx.bad_message_owners:
            log.debug("bad message left to the stage that answers for its topic", stage=self.stage, topic=topic,
                      reason=reason, answered_by=ctx.bad_message_owners[topic], offset=message.message.offset)
        else:  # a dead-letter topic: its bad messages are logged, never looped back
            log.error("bad message not dead-lettered", stage=self.stage, topic=topic, reason=reason,
                      offset=message.message.offset, error=error)
        return None


async def _handle(ctx: StreamContext, stage: Stage, spec: TopicSpec, message: faust.EventT, event: Record) -> None:
    trace_id = getattr(event, "trace_id", None)
    try:
        with STAGE_SECONDS.labels(stage.name).time():
            handler = stage.handler(spec)
            if stage.blocking:
                outputs = await _call_blocking(stage.name, handler, event, ctx.settings.worker.transient_retries_s,
                                               trace_id)
            else:
                outputs = handler(event)
                if inspect.isawaitable(outputs):
                    outputs = await outputs
        for spec, output in outputs:
            await ctx.send(spec, output)
    except Unexpected as exc:
        await ctx.dead_letter(stage.name, "unexpected_event", str(exc), message, trace_id=trace_id)
        return
    except GaveUp as exc:  # the service stayed away: worth sending again once it is back
        log.error("stage gave up", stage=stage.name, trace_id=trace_id, error=str(exc))
        await ctx.dead_letter(stage.name, "service_unavailable", str(exc), message, trace_id=trace_id)
        return
    except Exception as exc:  # a bug must not stop the agent: Faust would not restart it
        log.exception("stage failed", stage=stage.name, trace_id=trace_id)
        await ctx.dead_letter(stage.name, "stage_error", f"{type(exc).__name__}: {exc}", message, trace_id=trace_id)
        return
    STAGE_EVENTS.labels(stage.name, "ok").inc()


class GaveUp(Exception):
    """A transient failure that lasted through every retry (the last one is its ``__cause__``)."""

    def __init__(self, last: BaseException, attempts: int, waited_s: float) -> None:
        super().__init__(f"{type(last).__name__}: {last} (still failing after {attempts} attempts over "
                         f"{waited_s:g} s)")


async def _call_blocking(stage: str, handler: Handler, event: Record, delays_s: tuple[float, ...],
                         trace_id: str | None) -> list[Output]:
    """``handler(event)`` in a thread, called again after each delay while it fails transiently."""
    for attempt, delay in enumerate(delays_s, start=1):
        try:
            return await asyncio.to_thread(handler, event)
        except TRANSIENT as exc:
            STAGE_EVENTS.labels(stage, "retried").inc()
            log.warning("stage failed, trying again", stage=stage, trace_id=trace_id, attempt=attempt,
                        retry_in_s=delay, error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(delay)
    try:
        return await asyncio.to_thread(handler, event)
    except TRANSIENT as exc:
        if not delays_s:
            raise
        raise GaveUp(exc, len(delays_s) + 1, sum(delays_s)) from exc
