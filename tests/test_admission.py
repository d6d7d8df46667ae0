"""The AI stage's scheduling: priority admission of studies, and priority batching of images.

Both are what keep a STAT head CT from waiting behind a queue of routine studies, and
a routine study from waiting forever behind STAT ones.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from engines.batcher import PriorityBatcher
from streams.admission import ROUTINE, URGENT, Admission, Deferred


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_admission_serves_urgent_first_then_in_order_and_defers_routine_beyond_its_bound() -> None:
    async def scenario() -> None:
        clock = Clock()
        admission = Admission(lanes=1, capacity=3, max_wait_s=60, clock=clock)
        assert await admission.enter("running", ROUTINE) == ROUTINE  # takes the only lane
        order: list[str] = []

        async def study(key: str, level: int) -> None:
            got = await admission.enter(key, level)
            order.append(f"{key}@{got}")

        tasks = [asyncio.create_task(study(k, ROUTINE)) for k in ("r1", "r2", "r3")]
        await _settle()
        with pytest.raises(Deferred, match="AI queue full: 3 studies waiting"):
            await admission.enter("r4", ROUTINE)  # routine beyond the bound: deferred, not dropped
        stat = asyncio.create_task(study("stat", URGENT))  # urgent: takes the newest routine's place
        await _settle()
        assert tasks[2].done() and isinstance(tasks[2].exception(), Deferred)
        for _ in range(3):
            admission.leave()
            await _settle()
        assert order == ["stat@1", "r1@2", "r2@2"]
        await stat

    asyncio.run(scenario())


def test_a_routine_study_that_waited_too_long_is_promoted_so_nothing_starves() -> None:
    async def scenario() -> None:
        clock = Clock()
        admission = Admission(lanes=1, capacity=10, max_wait_s=5, clock=clock)
        await admission.enter("running", ROUTINE)
        order: list[str] = []

        async def study(key: str, level: int) -> None:
            order.append(f"{key}@{await admission.enter(key, level)}")

        old = asyncio.create_task(study("old-routine", ROUTINE))
        await _settle()
        clock.now = 6.0  # it has now waited past max_wait_s
        urgent = asyncio.create_task(study("new-stat", URGENT))
        await _settle()
        admission.leave()
        await _settle()
        admission.leave()
        await _settle()
        assert order == ["old-routine@1", "new-stat@1"]
        await asyncio.gather(old, urgent)

    asyncio.run(scenario())


def test_a_late_hint_promotes_a_waiting_study() -> None:
    async def scenario() -> None:
        admission = Admission(lanes=1, capacity=10, max_wait_s=60)
        await admission.enter("running", ROUTINE)
        order: list[str] = []

        async def study(key: str) -> None:
            order.append(f"{key}@{await admission.enter(key, ROUTINE)}")

        tasks = [asyncio.create_task(study(k)) for k in ("a", "b", "c")]
        await _settle()
        assert admission.promote("c", URGENT) and not admission.promote("nobody", URGENT)
        for _ in range(3):
            admission.leave()
            await _settle()
        assert order == ["c@1", "a@2", "b@2"]
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario() -> None:
        admission = Admission(lanes=1, capacity=10, max_wait_s=60)
        await admission.enter("running", ROUTINE)
        waiting = asyncio.create_task(admission.enter("gives-up", ROUTINE))
        await _settle()
        assert admission.waiting == 1
        waiting.cancel()
        await _settle()
        assert admission.waiting == 0
        admission.leave()
        assert admission.running == 0

    asyncio.run(scenario())


def _identity_model(tmp_path):
    """A real ONNX model (flatten + sum) run by a real ONNX Runtime session."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["image", "axes"], ["logits"], keepdims=0)],
        "sum", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "sum.onnx"
    onnx.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["logits"], {"image": batch})[0].reshape(len(batch), -1)


def test_a_stat_study_overtakes_a_queue_of_routine_ones_in_the_engine(tmp_path) -> None:
    run = _identity_model(tmp_path)
    gate = threading.Event()
    batches: list[list[float]] = []

    def gated(batch: np.ndarray) -> np.ndarray:
        gate.wait(10)  # the engine is busy with the first batch while the queue fills
        batches.append(sorted(float(v) for v in batch.reshape(len(batch), -1)[:, 0]))
        return run(batch)

    async def scenario() -> None:
        batcher = PriorityBatcher(gated, max_batch=2, max_delay_s=0.0, name="test")
        image = lambda value: np.full((1, 1, 4, 4), value, dtype=np.float32)  # noqa: E731
        first = asyncio.create_task(batcher.infer(image(0), ROUTINE))
        await asyncio.sleep(0.05)  # the first batch is in the engine
        routine = [asyncio.create_task(batcher.infer(image(i), ROUTINE)) for i in range(1, 7)]
        await _settle()
        stat = asyncio.create_task(batcher.infer(image(100), URGENT))
        await _settle()
        gate.set()
        results = await asyncio.gather(first, *routine, stat)
        # outputs are each request's own: the sum of its 16 pixels
        assert [float(r[0, 0]) for r in results] == [16.0 * v for v in [0, 1, 2, 3, 4, 5, 6, 100]]
        # the engine ran r0 while r1+r2 were queued behind it; the STAT image went into the
        # first batch cut after it arrived, ahead of four older routine ones
        assert batches[1] == [1.0, 2.0] and batches[2] == [3.0, 100.0]
        assert batcher.served.index(7) < batcher.served.index(4)
        await batcher.stop()

    asyncio.run(scenario())


def test_an_engine_failure_fails_its_batch_and_the_queue_goes_on(tmp_path) -> None:
    run = _identity_model(tmp_path)
    calls = {"n": 0}

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return run(batch)

    async def scenario() -> None:
        batcher = PriorityBatcher(flaky, max_batch=4, max_delay_s=0.0)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            await batcher.infer(np.ones((2, 1, 4, 4), np.float32), ROUTINE)
        out = await batcher.infer(np.ones((3, 1, 4, 4), np.float32), ROUTINE)
        assert out.shape == (3, 1) and float(out[0, 0]) == 16.0
        await batcher.stop()

    asyncio.run(scenario())


def test_a_batch_takes_whole_requests_and_splits_only_one_larger_than_a_batch(tmp_path) -> None:
    run = _identity_model(tmp_path)
    batches: list[tuple[list[float], bool]] = []
    arrays: list[np.ndarray] = []

    def recording(batch: np.ndarray) -> np.ndarray:
        views = any(np.shares_memory(batch, a) for a in arrays)
        batches.append((sorted(float(v) for v in batch.reshape(len(batch), -1)[:, 0]), views))
        return run(batch)

    async def scenario() -> None:
        batcher = PriorityBatcher(recording, max_batch=4, max_delay_s=0.0, name="test")
        study = lambda first, n: np.stack([np.full((1, 4, 4), first + i, np.float32) for i in range(n)])  # noqa: E731
        arrays.extend([study(0, 3), study(10, 3), study(20, 6), study(40, 1)])
        results = await asyncio.gather(*(batcher.infer(a, ROUTINE) for a in arrays))
        # each request's outputs are its own, in order, however it was cut
        for a, out in zip(arrays, results):
            assert out[:, 0].tolist() == [16.0 * float(v) for v in a[:, 0, 0, 0]]
        # 3 + 3 do not fit in 4: each 3-image study is a batch of its own, run as a view of
        # its array; the 6-image one is split 4 + 2, and the 1-image study joins its last 2
        assert batches == [([0.0, 1.0, 2.0], True), ([10.0, 11.0, 12.0], True),
                           ([20.0, 21.0, 22.0, 23.0], True), ([24.0, 25.0, 40.0], False)]
        await batcher.stop()

    asyncio.run(scenario())


def test_the_batch_delay_runs_from_the_oldest_request_not_from_when_the_engine_frees(tmp_path) -> None:
    run = _identity_model(tmp_path)
    gate = threading.Event()
    clock = Clock()

    def gated(batch: np.ndarray) -> np.ndarray:
        gate.wait(10)
        return run(batch)

    async def scenario() -> None:
        batcher = PriorityBatcher(gated, max_batch=4, max_delay_s=30.0, name="test", clock=clock)
        full = lambda: np.ones((4, 1, 4, 4), np.float32)  # noqa: E731
        running = [asyncio.create_task(batcher.infer(full(), ROUTINE)) for _ in range(2)]  # both batch slots
        await _settle()
        late = asyncio.create_task(batcher.infer(np.ones((1, 1, 4, 4), np.float32), ROUTINE))
        await _settle()
        clock.now = 31.0  # it has waited past max_delay_s behind the two batches in flight
        gate.set()
        # cut the moment a slot frees, not held another 30 s for company
        out = await asyncio.wait_for(late, 5)
        assert float(out[0, 0]) == 16.0
        await asyncio.gather(*running)
        await batcher.stop()

    asyncio.run(scenario())
