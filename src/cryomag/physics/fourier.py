"""Fourier grids and centred transforms of particle images.

Images are transformed with their phase origin at pixel (box/2, box/2), i.e.
``rfft2(ifftshift(img))``, with the forward kernel exp(-2 pi i k . x). Frequencies are in 1/A,
computed with the declared pixel size: k = (column index, row index) / (box * pixel_size_A).
Arrays of images are (..., ny, nx); their rfft is (..., ny, nx // 2 + 1).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.fft as sfft

WORKERS = int(os.environ.get("CRYOMAG_FFT_WORKERS", "-1"))


def rfft_freqs(box: int, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies of the rfft grid of a square image.

    Returns
    -------
    kx, ky : ndarray, shape (box, box // 2 + 1)
        Frequency components in 1/A (x = column, y = row).
    """
    fy = sfft.fftfreq(box, d=pixel_size_A)
    fx = sfft.rfftfreq(box, d=pixel_size_A)
    ky, kx = np.meshgrid(fy, fx, indexing="ij")
    return kx, ky


def centered_rfft2(images: np.ndarray, workers: int | None = None) -> np.ndarray:
    """rfft2 of images with the phase origin at the box centre, shape (..., n, n // 2 + 1).

    ``workers``: FFT threads (default: ``CRYOMAG_FFT_WORKERS``, all cores when unset).
    """
    shifted = sfft.ifftshift(images, axes=(-2, -1))
    return sfft.rfft2(shifted, axes=(-2, -1), workers=WORKERS if workers is None else workers)


def centered_irfft2(spectra: np.ndarray, box: int) -> np.ndarray:
    """Inverse of :func:`centered_rfft2` for square images of size ``box``."""
    img = sfft.irfft2(spectra, s=(box, box), axes=(-2, -1), workers=WORKERS)
    return sfft.fftshift(img, axes=(-2, -1))


def rfft_weights(box: int) -> np.ndarray:
    """Multiplicity of each rfft pixel in the full Fourier plane (1 or 2), shape (box, box//2+1).

    Sums over the half plane weighted by this equal sums over the full plane for Hermitian
    (real-image) spectra.
    """
    w = np.full((box, box // 2 + 1), 2.0)
    w[:, 0] = 1.0
    if box % 2 == 0:
        w[:, -1] = 1.0
    return w


def shift_phase(kx: np.ndarray, ky: np.ndarray, origin_A: np.ndarray) -> np.ndarray:
    """RELION's origin shift as a Fourier phase, exp(+2 pi i k_obs . origin).

    Parameters
    ----------
    kx, ky : ndarray, shape (npix,) or broadcastable
        Observed frequencies in 1/A.
    origin_A : ndarray, shape (N, 2)
        rlnOriginXAngst, rlnOriginYAngst in A.

    Returns
    -------
    ndarray, complex, shape (N, npix)
        The prediction is the centred projection times this phase (the particle centre then
        sits at box/2 - origin/apix).
    """
    o = np.asarray(origin_A, float)
    arg = 2 * np.pi * (o[:, 0:1] * kx.reshape(1, -1) + o[:, 1:2] * ky.reshape(1, -1))
    return np.exp(1j * arg)
