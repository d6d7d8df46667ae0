"""Order ↔ study join: HL7 orders meet their images on the accession number.

Orders arrive keyed by accession number (``order.received``), studies keyed by
StudyInstanceUID (``study.assembled``), in either order and possibly hours apart. The
join is a Faust table keyed by accession number, co-partitioned with the orders:

1. ``rekey`` copies every assembled study that has an accession number to the internal
   topic ``orders.study-by-accession``, keyed by accession (studies without one cannot
   be joined and stay on the worklist as they were routed);
2. ``join`` reads orders and re-keyed studies as one stream and keeps, per accession,
   the latest order and the studies seen (:class:`OrderJoin`). Whenever a study has an
   order — the order came first and the study arrives, or the study came first and the
   order arrives, or the order changes (XO, CA) — it emits the order on ``study.order``
   keyed by the study's UID, with the study's ``study_uid`` and ``trace_id``.

Routing (:mod:`streams.route`) reads ``study.order`` beside ``study.assembled``, keeps the
latest order per study, and re-routes a study already on the worklist when its order
arrives late, so both arrival orders end with the same worklist row. Orders that never
get images stay visible in the warehouse's ``orders`` table (written by the sink); the
pure functions below are the whole join logic and are unit-tested.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, replace
from typing import Any

from schemas.codec import Codec
from schemas.events import OrderReceived, StudyAssembled, trace_id_for


@dataclass(frozen=True)
class OrderJoin:
    """Join state of one accession number."""

    accession_number: str
    order: OrderReceived | None = None
    studies: dict[str, str] = field(default_factory=dict)  # study_uid -> trace_id

    def to_dict(self, codec: Codec) -> dict[str, Any]:
        return {
            "accession_number": self.accession_number,
            "order": base64.b64encode(codec.encode(self.order)).decode() if self.order else None,
            "studies": dict(self.studies),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], codec: Codec) -> OrderJoin:
        order = codec.decode(base64.b64decode(data["order"]), OrderReceived) if data.get("order") else None
        return cls(accession_number=data["accession_number"], order=order, studies=dict(data.get("studies") or {}))


def rekey(study: StudyAssembled) -> StudyAssembled | None:
    """The study as it travels to the join: without its instance list (the join needs
    only UID, trace id and accession), or None when it has no accession number."""
    if not study.accession_number:
        return None
    return study.replace(instances=[])


def for_study(order: OrderReceived, study_uid: str, trace_id: str) -> OrderReceived:
    """The order as context of one study (keyed by ``study_uid`` on ``study.order``)."""
    return order.replace(study_uid=study_uid, trace_id=trace_id)


def on_order(state: OrderJoin | None, order: OrderReceived) -> tuple[OrderJoin, list[OrderReceived]]:
    """An order (new, changed or cancelled) arrives: remember it, tell every study seen."""
    state = state or OrderJoin(accession_number=order.accession_number)
    if state.order is not None and order.received_at < state.order.received_at:
        return state, []  # an older message replayed after a newer one: the newer stands
    studies = dict(state.studies)
    if order.study_uid:  # a ZDS study UID names the study before any image arrived
        studies.setdefault(order.study_uid, trace_id_for(order.study_uid))
    state = replace(state, order=order, studies=studies)
    return state, [for_study(order, uid, trace) for uid, trace in sorted(studies.items())]


def on_study(state: OrderJoin | None, study: StudyAssembled) -> tuple[OrderJoin, list[OrderReceived]]:
    """A study with this accession number is assembled: emit its order if there is one.

    A new version of a study already joined emits nothing: routing keeps the order.
    """
    assert study.accession_number, "studies without accession number are not joined"
    state = state or OrderJoin(accession_number=study.accession_number)
    if study.study_uid in state.studies:
        return state, []
    state = replace(state, studies={**state.studies, study.study_uid: study.trace_id})
    if state.order is None:
        return state, []
    return state, [for_study(state.order, study.study_uid, study.trace_id)]


# ---------------------------------------------------------------- the thin Faust agents


def register(ctx) -> None:
    """Attach ``rekey`` (study.assembled -> orders.study-by-accession) and ``join``
    (order.received + orders.study-by-accession -> study.order)."""
    from schemas.codec import DecodeError
    from adapters.telemetry import STAGE_EVENTS, STAGE_SECONDS, get_logger
    from schemas.topics import ORDER_RECEIVED, STUDY_ASSEMBLED, STUDY_BY_ACCESSION, STUDY_ORDER

    log = get_logger("radstream.orders")
    app, settings, codec = ctx.app, ctx.settings, ctx.codec
    joins = app.Table("orders-by-accession", partitions=settings.kafka.partitions)
    # Orders and re-keyed studies share one stream, so the table is written only inside
    # stream iteration, in partition order (both topics are keyed by accession number).
    source = app.topic(
        ORDER_RECEIVED.name(settings), STUDY_BY_ACCESSION.name(settings),
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
    )

    @app.agent(ctx.topic(STUDY_ASSEMBLED), name="orders-rekey")
    async def rekey_agent(stream) -> None:
        async for event in stream.events():
            try:
                study = codec.decode(event.value, StudyAssembled)
            except DecodeError:
                continue  # routing dead-letters undecodable studies; one letter is enough
            rekeyed = rekey(study)
            if rekeyed is not None:
                await ctx.send(STUDY_BY_ACCESSION, rekeyed)

    @app.agent(source, name="orders-join")
    async def join_agent(stream) -> None:
        async for event in stream.events():
            try:
                decoded = codec.decode(event.value)
            except DecodeError as exc:
                await ctx.dead_letter("orders", "undecodable", str(exc), event)
                continue
            try:
                with STAGE_SECONDS.labels("orders").time():
                    if isinstance(decoded, OrderReceived):
                        if not decoded.accession_number:
                            continue  # ADT patient update: nothing to join on
                        key, step = decoded.accession_number, on_order
                    elif isinstance(decoded, StudyAssembled) and decoded.accession_number:
                        key, step = decoded.accession_number, on_study
                    else:
                        await ctx.dead_letter("orders", "unexpected_event",
                                              f"{type(decoded).__name__} does not belong on {event.message.topic}", event)
                        continue
                    current = joins.get(key)
                    state, joined = step(OrderJoin.from_dict(current, codec) if current else None, decoded)
                    joins[key] = state.to_dict(codec)
                for order in joined:
                    await ctx.send(STUDY_ORDER, order)
                    log.info("order joined to study", trace_id=order.trace_id, study_uid=order.study_uid,
                             accession_number=key, priority=order.priority)
            except Exception as exc:  # a bug must not stop the agent: Faust would not restart it
                log.exception("order join failed", accession_number=getattr(decoded, "accession_number", None))
                await ctx.dead_letter("orders", "stage_error", f"{type(exc).__name__}: {exc}", event,
                                      trace_id=getattr(decoded, "trace_id", None))
                continue
            STAGE_EVENTS.labels("orders", "ok").inc()
