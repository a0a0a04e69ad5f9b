"""The prior of the particles' deviations (cryomag.fit.defocus._prior_by_likelihood): the
marginal likelihood's maximum, in the interior, at a spread of 0 (where EM creeps and a
capped EM reported a spread the data do not have), and for deviations that are correlated
across parameters (where accelerated EM with a boundary test ended elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from cryomag.fit.defocus import _prior_by_likelihood
from cryomag.fit.hierarchy import centred_likelihood

C2 = 0.5  # chi2 / 2: the data's covariance is c2 H^-1


def _elimination(h: np.ndarray, d: np.ndarray):
    """What :func:`cryomag.fit.defocus._eliminate` returns for particles with no other
    parameters: data d_n (n, k) of information h_n (n, k, k), a prior N(0, T)."""
    data_b = np.einsum("nij,nj->ni", h, d)

    def elim(t):
        s = h + C2 * np.linalg.pinv(t, hermitian=True)[None]
        s_inv = np.linalg.pinv(s, hermitian=True)
        return {"psi": np.einsum("nij,nj->ni", s_inv, data_b), "s_inv": s_inv,
                "data_b": data_b}  # fmt: skip

    return elim


def _random_effects(spread: float, n: int = 4000, seed: int = 0):
    """One deviation per particle, d_n ~ N(0, spread^2 + v_n)."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(20.0, 80.0, n) ** 2  # each particle's data variance (A^2)
    h = (C2 / v)[:, None, None]  # its information, in H's units
    d = rng.normal(0.0, np.sqrt(spread**2 + v))
    return h, d, v


def _ml_variance(d, v) -> float:
    """The marginal likelihood's maximum in tau^2 >= 0, by a bounded 1D search."""

    def nll(tau2):
        return 0.5 * np.sum(np.log(tau2 + v) + d * d / (tau2 + v))

    res = minimize_scalar(nll, bounds=(0.0, 1e5), method="bounded",
                          options={"xatol": 1e-6})  # fmt: skip
    return float(res.x)


@pytest.mark.parametrize("spread", [150.0, 30.0])
def test_interior_maximum_is_the_likelihood_maximum(spread):
    h, d, v = _random_effects(spread)
    t, n_steps, ok = _prior_by_likelihood(_elimination(h, d[:, None]), h, C2,
                                          np.eye(1) * 1e6, 20, 1e-4)  # fmt: skip
    assert ok and n_steps <= 4
    want = _ml_variance(d, v)
    assert want > 0
    assert abs(t[0, 0] - want) < 1e-3 * want + 1e-2, (t[0, 0], want)


def test_a_spread_of_zero_is_found_not_an_iteration_cap():
    """Deviations no larger than their noise: the likelihood's maximum is at 0. Plain EM
    after 100 steps still reports A; the maximum is found in a few steps, T at its floor
    (1e-6 of a particle's data variance)."""
    h, d, v = _random_effects(0.0, seed=3)
    d *= 0.9  # below the noise: the slope of the likelihood at 0 is negative
    assert _ml_variance(d, v) < 1e-3
    elim = _elimination(h, d[:, None])
    t, n_steps, ok = _prior_by_likelihood(elim, h, C2, np.eye(1) * 1e6, 20, 1e-4)
    assert ok and n_steps <= 4
    assert np.sqrt(t[0, 0]) < 1e-3 * np.sqrt(np.median(v))
    # plain EM, capped as the first version was
    tp = np.eye(1) * 1e6
    for _ in range(100):
        s = elim(tp)
        tp = np.atleast_2d((s["psi"][:, 0] ** 2 + C2 * s["s_inv"][:, 0, 0]).mean())
    assert np.sqrt(tp[0, 0]) > 3.0  # what the cap left


def test_not_converged_is_said():
    h, d, _ = _random_effects(150.0)
    _, n_steps, ok = _prior_by_likelihood(_elimination(h, d[:, None]), h, C2,
                                          np.eye(1) * 1e6, 1, 1e-12)  # fmt: skip
    assert not ok and n_steps == 1


def test_one_parameter_at_zero_the_other_found():
    """Two parameters per particle (as defocus and astigmatism per particle): the first with
    a spread of 150 A, the second none. The second ends at a negligible variance, the
    first is the likelihood's maximum of its own (the two are independent here)."""
    rng = np.random.default_rng(5)
    n = 4000
    v = rng.uniform(20.0, 80.0, (n, 2)) ** 2
    d = np.stack([rng.normal(0.0, np.sqrt(150.0**2 + v[:, 0])),
                  0.9 * rng.normal(0.0, np.sqrt(v[:, 1]))], 1)  # fmt: skip
    h = np.zeros((n, 2, 2))
    h[:, 0, 0], h[:, 1, 1] = C2 / v[:, 0], C2 / v[:, 1]
    assert _ml_variance(d[:, 1], v[:, 1]) < 1e-3  # the second's maximum is at 0
    t, n_steps, ok = _prior_by_likelihood(_elimination(h, d), h, C2, np.eye(2) * 1e6, 20,
                                          1e-4)  # fmt: skip
    assert ok, n_steps
    want = _ml_variance(d[:, 0], v[:, 0])
    assert abs(t[0, 0] - want) < 2e-3 * want, (t[0, 0], want)
    assert np.sqrt(t[1, 1]) < 0.05 * np.sqrt(np.median(v[:, 1]))
    assert abs(t[0, 1]) < 0.05 * np.sqrt(want * np.median(v[:, 1]))


def test_deviations_along_one_direction():
    """Three parameters per particle moving together (a particle's height moves its mean
    defocus and, through an anisotropic magnification, its astigmatism by a few % of it):
    T of rank one. The maximum is found (the likelihood's gradient vanishes along T's
    range) with the direction; nothing orthogonal to it beyond the noise. (On the bench's
    real-like set accelerated EM with a test of the boundary held one astigmatism
    parameter at 0, 26 log-likelihood units below this maximum.)"""
    rng = np.random.default_rng(11)
    n = 5000
    direction = np.array([1.0, 0.02, 0.03])
    z = rng.normal(0.0, 200.0, n)
    a = rng.normal(size=(n, 3, 3))
    h = C2 * (a @ np.swapaxes(a, 1, 2) / 30.0**2 + 1e-6 * np.eye(3))  # ~30 A per particle
    cov = C2 * np.linalg.inv(h)
    noise = np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.normal(size=(n, 3)))
    d = z[:, None] * direction + noise
    t, n_steps, ok = _prior_by_likelihood(_elimination(h, d), h, C2, np.eye(3) * 1e6, 20,
                                          1e-4)  # fmt: skip
    assert ok and n_steps <= 8
    ll, grad = centred_likelihood(np.einsum("nij,nj->ni", h, d), h, C2, t)
    w, u = np.linalg.eigh(t)
    big = u[:, w > 1e-3 * w.max()]
    # stationary along T's range (relative to the likelihood's own gradient scale)
    scale = np.abs(centred_likelihood(np.einsum("nij,nj->ni", h, d), h, C2, 0 * t)[1]).max()
    assert np.abs(big.T @ grad @ big).max() < 1e-6 * scale
    assert abs(np.sqrt(t[0, 0]) - 200.0) < 3 * 200.0 / np.sqrt(2 * n) + 2.0
    # the direction: slopes within 3 SE (~30 A noise over 200 A heights and 5,000 particles)
    np.testing.assert_allclose(t[0, 1:] / t[0, 0], direction[1:], atol=0.006)
    assert w[-2] < 60.0, w  # orthogonal to it: within 3 SE of a variance of 0
