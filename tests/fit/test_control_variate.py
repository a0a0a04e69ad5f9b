"""The regression estimator (cryomag.fit.control_variate)."""

from __future__ import annotations

import numpy as np
import pytest

from cryomag.fit.control_variate import regression_estimate


def test_exact_for_a_linear_relation():
    rng = np.random.default_rng(1)
    x = rng.normal(5, 2, (40, 3, 3))
    y = 0.7 + 0.4 * x
    got = regression_estimate(x[:10], y[:10], x[10:])
    np.testing.assert_allclose(got, y[10:], rtol=1e-12)


def test_total_is_unbiased_and_beats_the_subset_mean():
    """Over many draws of which units are known, the estimated total of the others is
    unbiased for a noisy, curved relation, and its spread is that of the residuals, far
    below the scaled subset mean's."""
    rng = np.random.default_rng(2)
    x = rng.gamma(4.0, 1.0, 2000)
    y = 0.3 * x + 0.02 * x**2 + rng.normal(0, 0.05, x.size)
    err_reg, err_mean = [], []
    for _ in range(400):
        known = rng.random(x.size) < 0.25
        tot = y[known].sum() + regression_estimate(x[known], y[known], x[~known]).sum()
        err_reg.append(tot - y.sum())
        err_mean.append(y[known].mean() * x.size - y.sum())
    err_reg, err_mean = np.array(err_reg), np.array(err_mean)
    assert abs(err_reg.mean()) < 3 * err_reg.std() / np.sqrt(len(err_reg))
    assert err_reg.std() < 0.2 * err_mean.std()


def test_constant_proxy_gives_the_mean_difference():
    x = np.ones((5, 2))
    y = np.array([[2.0, 3.0]] * 5) + np.arange(5)[:, None] * 0.1
    got = regression_estimate(x, y, np.full((2, 2), 4.0))
    np.testing.assert_allclose(got, 4.0 + (y - x).mean(0)[None].repeat(2, 0))


def test_refuses_too_few_or_mismatched_units():
    with pytest.raises(ValueError, match=">= 2 units"):
        regression_estimate(np.ones((1, 2)), np.ones((1, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match=">= 2 units"):
        regression_estimate(np.ones((3, 2)), np.ones((3, 3)), np.ones((3, 2)))
