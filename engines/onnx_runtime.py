"""ONNX Runtime engines: the embedded CPU default (always loads) and CUDA where onnxruntime-gpu is.

The CPU engine is what makes the AI pre-read work on any machine with no extra setup, so it
must never depend on a GPU. At load the ONNX graph's input and output names are checked against
the card: a card that names the wrong tensor fails here, with the card's key, not at the first
study. ONNX Runtime falls back to CPU silently when the CUDA provider cannot start, so the CUDA
engine checks ``session.get_providers()`` and refuses rather than mislabel CPU work as GPU.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from engines.base import EngineUnavailable, check_batch, cuda_device, identity_for, observed
from engines.card import CardError, ModelCard


class OnnxRuntimeEngine:
    """One ``ort.InferenceSession`` for one card; ``run`` is thread-safe (ORT sessions are)."""

    def __init__(self, card: ModelCard, *, cuda: bool = False, threads: int | None = None) -> None:
        if cuda and (reason := cuda_provider_missing()):
            raise EngineUnavailable(reason)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads  # 0 (the default) = one per physical core
        options.inter_op_num_threads = 1            # a CNN is one chain of ops: nothing to run in parallel
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(card.model_file), sess_options=options, providers=providers)
        if cuda and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise EngineUnavailable(f"onnxruntime could not start the CUDA provider; got {self.session.get_providers()}")
        _check_names(card, self.session)
        self.card = card
        self.max_batch = card.input.max_batch
        device = _cuda_name() if cuda else "cpu"
        self.identity = identity_for(card, "onnxruntime-cuda" if cuda else "onnxruntime-cpu", device,
                                     "fp16" if card.input.dtype == "float16" else "fp32")
        self._closed = threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._closed.is_set():
            raise RuntimeError(f"{self.identity.model}: engine is closed")
        with observed(self.identity, len(batch)):
            feed = {self.card.input.name: check_batch(self.card, batch)}
            (out,) = self.session.run([self.card.output.name], feed)
            return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self._closed.set()


def _cuda_name() -> str:
    try:
        return str(cuda_device())  # "cuda:0 (NVIDIA ...)"; ORT itself does not name the GPU
    except EngineUnavailable:
        return "cuda:0"


def cuda_provider_missing() -> str | None:
    """Why ONNX Runtime cannot use CUDA here (None if it can): the CPU-only wheel has no CUDA provider."""
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return None
    return f"CUDAExecutionProvider not in onnxruntime's providers {providers} (onnxruntime-gpu is not installed)"


def _check_names(card: ModelCard, session: ort.InferenceSession) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if card.input.name not in inputs:
        raise CardError(f"{card.path}: input.name: {card.input.name!r} is not an input of "
                        f"{card.model_file.name} (it has {inputs})")
    if card.output.name not in outputs:
        raise CardError(f"{card.path}: output.name: {card.output.name!r} is not an output of "
                        f"{card.model_file.name} (it has {outputs})")
