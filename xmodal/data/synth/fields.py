"""Smooth random fields: the building block of every natural-looking pattern in the world."""

from __future__ import annotations

import numpy as np


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """A zero-mean, unit-variance Gaussian random field correlated over about ``scale_px`` pixels.

    White noise filtered by a Gaussian of standard deviation ``scale_px`` in the Fourier domain
    (periodic boundaries; a few FFTs are far cheaper than a spatial filter with a wide kernel).
    """
    noise = rng.standard_normal(shape)
    if scale_px <= 0:
        return noise
    freq_y = np.fft.fftfreq(shape[0])[:, None]
    freq_x = np.fft.rfftfreq(shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * scale_px) ** 2 * (freq_x**2 + freq_y**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=shape)
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def top_share(field: np.ndarray, share: float, where: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the ``share`` highest values of ``field`` (within ``where`` if given)."""
    if share <= 0:
        return np.zeros(field.shape, dtype=bool)
    values = field[where] if where is not None else field.ravel()
    if values.size == 0:
        return np.zeros(field.shape, dtype=bool)
    if share >= 1:
        mask = np.ones(field.shape, dtype=bool)
    else:
        threshold = np.quantile(values, 1.0 - share)
        mask = field > threshold
    return mask & where if where is not None else mask


def uniform_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """A smooth field with values spread uniformly over [0, 1) (rank transform of a smooth field)."""
    field = smooth_field(rng, shape, scale_px)
    ranks = np.empty(field.size, dtype=np.float64)
    ranks[np.argsort(field, axis=None)] = np.arange(field.size)
    return (ranks / field.size).reshape(shape)
