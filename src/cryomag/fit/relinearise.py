"""Gauss-Newton re-linearisation of a group's M from second-order statistics (no new pass).

A pass at M0 accumulates, per particle and for the group model's derivatives
J_i = dP/dM_i and K_ij = d2P/dM_i dM_j (i = a * 2 + b, the element (a, b) of M), the
weighted sums <x, y> = sum_k w Re(conj(x) y)::

    pp = <P0, P0>   py = <P0, Y>   jp_i = <P0, J_i>   jy_i = <J_i, Y>   jj_ij = <J_i, J_j>
    kyy_ij = <K_ij, Y>   kp_ij = <K_ij, P0>   jk_eij = <J_e, K_ij>

With P(D) = P0 + J.D + D.K.D / 2, the second-order Taylor model of the prediction at
M = M0 + D, every sum the Gauss-Newton system needs at D follows, exact up to O(|D|^3)::

    <P, Y>   = py + jy.D + D.kyy.D / 2
    <P, P>   = pp + 2 jp.D + D.(jj + kp).D
    <J_i, Y> = jy_i + kyy_ij D_j
    <J_i, P> = jp_i + (jj + kp)_ij D_j + jk_ikl D_k D_l / 2 + jk_kij D_j D_k
    <J_i, J_j> = jj_ij + (jk_jik + jk_ijk) D_k

and with the scale profiled, s(D) = <P, Y> / <P, P>, the right-hand side
b_i(D) = s (<J_i, Y> - s <J_i, P>) and the reduced matrix
s^2 (<J, J> - <J, P><J, P>^T / <P, P>). Re-predicting at the updated M and solving again is
then arithmetic on these sums: Gauss-Newton iterates to the fixed point of the data's
objective without reading the images again. Its error is O(|D|^3); for a pass started
within ~1e-4 of the optimum (after the warm start) that is ~1e-9 (checked against a real
pass, tests/test_estimate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryomag.fit.anisomag import covariance
from cryomag.fit.statistics import GroupStatistics


@dataclass
class RelinearisedFit:
    """Result of re-linearised Gauss-Newton on one group's second-order statistics.

    Attributes
    ----------
    delta : ndarray, shape (2, 2)
        Total increment from the pass's M0 (M = M0 + delta).
    steps : list of float
        max |update| of each iteration (the first is the ordinary Gauss-Newton step).
    covariance : ndarray, shape (4, 4)
        Covariance of the elements of M at the solution.
    converged : bool
        Last update below ``tol``.
    trusted : bool
        The neglected O(|D|^3) remainder, estimated as |D2|^2 / |D1| (D1 the first step, D2
        the correction the second-order terms made to it) plus the inaccuracy of the
        second-order terms (``accuracy`` |D2|), is below ``tol / 2``: the result is then as
        close to the fixed point as a real pass with an update below ``tol`` would put it.
        Otherwise the caller should make a real pass at M0 + delta.
    remainder : float
        That estimate.
    path : list of ndarray
        The increment after each iteration, shape (2, 2) each.
    normal_matrix : ndarray, shape (4, 4)
        The reduced normal matrix at the solution.
    """

    delta: np.ndarray
    steps: list
    covariance: np.ndarray
    converged: bool
    trusted: bool
    remainder: float
    path: list
    normal_matrix: np.ndarray | None = None


def _terms(st: GroupStatistics, d: np.ndarray, joint_scale: bool):
    """Per-particle reduced system at increment d (4,): H (N, 4, 4), b (N, 4)."""
    ok = st.pp > 0
    jjkp = st.jj + st.kp
    a = st.py + st.jy @ d + 0.5 * np.einsum("i,nij,j->n", d, st.kyy, d)
    bpp = st.pp + 2 * st.jp @ d + np.einsum("i,nij,j->n", d, jjkp, d)
    jy = st.jy + st.kyy @ d
    jp = (
        st.jp
        + jjkp @ d
        + 0.5 * np.einsum("nikl,k,l->ni", st.jk, d, d)
        + np.einsum("nkij,j,k->ni", st.jk, d, d)
    )
    jj = st.jj + np.einsum("njik,k->nij", st.jk, d) + np.einsum("nijk,k->nij", st.jk, d)
    bpp_safe = np.where(ok & (bpp > 0), bpp, 1.0)
    s = np.where(ok, a / bpp_safe, 0.0)
    b = s[:, None] * (jy - s[:, None] * jp)
    h = (s * s)[:, None, None] * jj
    if joint_scale:
        h = h - (s * s)[:, None, None] * jp[:, :, None] * jp[:, None, :] / bpp_safe[:, None, None]
    h[~ok] = 0
    b[~ok] = 0
    return h, b


def reduced_system_at(
    st: GroupStatistics, delta: np.ndarray, joint_scale: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The group's reduced Gauss-Newton system at M0 + delta, from second-order statistics.

    Returns H (4, 4) and b (4,), summed over the particles with signal.
    """
    if not st.has_second_order:
        raise ValueError("these statistics have no second-order terms")
    h, b = _terms(st, np.asarray(delta, float).reshape(4), joint_scale)
    return h.sum(axis=0), b.sum(axis=0)


def relinearised_fit(
    st: GroupStatistics,
    joint_scale: bool = True,
    tol: float = 1e-5,
    max_iter: int = 20,
    accuracy: float = 0.0,
    max_correction: float = 0.5,
) -> RelinearisedFit:
    """Iterate Gauss-Newton on the second-order model until the update is below ``tol``.

    The first iteration is the ordinary Gauss-Newton step of the pass (D = 0); each further
    one re-predicts at the updated M from the statistics.

    ``accuracy``: relative accuracy of the second-order terms themselves (0 when they are
    the model's exact second derivatives; the window-aware model uses the box-periodic
    ones, measured within ~30 %): the remainder estimate adds ``accuracy`` times the
    correction they made. When the second-order terms change the first step by more than
    ``max_correction`` of it, or the updates stop shrinking, the step is beyond the model's
    reach: the result is the ordinary Gauss-Newton step, not converged (make another pass).
    """
    d = np.zeros(4)
    steps: list[float] = []
    path: list[np.ndarray] = []
    first = np.zeros(4)
    converged = False
    for it in range(max_iter):
        h, b = reduced_system_at(st, d, joint_scale)
        upd = np.linalg.pinv(h, rcond=1e-12) @ b
        if it == 0:
            first = upd.copy()
        else:
            size = float(np.abs(first).max())
            corr = float(np.abs(d + upd - first).max())
            growing = float(np.abs(upd).max()) >= steps[-1]
            if not np.all(np.isfinite(upd)) or corr > max_correction * size or growing:
                # beyond the reach of the second-order model: keep the ordinary step
                d = first.copy()
                steps, path = steps[:1], path[:1]
                break
        d = d + upd
        steps.append(float(np.abs(upd).max()))
        path.append(d.reshape(2, 2).copy())
        if steps[-1] < tol:
            converged = True
            break
    size = float(np.abs(first).max())
    correction = float(np.abs(d - first).max())
    remainder = (correction * correction / size if size > 0 else 0.0) + accuracy * correction
    h, _ = reduced_system_at(st, d, joint_scale)
    return RelinearisedFit(
        delta=d.reshape(2, 2),
        steps=steps,
        covariance=covariance(h, st),
        converged=converged,
        trusted=converged and remainder < tol / 2,
        remainder=remainder,
        path=path,
        normal_matrix=h,
    )


@dataclass
class SubsetCheck:
    """A re-linearised fit checked by a real pass over a subset of its particles
    (:func:`subset_check`).

    Attributes
    ----------
    step : ndarray, shape (4,)
        The Gauss-Newton step from the re-linearised M that a pass over every particle
        would take, estimated from the subset (M = M0 + delta + step).
    step_error : ndarray, shape (4,)
        Its sampling standard error (the subset stands for every particle).
    n_used : int
        Subset particles with signal in both passes.
    """

    step: np.ndarray
    step_error: np.ndarray
    n_used: int


def subset_check(
    full: GroupStatistics,
    check: GroupStatistics,
    delta: np.ndarray,
    stride: int,
    joint_scale: bool = True,
) -> SubsetCheck:
    """The step a full pass at the re-linearised M would take, from a pass over a subset.

    ``full``: a full pass's second-order statistics at M0 (curvature sums on the particles
    of row ``% stride == 0``, multiplied by ``stride``); ``delta`` (2, 2): the re-linearised
    fit's increment from M0; ``check``: a pass at M0 + delta with the same noise weights
    over a subset of the particles whose curvature sums ``full`` holds (first-order sums
    needed; its second-order ones are not used).

    Each subset particle's real system at M0 + delta (from ``check``) differs from the one
    its own second-order statistics predict there (from ``full``) by the model's remainder:
    the third-order terms and, with a window, the box-periodic second derivatives. The
    difference is deterministic and smooth (the same particle and data on both sides: its
    noise cancels), so the subset's sum scaled to every particle estimates the remainder of
    the whole group; added to the predicted system of every particle it gives the real
    full pass's step. With every particle in the subset and ``stride`` 1 the result is that
    pass's step exactly.
    """
    d = np.asarray(delta, float).reshape(4)
    stride = max(int(stride), 1)
    idx = np.searchsorted(full.rows, check.rows)
    if np.any(idx >= len(full.rows)) or np.any(full.rows[np.minimum(idx, len(full.rows) - 1)]
                                               != check.rows):  # fmt: skip
        raise ValueError("the check pass's particles are not all in the full pass")
    if np.any(check.rows % stride):
        raise ValueError(f"the check pass's particles must have row % {stride} == 0")
    h_all, b_all = reduced_system_at(full, d, joint_scale)
    # every particle with curvature sums, each with its own (not the sample's weight)
    sampled = np.flatnonzero(full.rows % stride == 0)
    own = _subset(full, sampled, 1.0 / stride)
    h_own, b_own = _terms(own, d, joint_scale)
    _, b_lin = _terms(_subset(full, sampled, 0.0), d, joint_scale)
    at = np.searchsorted(full.rows[sampled], check.rows)
    h_real, b_real = _terms(check, np.zeros(4), joint_scale)
    ok = (own.pp[at] > 0) & (check.pp > 0)
    n_used = int(ok.sum())
    if n_used == 0:
        nan = np.full(4, np.nan)
        return SubsetCheck(nan, nan, 0)
    n_all = int((full.pp > 0).sum())
    rho = n_all / n_used
    db = b_real[ok] - b_own[at][ok]
    dh = h_real[ok] - h_own[at][ok]
    h = h_all + rho * dh.sum(axis=0)
    hinv = np.linalg.pinv(h, rcond=1e-12)
    step = hinv @ (b_all + rho * db.sum(axis=0))
    # sampling errors (finite populations: none when the sample is every particle): the
    # subset's remainder scaled to every particle, and the curvature sums' own sample (every
    # stride-th particle stands for all in the prediction b_all)
    cov = rho * rho * n_used * (1.0 - n_used / n_all) * _cov(db)
    curv = (b_own - b_lin)[own.pp > 0]
    n_curv = len(curv)
    if n_curv and n_curv < n_all:
        cov = cov + n_all * n_all * (1.0 - n_curv / n_all) / n_curv * _cov(curv)
    step_error = np.sqrt(np.clip(np.diag(hinv @ cov @ hinv.T), 0, None))
    return SubsetCheck(step, step_error, n_used)


def _subset(st: GroupStatistics, idx: np.ndarray, curvature: float) -> GroupStatistics:
    """The statistics of the particles ``idx`` with their curvature sums times
    ``curvature``."""
    sub = st.take(idx)
    for f in ("kyy", "kp", "jk"):
        setattr(sub, f, getattr(sub, f) * curvature)
    return sub


def _cov(x: np.ndarray) -> np.ndarray:
    """Sample covariance of the rows of ``x`` (n, 4); zeros for fewer than two rows."""
    return np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1],) * 2)
