"""Benchmark: reader assignment with a roster of 500 readers and 10,000 open studies.

What it must keep up with: one assignment per routed study version (plus re-assignments,
which are rarer). A teleradiology network's peak is thousands of studies an hour (5,000/h
is 1.4 studies/s); the hardest bound measured here is the ingest itself: DOMAIN.md's
Orthanc took 351-413 instances/s over 4 associations, and the whole durable ``radstream up``
60-69, so even if every study were a single instance no more than 413 studies/s could
arrive. ``needed`` is that 413/s; the radstream-ingest and network-peak lines are printed
beside it.

The roster (seeded, fictional) spreads 500 readers over 20 states, 60 sites, 8
subspecialties and day / evening / overnight shifts in four US time zones; 10,000 open
studies sit on their lists. Each assignment is a new study (random priority,
subspecialty, site, state; the clock advancing 50 ms per study, so the per-minute shift
cache is refreshed as it would be in a stream), assigned with its full explanation and
reasons; the book stays at 10,000 (the new study is added, the oldest removed). One
aging pass and one off-shift pass over the first 10,000 (1 in 50 on a reader whose shift
has ended) are timed too: the lead runs them on a timer, not per study.

    python -m load.bench_assign [--assignments 20000] [--readers 500] [--open 10000]

Two runs on the 2-core development machine (shared with other agents, load average 3.6):
    run 1: ours / needed = 11,466 / 413 = 27.8x; 87 us per assignment; aging pass 94 ms, off-shift pass 1 ms
    run 2: ours / needed = 11,680 / 413 = 28.3x; 86 us per assignment; aging pass 99 ms, off-shift pass 1 ms
Under heavier load from the other agents (load average 4.3) the same runs gave 5,700-6,500/s (14-16x).
The seeded book is random, not built by the assigner, so many of its studies sit where their
reader cannot reach them in time: the aging pass's re-assign count measures that seed, not assignment.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from schemas.events import Priority
from streams.assign import OpenAssignment, QueueBook, StudyToAssign, age, assign, deadline_of, off_shift
from streams.roster import Reader, Shift, build_roster

NEEDED = 413.0  # studies/s: Orthanc's best measured ingest (instances/s), every study one instance
RADSTREAM_INGEST = 69.0  # instances/s: the whole durable `radstream up` (DOMAIN.md)
NETWORK_PEAK = 5000 / 3600  # studies/s: a busy network's peak hour

STATES = ["NV", "CA", "AZ", "TX", "IL", "NY", "FL", "NJ", "PA", "OH", "GA", "NC", "WA", "OR", "CO", "MN",
          "MI", "MA", "VA", "TN"]
SUBSPECIALTIES = ["neuroradiology", "body", "msk", "thoracic", "general", "breast", "nuclear", "ultrasound"]
ZONES = [ZoneInfo(z) for z in ("America/New_York", "America/Chicago", "America/Denver", "America/Los_Angeles")]
SHIFTS = [(7 * 60, 16 * 60), (15 * 60, 23 * 60), (22 * 60, 7 * 60), (0, 24 * 60)]
SITES = [f"SITE_{i:02d}" for i in range(60)]


def make_roster(readers: int, rng: random.Random):
    everyone = []
    for i in range(readers):
        start, end = rng.choice(SHIFTS)
        everyone.append(Reader(
            id=f"dr-{i:04d}", name=f"Reader {i}",
            subspecialties=frozenset(rng.sample(SUBSPECIALTIES, rng.choice([1, 1, 2]))),
            licensed_states=frozenset(rng.sample(STATES, rng.randint(3, 10))),
            credentialed_sites=frozenset(rng.sample(SITES, rng.randint(5, 20))),
            capacity=rng.randint(40, 60), minutes_per_study=rng.choice([3.0, 4.0, 5.0, 6.0]),
            shifts=(Shift(days=frozenset(range(7)), start=start, end=end, tz=rng.choice(ZONES)),)))
    return build_roster(everyone, source="bench")


def make_study(n: int, rng: random.Random, received: datetime) -> StudyToAssign:
    priority = rng.choices(list(Priority), weights=[5, 20, 75])[0]
    return StudyToAssign(study_uid=f"2.25.{n}", priority=priority, subspecialty=rng.choice(SUBSPECIALTIES),
                         source_site=rng.choice(SITES), received_at=received, stat=rng.random() < 0.05,
                         site_state=rng.choice(STATES), patient_state=rng.choice(STATES) if rng.random() < 0.3 else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assignments", type=int, default=20000)
    parser.add_argument("--readers", type=int, default=500)
    parser.add_argument("--open", type=int, default=10000)
    args = parser.parse_args(argv)
    rng = random.Random(17)
    roster = make_roster(args.readers, rng)
    now = datetime(2026, 12, 1, 18, 0, tzinfo=UTC)  # a Tuesday: noon in Chicago
    book, order = QueueBook(), deque()
    on_shift = sorted(roster.on_shift(now))
    off_shift_ids = sorted(roster.all_ids - set(on_shift))
    for n in range(args.open):  # open studies over the readers on shift (1 in 50 on one whose shift has ended)
        study = make_study(n, rng, now - timedelta(minutes=rng.randint(0, 120)))
        holder = rng.choice(off_shift_ids if rng.random() < 0.02 else on_shift)
        book.add(OpenAssignment(study=study, reader_id=holder, deadline=deadline_of(study, roster.sla),
                                assigned_at=study.received_at))
        order.append(study.study_uid)
    studies = [make_study(args.open + n, rng, now + timedelta(milliseconds=50 * n)) for n in range(args.assignments)]
    started = time.perf_counter()
    report = age(book, roster, now)
    aging_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    moves = off_shift(book, roster, now)
    off_ms = (time.perf_counter() - started) * 1000

    assigned = unassigned = 0
    started = time.perf_counter()
    for study in studies:
        decision = assign(study, roster, book, study.received_at)
        if decision.reader_id is None:
            unassigned += 1
            continue
        assigned += 1
        book.add(OpenAssignment(study=study, reader_id=decision.reader_id, deadline=decision.deadline,
                                assigned_at=study.received_at))
        order.append(study.study_uid)
        book.remove(order.popleft())
    elapsed = time.perf_counter() - started
    rate = len(studies) / elapsed

    print(f"roster {len(roster.readers)} readers ({len(roster.on_shift(now))} on shift), {len(book)} open studies, "
          f"{len(studies)} assignments ({assigned} assigned, {unassigned} unassigned: no eligible reader)")
    print(f"assignments/s: ours / needed = {rate:,.0f} / {NEEDED:.0f} = {rate / NEEDED:.1f}x "
          f"(needed: Orthanc's 413 inst/s over 4 associations, every study one instance)")
    print(f"assignments/s: ours / radstream ingest = {rate:,.0f} / {RADSTREAM_INGEST:.0f} = {rate / RADSTREAM_INGEST:.0f}x")
    print(f"assignments/s: ours / network peak = {rate:,.0f} / {NETWORK_PEAK:.1f} = {rate / NETWORK_PEAK:,.0f}x "
          f"(5,000 studies/h)")
    print(f"per assignment: {elapsed / len(studies) * 1e6:.0f} us; aging pass over {len(book)}: {aging_ms:.0f} ms "
          f"({len(report.promote)} to promote, {len(report.reassign)} to re-assign); "
          f"off-shift pass: {off_ms:.0f} ms ({len(moves)} to move)")


if __name__ == "__main__":
    main()
