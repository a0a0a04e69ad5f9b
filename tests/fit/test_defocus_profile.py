"""The defocus search on each particle's box-periodic likelihood (cryomag.fit.defocus_profile).

Ground truth is the kernel itself: the residual the ring sums predict at another defocus is
the one a pass at that defocus accumulates, and the search started a few hundred A from a
particle's defocus (where one Gauss-Newton step is far off) finds it.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryomag.fit.accumulate import KernelOptions, chunk_statistics
from cryomag.fit.defocus import joint_system
from cryomag.fit.defocus_profile import RingProfile, choose_basin, ring_sums, search
from cryomag.physics.grid import GridCTF, shift_phase32
from tests.fit import test_accumulate as acc
from tests.fit.test_accumulate import _at, _with_defocus

PERIODIC = KernelOptions(window_pad=1, defocus=True)
E = np.array([1.0, 0.0, 1.0])  # an isotropic change of the defocus matrix (a00, a01, a11)


@pytest.fixture(scope="module", params=["plain", "aberrated"])
def setup(request):
    """test_accumulate's particles (box 48, with and without aberrations)."""
    return acc.setup.__wrapped__(request)


def _stats(setup, shift_A, options=PERIODIC):
    """The pass's statistics with every particle's defocus moved by ``shift_A`` (A, (n,))."""
    ref, optics, band, geom, spectra, power = setup
    geom = _at(geom, np.asarray(geom.mag))
    delta = np.asarray(shift_A, float)[:, None, None] * np.eye(2)[None]
    g = _with_defocus(geom, delta)
    return chunk_statistics(ref, spectra, g, optics, band, power, np.arange(len(g)), options)


def _sums(setup):
    """Ring sums at the data's own defocus, as the kernel forms them (float64 here)."""
    from cryomag.fit.accumulate import PeriodicKernel

    ref, optics, band, geom, spectra, power = setup
    geom = _at(geom, np.asarray(geom.mag))
    kern = PeriodicKernel(ref, geom, optics, band, power, PERIODIC)
    val, _ = kern.slices(geom)
    v = kern.model_ctf.apply_odd(kern._model_values(val))
    ctf, slope, _ = kern.model_ctf.of(geom)
    y = np.asarray(spectra).reshape(len(geom), -1)[:, kern.band_idx]
    y = y * shift_phase32(geom.origin_A, kern.kx_b, kern.ky_b).conj()
    rings = RingProfile(kern.ctf_band.dq[0] + kern.ctf_band.dq[2], kern.lam)
    return ring_sums(rings, ctf, slope, v, y, kern.w), rings


def test_ring_sums_predict_the_residual_at_another_defocus(setup):
    """rr(dz) - rr(0) from the five ring sums at dz = 0 equals what passes at dz
    accumulate (within 0.5 % of the change; measured 0.04-0.15 %, the kernel's float32),
    for changes from -300 to +1,000 A (several radians at the band's edge)."""
    sums, rings = _sums(setup)
    n = sums.shape[0]
    st0 = _stats(setup, np.zeros(n))
    a, b, c, d, e = (sums[:, i] for i in range(5))
    # at dz = 0 the sums are the pass's own: the profiled residual yy - py^2 / pp
    np.testing.assert_allclose(st0.yy - a.sum(1) ** 2 / c.sum(1), st0.rr, rtol=1e-4)
    for dz in (-300.0, -40.0, 60.0, 400.0, 1000.0):
        th = dz * rings.rate
        py = a @ np.cos(th) + b @ np.sin(th)
        pp = c @ np.cos(th) ** 2 + 2 * d @ (np.cos(th) * np.sin(th)) + e @ np.sin(th) ** 2
        change_ring = (st0.yy - py**2 / pp) - (st0.yy - a.sum(1) ** 2 / c.sum(1))
        change_pass = _stats(setup, np.full(n, dz)).rr - st0.rr
        assert np.abs(change_ring - change_pass).max() < 5e-3 * np.abs(change_pass).max(), dz


def _tangent_step(st):
    """Gauss-Newton's isotropic defocus step of each particle alone (A) and its curvature."""
    h, b = joint_system(st)
    e = np.r_[0, 0, 0, 0, E]
    h_ee = np.einsum("i,nij,j->n", e, h, e)
    return (b @ e) / h_ee, h_ee


def test_search_finds_a_defocus_far_from_the_pass(setup):
    """Passes made 150-450 A away from each particle's optimum: the search returns the way
    back to it within 0.5 A, where the Gauss-Newton tangent step is > 10 A off, and the
    curvature there is the Gauss-Newton curvature at the optimum (within 5 %). The optimum
    (the data were made at another M, so it is not the simulated defocus) by Gauss-Newton
    iterated from the simulated defocus."""
    n = len(setup[3])
    opt = np.zeros(n)
    for _ in range(6):
        step, h_opt = _tangent_step(_stats(setup, opt))
        opt += step
    assert np.abs(step).max() < 1e-3
    rng = np.random.default_rng(5)
    start = opt + rng.choice([-1.0, 1.0], n) * rng.uniform(150, 450, n)
    st = _stats(setup, start, KernelOptions(window_pad=1, defocus=True, defocus_profile=True))
    found, curv = st.dz_profile[:, 0], st.dz_profile[:, 1]
    assert np.all(curv > 0)
    assert np.abs(start + found - opt).max() < 0.5, start + found - opt
    tangent, _ = _tangent_step(st)
    assert np.abs(start + tangent - opt).max() > 10.0  # what one linear step would have done
    np.testing.assert_allclose(curv, h_opt, rtol=0.05)


def test_search_without_signal_keeps_gauss_newton():
    """A particle without signal (pp = 0) gets no search result (curvature 0)."""
    sums = np.zeros((2, 5, 8))
    sums[1, 0] = 1.0
    sums[1, 2] = 2.0
    out = search(sums, RingProfile(np.linspace(0.0, 0.1, 8), 0.0197, n_rings=8), np.ones(2))
    assert out[0, 1] == 0.0 and out[0, 0] == 0.0


def test_the_search_needs_no_defocus_columns(setup):
    """A lean pass (no defocus columns: the warm start's probe of the input defocus,
    GaussNewtonSettings.linear_start_probe) searches exactly as a pass with them."""
    n = len(setup[3])
    start = np.linspace(-200.0, 300.0, n)
    full = _stats(setup, start, KernelOptions(window_pad=1, defocus=True, defocus_profile=True))
    lean = _stats(setup, start, KernelOptions(window_pad=1, defocus_profile=True))
    assert np.all(full.dz_profile[:, 1] > 0)
    np.testing.assert_array_equal(lean.dz_profile, full.dz_profile)


def test_the_search_needs_the_periodic_model(setup):
    with pytest.raises(ValueError, match="box-periodic"):
        _stats(setup, np.zeros(len(setup[3])),
               KernelOptions(window_pad=2, defocus=True, defocus_profile=True))  # fmt: skip


def test_gridctf_phase_rate_is_the_isotropic_defocus_term():
    """The rings' rate pi lambda |d|^2 is d chi / d dz of GridCTF for Adef + dz I."""
    kx, ky = np.meshgrid(np.linspace(-0.3, 0.3, 7), np.linspace(0, 0.3, 4))
    kx, ky = kx.ravel(), ky.ravel()
    mag, cm = np.array([[1.01, 0.003], [0.0, 0.99]]), np.array([[1.0, 0.002], [0.0, 1.004]])
    grid = GridCTF(kx, ky, mag, cm, 300.0, 2.7, 0.1)
    dz = 5.0
    rest = (np.zeros(1), np.zeros(1), np.ones(1))  # phase shift, B-factor, scale
    c0, s0, _ = grid(np.full(1, 12000.0), np.full(1, 11000.0), np.full(1, 30.0), *rest)
    c1, s1, _ = grid(np.full(1, 12000.0 + dz), np.full(1, 11000.0 + dz), np.full(1, 30.0), *rest)
    dchi = np.angle(np.exp(1j * (np.arctan2(c1, s1) - np.arctan2(c0, s0))))
    rate = np.pi * grid.lam * (grid.dq[0] + grid.dq[2])
    np.testing.assert_allclose(dchi[0], rate * dz, atol=1e-5)


def test_the_search_keeps_the_pass_basin_unless_another_is_clearly_better():
    """Downhill from the start to its local minimum; another basin only when lower by more
    than the margin."""
    cost = np.array([
        [5.0, 4.0, 3.0, 4.0, 5.0, 1.0, 6.0],  # the other basin 2 lower: taken
        [5.0, 4.0, 3.0, 4.0, 5.0, 2.5, 6.0],  # 0.5 lower: kept
        [0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.5],  # downhill on both sides: the left one, 0
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],  # no minimum inside: the edge
    ])  # fmt: skip
    np.testing.assert_array_equal(choose_basin(cost, 3, 1.0), [5, 2, 0, 6])
