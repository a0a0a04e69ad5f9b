"""The regression estimator of sampling theory: unknown values from a correlated proxy.

Some per-particle quantities are costly to compute exactly but have a cheap proxy that
follows them closely. Computing the exact value on a subset of the particles and the proxy
on all of them, the others' values are estimated from their proxy by the least-squares
line of exact on proxy over the subset (intercept and slope, per element). Summed over the
particles this is the regression estimator (Cochran, *Sampling Techniques*, ch. 7): unbiased
to O(1/n) for any relation between proxy and value, with the variance of the line's
residuals instead of the values' own. With slope 1 it is the difference estimator, with
intercept 0 the ratio estimator; fitting both follows whichever the data have.

Used by the window-aware kernel's lean Gauss-Newton matrix
(:attr:`cryomag.fit.accumulate.KernelOptions.lean_hessian`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["regression_estimate"]


def regression_estimate(proxy_known: np.ndarray, known: np.ndarray, proxy: np.ndarray
                        ) -> np.ndarray:  # fmt: skip
    """The values of the units with only a proxy, from the units with both.

    Parameters
    ----------
    proxy_known, known : ndarray, shape (n, ...)
        Proxy and exact value of the n units that have both (n >= 2).
    proxy : ndarray, shape (m, ...)
        Proxy of the units to estimate.

    Returns
    -------
    ndarray, shape (m, ...)
        ``a + b * proxy`` per element, (a, b) the least-squares line of ``known`` on
        ``proxy_known`` over the n units; where the proxy does not vary over them, slope 1
        (the mean difference).
    """
    shape = known.shape[1:]
    x = np.asarray(proxy_known, float).reshape(len(proxy_known), -1)
    y = np.asarray(known, float).reshape(len(known), -1)
    if len(x) < 2 or x.shape != y.shape:
        raise ValueError(f"need >= 2 units with both proxy and value of one shape, got "
                         f"{x.shape} and {y.shape}")  # fmt: skip
    xm, ym = x.mean(0), y.mean(0)
    sxx = ((x - xm) ** 2).sum(0)
    sxy = ((x - xm) * (y - ym)).sum(0)
    slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 1.0)
    icpt = ym - slope * xm
    q = np.asarray(proxy, float).reshape(len(proxy), -1)
    return (icpt + slope * q).reshape((len(proxy), *shape))
