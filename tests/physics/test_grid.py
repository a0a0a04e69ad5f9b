"""The single-precision pieces of the forward model (physics/grid.py) against the reference.

The kernels evaluate the forward model with these pieces; each must agree with the double-
precision reference implementation to single precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sfft

from cryomag.fit.statistics import Band
from cryomag.physics.ctf import ctf_split_frames
from cryomag.physics.fourier import rfft_freqs, shift_phase
from cryomag.physics.grid import GridCTF, WindowCut, padded_box_px, shift_phase32

RNG = np.random.default_rng(7)


#: RELION even Zernike terms (rad) of the aberrated cases (issue 13).
EVEN = (0.3, 0.5, 0.2, -0.4, 80.0, 10.0, 60.0, -20.0, -50.0)


@pytest.mark.parametrize("even", [(), EVEN], ids=["plain", "even-zernike"])
@pytest.mark.parametrize("moves", [True, False])
def test_grid_ctf_matches_the_reference_ctf(moves, even):
    box, apix = 64, 1.3
    kx, ky = (a.ravel() for a in rfft_freqs(box, apix))
    mag = np.array([[1.02, 0.01], [-0.005, 0.985]])
    ctf_mag = None if moves else np.array([[1.0, 0.003], [0.0, 0.997]])
    n = 5
    du = RNG.uniform(8000, 25000, n)
    dv = du - RNG.uniform(0, 800, n)
    ang = RNG.uniform(-90, 90, n)
    phase = RNG.uniform(0, 90, n)
    bfac = RNG.uniform(-20, 60, n)
    scale = RNG.uniform(0.5, 2, n)
    grid = GridCTF(kx, ky, mag, ctf_mag, 300.0, 2.7, 0.07, even_zernike=even)
    ctf, slope, adef = grid(du, dv, ang, phase, bfac, scale)
    cm = mag if ctf_mag is None else ctf_mag
    d = (cm @ np.stack([kx, ky]))[None]
    u = (mag @ np.stack([kx, ky]))[None]
    want, grad_cs, grad_def = ctf_split_frames(
        np.repeat(d[:, 0], n, 0), np.repeat(d[:, 1], n, 0), np.repeat(u[:, 0], n, 0),
        np.repeat(u[:, 1], n, 0), du, dv, ang, 300.0, 2.7, 0.07, phase, bfac, scale,
        gradient="both", even_zernike=even,
    )  # fmt: skip
    assert ctf.dtype == np.float32
    np.testing.assert_allclose(ctf, want, atol=2e-5 * np.abs(want).max())
    # dCTF/du through the Cs term, and through the defocus term, from the float32 pieces
    for a in range(2):
        np.testing.assert_allclose(
            slope * grid.gcs[a], grad_cs[..., a], atol=2e-4 * np.abs(grad_cs[..., a]).max()
        )
        got = slope * grid.chi_defocus_grad(adef)[a]
        np.testing.assert_allclose(got, grad_def[..., a], atol=2e-4 * np.abs(grad_def).max())
    # the Cs term's second derivatives by finite differences of its first
    h = 1e-6
    for i, (a, c) in enumerate(((0, 0), (0, 1), (1, 1))):
        m2 = mag.copy()
        m2[c] = mag[c] * (1 + h)  # u_c -> u_c (1 + h): row c of M scaled
        g2 = GridCTF(kx, ky, m2, ctf_mag if ctf_mag is not None else mag, 300.0, 2.7, 0.07,
                     even_zernike=even)  # fmt: skip
        ok = np.abs(u[0, c]) > 0.05
        num = (g2.gcs[a][ok] - grid.gcs[a][ok]) / (h * u[0, c][ok])
        np.testing.assert_allclose(num, grid.hcs[i][ok], rtol=1e-4, atol=1e-3)


def test_grid_odd_factor_and_its_derivatives():
    """GridCTF.apply_odd: exp(i phase_odd(u)) V and its first and second u-derivatives, for
    V(u) = exp(-2 pi i u . x0) (known derivatives), against the product evaluated directly
    and by central differences in u."""
    from cryomag.physics.aberrations import zernike_phase

    box, apix = 48, 1.4
    kx, ky = (a.ravel() for a in rfft_freqs(box, apix))
    mag = np.array([[1.01, 0.004], [-0.002, 0.993]])
    odd = (1.5, -0.8, 30.0, -9.0, 12.0, -20.0)
    grid = GridCTF(kx, ky, mag, None, 300.0, 2.7, 0.1, odd_zernike=odd)
    assert GridCTF(kx, ky, mag, None, 300.0, 2.7, 0.1).odd is None  # nothing without terms
    x0 = np.array([3.0, -5.0])

    def model(ux, uy):  # exp(i phase(u)) V(u), float64
        arg = zernike_phase(odd, ux, uy, "odd") - 2 * np.pi * (ux * x0[0] + uy * x0[1])
        return np.exp(1j * arg)

    def diff(f, ux, uy, a, h):  # central difference of f along u_a
        return (f(ux + h * e[a, 0], uy + h * e[a, 1]) - f(ux - h * e[a, 0], uy - h * e[a, 1])) / (
            2 * h
        )

    ux, uy = mag @ np.stack([kx, ky])
    v = np.exp(-2j * np.pi * (ux * x0[0] + uy * x0[1]))[None]
    dv = [-2j * np.pi * x0[a] * v for a in range(2)]
    hv = [-4 * np.pi**2 * x0[a] * x0[c] * v for a, c in ((0, 0), (0, 1), (1, 1))]
    c64 = np.complex64
    v2, dv2, hv2 = grid.apply_odd(v.astype(c64), [d.astype(c64) for d in dv],
                                  [x.astype(c64) for x in hv])  # fmt: skip
    np.testing.assert_allclose(v2[0], model(ux, uy), atol=2e-5)
    e = np.eye(2)
    for a in range(2):
        num = diff(model, ux, uy, a, 1e-5)
        np.testing.assert_allclose(dv2[a][0], num, atol=1e-4 * np.abs(num).max())
    for i, (a, c) in enumerate(((0, 0), (0, 1), (1, 1))):
        num = diff(lambda x, y, a=a: diff(model, x, y, a, 1e-5), ux, uy, c, 1e-4)
        np.testing.assert_allclose(hv2[i][0], num, atol=1e-3 * np.abs(num).max())


def test_shift_phase32_matches_the_reference_phase():
    kx, ky = (a.ravel() for a in rfft_freqs(48, 1.6))
    origin = RNG.uniform(-12, 12, (6, 2))
    got = shift_phase32(origin, kx, ky)
    assert got.dtype == np.complex64
    np.testing.assert_allclose(got, shift_phase(kx, ky, origin), atol=3e-6)


@pytest.mark.parametrize("big", [64, 48, 42])
def test_window_cut_equals_pad_crop_transform(big):
    """values on the padded grid's disc -> real space -> centred box -> band pixels, for a
    padded grid twice the box and for sizes that are not multiples of it."""
    box, apix = 32, 1.5
    kxb, kyb = rfft_freqs(big, apix)
    disc = np.hypot(kxb, kyb) <= 0.5 / apix
    disc_flat = np.flatnonzero(disc.ravel())
    kx, ky = rfft_freqs(box, apix)
    band = (np.hypot(kx, ky) > 0.01) & (np.hypot(kx, ky) < 0.3)
    band_idx = np.flatnonzero(band.ravel())
    vals = (RNG.normal(size=(3, disc_flat.size)) + 1j * RNG.normal(size=(3, disc_flat.size)))
    vals = vals.astype(np.complex64)
    got = WindowCut(box, big, disc_flat, band_idx)(vals)
    # reference: the centred padded image, its central box, transformed with the phase
    # origin at the box centre
    spec = np.zeros((3, big * (big // 2 + 1)), complex)
    spec[:, disc_flat] = vals
    img = sfft.fftshift(sfft.irfft2(spec.reshape(3, big, -1), s=(big, big)), axes=(-2, -1))
    lo = big // 2 - box // 2
    cut = img[:, lo : lo + box, lo : lo + box]
    want = sfft.rfft2(sfft.ifftshift(cut, axes=(-2, -1))).reshape(3, -1)[:, band_idx]
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize(("box", "big"), [(32, 64), (32, 42), (48, 80), (30, 48)])
def test_window_cut_adjoint_gives_every_columns_gradient_sum(box, big):
    """Re sum_band conj(cut(c)) R == Re sum_disc conj(c) adjoint(R) for any disc values c
    (not only Hermitian-consistent ones) and band values R, on padded grids that are and
    are not multiples of the box, an odd-half box included (issue 14's lean matrix: one
    adjoint gives the gradient sum of every column)."""
    apix = 1.5
    kxb, kyb = rfft_freqs(big, apix)
    disc_flat = np.flatnonzero((np.hypot(kxb, kyb) <= 0.5 / apix).ravel())
    band = Band(box, apix, 0.01, 0.5 / apix)  # up to Nyquist: the kx = Nyquist column too
    band_idx = np.flatnonzero(band.mask.ravel())
    cut = WindowCut(box, big, disc_flat, band_idx)
    c = (RNG.normal(size=(4, disc_flat.size)) + 1j * RNG.normal(size=(4, disc_flat.size)))
    r = (RNG.normal(size=(4, band_idx.size)) + 1j * RNG.normal(size=(4, band_idx.size)))
    c, r = c.astype(np.complex64), r.astype(np.complex64)
    want = np.real(np.sum(np.conj(cut(c).astype(complex)) * r, axis=1))
    adj = cut.adjoint(r)
    got = np.real(np.sum(np.conj(c.astype(complex)) * adj, axis=1))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    # unweighted: the weight per disc pixel left to the caller
    np.testing.assert_allclose(cut.adjoint(r, weighted=False) * cut.adjoint_weight, adj,
                               rtol=1e-6, atol=1e-6 * np.abs(adj).max())  # fmt: skip


@pytest.mark.parametrize("big", [32, 45])
def test_window_cut_refuses_a_grid_not_above_the_box_or_odd(big):
    with pytest.raises(ValueError, match="even size above the box"):
        WindowCut(32, big, np.arange(3), np.arange(2))


def test_padded_box_holds_the_delocalisation_on_fast_sizes():
    """box + D / pixel, rounded up to an even size with prime factors <= 5, at most max_box."""
    box, apix = 128, 1.25
    d = np.array([0.0, 10.0, 42.0, 60.0, 86.0, 108.0, 110.0, 500.0])
    got = padded_box_px(box, apix, d, 2 * box)
    need = box + d / apix
    assert np.all((got >= need) | (got == 2 * box))
    assert np.all(got > box) and np.all(got <= 2 * box) and np.all(got % 2 == 0)
    for n in got[got < 2 * box]:
        m = int(n)
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1, n
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_array_equal(got[[0, 2, 5, 7]], [144, 162, 216, 256])
    # the smallest such size: nothing between the need and it
    assert padded_box_px(box, apix, 25.0 * apix, 2 * box) == 160  # 153 -> 160 (no 154-158)
    # the cap need not be a fast size
    assert padded_box_px(196, 1.0, 1000.0, 392) == 392


def test_reach_of_the_aberration_terms():
    """Without aberrations the reach is the Cs term's, Cs lambda^3 k^3 at the largest |k|;
    a beam tilt (an odd phase: a shift of the wave packets) adds its own."""
    kx, ky = (a.ravel() for a in rfft_freqs(64, 1.3))
    plain = GridCTF(kx, ky, np.eye(2), None, 300.0, 2.7, 0.1)
    kmax = np.hypot(kx, ky).max()
    assert plain.reach_A == pytest.approx(2.7e7 * plain.lam**3 * kmax**3, rel=1e-9)
    tilted = GridCTF(kx, ky, np.eye(2), None, 300.0, 2.7, 0.1,
                     odd_zernike=(0.0, 0.0, 5.0, 0.0, 0.0, 0.0))  # fmt: skip
    assert tilted.reach_A > plain.reach_A
    # with a defocus: its term at the frequency given, plus the reach
    assert tilted.delocalisation_A(15000.0, 0.3) == pytest.approx(
        tilted.lam * 15000.0 * 0.3 + tilted.reach_A, rel=1e-12
    )
