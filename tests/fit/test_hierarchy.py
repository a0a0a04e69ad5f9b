"""Empirical-Bayes shrinkage recovers the between-unit scatter, and zero when there is none."""

import numpy as np

from cryomag.fit.hierarchy import shrink


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


def test_accelerated_em_reaches_plain_ems_fixed_point_in_fewer_updates():
    """SQUAREM against plain EM run to convergence: the same mu, T and posteriors (to the
    convergence tolerance's scale), in a fraction of the updates; with no real scatter (EM's
    slow case) and with some."""
    rng = np.random.default_rng(3)
    n, d = 400, 2
    a = rng.normal(size=(n, d, d)) * 1e-3
    v = a @ np.swapaxes(a, 1, 2) + np.eye(d) * 1e-6
    for tau in (0.0, 5e-4):
        x = np.array([rng.multivariate_normal([0.01, -0.02], v[i] + tau**2 * np.eye(d))
                      for i in range(n)])  # fmt: skip
        plain = shrink(x, v, accelerate=False, max_iter=200_000, tol=1e-15)
        fast = shrink(x, v)
        print("updates", tau, plain.iterations, fast.iterations)
        assert plain.iterations < 200_000 and fast.iterations < 0.2 * plain.iterations
        np.testing.assert_allclose(fast.between, plain.between, atol=1e-3 * np.abs(v).max())
        np.testing.assert_allclose(fast.mean, plain.mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(fast.posterior, plain.posterior, rtol=0, atol=1e-7)
