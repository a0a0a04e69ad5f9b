"""Magnification matrix of an optics group from the per-particle statistics.

The contrast scale of every particle is profiled out exactly (Schur complement of the
per-particle 5x5 system), so the group's M is fitted jointly with the scales: RELION fits M
alone, which biases the isotropic part when contrast varies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryomag.fit.projection import sandwich
from cryomag.fit.statistics import GroupStatistics


@dataclass
class MagUpdate:
    """One Gauss-Newton step for a group's M.

    Attributes
    ----------
    delta : ndarray, shape (2, 2)
        Increment, M_new = M_old + delta.
    covariance : ndarray, shape (4, 4)
        Covariance of (delta00, delta01, delta10, delta11).
    n_particles : int
    normal_matrix : ndarray, shape (4, 4), optional
        The reduced normal matrix the step was solved with (for the fit's quality checks).
    """

    delta: np.ndarray
    covariance: np.ndarray
    n_particles: int
    normal_matrix: np.ndarray | None = None

    @property
    def standard_error(self) -> np.ndarray:
        """Standard error of each element of M, shape (2, 2)."""
        return np.sqrt(np.clip(np.diag(self.covariance), 0, None)).reshape(2, 2)


def reduced_system(
    stats: GroupStatistics,
    select: np.ndarray | None = None,
    joint_scale: bool = True,
    ctf_moves: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations for the 4 elements of M with the scales profiled out.

    Parameters
    ----------
    select : ndarray of bool or int, optional
        Particles to pool (default: all with signal).
    joint_scale : bool
        Profile out each particle's scale (True) or hold it fixed (RELION's choice).

    Returns
    -------
    H : ndarray, shape (..., 4, 4) summed over the selection
    b : ndarray, shape (..., 4)
    """
    h_p, b_p = per_particle_system(stats, joint_scale, ctf_moves)
    if select is not None:
        h_p, b_p = h_p[select], b_p[select]
    return h_p.sum(axis=0), b_p.sum(axis=0)


def per_particle_system(
    stats: GroupStatistics, joint_scale: bool = True, ctf_moves: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's reduced 4x4 system, shapes (N, 4, 4) and (N, 4).

    ``ctf_moves``: the particle's CTF (defocus term) moves with its magnification (needs
    extended statistics; the derivative is the sum of the reference and defocus columns).
    """
    ok = stats.pp > 0
    pp = np.where(ok, stats.pp, 1.0)
    if stats.layout["mag_ctf"] is not None and ctf_moves:
        proj = np.vstack([np.eye(4), np.eye(4)])  # (8, 4)
        hgg = sandwich(proj, stats.hgg[:, :8, :8], proj)
        hpg = stats.hpg[:, :8] @ proj
        bg = stats.bg[:, :8] @ proj
    else:
        hgg, hpg, bg = stats.hgg[:, :4, :4], stats.hpg[:, :4], stats.bg[:, :4]
    h = hgg.copy()
    b = bg.copy()
    if joint_scale:
        h -= hpg[:, :, None] * hpg[:, None, :] / pp[:, None, None]
        # the residual is orthogonal to P at the closed-form scale, so b needs no correction
    h[~ok] = 0
    b[~ok] = 0
    return h, b


def solve_group(
    stats: GroupStatistics, joint_scale: bool = True, ctf_moves: bool = False
) -> MagUpdate:
    """Gauss-Newton step for one group's M from its statistics.

    ``ctf_moves``: the CTF's defocus term moves with M too (defocus given in the true frame;
    needs extended statistics).
    """
    h, b = reduced_system(stats, joint_scale=joint_scale, ctf_moves=ctf_moves)
    delta = np.linalg.pinv(h, rcond=1e-12) @ b
    n = int((stats.pp > 0).sum())
    return MagUpdate(delta.reshape(2, 2), covariance(h, stats), n, h)


def covariance(h: np.ndarray, stats: GroupStatistics) -> np.ndarray:
    """Covariance of the 4 elements of M from the reduced normal matrix ``h`` (4, 4).

    The weights are 1 / sigma^2 per complex pixel, so the Fisher information is 2 h, scaled
    by the residual chi2 per pixel (1 when the noise model is exact).
    """
    return np.linalg.pinv(h, rcond=1e-12) * stats.chi2_per_pixel() / 2.0
