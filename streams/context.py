"""What every stage's agent needs: settings, the codec, topics and the dead-letter path.

Agents consume raw bytes and decode with :class:`schemas.codec.Codec` themselves, so a
message that is not a valid event becomes a dead-letter event with its reason, instead
of an exception that would kill the agent (Faust's own deserialisation would). Several
agents may read one topic; the first wired to it answers for its bad messages (not an
event, or not the topic's event), so one bad message gives one dead letter however
many stages read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faust

from schemas.codec import Codec
from schemas.events import DeadLetter, Record, utcnow
from schemas.settings import Settings
from adapters.telemetry import DEAD_LETTERS, get_logger
from schemas.topics import DEAD_LETTER, TopicSpec, key_of

log = get_logger("radstream.streams")

#: payloads larger than this are not copied into the dead letter; offsets locate them
_MAX_DLQ_PAYLOAD = 256 * 1024


@dataclass
class StreamContext:
    app: faust.App
    settings: Settings
    codec: Codec
    topics: dict[str, faust.TopicT] = field(default_factory=dict)
    #: topic name -> the stage that dead-letters its bad messages
    bad_message_owners: dict[str, str] = field(default_factory=dict)

    def topic(self, spec: TopicSpec) -> faust.TopicT:
        name = spec.name(self.settings)
        if name not in self.topics:
            self.topics[name] = self.app.topic(
                name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                partitions=self.settings.kafka.partitions, internal=False,
            )
        return self.topics[name]

    def source(self, *specs: TopicSpec) -> faust.TopicT:
        """What one agent consumes. Two topics make one stream, so their events reach the
        agent in partition order and it may write its tables for either (Faust allows
        table writes only inside stream iteration)."""
        if len(specs) == 1:
            return self.topic(specs[0])
        return self.app.topic(
            *(spec.name(self.settings) for spec in specs),
            key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        )

    def owns_bad_messages(self, spec: TopicSpec, stage: str) -> bool:
        """Whether ``stage`` dead-letters the bad messages of ``spec``: the first stage to
        ask about a topic does, every later reader skips them."""
        return self.bad_message_owners.setdefault(spec.name(self.settings), stage) == stage

    async def send(self, spec: TopicSpec, event: Record) -> None:
        await self.topic(spec).send(key=key_of(spec, event), value=self.codec.encode(event, spec.name(self.settings)))

    async def dead_letter(self, stage: str, reason: str, error: str, event: faust.EventT | None = None,
                          trace_id: str | None = None, **fields: Any) -> None:
        message = event.message if event is not None else None
        payload = message.value if message is not None else None
        key = message.key if message is not None else None
        letter = DeadLetter(
            stage=stage, reason=reason, error=error, failed_at=utcnow(), trace_id=trace_id,
            source_topic=message.topic if message else None,
            source_partition=message.partition if message else None,
            source_offset=message.offset if message else None,
            key=key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
            payload=payload if isinstance(payload, bytes) and len(payload) <= _MAX_DLQ_PAYLOAD else None,
            **fields,
        )
        DEAD_LETTERS.labels(stage, reason).inc()
        log.warning("dead letter", stage=stage, reason=reason, error=error, trace_id=trace_id,
                    topic=letter.source_topic, offset=letter.source_offset)
        await self.send(DEAD_LETTER, letter)
