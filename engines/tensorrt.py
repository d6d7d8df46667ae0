"""TensorRT: build an engine plan from the card's ONNX once, cache it by key, run it on the GPU.

Two halves, because they need different machines. *Building* (``build_plan``) parses the ONNX
with ``OnnxParser``, adds one optimisation profile for the dynamic batch and serialises the
plan; TensorRT for RTX (PyPI ``tensorrt-rtx``, module ``tensorrt_rtx``, TensorRT's API) builds
ahead of time without a GPU, so CI builds real plans. A plan is only valid for the TensorRT
version and the GPU target it was built for, so both are in the cache key and the file name:
``{model}-{sha256[:16]}-trt{version}-{target}.plan``. ``target`` is the GPU's compute capability
("sm86"); with no GPU, an RTX build uses TensorRT-RTX's default portable target (compute
capability 8.0, 8.6, 8.9 and 12.x; NVIDIA's "CPU-only AOT" docs) and the key says "cpu-build".
*Running* (``TensorRTEngine``) deserialises the plan with ``trt.Runtime``, keeps device buffers
for max_batch from cuda-python and runs ``execute_async_v3`` on its own stream. The GPU is
probed before any TensorRT runtime call, so on a machine without one (or with a GPU the
runtime refuses: TensorRT-RTX does not run on 9.0, H100/H200) it raises EngineUnavailable.

Precision: TensorRT-RTX networks are strongly typed (it has no ``BuilderFlag.FP16``), so the
plan runs in the ONNX model's own types; datacenter TensorRT gets ``BuilderFlag.FP16`` when
``platform_has_fast_fp16``.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from adapters.telemetry import get_logger
from engines.base import CudaDevice, EngineUnavailable, check_batch, cuda_device, cudart, identity_for, observed
from engines.card import ModelCard

log = get_logger(__name__)

#: what an RTX plan built without a GPU runs on (TensorRT-RTX docs, "CPU-only AOT": 8.0, 8.6, 8.9, 12.x)
RTX_PORTABLE_TARGET = "cpu-build"


@dataclass(frozen=True)
class Flavour:
    module: ModuleType
    backend: str        # "tensorrt" (datacenter) | "tensorrt-rtx"
    version: str        # e.g. "10.13.0.35" or "rtx1.7.1.116"

    @property
    def is_rtx(self) -> bool:
        return self.backend == "tensorrt-rtx"


@functools.cache
def flavour() -> Flavour:
    """Datacenter ``tensorrt`` (production images) if importable, else ``tensorrt_rtx``."""
    try:
        import tensorrt as trt
        return Flavour(trt, "tensorrt", trt.__version__)
    except ImportError:
        pass
    try:
        import tensorrt_rtx as trt
    except ImportError as exc:
        raise EngineUnavailable(f"neither tensorrt nor tensorrt_rtx is importable ({exc})") from None
    return Flavour(trt, "tensorrt-rtx", f"rtx{trt.__version__}")


@functools.cache
def _logger():
    # TensorRT wants one logger per process, shared by builders and runtimes.
    trt = flavour().module
    return trt.Logger(trt.Logger.WARNING)


@dataclass(frozen=True)
class PlanFile:
    path: Path
    key: str            # the file name's stem: model, hash, TensorRT version, target
    built: bool         # False: reused from the cache
    seconds: float      # build time (0 when reused)
    target: str         # "sm86", or "cpu-build" (TensorRT-RTX's portable default)


def plan_target(device: CudaDevice | None) -> str:
    """The target token of the cache key for this machine, or EngineUnavailable if it cannot build."""
    fl = flavour()
    if device is None:
        if not fl.is_rtx:
            raise EngineUnavailable("datacenter TensorRT needs a GPU to build a plan, and there is none")
        return RTX_PORTABLE_TARGET
    if fl.is_rtx and device.sm.upper() not in fl.module.ComputeCapability.__members__:
        raise EngineUnavailable(f"TensorRT-RTX {fl.module.__version__} cannot target compute capability "
                                f"{device.major}.{device.minor} ({device.name})")
    return device.sm


def plan_key(card: ModelCard, target: str) -> str:
    return f"{card.name}-{card.sha256[:16]}-trt{flavour().version}-{target}"


def _local_device() -> CudaDevice | None:
    try:
        return cuda_device()
    except EngineUnavailable:
        return None


def build_plan(card: ModelCard, cache_dir: str | Path, *, device: CudaDevice | None = None) -> PlanFile:
    """The card's plan for this machine's target: reused from ``cache_dir`` if there, else built."""
    device = device or _local_device()
    target = plan_target(device)
    key = plan_key(card, target)
    path = Path(cache_dir) / f"{key}.plan"
    if path.is_file() and path.stat().st_size > 0:
        return PlanFile(path, key, built=False, seconds=0.0, target=target)
    start = time.perf_counter()
    plan = _serialize(card, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(plan)
        os.replace(tmp, path)  # atomic: a reader never sees half a plan
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    log.info("tensorrt plan built", model=card.name, key=key, target=target, bytes=len(plan),
             seconds=round(seconds, 3))
    return PlanFile(path, key, built=True, seconds=seconds, target=target)


def _serialize(card: ModelCard, target: str) -> bytes:
    fl = flavour()
    trt = fl.module
    builder = trt.Builder(_logger())
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10 and RTX
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse(card.model_file.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineUnavailable(f"TensorRT cannot parse {card.model_file.name}: {errors}")
    config = builder.create_builder_config()
    c, h, w = card.input.shape
    most = card.input.max_batch
    profile = builder.create_optimization_profile()
    profile.set_shape(card.input.name, (1, c, h, w), (max(1, most // 2), c, h, w), (most, c, h, w))
    config.add_optimization_profile(profile)
    if fl.is_rtx and target != RTX_PORTABLE_TARGET:
        config.num_compute_capabilities = 1
        config.set_compute_capability(trt.ComputeCapability.__members__[target.upper()], 0)
    elif not fl.is_rtx and getattr(builder, "platform_has_fast_fp16", False):
        config.set_flag(trt.BuilderFlag.FP16)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineUnavailable(f"TensorRT could not build {card.model_file.name} (see the TensorRT log above)")
    return bytes(plan)


def plan_precision(card: ModelCard) -> str:
    fl = flavour()
    if fl.is_rtx or not getattr(fl.module.Builder(_logger()), "platform_has_fast_fp16", False):
        return "fp16" if card.input.dtype == "float16" else "fp32"
    return "fp16"


def runtime_device() -> CudaDevice:
    """The GPU a plan would run on, or EngineUnavailable saying why none can (checked before TensorRT)."""
    device = cuda_device()
    fl = flavour()
    if fl.is_rtx and device.sm.upper() not in fl.module.ComputeCapability.__members__:
        raise EngineUnavailable(f"TensorRT-RTX {fl.module.__version__} does not run on compute capability "
                                f"{device.major}.{device.minor} ({device.name})")
    return device


def _ok(result: tuple, call: str, error: type[Exception] = RuntimeError):
    """cuda-python returns (cudaError_t, *values); raise on an error, else give the values."""
    rt = cudart()
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        raise error(f"{call} failed: {err.name}")
    return values[0] if len(values) == 1 else values


class TensorRTEngine:
    """A deserialised plan with device buffers for ``max_batch`` images; one batch at a time."""

    def __init__(self, card: ModelCard, plan: PlanFile) -> None:
        device = runtime_device()  # before any TensorRT runtime call: no GPU => EngineUnavailable here
        fl = flavour()
        trt = fl.module
        rt = cudart()
        _ok(rt.cudaSetDevice(device.index), "cudaSetDevice", EngineUnavailable)
        blob = plan.path.read_bytes()
        runtime = trt.Runtime(_logger())
        if hasattr(runtime, "get_engine_validity"):  # RTX: checks the header against this GPU and version
            validity, diagnostics = runtime.get_engine_validity(blob)
            if validity == trt.EngineValidity.INVALID:
                raise EngineUnavailable(f"plan {plan.path.name} is not valid on {device}: {diagnostics}")
        self._engine = runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise EngineUnavailable(f"TensorRT could not deserialize {plan.path.name} on {device}")
        self._runtime = runtime  # the runtime must outlive the engine
        for name, mode in ((card.input.name, trt.TensorIOMode.INPUT), (card.output.name, trt.TensorIOMode.OUTPUT)):
            if self._engine.get_tensor_mode(name) != mode:
                raise EngineUnavailable(f"plan {plan.path.name} has no {mode.name.lower()} tensor {name!r}")
        self._context = self._engine.create_execution_context()
        self.card = card
        self.max_batch = card.input.max_batch
        self.identity = identity_for(card, fl.backend, str(device), plan_precision(card))
        c, h, w = card.input.shape
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(card.output.name)))
        self._in_bytes = self.max_batch * c * h * w * np.dtype(card.input.dtype).itemsize
        self._out_bytes = self.max_batch * len(card.labels) * self._out_dtype.itemsize
        self._stream = _ok(rt.cudaStreamCreate(), "cudaStreamCreate", EngineUnavailable)
        self._d_in = _ok(rt.cudaMalloc(self._in_bytes), "cudaMalloc(input)", EngineUnavailable)
        self._d_out = _ok(rt.cudaMalloc(self._out_bytes), "cudaMalloc(output)", EngineUnavailable)
        self._context.set_tensor_address(card.input.name, int(self._d_in))
        self._context.set_tensor_address(card.output.name, int(self._d_out))
        self._lock = threading.Lock()  # one context, one pair of buffers: batches run one at a time

    def run(self, batch: np.ndarray) -> np.ndarray:
        rt = cudart()
        with self._lock, observed(self.identity, len(batch)):
            if self._context is None:
                raise RuntimeError(f"{self.identity.model}: engine is closed")
            host_in = check_batch(self.card, batch)
            host_out = np.empty((len(host_in), len(self.card.labels)), dtype=self._out_dtype)
            if not self._context.set_input_shape(self.card.input.name, host_in.shape):
                raise RuntimeError(f"TensorRT refused input shape {host_in.shape}")
            stream = self._stream
            _ok(rt.cudaMemcpyAsync(self._d_in, host_in.ctypes.data, host_in.nbytes,
                                   rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync H2D")
            if not self._context.execute_async_v3(int(stream)):  # TensorRT takes the raw cudaStream_t handle
                raise RuntimeError("execute_async_v3 failed (see the TensorRT log)")
            _ok(rt.cudaMemcpyAsync(host_out.ctypes.data, self._d_out, host_out.nbytes,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync D2H")
            _ok(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            return host_out.astype(np.float32, copy=False)

    def close(self) -> None:
        rt = cudart()
        with self._lock:
            if self._context is None:
                return
            self._context = self._engine = None  # the context goes before the memory it points at
            for pointer in (self._d_in, self._d_out):
                rt.cudaFree(pointer)
            rt.cudaStreamDestroy(self._stream)


def load_tensorrt(card: ModelCard, plan_cache: str | Path) -> TensorRTEngine:
    """Probe the GPU first (cheap, and no plan is built where it could not run), then build or reuse, then load."""
    device = runtime_device()
    return TensorRTEngine(card, build_plan(card, plan_cache, device=device))
