"""Study assembly: instances arrive one by one; a study is complete when the sender
said how many to expect and that many arrived, or else after a quiet period with no
new instance (MONAI Deploy's Informatics Gateway and Orthanc's "stable study" work the
same way).

Pure functions over :class:`StudyProgress` (the per-study state kept in a Faust table
with a changelog, so it survives restarts) and the instances of the study (a second
table, one entry per instance, so that a 1,000-slice CT writes each instance to the
changelog once instead of rewriting a growing list). The clock is an argument: the
quiet period is closed by wall-clock time through :func:`decide`, which the worker calls
from a timer, not by the arrival of a later message on the partition.

A late instance after a study was assembled re-opens it; the next assembly is a new
*version* of the study carrying every instance, so downstream stages and the worklist
replace the earlier version instead of losing the late image.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.events import (
    CompletionReason,
    InstanceReceived,
    InstanceRef,
    SeriesSummary,
    StudyAssembled,
)

_STUDY_LEVEL = (
    "accession_number", "patient_id", "patient_name", "patient_birth_date", "patient_sex",
    "study_date", "study_time", "study_description", "institution_name", "referring_physician",
)


@dataclass(frozen=True)
class StoredInstance:
    """What the assembler keeps of one instance (no pixel data: that is in the blob store)."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_uri: str
    blob_size: int
    blob_sha256: str
    instance_number: int | None = None
    series_number: int | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None

    @classmethod
    def of(cls, event: InstanceReceived) -> StoredInstance:
        return cls(**{name: getattr(event, name) for name in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredInstance:
        return cls(**data)


@dataclass(frozen=True)
class StudyProgress:
    """Assembly state of one study."""

    study_uid: str
    trace_id: str
    source_site: str
    first_received_at: datetime  # gateway clock: for turnaround
    last_received_at: datetime
    last_seen_at: datetime  # worker clock: for the quiet period
    instance_count: int = 0
    expected_count: int | None = None
    version: int = 0  # last assembled version; 0 = never assembled
    pending: bool = True  # instances arrived that no assembled version contains
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("first_received_at", "last_received_at", "last_seen_at"):
            data[key] = int(getattr(self, key).timestamp() * 1000)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyProgress:
        values = dict(data)
        for key in ("first_received_at", "last_received_at", "last_seen_at"):
            values[key] = datetime.fromtimestamp(values[key] / 1000, UTC)
        return cls(**values)


class Action(enum.Enum):
    WAIT = "wait"
    ASSEMBLE = "assemble"
    EXPIRE = "expire"  # assembled long ago and quiet: forget it


def add_instance(
    progress: StudyProgress | None,
    instance: InstanceReceived,
    previous: StoredInstance | None,
    now: datetime,
) -> tuple[StudyProgress, StoredInstance | None]:
    """Account for one received instance.

    ``previous`` is what is stored under the same SOP Instance UID, if anything. A
    byte-identical resend changes nothing (C-STORE retries are common); a changed
    instance replaces the stored one and re-opens the study. Returns the new progress
    and the instance to store (None when nothing changed).
    """
    stored = StoredInstance.of(instance)
    if progress is None:
        progress = StudyProgress(
            study_uid=instance.study_uid, trace_id=instance.trace_id, source_site=instance.source_site,
            first_received_at=instance.received_at, last_received_at=instance.received_at, last_seen_at=now,
        )
    if previous is not None and previous.blob_sha256 == stored.blob_sha256:
        return progress, None
    metadata = dict(progress.metadata)
    for key in _STUDY_LEVEL:
        value = getattr(instance, key)
        if value and key not in metadata:
            metadata[key] = value
    expected = progress.expected_count
    if instance.expected_study_instances:
        expected = max(expected or 0, instance.expected_study_instances)
    progress = replace(
        progress,
        first_received_at=min(progress.first_received_at, instance.received_at),
        last_received_at=max(progress.last_received_at, instance.received_at),
        last_seen_at=now,
        instance_count=progress.instance_count + (0 if previous is not None else 1),
        expected_count=expected,
        pending=True,
        metadata=metadata,
    )
    return progress, stored


def complete_by_count(progress: StudyProgress) -> bool:
    """The sender's NumberOfStudyRelatedInstances has been reached."""
    return progress.pending and progress.expected_count is not None and progress.instance_count >= progress.expected_count


def decide(progress: StudyProgress, now: datetime, quiet_period: timedelta, retention: timedelta,
           not_before: datetime | None = None) -> Action:
    """What the clock says about a study.

    ``not_before`` is when this worker's consumption (re)started: after a restart or a
    rebalance, backlog instances still unread on the topic must get a chance to arrive
    before a study open at the crash is declared complete.
    """
    quiet_since = max(progress.last_seen_at, not_before) if not_before else progress.last_seen_at
    if progress.pending:
        if complete_by_count(progress) or now - quiet_since >= quiet_period:
            return Action.ASSEMBLE
        return Action.WAIT
    if now - quiet_since >= retention:
        return Action.EXPIRE
    return Action.WAIT


def assemble(progress: StudyProgress, instances: list[StoredInstance], now: datetime) -> tuple[StudyProgress, StudyAssembled]:
    """Build the next version of the study from every instance it has.

    The stored instances are the truth about membership: if the progress count
    disagrees (it cannot, unless a changelog was cut short), the count is corrected.
    """
    if len(instances) != progress.instance_count:
        progress = replace(progress, instance_count=len(instances))
    ordered = sorted(instances, key=lambda i: (i.series_number or 0, i.series_uid, i.instance_number or 0, i.sop_instance_uid))
    series: dict[str, list[StoredInstance]] = {}
    for inst in ordered:
        series.setdefault(inst.series_uid, []).append(inst)
    summaries = [
        SeriesSummary(
            series_uid=uid, instance_count=len(members), series_number=members[0].series_number,
            modality=_first(m.modality for m in members), body_part_examined=_first(m.body_part_examined for m in members),
            series_description=_first(m.series_description for m in members),
        )
        for uid, members in series.items()
    ]
    reason = CompletionReason.EXPECTED_COUNT_REACHED if complete_by_count(progress) else CompletionReason.QUIET_PERIOD_ELAPSED
    version = progress.version + 1
    event = StudyAssembled(
        trace_id=progress.trace_id,
        study_uid=progress.study_uid,
        version=version,
        source_site=progress.source_site,
        instance_count=len(ordered),
        expected_instance_count=progress.expected_count,
        modalities=_unique(s.modality for s in summaries),
        body_parts=_unique((s.body_part_examined or "").upper() for s in summaries),
        series=summaries,
        instances=[
            InstanceRef(sop_instance_uid=i.sop_instance_uid, series_uid=i.series_uid, sop_class_uid=i.sop_class_uid,
                        transfer_syntax_uid=i.transfer_syntax_uid, blob_uri=i.blob_uri, blob_size=i.blob_size,
                        instance_number=i.instance_number)
            for i in ordered
        ],
        first_received_at=progress.first_received_at,
        last_received_at=progress.last_received_at,
        assembled_at=now,
        completion_reason=reason,
        **{key: progress.metadata.get(key) for key in _STUDY_LEVEL},
    )
    return replace(progress, version=version, pending=False), event


def _first(values) -> str | None:
    return next((v for v in values if v), None)


def _unique(values) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


# ---------------------------------------------------------------- the thin Faust agent


def register(ctx) -> None:
    """Attach the assembly agent, its two tables and its clock to the Faust app."""
    from schemas.codec import DecodeError
    from schemas.events import AssemblyTimer, utcnow
    from adapters.telemetry import STAGE_EVENTS, STAGE_SECONDS, STUDIES_ASSEMBLED, get_logger
    from schemas.topics import ASSEMBLY_TIMER, INSTANCE_RECEIVED, STUDY_ASSEMBLED

    log = get_logger("radstream.assemble")
    app, settings = ctx.app, ctx.settings
    quiet = timedelta(seconds=settings.assembly.quiet_period_s)
    retention = timedelta(hours=settings.assembly.retention_h)
    partitions = settings.kafka.partitions
    # keys are strings, values JSON dicts (StudyProgress / StoredInstance .to_dict()); a
    # Faust model type here would make recovery call .from_data on plain dicts
    studies = app.Table("assembly-studies", partitions=partitions)
    instances = app.Table("assembly-instances", partitions=partitions)
    # study_uid -> SOP UIDs stored; a cache over `instances`, rebuilt from it when stale
    index: dict[str, set[str]] = {}
    # study_uid -> (state marker, when asked): the clock asks once per state change
    asked: dict[str, tuple[Any, datetime]] = {}
    # Open studies restored from the changelog must not close before the instances still
    # unread on the topic (the backlog of a crash) had their chance to arrive: the quiet
    # period counts from when this worker last finished a rebalance (recovery done,
    # consumption resuming), not from process start -- recovery can outlast it.
    resumed = {"at": utcnow()}

    @app.on_rebalance_complete.connect
    async def _consumption_resumes(sender, **kwargs) -> None:
        resumed["at"] = utcnow()
    # Instances and clock ticks share one stream, so a tick is processed in order with
    # the instances of its partition, and may modify the tables (Faust allows table
    # writes only inside stream iteration).
    source = app.topic(
        INSTANCE_RECEIVED.name(settings), ASSEMBLY_TIMER.name(settings),
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
    )

    def stored_of(progress: StudyProgress) -> list[StoredInstance]:
        sops = index.get(progress.study_uid)
        if sops is None or len(sops) != progress.instance_count:
            prefix = progress.study_uid + "|"
            sops = {key[len(prefix):] for key in instances.keys() if key.startswith(prefix)}
            index[progress.study_uid] = sops
        return [StoredInstance.from_dict(instances[f"{progress.study_uid}|{sop}"]) for sop in sops]

    async def emit(progress: StudyProgress, now: datetime) -> None:
        progress, assembled = assemble(progress, stored_of(progress), now)
        studies[progress.study_uid] = progress.to_dict()
        await ctx.send(STUDY_ASSEMBLED, assembled)
        STUDIES_ASSEMBLED.labels(assembled.completion_reason.value).inc()
        log.info("study assembled", trace_id=assembled.trace_id, version=assembled.version,
                 instances=assembled.instance_count, reason=assembled.completion_reason.value)

    async def on_instance(event: InstanceReceived, now: datetime) -> None:
        key = f"{event.study_uid}|{event.sop_instance_uid}"
        previous = instances.get(key)
        current = studies.get(event.study_uid)
        progress, stored = add_instance(
            StudyProgress.from_dict(current) if current else None, event,
            StoredInstance.from_dict(previous) if previous else None, now,
        )
        if stored is None:
            log.info("duplicate instance ignored", trace_id=event.trace_id, sop_instance_uid=event.sop_instance_uid)
            return
        instances[key] = stored.to_dict()
        index.setdefault(event.study_uid, set()).add(event.sop_instance_uid)
        studies[event.study_uid] = progress.to_dict()
        if complete_by_count(progress):
            await emit(progress, now)

    async def on_tick(tick: AssemblyTimer, now: datetime) -> None:
        current = studies.get(tick.study_uid)
        if current is None:
            return
        progress = StudyProgress.from_dict(current)
        action = decide(progress, now, quiet, retention, resumed["at"])
        if action is Action.ASSEMBLE:
            await emit(progress, now)
        elif action is Action.EXPIRE:
            for sop in {key.split("|", 1)[1] for key in instances.keys() if key.startswith(tick.study_uid + "|")}:
                del instances[f"{tick.study_uid}|{sop}"]
            del studies[tick.study_uid]
            index.pop(tick.study_uid, None)

    @app.agent(source, name="assemble")
    async def assemble_agent(stream) -> None:
        async for event in stream.events():
            try:
                decoded = ctx.codec.decode(event.value)
            except DecodeError as exc:
                await ctx.dead_letter("assemble", "undecodable", str(exc), event)
                continue
            now = utcnow()
            try:
                with STAGE_SECONDS.labels("assemble").time():
                    if isinstance(decoded, InstanceReceived):
                        await on_instance(decoded, now)
                    elif isinstance(decoded, AssemblyTimer):
                        await on_tick(decoded, now)
                    else:
                        await ctx.dead_letter("assemble", "unexpected_event",
                                              f"{type(decoded).__name__} does not belong on {event.message.topic}", event)
                        continue
            except Exception as exc:  # a bug must not stop the agent: Faust would not restart it
                log.exception("assembly failed", study_uid=getattr(decoded, "study_uid", None))
                await ctx.dead_letter("assemble", "stage_error", f"{type(exc).__name__}: {exc}", event,
                                      trace_id=getattr(decoded, "trace_id", None))
                continue
            STAGE_EVENTS.labels("assemble", "ok").inc()

    @app.timer(interval=settings.assembly.scan_interval_s, name="assembly-clock")
    async def assembly_clock() -> None:
        # Reads only: the tick travels through the topic to the agent, which decides again.
        now = utcnow()
        for study_uid, raw in list(studies.items()):
            progress = StudyProgress.from_dict(raw)
            if decide(progress, now, quiet, retention, resumed["at"]) is Action.WAIT:
                continue
            marker = (progress.last_seen_at, progress.version, progress.pending)
            previous = asked.get(study_uid)
            if previous and previous[0] == marker and now - previous[1] < quiet:
                continue  # asked already; ask again only if the tick seems lost
            asked[study_uid] = (marker, now)
            await ctx.send(ASSEMBLY_TIMER, AssemblyTimer(study_uid=study_uid, due_at=now))
        for study_uid in set(asked) - set(studies.keys()):
            del asked[study_uid]
