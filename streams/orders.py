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

from dataclasses import dataclass, field, replace

from adapters.telemetry import get_logger
from schemas.events import OrderReceived, StudyAssembled, trace_id_for
from schemas.topics import ORDER_RECEIVED, STUDY_ASSEMBLED, STUDY_BY_ACCESSION, STUDY_ORDER
from streams.runner import Output, Stage, Unexpected, run_stage
from streams.state import TableState, TypedTable

log = get_logger("radstream.orders")


@dataclass(frozen=True)
class OrderJoin(TableState):
    """Join state of one accession number."""

    accession_number: str
    order: OrderReceived | None = None
    studies: dict[str, str] = field(default_factory=dict)  # study_uid -> trace_id


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


# ---------------------------------------------------------------- the stages


def register(ctx) -> None:
    """Attach ``orders-rekey`` (study.assembled -> orders.study-by-accession) and ``orders``,
    the join (order.received + orders.study-by-accession -> study.order)."""
    joins = TypedTable.declare(ctx, "orders-by-accession", OrderJoin)

    def rekeyed(study: StudyAssembled) -> list[Output]:
        travelling = rekey(study)
        return [] if travelling is None else [(STUDY_BY_ACCESSION, travelling)]

    def join_order(order: OrderReceived) -> list[Output]:
        if not order.accession_number:  # the HL7 gateway refuses these; another producer may not
            raise Unexpected("an order without accession number cannot be joined")
        _, joined = joins.apply(order.accession_number, on_order, order)
        return announced(joined)

    def join_study(study: StudyAssembled) -> list[Output]:
        if not study.accession_number:
            raise Unexpected("a study without accession number cannot be joined")
        _, joined = joins.apply(study.accession_number, on_study, study)
        return announced(joined)

    def announced(joined: list[OrderReceived]) -> list[Output]:
        for order in joined:
            log.info("order joined to study", trace_id=order.trace_id, study_uid=order.study_uid,
                     accession_number=order.accession_number, priority=order.priority)
        return [(STUDY_ORDER, order) for order in joined]

    run_stage(ctx, Stage("orders-rekey", (STUDY_ASSEMBLED,), {StudyAssembled: rekeyed}))
    # Both topics are keyed by accession number: one stream, so the join table is written
    # in partition order whichever arrives first.
    run_stage(ctx, Stage("orders", (ORDER_RECEIVED, STUDY_BY_ACCESSION),
                         {OrderReceived: join_order, StudyAssembled: join_study}))
