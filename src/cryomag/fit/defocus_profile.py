"""Each particle's isotropic defocus searched on its exact (box-periodic) likelihood.

Why. Gauss-Newton takes one linear step per pass. A particle whose height in the ice puts
it a few hundred A from its micrograph's written defocus starts where the CTF's phase is
wrong by more than a radian at the band's edge: its steps are far from right, and such
particles crawl for passes after all others have converged (measured on 5,000 particles
with heights spread 200 A: after the third step 84 particles still moved > 10 A, after the
fifth one, by 47 A; they alone set the number of passes).

How. In the box-periodic model an isotropic defocus change dz (A) adds the same phase
theta = pi lambda dz |d|^2 to every pixel of a ring of |d|^2 (d = the CTF frame's k):
C(dz) = C cos(theta) + C' sin(theta) (C' = dCTF/dchi). So with the particle's scale
profiled out, its weighted residual rr(dz) = yy - py(dz)^2 / pp(dz) is a function of five
sums per ring (:func:`ring_sums`), evaluated for any dz without the images
(:func:`search`): on a grid of dz around the pass's state (weighed by a Gaussian of width
:data:`SEARCH_PRIOR_A` around the state, which keeps a weak particle's far side lobes out),
then on a finer grid around the best point (the likelihood alone). The pass returns, per
particle, the best dz and the curvature of rr / 2 there: the joint step
(:func:`cryomag.fit.defocus.solve_joint`) then sees each particle's defocus likelihood as a
quadratic around its own optimum instead of the tangent at the pass's state (a Laplace
approximation); the micrographs, the heights' spread and M come from the same linear system
as before.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = [
    "BASIN_MARGIN",
    "N_RINGS",
    "SEARCH_HALF_WIDTH_A",
    "SEARCH_PRIOR_A",
    "SEARCH_STEP_A",
    "RingProfile",
    "choose_basin",
    "ring_sums",
    "search",
]

#: Rings of |d|^2 (uniform) on which the phase of a defocus change is taken as constant;
#: at dz = 1,000 A the phase varies by at most ~0.04 rad within one (box 128 at 1.25 A).
N_RINGS = 256
#: The coarse grid of the search: dz in [-SEARCH_HALF_WIDTH_A, +SEARCH_HALF_WIDTH_A] around
#: the pass's state, every SEARCH_STEP_A (A); then a grid of SEARCH_STEP_A / 16 within one
#: coarse step of the best point.
SEARCH_HALF_WIDTH_A = 1200.0
SEARCH_STEP_A = 8.0
#: Width (A) of the Gaussian around the pass's state by which the search weighs the
#: likelihood (a weak particle's far side lobes; the heights of a micrograph spread
#: ~100-300 A and its CTF estimate errs by tens of A).
SEARCH_PRIOR_A = 500.0
#: The search keeps the basin the pass's state lies in (the local minimum reached downhill
#: on the coarse grid, where Gauss-Newton would go) unless another is better by more than
#: this (log-likelihood units, a likelihood ratio of ~55): a weak particle's noise lobes do
#: not move it. Measured on 1,000 particles of the benchmark's real-like data (box 128): at
#: SNR 0.05 every particle's likelihood had one basin within the grid; with 16x the noise
#: power 11 had two, 6 of them better by > 4 (by 4.3-50).
BASIN_MARGIN = 4.0


class RingProfile:
    """The rings of one band: each band pixel's ring of |d|^2 and the rings' phase rate.

    Parameters
    ----------
    d2 : ndarray, shape (npix,)
        |d|^2 of each band pixel (1/A^2), d = ctf_mag k.
    lam : float
        Electron wavelength (A).
    n_rings : int
    """

    def __init__(self, d2: np.ndarray, lam: float, n_rings: int = N_RINGS) -> None:
        d2 = np.asarray(d2, float)
        top = float(d2.max()) * (1 + 1e-9) if d2.size else 1.0
        edges = np.linspace(0.0, top, n_rings + 1)
        idx = np.clip(np.searchsorted(edges, d2, side="right") - 1, 0, n_rings - 1)
        # the rings' mean |d|^2 (empty rings: their centre)
        count = np.bincount(idx, minlength=n_rings)
        total = np.bincount(idx, weights=d2, minlength=n_rings)
        centre = 0.5 * (edges[:-1] + edges[1:])
        mean = np.where(count > 0, total / np.maximum(count, 1), centre)
        #: d theta / d dz of each ring (rad / A)
        self.rate = np.pi * float(lam) * mean
        self._trig: dict = {}
        self.members = sp.csr_matrix(
            (np.ones(len(d2)), (np.arange(len(d2)), idx)), shape=(len(d2), n_rings)
        )

    def trig(self, offsets: np.ndarray) -> tuple[np.ndarray, ...]:
        """cos and sin of theta and of 2 theta on every ring for the changes ``offsets``
        (A, shape (m,)): four arrays (m, n_rings), built once per set of offsets."""
        offsets = np.asarray(offsets, float)
        key = offsets.tobytes()
        if key not in self._trig:
            th = offsets[:, None] * self.rate[None, :]
            self._trig[key] = (np.cos(th), np.sin(th), np.cos(2 * th), np.sin(2 * th))
        return self._trig[key]

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Per-ring sums of ``values`` (b, npix) -> (b, n_rings), float64."""
        return np.asarray((self.members.T @ np.asarray(values, float).T).T)


def ring_sums(profile: RingProfile, ctf: np.ndarray, slope: np.ndarray, v: np.ndarray,
              y: np.ndarray, w: np.ndarray) -> np.ndarray:  # fmt: skip
    """The five per-ring sums of each particle, shape (b, 5, n_rings).

    Parameters
    ----------
    profile : RingProfile
    ctf, slope : ndarray, shape (b, npix)
        C and dC/dchi at the pass's state.
    v : ndarray, complex, shape (b, npix)
        The reference's slice (with the odd aberrations), without the CTF.
    y : ndarray, complex, shape (b, npix)
        The data in the model's phase frame.
    w : ndarray, shape (npix,)
        The weights (1 / noise power).

    Returns
    -------
    ndarray
        sum w C Re(conj(V) Y), sum w C' Re(conj(V) Y), sum w C^2 |V|^2, sum w C C' |V|^2,
        sum w C'^2 |V|^2 per ring.
    """
    c = np.asarray(ctf, float)
    s = np.asarray(slope, float)
    vy = w * (v.real * y.real + v.imag * y.imag)
    vv = w * (v.real * v.real + v.imag * v.imag)
    b, npix = c.shape
    parts = np.stack([c * vy, s * vy, c * c * vv, c * s * vv, s * s * vv], axis=1)
    return profile.sums(parts.reshape(5 * b, npix)).reshape(b, 5, -1)


def _rr_part(sums: np.ndarray, rings: RingProfile, offsets: np.ndarray,
             centre: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """-py^2 / pp, i.e. rr - yy, of particle i at dz = centre[i] + offsets[j] (centre None:
    0), shape (b, m). py = A cos(t) + B sin(t), pp = (C + E) / 2 + (C - E) / 2 cos(2t) +
    D sin(2t) summed over the rings; with a centre the sums are first rotated to it
    (cos(a + o) = cos a cos o - sin a sin o), so that one table of the offsets serves every
    particle."""
    s_a, s_b, s_d = sums[:, 0], sums[:, 1], sums[:, 3]
    half = 0.5 * (sums[:, 2] - sums[:, 4])
    if centre is not None:
        a = centre[:, None] * rings.rate[None, :]  # (b, rings)
        ca, sa, c2a, s2a = np.cos(a), np.sin(a), np.cos(2 * a), np.sin(2 * a)
        s_a, s_b = s_a * ca + s_b * sa, s_b * ca - s_a * sa
        half, s_d = half * c2a + s_d * s2a, s_d * c2a - half * s2a
    co, si, co2, si2 = rings.trig(offsets)
    py = s_a @ co.T + s_b @ si.T
    pp = (0.5 * (sums[:, 2] + sums[:, 4])).sum(1)[:, None] + half @ co2.T + s_d @ si2.T
    return -(py * py) / np.where(pp > 0, pp, np.inf)


def choose_basin(cost: np.ndarray, start: int, margin: float) -> np.ndarray:
    """Per row of ``cost`` (b, m): the index of the local minimum reached downhill from
    index ``start``, unless the global minimum is lower by more than ``margin``; shape (b,)."""
    b, m = cost.shape
    rows = np.arange(b)
    i = np.full(b, int(start))
    for _ in range(m):
        here = cost[rows, i]
        left = np.where(i > 0, cost[rows, np.maximum(i - 1, 0)], np.inf)
        right = np.where(i < m - 1, cost[rows, np.minimum(i + 1, m - 1)], np.inf)
        move = np.where((left < here) & (left <= right), -1, np.where(right < here, 1, 0))
        if not move.any():
            break
        i = i + move
    best = np.argmin(cost, axis=1)
    return np.where(cost[rows, i] - cost[rows, best] > margin, best, i)


def search(sums: np.ndarray, rings: RingProfile, chi2: np.ndarray,
           half_width_A: float = SEARCH_HALF_WIDTH_A, step_A: float = SEARCH_STEP_A,
           prior_A: float = SEARCH_PRIOR_A) -> np.ndarray:  # fmt: skip
    """Each particle's best isotropic defocus change and the curvature there.

    Parameters
    ----------
    sums : ndarray, shape (b, 5, n_rings)
        :func:`ring_sums`.
    rings : RingProfile
        The rings the sums were formed on.
    chi2 : ndarray, shape (b,)
        The residual power per pixel at the pass's state (the likelihood's scale:
        log L = -rr / chi2).
    half_width_A, step_A, prior_A : float
        The search (see the module's constants).

    Returns
    -------
    ndarray, shape (b, 2)
        dz (A) from the pass's state: -rr(dz) / chi2 - dz^2 / (2 prior_A^2) on the coarse
        grid chooses the basin (the pass's own, unless another's maximum is higher by
        :data:`BASIN_MARGIN`), a fine grid within one coarse step the likelihood's optimum
        in it (min rr); and the curvature d^2 (rr / 2) / d dz^2 there (the joint
        system's units). 0 curvature
        where the particle has no signal or the likelihood is not convex there (the step
        then stays Gauss-Newton's).
    """
    b = sums.shape[0]
    out = np.zeros((b, 2))
    if b == 0:
        return out
    chi2 = np.where(np.asarray(chi2, float) > 0, chi2, 1.0)
    grid = np.arange(-half_width_A, half_width_A + 0.5 * step_A, step_A)
    cost = _rr_part(sums, rings, grid) / chi2[:, None] + grid[None] ** 2 / (2 * prior_A**2)
    best = grid[choose_basin(cost, int(np.argmin(np.abs(grid))), BASIN_MARGIN)]
    # the likelihood's own optimum in that basin (the Gaussian only chose the basin)
    offsets = np.linspace(-step_A, step_A, 33)
    dz = best + offsets[np.argmin(_rr_part(sums, rings, offsets, best), axis=1)]
    # the likelihood's own curvature at dz (without the search's Gaussian), central
    # differences of rr / 2
    h = 0.25 * step_A
    f = 0.5 * _rr_part(sums, rings, np.array([-h, 0.0, h]), dz)
    curv = (f[:, 0] - 2 * f[:, 1] + f[:, 2]) / (h * h)
    ok = np.isfinite(curv) & (curv > 0) & (sums[:, 2].sum(1) > 0)
    out[:, 0] = np.where(ok, dz, 0.0)
    out[:, 1] = np.where(ok, curv, 0.0)
    return out
