"""What every inference engine shares: its identity, its interface, its failures and its metrics.

Results carry an ``EngineIdentity`` so a score can always be traced to the exact model file and
runtime that produced it (a plan built with TensorRT fp16 is not the same model as the ONNX on
CPU). ``EngineUnavailable`` is the one way a backend says "not here" — no GPU, no module, a GPU
the runtime refuses — so backend selection can skip it and log why. The CUDA probe lives here
because both the TensorRT and the ONNX Runtime CUDA backends ask the same question.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from engines.card import ModelCard

#: the order "auto" tries them in: fastest first, the embedded CPU engine last (it always loads)
BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")

ENGINE_BATCH_SECONDS = Histogram(
    "radstream_engine_batch_seconds", "Time one engine.run() took for one batch", ["backend", "model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ENGINE_IMAGES = Counter("radstream_engine_images_total", "Images run through an engine", ["backend", "model"])
# Not "radstream_engine_failures_total": engines/breaker.py counts failures per model under that name.
ENGINE_RUN_ERRORS = Counter(
    "radstream_engine_run_errors_total", "engine.run() calls that raised, by exception type",
    ["backend", "model", "error"],
)


@dataclass(frozen=True)
class EngineIdentity:
    backend: str        # "tensorrt" | "tensorrt-rtx" | "onnxruntime-cuda" | "onnxruntime-cpu"
    device: str         # "cpu" | "cuda:0 (NVIDIA ...)"
    model: str          # card name
    model_version: str
    model_sha256: str
    precision: str      # "fp32" | "fp16"


class Engine(Protocol):
    identity: EngineIdentity
    max_batch: int

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 with N <= max_batch -> raw model output (N, n_labels) float32."""
        ...

    def close(self) -> None: ...


class EngineUnavailable(RuntimeError):
    """This backend cannot run here (no GPU, no module, unsupported GPU); the message is the reason."""


def identity_for(card: ModelCard, backend: str, device: str, precision: str) -> EngineIdentity:
    return EngineIdentity(backend=backend, device=device, model=card.name, model_version=card.version,
                          model_sha256=card.sha256, precision=precision)


def check_batch(card: ModelCard, batch: np.ndarray) -> np.ndarray:
    """The batch as a C-contiguous array of the model's input dtype, or ValueError saying what is off."""
    expected = tuple(card.input.shape)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
        raise ValueError(f"{card.name}: batch shape {batch.shape}, expected (N, {', '.join(map(str, expected))})")
    if not 1 <= batch.shape[0] <= card.input.max_batch:
        raise ValueError(f"{card.name}: batch of {batch.shape[0]}, max_batch is {card.input.max_batch}")
    return np.ascontiguousarray(batch, dtype=np.dtype(card.input.dtype))


@contextmanager
def observed(identity: EngineIdentity, n_images: int) -> Iterator[None]:
    """Time one batch into ENGINE_BATCH_SECONDS and count its images, or count the error by type."""
    labels = (identity.backend, identity.model)
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:
        ENGINE_RUN_ERRORS.labels(*labels, type(exc).__name__).inc()
        raise
    ENGINE_BATCH_SECONDS.labels(*labels).observe(time.perf_counter() - start)
    ENGINE_IMAGES.labels(*labels).inc(n_images)


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    major: int
    minor: int

    @property
    def sm(self) -> str:
        """Compute capability as TensorRT names it in file names and enums: 8.6 -> "sm86"."""
        return f"sm{self.major}{self.minor}"

    def __str__(self) -> str:
        return f"cuda:{self.index} ({self.name})"


def cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime`` since 12.6; ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise EngineUnavailable(f"cuda-python is not installed ({exc})") from None
    return runtime


def cuda_device(index: int = 0) -> CudaDevice:
    """The GPU at ``index`` as the CUDA runtime sees it, or EngineUnavailable with the CUDA error."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        raise EngineUnavailable(f"no usable GPU: cudaGetDeviceCount returned {err.name} "
                                "(no NVIDIA driver or device on this machine)")
    if count <= index:
        raise EngineUnavailable(f"no GPU cuda:{index}: the CUDA runtime sees {count} device(s)")
    err, props = rt.cudaGetDeviceProperties(index)
    if err != rt.cudaError_t.cudaSuccess:
        raise EngineUnavailable(f"cudaGetDeviceProperties({index}) returned {err.name}")
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return CudaDevice(index=index, name=name, major=props.major, minor=props.minor)
