"""Small numpy image tools the synthetic generators share: blur, smooth noise, ellipses."""

from __future__ import annotations

import numpy as np

def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by FFT (reflect-padded), any sigma at the same cost; numpy only."""
    if sigma <= 0:
        return image.astype(np.float32)
    pad = int(min(3 * sigma + 1, min(image.shape) - 1))
    padded = np.pad(image.astype(np.float64), pad, mode="reflect")
    fy = np.fft.fftfreq(padded.shape[0])[:, None]
    fx = np.fft.rfftfreq(padded.shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy ** 2 + fx ** 2))
    smooth = np.fft.irfft2(np.fft.rfft2(padded) * kernel, s=padded.shape)
    return smooth[pad:-pad, pad:-pad].astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ``sigma`` pixels."""
    field = blur(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return yy.astype(np.float32), xx.astype(np.float32)


def _ellipse_radius(yy, xx, cy, cx, ry, rx, angle=0.0, wobble=None, theta_terms=()):
    """Normalised elliptic radius (1 on the boundary), optionally with a wavy boundary."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    radius = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    if theta_terms:
        theta = np.arctan2(v, u)
        radius = radius / (1.0 + sum(a * np.cos(k * theta + p) for k, a, p in theta_terms))
    return radius


def _wavy(rng: np.random.Generator, amplitude: float, orders=(2, 3, 4, 5)):
    return tuple((k, rng.uniform(0, amplitude) / k ** 0.5, rng.uniform(0, 2 * np.pi)) for k in orders)


def _integral_any(mask: np.ndarray, half: int) -> np.ndarray:
    """True where a (2*half+1)-square around the pixel holds any True of ``mask``."""
    padded = np.pad(mask.astype(np.int32), half + 1)
    table = padded.cumsum(0).cumsum(1)
    n = 2 * half + 1
    h, w = mask.shape
    total = (table[n:n + h, n:n + w] - table[0:h, n:n + w] - table[n:n + h, 0:w] + table[0:h, 0:w])
    return total > 0
