"""Is a fit to be trusted? The verdict of each optics group's fit.

A fit is reported with its numbers only when they mean something. Each group's verdict is
one of ``"ok"``, ``"warning"`` (usable, with a stated reservation) or ``"failed"`` (the numbers
must not be used: no standard errors are given and the command exits non-zero). Checks:

- **signal**: does the reference explain the particles at all? The weighted least-squares
  contrast scale common to the group's particles, against its standard error:
  z = sum_p py_p / sqrt(chi2 / 2 sum_p pp_p) (the statistics of
  :mod:`cryomag.fit.statistics`). A reference unrelated to the particles gives z of order 1
  (noise); a matching one gives tens to thousands. z < :data:`MIN_SIGNAL_Z` fails. Also
  reported: the fraction of particles with a positive scale (about 0.5 for a reference that
  does not match, near 1 for one that does) and the fraction of the data's (weighted) power
  the prediction explains.
- **degenerate system**: the reduced normal matrix of M must be positive definite and
  reasonably conditioned; otherwise M is not determined by the data and no standard error
  is given (NaN).
- **convergence**: Gauss-Newton stopped with an update below the tolerance; otherwise the
  result is not the fixed point (failed).
- **plausibility**: the fitted M must be a magnification (singular values within
  :data:`PLAUSIBLE_SCALE`), not the end of a run-away iteration.
- **finite numbers**: any NaN or infinity in M, its covariance or the scales fails.
- **held defocus**: a fit that holds the input defocus, whose warm start's probe found it
  more than :data:`HELD_DEFOCUS_Z` standard errors from the particles' (a warning: its
  errors are read as magnification, outside M's standard errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cryomag.fit.statistics import GroupStatistics

__all__ = [
    "HELD_DEFOCUS_Z",
    "MIN_SIGNAL_Z",
    "PLAUSIBLE_SCALE",
    "FitQuality",
    "assess_group",
    "overall",
]

#: Below this significance of the reference in the particles the fit fails.
MIN_SIGNAL_Z = 5.0
#: A warning below this significance: M is determined, but poorly.
WEAK_SIGNAL_Z = 20.0
#: Singular values of M outside this range are not a plausible magnification.
PLAUSIBLE_SCALE = (0.8, 1.25)
#: A group fit that holds the defocus gets the verdict "warning" when the warm start's probe
#: of the input defocus (:func:`cryomag.fit.gauss_newton.defocus_probe_z`,
#: :attr:`cryomag.fit.gauss_newton.GaussNewtonSettings.held_defocus_probe`) is above this:
#: the input's defocus errors are then read as magnification and M's standard errors leave
#: them out. Measured on the speed benchmark's warm subsets (500 particles of box 128):
#: 0.75-0.78 with each particle's defocus as input; 11-12 with one defocus per micrograph
#: written with a 50 A error and heights spread 150-200 A, where the held fit's M was 3.2
#: standard errors from the truth (1.0-1.3 with the defocus refined per group or
#: micrograph); 5.8 with heights alone (each micrograph's written defocus its particles'
#: exact mean; 1,200 particles of box 64), the held M 3.0 standard errors off (0.7-1.7
#: refined per group, micrograph or particle).
HELD_DEFOCUS_Z = 3.0
#: The reduced normal matrix of M is degenerate beyond this condition number.
MAX_CONDITION = 1e10


@dataclass
class FitQuality:
    """The quality of one optics group's fit.

    Attributes
    ----------
    verdict : str
        ``"ok"``, ``"warning"`` or ``"failed"``.
    problems : list of str
        One sentence per finding (empty when ok).
    converged : bool
    iterations : int
    chi2_per_pixel : float
        Weighted residual power per complex pixel (about 1 when the noise model fits).
    explained_fraction : float
        1 - sum w |r|^2 / sum w |Y|^2 over the band: the share of the data's weighted power
        the prediction explains (small at low SNR, about 0 for an unrelated reference).
    signal_z : float
        Significance of the reference in the particles (see the module docstring).
    positive_scale_fraction : float
        Fraction of particles whose closed-form scale is positive.
    condition : float
        Condition number of the reduced normal matrix of M (NaN when M was not fitted).
    """

    verdict: str
    problems: list = field(default_factory=list)
    converged: bool = True
    iterations: int = 0
    chi2_per_pixel: float = float("nan")
    explained_fraction: float = float("nan")
    signal_z: float = float("nan")
    positive_scale_fraction: float = float("nan")
    condition: float = float("nan")

    def as_dict(self) -> dict:
        """JSON form (results.json)."""
        return {k: (v if not isinstance(v, float) or np.isfinite(v) else None)
                for k, v in self.__dict__.items()}  # fmt: skip

    @property
    def failed(self) -> bool:
        return self.verdict == "failed"


def signal_significance(st: GroupStatistics) -> float:
    """z of the group's common contrast scale: sum py / sqrt(chi2 / 2 sum pp)."""
    pp = float(np.sum(st.pp))
    chi2 = st.chi2_per_pixel()
    if not (pp > 0 and chi2 > 0 and np.isfinite(pp) and np.isfinite(chi2)):
        return 0.0
    return float(np.sum(st.py) / np.sqrt(0.5 * chi2 * pp))


def assess_group(
    st: GroupStatistics,
    mag: np.ndarray,
    covariance: np.ndarray | None,
    normal_matrix: np.ndarray | None,
    converged: bool,
    iterations: int,
    fit_aniso: bool = True,
    held_defocus_z: float = float("nan"),
    prior_steps: int | None = None,
) -> FitQuality:
    """Check one group's fit (see the module docstring).

    Parameters
    ----------
    st : GroupStatistics
        The statistics of the group's last pass.
    mag : ndarray, shape (2, 2)
        The fitted M.
    covariance : ndarray, shape (4, 4), optional
        Its covariance.
    normal_matrix : ndarray, shape (4, 4), optional
        The reduced normal matrix M's step was solved with.
    converged, iterations : the iteration's outcome.
    fit_aniso : bool
        Whether M was fitted (else only the signal checks apply).
    held_defocus_z : float
        For a fit that held the input defocus: how far its warm start's probe found it from
        the particles', in standard errors (NaN: not probed, or the defocus was refined).
    prior_steps : int, optional
        For per-particle defocus: the steps of its last prior (the particles' spread) when
        they did not converge (None: converged, or no such prior).
    """
    problems: list[str] = []
    failed = warn = False
    chi2 = st.chi2_per_pixel()
    yy = float(np.sum(st.yy))
    explained = 1.0 - float(np.sum(st.rr)) / yy if yy > 0 else float("nan")
    z = signal_significance(st)
    scale = st.scale()
    positive = float(np.mean(scale[np.isfinite(scale)] > 0)) if np.isfinite(scale).any() else 0.0
    if not np.isfinite(z) or z < MIN_SIGNAL_Z:
        failed = True
        problems.append(
            f"the reference does not explain the particles: its significance in the data is "
            f"z = {z:.1f} (< {MIN_SIGNAL_Z:g}), {100 * positive:.0f} % of the particles have a "
            "positive contrast scale (about 50 % for an unrelated reference). Check that the "
            "map, its pixel size, its hand and the particles' poses belong together"
        )
    elif z < WEAK_SIGNAL_Z:
        warn = True
        problems.append(
            f"weak signal: the reference's significance in the data is z = {z:.1f}; M is "
            "poorly determined (see its standard errors)"
        )
    cond = float("nan")
    if fit_aniso:
        if normal_matrix is not None and np.all(np.isfinite(normal_matrix)):
            w = np.linalg.eigvalsh(0.5 * (normal_matrix + normal_matrix.T))
            cond = float(w[-1] / w[0]) if w[0] > 0 else float("inf")
            if not (w[0] > 0) or cond > MAX_CONDITION:
                failed = True
                problems.append(
                    "the data do not determine M (degenerate normal equations, condition "
                    f"number {cond:.1e}): no standard errors"
                )
        elif normal_matrix is not None:
            failed = True
            problems.append("the normal equations of M are not finite")
        if not converged:
            failed = True
            problems.append(
                f"Gauss-Newton did not converge in {iterations} iterations: M is not the "
                "solution (raise --max-iter, check the inputs)"
            )
        m = np.asarray(mag, float)
        if not np.all(np.isfinite(m)):
            failed = True
            problems.append("M is not finite")
        else:
            sv = np.linalg.svd(m, compute_uv=False)
            lo, hi = PLAUSIBLE_SCALE
            if sv.min() < lo or sv.max() > hi or np.linalg.det(m) <= 0:
                failed = True
                problems.append(
                    f"M has singular values {sv.min():.3f}..{sv.max():.3f}, outside "
                    f"{lo}..{hi}: not a plausible magnification (a run-away fit)"
                )
        if covariance is not None and not np.all(np.isfinite(covariance)):
            failed = True
            problems.append("the covariance of M is not finite")
    if not np.isfinite(scale).any():
        failed = True
        problems.append("no particle has a finite contrast scale")
    if not failed and held_defocus_z > HELD_DEFOCUS_Z:  # False for NaN
        warn = True
        problems.append(
            f"the input defocus disagrees with the particles: the warm start's defocus "
            f"search moved them (or their micrographs' means) by {held_defocus_z:.1f} "
            f"standard errors rms (> {HELD_DEFOCUS_Z:g}). Held fixed, its errors are read "
            "as magnification and M's standard errors leave them out: refine it with M "
            "(--defocus group, micrograph or particle)"
        )
    if prior_steps is not None:
        warn = True
        problems.append(
            f"the spread of the particles' defocus around their micrograph (the prior of "
            f"their heights) did not converge in {prior_steps} steps: the spread and "
            "the particles' shrunk defocus are not the fit's fixed point"
        )
    verdict = "failed" if failed else ("warning" if warn else "ok")
    return FitQuality(
        verdict=verdict,
        problems=problems,
        converged=bool(converged),
        iterations=int(iterations),
        chi2_per_pixel=float(chi2),
        explained_fraction=explained,
        signal_z=z,
        positive_scale_fraction=positive,
        condition=cond,
    )


def overall(qualities) -> str:
    """The worst verdict of several fits."""
    order = {"ok": 0, "warning": 1, "failed": 2}
    worst = max((order[q.verdict] for q in qualities), default=0)
    return {v: k for k, v in order.items()}[worst]
