"""Empirical-Bayes shrinkage of noisy per-unit estimates toward their group.

Each unit i (a particle or a micrograph) has an estimate x_i (d parameters) with covariance
V_i from its own normal equations. The model x_i ~ N(mu, T + V_i) has a between-unit
covariance T (the real scatter) estimated from the data by maximum likelihood (EM); the
posterior mean of unit i is mu + T (T + V_i)^-1 (x_i - mu). With no real scatter T -> 0 and
everything shrinks to mu.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Shrinkage:
    """Result of :func:`shrink`.

    Attributes
    ----------
    mean : ndarray, shape (d,)
        Group mean mu.
    between : ndarray, shape (d, d)
        Between-unit covariance T (the real scatter).
    between_se : ndarray, shape (d,)
        Approximate standard error of the diagonal of T (from the Fisher information).
    posterior : ndarray, shape (n, d)
        Shrunk estimates.
    posterior_cov : ndarray, shape (n, d, d)
        Posterior covariances.
    weight : ndarray, shape (n,)
        Mean shrinkage factor trace(T (T + V_i)^-1) / d: 0 = fully pooled, 1 = unshrunk.
    iterations : int
    """

    mean: np.ndarray
    between: np.ndarray
    between_se: np.ndarray
    posterior: np.ndarray
    posterior_cov: np.ndarray
    weight: np.ndarray
    iterations: int

    @property
    def scatter(self) -> np.ndarray:
        """Standard deviation of the real scatter per parameter, shape (d,)."""
        return np.sqrt(np.clip(np.diag(self.between), 0, None))

    @property
    def scatter_se(self) -> np.ndarray:
        """Standard error of :attr:`scatter` (delta method; sqrt(se of T) when T = 0)."""
        sc = self.scatter
        return np.where(
            sc > 0, self.between_se / (2 * np.where(sc > 0, sc, 1)), np.sqrt(self.between_se)
        )


def shrink(x: np.ndarray, cov: np.ndarray, max_iter: int = 500, tol: float = 1e-12) -> Shrinkage:
    """Estimate mu and T by EM and return the shrunk estimates.

    Parameters
    ----------
    x : ndarray, shape (n, d) or (n,)
        Per-unit estimates.
    cov : ndarray, shape (n, d, d) or (n,)
        Their covariances (variances for d = 1).
    """
    x = np.asarray(x, float)
    v = np.asarray(cov, float)
    if x.ndim == 1:
        x = x[:, None]
        v = v[:, None, None]
    ok = np.all(np.isfinite(x), axis=1) & np.all(np.isfinite(v), axis=(1, 2))
    n, d = x.shape
    xs, vs = x[ok], v[ok]
    if len(xs) == 0:
        raise ValueError("no finite estimates to pool")
    prec = np.linalg.inv(vs)
    mu = np.linalg.solve(prec.sum(0), np.einsum("nij,nj->i", prec, xs))
    t = np.cov(xs.T).reshape(d, d) - vs.mean(0)
    t = _clip_psd(t)
    n_iter = 0
    for step in range(1, max_iter + 1):
        n_iter = step
        s = np.linalg.inv(t[None] + vs)  # (n, d, d)
        mu_new = np.linalg.solve(s.sum(0), np.einsum("nij,nj->i", s, xs))
        # EM: posterior of the unit effects u_i = x_i - mu given T
        kgain = t[None] @ s
        resid = xs - mu_new
        post_mean = np.einsum("nij,nj->ni", kgain, resid)
        post_cov = t[None] - kgain @ t[None]
        t_new = (np.einsum("ni,nj->ij", post_mean, post_mean) + post_cov.sum(0)) / len(xs)
        t_new = _clip_psd(0.5 * (t_new + t_new.T))
        done = np.abs(t_new - t).max() <= tol * max(1.0, np.abs(t).max()) and np.allclose(
            mu_new, mu, rtol=0, atol=1e-14
        )
        t, mu = t_new, mu_new
        if done:
            break
    s = np.linalg.inv(t[None] + v[ok])
    kgain = t[None] @ s
    post = np.full((n, d), np.nan)
    pcov = np.full((n, d, d), np.nan)
    post[ok] = mu + np.einsum("nij,nj->ni", kgain, xs - mu)
    pcov[ok] = t[None] - kgain @ t[None]
    weight = np.full(n, np.nan)
    weight[ok] = np.trace(kgain, axis1=1, axis2=2) / d
    # Fisher information of the diagonal of T (each parameter on its own)
    se = np.array([np.sqrt(2.0 / np.sum(1.0 / (t[j, j] + vs[:, j, j]) ** 2)) for j in range(d)])
    return Shrinkage(mu, t, se, post, pcov, weight, n_iter)


def _clip_psd(m: np.ndarray) -> np.ndarray:
    w, u = np.linalg.eigh(m)
    return (u * np.clip(w, 0, None)) @ u.T
