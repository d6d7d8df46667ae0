"""The reader roster: who may read what, where and when, from a TOML file validated at load.

A roster file lists ``[[reader]]`` entries (subspecialties, licensed states, credentialed
sites, capacity, shifts with IANA time zones; a shift whose end is not after its start runs
overnight and belongs to the day it starts) and the SLA targets per urgency with per-site
overrides (``[sla]``). It is checked once, at load, the way highdicom checks its objects: an
unknown key, a state that is not a US state/territory code (licensure is per state, ACR), a
time zone zoneinfo does not know, a duplicate reader id all fail with the file and the key
(``roster.toml: reader[3].licensed_states[1]: 'XX' is not a US state/territory code``).
:class:`Roster` is the validated roster, indexed by state, site and subspecialty so that
assignment (:mod:`streams.assign`) intersects sets instead of scanning readers;
:class:`RosterReloader` re-reads the file when it changes and keeps the last good roster
when an edit is invalid. The validation models (pydantic) stay here, not in ``schemas/``:
the roster is configuration of this stage, like the routing rules, not an event contract.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from adapters.telemetry import get_logger
from schemas.toml_files import read_toml

log = get_logger("radstream.roster")

#: USPS codes of the 50 states, DC and the inhabited territories: where a reader can be licensed.
US_STATES = frozenset(
    "AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY NC ND "
    "OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY DC PR GU VI AS MP".split())
#: Subspecialties, named as the routing rules name them (streams/rules/default.toml).
SUBSPECIALTIES = frozenset({"neuroradiology", "thoracic", "body", "msk", "breast", "nuclear", "ultrasound",
                            "general", "pediatric", "cardiac", "interventional", "emergency"})
#: Other names people use for them; a roster or a rule may say either.
SUBSPECIALTY_ALIASES = {"neuro": "neuroradiology", "chest": "thoracic", "cardiothoracic": "thoracic",
                        "musculoskeletal": "msk", "abdominal": "body", "abdomen": "body", "nm": "nuclear",
                        "peds": "pediatric", "us": "ultrasound", "ir": "interventional"}
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
#: SLA urgencies, most urgent first: STAT orders and critical (incl. AI-critical) studies share 30 min.
URGENCIES = ("critical", "stat", "urgent", "routine")
DEFAULT_SLA_MINUTES = {"critical": 30, "stat": 30, "urgent": 60, "routine": 240}


class RosterError(ValueError):
    """A roster file is invalid; every line names the file and the key."""


def canonical_subspecialty(name: str) -> str:
    name = name.strip().lower()
    return SUBSPECIALTY_ALIASES.get(name, name)


# ---------------------------------------------------------------- validation (the file's shape)


def _state(value: str) -> str:
    code = value.strip().upper()
    if code not in US_STATES:
        raise ValueError(f"{value!r} is not a US state/territory code")
    return code


def _site(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError(f"{value!r} is not a site name (letters, digits, . _ -)")
    return value.upper()


def _subspecialty(value: str) -> str:
    name = canonical_subspecialty(value)
    if name not in SUBSPECIALTIES:
        raise ValueError(f"{value!r} is not a known subspecialty (known: {', '.join(sorted(SUBSPECIALTIES))})")
    return name


def _clock(value: str) -> str:
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d|24:00", value):
        raise ValueError(f"{value!r} is not a time of day HH:MM (00:00-23:59, or 24:00 as an end)")
    return value


def _days(value: str) -> str:
    _parse_days(value)
    return value


def _tz(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone (e.g. America/Chicago)") from None
    return value


State = Annotated[str, AfterValidator(_state)]
Site = Annotated[str, AfterValidator(_site)]
Subspecialty = Annotated[str, AfterValidator(_subspecialty)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ShiftEntry(_Strict):
    days: Annotated[str, AfterValidator(_days)]
    start: Annotated[str, AfterValidator(_clock)]
    end: Annotated[str, AfterValidator(_clock)]
    tz: Annotated[str, AfterValidator(_tz)]


class ReaderEntry(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    name: str = Field(min_length=1)
    subspecialties: list[Subspecialty] = Field(min_length=1)
    licensed_states: list[State] = Field(min_length=1)
    credentialed_sites: list[Site] = Field(min_length=1)
    capacity: int = Field(ge=1, le=1000)
    minutes_per_study: float | None = Field(None, gt=0, le=480)
    shifts: list[ShiftEntry] = Field(min_length=1)


class SlaMinutes(_Strict):
    critical: int | None = Field(None, ge=1, le=10080)
    stat: int | None = Field(None, ge=1, le=10080)
    urgent: int | None = Field(None, ge=1, le=10080)
    routine: int | None = Field(None, ge=1, le=10080)


class SlaEntry(SlaMinutes):
    site: dict[Site, SlaMinutes] = Field(default_factory=dict)


class DefaultsEntry(_Strict):
    minutes_per_study: float = Field(10.0, gt=0, le=480)


class RosterFile(_Strict):
    defaults: DefaultsEntry = DefaultsEntry()
    sla: SlaEntry = SlaEntry()
    reader: list[ReaderEntry] = Field(min_length=1)


# ---------------------------------------------------------------- the validated roster


def _parse_days(spec: str) -> frozenset[int]:
    """``Mon-Fri``, ``Sat,Sun``, ``Fri-Mon`` (wraps), ``Mon-Fri,Sun``, ``daily``."""
    if spec.strip().lower() == "daily":
        return frozenset(range(7))
    days: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        first, sep, last = (x.strip().title() for x in part.partition("-"))
        if first not in DAY_NAMES or (sep and last not in DAY_NAMES):
            raise ValueError(f"{spec!r} is not a day list like 'Mon-Fri', 'Sat,Sun' or 'daily'")
        a, b = DAY_NAMES.index(first), DAY_NAMES.index(last) if sep else DAY_NAMES.index(first)
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


@dataclass(frozen=True)
class Shift:
    """A weekly shift in the reader's own time zone; ``end <= start`` runs past midnight."""

    days: frozenset[int]  # 0 = Monday: the days the shift starts on
    start: int  # minutes after local midnight
    end: int  # minutes after local midnight (1440 = 24:00)
    tz: ZoneInfo

    @property
    def overnight(self) -> bool:
        return self.end <= self.start

    def ends_at(self, now: datetime) -> datetime | None:
        """End (UTC) of this shift's occurrence that covers ``now``; None when off shift."""
        local = now.astimezone(self.tz)
        minute, today = local.hour * 60 + local.minute, local.date()
        if local.weekday() in self.days and minute >= self.start and (self.overnight or minute < self.end):
            return self._local(today + timedelta(days=1) if self.overnight else today, self.end)
        if self.overnight and (local.weekday() - 1) % 7 in self.days and minute < self.end:
            return self._local(today, self.end)  # the rest of yesterday's overnight shift
        return None

    def _local(self, day: date, minutes: int) -> datetime:
        return (datetime.combine(day, time.min, tzinfo=self.tz) + timedelta(minutes=minutes)).astimezone(UTC)


@dataclass(frozen=True)
class Reader:
    id: str
    name: str
    subspecialties: frozenset[str]
    licensed_states: frozenset[str]
    credentialed_sites: frozenset[str]
    capacity: int  # open assigned studies at most (STAT/critical may exceed it when no one else can read)
    minutes_per_study: float  # for the SLA estimate: when would this reader reach a study?
    shifts: tuple[Shift, ...]

    def shift_ends_at(self, now: datetime) -> datetime | None:
        """When the shift covering ``now`` ends (the latest, if shifts overlap); None: off shift."""
        ends = [end for shift in self.shifts if (end := shift.ends_at(now)) is not None]
        return max(ends) if ends else None


@dataclass(frozen=True)
class SlaPolicy:
    """Report deadlines: minutes from receipt per urgency, with per-site overrides."""

    minutes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SLA_MINUTES))
    site_minutes: dict[str, dict[str, int]] = field(default_factory=dict)

    def target(self, urgency: str, site: str) -> timedelta:
        override = self.site_minutes.get(site.upper(), {}).get(urgency)
        return timedelta(minutes=override if override is not None else self.minutes[urgency])


_NONE: frozenset[str] = frozenset()


@dataclass(frozen=True, eq=False)
class Roster:
    """Validated readers (sorted by id) and their indexes; build with :func:`build_roster`."""

    readers: tuple[Reader, ...]
    sla: SlaPolicy
    source: str
    by_id: dict[str, Reader] = field(repr=False)
    all_ids: frozenset[str] = field(repr=False)
    by_state: dict[str, frozenset[str]] = field(repr=False)
    by_site: dict[str, frozenset[str]] = field(repr=False)
    by_subspecialty: dict[str, frozenset[str]] = field(repr=False)
    _shift_cache: dict[datetime, dict[str, datetime]] = field(default_factory=dict, repr=False)

    def licensed_in(self, state: str) -> frozenset[str]:
        return self.by_state.get(state.upper(), _NONE)

    def credentialed_at(self, site: str) -> frozenset[str]:
        return self.by_site.get(site.upper(), _NONE)

    def with_subspecialty(self, subspecialty: str) -> frozenset[str]:
        return self.by_subspecialty.get(canonical_subspecialty(subspecialty), _NONE)

    def on_shift(self, now: datetime) -> dict[str, datetime]:
        """Reader id -> end of the shift covering ``now`` (UTC), for readers on shift.

        Shifts start and end on whole minutes, so the answer is the same for every instant
        of one minute and is computed once per minute (a pure cache: same input, same output).
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        minute = now.astimezone(UTC).replace(second=0, microsecond=0)
        cached = self._shift_cache.get(minute)
        if cached is None:
            if len(self._shift_cache) >= 8:
                self._shift_cache.clear()
            cached = {r.id: end for r in self.readers if (end := r.shift_ends_at(minute)) is not None}
            self._shift_cache[minute] = cached
        return cached


def build_roster(readers: list[Reader], sla: SlaPolicy | None = None, source: str = "<roster>") -> Roster:
    readers = sorted(readers, key=lambda r: r.id)

    def index(attr: str) -> dict[str, frozenset[str]]:
        keys: dict[str, set[str]] = {}
        for reader in readers:
            for key in getattr(reader, attr):
                keys.setdefault(key, set()).add(reader.id)
        return {key: frozenset(ids) for key, ids in keys.items()}

    return Roster(readers=tuple(readers), sla=sla or SlaPolicy(), source=source,
                  by_id={r.id: r for r in readers}, all_ids=frozenset(r.id for r in readers),
                  by_state=index("licensed_states"), by_site=index("credentialed_sites"),
                  by_subspecialty=index("subspecialties"))


# ---------------------------------------------------------------- loading


def parse_roster(data: dict[str, Any], source: str = "<roster>") -> Roster:
    try:
        parsed = RosterFile.model_validate(data)
    except ValidationError as exc:
        raise RosterError(_explain(exc, data, source)) from None
    first_at: dict[str, int] = {}
    for i, entry in enumerate(parsed.reader):
        if entry.id in first_at:
            raise RosterError(f"{source}: reader[{i}].id: {entry.id!r} is used twice (first at reader[{first_at[entry.id]}])")
        first_at[entry.id] = i
        for j, shift in enumerate(entry.shifts):
            if shift.start == "24:00":
                raise RosterError(f"{source}: reader[{i}].shifts[{j}].start: 24:00 is only an end (reader {entry.id!r})")
            if shift.start == shift.end:
                raise RosterError(f"{source}: reader[{i}].shifts[{j}]: starts and ends at {shift.start}; "
                                  f"an all-day shift is start = \"00:00\", end = \"24:00\" (reader {entry.id!r})")
    readers = [
        Reader(id=e.id, name=e.name, subspecialties=frozenset(e.subspecialties),
               licensed_states=frozenset(e.licensed_states), credentialed_sites=frozenset(e.credentialed_sites),
               capacity=e.capacity, minutes_per_study=e.minutes_per_study or parsed.defaults.minutes_per_study,
               shifts=tuple(Shift(days=_parse_days(s.days), start=_minutes(s.start), end=_minutes(s.end),
                                  tz=ZoneInfo(s.tz)) for s in e.shifts))
        for e in parsed.reader
    ]
    base = {u: getattr(parsed.sla, u) or DEFAULT_SLA_MINUTES[u] for u in URGENCIES}
    sites = {site: {u: m for u in URGENCIES if (m := getattr(o, u)) is not None} for site, o in parsed.sla.site.items()}
    return build_roster(readers, SlaPolicy(minutes=base, site_minutes=sites), source)


def load_roster(path: Path | str) -> Roster:
    path = Path(path)
    return parse_roster(read_toml(path, "roster file", RosterError), str(path))


def _explain(exc: ValidationError, data: dict[str, Any], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error",) and "input" in err and not isinstance(err["input"], (dict, list)):
                message += f" (got {err['input']!r})"
        reader_id = None
        if len(loc) > 1 and loc[0] == "reader" and isinstance(loc[1], int):
            entry = (data.get("reader") or [None] * (loc[1] + 1))[loc[1]]
            reader_id = entry.get("id") if isinstance(entry, dict) else None
        named = reader_id and key != f"reader[{loc[1]}].id"  # a bad id is not repeated as the reader's name
        lines.append(f"{source}: {key}: {message}" + (f" (reader {reader_id!r})" if named else ""))
    return "\n".join(lines)


class RosterReloader:
    """The roster of one file, re-read when the file changes (mtime, size or inode).

    The first load must succeed (an invalid roster stops the stage at start); a later
    invalid edit, or a missing file, is logged and the last good roster stays in force,
    with the error in :attr:`last_error`, until the file changes again.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._signature = self._stat()
        self._roster = load_roster(self.path)
        self.last_error: str | None = None
        self.reloads = 0

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> Roster:
        signature = self._stat()
        if signature != self._signature:
            self._signature = signature
            try:
                self._roster = load_roster(self.path)
            except RosterError as exc:
                self.last_error = str(exc)
                log.error("roster reload failed; keeping the last good roster", file=str(self.path), error=str(exc))
            else:
                self.last_error = None
                self.reloads += 1
                log.info("roster reloaded", file=str(self.path), readers=len(self._roster.readers))
        return self._roster
