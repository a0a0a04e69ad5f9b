"""Fourier shell correlation between two maps."""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft


def fsc(map1: np.ndarray, map2: np.ndarray, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """FSC of two cubic maps.

    Parameters
    ----------
    map1, map2 : ndarray, shape (N, N, N)
    pixel_size_A : float

    Returns
    -------
    freq : ndarray, shape (N // 2,)
        Shell centre frequency in 1/A.
    curve : ndarray, shape (N // 2,)
    """
    if map1.shape != map2.shape:
        raise ValueError(f"maps differ in shape: {map1.shape} vs {map2.shape}")
    n = map1.shape[0]
    f1 = sfft.rfftn(map1)
    f2 = sfft.rfftn(map2)
    fz = sfft.fftfreq(n)
    fx = sfft.rfftfreq(n)
    r = np.sqrt(fz[:, None, None] ** 2 + fz[None, :, None] ** 2 + fx[None, None, :] ** 2)
    shell = np.round(r * n).astype(int)
    nsh = n // 2
    keep = shell < nsh
    s = shell[keep]
    num = np.bincount(s, (f1 * f2.conj()).real[keep], minlength=nsh)
    d1 = np.bincount(s, (np.abs(f1) ** 2)[keep], minlength=nsh)
    d2 = np.bincount(s, (np.abs(f2) ** 2)[keep], minlength=nsh)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = num / np.sqrt(d1 * d2)
    return np.arange(nsh) / (n * pixel_size_A), np.nan_to_num(curve)


def resolution_at(freq: np.ndarray, curve: np.ndarray, threshold: float = 0.143) -> float:
    """Resolution (A) where the curve first drops below ``threshold`` (linear interpolation)."""
    below = np.flatnonzero(curve[1:] < threshold)
    if len(below) == 0:
        return float(1.0 / freq[-1])
    i = below[0] + 1
    f0, f1 = freq[i - 1], freq[i]
    c0, c1 = curve[i - 1], curve[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
    return float(1.0 / f) if f > 0 else float("inf")
