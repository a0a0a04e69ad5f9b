"""Gauss-Newton for each optics group's M, driven by passes over the images.

Each optics group has a :class:`GroupFit`: its phase (a warm start on a fixed random subset,
then passes over every particle), its linearisation point, history and noise model. A pass
(any callable ``run_pass(spec, chunks) -> {group: GroupStatistics}``, e.g. a map over an
executor) returns the statistics at the current M; :meth:`GroupFit.step` takes one
Gauss-Newton step from them, re-linearised from the second-order statistics where they can
be trusted (:mod:`cryomag.fit.relinearise`), and decides whether the group is done.
:func:`iterate` runs passes until every group is done. Nothing here reads files or knows
where the passes run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cryomag.fit.aberrations import AberrationTerms
from cryomag.fit.anisomag import MagUpdate, solve_group
from cryomag.fit.defocus import DefocusLevels, JointSolution, joint_check, solve_joint
from cryomag.fit.passes import GroupPass, PassSpec
from cryomag.fit.quality import FitQuality, assess_group
from cryomag.fit.relinearise import relinearised_fit, subset_check
from cryomag.fit.statistics import Band, GroupStatistics

__all__ = [
    "GaussNewtonSettings",
    "GroupFit",
    "GroupResult",
    "check_subsets",
    "joint_check_subsets",
    "defocus_probe_z",
    "iterate",
    "warm_subsets",
]

log = logging.getLogger("cryomag")

#: A joint fit's first window-aware pass after its box-periodic first pass
#: (:attr:`GaussNewtonSettings.periodic_first_pass`) ends the fit when its step is below this
#: many times its tolerances of M and the defocus (``tol``, ``defocus_tol_A``; the
#: aberrations' stays: the local models do not take their last step into account) -- if the
#: box-periodic pass's own defocus step was below this many ``defocus_tol_A`` (the fit
#: started in the linear range). The window-aware step is then the window's correction plus
#: a small remainder, and the step after it measured 0.004x (M) and 0.02x (defocus) of it
#: (5,000 particles of box 128, each particle's defocus as input): the accepted point is
#: within a small fraction of one tolerance of the fixed point. With large defocus errors
#: (a micrograph's defocus with a 50 A error, heights of 200 A) the box-periodic step is
#: large and the next one is not yet that small (measured 5.97 A after a 200 A step, with
#: the defocus search; bench/RESULTS.md, issue 14): the tolerances then stay as they are.
FINAL_STEP_AFTER_PERIODIC = 10.0

#: The warm start's probe of the input defocus (:attr:`GaussNewtonSettings.linear_start_probe`):
#: the input is within the window-aware passes' linear range when the rms over the last warm
#: subset of each particle's searched defocus change (:mod:`cryomag.fit.defocus_profile`) in
#: its own standard errors, and that of each micrograph's mean change in its standard error,
#: are below this (:func:`defocus_probe_z`). Measured on the warm subsets (500 particles, box
#: 128, SNR 0.05, 50 micrographs) of the speed benchmark: 0.75 and 0.78 with each particle's
#: defocus as input, 11.3 and 12.1 with one defocus per micrograph written with a 50 A error
#: and heights spread 200 A.
LINEAR_START_Z = 2.0

#: After a linear start the first (window-aware) full pass ends the fit when its M step is
#: below this many ``tol`` (its defocus step: :data:`FINAL_STEP_AFTER_PERIODIC` defocus
#: tolerances). Its step from the warm start is the full set's correction plus the window's
#: (2.2e-4 on the benchmark, each particle's defocus as input, against tol 1e-5); the step
#: after it measured 8.9e-7 (M, 0.004x) and 0.11 A (defocus after 4.2 A): Gauss-Newton's
#: remainder grows as the step squared, 1.7e-6 at 30 tol.
FINAL_M_STEP_AFTER_LINEAR_START = 30.0


@dataclass(frozen=True)
class GaussNewtonSettings:
    """The iteration's settings (see :class:`cryomag.workflows.estimate.EstimateOptions`).

    Attributes
    ----------
    fit_aniso : bool
        Fit M (False: one pass, scales only).
    joint_scale : bool
        Profile the per-particle scales out of M's system (else hold them).
    ctf_moves : bool
        The CTF's defocus term moves with M (defocus in the specimen frame).
    tol : float
        Done when every element of the update is below this. 0: run exactly ``max_iter``
        passes (no convergence criterion, so no convergence failure either).
    max_iter : int
        Passes per phase at most.
    warm_tol : float
        Update below which a warm start hands over to full passes.
    relinearise : bool
        Full passes accumulate second-order statistics and Gauss-Newton re-linearises
        from them.
    curvature_every : int
        The curvature sums from every n-th particle; 0: automatic per group
        (:func:`curvature_stride`).
    levels : DefocusLevels
        Which parts of the defocus are refined jointly with M, at which level
        (:mod:`cryomag.fit.defocus`); full passes then solve M and the defocus together
        (no re-linearisation: the second-order statistics describe M alone).
    defocus_tol_A : float
        With the defocus refined, also done only when its step is below this (A): the
        largest group or micrograph change and the rms change of the particles' deviations.
    aberrations : AberrationTerms
        Group-level aberration parameters fitted jointly with M (:mod:`cryomag.fit.aberrations`);
        full passes then take the joint step, and the group is done only when every
        parameter's step is below ``aberration_tol`` of its standard error.
    aberration_tol : float
        See ``aberrations``.
    warm_periodic : bool
        Warm-start passes use the box-periodic model (``window_pad`` 1) whatever the group's
        padding, until their update is below ``warm_tol``; then the full passes (with the
        window) take over. The warm passes only choose the point the full passes linearise
        at: the result is still the window-aware fixed point of every particle.
    warm_window_pass : bool
        With ``warm_periodic``: one more subset pass with the window before the full passes,
        whose residuals weight them (False, the default: the periodic warm passes' residuals
        weight the first full pass; measured on 5,000 particles of box 128: M moved by
        0.003 standard errors, its standard errors by 1e-4, the fit 15 % faster;
        bench/RESULTS.md, issue 14).
    lean_warm : bool
        Warm-start passes accumulate only what the group fit of M needs (no exact gradient,
        no defocus or local-model columns: :attr:`cryomag.fit.passes.GroupPass.lean`); the
        local models and the defocus use the full passes' statistics only.
    periodic_first_pass : bool
        A joint fit (the defocus or aberrations refined) with a window (``window_pad`` > 1)
        makes its first full pass with the box-periodic model (about a third of the cost):
        its large defocus step only brings the window-aware passes into their linear range,
        and the first window-aware pass after it ends the fit when its step is below
        :data:`FINAL_STEP_AFTER_PERIODIC` tolerances. The result is the window-aware fixed
        point (tests/fit/test_defocus.py); never the last pass ``max_iter`` allows.
    defocus_search : bool
        With the defocus per particle, the first full pass (box-periodic) also searches each
        particle's isotropic defocus on its likelihood and the joint step starts from each
        particle's optimum (:mod:`cryomag.fit.defocus_profile`); the fixed point is the same.
    warm_predicted_stop : bool
        The warm start also hands over when its steps contract (each below half the last)
        and the next one, predicted as step^2 / last step, would be below ``warm_tol`` with
        a factor 2 to spare: one subset pass fewer (the warm passes only choose where the
        full passes linearise; their own first step is larger than the difference).
    linear_start_probe : bool
        With the box-periodic first pass and its defocus search (``periodic_first_pass``,
        ``defocus_search``, the defocus per particle) after a box-periodic warm start: the
        warm passes also search each subset particle's defocus (no defocus columns, ~10 %
        of their cost). When the input defocus is within the noise (rms of the changes in
        their standard errors, per particle and per micrograph, below
        :data:`LINEAR_START_Z`: each particle's defocus as
        input, e.g. after a per-particle CTF refinement), the box-periodic first pass is
        left out -- it would only bring the window-aware passes into the linear range they
        are in -- and the first window-aware pass ends the fit when its steps are below
        :data:`FINAL_M_STEP_AFTER_LINEAR_START` (M) and :data:`FINAL_STEP_AFTER_PERIODIC`
        (defocus) tolerances; else the fit goes on as without the probe.
    check_subset : int
        When a full pass's re-linearised fit converged but its remainder estimate is too
        large to trust it (:func:`cryomag.fit.relinearise.relinearised_fit`), a pass over
        this many of the group's particles (those with curvature sums, evenly spaced; only
        groups with more than twice as many particles) at the re-linearised M, with the
        full pass's weights, measures the second-order model's remainder instead of a
        second full pass (:func:`cryomag.fit.relinearise.subset_check`): the group is done
        when the step it estimates for a full pass, plus twice its sampling error, is below
        ``tol``; else a full pass follows at the corrected M. 0: always the full pass.
        Measured on 5,000 particles of box 128 with micrograph-level defocus (50 A
        errors): the remainder bound 2.3e-5 (tol 1e-5) asked for a second full pass whose
        step was 2.7e-6; the check over 500 particles estimated 1.4e-6 +- 0.7e-6 and
        ended 0.035 standard errors from the two-pass result (bench/RESULTS.md, issue 14).
    held_defocus_probe : bool
        When the defocus is held (no defocus level fitted) and M is fitted, the box-periodic
        warm passes search each subset particle's defocus (~10 % of their cost; nothing
        else uses it), and the verdict is "warning" when the input defocus disagrees with
        the particles beyond :data:`cryomag.fit.quality.HELD_DEFOCUS_Z`
        (:func:`defocus_probe_z`): its errors
        are read as magnification, outside M's standard errors. Needs a warm start (a group
        of more than twice ``warm_start`` particles).
    newton_defocus : bool
        With the defocus fitted per group or micrograph (none per particle), each joint
        step adds the Hessian's terms through the CTF's phase, which Gauss-Newton leaves
        out (:func:`cryomag.fit.defocus.solve_joint`): the particles' heights are residuals
        of such a model, and Gauss-Newton's steps came out ~0.56 times too short (each
        micrograph's defocus step halving from pass to pass). Same fixed point and
        standard errors. Measured on 5,000 particles of box 128 (50 A micrograph errors,
        200 A heights), defocus per micrograph: 8 -> 3 full passes, M 0.02 standard
        errors from the Gauss-Newton route's converged result; per group: 2 full passes
        either way, M 0.20 (0.34 before) standard errors and the defocus 0.09 A (1.75 A)
        from the fixed point (bench/RESULTS.md, issue 14). False: Gauss-Newton.
    joint_check : bool
        A joint fit's window-aware Gauss-Newton step (the defocus refined, no aberrations,
        not the steps with the phase terms) that does not end the fit, but is within
        :data:`FINAL_M_STEP_AFTER_LINEAR_START` tolerances (M) and
        :data:`FINAL_STEP_AFTER_PERIODIC` defocus tolerances, and whose next defocus step
        predicted from the last two (step^2 / last step) is below its tolerance, is checked
        by a pass over the group's check subset (about ``check_subset`` particles, from
        every micrograph: :func:`joint_check_subsets`) at the new state instead of a full
        pass (:func:`cryomag.fit.defocus.joint_check`): the group is done when the step a
        full pass would take, plus twice its sampling error, is below ``tol`` (M) and
        ``defocus_tol_A``; else a full pass follows. The state stays the step's, as after a
        last full pass. Measured on 5,000 particles of box 128 (a micrograph's defocus with
        a 50 A error, heights 200 A), the local models: the check over 500 particles
        estimated |dM| 2.2e-6 (with twice its sampling error 8.4e-6) and a defocus step of
        0.79 A where the full pass it replaces stepped by 1.3e-6 and 0.49 A; M 0.04
        standard errors and the particles' defocus 0.03 (rms, at most 0.43) from the
        three-pass result, the fit 1.4x faster (bench/RESULTS.md, issue 14).
    lean_hessian : bool
        The full passes of the window-aware group fit (no local, defocus or aberration
        columns) form the gradient of every particle exactly but the Gauss-Newton matrix
        exactly only on the curvature particles (every ``curvature_every``-th), the
        others' by a control variate (:attr:`cryomag.fit.accumulate.KernelOptions.lean_hessian`).
        The gradient's zero, the fit's fixed point, is the exact model's; a step's error
        is the matrix's relative error times the step. False: the exact matrix for every
        particle.
    """

    fit_aniso: bool = True
    joint_scale: bool = True
    ctf_moves: bool = False
    tol: float = 1e-5
    max_iter: int = 10
    warm_tol: float = 1e-4
    relinearise: bool = True
    curvature_every: int = 0
    levels: DefocusLevels = field(default_factory=DefocusLevels)
    defocus_tol_A: float = 1.0
    aberrations: AberrationTerms = field(default_factory=AberrationTerms)
    aberration_tol: float = 0.05
    warm_periodic: bool = True
    lean_warm: bool = True
    warm_window_pass: bool = False
    periodic_first_pass: bool = True
    defocus_search: bool = True
    warm_predicted_stop: bool = True
    linear_start_probe: bool = True
    check_subset: int = 500
    held_defocus_probe: bool = True
    newton_defocus: bool = True
    joint_check: bool = True
    lean_hessian: bool = True

    @property
    def fits_anything(self) -> bool:
        """Whether passes iterate (M, the defocus or aberrations are fitted)."""
        return self.fit_aniso or self.levels.active or bool(len(self.aberrations))

    @property
    def joint(self) -> bool:
        """Whether full passes take the joint step (defocus or aberrations with M)."""
        return self.levels.active or bool(len(self.aberrations))


@dataclass
class GroupResult:
    """Result for one optics group.

    Attributes
    ----------
    group : int
        Optics group number.
    n_particles : int
    mag_in, mag : ndarray, shape (2, 2)
        The input's M and the fitted one.
    mag_error : ndarray, shape (2, 2)
        Standard error of each element of M.
    covariance : ndarray, shape (4, 4)
        Covariance of (M00, M01, M10, M11).
    iterations : int
        Gauss-Newton steps (passes and re-linearised steps).
    band_A : (float, float)
        The band's resolution limits (A).
    chi2 : float
        Weighted residual power per complex pixel of the last pass.
    history : list of dict
        One entry per step: iteration, particles, max_step, M, relinearised.
    mag_lin : ndarray, shape (2, 2), optional
        The M the last pass was linearised at (the statistics' point).
    converged : bool
        The last update was below the tolerance (False: stopped at max_iter).
    quality : FitQuality, optional
        The verdict on the fit (:mod:`cryomag.fit.quality`). A failed fit has NaN standard
        errors; its M is reported but not applied to the particles.
    defocus : ndarray, shape (n, 3), optional
        With the defocus refined: each particle's refined (DefocusU, DefocusV, angle) in the
        frame of the CTF's defocus term (the input's M), in the order of ``rows``.
    defocus_solution : JointSolution, optional
        The last joint step (micrograph and particle parameters with covariances, the
        prior T, the correlation of M with the defocus).
    rows : ndarray, optional
        The group's particle rows.
    aberration_terms : AberrationTerms, optional
        The fitted aberration parameters; ``aberration`` (K,) their change from the input
        (in each parameter's unit), ``aberration_cov`` (K, K) its covariance,
        ``aberration_mag_corr`` (K,) each one's correlation with M's isotropic part.
    optics, optics_in : OpticsParams, optional
        The group's optics with the fitted aberrations, and as the input had them.
    aberration_maps : ndarray, shape (4, npix_band), optional
        The per-pixel phase- and amplitude-error sums of the first pass that had them (at
        the input's aberrations; :data:`cryomag.fit.statistics.ABERRATION_MAPS`).
    """

    group: int
    n_particles: int
    mag_in: np.ndarray
    mag: np.ndarray
    mag_error: np.ndarray
    covariance: np.ndarray
    iterations: int
    band_A: tuple
    chi2: float
    history: list = field(default_factory=list)
    mag_lin: np.ndarray | None = None
    converged: bool = True
    quality: FitQuality | None = None
    defocus: np.ndarray | None = None
    defocus_solution: JointSolution | None = None
    rows: np.ndarray | None = None
    aberration_terms: AberrationTerms | None = None
    aberration: np.ndarray | None = None
    aberration_cov: np.ndarray | None = None
    aberration_mag_corr: np.ndarray | None = None
    optics: object | None = None
    optics_in: object | None = None
    aberration_maps: np.ndarray | None = None

    @property
    def failed(self) -> bool:
        """The fit failed its quality checks: do not use M or its errors."""
        return self.quality is not None and self.quality.failed

    def step_kinds(self) -> list[str]:
        """How each Gauss-Newton iteration of :attr:`history` was made: ``"subset"`` (a pass
        over the warm-start subset), ``"full"`` (a pass over every particle),
        ``"relinearised"`` (from the stored second-order statistics, no pass) or ``"check"``
        (a pass over the check subset, :attr:`GaussNewtonSettings.check_subset`)."""
        return [
            "relinearised"
            if h.get("relinearised")
            else "check"
            if h.get("check")
            else ("subset" if h["particles"] < self.n_particles else "full")
            for h in self.history
        ]


def second_order_accuracy(window_pad: int, every: int) -> float:
    """Relative accuracy of the second-order correction (see ``relinearised_fit``).

    The window-aware model uses the box-periodic second derivatives (its change of the sums
    was predicted within ~30 %: tests/test_accumulate.py); sampling every n-th particle
    adds a statistical error (measured 2 % of the correction for n = 4 on 20,000 particles;
    counted as 5 %, and as 5 % x sqrt(n / 4) for sparser samples).
    """
    acc = 0.3 if window_pad > 1 else 0.0
    return max(acc, 0.05 * np.sqrt(max(every, 4) / 4)) if every > 1 else acc


#: With automatic curvature sums (``curvature_every`` 0): every SPARSE_CURVATURE_EVERY-th
#: particle of a group that then still has AUTO_CURVATURE_PARTICLES of them (and at least
#: its check subset), else every DEFAULT_CURVATURE_EVERY-th.
DEFAULT_CURVATURE_EVERY = 4
SPARSE_CURVATURE_EVERY = 8
AUTO_CURVATURE_PARTICLES = 625


def curvature_stride(setting: int, n_particles: int, check_subset: int = 0) -> int:
    """The stride of a group's curvature particles (row % stride == 0).

    ``setting`` > 0 is taken as it is. 0 (automatic): every 8th particle when the group then
    has at least :data:`AUTO_CURVATURE_PARTICLES` (625) curvature particles and at least
    ``check_subset``, i.e. from 5,000 particles at the defaults, else every 4th. The
    curvature particles carry the exact window-aware Gauss-Newton matrix (the others' is
    regressed on them, ``lean_hessian``) and the second-order sums; on 5,000 particles of
    box 128 every 8th instead of every 4th made the full pass's kernel ~4 % faster (0.90-1.01
    in interleaved rounds), with the same passes and M 0.008 standard errors apart (0.06 on
    the real-like set, whose re-linearised fit is checked on 500 of them; bench/RESULTS.md,
    issue 14).
    """
    if int(setting) > 0:
        return int(setting)
    sparse = n_particles // SPARSE_CURVATURE_EVERY
    if sparse >= max(AUTO_CURVATURE_PARTICLES, int(check_subset)):
        return SPARSE_CURVATURE_EVERY
    return DEFAULT_CURVATURE_EVERY


@dataclass
class _CheckBase:
    """The full pass a check pass is compared with (:attr:`GroupFit.phase` "check")."""

    stats: GroupStatistics  # that pass's statistics
    delta: np.ndarray  # the step taken from it: M's increment (2, 2)
    noise: np.ndarray  # the noise power it was weighted with (the check's weights)
    solution: JointSolution | None = None  # a joint step's solution (joint_check)


class GroupFit:
    """The Gauss-Newton state of one optics group (see the module docstring).

    Parameters
    ----------
    group : int
        Optics group number.
    n_particles : int
    mag_in : ndarray, shape (2, 2)
        The input's M: the start, and the CTF frame unless ``settings.ctf_moves``.
    noise : ndarray
        Noise power per shell for the first pass.
    window_pad : int
    settings : GaussNewtonSettings
    warm : bool
        Start with passes over the warm-start subset.
    rows : ndarray, shape (n,), optional
        The group's particle rows, sorted (needed when the defocus is refined).
    micrographs : ndarray, shape (n,), optional
        Each particle's micrograph (the defocus levels).
    defocus : ndarray, shape (n, 3), optional
        The input's (DefocusU, DefocusV, angle) of each particle (A, A, degrees).
    optics : OpticsParams, optional
        The group's optics as the input has them (needed when aberrations are fitted).
    check : bool
        The group has a check subset (:func:`check_subsets`): an untrusted re-linearised
        fit is checked by a pass over it (:attr:`GaussNewtonSettings.check_subset`).
    """

    def __init__(self, group: int, n_particles: int, mag_in: np.ndarray, noise: np.ndarray,
                 window_pad: int, settings: GaussNewtonSettings, warm: bool = False,
                 rows: np.ndarray | None = None, micrographs: np.ndarray | None = None,
                 defocus: np.ndarray | None = None, optics=None,
                 check: bool = False):  # fmt: skip
        self.group = int(group)
        self.n_particles = int(n_particles)
        # the stride of the curvature particles (settings.curvature_every, resolved)
        self.curvature_every = curvature_stride(settings.curvature_every, n_particles,
                                                settings.check_subset)  # fmt: skip
        self.mag_in = np.asarray(mag_in, float).copy()
        self.mag = self.mag_in.copy()
        self.mag_lin = self.mag_in.copy()
        self.noise = noise
        self.window_pad = int(window_pad)
        self.settings = settings
        self.phase = "warm" if warm else "full"
        self.history: list[dict] = []
        self.counts = {"warm": 0, "full": 0, "check": 0}
        self.check_available = bool(check)
        # the full pass the next check pass is compared with
        self._check_base: _CheckBase | None = None
        self.warm_step = np.inf  # the last warm pass's step
        # the last warm pass uses the window (settings.warm_periodic, window_pad > 1)
        self.warm_windowed = False
        # the next step may end the fit at FINAL_STEP_AFTER_PERIODIC tolerances: it follows
        # a box-periodic pass whose defocus step was in the linear range
        self.relaxed_next = False
        # the warm start's probe of the input defocus (settings.linear_start_probe): the rms
        # of the last probe's changes in standard errors, and whether it found the input
        # within the linear range (then no box-periodic first pass)
        self.probe_z = np.nan
        self.linear_start = False
        self.update: MagUpdate | None = None
        self.stats: GroupStatistics | None = None  # the last full pass
        self.first_stats: GroupStatistics | None = None  # the first pass (at the input M)
        self.done = n_particles == 0
        self.converged = True
        self.rows = None if rows is None else np.asarray(rows)
        self.micrographs = micrographs
        self.defocus = None if defocus is None else np.asarray(defocus, float).copy()
        self.deviation = None  # the particles' deviations from their micrograph
        self.defocus_solution: JointSolution | None = None
        # the joint steps with the Hessian's phase terms (settings.newton_defocus) until one
        # of them does not contract (after the box-periodic first pass, a window-aware step
        # against the one before); then Gauss-Newton's (a safeguard, in step())
        self.newton = bool(settings.newton_defocus)
        self._last_dz_step = np.inf
        self._prev_joint_dz = np.inf  # the last joint full pass's defocus step (A)
        if settings.levels.active and (self.rows is None or self.defocus is None):
            raise ValueError("refining the defocus needs the group's rows and defocus")
        k = len(settings.aberrations)
        if k and optics is None:
            raise ValueError("refining aberrations needs the group's optics")
        self.optics_in = optics
        self.optics = optics
        self.aberration = np.zeros(k)  # change from the input, in each parameter's unit
        self.aberration_cov = np.full((k, k), np.nan)
        self.aberration_mag_corr = np.full(k, np.nan)
        self.aberration_maps: np.ndarray | None = None  # of the first pass with them

    # ---------------------------------------------------------------- the next pass
    def group_pass(self) -> GroupPass:
        """This group's part of the next pass's specification."""
        s = self.settings
        second = (
            self.curvature_every
            if s.fit_aniso and s.relinearise and self.phase in ("full", "check") and not s.joint
            else 0
        )
        refine = s.levels.active and self.phase in ("full", "check")
        aberr = len(s.aberrations) and self.phase == "full"
        periodic = (s.warm_periodic and self.phase == "warm" and not self.warm_windowed) or (
            self.coarse_pass_next
        )
        return GroupPass(
            mag=self.mag.copy(),
            ctf_mag=None if s.ctf_moves else self.mag_in.copy(),
            # the check pass: the full pass's weights (its system is compared with that
            # pass's second-order prediction)
            noise=self._check_base.noise if self.phase == "check" else self.noise,
            window_pad=1 if periodic else self.window_pad,
            second_order=second,
            rows=self.rows if refine else None,
            defocus=self.defocus.copy() if refine else None,
            optics=self.optics if len(s.aberrations) else None,
            aberrations=s.aberrations if aberr else None,
            lean=s.lean_warm and self.phase == "warm",
            defocus_profile=self.defocus_search_next or (periodic and self.probe_next),
            # the displacement plot shows the first pass (at the input M)
            pixel_maps=self.first_stats is None,
            # the box-periodic first pass's step does not use the local models' columns
            extended=not self.coarse_pass_next,
            lean_hessian=s.lean_hessian and self.phase == "full",
        )

    @property
    def probe_next(self) -> bool:
        """The next (warm, box-periodic) pass probes the input defocus with the defocus
        search: the fit would make a box-periodic first full pass with the search
        (``settings.linear_start_probe``), or it holds the defocus
        (``settings.held_defocus_probe``)."""
        s = self.settings
        joint = (
            s.linear_start_probe
            and s.periodic_first_pass
            and s.defocus_search
            and s.levels.defocus == "particle"
            and self.window_pad > 1
            and s.max_iter > 1
        )
        held = s.held_defocus_probe and s.fit_aniso and not s.levels.active
        return bool((joint or held) and self.phase == "warm" and not self.warm_windowed)

    @property
    def defocus_search_next(self) -> bool:
        """The next pass searches each particle's defocus on its likelihood
        (``settings.defocus_search``, :mod:`cryomag.fit.defocus_profile`): the first full pass
        of a fit with the defocus per particle, when box-periodic (with a window: the coarse
        pass; without one: every pass is)."""
        s = self.settings
        return bool(
            s.defocus_search
            and s.levels.defocus == "particle"
            and self.phase == "full"
            and self.counts["full"] == 0
            and (self.window_pad == 1 or self.coarse_pass_next)
        )

    @property
    def coarse_pass_next(self) -> bool:
        """The next pass is a joint fit's first full pass, made with the box-periodic model
        (``settings.periodic_first_pass``): its large defocus step only brings the
        window-aware passes after it into their linear range. Never the last pass
        ``max_iter`` allows."""
        s = self.settings
        return bool(
            s.periodic_first_pass
            and s.joint
            and self.window_pad > 1
            and self.phase == "full"
            and self.counts["full"] == 0
            and s.max_iter > 1
            and not self.linear_start
        )

    # ---------------------------------------------------------------- one step
    def step(self, st: GroupStatistics, n_used: int) -> None:
        """Take the Gauss-Newton step of a pass's statistics ``st`` over ``n_used``
        particles, and decide whether the group is done."""
        s = self.settings
        if self.phase == "check":
            if s.joint:
                self._joint_check_step(st)
            else:
                self._check_step(st)
            return
        coarse = self.coarse_pass_next
        relaxed, self.relaxed_next = self.relaxed_next, False
        reach_dz = FINAL_STEP_AFTER_PERIODIC if relaxed else 1.0
        reach = FINAL_M_STEP_AFTER_LINEAR_START if relaxed and self.linear_start else reach_dz
        st_joint = st
        if len(s.aberrations) and self.phase == "full":  # the pass had their columns
            st = st.without_aberrations(len(s.aberrations))
            if self.aberration_maps is None and st_joint.pix_aberr.size:
                self.aberration_maps = np.array(st_joint.pix_aberr)
        if self.first_stats is None:
            self.first_stats = st
        # the first pass weights by the images' own power; later ones by the residuals'
        weights_from_residuals = self.first_stats is not st
        noise_used = self.noise
        self.noise = st.noise_power()
        kind = self.phase
        self.counts[kind] += 1
        if kind == "full":
            self.stats = st
        if not s.fits_anything:
            self.done = True
            return
        self.mag_lin = self.mag.copy()
        rel = None
        dz_step = None
        check_next = False
        if kind == "full" and s.joint:
            upd, dz_step, ab_done = self._joint_step(st_joint)
            if self.newton and dz_step > self._last_dz_step:
                # a step with the phase terms that grew: a coupling they leave out may make
                # them overshoot; Gauss-Newton's steps from here (the same fixed point)
                self.newton = False
                log.info(
                    "group %d: the defocus step grew (%.3g -> %.3g A): Gauss-Newton steps "
                    "from here",
                    self.group,
                    self._last_dz_step,
                    dz_step,
                )
            # the window-aware steps are compared among themselves
            self._last_dz_step = np.inf if coarse else dz_step
            steps, path = [float(np.abs(upd.delta).max())], [upd.delta]
            done = (
                (steps[0] < reach * s.tol or not s.fit_aniso)
                and weights_from_residuals
                and ab_done
            )
            if s.levels.active:
                done = done and dz_step < reach_dz * s.defocus_tol_A
            else:
                dz_step = None
            sol = self.defocus_solution
            # the next step predicted from the contraction of the last two (step^2 / last):
            # the check is only worth its pass when that may end the fit
            prev_dz, self._prev_joint_dz = self._prev_joint_dz, dz_step
            predicted_dz = dz_step * dz_step / prev_dz if dz_step is not None else np.inf
            check_next = (
                not done
                and not coarse
                and s.joint_check
                and s.fit_aniso
                and s.levels.active
                and not len(s.aberrations)
                and sol is not None
                and not sol.extra.get("newton", False)
                and weights_from_residuals
                and self.check_available
                and s.check_subset > 0
                and steps[0] < FINAL_M_STEP_AFTER_LINEAR_START * s.tol
                and dz_step < FINAL_STEP_AFTER_PERIODIC * s.defocus_tol_A
                and predicted_dz < s.defocus_tol_A
            )
            if coarse:
                # never the end; the window-aware passes from here. From a linear start (a
                # small defocus step) the first of them may end the fit at the relaxed
                # tolerances; else they keep the strict ones
                done = False
                self.relaxed_next = not s.levels.active or (
                    dz_step < FINAL_STEP_AFTER_PERIODIC * s.defocus_tol_A
                )
        elif kind == "full" and st.has_second_order:
            rel = relinearised_fit(
                st,
                joint_scale=s.joint_scale,
                tol=s.tol,
                accuracy=second_order_accuracy(self.window_pad, self.curvature_every),
            )
            upd = MagUpdate(rel.delta, rel.covariance, int((st.pp > 0).sum()), rel.normal_matrix)
            steps, path = rel.steps, rel.path
            # re-linearisation keeps the pass's weights: its fixed point is the data's only
            # when they came from residuals (the first pass of a group weights by the
            # images' power, which moves M by up to a few standard errors)
            done = rel.converged and rel.trusted and weights_from_residuals
            check_next = (
                not done
                and rel.converged
                and weights_from_residuals
                and self.check_available
                and s.check_subset > 0
            )
        else:
            upd = solve_group(st, joint_scale=s.joint_scale, ctf_moves=s.ctf_moves)
            steps, path = [float(np.abs(upd.delta).max())], [upd.delta]
            done = steps[0] < s.tol
        self.mag = self.mag_lin + upd.delta
        for i, (stp, d) in enumerate(zip(steps, path, strict=True)):
            entry = {
                "iteration": len(self.history) + 1,
                "particles": int(n_used),
                "max_step": stp,
                "M": (self.mag_lin + d).tolist(),
                "relinearised": i > 0,
            }
            if coarse:
                entry["box_periodic"] = True
            if dz_step is not None:
                entry["defocus_step_A"] = dz_step
            self.history.append(entry)
            log.info(
                "group %d iteration %d (%s): max |dM| = %.2e%s",
                self.group,
                len(self.history),
                "re-linearised from the statistics"
                if i
                else kind + (" box-periodic" if coarse else ""),
                stp,
                "" if dz_step is None else f", defocus step {dz_step:.2f} A",
            )
        if rel is not None:
            log.info(
                "group %d: remainder of the second-order model %.1e (%s)",
                self.group,
                rel.remainder,
                "converged" if done else "another pass",
            )
        step = steps[-1]
        if kind == "warm":
            if st.dz_profile is not None and np.any(st.dz_profile[:, 1] > 0):
                mics = None
                if self.micrographs is not None and self.rows is not None:
                    mics = np.asarray(self.micrographs)[np.searchsorted(self.rows, st.rows)]
                self.probe_z = defocus_probe_z(st.dz_profile, mics)
                self.history[-1]["defocus_probe_z"] = self.probe_z
            limit = max(s.warm_tol, s.tol)
            last, self.warm_step = self.warm_step, step
            contracting = np.isfinite(last) and step < 0.5 * last
            predicted = 2 * step * step / last if contracting else np.inf
            if self.warm_windowed:
                self._start_full()
            elif (
                step < limit
                or (s.warm_predicted_stop and predicted < limit)
                or self.counts["warm"] >= s.max_iter
            ):
                if s.warm_periodic and self.window_pad > 1 and s.warm_window_pass:
                    self.warm_windowed = True  # one subset pass with the window, then full
                else:
                    self._start_full()
            return
        self.update = upd
        if check_next and s.joint:
            # a pass over the check subset at the new state decides
            self._check_base = _CheckBase(st_joint, upd.delta, noise_used,
                                          self.defocus_solution)  # fmt: skip
            self.phase = "check"
            log.info("group %d: the joint step is checked on a subset", self.group)
        elif check_next:
            # a pass over the check subset at the re-linearised M decides
            self._check_base = _CheckBase(st, rel.delta, noise_used)
            self.phase = "check"
            log.info("group %d: the re-linearised M is checked on a subset", self.group)
        elif done:
            self.done = True
        elif self.counts["full"] >= s.max_iter:
            self.done = True
            if s.tol <= 0:  # a fixed number of passes was asked for, not convergence
                log.info("group %d: the requested %d passes (tol 0) done", self.group, s.max_iter)
                return
            log.warning(
                "group %d: not converged after %d passes (last |dM| = %.1e > tol %.0e)",
                self.group,
                s.max_iter,
                step,
                s.tol,
            )
            self.converged = False

    def _check_step(self, st: GroupStatistics) -> None:
        """The check pass's step (:func:`cryomag.fit.relinearise.subset_check`): done when
        the step a full pass would take, plus twice its sampling error, is below ``tol``;
        else a full pass at the corrected M (or, after ``max_iter`` full passes, not
        converged)."""
        s = self.settings
        base, self._check_base = self._check_base, None
        full_st, delta = base.stats, base.delta
        self.counts["check"] += 1
        self.phase = "full"
        chk = subset_check(full_st, st, delta, self.curvature_every, s.joint_scale)
        usable = chk.n_used > 0 and bool(np.all(np.isfinite(chk.step)))
        bound = (
            float(np.max(np.abs(chk.step) + 2 * chk.step_error)) if usable else float("inf")
        )
        if usable:
            self.mag = self.mag + chk.step.reshape(2, 2)
            upd = self.update
            self.update = MagUpdate(np.asarray(delta) + chk.step.reshape(2, 2), upd.covariance,
                                    upd.n_particles, upd.normal_matrix)  # fmt: skip
        step = float(np.abs(chk.step).max()) if usable else float("inf")
        self._record_check(len(st.rows), step, bound)
        log.info(
            "group %d iteration %d (check on %d particles): max |dM| = %.2e, with twice its "
            "sampling error %.2e (%s)",
            self.group,
            len(self.history),
            chk.n_used,
            step,
            bound,
            "converged" if bound < s.tol else "another pass",
        )
        self._end_check(bound < s.tol, f"the check's step {bound:.1e} > tol {s.tol:.0e}")

    def _record_check(self, n: int, step: float, bound: float, **extra) -> None:
        """The history entry of a check pass over ``n`` particles."""
        self.history.append(
            {
                "iteration": len(self.history) + 1,
                "particles": int(n),
                "max_step": step,
                "M": self.mag.tolist(),
                "relinearised": False,
                "check": True,
                "check_bound": bound,
                **extra,
            }
        )

    def _end_check(self, ok: bool, why: str) -> None:
        """After a check pass: done when ``ok``; else another full pass, or, after
        ``max_iter`` full passes, not converged (``why`` says by how much)."""
        if ok:
            self.done = True
        elif self.counts["full"] >= self.settings.max_iter:
            self.done = True
            self.converged = False
            log.warning(
                "group %d: not converged after %d passes (%s)",
                self.group,
                self.settings.max_iter,
                why,
            )

    def _joint_check_step(self, st: GroupStatistics) -> None:
        """The check pass of a joint step (:func:`cryomag.fit.defocus.joint_check`): done
        when the M step a full pass would take, plus twice its sampling error, is below
        ``tol`` and its defocus step (the group's and micrographs' part plus twice its
        sampling error) below ``defocus_tol_A`` (the state stays the joint step's, as after
        a last full pass); else a full pass at that state."""
        s = self.settings
        base, self._check_base = self._check_base, None
        full_st, delta, sol = base.stats, base.delta, base.solution
        self.counts["check"] += 1
        self.phase = "full"
        chk = joint_check(
            full_st,
            st,
            self.micrographs if self.micrographs is not None else np.zeros(len(full_st.rows)),
            s.levels,
            sol,
            delta,
            self.deviation,
            fit_mag=s.fit_aniso,
            ctf_moves=s.ctf_moves,
        )
        bound = float(np.max(np.abs(chk.mag_step) + 2 * chk.mag_step_error))
        usable = chk.n_used > 0 and np.isfinite(bound) and np.isfinite(chk.defocus_bound)
        ok = usable and bound < s.tol and chk.defocus_bound < s.defocus_tol_A
        self._record_check(
            len(st.rows),
            float(np.abs(chk.mag_step).max()) if usable else float("inf"),
            bound if usable else float("inf"),
            defocus_step_A=chk.defocus_step,
            defocus_check_bound_A=chk.defocus_bound,
        )
        log.info(
            "group %d iteration %d (check on %d particles): a full pass would step |dM| "
            "%.2e (with twice its sampling error %.2e), the defocus by %.2f A (%.2f A) (%s)",
            self.group,
            len(self.history),
            chk.n_used,
            float(np.abs(chk.mag_step).max()),
            bound,
            chk.defocus_step,
            chk.defocus_bound,
            "converged" if ok else "another pass",
        )
        self._end_check(
            ok, f"the check's steps: M {bound:.1e}, defocus {chk.defocus_bound:.2f} A"
        )

    def _start_full(self) -> None:
        """Hand over from the warm start to the full passes; after a probe that found the
        input defocus within the noise (:data:`LINEAR_START_Z`), without the box-periodic
        first pass, the first full pass at the relaxed tolerances."""
        self.phase = "full"
        if self.settings.levels.active and self.probe_z < LINEAR_START_Z:  # NaN: no probe
            self.linear_start = True
            self.relaxed_next = True
            log.info(
                "group %d: the input defocus is within the noise of the warm subset (rms %.2f "
                "standard errors): no box-periodic first pass",
                self.group,
                self.probe_z,
            )

    def _joint_step(self, st: GroupStatistics) -> tuple[MagUpdate, float, bool]:
        """One joint step of M, the defocus and the aberrations
        (:func:`cryomag.fit.defocus.solve_joint`); updates the particles' defocus and the
        group's optics. Returns M's update, the defocus step (A) and whether every
        aberration step was below its tolerance."""
        s = self.settings
        k = len(s.aberrations)
        sol = solve_joint(
            st,
            self.micrographs if self.micrographs is not None else np.zeros(len(st.rows)),
            s.levels,
            fit_mag=s.fit_aniso,
            ctf_moves=s.ctf_moves,
            deviation=self.deviation,
            n_aberration=k,
            # a pass with the defocus search (zeros in the others)
            profile=st.dz_profile if np.any(st.dz_profile[:, 1] > 0) else None,
            newton_defocus=self.newton,
        )
        ab_done = True
        if k:
            self.aberration = self.aberration + sol.aberration
            self.optics = s.aberrations.apply(self.optics, sol.aberration)
            self.aberration_cov = sol.aberration_cov
            se = np.sqrt(np.clip(np.diag(sol.aberration_cov), 0, None))
            ab_done = bool(np.all(np.abs(sol.aberration) <= s.aberration_tol * se))
            if s.fit_aniso and sol.theta_cov is not None:
                v = np.eye(2).reshape(4) / 2.0
                cov = sol.theta_cov
                var_v = v @ cov[:4, :4] @ v
                with np.errstate(invalid="ignore", divide="ignore"):
                    self.aberration_mag_corr = (v @ cov[:4, 4 : 4 + k]) / np.sqrt(
                        var_v * np.diag(cov)[4 : 4 + k]
                    )
            log.info(
                "group %d aberrations: %s",
                self.group,
                ", ".join(f"{n} {v:+.4g}" for n, v in zip(s.aberrations.names, self.aberration,
                                                          strict=True)),
            )  # fmt: skip
        n_sig = int((st.pp > 0).sum())
        upd = MagUpdate(sol.delta_mag, sol.mag_covariance, n_sig, sol.normal_matrix)
        if not s.levels.active:
            self.defocus_solution = None
            return upd, 0.0, ab_done
        upd_dz = self._defocus_update(sol)
        return upd, upd_dz, ab_done

    def _defocus_update(self, sol: JointSolution) -> float:
        """Apply a joint step's defocus changes; returns the defocus step (A)."""
        from cryomag.physics.ctf import defocus_from_matrix, defocus_matrix

        old_dev = self.deviation
        adef = defocus_matrix(self.defocus[:, 0], self.defocus[:, 1], self.defocus[:, 2])
        da = sol.delta_a
        adef[:, 0, 0] += da[:, 0]
        adef[:, 0, 1] += da[:, 1]
        adef[:, 1, 0] += da[:, 1]
        adef[:, 1, 1] += da[:, 2]
        self.defocus = np.stack(defocus_from_matrix(adef), axis=1)
        self.deviation = sol.particle
        self.defocus_solution = sol
        parts = [sol.level_step]
        if sol.particle.shape[1]:
            prev = np.zeros_like(sol.particle) if old_dev is None else old_dev
            parts.append(float(np.sqrt(np.mean((sol.particle - prev) ** 2))))
        return float(max(parts))

    # ---------------------------------------------------------------- the result
    def _prior_steps(self) -> int | None:
        """The steps of the last joint step's prior of the particles' deviations when they
        did not converge (None otherwise)."""
        sol = self.defocus_solution
        if sol is None or not sol.particle.shape[1] or sol.prior_converged:
            return None
        return int(sol.prior_steps)

    def result(self, band: Band) -> GroupResult:
        """The group's result (after :func:`iterate`), with its quality verdict."""
        upd = self.update
        err = upd.standard_error if upd else np.zeros((2, 2))
        cov = upd.covariance if upd else np.zeros((4, 4))
        quality = assess_group(
            self.stats,
            self.mag,
            cov if upd and self.settings.fit_aniso else None,
            upd.normal_matrix if upd else None,
            self.converged,
            len(self.history),
            fit_aniso=self.settings.fit_aniso,
            # the warm start's probe of a held defocus (of a refined one: the linear start)
            held_defocus_z=np.nan if self.settings.levels.active else self.probe_z,
            prior_steps=self._prior_steps(),
        )
        if not self.settings.fit_aniso:  # M held: no error of its own
            err, cov = np.zeros((2, 2)), np.zeros((4, 4))
        elif quality.failed and upd is not None:  # no standard error from a failed fit
            err = np.full((2, 2), np.nan)
            cov = np.full((4, 4), np.nan)
        return GroupResult(
            group=self.group,
            n_particles=self.n_particles,
            mag_in=self.mag_in,
            mag=self.mag.copy(),
            mag_error=err,
            covariance=cov,
            iterations=len(self.history),
            band_A=(1 / band.kmin if band.kmin > 0 else np.inf, 1 / band.kmax),
            chi2=self.stats.chi2_per_pixel(),
            history=self.history,
            mag_lin=self.mag_lin,
            converged=self.converged,
            quality=quality,
            defocus=self.defocus,
            defocus_solution=self.defocus_solution,
            rows=self.rows,
            aberration_terms=self.settings.aberrations if len(self.settings.aberrations) else None,
            aberration=self.aberration.copy(),
            aberration_cov=self.aberration_cov,
            aberration_mag_corr=self.aberration_mag_corr,
            optics=self.optics,
            optics_in=self.optics_in,
            aberration_maps=self.aberration_maps,
        )


def defocus_probe_z(profile: np.ndarray, micrographs: np.ndarray | None = None) -> float:
    """How far the input defocus is from the data's, in standard errors: the rms of the
    particles' searched defocus changes in their own standard errors, and (``micrographs``
    given, (N,)) the rms of each micrograph's precision-weighted mean change in its
    standard error, whichever is larger -- a micrograph's error stays visible when its
    particles are weak (each alone within its noise). ``profile`` (N, 2) of (change (A),
    curvature of rr / 2 there (1/A^2)) from :func:`cryomag.fit.defocus_profile.search`;
    particles without a result (curvature 0) are left out (NaN when none has one)."""
    dz, curv = np.asarray(profile, float).T
    use = curv > 0
    if not np.any(use):
        return float("nan")
    z = float(np.sqrt(np.mean(dz[use] ** 2 * curv[use])))
    if micrographs is not None:
        _, inv = np.unique(np.asarray(micrographs)[use], return_inverse=True)
        w = np.bincount(inv, curv[use])
        z_mic = np.bincount(inv, curv[use] * dz[use]) / np.sqrt(w)
        z = max(z, float(np.sqrt(np.mean(z_mic**2))))
    return z


def warm_subsets(group_rows: dict[int, np.ndarray], size: int, seed: int = 20261126) -> dict:
    """The fixed random warm-start subset of each group with more than twice ``size``
    particles (sorted rows), by group number; {} when ``size`` is 0."""
    if size <= 0:
        return {}
    rng = np.random.default_rng(seed)
    out = {}
    for g in sorted(group_rows):
        rows = group_rows[g]
        if len(rows) > 2 * size:
            out[g] = np.sort(rng.choice(rows, size, replace=False))
    return out


def check_subsets(group_rows: dict[int, np.ndarray], size: int, stride: int) -> dict:
    """Each group's check subset (:attr:`GaussNewtonSettings.check_subset`): ``size`` of its
    rows with curvature sums (row % stride == 0, the group's :func:`curvature_stride` of
    ``stride``), evenly spaced (sorted), for the groups with more than twice ``size``
    particles and at least ``size`` such rows; {} when ``size`` is 0."""
    out = {}
    if size <= 0:
        return out
    for g in sorted(group_rows):
        rows = np.asarray(group_rows[g])
        every = curvature_stride(stride, len(rows), size)
        eligible = rows[rows % every == 0]
        if len(rows) > 2 * size and len(eligible) >= size:
            pick = np.unique(np.linspace(0, len(eligible) - 1, size).round().astype(int))
            out[g] = np.sort(eligible[pick])
    return out


def joint_check_subsets(
    group_rows: dict[int, np.ndarray], micrographs: np.ndarray, size: int
) -> dict:
    """Each group's check subset for the joint fits (:attr:`GaussNewtonSettings.joint_check`):
    from every micrograph its share of ``size`` particles, at least one (evenly spaced in its
    rows), so that every micrograph's defocus step is seen; only for groups of more than
    twice ``size`` particles where that takes at most half the group. {} when ``size`` is 0.

    ``micrographs``: the micrograph of every particle row (all groups)."""
    out = {}
    if size <= 0:
        return out
    mics = np.asarray(micrographs)
    for g in sorted(group_rows):
        rows = np.sort(np.asarray(group_rows[g]))
        if len(rows) <= 2 * size:
            continue
        labels, inv = np.unique(mics[rows], return_inverse=True)
        pick = []
        for u in range(len(labels)):
            own = rows[inv == u]
            k = max(1, int(round(size * len(own) / len(rows))))
            pick.append(own[np.unique(np.linspace(0, len(own) - 1, k).round().astype(int))])
        sub = np.sort(np.concatenate(pick))
        if len(sub) <= len(rows) // 2:
            out[g] = sub
    return out


def iterate(
    fits: dict[int, GroupFit],
    chunks: dict[int, dict[str, list]],
    run_pass: Callable[[PassSpec, list, str], dict[int, GroupStatistics]],
    spec: PassSpec,
) -> int:
    """Run passes until every group's fit is done.

    Parameters
    ----------
    fits : dict of int to GroupFit
        By optics group number.
    chunks : dict of int to {"warm": [...], "full": [...], "check": [...]}
        Each group's chunks for its warm, full and check phases (``"check"`` needed only
        for the groups built with ``check=True``).
    run_pass : callable
        ``run_pass(spec, chunks, label) -> {group: GroupStatistics}``.
    spec : PassSpec
        The settings shared by every pass; its ``groups`` are filled from the fits.

    Returns
    -------
    int
        Particles processed over all passes (particle passes).
    """
    particle_passes = 0
    it = 0
    while not all(f.done for f in fits.values()):
        todo = []
        for g, f in fits.items():
            if not f.done:
                todo += chunks[g][f.phase]
        it += 1
        groups = {g: f.group_pass() for g, f in fits.items() if not f.done}
        particle_passes += sum(len(c) for c in todo)
        stats = run_pass(dataclasses.replace(spec, groups=groups), todo, f"pass {it}")
        for g, st in stats.items():
            n_used = int(sum(len(c.rows) for c in todo if c.group == g))
            fits[g].step(st, n_used)
    return particle_passes
