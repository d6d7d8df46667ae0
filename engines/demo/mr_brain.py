"""Synthetic brain MR slices with a lesion-like focal hyperintensity, and the same lesion
painted into a real MR image (the ``radstream-demo-lesion-mr`` demo model's data)."""

from __future__ import annotations

import numpy as np

from engines.demo.shapes import _ellipse_radius, _grid, _integral_any, _wavy, blur, smooth_noise

# ---------------------------------------------------------------- brain MR (arbitrary units)
# MR signal has no absolute unit (the card scales each image by its own min/max), so the
# generator varies everything a sequence and a scanner change: T1-, T2- or FLAIR-like tissue
# order, overall scale, bias field, zoom (from a whole head to a crop that the brain fills,
# like pydicom's 64x64 MR_small.dcm) and matrix size. What stays is the finding's local look:
# a round-ish focal spot clearly brighter than the parenchyma around it. Bright things that are
# *not* lesions appear in both classes (scalp fat, orbits, CSF in T2, vessels as bright lines).

def lesion_patch(image: np.ndarray, center: tuple[float, float], radius_px: float, level: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A soft-edged, slightly irregular bright blob of intensity ``level`` centred at ``center``."""
    yy, xx = _grid(image.shape)
    r = _ellipse_radius(yy, xx, center[0], center[1], radius_px, radius_px * rng.uniform(0.65, 1.0),
                        rng.uniform(0, np.pi), theta_terms=_wavy(rng, 0.2))
    edge = max(0.5, 0.18 * radius_px)
    blob = 1.0 / (1.0 + np.exp((r - 1.0) * radius_px / edge))
    inner = level * (1.0 + 0.06 * rng.standard_normal(image.shape).astype(np.float32))
    return (image * (1 - blob) + np.maximum(inner, image) * blob).astype(np.float32)


def mr_brain_slice(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """One brain-MR-like slice (float32, positive arbitrary units), a bright focal lesion when ``positive``."""
    size = int(rng.choice([64, 96, 128, 160]))
    yy, xx = _grid((size, size))
    # tissue levels of one sequence: (white matter, grey matter, CSF, scalp fat, bone/air)
    weighting = rng.choice(["T1", "T2", "FLAIR"])
    wm = 1.0
    if weighting == "T1":
        gm, csf, fat = rng.uniform(0.6, 0.85), rng.uniform(0.1, 0.3), rng.uniform(1.2, 1.8)
    elif weighting == "T2":
        gm, csf, fat = rng.uniform(1.15, 1.5), rng.uniform(2.0, 3.2), rng.uniform(1.0, 1.8)
    else:
        gm, csf, fat = rng.uniform(1.1, 1.4), rng.uniform(0.15, 0.4), rng.uniform(0.8, 1.5)
    tissue_max = max(wm, gm)
    # zoom: brain half-axis from 0.3 (whole head, small) to 1.3 (a crop the brain overfills)
    rx = size * (rng.uniform(0.15, 0.65) if rng.random() < 0.6 else rng.uniform(0.65, 1.5))
    ry = rx * rng.uniform(1.0, 1.3)
    cy, cx = size / 2 + rng.normal(0, 0.12 * size), size / 2 + rng.normal(0, 0.12 * size)
    angle = rng.normal(0, 0.2)
    radius = _ellipse_radius(yy, xx, cy, cx, ry, rx, angle, theta_terms=_wavy(rng, 0.06))
    image = np.zeros((size, size), np.float32)
    scalp = rng.uniform(0.05, 0.14)
    skull = rng.uniform(0.04, 0.1)
    image[radius < 1.0 + scalp + skull] = fat * (1.0 + 0.15 * smooth_noise(rng, (size, size), 2.0))[
        radius < 1.0 + scalp + skull]
    image[radius < 1.0 + skull] = rng.uniform(0.02, 0.15)  # cortical bone: no signal
    inside = radius < 1.0 + rng.uniform(0.0, 0.03)
    image[inside] = csf  # subarachnoid CSF
    brain = radius < 1.0 - rng.uniform(0.02, 0.06)
    # white matter core, a convoluted grey-matter ribbon, sulci, deep grey nuclei
    texture = wm + 0.05 * smooth_noise(rng, (size, size), rng.uniform(2.0, 6.0))
    folds = smooth_noise(rng, (size, size), rng.uniform(1.0, 2.5) * size / 128)
    ribbon = (radius > rng.uniform(0.55, 0.8)) | (folds > rng.uniform(0.6, 1.2))
    texture = np.where(ribbon, gm + 0.05 * smooth_noise(rng, (size, size), 2.0), texture)
    sulci = (np.abs(folds) < rng.uniform(0.04, 0.15)) & (radius > rng.uniform(0.6, 0.85))
    texture = np.where(sulci, csf, texture)
    texture = blur(texture, rng.uniform(0.3, 0.8))
    image = np.where(brain, texture, image)
    if rng.random() < 0.85:  # lateral ventricles (bright in T2, dark otherwise)
        for side in (-1, 1):
            vr = _ellipse_radius(yy, xx, cy + rng.normal(0, 0.1 * ry), cx + side * rng.uniform(0.08, 0.2) * rx,
                                 rng.uniform(0.15, 0.4) * ry, rng.uniform(0.05, 0.15) * rx,
                                 angle + side * rng.uniform(0, 0.5))
            image = np.where((vr < 1.0) & brain, csf, image)
    if rng.random() < 0.4:  # orbits / globes in front of the brain: round, CSF-like, with a lens
        for side in (-1, 1):
            gy = cy - ry * rng.uniform(0.95, 1.15)
            gx = cx + side * rx * rng.uniform(0.3, 0.5)
            gr = rx * rng.uniform(0.18, 0.3)
            globe = (yy - gy) ** 2 + (xx - gx) ** 2 < gr ** 2
            image = np.where(globe, max(csf, 0.6) * rng.uniform(0.8, 1.2), image)
            lens = (yy - gy + 0.6 * gr) ** 2 + (xx - gx) ** 2 < (0.35 * gr) ** 2
            image = np.where(lens, rng.uniform(0.1, 0.4), image)
    for _ in range(rng.integers(0, 4)):  # vessels / dural sinuses: thin bright or dark curved lines
        line_r = _ellipse_radius(yy, xx, cy + rng.normal(0, ry), cx + rng.normal(0, rx),
                                 rng.uniform(0.3, 1.2) * ry, rng.uniform(0.3, 1.2) * rx, rng.uniform(0, np.pi))
        line = np.abs(line_r - 1.0) < rng.uniform(0.01, 0.04)
        line &= (yy - cy) * rng.normal() + (xx - cx) * rng.normal() > 0  # an arc, not a ring
        image = np.where(line, rng.choice([0.1, tissue_max * rng.uniform(1.4, 2.2)]), image)
    for _ in range(rng.integers(0, 4)):  # flow voids and small dark dots
        dy, dx = yy - cy - rng.normal(0, 0.5 * ry), xx - cx - rng.normal(0, 0.5 * rx)
        dot = dy ** 2 + dx ** 2 < rng.uniform(0.5, 2.0) ** 2
        image = np.where(dot & brain, rng.uniform(0.05, 0.3), image)
    # bright non-lesions (1.4-2.6x the tissue), in both classes, so that "something is much
    # brighter than the tissue" (which min/max scaling turns into "dark tissue") is no cue:
    # large irregular regions (fat, cisterns, muscle at the edge of a crop), thick bright arcs,
    # bright rings around a dark core (globes, vessels in cross-section), bright image borders
    for _ in range(rng.integers(0, 4)):
        level = tissue_max * rng.uniform(1.4, 2.6)
        shape = rng.choice(["region", "arc", "ring", "border"])
        if shape == "region":
            rr = size * rng.uniform(0.18, 0.4)
            reg = _ellipse_radius(yy, xx, rng.uniform(0, size), rng.uniform(0, size), rr, rr * rng.uniform(0.3, 1.0),
                                  rng.uniform(0, np.pi), theta_terms=_wavy(rng, 0.35))
            image = np.where(reg < 1.0, level * (1.0 + 0.1 * smooth_noise(rng, (size, size), 3.0)), image)
        elif shape == "arc":
            arc_r = _ellipse_radius(yy, xx, rng.uniform(0, size), rng.uniform(0, size), size * rng.uniform(0.2, 0.8),
                                    size * rng.uniform(0.2, 0.8), rng.uniform(0, np.pi))
            arc = np.abs(arc_r - 1.0) < rng.uniform(0.015, 0.06)
            arc &= (yy - size / 2) * rng.normal() + (xx - size / 2) * rng.normal() > 0
            image = np.where(arc, level, image)
        elif shape == "ring":
            gy, gx, gr = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size, size * rng.uniform(0.05, 0.14)
            dist = np.sqrt((yy - gy) ** 2 + (xx - gx) ** 2)
            image = np.where(dist < max(gr * rng.uniform(1.4, 2.5), 0.18 * size), level, image)
            image = np.where(dist < gr, rng.uniform(0.05, 0.5), image)
        else:
            edge = rng.integers(4)
            band = [yy, xx, size - 1 - yy, size - 1 - xx][edge]
            depth = size * rng.uniform(0.05, 0.3) * (1.0 + 0.3 * smooth_noise(rng, (size, size), size / 8))
            image = np.where(band < depth, level, image)
    if rng.random() < 0.8:  # anatomical clutter: small bright and dark pockets, rims and strips
        clutter = smooth_noise(rng, (size, size), rng.uniform(0.6, 2.5) * size / 64)
        image = image * np.clip(1.0 + rng.uniform(0.15, 0.5) * clutter, 0.15, 1.25)
    # coil sensitivity: a smooth multiplicative bias field (before the lesion, so that the
    # lesion stays the brightest thing in the slice), then Rician-like noise
    bias = np.exp(rng.uniform(0.0, 0.3) * smooth_noise(rng, (size, size), size * rng.uniform(0.25, 0.6)))
    image = image * bias
    if positive:  # one, sometimes two, focal hyperintensities in the parenchyma
        # brighter than anything else in the slice: what makes it a finding is that a small,
        # round spot in tissue reaches that level
        top = max(float(image.max()), tissue_max * 1.5)
        deep = brain & (radius < 0.85) & (image < tissue_max * 1.25)
        ys, xs = np.nonzero(deep if deep.any() else brain & (radius < 0.85))
        for _ in range(1 if rng.random() < 0.8 else 2):
            pick = rng.integers(len(ys))
            lesion_r = rng.uniform(2.0, 5.5) * size / 64
            image = lesion_patch(image, (ys[pick], xs[pick]), lesion_r, top * rng.uniform(1.05, 1.3), rng)
    sigma = rng.uniform(0.01, 0.05)
    image = np.hypot(image + sigma * rng.standard_normal(image.shape), sigma * rng.standard_normal(image.shape))
    image = image ** rng.uniform(0.8, 1.25)  # scanners and sequences map signal differently
    return (image * rng.uniform(200.0, 2000.0)).astype(np.float32)


def paint_lesion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bright focal blob (radius 5-8% of the image) put in mid-grey tissue of a real MR image."""
    h, w = image.shape
    smooth = blur(image, 0.03 * h)
    low, high = np.percentile(smooth, 35), np.percentile(smooth, 85)
    radius = rng.uniform(0.05, 0.08) * min(h, w)
    margin = int(np.ceil(radius * 1.6))
    yy, xx = _grid(image.shape)
    candidates = ((smooth > low) & (smooth < high) & ~_integral_any(image > np.percentile(image, 97), margin)
                  & (yy > margin) & (yy < h - margin) & (xx > margin) & (xx < w - margin))
    ys, xs = np.nonzero(candidates)
    if len(ys) == 0:
        raise ValueError("no tissue found to paint a lesion into")
    pick = rng.integers(len(ys))
    level = float(np.percentile(image, 99.9)) * rng.uniform(1.05, 1.25)
    return lesion_patch(image, (float(ys[pick]), float(xs[pick])), radius, level, rng)
