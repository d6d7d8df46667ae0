"""Priority-aware dynamic batching in front of one engine, after Triton's dynamic batcher.

Triton's batcher (``dynamic_batching``) holds requests until ``preferred_batch_size`` is
reached or ``max_queue_delay_microseconds`` has passed since the oldest, and with
``priority_levels`` serves every level-1 request before any level-2 one, first in first
out within a level. This one does the same for images: requests from many studies are
queued, a batch is cut at ``max_batch`` images or ``max_delay_s`` after the oldest queued
request arrived, and the batch takes the most urgent requests first, ``(level, sequence)``
order, whole (a request is split only when it alone is larger than a batch).
A batch is never pre-empted (neither is Triton's), so batches stay small enough that a
STAT study waits at most two batches (the running one and the one queued behind it).
Starvation is the caller's business: the AI stage promotes a routine study that has waited
too long before it submits (Triton documents starvation under its DELAY policy; PMC8128725
saw the longest routine wait grow 890 → 1,293 min without an aging guard).

The engine runs in its own thread, one batch at a time (GPU engines and ONNX Runtime
sessions are driven by one caller), with the next batch cut and queued behind the running
one, so the engine never waits on the event loop between batches; an engine exception
fails every request of its batch, and the caller decides what that means (the circuit
breaker, :mod:`engines.breaker`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram

BATCH_IMAGES = Histogram("radstream_engine_batch_images", "images per engine batch", ["model"],
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
QUEUE_SECONDS = Histogram("radstream_engine_queue_seconds", "time an image waited for its batch", ["model", "level"],
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


@dataclass(eq=False)  # identity: a request is itself, whatever its images
class _Request:
    images: np.ndarray
    level: int
    sequence: int
    future: asyncio.Future
    queued_at: float
    taken: int = 0  # images already cut into batches
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (first image, outputs)
    done: int = 0  # images with outputs

    @property
    def remaining(self) -> int:
        return len(self.images) - self.taken


class PriorityBatcher:
    """Batches images of many requests for ``run`` (an engine's ``run``), most urgent first.

    Requests, not images, are queued: a batch takes whole slices of the most urgent
    requests' image arrays, so cutting and splitting a batch costs per request, not per image.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], *, max_batch: int, max_delay_s: float,
                 name: str = "model", clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.name = name
        self._clock = clock
        self._heap: list[tuple[int, int, int, _Request]] = []  # (level, sequence, request id, request)
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sequence = itertools.count()
        self._ids = itertools.count()  # ties within one sequence number never compare requests
        #: order in which requests' first images entered a batch (sequence numbers), for tests and metrics
        self.served: list[int] = []
        self._buffers: list[np.ndarray | None] = [None, None]
        self._turn = 0
        self._in_flight = asyncio.Semaphore(2)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # batches for the engine's thread, None ends it
        self._engine: threading.Thread | None = None
        self._queued = 0  # images queued and not yet cut, kept as requests come, are cut or leave
        # labelled metric children, looked up once: every batch observes them
        self._batch_images = BATCH_IMAGES.labels(name)
        self._queue_seconds: dict[int, Histogram] = {}

    def start(self) -> None:
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._loop(), name=f"batcher-{self.name}")
            self._engine = threading.Thread(target=self._engine_loop, args=(loop,), name=f"engine-{self.name}",
                                            daemon=True)
            self._engine.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._engine is not None:
            self._jobs.put(None)  # the thread ends after the batch it is running, if any
            self._engine = None

    @property
    def queued_images(self) -> int:
        return self._queued

    async def infer(self, images: np.ndarray, level: int, sequence: int | None = None) -> np.ndarray:
        """Run ``images`` (N, C, H, W) at priority ``level`` (1 = highest); returns the engine's
        outputs for them, in order. ``sequence`` orders requests within a level (default: arrival)."""
        self.start()
        if len(images) == 0:
            raise ValueError("no images to infer")
        request = _Request(images=images, level=level, sequence=next(self._sequence) if sequence is None else sequence,
                           future=asyncio.get_running_loop().create_future(), queued_at=self._clock())
        heapq.heappush(self._heap, (level, request.sequence, next(self._ids), request))
        self._queued += len(images)
        self._arrived.set()
        try:
            return await request.future  # cancelling the caller cancels the future: _finish skips it
        except asyncio.CancelledError:
            # the caller gave up (its study timed out): its images leave the queue
            self._drop(lambda r: r is request)
            raise

    def _drop(self, gone: Callable[[_Request], bool]) -> None:
        self._heap = [item for item in self._heap if not gone(item[3])]
        heapq.heapify(self._heap)
        self._queued = sum(item[3].remaining for item in self._heap)

    def _stack(self, batch: list[tuple[_Request, int, int]], size: int) -> np.ndarray:
        """The batch as one array: a view when it is one request's slice, else copied into a
        buffer kept for the next batch (a fresh 2 MB array per batch costs page faults)."""
        first, start, count = batch[0]
        if len(batch) == 1:
            return first.images[start:start + count]
        shape, dtype = (self.max_batch, *first.images.shape[1:]), first.images.dtype
        buffer = self._buffers[self._turn]
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._buffers[self._turn] = np.empty(shape, dtype)
        offset = 0
        for request, start, count in batch:
            buffer[offset:offset + count] = request.images[start:start + count]
            offset += count
        return buffer[:size]  # two buffers, two batches in flight: reused only once its batch is done

    def _cut(self) -> list[tuple[_Request, int, int]]:
        """The next batch: (request, first image, count) slices, most urgent first.

        A request is split only when it heads a batch and is larger than ``max_batch``;
        one that does not fit in the room left heads the next batch instead, as Triton's
        batcher never splits a request either. So a study's images usually go to the
        engine as a view of its own array: merging two studies' slices into one batch
        meant copying every image (64 kB each for the head-CT card), which cost more per
        image than the larger batch saved.
        """
        batch, room = [], self.max_batch
        while room and self._heap:
            item = self._heap[0]
            request = item[3]
            if batch and request.remaining > room:
                break  # the most urgent request waits for a batch of its own, nothing overtakes it
            heapq.heappop(self._heap)
            count = min(room, request.remaining)
            if request.taken == 0:
                self.served.append(request.sequence)
                self._waited(request.level).observe(self._clock() - request.queued_at)
            batch.append((request, request.taken, count))
            request.taken += count
            self._queued -= count
            room -= count
            if request.remaining:
                heapq.heappush(self._heap, item)  # its other images keep their place
        return batch

    def _waited(self, level: int) -> Histogram:
        child = self._queue_seconds.get(level)
        if child is None:
            child = self._queue_seconds[level] = QUEUE_SECONDS.labels(self.name, str(level))
        return child

    async def _loop(self) -> None:
        while True:
            while not self._heap:
                self._arrived.clear()
                await self._arrived.wait()
            await self._in_flight.acquire()  # at most two batches: one running, the next ready behind it
            # the delay runs from the oldest queued request's arrival, as Triton's
            # max_queue_delay does, not from now: a request that already waited behind
            # the running batches is not held back again (none left, all cancelled: no wait)
            oldest = min((item[3].queued_at for item in self._heap), default=float("-inf"))
            while self._queued < self.max_batch and (left := self.max_delay_s - (self._clock() - oldest)) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = self._cut()
            if not batch:  # its requests were cancelled meanwhile
                self._in_flight.release()
                continue
            size = sum(count for _, _, count in batch)
            self._batch_images.observe(size)
            try:
                stacked = self._stack(batch, size)
            except Exception as exc:
                self._finish(batch, size, exc)
                continue
            # the engine's own thread takes the next batch the moment it is done with this one
            self._jobs.put((batch, size, stacked))
            self._turn ^= 1

    def _engine_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The engine's thread: run each batch and hand its outcome straight to the event loop.

        Between two batches this thread needs the GIL, which the loop holds while it handles
        the last result; so the loop's work per batch is kept small (one wake-up, no executor
        future to chain), because on a busy CPU the engine waits for it.
        """
        while (job := self._jobs.get()) is not None:
            batch, size, stacked = job
            try:
                outputs, error = self._run(stacked), None
            except BaseException as exc:  # noqa: BLE001 - every request of the batch gets it
                outputs, error = None, exc
            try:
                loop.call_soon_threadsafe(self._finish, batch, size, error, outputs)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _finish(self, batch: list[tuple[_Request, int, int]], size: int, error: BaseException | None,
                outputs: np.ndarray | None = None) -> None:
        self._in_flight.release()
        if error is None and len(outputs) != size:
            error = RuntimeError(f"engine returned {len(outputs)} outputs for a batch of {size}")
        if error is not None:  # every request of the batch fails; the queue goes on
            for request, _, _ in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            self._drop(lambda r: r.future.done())
            return
        offset = 0
        for request, start, count in batch:
            part, offset = outputs[offset:offset + count], offset + count
            if request.future.done():
                continue
            if count == len(request.images):  # the whole request in one batch, as usual
                request.future.set_result(part)
                continue
            request.chunks.append((start, part))
            request.done += count
            if request.done == len(request.images):
                request.chunks.sort(key=lambda chunk: chunk[0])
                request.future.set_result(np.concatenate([c for _, c in request.chunks]))
