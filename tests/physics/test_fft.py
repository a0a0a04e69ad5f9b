"""The statistics kernel's FFT backend (:mod:`cryomag.physics.fft`): ducc0 and scipy give
the same transforms, with scipy's conventions, to float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from cryomag.physics import fft
from cryomag.physics.grid import padded_rfft2

BACKENDS = ["scipy"] + (["ducc0"] if fft._ducc is not None else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    old = fft.use_backend(request.param)
    yield request.param
    fft.use_backend(old)


def _close(got, want):
    assert got.dtype in (np.float32, np.complex64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_transforms_match_numpy(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 12)).astype(np.float32)
    z = (rng.standard_normal((3, 16, 7)) + 1j * rng.standard_normal((3, 16, 7))).astype(
        np.complex64
    )
    _close(fft.rfft2(x.copy()), np.fft.rfft2(x.astype(float)))
    spec = np.fft.rfft2(rng.standard_normal((3, 12, 12)))
    _close(fft.irfft2(spec.astype(np.complex64), 12), np.fft.irfft2(spec, s=(12, 12)))
    _close(fft.rfft(x.copy(), axis=-1), np.fft.rfft(x.astype(float), axis=-1))
    _close(fft.irfft(z.copy(), n=12, axis=-1), np.fft.irfft(z.astype(complex), n=12, axis=-1))
    _close(fft.fft(z.copy(), axis=-2), np.fft.fft(z.astype(complex), axis=-2))
    _close(fft.ifft(z.copy(), axis=-2), np.fft.ifft(z.astype(complex), axis=-2))


def test_padded_transform_is_the_transform_of_the_padded_image(backend):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 8, 8)).astype(np.float32)
    big = np.zeros((2, 16, 16))
    big[:, :4, :4], big[:, :4, 12:] = q[:, :4, :4], q[:, :4, 4:]
    big[:, 12:, :4], big[:, 12:, 12:] = q[:, 4:, :4], q[:, 4:, 4:]
    _close(padded_rfft2(q, 16), np.fft.rfft2(big))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown FFT backend"):
        fft.use_backend("mkl")


def test_the_environment_chooses_the_backend_or_says_why_not():
    assert fft.backend_from_environment(None, True) == ("ducc0", None)
    assert fft.backend_from_environment("scipy", True) == ("scipy", None)
    assert fft.backend_from_environment(None, False) == ("scipy", None)
    name, why = fft.backend_from_environment("mkl", True)
    assert name == "ducc0" and "CRYOMAG_FFT='mkl'" in why and "ducc0 or scipy" in why
    name, why = fft.backend_from_environment("ducc0", False)
    assert name == "scipy" and "not installed" in why
