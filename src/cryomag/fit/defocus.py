"""Defocus and astigmatism refined jointly with magnification, from the statistics.

Why. The input's defocus comes from CTF estimation: one value (or a smooth patch model) per
micrograph, measured on the distorted images, wrong by tens of A, while every particle sits
at its own height in the ice. Magnification and defocus are coupled (an isotropic scale and
the defocus both move the CTF rings; anisotropy and astigmatism are the same ellipse), so a
defocus error held fixed is read as magnification. Fitted jointly, the defocus costs the
magnification a few percent of its precision and is itself pinned to a few A.

Parameters. Each particle's defocus matrix Adef (A) in the frame of the CTF's defocus term
(d = M_in k, chi_defocus = pi lambda d^T Adef d) changes by dA = (a00, a01, a11), the sum of
two parts, each fitted at a level the user chooses (RELION's --fit_mode):

- ``defocus``: the isotropic part, dA = dz I (basis (1, 0, 1); dz the mean defocus, A);
- ``astigmatism``: the traceless part (basis (1, 0, -1) and (0, 1, 0)).

Levels: ``"fixed"`` (not fitted), ``"group"`` (one value per optics group), ``"micrograph"``
(one per micrograph) or ``"particle"`` (per particle, hierarchically: a micrograph mean plus
per-particle deviations with a Gaussian prior N(0, T) whose covariance T, the spread of the
particles' heights in the ice, is estimated from the data by empirical Bayes, the maximum of
its marginal likelihood). With the group's M (4 elements) and each particle's contrast scale
(profiled out) every parameter comes from one sparse linear system of the statistics' 7- or
11-column blocks
(:func:`cryomag.fit.statistics.column_layout`), solved by eliminating the particles, then
the micrographs, then solving the group: each level's covariance includes the uncertainty of
the others (Schur complements). Gauss-Newton repeats it at the updated state in each pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np

from cryomag.fit.hierarchy import (
    centred_max_likelihood,
    scatter_standard_error,
    variance_standard_error,
)
from cryomag.fit.projection import sandwich
from cryomag.fit.statistics import GroupStatistics, column_layout
from cryomag.fit.unit_sums import unit_sums

__all__ = [
    "HEIGHT_CORRELATION",
    "LEVELS",
    "PARAMETER_LABELS",
    "DefocusLevels",
    "JointCheck",
    "JointSolution",
    "follows_heights",
    "joint_check",
    "joint_system",
    "solve_joint",
]

LEVELS = ("fixed", "group", "micrograph", "particle")

#: Readable names of the parameters :meth:`DefocusLevels.names` lists (for the console and
#: the report).
PARAMETER_LABELS = {"defocus_A": "defocus", "astig_plus_A": "astigmatism +",
                    "astig_cross_A": "astigmatism x"}  # fmt: skip

#: |correlation| with the defocus above which the other deviations are read as moving with
#: the particles' heights (:func:`follows_heights`).
HEIGHT_CORRELATION = 0.9


def follows_heights(names: list[str], correlation: np.ndarray) -> bool:
    """Whether the per-particle deviations ``names`` (:meth:`DefocusLevels.names`) are one
    cause, the heights: the defocus first and every other parameter correlated with it by
    more than :data:`HEIGHT_CORRELATION` (a height h moves the CTF's defocus matrix in the
    measured frame by h M^T M, so an anisotropic M gives each height its astigmatism).
    ``correlation``: T's correlation matrix (k_p, k_p)."""
    corr = np.asarray(correlation, float)
    return (len(names) > 1 and names[0] == "defocus_A"
            and corr.shape == (len(names), len(names))
            and bool(np.all(np.abs(corr[0, 1:]) > HEIGHT_CORRELATION)))  # fmt: skip


#: The parts of the defocus matrix change (a00, a01, a11): columns of the basis.
PART_BASIS = {
    "defocus": np.array([[1.0], [0.0], [1.0]]),
    "astigmatism": np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]),
}


@dataclass(frozen=True)
class DefocusLevels:
    """At which level each part of the defocus is fitted (see the module docstring).

    Attributes
    ----------
    defocus : str
        The mean defocus: fixed, group, micrograph or particle.
    astigmatism : str
        The astigmatism: fixed, group, micrograph or particle.
    """

    defocus: str = "fixed"
    astigmatism: str = "fixed"

    def __post_init__(self) -> None:
        for name in ("defocus", "astigmatism"):
            v = getattr(self, name)
            if v not in LEVELS:
                raise ValueError(f"{name} level must be one of {', '.join(LEVELS)}, got {v!r}")

    @property
    def active(self) -> bool:
        """Whether any part is fitted."""
        return self.defocus != "fixed" or self.astigmatism != "fixed"

    def basis(self, level: str) -> np.ndarray:
        """Columns (in a00, a01, a11) of the parameters at ``level``, shape (3, k).

        A part fitted per particle also has its micrograph mean (the centre of the prior).
        """
        want = {"micrograph": ("micrograph", "particle")}.get(level, (level,))
        cols = [PART_BASIS[p] for p in ("defocus", "astigmatism") if getattr(self, p) in want]
        return np.hstack(cols) if cols else np.zeros((3, 0))

    def names(self, level: str) -> list[str]:
        """Names of the parameters at ``level`` (for results.json)."""
        want = {"micrograph": ("micrograph", "particle")}.get(level, (level,))
        out = []
        if self.defocus in want:
            out.append("defocus_A")
        if self.astigmatism in want:
            out += ["astig_plus_A", "astig_cross_A"]
        return out


def joint_system(stats: GroupStatistics, ctf_moves: bool = False, n_aberration: int = 0,
                 need_defocus: bool = True):  # fmt: skip
    """Each particle's reduced system in (M (4), dA (3), aberrations (K)), the scale
    profiled out.

    Parameters
    ----------
    stats : GroupStatistics
    ctf_moves : bool
    n_aberration : int
        K, the aberration columns at the end of the statistics (:mod:`cryomag.fit.aberrations`).
    need_defocus : bool
        Refuse statistics without defocus columns (else their rows and columns are zero).

    Returns
    -------
    h : ndarray, shape (N, 7 + K, 7 + K)
    b : ndarray, shape (N, 7 + K)
        Linearised at the pass's state; a particle without signal has zeros.
    """
    lay = column_layout(stats.hgg.shape[-1], n_aberration)
    if lay["defocus"] is None and need_defocus:
        raise ValueError(
            "these statistics have no defocus columns: the pass was made without defocus "
            "refinement (run cryomag estimate with the defocus refined)"
        )
    ncol = stats.hgg.shape[-1]
    k = int(n_aberration)
    proj = np.zeros((ncol, 7 + k))
    proj[0:4, 0:4] = np.eye(4)
    if ctf_moves and lay["mag_ctf"] is not None:
        proj[4:8, 0:4] = np.eye(4)  # the CTF's defocus term moves with M
    if lay["defocus"] is not None:
        proj[lay["defocus"], 4:7] = np.eye(3)
    if k:
        proj[lay["aberration"], 7:] = np.eye(k)
    ok = stats.pp > 0
    pp = np.where(ok, stats.pp, 1.0)
    hgg = sandwich(proj, stats.hgg, proj)
    hpg = stats.hpg @ proj
    b = stats.bg @ proj
    h = hgg - hpg[:, :, None] * hpg[:, None, :] / pp[:, None, None]
    h[~ok] = 0
    b[~ok] = 0
    return h, b


def _ctf_cross(stats: GroupStatistics) -> np.ndarray:
    """Each particle's profiled cross terms between the joint system's columns (M through
    the reference and the CTF's defocus term, dA) and M through the CTF's defocus term
    alone, shape (N, 7, 4) (:func:`joint_system` with ``ctf_moves``)."""
    lay = stats.layout
    ncol = stats.hgg.shape[-1]
    left = np.zeros((ncol, 7))
    left[0:4, 0:4] = np.eye(4)
    left[4:8, 0:4] = np.eye(4)
    if lay["defocus"] is not None:
        left[lay["defocus"], 4:7] = np.eye(3)
    right = np.zeros((ncol, 4))
    right[4:8, :] = np.eye(4)
    ok = stats.pp > 0
    pp = np.where(ok, stats.pp, 1.0)
    h = sandwich(left, stats.hgg, right)
    h -= (stats.hpg @ left)[:, :, None] * (stats.hpg @ right)[:, None, :] / pp[:, None, None]
    h[~ok] = 0
    return h


@dataclass
class JointSolution:
    """One Gauss-Newton step of M and the defocus of one optics group.

    Attributes
    ----------
    delta_mag : ndarray, shape (2, 2)
        Change of M (zeros when M is held).
    mag_covariance : ndarray, shape (4, 4)
        Covariance of M's elements (NaN when held).
    group : ndarray, shape (k_g,)
        Change of the group-level defocus parameters; ``group_cov`` (k_g, k_g).
    micrographs : ndarray
        Distinct micrograph labels, shape (U,).
    micrograph : ndarray, shape (U, k_m)
        Change of each micrograph's parameters; ``micrograph_cov`` (U, k_m, k_m).
    particle : ndarray, shape (N, k_p)
        Each particle's deviation from its micrograph after the step (the prior's variable,
        shrunk); ``particle_cov`` (N, k_p, k_p) its posterior covariance given the rest.
    prior : ndarray, shape (k_p, k_p)
        T, the covariance of the particles' deviations (EB estimate, A^2).
    prior_se : ndarray, shape (k_p,)
        Standard errors of the standard deviations sqrt(diag(T)) (A;
        :func:`cryomag.fit.hierarchy.scatter_standard_error`).
    prior_steps, prior_converged : int, bool
        The eliminations T's estimate took (:func:`_prior_by_likelihood`) and whether it
        converged.
    delta_a : ndarray, shape (N, 3)
        Each particle's change of (a00, a01, a11) (A).
    defocus_se : ndarray, shape (N,)
        Standard error of each particle's mean defocus after the step (A).
    corr_mag_defocus : float
        Correlation of the isotropic part of M with the group's mean defocus, or (when the
        defocus is fitted per micrograph) the median over micrographs of the correlation of
        M's isotropic part with the micrograph's defocus, both from the joint covariance.
    aberration : ndarray, shape (K,)
        Change of the group's aberration parameters (:mod:`cryomag.fit.aberrations`);
        ``aberration_cov`` (K, K) their covariance.
    theta_cov : ndarray, shape (4 + K + k_g, 4 + K + k_g), optional
        Joint covariance of the group-level parameters (M's elements when fitted, the
        aberrations, the group defocus parameters), for the correlations.
    """

    delta_mag: np.ndarray
    mag_covariance: np.ndarray
    group: np.ndarray
    group_cov: np.ndarray
    micrographs: np.ndarray
    micrograph: np.ndarray
    micrograph_cov: np.ndarray
    particle: np.ndarray
    particle_cov: np.ndarray
    prior: np.ndarray
    prior_se: np.ndarray
    delta_a: np.ndarray
    defocus_se: np.ndarray
    corr_mag_defocus: float = float("nan")
    prior_steps: int = 0
    prior_converged: bool = True
    normal_matrix: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    aberration: np.ndarray = field(default_factory=lambda: np.zeros(0))
    aberration_cov: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    theta_cov: np.ndarray | None = None

    @property
    def prior_spread(self) -> np.ndarray:
        """The standard deviations sqrt(diag(T)) of the particles' deviations (k_p,) (A)."""
        return np.sqrt(np.clip(np.diag(self.prior), 0, None))

    @property
    def prior_correlation(self) -> np.ndarray:
        """The correlation matrix of T (k_p, k_p); 0 where a variance is 0. Near +-1 where
        one cause moves several parameters (a height moves the astigmatism through an
        anisotropic magnification: h M^T M in the measured frame;
        :func:`follows_heights`)."""
        sd = self.prior_spread
        outer = np.outer(sd, sd)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.where(outer > 0, self.prior / np.where(outer > 0, outer, 1), 0.0)
        return np.clip(corr, -1.0, 1.0)

    @property
    def level_step(self) -> float:
        """The largest change of the group's and the micrographs' defocus parameters (A):
        with the particles' rms deviation change, the fit's measure of a defocus step."""
        return float(
            max(np.abs(self.group).max(initial=0.0), np.abs(self.micrograph).max(initial=0.0))
        )


def _solve_sym(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^-1 b for a batch of small symmetric systems (pseudo-inverse where singular)."""
    return np.linalg.pinv(a, rcond=1e-12, hermitian=True) @ b


def _prior_by_likelihood(elim, h_pp: np.ndarray, c2: float, t0: np.ndarray, max_steps: int,
                         tol: float) -> tuple[np.ndarray, int, bool]:  # fmt: skip
    """The prior T of the particles' deviations by empirical Bayes: the marginal likelihood
    of (theta, phi, T) with the deviations integrated out, maximised by alternating the
    elimination (theta and phi given T, ``elim(T)``, :func:`_eliminate`) with T's maximum
    given them (:func:`cryomag.fit.hierarchy.centred_max_likelihood`: each particle's data
    system in its deviation, ``elim``'s ``data_b`` and ``h_pp``, the prior's mean held at 0
    as the model has it; particles with a singular ``h_pp`` add nothing where they have no
    information).

    EM's map (T -> the posterior second moments) has the same fixed point but crawls where
    the spread is small against a particle's precision, sublinearly towards a spread of 0:
    capped at 100 steps it reported a 3.2 A spread where the simulation had none, and with
    the astigmatism also per particle SQUAREM-accelerated EM still took ~80-100 steps
    (bench/RESULTS.md, issue 14). The direct maximum takes a few dozen cheap likelihood
    evaluations per alternation, and the alternations converge in a few (the micrographs'
    means barely move with T). T's eigenvalues are floored at 1e-6 of a particle's data
    variance (a spread of 0 pins the deviations to 1e-3 of their own noise; the
    elimination's prior precision stays finite).

    Starts from one EM step at ``t0`` (a flat prior: the data's own scale). Converged when
    an alternation moves every diagonal element of T by less than ``tol`` of itself plus
    1e-3 of a particle's data variance of that parameter (median of c2 / H_pp), and every
    covariance by as little on the scale of the two standard deviations.

    Returns
    -------
    T : ndarray, shape (k_p, k_p)
    n_steps : int
        Eliminations made (calls of ``elim``).
    converged : bool
    """
    diag = np.einsum("nii->ni", h_pp)
    scale = np.array([c2 / np.median(d[d > 0]) if np.any(d > 0) else 1.0 for d in diag.T])
    floor = 1e-6 * float(scale.min())

    def floored(t: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(0.5 * (t + t.T))
        return (v * np.maximum(w, floor)) @ v.T

    sol = elim(t0)
    post = sol["psi"]
    t = floored((post[:, :, None] * post[:, None, :] + c2 * sol["s_inv"]).mean(0))
    n_steps = 1
    while n_steps < max_steps:
        sol = elim(t)
        n_steps += 1
        t_new = floored(centred_max_likelihood(sol["data_b"], h_pp, c2, t)[0])
        # each element against its own scale (the covariances against the product of the
        # standard deviations; on the diagonal: tol of itself plus 1e-3 of the data's)
        sd = np.sqrt(np.abs(np.diag(t_new)))
        bound = tol * (np.outer(sd, sd) + 1e-3 * np.sqrt(np.outer(scale, scale)))
        done = bool(np.all(np.abs(t_new - t) <= bound))
        t = t_new
        if done:
            return t, n_steps, True
    return t, n_steps, False


def solve_joint(
    stats: GroupStatistics,
    micrographs: np.ndarray,
    levels: DefocusLevels,
    fit_mag: bool = True,
    ctf_moves: bool = False,
    deviation: np.ndarray | None = None,
    mag_shift: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    prior_steps: int = 20,
    prior_tol: float = 1e-4,
    n_aberration: int = 0,
    profile: np.ndarray | None = None,
    newton_defocus: bool = True,
    system: tuple[np.ndarray, np.ndarray] | None = None,
) -> JointSolution:
    """The joint Gauss-Newton step of M and the defocus parts (see the module docstring).

    Parameters
    ----------
    stats : GroupStatistics
        A pass with defocus columns, at the current M and defocus.
    micrographs : ndarray, shape (N,)
        Micrograph label of each particle of ``stats.rows``.
    levels : DefocusLevels
    fit_mag : bool
        Also step M (else M is held at the pass's value).
    ctf_moves : bool
        The CTF's defocus term moves with M (defocus given in the specimen frame).
    deviation : ndarray, shape (N, k_p), optional
        Each particle's current deviation from its micrograph (the prior acts on the
        deviation after the step, i.e. on deviation + step); default zeros.
    mag_shift : ndarray, shape (2, 2), optional
        M already moved by this since the pass (the step is then from there).
    prior : ndarray, shape (k_p, k_p), optional
        Hold T at this value instead of estimating it.
    prior_steps, prior_tol : int, float
        The most eliminations for T and their tolerance (:func:`_prior_by_likelihood`:
        each element of T moving by less than ``prior_tol`` of its scale, on the diagonal
        itself plus 1e-3 of a particle's data variance); not converged: ``prior_converged``
        False, and the group's verdict a warning.
    n_aberration : int
        K group-level aberration parameters in the last columns of the statistics, fitted
        with M (after M in the group-level vector).
    profile : ndarray, shape (N, 2), optional
        The pass's defocus search (:mod:`cryomag.fit.defocus_profile`): each particle's
        best isotropic defocus change dz* and the curvature h* of its likelihood there.
        Along the isotropic direction e = (1, 0, 1) of dA the particle's system is then
        the quadratic around dz* (e^T h e = h*, e^T b = h* dz*: a Laplace approximation)
        instead of the tangent at the pass's state; particles with h* = 0 keep theirs.
    newton_defocus : bool
        With the defocus fitted per group or micrograph (no per-particle part), the CTF
        in the measured frame, no aberrations fitted and no ``profile``: the step solves
        the system with the Hessian's terms through the CTF's phase added
        (:func:`newton_block`: the defocus block and its coupling to M through the Cs
        term), which Gauss-Newton leaves out;
        each micrograph's defocus block at least :data:`NEWTON_FLOOR` times
        Gauss-Newton's. The particles' own heights are residuals of such a model, and
        Gauss-Newton's Hessian overstated the curvature of a micrograph's objective
        (median 1 / 0.56 on 5,000 particles with 50 A micrograph errors and 200 A
        heights): its steps came out short, each micrograph's defocus step halving from
        pass to pass (8 full passes there; 3 with these steps; bench/RESULTS.md, issue 14).
        The fixed point and the covariances (the Fisher information, from the
        Gauss-Newton system) are unchanged; only the path to it. Not with aberrations:
        their phase terms are left out, and with Cs fitted these steps diverged along the
        defocus-Cs coupling (as the defocus block alone did, M's coupling left out, on a
        box-96 set).
    system : (h, b), optional
        Each particle's reduced system (:func:`joint_system`'s shapes) to solve instead of
        the one of ``stats`` (whose noise level and rows are still used): the check of a
        step (:func:`joint_check`). Whether the step had the Hessian's phase terms is in
        ``extra["newton"]``.
    """
    na = int(n_aberration)
    if system is not None:
        h, b = (np.asarray(a, float) for a in system)
    else:
        h, b = joint_system(stats, ctf_moves, na, need_defocus=levels.active)
    if profile is not None:
        h, b = _laplace_along_defocus(h, b, np.asarray(profile, float))
    n = len(stats.rows)
    if mag_shift is not None:
        b = b - h[:, :, :4] @ np.asarray(mag_shift, float).reshape(4)
    chi2 = stats.chi2_per_pixel()
    c2 = chi2 / 2.0
    bg_, bm_, bp_ = (levels.basis(x) for x in ("group", "micrograph", "particle"))
    kg, km, kp = bg_.shape[1], bm_.shape[1], bp_.shape[1]
    nmag = 4 if fit_mag else 0
    # map (theta = (M, aberrations, group), phi = micrograph, psi = particle) -> (M, dA,
    # aberration) columns; the group defocus parameters follow M and the aberrations
    nmag_a = nmag + na
    dim = nmag_a + kg + km + kp
    jmap = np.zeros((7 + na, dim))
    if fit_mag:
        jmap[:4, :4] = np.eye(4)
    if na:
        jmap[7:, nmag:nmag_a] = np.eye(na)
    jmap[4:7, nmag_a : nmag_a + kg] = bg_
    jmap[4:7, nmag_a + kg : nmag_a + kg + km] = bm_
    jmap[4:7, nmag_a + kg + km :] = bp_
    nmag_ = nmag  # M's columns; the group defocus parameters start at nmag_a
    nmag = nmag_a
    hh = sandwich(jmap, h, jmap)
    bb = b @ jmap
    t_, m_, p_ = slice(0, nmag + kg), slice(nmag + kg, nmag + kg + km), slice(nmag + kg + km, dim)
    units, inv = np.unique(np.asarray(micrographs), return_inverse=True)
    nu = len(units)
    dev = np.zeros((n, kp)) if deviation is None else np.asarray(deviation, float).reshape(n, kp)
    fixed_prior = prior is not None
    tmat = np.asarray(prior, float).reshape(kp, kp) if fixed_prior else np.eye(kp) * 1e6
    elim = partial(_eliminate, hh, bb, inv, nu, t_, m_, p_, dev=dev, c2=c2)
    prior_converged = True
    if kp and not fixed_prior:
        tmat, it, prior_converged = _prior_by_likelihood(elim, hh[:, p_, p_], c2, tmat,
                                                         prior_steps, prior_tol)  # fmt: skip
    else:
        it = 1
    sol = elim(tmat)
    theta, cov_t = sol["theta"], sol["cov_theta"]
    phi, cov_m = sol["phi"], sol["cov_phi"]
    psi = sol["psi"]
    newton = (
        newton_defocus and profile is None and kp == 0 and (kg + km) > 0 and not ctf_moves
        and na == 0
    )  # fmt: skip
    if newton:
        # the Hessian's terms Gauss-Newton leaves out, in the parameters; the defocus block
        # floored per micrograph (a particle far from its own best defocus may have no or
        # negative curvature; the sum over a micrograph's particles has it), the difference
        # spread over the micrograph's particles: _eliminate sums them
        hh_n = hh + sandwich(jmap[:7], newton_block(stats, na), jmap[:7])
        d_ = slice(nmag, nmag + kg + km)  # the group and micrograph defocus parameters
        gn_p = hh[:, d_, d_]
        gn_m, ex_m = unit_sums(gn_p, inv, nu), unit_sums(hh_n[:, d_, d_], inv, nu)
        per = (_floored(gn_m, ex_m, NEWTON_FLOOR) - gn_m) / np.bincount(inv, minlength=nu)[
            :, None, None
        ]
        hh_n[:, d_, d_] = gn_p + per[inv]
        step = _eliminate(hh_n, bb, inv, nu, t_, m_, p_, tmat, dev, c2)
        theta, phi = step["theta"], step["phi"]
    delta_mag = theta[:4].reshape(2, 2) if fit_mag else np.zeros((2, 2))
    mag_cov = cov_t[:4, :4] if fit_mag else np.full((4, 4), np.nan)
    group = theta[nmag:]
    aberration = theta[nmag_:nmag]
    aberration_cov = cov_t[nmag_:nmag, nmag_:nmag]
    delta_a = (
        (bg_ @ group)[None, :]
        + (bm_ @ phi.T).T[inv]
        + (psi - dev) @ bp_.T  # the step of the deviation
    ) if (kg + km + kp) else np.zeros((n, 3))  # fmt: skip
    # standard error of each particle's mean defocus g.dA, g = (1, 0, 1) / 2: dA = B_g theta
    # + B_m phi + B_p psi, and psi's posterior mean moves with phi (by -S^-1 H_psi,phi), so
    # the particle carries (g.B_m - g.B_p S^-1 H_psi,phi) of phi's uncertainty and its own
    # posterior variance (theta's, pooled over the group, is neglected)
    mean_row = np.array([0.5, 0.0, 0.5])
    var = np.zeros(n)
    if kg:
        g = mean_row @ bg_
        var += g @ cov_t[nmag:, nmag:] @ g
    if km:
        gm = np.broadcast_to(mean_row @ bm_, (n, km))
        if kp:
            gm = gm - np.einsum("i,nij,njk->nk", mean_row @ bp_, sol["s_inv"], hh[:, p_, m_])
        var += np.einsum("ni,nij,nj->n", gm, cov_m[inv], gm)
    if kp:
        g = mean_row @ bp_
        var += np.einsum("i,nij,j->n", g, c2 * sol["s_inv"], g)
    corr = float("nan")
    if fit_mag:
        v = np.eye(2).reshape(4) / 2.0  # the isotropic part of M
        if kg and levels.defocus == "group":
            cov = cov_t
            i_dz = nmag + 0
            corr = float(
                (v @ cov[:4, i_dz]) / np.sqrt((v @ cov[:4, :4] @ v) * cov[i_dz, i_dz])
            )
        elif km and levels.defocus in ("micrograph", "particle"):
            corr = float(np.nanmedian(sol["corr_mag_mic"]))
    prior_se = np.zeros(kp)
    if kp:
        # Fisher information of the variances (each parameter on its own), then the delta
        # method for the standard deviations; v_p = the data's variance of each deviation
        s_data = np.linalg.pinv(hh[:, p_, p_], rcond=1e-12, hermitian=True)
        se_var = variance_standard_error(np.diag(tmat), c2 * np.einsum("nii->ni", s_data))
        prior_se = scatter_standard_error(np.sqrt(np.diag(tmat)), se_var)
    return JointSolution(
        delta_mag=delta_mag,
        mag_covariance=mag_cov,
        group=group,
        group_cov=cov_t[nmag:, nmag:],
        micrographs=units,
        micrograph=phi,
        micrograph_cov=cov_m,
        particle=psi,
        particle_cov=c2 * sol["s_inv"],
        prior=tmat,
        prior_se=prior_se,
        delta_a=delta_a,
        defocus_se=np.sqrt(np.clip(var, 0, None)),
        corr_mag_defocus=corr,
        prior_steps=it,
        prior_converged=prior_converged,
        aberration=aberration,
        aberration_cov=aberration_cov,
        theta_cov=cov_t,
        extra={"newton": bool(newton)},
        # M's marginal information (the group defocus parameters profiled out)
        normal_matrix=(
            np.linalg.pinv(c2 ** -1 * cov_t[:4, :4], rcond=1e-12, hermitian=True)
            if fit_mag
            else None
        ),
    )


@dataclass
class JointCheck:
    """What a full pass at the state after a joint step would step by, estimated from a
    pass over a subset (:func:`joint_check`).

    Attributes
    ----------
    mag_step : ndarray, shape (2, 2)
        M's step (zeros when M is held).
    mag_step_error : ndarray, shape (2, 2)
        Its sampling error (half the difference of the estimates from the subset's two
        halves).
    defocus_step : float
        The defocus step (A) as the fit measures it: the largest of the group's and the
        micrographs' parameter steps and the particles' rms deviation step (over the
        subset).
    defocus_bound : float
        The same with the group's and micrographs' part plus twice its sampling error (half
        the difference of that part's estimates from the two halves).
    n_used : int
        Subset particles with signal.
    """

    mag_step: np.ndarray
    mag_step_error: np.ndarray
    defocus_step: float
    defocus_bound: float
    n_used: int


def joint_check(
    full: GroupStatistics,
    subset: GroupStatistics,
    micrographs: np.ndarray,
    levels: DefocusLevels,
    solution: JointSolution,
    delta_mag: np.ndarray,
    deviation: np.ndarray | None,
    fit_mag: bool = True,
    ctf_moves: bool = False,
) -> JointCheck:
    """The step a full pass would take after the joint Gauss-Newton step ``solution`` of the
    full pass ``full``, from a pass ``subset`` over some of its particles at the new state.

    Each particle's reduced system at the new state is predicted linearly from the full pass
    (b - h dtheta, dtheta its step: M's ``delta_mag`` and its defocus change); the subset's
    actual systems differ from their predictions by what the linearisation left out (the
    particles' noise cancels in the difference: the same images; their curvature is the
    subset pass's own). Those differences, each standing for its micrograph's particles
    (weighted by the micrograph's particles over its subset particles), make the remainder
    of the whole group's system; the joint step of that system (the prior T held at the
    solution's) estimates the next full pass's step of M and of the group's and
    micrographs' defocus, and, given those, each subset particle's own remainder
    (unweighted) its deviation step. The sampling errors come from the estimates of the
    subset's two halves (alternate particles). Exact when the subset is every particle
    (test). Only for Gauss-Newton steps (not those with the Hessian's phase terms,
    ``solution.extra["newton"]``) and without aberrations.

    Parameters
    ----------
    full : GroupStatistics
        The full pass the step was taken from (with defocus columns).
    subset : GroupStatistics
        The pass over the subset at the state after the step, with the full pass's noise
        weights; its rows a subset of ``full.rows``.
    micrographs : ndarray, shape (N,)
        Micrograph of each particle of ``full.rows``.
    levels : DefocusLevels
    solution : JointSolution
        The step taken from ``full``.
    delta_mag : ndarray, shape (2, 2)
        M's step taken (zeros when M is held).
    deviation : ndarray, shape (N, k_p), or None
        The particles' deviations from their micrograph after the step (the state the
        subset was evaluated at).
    fit_mag, ctf_moves : bool
        As in :func:`solve_joint`.

    Returns
    -------
    JointCheck
    """
    if solution.extra.get("newton"):
        raise ValueError("the check predicts Gauss-Newton steps only (not newton_defocus)")
    if len(solution.aberration):
        raise ValueError("the check does not take aberrations")
    rows = np.asarray(full.rows)
    pos = np.searchsorted(rows, subset.rows)
    if np.any(pos >= len(rows)) or np.any(rows[np.minimum(pos, len(rows) - 1)] != subset.rows):
        raise ValueError("the subset's particles are not all in the full pass")
    h0, b0 = joint_system(full, ctf_moves)
    n = len(rows)
    dtheta = np.zeros((n, 7))
    if fit_mag:
        dtheta[:, :4] = np.asarray(delta_mag, float).reshape(4)
    dtheta[:, 4:7] = solution.delta_a
    b_pred = b0 - np.einsum("nij,nj->ni", h0, dtheta)
    h1, b1 = joint_system(subset, ctf_moves)
    used = (subset.pp > 0) & (full.pp[pos] > 0)
    rem = np.where(used[:, None], b1 - b_pred[pos], 0.0)
    _, inv = np.unique(np.asarray(micrographs), return_inverse=True)
    n_mic = np.bincount(inv).astype(float)

    h = h0.copy()
    h[pos[used]] = h1[used]  # the subset's own curvature at the new state

    def step(sel: np.ndarray) -> JointSolution:
        b = b_pred.copy()
        n_sub = np.bincount(inv[pos[sel]], minlength=len(n_mic)).astype(float)
        w = n_mic[inv[pos]] / np.maximum(n_sub[inv[pos]], 1.0)
        b[pos[sel]] += w[sel, None] * rem[sel]
        return solve_joint(full, micrographs, levels, fit_mag=fit_mag, ctf_moves=ctf_moves,
                           deviation=deviation, prior=solution.prior, system=(h, b),
                           newton_defocus=False)  # fmt: skip

    every = np.arange(len(pos))
    whole = step(every)
    halves = [step(every[k::2]) for k in (0, 1)]
    rms = 0.0
    bp_ = levels.basis("particle")
    kp = bp_.shape[1]
    ps = pos[used]
    if kp and len(ps):
        # each subset particle's own deviation step given the group's and micrographs' steps
        # (its unweighted remainder; _eliminate's particle equations)
        dev = np.zeros((n, kp)) if deviation is None else np.asarray(deviation, float)
        lam = full.chi2_per_pixel() / 2.0 * np.linalg.pinv(solution.prior, hermitian=True)
        r7 = np.zeros((len(ps), 7))
        r7[:, :4] = whole.delta_mag.reshape(4)
        if len(whole.group):
            r7[:, 4:7] += levels.basis("group") @ whole.group
        if whole.micrograph.shape[1]:
            r7[:, 4:7] += (levels.basis("micrograph") @ whole.micrograph.T).T[inv[ps]]
        hi, bi = h[ps], b_pred[ps] + rem[used]
        rhs = (bi[:, 4:7] - np.einsum("nij,nj->ni", hi[:, 4:7, :], r7)) @ bp_ - dev[ps] @ lam
        s_i = bp_.T[None] @ hi[:, 4:7, 4:7] @ bp_[None] + lam[None]
        d = np.einsum("nij,nj->ni", np.linalg.pinv(s_i, rcond=1e-12, hermitian=True), rhs)
        rms = float(np.sqrt(np.mean(d**2)))
    up, up_err = whole.level_step, abs(halves[0].level_step - halves[1].level_step) / 2.0
    return JointCheck(
        mag_step=whole.delta_mag,
        mag_step_error=np.abs(halves[0].delta_mag - halves[1].delta_mag) / 2.0,
        defocus_step=max(up, rms),
        defocus_bound=max(up + 2.0 * up_err, rms),
        n_used=int(used.sum()),
    )


#: The defocus block of a micrograph (its particles' sum) in the steps with the Hessian's
#: phase terms is at least this times the Gauss-Newton one (:func:`solve_joint`'s
#: ``newton_defocus``): positive definite however few particles the micrograph has.
NEWTON_FLOOR = 0.25


def newton_block(stats: GroupStatistics, n_aberration: int = 0) -> np.ndarray:
    """What each particle's Hessian of rr / 2 (the scale profiled) adds to the Gauss-Newton
    one in the joint fit's parameters (M00, M01, M10, M11, a00, a01, a11) -- the residual's
    terms through the CTF's phase and the profiled scale's -- shape (N, 7, 7).

    With u_i = <J_i, r> = bg_i / s and v_i = s <J_i, P> = hpg_i, the profiled objective's
    Hessian is s^2 <J_i, J_j> - s <d2P / d theta_i d theta_j, r>
    - (u_i u_j - u_i v_j - v_i u_j) / <P, P>; Gauss-Newton keeps
    s^2 (<J_i, J_j> - <J_i, P> <J_j, P> / <P, P>). Of the second term the statistics carry
    the part through the CTF's phase (``chi_curv``): all of it for the defocus matrix, M's
    through the Cs term. For the CTF in the measured frame (M not in its defocus term).
    Zeros for a particle without signal, and without defocus columns or ``chi_curv``.
    """
    lay = column_layout(stats.hgg.shape[-1], n_aberration)
    n = len(stats.rows)
    if lay["defocus"] is None or stats.chi_curv.shape[1:] != (7, 7):
        return np.zeros((n, 7, 7))
    ok = stats.pp > 0
    pp = np.where(ok, stats.pp, 1.0)
    s = stats.scale()
    s = np.where(ok & (np.abs(np.nan_to_num(s)) > 0), s, 1.0)
    cols = np.r_[0:4, np.arange(lay["defocus"].start, lay["defocus"].stop)]
    u = stats.bg[:, cols] / s[:, None]
    v = stats.hpg[:, cols]
    cross = u[:, :, None] * u[:, None, :] - u[:, :, None] * v[:, None, :]
    cross -= v[:, :, None] * u[:, None, :]
    out = stats.chi_curv - cross / pp[:, None, None]
    out[~ok] = 0
    return out


def _floored(gn: np.ndarray, exact: np.ndarray, floor: float) -> np.ndarray:
    """Each ``exact`` block (N, k, k) with its eigenvalues relative to the Gauss-Newton
    block ``gn`` raised to at least ``floor``: G^1/2 V max(L, floor) V^T G^1/2
    for G^-1/2 exact G^-1/2 = V L V^T, on G's range (a block with G = 0 stays 0)."""
    w, q = np.linalg.eigh(gn)
    top = np.maximum(w.max(axis=1, initial=0.0), 0.0) if w.size else np.zeros(len(gn))
    keep = w > 1e-12 * top[:, None]
    root = np.where(keep, np.sqrt(np.where(keep, w, 1.0)), 0.0)
    inv_root = np.where(keep, 1.0 / np.where(keep, root, 1.0), 0.0)
    g_half = q * root[:, None, :] @ np.swapaxes(q, 1, 2)
    g_ihalf = q * inv_root[:, None, :] @ np.swapaxes(q, 1, 2)
    rel = g_ihalf @ exact @ g_ihalf
    lam, vec = np.linalg.eigh(0.5 * (rel + np.swapaxes(rel, 1, 2)))
    lam = np.maximum(lam, floor)  # directions outside G's range vanish through G^1/2
    out = g_half @ (vec * lam[:, None, :]) @ np.swapaxes(vec, 1, 2) @ g_half
    return 0.5 * (out + np.swapaxes(out, 1, 2))


def _laplace_along_defocus(h: np.ndarray, b: np.ndarray, profile: np.ndarray):
    """``h``, ``b`` (N, 7 + K (, 7 + K)) with each particle's isotropic-defocus part
    replaced by the quadratic around its searched optimum (see :func:`solve_joint`):
    h += (h* - e^T h e) e e^T / 4, b += (h* dz* - e^T b) e / 2 on the dA columns."""
    e = np.zeros(h.shape[-1])
    e[4:7] = (1.0, 0.0, 1.0)
    dz, curv = profile[:, 0], profile[:, 1]
    use = curv > 0
    h_ee = np.einsum("i,nij,j->n", e, h, e)
    b_e = b @ e
    alpha = np.where(use, (curv - h_ee) / 4.0, 0.0)
    beta = np.where(use, (curv * dz - b_e) / 2.0, 0.0)
    return h + alpha[:, None, None] * np.outer(e, e)[None], b + beta[:, None] * e[None]


def _eliminate(hh, bb, inv, nu, t_, m_, p_, tmat, dev, c2) -> dict:
    """Solve the block system by eliminating particles, then micrographs (see module)."""
    n = len(hh)
    kp = p_.stop - p_.start
    nt, nm = t_.stop - t_.start, m_.stop - m_.start
    r_ = slice(0, nt + nm)  # the rest: theta and phi
    h_rest = hh[:, r_, r_].copy()
    b_rest = bb[:, r_].copy()
    s_inv = np.zeros((n, kp, kp))
    if kp:
        lam = c2 * np.linalg.pinv(tmat, hermitian=True)  # prior precision in H's units
        s = hh[:, p_, p_] + lam[None]
        s_inv = np.linalg.pinv(s, rcond=1e-12, hermitian=True)
        b_psi = bb[:, p_] - dev @ lam  # prior centred at 0 for the deviation after the step
        h_rp = hh[:, r_, p_]
        h_rest -= h_rp @ s_inv @ np.swapaxes(h_rp, 1, 2)
        b_rest -= np.einsum("nij,nj->ni", h_rp @ s_inv, b_psi)
    # micrographs
    t_loc, m_loc = slice(0, nt), slice(nt, nt + nm)
    h_tt = h_rest[:, t_loc, t_loc].sum(0)
    b_t = b_rest[:, t_loc].sum(0)
    hm_mm = unit_sums(h_rest[:, m_loc, m_loc], inv, nu)
    hm_tm = unit_sums(h_rest[:, t_loc, m_loc], inv, nu)
    bm = unit_sums(b_rest[:, m_loc], inv, nu)
    k_m = np.linalg.pinv(hm_mm, rcond=1e-12, hermitian=True) if nm else np.zeros((nu, 0, 0))
    if nm:
        h_tt = h_tt - np.einsum("uim,umk,ujk->ij", hm_tm, k_m, hm_tm)
        b_t = b_t - np.einsum("uim,umk,uk->i", hm_tm, k_m, bm)
    h_t_inv = np.linalg.pinv(h_tt, rcond=1e-12, hermitian=True) if nt else np.zeros((0, 0))
    theta = h_t_inv @ b_t if nt else np.zeros(0)
    cov_theta = c2 * h_t_inv
    phi = np.zeros((nu, nm))
    cov_phi = np.zeros((nu, nm, nm))
    corr_mag_mic = np.full(nu, np.nan)
    if nm:
        rhs = bm - np.einsum("uim,i->um", hm_tm, theta)
        phi = np.einsum("umk,uk->um", k_m, rhs)
        km_ht = np.einsum("umk,uik->umi", k_m, hm_tm)  # K_m H_mt
        cov_phi = c2 * (k_m + np.einsum("umi,ij,unj->umn", km_ht, h_t_inv, km_ht))
        if nt >= 4:
            # covariance of (M's isotropic part, the micrograph's first parameter)
            v = np.zeros(nt)
            v[:4] = np.eye(2).reshape(4) / 2.0
            cross = -c2 * np.einsum("umi,ij,j->um", km_ht, h_t_inv, v)  # cov(phi, v.theta)
            var_v = c2 * v @ h_t_inv @ v
            with np.errstate(invalid="ignore", divide="ignore"):
                corr_mag_mic = cross[:, 0] / np.sqrt(var_v * cov_phi[:, 0, 0])
    psi = np.zeros((n, kp))
    data_b = np.zeros((n, kp))
    if kp:
        rest = np.concatenate([np.broadcast_to(theta, (n, nt)), phi[inv]], axis=1)
        b_psi = bb[:, p_] - dev @ (c2 * np.linalg.pinv(tmat, hermitian=True))
        # the deviations' coupling to theta and phi
        coupling = np.einsum("nji,nj->ni", hh[:, r_, p_], rest)
        psi = dev + np.einsum("nij,nj->ni", s_inv, b_psi - coupling)
        # the data's own system in the deviation (no prior): its gradient at the deviation
        # 0, given theta and phi (for the prior's likelihood)
        data_b = bb[:, p_] - coupling + np.einsum("nij,nj->ni", hh[:, p_, p_], dev)
    return {
        "theta": theta,
        "cov_theta": cov_theta,
        "h_theta": h_tt,
        "phi": phi,
        "cov_phi": cov_phi,
        "psi": psi,
        "s_inv": s_inv,
        "data_b": data_b,
        "corr_mag_mic": corr_mag_mic,
    }


def unit_mag_fits(
    stats: GroupStatistics,
    m_lin: np.ndarray,
    m_group: np.ndarray,
    labels: np.ndarray,
    micrographs: np.ndarray,
    levels: DefocusLevels,
    isotropic: bool = True,
    unit: str = "micrograph",
    deviation: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    defocus_shift: np.ndarray | None = None,
    ctf_moves: bool = False,
    defocus_out: dict | None = None,
):
    """One magnification increment per unit, the defocus refitted jointly with it.

    The drop-in for :func:`cryomag.fit.local.unit_fits` when the defocus is refined: each
    unit's magnification (isotropic, M_u = (1 + delta) M_g, or the full matrix) is fitted
    together with the defocus parameters at the unit's level and below (per micrograph: the
    micrograph's parts and its particles' deviations under their prior; per particle: the
    particle's deviation under its prior), so that a defocus error is not read as
    magnification, and each unit's variance includes the cost of not knowing its defocus.

    Parameters
    ----------
    stats : GroupStatistics
        The last pass (with defocus columns), linearised at ``m_lin`` and the pass's defocus.
    m_lin, m_group : ndarray, shape (2, 2)
        The pass's M and the fitted group M (the increment is from ``m_group``).
    labels : ndarray, shape (N,)
        Unit of each particle (micrograph names, or the particle rows).
    micrographs : ndarray, shape (N,)
        Micrograph of each particle.
    levels : DefocusLevels
    isotropic : bool
    unit : str
        ``"micrograph"`` or ``"particle"``: which defocus parameters the unit carries.
    deviation, prior : ndarray, optional
        The particles' current deviations from their micrograph and their prior covariance
        T (from the group's :func:`solve_joint`).
    defocus_shift : ndarray, shape (N, 3), optional
        Defocus change since the pass (the last step), subtracted from the gradient.
    ctf_moves : bool
        The CTF's defocus term moves with the unit's own M (a particle's defocus was measured
        for its micrograph, at the group's M).
    defocus_out : dict, optional
        Receives ``"delta_a"`` (N, 3): each particle's defocus change (a00, a01, a11, A) in
        this joint fit, from the pass's state moved by ``defocus_shift`` (the state after
        the group's last step), and ``"deviation"`` (N, k_p); with
        ``ctf_moves`` for isotropic particle units also ``"own_scale"`` (N,): the factor
        (1 + theta)^2 of the defocus matrix that goes with the group's M.

    Returns
    -------
    units, theta, cov, gain
        As :func:`cryomag.fit.local.unit_fits`.
    """
    own = ctf_moves and unit == "particle" and stats.layout["mag_ctf"] is not None
    h, b = joint_system(stats, own)
    n = len(stats.rows)
    shift = np.zeros((n, 7))
    shift[:, :4] = (np.asarray(m_group, float) - np.asarray(m_lin, float)).reshape(4)
    if defocus_shift is not None:
        shift[:, 4:] = defocus_shift
    b = b - np.einsum("nij,nj->ni", h, shift)
    mbar = None
    if own:
        # the group's step moved the reference, not the measured CTF (as
        # :func:`cryomag.fit.local.unit_fits`): h's M columns also carry the CTF's part
        b = b + np.einsum("nij,nj->ni", _ctf_cross(stats), shift[:, :4])
        # The micrograph's defocus was measured (and refined) on its own images: it already
        # holds the CTF change of the micrograph's mean magnification. A particle's CTF moves
        # only with its deviation from that mean: model J_ref d + J_ctf (d - dbar_mic). dbar
        # from the fit with the CTF held (which reads every particle's M from the reference
        # term), then the data's offset J_ctf dbar moves into b.
        units0, theta0, cov0, _ = unit_mag_fits(
            stats, m_lin, m_group, labels, micrographs, levels, isotropic, unit,
            deviation=deviation, prior=prior, defocus_shift=defocus_shift, ctf_moves=False,
        )  # fmt: skip
        mag_cols0 = np.asarray(m_group, float).reshape(4, 1) if isotropic else np.eye(4)
        lookup = np.searchsorted(units0, np.asarray(labels))
        dm = np.nan_to_num(theta0[lookup] @ mag_cols0.T)  # (n, 4) each particle's dM
        wgt = 1.0 / np.clip(np.nan_to_num(np.einsum("nii->n", cov0[lookup]), nan=np.inf),
                            1e-30, None)  # fmt: skip
        mics_u, mics_inv = np.unique(np.asarray(micrographs), return_inverse=True)
        wsum = np.bincount(mics_inv, wgt, minlength=len(mics_u))
        mbar = np.stack([np.bincount(mics_inv, wgt * dm[:, j], minlength=len(mics_u))
                         for j in range(4)], 1) / np.where(wsum > 0, wsum, 1)[:, None]
        mbar = mbar[mics_inv]  # (n, 4)
        b = b + np.einsum("nij,nj->ni", _ctf_cross(stats), mbar)
    chi2 = stats.chi2_per_pixel()
    c2 = chi2 / 2.0
    bm_, bp_ = levels.basis("micrograph"), levels.basis("particle")
    kp = bp_.shape[1]
    mag_cols = np.asarray(m_group, float).reshape(4, 1) if isotropic else np.eye(4)
    d = mag_cols.shape[1]
    cols = [mag_cols]
    if unit == "micrograph":
        cols.append(bm_)
    jm = np.zeros((7, sum(c.shape[1] for c in cols) + kp))
    jm[:4, :d] = mag_cols
    nm = jm.shape[1] - kp
    if unit == "micrograph" and bm_.shape[1]:
        jm[4:, d:nm] = bm_
    jm[4:, nm:] = bp_
    hh = sandwich(jm, h, jm)
    bb = b @ jm
    units, inv = np.unique(np.asarray(labels), return_inverse=True)
    dev = np.zeros((n, kp)) if deviation is None else np.asarray(deviation, float).reshape(n, kp)
    tmat = np.eye(kp) * 1e6 if prior is None else np.asarray(prior, float).reshape(kp, kp)
    sol = _eliminate(hh, bb, inv, len(units), slice(0, 0), slice(0, nm), slice(nm, nm + kp),
                     tmat, dev, c2)  # fmt: skip
    if defocus_out is not None:
        psi_step = sol["psi"] - dev
        delta_a = psi_step @ bp_.T if kp else np.zeros((n, 3))
        if unit == "micrograph" and bm_.shape[1]:
            delta_a = delta_a + (bm_ @ sol["phi"][:, d:].T).T[inv]
        defocus_out["delta_a"] = delta_a
        defocus_out["deviation"] = sol["psi"]
        if own and isotropic:
            # the particle's CTF moves with its deviation from its micrograph's mean M:
            # with the group's M written, its defocus matrix is (1 + theta - theta_mic)^2
            # (A + delta_a)
            iso_bar = mbar @ np.asarray(m_group, float).reshape(4) / float(
                np.sum(np.asarray(m_group, float) ** 2))  # fmt: skip
            defocus_out["own_scale"] = (1.0 + sol["phi"][inv, 0] - iso_bar) ** 2
    theta = sol["phi"][:, :d]
    # each unit alone (the group held): its own information, no Schur term of theta
    cov = sol["cov_phi"][:, :d, :d]
    ok = np.all(np.isfinite(cov), axis=(1, 2)) & (np.einsum("uii->u", cov) > 0)
    theta = np.where(ok[:, None], theta, np.nan)
    cov = np.where(ok[:, None, None], cov, np.nan)
    gain = np.zeros(len(units))
    return units, theta, cov, gain
