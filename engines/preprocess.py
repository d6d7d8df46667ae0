"""DICOM pixels -> model input, exactly as the model card says, and a study's slices -> one score.

One path for every caller: inference (a ProcessPoolExecutor worker gets the instance's bytes
and the card) and training (engines/demo/train.py feeds synthetic raw-unit images through
`prepare_frame`, the same function), so a model never sees pixels prepared differently from
the ones it learnt on. Order matters and follows PS3.3 C.11 (Modality LUT, then VOI LUT, then
Presentation): rescale slope/intercept to modality units (HU for CT), MONOCHROME1 inversion,
the card's window (or min/max), then bilinear resize and normalisation. Everything here is a
plain function of plain data, picklable, and free of torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

T = TypeVar("T")

#: ITU-R BT.601 luma weights: RGB (or YBR converted to RGB by pydicom) -> one grey channel
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def decode_worker_init() -> None:
    """Initializer of decode worker processes (Linux, glibc).

    Keep freed memory instead of trimming the heap and mmapping each 0.5-1 MB buffer (the
    pickled instance, its pixel array, the float copies) afresh: re-faulting those pages
    made the workers ~2x slower (load/bench_preread.py). And die with the process that
    forked the worker, so a SIGKILLed AI worker leaves no decoder behind. A no-op elsewhere.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


class Undecodable(ValueError):
    """The instance's pixel data cannot be turned into model input; the message says why."""


class NotApplicable(ValueError):
    """The image is not one the model was made for (its card's applicability); the message says why."""


def field_of_view_mm(dataset: Dataset) -> float | None:
    """The image's larger extent in mm (Rows/Columns x PixelSpacing), None without PixelSpacing."""
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    if not spacing or len(spacing) != 2:
        return None
    try:
        return max(float(dataset.Rows) * float(spacing[0]), float(dataset.Columns) * float(spacing[1]))
    except (AttributeError, TypeError, ValueError):
        return None


def check_applicable(dataset: Dataset, card: Any) -> None:
    """Raise :class:`NotApplicable` if the image is outside the card's per-image applicability."""
    limits = getattr(card.applicability, "field_of_view_mm", None)
    if limits is None:
        return
    fov = field_of_view_mm(dataset)
    if fov is not None and not limits[0] <= fov <= limits[1]:
        raise NotApplicable(f"field of view {fov:.0f} mm outside the model's {limits[0]:g}-{limits[1]:g} mm")


def preprocess_instance(data: bytes, card: Any) -> list[np.ndarray]:
    """One (C, H, W) float32 array per frame of the DICOM instance in ``data``.

    ``card`` is an ``engines.card.ModelCard`` (only ``card.preprocessing`` and
    ``card.input.shape`` are read). Raises ``Undecodable`` for pixel data that cannot be read.
    """
    try:
        dataset = dcmread(BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise Undecodable(f"not a readable DICOM instance: {exc}") from exc
    return preprocess_dataset(dataset, card)


def preprocess_dataset(dataset: Dataset, card: Any) -> list[np.ndarray]:
    """``preprocess_instance`` for a dataset already in memory (tests, painted images)."""
    check_applicable(dataset, card)
    prep = card.preprocessing
    channels = int(card.input.shape[0])
    slope, intercept = rescale_of(dataset) if prep.rescale else (1.0, 0.0)
    monochrome1 = str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    return [
        prepare_frame(frame, prep, channels=channels, slope=slope, intercept=intercept,
                      monochrome1=monochrome1 and prep.invert_monochrome1)
        for frame in decode_frames(dataset)
    ]


def decode_frames(dataset: Dataset) -> list[np.ndarray]:
    """The stored pixel values as 2-D float32 frames (colour reduced to luminance)."""
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise Undecodable("the instance has no pixel data")
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = np.asarray(dataset.pixel_array)
    except Exception as exc:  # pydicom raises several types (NotImplementedError, RuntimeError, ValueError)
        raise Undecodable(f"cannot decode pixel data (transfer syntax {syntax}): {exc}") from exc
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if samples == 3:
        if pixels.ndim == 3:
            pixels = pixels[np.newaxis]
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise Undecodable(f"colour pixel data of unexpected shape {pixels.shape}")
        grey = pixels.astype(np.float32) @ _LUMA
    elif samples == 1:
        grey = pixels.astype(np.float32)
        if grey.ndim == 2:
            grey = grey[np.newaxis]
        if grey.ndim != 3:
            raise Undecodable(f"pixel data of unexpected shape {pixels.shape}")
    else:
        raise Undecodable(f"SamplesPerPixel {samples} is not supported")
    if grey.shape[0] != frames and frames > 1:
        raise Undecodable(f"NumberOfFrames is {frames} but {grey.shape[0]} frames decoded")
    return list(grey)


def rescale_of(dataset: Dataset) -> tuple[float, float]:
    """RescaleSlope/RescaleIntercept (PS3.3 C.11.1), also from the enhanced shared functional groups."""
    source: Dataset = dataset
    if "RescaleSlope" not in dataset and "SharedFunctionalGroupsSequence" in dataset:
        shared = dataset.SharedFunctionalGroupsSequence[0]
        if "PixelValueTransformationSequence" in shared:
            source = shared.PixelValueTransformationSequence[0]
    slope = float(source.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def prepare_frame(pixels: np.ndarray, prep: Any, *, channels: int = 1, slope: float = 1.0,
                  intercept: float = 0.0, monochrome1: bool = False) -> np.ndarray:
    """A 2-D frame of stored values -> the model's (C, H, W) float32 input.

    ``prep`` carries the card's preprocessing: ``window`` (center, width) or None for
    min/max, ``resize`` (H, W), ``normalize`` (mean, std) or None. Slope/intercept are given by
    the caller (identity when the card says ``rescale: false``).
    """
    units = np.asarray(pixels, dtype=np.float32) * np.float32(slope) + np.float32(intercept)
    window = prep.window
    if window is not None:
        low = float(window.center) - float(window.width) / 2.0
        scaled = (np.clip(units, low, low + float(window.width)) - low) / float(window.width)
    else:
        low, high = float(units.min()), float(units.max())
        scaled = (units - low) / (high - low) if high > low else np.zeros_like(units)
    if monochrome1:
        # MONOCHROME1: the minimum is displayed white (PS3.3 C.7.6.3.1.2); invert after the
        # VOI step so that "denser = brighter = larger" holds for every input the model sees
        scaled = 1.0 - scaled
    height, width = (int(v) for v in prep.resize)
    if scaled.shape != (height, width):
        scaled = np.asarray(Image.fromarray(scaled.astype(np.float32)).resize(
            (width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    if prep.normalize is not None:
        scaled = (scaled - float(prep.normalize.mean)) / float(prep.normalize.std)
    image = scaled.astype(np.float32)[np.newaxis]
    return np.repeat(image, channels, axis=0) if channels != 1 else image


def select_instances(instances: Sequence[tuple[Any, T]], volume: Any) -> list[T]:
    """The images of a study that the model reads, in slice order.

    ``instances`` pairs a sort key (slice position along the normal, else InstanceNumber;
    None sorts last) with the item. ``volume.slice_selection``: ``all`` keeps every image,
    ``central`` the middle ``max_slices``, ``uniform`` ``max_slices`` evenly spaced ones.
    """
    # stable: equal or missing keys keep arrival order; None sorts after every real key
    ordered = sorted(range(len(instances)), key=lambda i: (instances[i][0] is None,
                                                           instances[i][0] if instances[i][0] is not None else 0, i))
    items = [instances[i][1] for i in ordered]
    selection = getattr(volume, "slice_selection", "all") if volume is not None else "all"
    limit = getattr(volume, "max_slices", None) if volume is not None else None
    if selection == "all" or limit is None or len(items) <= int(limit):
        return items
    limit = int(limit)
    if selection == "central":
        start = (len(items) - limit) // 2
        return items[start:start + limit]
    if selection == "uniform":
        picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
        return [items[i] for i in picks]
    raise ValueError(f"unknown slice_selection {selection!r}")


def aggregate(slice_scores: np.ndarray, volume: Any) -> np.ndarray:
    """Per-image scores (n_images, n_labels) -> one study-level score per label."""
    scores = np.asarray(slice_scores, dtype=np.float32)
    if scores.ndim == 1:
        scores = scores[:, np.newaxis]
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"need scores of shape (n_images>0, n_labels), got {scores.shape}")
    how = getattr(volume, "aggregate", "max") if volume is not None else "max"
    if how == "max":
        return scores.max(axis=0)
    if how == "mean":
        return scores.mean(axis=0)
    if how == "top_k_mean":
        k = max(1, min(int(getattr(volume, "top_k", 3) or 3), scores.shape[0]))
        return np.sort(scores, axis=0)[-k:].mean(axis=0)
    raise ValueError(f"unknown aggregate {how!r}")
