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


def shrink(
    x: np.ndarray,
    cov: np.ndarray,
    max_iter: int = 500,
    tol: float = 1e-12,
    accelerate: bool = True,
) -> Shrinkage:
    """Estimate mu and T by EM and return the shrunk estimates.

    Parameters
    ----------
    x : ndarray, shape (n, d) or (n,)
        Per-unit estimates.
    cov : ndarray, shape (n, d, d) or (n,)
        Their covariances (variances for d = 1).
    max_iter : int
        EM updates at most.
    tol : float
        Converged when an update moves T by at most ``tol`` max(1, |T|) and mu by at most
        1e-14.
    accelerate : bool
        SQUAREM (Varadhan & Roland 2008, scheme S3): two EM updates extrapolated along their
        difference, then one more EM update, kept only when the likelihood did not fall.
        EM crawls when T is small against the units' own variances (no real scatter: 500
        updates did not converge on 5,000 particles); the accelerated iteration reaches the
        same fixed point in a fraction of the updates. False: plain EM.
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

    def em(mu_t):
        nonlocal n_iter
        n_iter += 1
        return _em_update(xs, vs, mu_t[1])

    def converged(a, b):
        return np.abs(b[1] - a[1]).max() <= tol * max(1.0, np.abs(a[1]).max()) and np.allclose(
            b[0], a[0], rtol=0, atol=1e-14
        )

    cur = (mu, t)
    while n_iter < max_iter:
        one = em(cur)
        if converged(cur, one):
            cur = one
            break
        if not accelerate or n_iter >= max_iter:
            cur = one
            continue
        two = em(one)
        if converged(one, two):
            cur = two
            break
        r = [one[i] - cur[i] for i in range(2)]
        w = [two[i] - 2 * one[i] + cur[i] for i in range(2)]
        norm_r = np.sqrt(sum(float(np.sum(a * a)) for a in r))
        norm_w = np.sqrt(sum(float(np.sum(a * a)) for a in w))
        nxt = two
        if norm_w > 0 and n_iter < max_iter:
            alpha = min(-norm_r / norm_w, -1.0)
            t_x = cur[1] - 2 * alpha * r[1] + alpha * alpha * w[1]
            mu_x = cur[0] - 2 * alpha * r[0] + alpha * alpha * w[0]
            jump = em((mu_x, _clip_psd(0.5 * (t_x + t_x.T))))
            if _log_likelihood(xs, vs, jump[1]) >= _log_likelihood(xs, vs, two[1]):
                nxt = jump
        done = converged(cur, nxt)
        cur = nxt
        if done:
            break
    mu, t = cur
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


def _em_update(xs: np.ndarray, vs: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One EM update of (mu, T) from T: mu is the GLS mean at T, T the mean of the units'
    posterior second moments."""
    s = np.linalg.inv(t[None] + vs)  # (n, d, d)
    mu_new = np.linalg.solve(s.sum(0), np.einsum("nij,nj->i", s, xs))
    # posterior of the unit effects u_i = x_i - mu given T
    kgain = t[None] @ s
    resid = xs - mu_new
    post_mean = np.einsum("nij,nj->ni", kgain, resid)
    post_cov = t[None] - kgain @ t[None]
    t_new = (np.einsum("ni,nj->ij", post_mean, post_mean) + post_cov.sum(0)) / len(xs)
    return mu_new, _clip_psd(0.5 * (t_new + t_new.T))


def _log_likelihood(xs: np.ndarray, vs: np.ndarray, t: np.ndarray) -> float:
    """The marginal log-likelihood of T (mu profiled: its GLS mean), up to a constant."""
    c = np.linalg.cholesky(t[None] + vs)
    s = np.linalg.inv(t[None] + vs)
    mu = np.linalg.solve(s.sum(0), np.einsum("nij,nj->i", s, xs))
    r = xs - mu
    logdet = 2 * np.log(np.diagonal(c, axis1=1, axis2=2)).sum()
    return float(-0.5 * (logdet + np.einsum("ni,nij,nj->", r, s, r)))


def _clip_psd(m: np.ndarray) -> np.ndarray:
    w, u = np.linalg.eigh(m)
    return (u * np.clip(w, 0, None)) @ u.T
