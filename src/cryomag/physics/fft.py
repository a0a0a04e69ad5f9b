"""The 2D transforms of the statistics kernel, from one backend chosen here.

ducc0 (the successor of the pocketfft that scipy.fft wraps, by the same author) when it is
installed, else scipy.fft; both in the precision of the input (float32 -> complex64), one
thread unless asked, with scipy's conventions: forward transforms unnormalised, inverse ones
divided by the number of points. Measured on the kernel's shapes (4 images, one thread,
bench/RESULTS.md, issue 14): complex transform of 256 x 129 along y 0.28 vs 0.34 ms, real
inverse of 128 x 129 rows to 256 0.14 vs 0.22 ms, rfft2 of 128 x 128 0.13 vs 0.18 ms. The two
backends agree to float32 rounding (tests/physics/test_fft.py).

Only the statistics kernel (:mod:`cryomag.fit.accumulate`, :mod:`cryomag.physics.grid`) uses
this module; the simulator and the reconstruction keep scipy.fft.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import scipy.fft as sfft

try:  # pragma: no cover - the backend present decides
    import ducc0.fft as _ducc
except ImportError:  # pragma: no cover
    _ducc = None

__all__ = [
    "BACKEND", "backend_from_environment", "fft", "ifft", "irfft", "irfft2", "next_fast_even",
    "rfft", "rfft2", "use_backend",
]


def backend_from_environment(value: str | None, have_ducc: bool) -> tuple[str, str | None]:
    """The backend that ``CRYOMAG_FFT=value`` selects, and a warning when the value cannot
    be followed (unknown, or ducc0 asked for but not installed); None: the default (ducc0
    when installed)."""
    default = "ducc0" if have_ducc else "scipy"
    if value is None or value == "":
        return default, None
    if value not in ("ducc0", "scipy"):
        return default, (
            f"CRYOMAG_FFT={value!r} is not an FFT backend (expected ducc0 or scipy): "
            f"using {default}"
        )
    if value == "ducc0" and not have_ducc:
        return "scipy", "CRYOMAG_FFT=ducc0, but ducc0 is not installed: using scipy"
    return value, None


#: The backend in use: "ducc0" or "scipy" (the environment variable ``CRYOMAG_FFT`` sets
#: it; default ducc0 when installed).
BACKEND, _problem = backend_from_environment(os.environ.get("CRYOMAG_FFT"), _ducc is not None)
if _problem:  # pragma: no cover - depends on the environment
    warnings.warn(_problem, RuntimeWarning, stacklevel=2)


def use_backend(name: str) -> str:
    """Switch the backend ("ducc0" or "scipy"; for tests and benchmarks); returns the old."""
    global BACKEND
    if name not in ("ducc0", "scipy"):
        raise ValueError(f"unknown FFT backend {name!r}: expected 'ducc0' or 'scipy'")
    if name == "ducc0" and _ducc is None:
        raise ValueError("FFT backend 'ducc0' is not installed")
    old, BACKEND = BACKEND, name
    return old


def _axis(x: np.ndarray, axis: int) -> int:
    return axis % x.ndim


def rfft2(x: np.ndarray, workers: int = 1) -> np.ndarray:
    """rfft2 over the last two axes (unnormalised)."""
    if BACKEND == "ducc0":
        return _ducc.r2c(x, axes=(x.ndim - 2, x.ndim - 1), nthreads=workers)
    return sfft.rfft2(x, axes=(-2, -1), workers=workers, overwrite_x=True)


def irfft2(x: np.ndarray, n: int, workers: int = 1) -> np.ndarray:
    """Inverse of :func:`rfft2` to n x n images (divided by n^2)."""
    if BACKEND == "ducc0":
        return _ducc.c2r(x, axes=(x.ndim - 2, x.ndim - 1), lastsize=n, forward=False, inorm=2,
                         nthreads=workers)  # fmt: skip
    return sfft.irfft2(x, s=(n, n), axes=(-2, -1), workers=workers)


def rfft(x: np.ndarray, axis: int = -1, workers: int = 1, out: np.ndarray | None = None
         ) -> np.ndarray:  # fmt: skip
    """Real transform along ``axis`` (unnormalised); into ``out`` (complex, the result's
    shape, a view allowed) when given."""
    if BACKEND == "ducc0":
        return _ducc.r2c(x, axes=(_axis(x, axis),), nthreads=workers, out=out)
    res = sfft.rfft(x, axis=axis, workers=workers, overwrite_x=True)
    if out is None:
        return res
    out[...] = res
    return out


def irfft(x: np.ndarray, n: int, axis: int = -1, workers: int = 1) -> np.ndarray:
    """Inverse real transform along ``axis`` to ``n`` points (divided by n)."""
    if BACKEND == "ducc0":
        return _ducc.c2r(x, axes=(_axis(x, axis),), lastsize=n, forward=False, inorm=2,
                         nthreads=workers)  # fmt: skip
    return sfft.irfft(x, n=n, axis=axis, workers=workers, overwrite_x=True)


def fft(x: np.ndarray, axis: int = -1, workers: int = 1) -> np.ndarray:
    """Complex transform along ``axis`` (unnormalised); may overwrite ``x``."""
    if BACKEND == "ducc0":
        return _ducc.c2c(x, axes=(_axis(x, axis),), forward=True, out=x, nthreads=workers)
    return sfft.fft(x, axis=axis, workers=workers, overwrite_x=True)


def ifft(x: np.ndarray, axis: int = -1, workers: int = 1) -> np.ndarray:
    """Inverse complex transform along ``axis`` (divided by its length); may overwrite
    ``x``."""
    if BACKEND == "ducc0":
        return _ducc.c2c(x, axes=(_axis(x, axis),), forward=False, inorm=2, out=x,
                         nthreads=workers)  # fmt: skip
    return sfft.ifft(x, axis=axis, workers=workers, overwrite_x=True)


def next_fast_even(n: int) -> int:
    """The smallest even size >= n with no prime factor above 5: fast transforms with either
    backend (a padded prediction grid, a map's upsampled grid)."""
    m = max(int(n), 2)
    m += m % 2
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2
