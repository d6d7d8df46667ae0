"""Synthetic training images in raw modality units, and the same findings painted into real files.

The demo models must run on real DICOM through the production preprocessing, yet no labelled
clinical data can ship with radstream. So the training images are drawn here in the units a
scanner writes (Hounsfield units for head CT; MONOCHROME1 stored values for chest CR; arbitrary,
randomly scaled signal for brain MR, which has no absolute units), go through
`engines.preprocess.prepare_frame` like any instance, and carry a finding drawn by the same
function that `paint_finding` uses to put it into a real image (pydicom-data's head CT and
chest CR, pydicom's MR_small). A positive test case is then a real image with a known,
synthetic finding: enough to show the pipeline end to end, and nothing a clinician should rely on.
Anatomy is crude on purpose (ellipses, arcs, smoothed noise) but varied (shape, size,
position, contrast, noise, distractors such as falx, calcifications, ribs and nodules), so the
models learn the finding's local look rather than one background. Head CT and brain MR also vary
the zoom: from a whole head to a crop with no skull in sight (and, for CT, skull-less fields of
fat, muscle and bone fragments), with and without the finding.
Over 400 lines because two modalities' generators and the painting into real files share one
vocabulary of finding kinds; brain MR is in :mod:`engines.demo.mr_brain`, the tools in
:mod:`engines.demo.shapes`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
from PIL import Image
from pydicom import Dataset

from engines.demo.mr_brain import mr_brain_slice, paint_lesion
from engines.demo.shapes import _ellipse_radius, _grid, _integral_any, _wavy, blur, smooth_noise

#: kinds of finding this module can draw, keyed by the demo label names
KINDS = ("hemorrhage", "pneumothorax", "lesion")

#: other names a caller may use for a kind (the brain-MR lesion is also asked for by its image type)
ALIASES = {"mr_brain": "lesion"}

#: the synthetic head CT's field of view (mm across the image), close to a routine head scan
CT_FOV_MM = 245.0


# ---------------------------------------------------------------- head CT (Hounsfield units)

def hemorrhage_patch(rng: np.random.Generator, hu: np.ndarray, brain: np.ndarray, center: tuple[float, float],
                     mm_per_px: float, *, radius_mm: float | None = None,
                     density_hu: float | None = None) -> np.ndarray:
    """A hyperdense (55-85 HU), irregular, soft-edged blob with optional oedema halo, inside ``brain``."""
    yy, xx = _grid(hu.shape)
    radius = (radius_mm if radius_mm is not None else rng.uniform(5.0, 20.0)) / mm_per_px
    ratio = rng.uniform(0.55, 1.0)
    r = _ellipse_radius(yy, xx, center[0], center[1], radius, radius * ratio, rng.uniform(0, np.pi),
                        theta_terms=_wavy(rng, 0.25))
    edge = max(0.6, 0.8 / mm_per_px)
    blob = 1.0 / (1.0 + np.exp((r - 1.0) * radius / edge))
    density = density_hu if density_hu is not None else rng.uniform(55.0, 85.0)
    inner = density + rng.normal(0.0, 3.0, hu.shape) * (blob > 0.5)
    out = hu * (1 - blob) + inner * blob
    if rng.random() < 0.5:  # perihaematomal oedema: a darker rim
        halo = np.clip(1.0 - np.abs(r - 1.0 - 0.35) / 0.35, 0, 1) * (r > 1.0)
        out = out - rng.uniform(4.0, 10.0) * halo
    return np.where(brain, out, hu).astype(np.float32)


def ct_head_slice(rng: np.random.Generator, positive: bool, size: int = 256, zoom: bool = False) -> np.ndarray:
    """One axial head-CT slice in HU (float32, size x size), a finding in it when ``positive``.

    With ``zoom`` a random square of it (45-200 mm across, around the finding when there is
    one) resampled to a random matrix instead: partial views down to brain with no skull.
    """
    mm_per_px = CT_FOV_MM / size
    yy, xx = _grid((size, size))
    hu = np.full((size, size), -1000.0, np.float32)
    if rng.random() < 0.5:  # outside the reconstruction circle
        hu[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 > (size / 2) ** 2] = -3024.0
    cy, cx = size / 2 + rng.normal(0, 0.05 * size), size / 2 + rng.normal(0, 0.04 * size)
    rx = rng.uniform(62.0, 82.0) / mm_per_px
    ry = rx * rng.uniform(1.05, 1.35)
    angle = rng.normal(0, 0.15)
    terms = _wavy(rng, 0.05)
    radius = _ellipse_radius(yy, xx, cy, cx, ry, rx, angle, theta_terms=terms)
    skull = rng.uniform(3.5, 9.0) / mm_per_px / rx
    scalp = rng.uniform(2.0, 7.0) / mm_per_px / rx
    inner = 1.0 - skull
    # head holder: thin dense arcs below/around the head
    if rng.random() < 0.7:
        holder = _ellipse_radius(yy, xx, cy - rng.uniform(0, 20), cx, ry * rng.uniform(1.15, 1.4), rx * rng.uniform(1.2, 1.5))
        arc = (np.abs(holder - 1.0) < rng.uniform(0.006, 0.015)) & (yy > cy - rng.uniform(0, ry))
        hu[arc] = rng.uniform(150.0, 900.0)
    hu[radius < 1.0 + scalp] = rng.uniform(10.0, 50.0)
    hu[radius < 1.0] = rng.uniform(500.0, 1600.0) + 200.0 * smooth_noise(rng, (size, size), 6.0)[radius < 1.0]
    brain = radius < inner
    base = rng.uniform(24.0, 36.0)
    tissue = base + rng.uniform(1.0, 4.0) * smooth_noise(rng, (size, size), rng.uniform(4.0, 12.0))
    # cortex: a convoluted grey-matter ribbon, denser than white matter, along the periphery
    gyri = smooth_noise(rng, (size, size), rng.uniform(2.0, 4.0)) > rng.uniform(-0.3, 0.5)
    cortex = (radius > inner - rng.uniform(0.1, 0.3)) & brain & gyri
    tissue = tissue + blur(cortex.astype(np.float32), 0.7) * rng.uniform(3.0, 12.0)
    # beam hardening and partial volume: brain next to the inner table reads denser
    rim = np.clip(1.0 - (inner - radius) * rx / (rng.uniform(1.5, 6.0) / mm_per_px), 0, 1) * brain
    tissue = tissue + rim * rng.uniform(0.0, 30.0)
    sulci = (np.abs(smooth_noise(rng, (size, size), rng.uniform(1.5, 3.0))) < rng.uniform(0.05, 0.2)) & (
        radius > inner - rng.uniform(0.1, 0.25))
    tissue = np.where(sulci, rng.uniform(0.0, 15.0), tissue)
    if rng.random() < 0.8:  # lateral ventricles
        for side in (-1, 1):
            vr = _ellipse_radius(yy, xx, cy + rng.normal(0, 4), cx + side * rng.uniform(4, 12) / mm_per_px,
                                 rng.uniform(12, 30) / mm_per_px, rng.uniform(4, 12) / mm_per_px,
                                 angle + side * rng.uniform(0, 0.4))
            tissue = np.where(vr < 1.0, rng.uniform(0.0, 12.0), tissue)
    for _ in range(rng.integers(0, 3)):  # hypodense areas (infarct, oedema, resection cavity)
        hr = _ellipse_radius(yy, xx, cy + rng.uniform(-0.6, 0.6) * ry, cx + rng.uniform(-0.6, 0.6) * rx,
                             rng.uniform(10, 45) / mm_per_px, rng.uniform(8, 35) / mm_per_px, rng.uniform(0, np.pi),
                             theta_terms=_wavy(rng, 0.2))
        tissue = np.where(hr < 1.0, tissue - rng.uniform(8.0, 30.0), tissue)
    if rng.random() < 0.9:  # falx: thin, sometimes calcified midline line
        c, s = np.cos(angle), np.sin(angle)
        along = -s * (xx - cx) + c * (yy - cy)
        across = c * (xx - cx) + s * (yy - cy)
        falx = (np.abs(across) < rng.uniform(0.4, 1.6) / mm_per_px * 1.5) & (np.abs(along - rng.normal(0, 10)) < ry * rng.uniform(0.3, 0.9))
        tissue = np.where(falx, rng.uniform(45.0, 140.0), tissue)
    for _ in range(rng.integers(0, 5)):  # small calcifications (pineal, choroid plexus), vessels
        py, px = cy + rng.normal(0, 0.25 * ry), cx + rng.normal(0, 0.2 * rx)
        dot = (yy - py) ** 2 + (xx - px) ** 2 < rng.uniform(0.5, 2.5) ** 2
        tissue = np.where(dot, rng.uniform(80.0, 400.0), tissue)
    hu = np.where(brain, tissue, hu).astype(np.float32)
    blobs = []
    if positive:  # one or two intraparenchymal haematomas
        brain_inner = radius < inner - 0.04
        for _ in range(1 if rng.random() < 0.75 else 2):
            ys, xs = np.nonzero(radius < inner - 0.2)
            pick = rng.integers(len(ys))
            radius_mm = rng.uniform(5.0, 20.0)
            hu = hemorrhage_patch(rng, hu, brain_inner, (ys[pick], xs[pick]), mm_per_px, radius_mm=radius_mm)
            blobs.append((float(ys[pick]), float(xs[pick]), radius_mm))
    if not zoom:
        return _ct_noise(rng, hu)
    # a zoomed-in view: a random field of view from most of the head down to a few cm of brain
    # (no skull in sight), centred on the finding when there is one, resampled to a random matrix
    fov = rng.uniform(45.0, 200.0) if rng.random() < 0.7 else rng.uniform(45.0, 90.0)
    if blobs:
        by, bx, br = blobs[0]
        fov = max(fov, 2.6 * br + 8.0)
        half = fov / mm_per_px / 2
        slack = max(0.0, half - (br + 3.0) / mm_per_px)
        center = (by + rng.uniform(-slack, slack), bx + rng.uniform(-slack, slack))
    else:
        ys, xs = np.nonzero(radius < 1.0 + scalp)
        pick = rng.integers(len(ys))
        center = (float(ys[pick]), float(xs[pick]))
    crop = _crop(hu, center, fov / mm_per_px, -1000.0)
    out = int(rng.choice([64, 96, 128, 160, 192, 256]))
    hu = _resize(crop, (out, out))
    if rng.random() < 0.4:  # bone fragments (skull base, a cut through the vault) in both classes
        hu = _bone_fragments(rng, hu, fov / out, [] if not blobs else
                             [((by - center[0]) * mm_per_px * out / fov + out / 2,
                               (bx - center[1]) * mm_per_px * out / fov + out / 2, br * out / fov)])
    return _ct_noise(rng, hu)


def _ct_noise(rng: np.random.Generator, hu: np.ndarray) -> np.ndarray:
    """Quantum noise, a little correlated, sometimes streaky (as in body CT), at the image's matrix."""
    noise = rng.uniform(2.0, 7.0) if rng.random() < 0.7 else rng.uniform(7.0, 18.0)
    field = rng.standard_normal(hu.shape)
    if rng.random() < 0.3:  # streaks along one direction
        field = 0.8 * field + 0.5 * rng.standard_normal((hu.shape[0], 1)).astype(np.float32).repeat(hu.shape[1], 1)
    hu = hu + blur(field * noise * 1.6, rng.uniform(0.4, 0.9))
    return hu.astype(np.float32)


def _crop(image: np.ndarray, center: tuple[float, float], side: float, fill: float) -> np.ndarray:
    """A ``side``-pixel square of ``image`` around ``center``, ``fill`` outside the image."""
    n = max(8, int(round(side)))
    y0, x0 = int(round(center[0] - n / 2)), int(round(center[1] - n / 2))
    out = np.full((n, n), fill, np.float32)
    h, w = image.shape
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + n), min(w, x0 + n)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def _bone_fragments(rng: np.random.Generator, hu: np.ndarray, mm_per_px: float,
                    keep_clear: list[tuple[float, float, float]]) -> np.ndarray:
    """Dense (150-1600 HU) irregular pieces of bone, some with a marrow or canal inside, not over a finding."""
    yy, xx = _grid(hu.shape)
    size = hu.shape[0]
    for _ in range(rng.integers(1, 5)):
        r_mm = rng.uniform(2.0, 25.0)
        cy, cx = rng.uniform(0, size), rng.uniform(0, size)
        r_px = r_mm / mm_per_px
        if any(np.hypot(cy - y, cx - x) < r_px + rad + 3.0 / mm_per_px for y, x, rad in keep_clear):
            continue
        piece = _ellipse_radius(yy, xx, cy, cx, r_px, r_px * rng.uniform(0.3, 1.0), rng.uniform(0, np.pi),
                                theta_terms=_wavy(rng, 0.4))
        cortex = rng.uniform(400.0, 1600.0)
        hu = np.where(piece < 1.0, cortex, hu)
        if rng.random() < 0.6:  # cancellous interior, sometimes with a soft-tissue canal
            hu = np.where(piece < rng.uniform(0.5, 0.85), rng.uniform(150.0, 400.0)
                          + 40.0 * smooth_noise(rng, hu.shape, 1.5), hu)
            if rng.random() < 0.4:
                hu = np.where(piece < rng.uniform(0.15, 0.4), rng.uniform(0.0, 40.0), hu)
    return hu.astype(np.float32)


def ct_body_field(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """A small field of view with no brain: fat, muscle, organs, bone (vertebra-like), air; HU.

    Positive fields carry the same hyperdense blob in soft tissue, so that what the model
    learns is the blob, not a head around it.
    """
    size = int(rng.choice([64, 96, 128, 160, 192, 256]))
    fov = rng.uniform(45.0, 200.0)
    mm_per_px = fov / size
    yy, xx = _grid((size, size))
    hu = np.full((size, size), rng.choice([-1000.0, -100.0]), np.float32)
    body = _ellipse_radius(yy, xx, size * rng.uniform(0.3, 0.7), size * rng.uniform(0.3, 0.7),
                           size * rng.uniform(0.4, 1.2), size * rng.uniform(0.4, 1.2), rng.uniform(0, np.pi),
                           theta_terms=_wavy(rng, 0.2)) < 1.0
    fat = rng.uniform(-130.0, -60.0) + 10.0 * smooth_noise(rng, (size, size), 2.0)
    hu = np.where(body, fat, hu)
    # muscle and organs: 20-55 HU regions, with fatty striations through the muscle
    tissue = smooth_noise(rng, (size, size), rng.uniform(3.0, 10.0) * size / 128) > rng.uniform(-0.8, 0.4)
    level = rng.uniform(20.0, 55.0) + rng.uniform(1.0, 5.0) * smooth_noise(rng, (size, size), 4.0)
    stripes = np.abs(smooth_noise(rng, (size, size), rng.uniform(0.8, 2.0))) < rng.uniform(0.0, 0.15)
    soft = body & tissue
    hu = np.where(soft & ~stripes, level, hu)
    for _ in range(rng.integers(0, 3)):  # organs / fluid: smooth ellipses of 0-60 HU
        organ = _ellipse_radius(yy, xx, rng.uniform(0, size), rng.uniform(0, size), size * rng.uniform(0.1, 0.4),
                                size * rng.uniform(0.1, 0.4), rng.uniform(0, np.pi), theta_terms=_wavy(rng, 0.2))
        hu = np.where((organ < 1.0) & body, rng.uniform(0.0, 50.0), hu)
        soft = soft | ((organ < 1.0) & body)
    blobs = []
    if positive:
        radius_mm = min(rng.uniform(5.0, 20.0), fov / 3.0)
        margin = radius_mm / mm_per_px
        ys, xs = np.nonzero(soft & (yy > margin) & (yy < size - margin) & (xx > margin) & (xx < size - margin))
        if len(ys) == 0:
            ys, xs = np.array([size / 2]), np.array([size / 2])
            soft = np.ones_like(soft)
        pick = rng.integers(len(ys))
        hu = hemorrhage_patch(rng, hu, body | soft, (float(ys[pick]), float(xs[pick])), mm_per_px,
                              radius_mm=radius_mm)
        blobs.append((float(ys[pick]), float(xs[pick]), margin))
    if rng.random() < 0.85:
        hu = _bone_fragments(rng, hu, mm_per_px, blobs)
    return _ct_noise(rng, hu)


def ct_head_sample(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """One training CT image in HU: a whole head slice, a zoomed-in view of one, or a body field."""
    draw = rng.random()
    if draw < 0.45:
        return ct_head_slice(rng, positive)
    if draw < 0.8:
        return ct_head_slice(rng, positive, zoom=True)
    return ct_body_field(rng, positive)


def _inside(mask: np.ndarray) -> np.ndarray:
    """Pixels enclosed by ``mask`` in all four directions (cheap hole-fill without scipy)."""
    left = np.maximum.accumulate(mask, axis=1)
    right = np.maximum.accumulate(mask[:, ::-1], axis=1)[:, ::-1]
    up = np.maximum.accumulate(mask, axis=0)
    down = np.maximum.accumulate(mask[::-1], axis=0)[::-1]
    return left & right & up & down & ~mask


def paint_hemorrhage(hu: np.ndarray, mm_per_px: float, rng: np.random.Generator) -> np.ndarray:
    """A hyperdense blob (10-15 mm, 65-80 HU) placed in brain tissue of a real HU image."""
    radius_mm = rng.uniform(10.0, 15.0)
    margin = int(np.ceil((radius_mm + 6.0) / mm_per_px))
    skull = hu > 300.0
    smooth = blur(hu, 2.0 / mm_per_px)
    candidates = (_inside(skull) & (smooth > 18.0) & (smooth < 45.0)
                  & ~_integral_any(skull, margin) & ~_integral_any(hu > 60.0, margin // 2))
    ys, xs = np.nonzero(candidates)
    if len(ys) == 0:
        raise ValueError("no brain tissue found to paint a hemorrhage into")
    pick = rng.integers(len(ys))
    brain = _inside(skull)
    return hemorrhage_patch(rng, hu, brain, (float(ys[pick]), float(xs[pick])), mm_per_px,
                            radius_mm=radius_mm, density_hu=rng.uniform(65.0, 80.0))


# ---------------------------------------------------------------- chest radiograph (display units)

def pneumothorax_delta(display: np.ndarray, lung: np.ndarray, side: str, rng: np.random.Generator, *,
                       depth: float | None = None, contrast: float | None = None) -> np.ndarray:
    """The change (display units, 0=black 1=white) that an apical pneumothorax makes.

    ``lung`` is the lung field of the ``side`` ("left" / "right" of the image) half. The
    air space runs along the lateral and apical pleura, widest at the apex and tapering
    down; lateral to a thin bright visceral pleural line the lucent space is darker
    and without lung markings.
    """
    h, w = lung.shape
    rows = np.nonzero(lung.any(axis=1))[0]
    if len(rows) < 8:
        raise ValueError("no lung field to paint a pneumothorax into")
    top, bottom = rows[0], rows[-1]
    height = bottom - top
    columns = np.nonzero(lung.any(axis=0))[0]
    width = columns[-1] - columns[0]
    depth = (depth if depth is not None else rng.uniform(0.12, 0.3)) * width
    end = top + height * rng.uniform(0.35, 0.7)
    yy, xx = _grid(lung.shape)
    first = np.argmax(lung, axis=1).astype(np.float32)  # leftmost lung column per row
    last = (w - 1 - np.argmax(lung[:, ::-1], axis=1)).astype(np.float32)
    lateral = (xx - first[:, None]) if side == "left" else (last[:, None] - xx)
    apex = yy - np.argmax(lung, axis=0).astype(np.float32)[None, :]
    taper = np.clip((end - yy) / max(1.0, (end - top) * 0.6), 0, 1)
    reach = depth * taper ** 0.7
    space = lung & ((lateral < reach) | (apex < reach * 0.8)) & (yy < end)
    soft = np.clip(blur(space.astype(np.float32), max(0.6, 0.004 * h)), 0, 1) * lung
    contrast = contrast if contrast is not None else rng.uniform(0.08, 0.22)
    markings = blur(display, 0.012 * h) - display  # lung markings vanish in the air space
    delta = soft * (markings - contrast)
    grown = blur(space.astype(np.float32), max(1.0, 0.006 * h)) > 0.15
    line = blur((grown & ~space & lung).astype(np.float32), max(0.5, 0.002 * h))
    line = line / (line.max() + 1e-6)
    return (delta + line * contrast * rng.uniform(0.5, 1.0)).astype(np.float32)


def _lung_mask(yy, xx, h, w, side, rng):
    sign = -1 if side == "left" else 1
    uc = 0.5 + sign * rng.uniform(0.18, 0.26)
    hw = rng.uniform(0.12, 0.19)
    top = rng.uniform(0.06, 0.18)
    hh = rng.uniform(0.26, 0.36)
    vc = top + hh
    u, v = xx / w, yy / h
    du, dv = (u - uc) / hw, (v - vc) / hh
    exponent = np.where(dv > 0, rng.uniform(3.0, 6.0), 2.0)
    lung = np.abs(du) ** 2 + np.abs(dv) ** exponent < 1.0
    medial = (u - 0.5) * sign < rng.uniform(0.03, 0.08)
    return lung & ~medial, uc, hw, top, hh


def cr_chest(rng: np.random.Generator, positive: bool, height: int = 256) -> tuple[np.ndarray, float]:
    """A chest radiograph as MONOCHROME1 stored values (float32), and its maximum stored value."""
    h, w = height, int(height * rng.uniform(0.88, 1.02))
    yy, xx = _grid((h, w))
    u, v = xx / w, yy / h
    d = np.full((h, w), rng.uniform(0.0, 0.25), np.float32)  # direct exposure (air)
    shoulder = rng.uniform(-0.05, 0.12)
    half_width = rng.uniform(0.42, 0.6) + 0.08 * np.clip(v - shoulder, 0, 1)
    body = (np.abs(u - 0.5) < half_width) & (v > shoulder + 0.08 * np.abs(u - 0.5) / 0.5)
    d[body] = rng.uniform(0.7, 0.88)
    d = d + body * 0.06 * smooth_noise(rng, (h, w), 0.08 * h)
    by_side = {side: _lung_mask(yy, xx, h, w, side, rng)[0] for side in ("left", "right")}
    lungs = by_side["left"] | by_side["right"]
    lung_level = rng.uniform(0.35, 0.62)
    gradient = 0.12 * np.clip(1 - (v - 0.05) / 0.3, 0, 1) + 0.08 * np.clip((v - 0.55) / 0.3, 0, 1)
    # the lung edge fades into the chest wall: only a pneumothorax makes a sharp pleural line
    aerated = np.clip(blur(lungs.astype(np.float32), rng.uniform(0.006, 0.02) * h) * 1.3, 0, 1)
    lung_d = lung_level + gradient + 0.03 * smooth_noise(rng, (h, w), 0.05 * h)
    lung_d = lung_d + rng.uniform(0.01, 0.05) * smooth_noise(rng, (h, w), rng.uniform(0.004, 0.012) * h)
    d = d * (1 - aerated) + np.minimum(lung_d, d) * aerated
    # mediastinum and heart
    heart = _ellipse_radius(yy, xx, h * rng.uniform(0.58, 0.7), w * rng.uniform(0.52, 0.6),
                            h * rng.uniform(0.13, 0.2), w * rng.uniform(0.12, 0.2)) < 1.0
    mediastinum = (np.abs(u - 0.5 - rng.normal(0, 0.01)) < rng.uniform(0.06, 0.1)) & body
    d = np.where((heart | mediastinum) & body, np.maximum(d, rng.uniform(0.8, 0.95)), d)
    diaphragm = v > (rng.uniform(0.62, 0.8) - 0.05 * np.cos((u - 0.5) * 2 * np.pi))
    d = np.where(diaphragm & body, np.maximum(d, rng.uniform(0.82, 0.97)), d)
    # ribs: posterior arcs across each hemithorax; clavicles; spine
    spacing = rng.uniform(0.06, 0.085)
    phase = rng.uniform(0, spacing)
    thick = rng.uniform(0.25, 0.45)
    rib_y = v - 0.18 * (np.abs(u - 0.5) / 0.5) ** 2 * rng.uniform(0.6, 1.4)
    ribs = (((rib_y - phase) % spacing) / spacing < thick) & body & (v < 0.8)
    d = d + blur(ribs * (0.3 + 0.7 * aerated), 0.6) * rng.uniform(0.03, 0.1)
    clav = np.abs(v - (rng.uniform(0.1, 0.2) + 0.12 * np.abs(u - 0.5))) < rng.uniform(0.01, 0.02)
    d = d + (clav & body & (np.abs(u - 0.5) < 0.38)) * rng.uniform(0.05, 0.15)
    d = np.where(np.abs(u - 0.5) < rng.uniform(0.03, 0.05), d + rng.uniform(0.0, 0.08), d)
    for _ in range(rng.integers(0, 8)):  # nodules and masses (distractors in both classes)
        ys, xs = np.nonzero(lungs)
        pick = rng.integers(len(ys))
        r = _ellipse_radius(yy, xx, ys[pick], xs[pick], *(2 * [rng.uniform(0.015, 0.07) * h]))
        d = d + rng.uniform(0.05, 0.2) / (1 + np.exp((r - 1) * 6))
    d = blur(d, rng.uniform(0.4, 1.2))
    if positive:
        side = "left" if rng.random() < 0.5 else "right"
        d = d + pneumothorax_delta(d, by_side[side], side, rng)
    for _ in range(rng.integers(0, 3)):  # side markers / labels: saturated rectangles
        y0, x0 = rng.integers(0, h - 12), rng.integers(0, w - 20)
        d[y0:y0 + rng.integers(4, 12), x0:x0 + rng.integers(6, 20)] = rng.choice([0.0, 1.2])
    d = np.clip(d, -0.1, 1.3)
    d = np.sign(d) * np.abs(d) ** rng.uniform(0.7, 1.4)  # processing curve differs between vendors
    d = d + rng.uniform(0.003, 0.02) * rng.standard_normal(d.shape)
    top_value = float(rng.choice([4095.0, 16383.0, 32767.0]))
    raw = top_value * (rng.uniform(0.0, 0.1) + rng.uniform(0.6, 0.9) * (1.0 - (d + 0.1) / 1.4))
    return np.clip(raw, 0, top_value).astype(np.float32), top_value


def lung_fields(display: np.ndarray) -> np.ndarray:
    """A rough lung-field mask of a real chest radiograph in display units (bright = dense).

    Lungs are the dark regions enclosed by brighter tissue left and right, away from the
    image border; enough to place a synthetic finding, not a segmentation.
    """
    h, w = display.shape
    smooth = blur(display, 0.01 * h)
    body = smooth > np.percentile(smooth, 20)
    core = smooth[int(0.2 * h):int(0.7 * h), int(0.15 * w):int(0.85 * w)]
    threshold = 0.5 * (np.percentile(core, 25) + np.percentile(core, 75))
    dark = smooth < threshold
    left = np.maximum.accumulate(body & ~dark, axis=1)
    right = np.maximum.accumulate((body & ~dark)[:, ::-1], axis=1)[:, ::-1]
    up = np.maximum.accumulate(body, axis=0)
    yy, xx = _grid(display.shape)
    return dark & left & right & up & (yy < 0.8 * h) & (np.abs(xx - w / 2) > 0.04 * w)


def paint_pneumothorax_display(display: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The display-unit change of an apical pneumothorax in a real chest radiograph."""
    h, w = display.shape
    lungs = lung_fields(display)
    side = "left" if rng.random() < 0.5 else "right"
    _, xx = _grid(display.shape)
    lung = lungs & ((xx < w / 2) if side == "left" else (xx >= w / 2))
    return pneumothorax_delta(display, lung, side, rng, depth=rng.uniform(0.2, 0.28),
                              contrast=rng.uniform(0.15, 0.2))


# ---------------------------------------------------------------- into real DICOM

def paint_finding(dataset: Dataset, kind: str, seed: int) -> Dataset:
    """A copy of ``dataset`` with a synthetic ``kind`` finding painted into its pixel data.

    Pixel data is written back uncompressed (Explicit VR Little Endian). "hemorrhage" needs
    a CT slice (HU via rescale); "pneumothorax" a single-frame radiograph; "lesion" (alias
    "mr_brain") a single-frame MR slice.
    """
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown finding {kind!r}; choose from {KINDS}")
    rng = np.random.default_rng(seed)
    painted = copy.deepcopy(dataset)
    stored = painted.pixel_array.astype(np.float32)
    if stored.ndim != 2:
        raise ValueError("paint_finding needs a single-frame greyscale image")
    if kind == "hemorrhage":
        slope = float(painted.get("RescaleSlope", 1.0))
        intercept = float(painted.get("RescaleIntercept", 0.0))
        spacing = float(painted.get("PixelSpacing", [CT_FOV_MM / stored.shape[1]] * 2)[1])
        hu = paint_hemorrhage(stored * slope + intercept, spacing, rng)
        new = (hu - intercept) / slope
    elif kind == "lesion":
        new = paint_lesion(stored, rng)
    else:
        low, high = float(stored.min()), float(stored.max())
        monochrome1 = painted.PhotometricInterpretation == "MONOCHROME1"
        display = (stored - low) / (high - low)
        display = 1.0 - display if monochrome1 else display
        scale = 512.0 / stored.shape[0]  # find the lungs on a small copy, paint at full size
        small = _resize(display, (512, int(round(stored.shape[1] * scale))))
        delta = _resize(paint_pneumothorax_display(small, rng), stored.shape)
        new = stored + (-delta if monochrome1 else delta) * (high - low)
    bits = int(painted.BitsStored)
    signed = int(painted.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    array = np.clip(np.round(new), lo, hi).astype(painted.pixel_array.dtype)
    painted.set_pixel_data(array, painted.PhotometricInterpretation, bits)
    return painted


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image.astype(np.float32)).resize(
        (int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR), dtype=np.float32)


def samples(kind: str, count: int, seed: int) -> Iterator[tuple[np.ndarray, dict, int]]:
    """``count`` (raw frame, DICOM-like attributes, label) triples, half positive, reproducible."""
    kind = ALIASES.get(kind, kind)
    rng = np.random.default_rng(seed)
    for index in range(count):
        positive = index % 2
        if kind == "hemorrhage":
            hu = ct_head_sample(rng, bool(positive))
            stored = np.round(hu + 1024.0)  # stored values with the usual CT intercept
            yield stored, {"slope": 1.0, "intercept": -1024.0, "monochrome1": False}, positive
        elif kind == "pneumothorax":
            raw, _ = cr_chest(rng, bool(positive))
            yield np.round(raw), {"slope": 1.0, "intercept": 0.0, "monochrome1": True}, positive
        elif kind == "lesion":
            yield np.round(mr_brain_slice(rng, bool(positive))), {"slope": 1.0, "intercept": 0.0,
                                                                  "monochrome1": False}, positive
        else:
            raise ValueError(f"unknown finding {kind!r}")
