"""Synthetic traffic, planned: which studies arrive when, from which site, with which order.

:func:`plan` is pure and seeded: the same arguments and seed give the same list of
:class:`PlannedStudy`, to the last float. Arrivals are a Poisson process at the asked rate
(exponential gaps; with ``diurnal`` the rate follows :data:`DIURNAL_HOURLY` over a simulated
day, by thinning); the modality mix, the STAT share and the order timing are exact quotas of
the studies drawn, dealt in random order, so a run carries the mix it was asked for. Each
aspect draws from its own seeded stream: changing the STAT share does not move an arrival.
The studies become DICOM instances in :mod:`radstream.traffic_studies`, go through the
gateways in :mod:`radstream.traffic_run` and are found again in :mod:`radstream.traffic_report`.
Over 400 lines: the plan's vocabulary (procedures, sizes, the diurnal curve) and the parsing
of the command line's values for it live together.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

#: Modalities the generator has templates for (radstream.traffic_studies).
MODALITIES = ("CR", "DX", "CT", "MR")
#: A teleradiology network's mix by study count: mostly radiographs, a third CT, some MR.
DEFAULT_MIX = {"CR": 0.35, "DX": 0.15, "CT": 0.3, "MR": 0.2}
#: States the sites scan in when none are given (USPS codes; assignment checks licensure by them).
DEFAULT_STATES = ("NV", "CA", "TX", "NY", "FL", "AZ", "IL")

#: Relative study volume by hour of day (0-23) in a network serving EDs and outpatient imaging:
#: a night trough around 04:00 at a fifth of the peak, outpatient hours 09:00-16:00, an evening
#: ED shoulder. Interpolated linearly between the hours and scaled to a daily mean of 1.
DIURNAL_HOURLY = (0.45, 0.38, 0.33, 0.30, 0.30, 0.35, 0.50, 0.80, 1.15, 1.45, 1.60, 1.65,
                  1.55, 1.55, 1.60, 1.55, 1.40, 1.20, 1.05, 0.95, 0.85, 0.75, 0.65, 0.55)
_DIURNAL_MEAN = sum(DIURNAL_HOURLY) / 24
DIURNAL_PEAK = max(DIURNAL_HOURLY) / _DIURNAL_MEAN

_FAMILY = ("SMITH", "GARCIA", "NGUYEN", "JOHNSON", "MARTINEZ", "KIM", "BROWN", "LOPEZ", "PATEL", "DAVIS",
           "WILSON", "ANDERSON", "THOMAS", "HERNANDEZ", "MOORE", "CHEN", "TAYLOR", "JACKSON", "WHITE", "LEE")
_GIVEN = {"F": ("MARIA", "JENNIFER", "LINDA", "ANA", "SUSAN", "EMILY", "GRACE", "MEI", "SARAH", "ROSA"),
          "M": ("JAMES", "JOSE", "DAVID", "MICHAEL", "WEI", "ROBERT", "DANIEL", "LUIS", "JOHN", "SAMUEL")}


class PlanError(ValueError):
    """A traffic request that cannot be planned; the message names the option to change."""


class Transport(StrEnum):
    """How a site's images reach radstream."""

    DICOM = "DICOM"  # C-STORE, one association per study (PS3.4 Annex B)
    STOW = "STOW-RS"  # DICOMweb, multipart/related POSTs (PS3.18 10.5)


class OrderTiming(StrEnum):
    """When the study's HL7 ORM^O01 arrives, relative to its images."""

    BEFORE = "before"
    AFTER = "after"
    NONE = "none"


@dataclass(frozen=True)
class Site:
    name: str  # the calling AE title, the STOW token's site and the HL7 sending facility
    state: str  # USPS code of the state it scans in (PID-11 of its orders)
    modalities: frozenset[str] = frozenset(MODALITIES)  # what it has scanners for
    transport: Transport = Transport.DICOM


@dataclass(frozen=True)
class Procedure:
    """What was ordered and performed: OBR-4 code and text, the DICOM description and body part."""

    code: str
    description: str
    body_part: str
    reason: str  # OBR-31 reason for study, code^text^coding system
    weight: float = 1.0


#: Procedures per modality and their share of that modality's studies.
PROCEDURES: Mapping[str, tuple[Procedure, ...]] = {
    "CR": (Procedure("XRCHEST2", "XR CHEST PA AND LATERAL", "CHEST", "R05.9^Cough^I10", 0.7),
           Procedure("XRCHESTPORT", "XR CHEST PORTABLE AP", "CHEST", "R06.02^Shortness of breath^I10", 0.3)),
    "DX": (Procedure("XRKNEE3", "XR KNEE 3 VIEWS", "KNEE", "M25.561^Pain in right knee^I10", 0.4),
           Procedure("XRANKLE3", "XR ANKLE 3 VIEWS", "ANKLE", "S99.911A^Ankle injury^I10", 0.3),
           Procedure("XRHAND3", "XR HAND 3 VIEWS", "HAND", "S69.91XA^Hand injury^I10", 0.3)),
    "CT": (Procedure("CTHEADWO", "CT HEAD WITHOUT CONTRAST", "HEAD", "R51.9^Headache^I10", 0.5),
           Procedure("CTCHESTW", "CT CHEST WITH CONTRAST", "CHEST", "R91.8^Lung nodule^I10", 0.2),
           Procedure("CTABDPELW", "CT ABDOMEN PELVIS WITH CONTRAST", "ABDOMEN", "R10.9^Abdominal pain^I10", 0.3)),
    "MR": (Procedure("MRBRAINWWO", "MR BRAIN WITH AND WITHOUT CONTRAST", "BRAIN", "G43.909^Migraine^I10", 0.6),
           Procedure("MRLSPINEWO", "MR LUMBAR SPINE WITHOUT CONTRAST", "LSPINE", "M54.50^Low back pain^I10", 0.4)),
}


@dataclass(frozen=True)
class StudySizes:
    """Instances per study, by modality: ranges drawn uniformly (inclusive).

    ``scale`` multiplies the two large counts, CT slices and MR images per series (never
    below one): the realistic sizes are the defaults, and a small machine keeps the study
    rate while sending fewer slices.
    """

    scale: float = 1.0
    cr_images: tuple[int, int] = (1, 3)  # one series per view
    dx_images: tuple[int, int] = (1, 4)  # one series
    ct_slices: tuple[int, int] = (100, 300)  # the axial series, after a one-image localizer series
    mr_series: tuple[int, int] = (3, 6)
    mr_images: tuple[int, int] = (20, 40)  # per series

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise PlanError(f"--scale must be above 0 (got {self.scale})")
        for name in ("cr_images", "dx_images", "ct_slices", "mr_series", "mr_images"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise PlanError(f"{name.replace('_', ' ')} {low}-{high}: need 1 <= min <= max")

    def _scaled(self, value: int) -> int:
        return max(1, math.floor(value * self.scale + 0.5))

    def series_for(self, modality: str, rng: random.Random) -> tuple[int, ...]:
        """Instance count of each series of one study."""
        if modality == "CR":
            return (1,) * rng.randint(*self.cr_images)
        if modality == "DX":
            return (rng.randint(*self.dx_images),)
        if modality == "CT":
            return 1, self._scaled(rng.randint(*self.ct_slices))
        if modality == "MR":
            return tuple(self._scaled(rng.randint(*self.mr_images)) for _ in range(rng.randint(*self.mr_series)))
        raise PlanError(f"no template for modality {modality!r} (one of {', '.join(MODALITIES)})")

    def mean_instances(self, modality: str) -> float:
        """Expected instances of one study (for the dry run's load estimate)."""
        def mean(span: tuple[int, int], scaled: bool = False) -> float:
            values = range(span[0], span[1] + 1)
            return sum(self._scaled(v) if scaled else v for v in values) / len(values)
        return {"CR": mean(self.cr_images), "DX": mean(self.dx_images), "CT": 1 + mean(self.ct_slices, True),
                "MR": mean(self.mr_series) * mean(self.mr_images, True)}[modality]


@dataclass(frozen=True)
class PlannedStudy:
    index: int
    at_s: float  # when its first image is due, seconds from the start of the run
    modality: str
    site: str
    transport: Transport
    procedure: Procedure
    series: tuple[int, ...]  # instances per series
    stat: bool
    order: OrderTiming
    order_gap_s: float  # BEFORE: the order leads the first image by this; AFTER: it follows the last ack by this
    patient_name: str  # FAMILY^GIVEN (PN)
    patient_sex: str
    patient_age: int
    patient_state: str

    @property
    def instances(self) -> int:
        return sum(self.series)

    @property
    def order_at_s(self) -> float | None:
        """When an order sent BEFORE the images is due (never before the run starts)."""
        return max(0.0, self.at_s - self.order_gap_s) if self.order is OrderTiming.BEFORE else None


@dataclass(frozen=True)
class DiurnalClock:
    """The run on a simulated clock: ``day_s`` seconds of run per simulated 24 h, from ``start_hour``."""

    day_s: float
    start_hour: float = 0.0

    def hour_at(self, offset_s: float) -> float:
        return (self.start_hour + 24.0 * offset_s / self.day_s) % 24.0

    def factor_at(self, offset_s: float) -> float:
        return diurnal_factor(self.hour_at(offset_s))


def diurnal_factor(hour: float) -> float:
    """The rate at ``hour`` (0-24, fractional) relative to the daily mean (:data:`DIURNAL_HOURLY`)."""
    low = math.floor(hour) % 24
    frac = hour - math.floor(hour)
    value = DIURNAL_HOURLY[low] * (1 - frac) + DIURNAL_HOURLY[(low + 1) % 24] * frac
    return value / _DIURNAL_MEAN


def arrival_times(rate_per_hour: float, duration_s: float, rng: random.Random,
                  factor: Callable[[float], float] | None = None, peak: float = 1.0,
                  count: int | None = None) -> list[float]:
    """Arrival offsets in [0, duration_s) of a Poisson process of ``rate_per_hour`` x ``factor(t)``.

    Thinning (Lewis and Shedler): candidates at the peak rate, each kept with probability
    factor/peak. With ``count`` the number is fixed and the times are drawn from the same
    intensity (a Poisson process conditioned on its count), sorted.
    """
    def keep(t: float) -> bool:
        return factor is None or rng.random() * peak < factor(t)

    if count is not None:
        times: list[float] = []
        while len(times) < count:
            t = rng.random() * duration_s
            if keep(t):
                times.append(t)
        return sorted(times)
    per_second = rate_per_hour / 3600.0 * (peak if factor is not None else 1.0)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(per_second)
        if t >= duration_s:
            return times
        if keep(t):
            times.append(t)


def _rounded(value: float) -> int:
    return math.floor(value + 0.5)


def quota(n: int, weights: Mapping[str, float]) -> list[str]:
    """``n`` keys in proportion to ``weights`` (largest remainder), in key order: exact, unshuffled."""
    total = sum(weights.values())
    exact = {key: n * w / total for key, w in weights.items()}
    counts = {key: math.floor(v) for key, v in exact.items()}
    by_remainder = sorted(weights, key=lambda key: (-(exact[key] - counts[key]), list(weights).index(key)))
    for key in by_remainder[: n - sum(counts.values())]:
        counts[key] += 1
    return [key for key in weights for _ in range(counts[key])]


def plan(rate_per_hour: float, duration_s: float, mix: Mapping[str, float], sites: Sequence[Site],
         stat_fraction: float, order_first_fraction: float, diurnal: bool, seed: int, *,
         count: int | None = None, order_fraction: float = 0.9, sizes: StudySizes = StudySizes(),
         order_gap_s: tuple[float, float] = (1.0, 10.0), clock: DiurnalClock | None = None) -> list[PlannedStudy]:
    """The studies of one run, in arrival order.

    ``mix``: modality -> share of studies; ``sites``: who sends (a study goes to a site that
    has its modality, at random); ``order_fraction`` of studies get an HL7 order,
    ``order_first_fraction`` of those before the images (the rest after), ``stat_fraction``
    of all studies are ordered STAT (always studies with an order). ``count`` fixes the
    number of studies instead of drawing it from the rate. ``diurnal`` modulates the rate
    by the simulated hour (``clock``; default: the run is one simulated day from midnight).
    """
    _check(rate_per_hour, duration_s, mix, sites, stat_fraction, order_first_fraction, order_fraction, count,
           order_gap_s)
    clock = clock or DiurnalClock(day_s=duration_s)
    stream = lambda aspect: random.Random(f"radstream-traffic:{seed}:{aspect}")  # noqa: E731
    times = arrival_times(rate_per_hour, duration_s, stream("arrivals"),
                          clock.factor_at if diurnal else None, DIURNAL_PEAK, count)
    n = len(times)
    modalities = quota(n, {m: w for m, w in mix.items() if w > 0})
    stream("modalities").shuffle(modalities)
    ordered = _chosen(stream("orders"), range(n), order_fraction * n)
    stat = _chosen(stream("stat"), sorted(ordered), stat_fraction * n)
    first = _chosen(stream("order-first"), sorted(ordered), order_first_fraction * len(ordered))
    rng_site, rng_size, rng_gap, rng_patient = (stream(a) for a in ("sites", "sizes", "gaps", "patients"))
    studies = []
    for index, (at_s, modality) in enumerate(zip(times, modalities)):
        site = rng_site.choice([s for s in sites if modality in s.modalities])
        procedures = PROCEDURES[modality]
        procedure = rng_size.choices(procedures, weights=[p.weight for p in procedures])[0]
        timing = (OrderTiming.BEFORE if index in first else OrderTiming.AFTER) if index in ordered else OrderTiming.NONE
        sex = rng_patient.choice("FM")
        studies.append(PlannedStudy(
            index=index, at_s=at_s, modality=modality, site=site.name, transport=site.transport,
            procedure=procedure, series=sizes.series_for(modality, rng_size), stat=index in stat, order=timing,
            order_gap_s=rng_gap.uniform(*order_gap_s) if timing is not OrderTiming.NONE else 0.0,
            patient_name=f"{rng_patient.choice(_FAMILY)}^{rng_patient.choice(_GIVEN[sex])}",
            patient_sex=sex, patient_age=rng_patient.randint(18, 92), patient_state=site.state))
    return studies


def _chosen(rng: random.Random, population: Sequence[int] | range, wanted: float) -> frozenset[int]:
    population = list(population)
    return frozenset(rng.sample(population, min(len(population), _rounded(wanted))))


def _check(rate_per_hour: float, duration_s: float, mix: Mapping[str, float], sites: Sequence[Site],
           stat_fraction: float, order_first_fraction: float, order_fraction: float, count: int | None,
           order_gap_s: tuple[float, float]) -> None:
    if count is None and not rate_per_hour > 0:
        raise PlanError(f"--rate must be above 0 studies/h (got {rate_per_hour})")
    if count is not None and count < 0:
        raise PlanError(f"--count must be 0 or more (got {count})")
    if not duration_s > 0:
        raise PlanError(f"--duration must be above 0 s (got {duration_s})")
    unknown = sorted(set(mix) - set(MODALITIES))
    if unknown or not mix or any(w < 0 for w in mix.values()) or not sum(mix.values()) > 0:
        raise PlanError(f"--mix needs positive shares of {', '.join(MODALITIES)} (got {dict(mix)})")
    if not sites:
        raise PlanError("--sites names no site")
    for modality in (m for m, w in mix.items() if w > 0):
        if not any(modality in s.modalities for s in sites):
            raise PlanError(f"--mix has {modality} but no site in --sites scans {modality}")
    for name, value in (("--stat", stat_fraction), ("--orders-first", order_first_fraction),
                        ("--orders", order_fraction)):
        if not 0 <= value <= 1:
            raise PlanError(f"{name} must be a fraction from 0 to 1 (got {value})")
    if stat_fraction > order_fraction:
        raise PlanError(f"--stat {stat_fraction} is more than --orders {order_fraction}: a STAT study needs an order")
    if not 0 <= order_gap_s[0] <= order_gap_s[1]:
        raise PlanError(f"--order-gap {order_gap_s[0]}-{order_gap_s[1]}: need 0 <= min <= max")


# ---------------------------------------------------------------- parsing the command line's values

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour|d|day))?\s*$", re.IGNORECASE)
_PER = {"s": 3600.0, "sec": 3600.0, "m": 60.0, "min": 60.0, "h": 1.0, "hour": 1.0, "d": 1 / 24, "day": 1 / 24}


def parse_rate(text: str) -> float:
    """``5000/h``, ``90/min``, ``2/s`` or a bare number (per hour) as studies per hour."""
    match = _RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise PlanError(f"rate {text!r} is not like 5000/h, 90/min or 2/s")
    return float(match.group(1)) * _PER[(match.group(2) or "h").lower()]


def parse_mix(text: str) -> dict[str, float]:
    """``CR:0.35,DX:0.15,CT:0.3,MR:0.2`` (shares need not add up to 1: they are normalised)."""
    mix: dict[str, float] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        modality, _, share = pair.partition(":")
        try:
            mix[modality.strip().upper()] = float(share)
        except ValueError:
            raise PlanError(f"--mix pair {pair!r} is not MODALITY:SHARE (e.g. CT:0.3)") from None
    total = sum(mix.values())
    if total <= 0 or any(w < 0 for w in mix.values()):
        raise PlanError(f"--mix {text!r} needs positive shares")
    return {m: w / total for m, w in mix.items()}


def parse_range(text: str, option: str) -> tuple[int, int]:
    """``100-300`` or ``150`` as an inclusive (min, max)."""
    low, sep, high = text.partition("-")
    try:
        span = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise PlanError(f"{option} {text!r} is not N or MIN-MAX") from None
    return span


def parse_sites(text: str, stow_sites: Sequence[str] = (), states: Mapping[str, str] | None = None) -> list[Site]:
    """``SITE_A,SITE_B:CR+DX,SITE_C:MR``: site names, each optionally with the modalities it has.

    Names must be usable as a DICOM calling AE title (PS3.5 6.2: 1-16 characters, no
    backslash) and an HL7 facility. ``stow_sites`` send by STOW-RS, the others by C-STORE;
    ``states`` maps a site to its state, else :data:`DEFAULT_STATES` in turn.
    """
    states = {k.upper(): v.upper() for k, v in (states or {}).items()}
    sites = []
    for position, item in enumerate(filter(None, (p.strip() for p in text.split(",")))):
        name, _, has = item.partition(":")
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,16}", name):
            raise PlanError(f"site {name!r}: use 1-16 letters, digits, '_', '.' or '-' (it is the DICOM AE title)")
        modalities = frozenset(m.strip().upper() for m in has.split("+") if m.strip()) if has else frozenset(MODALITIES)
        unknown = sorted(modalities - set(MODALITIES))
        if unknown:
            raise PlanError(f"site {name}: unknown modality {', '.join(unknown)} (one of {', '.join(MODALITIES)})")
        state = states.get(name.upper(), DEFAULT_STATES[position % len(DEFAULT_STATES)])
        if not re.fullmatch(r"[A-Z]{2}", state):
            raise PlanError(f"site {name}: state {state!r} is not a two-letter USPS code")
        transport = Transport.STOW if name.upper() in {s.upper() for s in stow_sites} else Transport.DICOM
        sites.append(Site(name, state, modalities, transport))
    names = [s.name.upper() for s in sites]
    if len(set(names)) != len(names):
        raise PlanError(f"--sites names a site twice ({text})")
    missing = sorted({s.upper() for s in stow_sites} - set(names))
    if missing:
        raise PlanError(f"--stow-sites {', '.join(missing)} not in --sites")
    return sites


def parse_pairs(text: str, option: str) -> dict[str, str]:
    """``A=x,B=y`` as a dict (``--site-states``, ``--stow-token``)."""
    pairs: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key or not value:
            raise PlanError(f"{option} pair {pair!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


# ---------------------------------------------------------------- summaries


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` (0-100) percentile, linear between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """How many values and their p50/p95/p99."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(len(values), percentile(values, 50), percentile(values, 95), percentile(values, 99))


@dataclass(frozen=True)
class PlanSummary:
    studies: int
    instances: int
    duration_s: float
    by_modality: dict[str, tuple[int, int]]  # modality -> (studies, instances)
    by_site: dict[str, tuple[str, int]]  # site -> (transport, studies)
    orders: dict[str, int] = field(default_factory=dict)  # OrderTiming value -> studies
    stat: int = 0
    busiest_minute: int = 0  # studies due in the busiest minute of the run

    @property
    def studies_per_hour(self) -> float:
        return self.studies * 3600.0 / self.duration_s

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.duration_s


def summarise(studies: Sequence[PlannedStudy], duration_s: float) -> PlanSummary:
    by_modality: dict[str, tuple[int, int]] = {}
    for study in studies:
        n, i = by_modality.get(study.modality, (0, 0))
        by_modality[study.modality] = (n + 1, i + study.instances)
    sites = Counter(s.site for s in studies)
    transports = {s.site: s.transport.value for s in studies}
    minutes = Counter(int(s.at_s // 60) for s in studies)
    return PlanSummary(
        studies=len(studies), instances=sum(s.instances for s in studies), duration_s=duration_s,
        by_modality=dict(sorted(by_modality.items(), key=lambda kv: MODALITIES.index(kv[0]))),
        by_site={site: (transports[site], n) for site, n in sorted(sites.items())},
        orders={t.value: sum(1 for s in studies if s.order is t) for t in OrderTiming},
        stat=sum(s.stat for s in studies), busiest_minute=max(minutes.values(), default=0))


def plan_lines(summary: PlanSummary, seed: int) -> list[str]:
    """The plan as a person checks it before sending: size, load, mix, sites, orders."""
    modalities = ", ".join(f"{m} {n} ({i:,} instances)" for m, (n, i) in summary.by_modality.items())
    sites = ", ".join(f"{site} {transport} {n}" for site, (transport, n) in summary.by_site.items())
    o = summary.orders
    return [
        f"plan: {summary.studies} studies, {summary.instances:,} instances over {summary.duration_s:.0f} s "
        f"= {summary.studies_per_hour:,.0f} studies/h, {summary.instances_per_second:,.1f} instances/s "
        f"(busiest minute: {summary.busiest_minute} studies); seed {seed}",
        f"  modalities: {modalities}",
        f"  sites: {sites}",
        f"  orders: {o.get('before', 0)} before the images, {o.get('after', 0)} after, {o.get('none', 0)} none; "
        f"STAT {summary.stat}",
    ]
