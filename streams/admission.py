"""Priority-aware admission of studies to the AI stage's lanes, bounded, without starvation.

At most ``lanes`` studies are fetched, decoded and inferred at once; up to ``capacity``
more wait. A free lane goes to the most urgent waiter: level 1 (a STAT order or an
emergency location) before level 2 (routine), first in first out within a level, as
Triton's dynamic batcher orders ``priority_levels``. Two guards keep that honest:

* **aging**: a routine study that has waited ``max_wait_s`` counts as level 1 from then on,
  in order of arrival, so a stream of STAT studies cannot starve it (mercure serves
  urgent:normal 2:1 for the same reason; without a guard an AI-prioritised worklist made
  the longest routine wait worse, PMC8128725);
* **a bound**: when ``capacity`` studies wait, a routine arrival is refused with
  :class:`Deferred` (the stage defers it to ``inference.retry``, never drops it), and an
  urgent arrival takes the place of the newest routine waiter, which is deferred instead.
  Urgent studies are never deferred.

A hint that arrives while a study waits (its order was joined late) raises its level
(:meth:`promote`). Nothing here does I/O; the clock is passed in for tests.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters.telemetry import AI_WAITING

URGENT = 1
ROUTINE = 2


class Deferred(Exception):
    """The study cannot wait here now (the queue is full of work at least as urgent)."""


@dataclass
class _Waiter:
    key: str
    level: int
    sequence: int
    since: float
    future: asyncio.Future


class Admission:
    def __init__(self, lanes: int, capacity: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lanes = lanes
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._running = 0
        self._waiting: list[_Waiter] = []
        self._sequence = itertools.count()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def effective_level(self, waiter: _Waiter, now: float) -> int:
        return URGENT if now - waiter.since >= self.max_wait_s else waiter.level

    async def enter(self, key: str, level: int) -> int:
        """Wait for a lane; returns the level the study runs at (it may have been promoted).
        Raises :class:`Deferred` if it must wait elsewhere. Call :meth:`leave` after."""
        if self._running < self.lanes and not self._waiting:
            self._running += 1
            return level
        if len(self._waiting) >= self.capacity:
            if level > URGENT:
                raise Deferred(f"AI queue full: {len(self._waiting)} studies waiting for {self.lanes} lanes")
            routine = [w for w in self._waiting if w.level > URGENT]
            if routine:  # an urgent study takes the newest routine waiter's place
                victim = max(routine, key=lambda w: w.sequence)
                self._waiting.remove(victim)
                victim.future.set_exception(Deferred(f"AI queue full: a more urgent study took this one's place "
                                                     f"({len(self._waiting) + 1} waiting)"))
        waiter = _Waiter(key, level, next(self._sequence), self._clock(), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._gauge()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.leave()  # it was given a lane as it was cancelled: hand the lane on
            self._gauge()
            raise

    def leave(self) -> None:
        self._running -= 1
        self._wake()

    def promote(self, key: str, level: int) -> bool:
        """Raise a waiting study's level; whether it was waiting."""
        for waiter in self._waiting:
            if waiter.key == key and level < waiter.level:
                waiter.level = level
                self._gauge()
                return True
        return False

    def _wake(self) -> None:
        now = self._clock()
        while self._running < self.lanes and self._waiting:
            chosen = min(self._waiting, key=lambda w: (self.effective_level(w, now), w.sequence))
            self._waiting.remove(chosen)
            self._running += 1
            chosen.future.set_result(self.effective_level(chosen, now))
        self._gauge()

    def _gauge(self) -> None:
        for level in (URGENT, ROUTINE):
            AI_WAITING.labels(str(level)).set(sum(1 for w in self._waiting if w.level == level))
