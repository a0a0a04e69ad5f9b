"""The prior of the particles' deviations (cryomag.fit.defocus._prior_by_em): EM's fixed
point reached by SQUAREM, in the interior (the marginal likelihood's maximum) and at a
spread of 0, where plain EM creeps and a capped EM reported a spread the data do not have."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from cryomag.fit.defocus import _prior_by_em

C2 = 0.5  # chi2 / 2: the data's covariance is c2 H^-1


def _random_effects(spread: float, n: int = 4000, seed: int = 0):
    """One deviation per particle, d_n ~ N(0, spread^2 + v_n), and the E-step of the model
    with a prior N(0, T): what :func:`_eliminate` returns for it (psi, s_inv)."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(20.0, 80.0, n) ** 2  # each particle's data variance (A^2)
    h = C2 / v  # its information, in H's units
    d = rng.normal(0.0, np.sqrt(spread**2 + v))

    def elim(t):
        s = h + C2 / t[0, 0]
        return {"psi": (h * d / s)[:, None], "s_inv": (1.0 / s)[:, None, None]}

    return elim, h[:, None, None], d, v


def _ml_variance(d, v) -> float:
    """The marginal likelihood's maximum in tau^2 >= 0, by a bounded 1D search."""

    def nll(tau2):
        return 0.5 * np.sum(np.log(tau2 + v) + d * d / (tau2 + v))

    res = minimize_scalar(nll, bounds=(0.0, 1e5), method="bounded",
                          options={"xatol": 1e-6})  # fmt: skip
    return float(res.x)


@pytest.mark.parametrize("spread", [150.0, 30.0])
def test_interior_fixed_point_is_the_likelihood_maximum(spread):
    elim, h_pp, d, v = _random_effects(spread)
    t, n_eval, ok = _prior_by_em(elim, h_pp, C2, np.eye(1) * 1e6, 100, 1e-4)
    assert ok and n_eval < 40
    want = _ml_variance(d, v)
    assert want > 0
    assert abs(t[0, 0] - want) < 1e-3 * want + 1e-2, (t[0, 0], want)


def test_a_spread_of_zero_is_found_not_an_iteration_cap():
    """Deviations no larger than their noise: the likelihood's maximum is at 0. Plain EM
    after 100 steps still reports tens of A; SQUAREM with the boundary test ends at a
    negligible T (1e-6 of a particle's data variance), converged."""
    elim, h_pp, d, v = _random_effects(0.0, seed=3)
    d *= 0.9  # below the noise: the slope of the likelihood at 0 is negative
    assert _ml_variance(d, v) < 1e-3
    t, n_eval, ok = _prior_by_em(elim, h_pp, C2, np.eye(1) * 1e6, 100, 1e-4)
    assert ok and n_eval < 20
    assert np.sqrt(t[0, 0]) < 1e-3 * np.sqrt(np.median(v))
    # plain EM, capped as before
    tp = np.eye(1) * 1e6
    for _ in range(100):
        s = elim(tp)
        tp = np.atleast_2d((s["psi"][:, 0] ** 2 + C2 * s["s_inv"][:, 0, 0]).mean())
    assert np.sqrt(tp[0, 0]) > 3.0  # what the cap left


def test_not_converged_is_said():
    elim, h_pp, _, _ = _random_effects(150.0)
    _, n_eval, ok = _prior_by_em(elim, h_pp, C2, np.eye(1) * 1e6, 4, 1e-12)
    assert not ok and n_eval <= 4


def test_one_parameter_at_zero_the_other_found():
    """Two parameters per particle (as defocus and astigmatism per particle): the first with
    a spread of 150 A, the second none. The second is held at a negligible variance, the
    first is the likelihood's maximum of its own (the two are independent here)."""
    rng = np.random.default_rng(5)
    n = 4000
    v = rng.uniform(20.0, 80.0, (n, 2)) ** 2
    d = np.stack([rng.normal(0.0, np.sqrt(150.0**2 + v[:, 0])),
                  0.9 * rng.normal(0.0, np.sqrt(v[:, 1]))], 1)  # fmt: skip
    h = np.zeros((n, 2, 2))
    h[:, 0, 0], h[:, 1, 1] = C2 / v[:, 0], C2 / v[:, 1]

    def elim(t):
        s = h + C2 * np.linalg.pinv(t, hermitian=True)[None]
        s_inv = np.linalg.pinv(s, hermitian=True)
        return {"psi": np.einsum("nij,njk,nk->ni", s_inv, h, d), "s_inv": s_inv}

    assert _ml_variance(d[:, 1], v[:, 1]) < 1e-3  # the second's maximum is at 0
    t, n_eval, ok = _prior_by_em(elim, h, C2, np.eye(2) * 1e6, 100, 1e-4)
    assert ok, n_eval
    want = _ml_variance(d[:, 0], v[:, 0])
    assert abs(t[0, 0] - want) < 2e-3 * want, (t[0, 0], want)
    assert np.sqrt(t[1, 1]) < 1e-3 * np.sqrt(np.median(v[:, 1]))
    assert abs(t[0, 1]) < 1e-6 * want
