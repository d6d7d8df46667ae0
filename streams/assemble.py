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

The Faust side is :class:`Assembly`: the two typed tables and the handlers the stage
runner (:mod:`streams.runner`) calls for instances and for clock ticks.

A late instance after a study was assembled re-opens it; the next assembly is a new
*version* of the study carrying every instance, so downstream stages and the worklist
replace the earlier version instead of losing the late image.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from adapters.telemetry import STUDIES_ASSEMBLED, get_logger
from schemas.events import (
    AssemblyTimer,
    CompletionReason,
    InstanceReceived,
    InstanceRef,
    SeriesSummary,
    StudyAssembled,
    utcnow,
)
from schemas.topics import ASSEMBLY_TIMER, INSTANCE_RECEIVED, STUDY_ASSEMBLED
from streams.runner import Output, Stage, run_stage
from streams.state import TableState, TypedTable

log = get_logger("radstream.assemble")

_STUDY_LEVEL = (
    "accession_number", "patient_id", "patient_name", "patient_birth_date", "patient_sex",
    "study_date", "study_time", "study_description", "institution_name", "referring_physician",
)


@dataclass(frozen=True)
class StoredInstance(TableState):
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


@dataclass(frozen=True)
class StudyProgress(TableState):
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
    # the event that assembled the last version ("sop:<SOP Instance UID>" or "tick:<due_at>"): if
    # it comes again, the version is sent again -- a crash may have kept this state and lost it
    assembled_by: str | None = None


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


def quiet_since_of(progress: StudyProgress, not_before: datetime | None) -> datetime:
    """When the study's quiet period started: its last instance, or ``not_before`` if later."""
    return max(progress.last_seen_at, not_before) if not_before else progress.last_seen_at


def decide(progress: StudyProgress, now: datetime, quiet_period: timedelta, retention: timedelta,
           not_before: datetime | None = None) -> Action:
    """What the clock says about a study.

    ``not_before`` is when this worker's consumption (re)started: after a restart or a
    rebalance, backlog instances still unread on the topic must get a chance to arrive
    before a study open at the crash is declared complete.
    """
    quiet_since = quiet_since_of(progress, not_before)
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


# ---------------------------------------------------------------- the stage over its tables


class Assembly:
    """The assembly stage over its two tables: the handlers the runner calls, and the
    ticks the clock sends for studies whose time may have come."""

    def __init__(self, studies: TypedTable[StudyProgress], instances: TypedTable[StoredInstance],
                 quiet_period: timedelta, retention: timedelta) -> None:
        self.studies, self.instances = studies, instances  # keyed by study_uid / "study_uid|sop_uid"
        self.quiet_period, self.retention = quiet_period, retention
        # study_uid -> SOP UIDs stored; a cache over `instances`, rebuilt from it when stale
        self.index: dict[str, set[str]] = {}
        # study_uid -> (state marker, when asked): the clock asks once per state change
        self.asked: dict[str, tuple[Any, datetime]] = {}
        # Open studies restored from the changelog must not close before the instances still
        # unread on the topic (the backlog of a crash) had their chance to arrive: the quiet
        # period counts from when this worker last finished a rebalance (recovery done,
        # consumption resuming), not from process start -- recovery can outlast it.
        self.resumed_at = utcnow()
        # whether `index` holds every stored instance (after :meth:`reindex`); until then a
        # study missing from it is looked up in the table
        self.index_complete = False
        # when the earliest open study found by the last scan falls quiet (None: none open)
        self.next_due_at: datetime | None = None

    def on_instance(self, event: InstanceReceived) -> list[Output]:
        """Store the instance and count it; the count is the stored instances of the study.

        The two tables are two changelogs, and a crash can keep the write of one and lose the
        other's: an instance stored with no study progress counting it (or none at all), or
        a progress counting an instance that was not stored. The source event then comes
        again (its offset was not committed). A resend is a duplicate only when the progress
        counts every stored instance; otherwise the progress is repaired from the stored
        instances -- else the study would never assemble, or assemble without it.
        """
        now = utcnow()
        key = f"{event.study_uid}|{event.sop_instance_uid}"
        current = self.studies.get(event.study_uid)
        previous = self.instances.get(key)
        progress, stored = add_instance(current, event, previous, now)
        sops = self._index_of(event.study_uid)
        trigger = f"sop:{event.sop_instance_uid}"
        if stored is None:
            if current is not None and current.instance_count >= len(sops):
                if current.assembled_by == trigger and not current.pending:
                    return self._send_again(current, now)
                log.info("duplicate instance ignored", trace_id=event.trace_id, sop_instance_uid=event.sop_instance_uid)
                return []
            log.warning("assembly progress repaired from the stored instances", trace_id=event.trace_id,
                        study_uid=event.study_uid, counted=current.instance_count if current else None,
                        stored=len(sops))
            progress, _ = add_instance(current, event, None, now)
        else:
            self.instances[key] = stored
            sops.add(event.sop_instance_uid)
        progress = replace(progress, instance_count=len(sops))
        self.studies[event.study_uid] = progress
        return self._emit(progress, now, trigger) if complete_by_count(progress) else []

    def reindex(self) -> None:
        """Rebuild the study -> stored SOP UIDs index from the instances table, in one pass
        (after a rebalance: recovery may have restored instances this process never saw)."""
        index: dict[str, set[str]] = {}
        for key in self.instances.keys():
            study_uid, _, sop = key.partition("|")
            index.setdefault(study_uid, set()).add(sop)
        self.index, self.index_complete = index, True

    def _index_of(self, study_uid: str) -> set[str]:
        sops = self.index.get(study_uid)
        if sops is None:  # not seen since the last reindex: new, or restored only now
            sops = self.index[study_uid] = set() if self.index_complete else self._stored_sops(study_uid)
        return sops

    def on_tick(self, tick: AssemblyTimer) -> list[Output]:
        now = utcnow()
        progress = self.studies.get(tick.study_uid)
        if progress is None:
            return []
        trigger = f"tick:{tick.due_at.isoformat()}"
        if progress.assembled_by == trigger and not progress.pending:
            return self._send_again(progress, now)
        action = decide(progress, now, self.quiet_period, self.retention, self.resumed_at)
        if action is Action.ASSEMBLE:
            return self._emit(progress, now, trigger)
        if action is Action.EXPIRE:
            for sop in self._stored_sops(tick.study_uid):
                del self.instances[f"{tick.study_uid}|{sop}"]
            del self.studies[tick.study_uid]
            self.index.pop(tick.study_uid, None)
        return []

    def due_ticks(self, now: datetime) -> list[AssemblyTimer]:
        """Ticks for the studies the clock says something about; reads only, because the
        tick travels through the topic to the agent, which decides again."""
        ticks = []
        self.next_due_at = None
        for study_uid, progress in self.studies.items():
            if decide(progress, now, self.quiet_period, self.retention, self.resumed_at) is Action.WAIT:
                if progress.pending:
                    due_at = quiet_since_of(progress, self.resumed_at) + self.quiet_period
                    if self.next_due_at is None or due_at < self.next_due_at:
                        self.next_due_at = due_at
                continue
            marker = (progress.last_seen_at, progress.version, progress.pending)
            previous = self.asked.get(study_uid)
            if previous and previous[0] == marker and now - previous[1] < self.quiet_period:
                continue  # asked already; ask again only if the tick seems lost
            self.asked[study_uid] = (marker, now)
            ticks.append(AssemblyTimer(study_uid=study_uid, due_at=now))
        for study_uid in set(self.asked) - set(self.studies.keys()):
            del self.asked[study_uid]
        return ticks

    def clock_wait_s(self, now: datetime, interval_s: float) -> float:
        """How long the clock may sleep after :meth:`due_ticks`: until the next open study's
        quiet period ends (found by that scan), so that a study closes when it falls quiet
        rather than up to a scan later; at most ``interval_s`` (expiry and lost ticks are
        found by scanning) and at least 10 ms."""
        wait_s = interval_s
        if self.next_due_at is not None:
            wait_s = min(wait_s, (self.next_due_at - now).total_seconds())
        return max(wait_s, 0.01)

    def _emit(self, progress: StudyProgress, now: datetime, trigger: str) -> list[Output]:
        progress, assembled = assemble(progress, self._stored_of(progress), now)
        self.studies[progress.study_uid] = replace(progress, assembled_by=trigger)
        STUDIES_ASSEMBLED.labels(assembled.completion_reason.value).inc()
        log.info("study assembled", trace_id=assembled.trace_id, version=assembled.version,
                 instances=assembled.instance_count, reason=assembled.completion_reason.value)
        return [(STUDY_ASSEMBLED, assembled)]

    def _send_again(self, progress: StudyProgress, now: datetime) -> list[Output]:
        """The last assembled version, again: its trigger came again, so its offset was not
        committed, and a crash can keep this table's write and lose the version's event. The
        stages after this one take it as they take any event re-read after a crash (same study,
        same version: at least once, never a new version)."""
        _, assembled = assemble(replace(progress, version=progress.version - 1, pending=True),
                                self._stored_of(progress), now)
        log.info("assembled version sent again: the event that assembled it came again", trace_id=assembled.trace_id,
                 version=assembled.version, trigger=progress.assembled_by)
        return [(STUDY_ASSEMBLED, assembled)]

    def _stored_of(self, progress: StudyProgress) -> list[StoredInstance]:
        sops = self.index.get(progress.study_uid)
        if sops is None or len(sops) != progress.instance_count:
            sops = self.index[progress.study_uid] = self._stored_sops(progress.study_uid)
        return [self.instances[f"{progress.study_uid}|{sop}"] for sop in sops]

    def _stored_sops(self, study_uid: str) -> set[str]:
        prefix = study_uid + "|"
        return {key[len(prefix):] for key in self.instances.keys() if key.startswith(prefix)}


def register(ctx) -> None:
    """Attach the assembly agent (instance.received + assembly.timer), its tables and its clock."""
    settings = ctx.settings
    assembly = Assembly(
        TypedTable.declare(ctx, "assembly-studies", StudyProgress),
        TypedTable.declare(ctx, "assembly-instances", StoredInstance),
        quiet_period=timedelta(seconds=settings.assembly.quiet_period_s),
        retention=timedelta(hours=settings.assembly.retention_h),
    )

    @ctx.app.on_rebalance_complete.connect
    async def _consumption_resumes(sender, **kwargs) -> None:
        assembly.resumed_at = utcnow()
        assembly.reindex()  # the tables are recovered by now: one pass, not one per study

    # Ticks share the instances' stream, so a tick is processed in order with the
    # instances of its partition and may modify the tables.
    run_stage(ctx, Stage("assemble", (INSTANCE_RECEIVED, ASSEMBLY_TIMER),
                         {InstanceReceived: assembly.on_instance, AssemblyTimer: assembly.on_tick}))

    @ctx.app.task
    async def assembly_clock() -> None:
        # Not a fixed-interval timer: it wakes when the next study's quiet period ends
        # (bench_e2e's quiet-period row lost up to a whole 0.5 s scan interval to it).
        interval_s = settings.assembly.scan_interval_s
        await ctx.app.sleep(interval_s)
        while not ctx.app.should_stop:
            try:
                for tick in assembly.due_ticks(utcnow()):
                    await ctx.send(ASSEMBLY_TIMER, tick)
            except Exception as exc:  # the broker away: a study asked about is asked again later
                log.warning("assembly clock could not send its ticks", error=f"{type(exc).__name__}: {exc}")
            await ctx.app.sleep(assembly.clock_wait_s(utcnow(), interval_s))
