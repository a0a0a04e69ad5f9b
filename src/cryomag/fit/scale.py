"""Per-particle contrast scale (cryoSPARC's "per-particle scale", alignments3D/alpha).

s_p = sum w Re(conj(P) Y) / sum w |P|^2 in the chosen band, with w = 1 / sigma^2(|k|) the
noise whitening of the group: the weighted least-squares amplitude of the particle against
the prediction. A scale of 1.5 means the particle's signal is 1.5x that of the mean particle
(mostly thinner ice); it is a contrast weight, not a size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryomag.fit.statistics import GroupStatistics


@dataclass
class ScaleResult:
    """Per-particle scales of a whole set.

    Attributes
    ----------
    raw : ndarray, shape (N,)
        Scale relative to the reference map's contrast (prediction amplitude units).
    normalised : ndarray, shape (N,)
        ``raw`` divided by its mean over all particles (1 = the mean particle).
    error : ndarray, shape (N,)
        Standard error of ``normalised``.
    group_mean : dict
        Mean raw scale per optics group number.
    """

    raw: np.ndarray
    normalised: np.ndarray
    error: np.ndarray
    group_mean: dict


def fit_scales(group_stats: dict[int, GroupStatistics], n_particles: int) -> ScaleResult:
    """Collect the closed-form scales of every group into one normalised set."""
    raw = np.full(n_particles, np.nan)
    err = np.full(n_particles, np.nan)
    group_mean = {}
    for g, st in group_stats.items():
        raw[st.rows] = st.scale()
        err[st.rows] = st.scale_error()
        group_mean[g] = float(np.nanmean(st.scale()))
    # no group's statistics (every group failed): no mean, and no warning of an empty mean
    mean = np.nanmean(raw) if not np.all(np.isnan(raw)) else np.nan
    if not np.isfinite(mean) or mean == 0:
        mean = 1.0
    return ScaleResult(raw, raw / mean, err / abs(mean), group_mean)
