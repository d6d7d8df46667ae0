"""A circuit breaker per model: an engine that fails repeatedly is taken out, and says so.

After ``failures`` consecutive failures the circuit opens: the model is not run, and its
studies get ``ERROR`` with the reason at once instead of waiting on an engine that keeps
failing. After ``reset_s`` one trial is let through (half-open); a success closes the
circuit, a failure opens it again. The state is on ``/metrics`` as
``radstream_engine_circuit_open{model=…}`` (1 = taken out) with a counter of failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge

CIRCUIT_OPEN = Gauge("radstream_engine_circuit_open", "1 while a model's engine is taken out after repeated failures",
                     ["model"])
ENGINE_FAILURES = Counter("radstream_engine_failures_total", "engine runs that failed", ["model"])


class CircuitBreaker:
    def __init__(self, model: str, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.threshold = failures
        self.reset_s = reset_s
        self._clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self.last_error = ""
        CIRCUIT_OPEN.labels(model).set(0)

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def allows(self) -> bool:
        """Whether the model may run now: closed, or open long enough for one trial."""
        return self.opened_at is None or self._clock() - self.opened_at >= self.reset_s

    def reason(self) -> str:
        return (f"engine of {self.model} taken out after {self.consecutive} consecutive failures "
                f"(last: {self.last_error}); retried {self.reset_s:g}s after opening")

    def succeeded(self) -> None:
        self.consecutive = 0
        if self.opened_at is not None:
            self.opened_at = None
            CIRCUIT_OPEN.labels(self.model).set(0)

    def failed(self, error: str) -> None:
        ENGINE_FAILURES.labels(self.model).inc()
        self.consecutive += 1
        self.last_error = error
        if self.consecutive >= self.threshold:
            self.opened_at = self._clock()  # (re)open: a failed trial waits another reset_s
            CIRCUIT_OPEN.labels(self.model).set(1)
