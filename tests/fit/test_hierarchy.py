"""Empirical-Bayes shrinkage recovers the between-unit scatter, and zero when there is none."""

import numpy as np
import pytest

from cryomag.fit.hierarchy import _profiled_likelihood, shrink


def test_no_scatter_reports_spread_consistent_with_zero():
    rng = np.random.default_rng(0)
    n = 2000
    se = rng.uniform(0.002, 0.006, n)
    x = 0.01 + rng.normal(0, se)
    res = shrink(x, se**2)
    assert abs(res.mean[0] - 0.01) < 4 * np.sqrt(1 / np.sum(se**-2))
    # spread consistent with zero: within 2 standard errors of 0
    assert res.between[0, 0] < 2 * res.between_se[0]
    assert np.nanmax(res.weight) < 0.3


def test_scatter_standard_error_stays_finite_near_zero():
    """A scatter at the boundary (T = 1e-40, as a fit without real scatter can end) gets
    sqrt(se of T), not the delta method's se(T) / (2 scatter), which diverges there (a refit
    once printed "+- 2e17 %"); a scatter well above its uncertainty keeps the delta method."""
    from dataclasses import replace

    rng = np.random.default_rng(0)
    se = rng.uniform(0.002, 0.006, 500)
    res = shrink(0.01 + rng.normal(0, se), se**2)
    root = np.sqrt(res.between_se)
    tiny = replace(res, between=np.full((1, 1), 1e-40))
    np.testing.assert_allclose(tiny.scatter_se, root)
    big = replace(res, between=np.full((1, 1), 100 * res.between_se[0]))
    np.testing.assert_allclose(big.scatter_se, res.between_se / (2 * big.scatter))
    assert big.scatter_se[0] < root[0]


def test_real_scatter_is_recovered_and_shrinkage_helps():
    rng = np.random.default_rng(1)
    n = 3000
    tau = 0.005
    truth = rng.normal(0.0, tau, n)
    se = rng.uniform(0.002, 0.008, n)
    x = truth + rng.normal(0, se)
    res = shrink(x, se**2)
    assert abs(res.scatter[0] - tau) < 0.1 * tau
    raw_err = np.sqrt(np.mean((x - truth) ** 2))
    post_err = np.sqrt(np.mean((res.posterior[:, 0] - truth) ** 2))
    assert post_err < 0.8 * raw_err


def test_multivariate_scatter():
    rng = np.random.default_rng(2)
    n, d = 2000, 4
    t = np.diag([4e-6, 1e-6, 1e-6, 9e-6])
    truth = rng.multivariate_normal(np.zeros(d), t, n)
    v = np.tile(np.eye(d) * 4e-6, (n, 1, 1))
    x = truth + rng.normal(0, 2e-3, (n, d))
    res = shrink(x, v)
    np.testing.assert_allclose(np.diag(res.between), np.diag(t), atol=1.2e-6)


def test_likelihood_maximum_is_ems_fixed_point_or_above_it():
    """The marginal likelihood maximised directly (L-BFGS on T's Cholesky factor) against EM
    run to convergence: with real scatter the same mu, T and posteriors; with none, where EM
    crawls near T = 0, a likelihood at least as high; in a small fraction of the updates."""
    rng = np.random.default_rng(3)
    n, d = 400, 2
    a = rng.normal(size=(n, d, d)) * 1e-3
    v = a @ np.swapaxes(a, 1, 2) + np.eye(d) * 1e-6
    for tau in (0.0, 1e-3):
        x = np.array([rng.multivariate_normal([0.01, -0.02], v[i] + tau**2 * np.eye(d))
                      for i in range(n)])  # fmt: skip
        em = shrink(x, v, method="em", max_iter=200_000, tol=1e-15)
        ml = shrink(x, v)
        ll_em, ll_ml = (_profiled_likelihood(x, v, r.between)[0] for r in (em, ml))
        print("updates", tau, em.iterations, ml.iterations, "log L", ll_em, ll_ml)
        assert ml.iterations < 0.1 * em.iterations
        assert ll_ml >= ll_em - 1e-6
        if tau:
            np.testing.assert_allclose(ml.between, em.between, atol=1e-3 * tau**2)
            np.testing.assert_allclose(ml.mean, em.mean, rtol=0, atol=1e-8)
            np.testing.assert_allclose(ml.posterior, em.posterior, rtol=0, atol=1e-7)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        shrink(np.zeros(3), np.ones(3), method="newton")


def test_a_unit_whose_covariance_is_not_positive_definite_is_left_out():
    """Covariances from inverted normal matrices can be indefinite (rounding, a nearly
    undetermined unit): such a unit carries no valid weight and is left out of the pooling
    like a non-finite one (its inverse would weight it negatively: the mean moved by 7 of
    its standard errors here)."""
    rng = np.random.default_rng(4)
    n = 300
    v = np.tile(np.eye(2) * 1e-6, (n, 1, 1))
    x = rng.normal(0, 1e-3, (n, 2))
    v[0] = [[1e-6, 1.1e-6], [1.1e-6, 1e-6]]  # eigenvalues 2.1e-6, -1e-7
    got, rest = shrink(x, v), shrink(x[1:], v[1:])
    np.testing.assert_allclose(got.mean, rest.mean, rtol=1e-12)
    np.testing.assert_allclose(got.between, rest.between, rtol=1e-9, atol=1e-18)
    assert np.all(np.isnan(got.posterior[0])) and np.isnan(got.weight[0])
