"""Inference engines (TensorRT on GPU, ONNX Runtime on GPU or CPU) behind one interface.

``load_engine(card, "auto")`` tries the backends fastest first and takes the first that loads
here, logging which one and why each faster one was skipped: the pre-read must run on a laptop
(ONNX Runtime CPU, always there) and use a GPU where one is, with no configuration. Naming a
backend is a demand: if it cannot run here, EngineUnavailable says why. The runtimes are
imported lazily so ``import engines`` (e.g. for cards, in preprocessing worker processes) stays light.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters.telemetry import get_logger
from engines.base import BACKENDS, Engine, EngineIdentity, EngineUnavailable
from engines.card import CardError, ModelCard, default_models_dir, load_card, load_cards

__all__ = ["BACKENDS", "CardError", "Engine", "EngineIdentity", "EngineUnavailable", "ModelCard",
           "available_backends", "default_models_dir", "default_plan_cache", "load_card", "load_cards",
           "load_engine"]


def default_plan_cache() -> Path:
    """Where TensorRT plans are cached when the caller names no directory (the XDG cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "radstream" / "tensorrt"


def _load(card: ModelCard, backend: str, plan_cache: Path | None, threads: int | None) -> Engine:
    if backend == "tensorrt":
        from engines.tensorrt import load_tensorrt
        return load_tensorrt(card, plan_cache or default_plan_cache())
    from engines.onnx_runtime import OnnxRuntimeEngine
    return OnnxRuntimeEngine(card, cuda=backend == "onnxruntime-cuda", threads=threads)


def load_engine(card: ModelCard, backend: str = "auto", *, plan_cache: Path | None = None,
                threads: int | None = None) -> Engine:
    """An engine for ``card``: the named backend, or with "auto" the first of BACKENDS that loads here."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
    skipped: dict[str, str] = {}
    for candidate in BACKENDS if backend == "auto" else (backend,):
        try:
            engine = _load(card, candidate, plan_cache, threads)
        except EngineUnavailable as exc:
            if backend != "auto":
                raise
            skipped[candidate] = str(exc)
            continue
        identity = engine.identity
        get_logger(__name__).info("engine selected", model=card.name, backend=identity.backend,
                                  device=identity.device, precision=identity.precision, skipped=skipped)
        return engine
    raise EngineUnavailable(f"no backend can run {card.name} here: {skipped}")


def available_backends() -> dict[str, str | None]:
    """Each backend -> None if it can run on this machine, else the reason it cannot (no model loaded)."""
    from engines.tensorrt import runtime_device
    found: dict[str, str | None] = {}
    try:
        runtime_device()
        found["tensorrt"] = None
    except EngineUnavailable as exc:
        found["tensorrt"] = str(exc)
    from engines.onnx_runtime import cuda_provider_missing
    found["onnxruntime-cuda"] = cuda_provider_missing()
    found["onnxruntime-cpu"] = None
    return found
