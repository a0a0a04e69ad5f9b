"""``cryomag estimate``: per-particle contrast scale and per-group magnification.

The workflow only orchestrates: load the inputs -> bands, padding and first noise model
(:mod:`cryomag.fit.bands`) -> Gauss-Newton per optics group (:mod:`cryomag.fit.gauss_newton`)
over passes of :class:`cryomag.fit.passes.StatisticsPass` mapped by an executor
(:mod:`cryomag.execution`) and reduced as they arrive (:class:`StatisticsReducer`) -> scales,
M with standard errors, adapted defocus, local models -> outputs
(:mod:`cryomag.workflows.outputs`).

Defocus semantics (as RELION's CtfRefine): the CTF as the input models it (its defocus at its
current rlnMagMat, identity when absent) is held fixed in the observed frame while M changes;
afterwards each particle's astigmatism is re-expressed, Adef <- inc^-T Adef inc^-1 with
inc = M_new M_in^-1, so that its CTF is unchanged (per particle, exactly; RELION averages the
astigmatism per micrograph by default). The Cs term is not compensated (as in RELION).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryomag.execution import Executor, LocalExecutor, make_chunks, run_executor
from cryomag.fit.aberrations import AberrationTerms, parse_aberrations
from cryomag.fit.bands import auto_window_pad, initial_noise, make_bands
from cryomag.fit.defocus import LEVELS, DefocusLevels
from cryomag.fit.gauss_newton import (
    GaussNewtonSettings,
    GroupFit,
    GroupResult,
    check_subsets,
    iterate,
    joint_check_subsets,
    warm_subsets,
)
from cryomag.fit.passes import PassSpec, StatisticsPass
from cryomag.fit.quality import overall
from cryomag.fit.scale import ScaleResult, fit_scales
from cryomag.fit.statistics import GroupStatistics, StatisticsReducer
from cryomag.model.particles import ParticleDataError, ParticleSet
from cryomag.physics.reference import MapReference
from cryomag.workflows.local_fits import LOCAL_FITS, fit_local
from cryomag.workflows.runlog import run_log

__all__ = [
    "EstimateOptions",
    "EstimateResult",
    "GroupResult",
    "estimate",
    "load_references",
    "run_estimate",
]

log = logging.getLogger("cryomag")

FITS = ("scale", "aniso", "particle", "micrograph", "defocus")

#: Modules spawned workers import as they start (numpy, scipy, finufft and the statistics
#: kernel: about a second per worker that would otherwise fall in the first pass; forked
#: workers have the driver's).
WORKER_PRELOAD = ("cryomag.fit.accumulate",)


#: Below this box (px) local models use the exact 3D gradient by default (see
#: ``EstimateOptions.exact_gradient``).
EXACT_GRADIENT_BELOW_BOX = 96


def default_exact_gradient(fit: tuple, boxes_px: np.ndarray) -> bool:
    """Whether the exact 3D gradient is the default: local models fitted on a box below
    :data:`EXACT_GRADIENT_BELOW_BOX` px (``EstimateOptions.exact_gradient``)."""
    local = bool(set(fit) & set(LOCAL_FITS))
    return local and int(np.min(boxes_px)) < EXACT_GRADIENT_BELOW_BOX


@dataclass
class EstimateOptions:
    """Settings of an estimation run.

    Attributes
    ----------
    fit : tuple of str
        Subset of ``("scale", "aniso", "particle", "micrograph", "defocus")``: per-particle
        contrast scale, per-group matrix M, and the local models fitted afterwards from the
        stored statistics (see :mod:`cryomag.workflows.local_fits`).
    low_res_A : float
        Low-frequency cut (A); frequencies below 1 / low_res_A are not used (default 20 A).
    high_res_A : float or None
        High-frequency limit (A). Default: the FSC = 0.143 resolution of the half maps when
        given, else 0.9 of the smaller of the particles' and the reference's Nyquist.
    max_iter : int
        Gauss-Newton iterations (re-linearisations) at most.
    tol : float
        Stop when every element of every group's update is below this.
    chunk_size : int
        Particles per chunk (see :mod:`cryomag.fit.passes` for the memory). The map's
        upsampled grid is made once per worker (:class:`cryomag.physics.reference.MapReference`),
        so chunks only need to be large enough to amortise a task's overhead.
    joint_scale : bool
        Fit M jointly with the per-particle scales (True) or with scales held (RELION).
    eps : float
        Accuracy of the Fourier-slice evaluation (finufft eps; single precision at >= 1e-5).
        Errors of the reference evaluation (relative to the slice's norm) are far below the
        noise of any particle, and random in k, so they do not bias the fits; the forward
        model itself is accurate to 1e-3 per shell at eps <= 1e-6 (tests/test_physics.py).
        The efficiency against the Cramer-Rao bound is measured at the default 1e-3
        (bench/bench_efficiency.py).
    nthreads : int
        Threads for the Fourier-slice evaluation (0 = all cores).
    defocus_frame : str
        ``"measured"`` (default, RELION's CtfRefine semantics): the defocus was measured on
        the distorted images, so the CTF's defocus term is held fixed as the input models it
        while M changes, and the astigmatism is re-expressed afterwards. ``"true"``: the
        defocus is already in the specimen frame (e.g. simulated truth, or a refinement that
        corrected it): the whole CTF moves with M (CTF(M k)), its derivative enters the fit,
        and the defocus is written unchanged.
    window_pad : int
        1: box-periodic prediction (RELION's). 2 (or more): window-aware prediction, made on a
        box that many times larger and cut to the particle box in real space, so that the
        signal the CTF delocalises out of the box is modelled (a pass at pad 2 costs about
        2.3x the box-periodic one with the defaults, ``upsample_slices`` and
        ``adaptive_window``: box 128 at 0.5-1.6 um; 3.8x with neither; issue 14).
        0 (default): automatic per optics group, see :func:`auto_window_pad`. The
        box-periodic model biases magnification when the CTF moves signal out of the box:
        measured on simulated data (box 48 at 1.6 A, defocus 0.3-1.2 um) it recovered only
        59 % of a defocus-dependent magnification, the window-aware model 92 %.
    warm_start : int
        Particles per optics group for the first Gauss-Newton iterations (0: every pass uses
        every particle). A group with more than twice this many particles first iterates on
        a fixed random subset of this size until its update is below ``warm_tol`` (the
        non-linear part of a distortion of several percent is removed there, at a fraction of
        the cost), then on all particles until the update is below ``tol``. The result is the
        all-particle fixed point either way; only the number of full passes changes (with
        ``relinearise``, typically one; the subset's own error, ~1e-4 for 500 particles at
        SNR 0.05, is well inside the reach of the second-order model).
    warm_tol : float
        Update below which the subset iterations hand over to full passes.
    warm_periodic : bool
        The warm-start passes use the box-periodic model whatever the window padding (default
        True): they only choose where the full passes linearise, and the full (window-aware)
        passes end at the same fixed point (bench/RESULTS.md, issue 14).
    warm_window_pass : bool
        With ``warm_periodic``, one more subset pass with the window before the full passes
        (its residuals weight them). False (default): the full passes start from the
        periodic warm start, weighted by its residuals (M within 0.003 standard errors of
        the other way on 5,000 particles of box 128; bench/RESULTS.md, issue 14).
    warm_predicted_stop : bool
        The warm start hands over one subset pass early when its contracting steps
        predict the next below ``warm_tol`` (default True;
        :class:`cryomag.fit.gauss_newton.GaussNewtonSettings`).
    lean_warm : bool
        Warm-start passes compute only what the group fit of M needs, without the exact
        gradient and the local-model and defocus columns (default True; those come from the
        full passes alone).
    periodic_first_pass : bool
        With the defocus or aberrations refined and a window, the first full pass uses the
        box-periodic model (default True): it takes the large first defocus step at about a
        third of a window-aware pass's cost; the window-aware passes after it end at the
        same fixed point, and the first of them may end the fit with a step of up to
        :data:`cryomag.fit.gauss_newton.FINAL_STEP_AFTER_PERIODIC` tolerances
        (bench/RESULTS.md, issue 14).
    defocus_search : bool
        With the defocus refined per particle, the first full pass (box-periodic) searches
        each particle's isotropic defocus on its likelihood and the joint step starts from
        there (default True; :mod:`cryomag.fit.defocus_profile`): particles far from their
        micrograph's written defocus no longer crawl there one linear step per pass.
    linear_start_probe : bool
        With those two: the warm start's passes also search their particles' defocus, and
        when the input defocus is within the noise (e.g. each particle's own, after a
        per-particle CTF refinement) the box-periodic first pass is left out (default True;
        :attr:`cryomag.fit.gauss_newton.GaussNewtonSettings.linear_start_probe`).
    check_subset : int
        When a full pass's re-linearised M cannot be trusted by its remainder estimate, a
        pass over this many particles at that M measures the remainder instead of a second
        full pass (default 500; 0: the full pass;
        :attr:`cryomag.fit.gauss_newton.GaussNewtonSettings.check_subset`). Measured on
        5,000 particles of box 128 with micrograph-level defocus: 0.035 standard errors
        from the two-pass result, the fit 1.6x faster (bench/RESULTS.md, issue 14).
    joint_check : bool
        With the defocus refined in Gauss-Newton steps (the defocus per particle, or
        ``newton_defocus`` off) and no aberrations fitted, a window-aware step that does
        not end the fit but is near its tolerances is checked by a pass over
        ``check_subset`` particles at the new state instead of a full pass (default True;
        :attr:`cryomag.fit.gauss_newton.GaussNewtonSettings.joint_check`). Measured on
        5,000 particles of box 128 with micrograph-level defocus and heights, the local
        models: 3 full passes -> 2 and the check, M 0.04 standard errors and the particles'
        defocus 0.03 (rms) from the three-pass result (bench/RESULTS.md, issue 14).
    lean_hessian : bool
        The window-aware group fit's full passes form every particle's gradient exactly
        and the Gauss-Newton matrix exactly on every ``curvature_every``-th particle, the
        others' by a control variate (default True; the fixed point is the exact model's;
        :attr:`cryomag.fit.gauss_newton.GaussNewtonSettings.lean_hessian`). Measured on
        5,000 particles of box 128: the group's reduced matrix within 0.2 %, M 0.007
        standard errors from the exact matrix's fit, the full pass's kernel 0.82-0.89x the
        time (bench/RESULTS.md, issue 14).
    held_defocus_probe : bool
        Holding the defocus, the warm start's box-periodic passes search each subset
        particle's defocus, and the verdict is "warning" when the input defocus disagrees
        with the particles (default True; needs a warm start;
        :attr:`cryomag.fit.gauss_newton.GaussNewtonSettings.held_defocus_probe`).
    newton_defocus : bool
        With the defocus fitted per group or micrograph (none per particle), the joint
        steps add the Hessian's terms through the CTF's phase (the particles' heights,
        residuals of such a model, made Gauss-Newton's steps ~0.56 times too short); same
        fixed point and standard errors, fewer passes (default True; False: Gauss-Newton;
        :attr:`cryomag.fit.gauss_newton.GaussNewtonSettings.newton_defocus`). Measured on
        5,000 particles of box 128 with micrograph-level defocus and heights, the defocus
        per micrograph: 8 -> 3 full passes (bench/RESULTS.md, issue 14).
    upsample_slices : bool
        The window-aware model (``window_pad`` > 1) evaluates the reference on the
        particle's own grid and upsamples the slice to the padded grid by zero-padding its
        image (:class:`cryomag.fit.accumulate.KernelOptions`), pad^2 times fewer 3D points
        (default True). Measured on 5,000 particles of box 128 (pad 2): M moved by at most
        0.07 standard errors against the 3D evaluation on the padded grid, the fit 1.35x
        faster (bench/RESULTS.md, issue 14). False: the padded grid's 3D evaluation.
    adaptive_window : bool
        With ``upsample_slices``: each particle is predicted on the smallest padded grid
        that holds its own delocalised signal (its defocus; at most ``window_pad`` times the
        box; :func:`cryomag.physics.grid.padded_box_px`) instead of the group's largest
        (default True). False: every particle on ``window_pad`` times the box.
    exact_gradient : bool or None
        How the reference's frequency gradient is evaluated. False: from the slice image
        (one 3D transform per particle; the group fit iterates to the same fixed point and its
        standard errors agree with the exact ones within 2 %). True: exactly, with three more
        3D transforms (the local models' passes about 1.7x slower). None (default): exact
        only when local models (particle, micrograph, defocus) are fitted on a box below
        :data:`EXACT_GRADIENT_BELOW_BOX` px: local models are single linear steps from the
        group solution, and on small boxes the image-based gradient reads their deviations
        low. Measured, per-micrograph slope on the truth (100 micrographs, the same data
        both ways): box 48, window pad 2: 0.980 image vs 0.985 exact; box 128 at SNR 0.05:
        1.0027 vs 1.0032 (bench/RESULTS.md, issue 14).
    relinearise : bool
        Full passes also accumulate second-order statistics, and Gauss-Newton re-predicts at
        each updated M from them (:mod:`cryomag.fit.relinearise`) until the update is below
        ``tol``; another pass is made only when the second-order model cannot be trusted
        that far (its estimated remainder above ``tol / 2``). After the warm start one full
        pass then usually suffices. False: every Gauss-Newton iteration is a real pass.
    curvature_every : int
        The second-order sums through the model's second derivatives (which only enter the
        O(|dM|^2) correction of a step) and the exact window-aware matrix from every n-th
        particle, weighted n; 1: from every particle; 0 (default): every 8th in groups of
        5,000 particles or more, else every 4th
        (:func:`cryomag.fit.gauss_newton.curvature_stride`). Measured on 20,000 particles
        (bench/bench_estimate.py's data): n = 4 moved M by at most 2.5e-7 (0.015 standard
        errors; 2 % of the correction) and saved ~10 % of the fit's time; on 5,000 (issue
        14's benchmark) n = 8 instead of 4 moved M by 0.008 standard errors and saved ~4 % of
        the full pass.
    defocus : str
        Level at which the mean defocus is refined jointly with M (:mod:`cryomag.fit.defocus`):
        ``"fixed"``, ``"group"``, ``"micrograph"`` or ``"particle"`` (a micrograph mean plus
        per-particle deviations -- the particles' heights in the ice -- shrunk toward it
        with their spread estimated from the data). ``"auto"`` (default): ``"particle"``
        when local magnification models are fitted (they must not read CTF-estimation error
        or particle heights as magnification), else ``"fixed"`` (the group fit as RELION's
        CtfRefine --fit_aniso).
    astigmatism : str
        Level of the astigmatism (fixed, group, micrograph, particle); ``"auto"``:
        ``"micrograph"`` with local models, else ``"fixed"``.
    defocus_tol_A : float
        With the defocus refined, passes continue until its step is below this (A).
    aberrations : tuple of str
        Optical aberrations refined per optics group jointly with M, the scales and the
        defocus (:func:`cryomag.fit.aberrations.parse_aberrations`: tilt, trefoil, cs,
        tetrafoil, astig4, or odd, even, all); () = none (held as the input has them).
    regroup : str, optional
        New optics groups before the fit (:func:`cryomag.model.grouping.regroup_by`):
        ``column:NAME`` or ``pattern:REGEX`` on the micrograph names (beam-shift groups for
        per-position aberrations); written as the output's optics groups.
    """

    fit: tuple = ("scale", "aniso")
    low_res_A: float = 20.0
    high_res_A: float | None = None
    max_iter: int = 10
    tol: float = 1e-5
    chunk_size: int = 1024
    joint_scale: bool = True
    eps: float = 1e-3
    nthreads: int = 0
    window_pad: int = 0
    defocus_frame: str = "measured"
    warm_start: int = 500
    warm_tol: float = 1e-4
    warm_periodic: bool = True
    warm_window_pass: bool = False
    warm_predicted_stop: bool = True
    lean_warm: bool = True
    periodic_first_pass: bool = True
    defocus_search: bool = True
    linear_start_probe: bool = True
    check_subset: int = 500
    held_defocus_probe: bool = True
    newton_defocus: bool = True
    joint_check: bool = True
    lean_hessian: bool = True
    upsample_slices: bool = True
    adaptive_window: bool = True
    exact_gradient: bool | None = None
    relinearise: bool = True
    curvature_every: int = 0
    defocus: str = "auto"
    astigmatism: str = "auto"
    defocus_tol_A: float = 1.0
    aberrations: tuple = ()
    regroup: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "aberrations", parse_aberrations(self.aberrations))
        if self.defocus_frame not in ("measured", "true"):
            raise ValueError(
                f"defocus_frame must be 'measured' or 'true', got {self.defocus_frame!r}"
            )
        if self.warm_start < 0:
            raise ValueError(f"warm_start must be >= 0 (0 = off), got {self.warm_start}")
        if self.check_subset < 0:
            raise ValueError(f"check_subset must be >= 0 (0 = off), got {self.check_subset}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        bad = set(self.fit) - set(FITS)
        if bad:
            raise ValueError(f"unknown fit(s) {sorted(bad)}; choose from {', '.join(FITS)}")
        for name in ("defocus", "astigmatism"):
            v = getattr(self, name)
            if v != "auto" and v not in LEVELS:
                raise ValueError(
                    f"{name} must be auto or one of {', '.join(LEVELS)}, got {v!r}"
                )
        if not self.defocus_tol_A > 0:
            raise ValueError(f"defocus_tol_A must be > 0, got {self.defocus_tol_A}")

    def defocus_levels(self) -> DefocusLevels:
        """The defocus levels with ``"auto"`` resolved (see the attributes)."""
        local = bool(set(self.fit) & set(LOCAL_FITS))
        dz = self.defocus if self.defocus != "auto" else ("particle" if local else "fixed")
        ast = self.astigmatism
        if ast == "auto":
            ast = "micrograph" if local else "fixed"
        return DefocusLevels(defocus=dz, astigmatism=ast)

    def gauss_newton(self) -> GaussNewtonSettings:
        """The settings of the Gauss-Newton iteration."""
        return GaussNewtonSettings(
            fit_aniso="aniso" in self.fit,
            joint_scale=self.joint_scale,
            ctf_moves=self.defocus_frame == "true",
            tol=self.tol,
            max_iter=self.max_iter,
            warm_tol=self.warm_tol,
            relinearise=self.relinearise,
            curvature_every=self.curvature_every,
            levels=self.defocus_levels(),
            defocus_tol_A=self.defocus_tol_A,
            aberrations=AberrationTerms(self.aberrations),
            warm_periodic=self.warm_periodic,
            warm_window_pass=self.warm_window_pass,
            warm_predicted_stop=self.warm_predicted_stop,
            lean_warm=self.lean_warm,
            periodic_first_pass=self.periodic_first_pass,
            defocus_search=self.defocus_search,
            linear_start_probe=self.linear_start_probe,
            check_subset=self.check_subset,
            held_defocus_probe=self.held_defocus_probe,
            newton_defocus=self.newton_defocus,
            joint_check=self.joint_check,
            lean_hessian=self.lean_hessian,
        )


@dataclass
class EstimateResult:
    """Everything an estimation produced (also written to ``out``).

    ``stats``, ``first_stats`` (the first pass of each group, at the input M) and ``bands``
    are keyed by optics group number.
    """

    particles: ParticleSet
    groups: list[GroupResult]
    scales: ScaleResult
    stats: dict[int, GroupStatistics]
    options: EstimateOptions
    timings: dict
    bands: dict = field(default_factory=dict)
    first_stats: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)
    input_defocus_A: np.ndarray | None = None

    @property
    def verdict(self) -> str:
        """The worst verdict of the groups' fits: ``"ok"``, ``"warning"`` or ``"failed"``
        (:mod:`cryomag.fit.quality`)."""
        return overall(gr.quality for gr in self.groups if gr.quality is not None)

    @property
    def problems(self) -> list[str]:
        """Every finding of the quality checks, one sentence each, naming its group."""
        return [
            f"optics group {gr.group}: {p}"
            for gr in self.groups
            if gr.quality is not None
            for p in gr.quality.problems
        ]


def load_references(
    reference, half_maps=None, mask=None, eps: float = 1e-6, nthreads: int = 0
) -> tuple[dict[int, MapReference], float | None]:
    """Reference(s) by half set (key 0 = the full map) and the FSC=0.143 resolution (A).

    ``reference`` may be a path, a MapReference or None when two half maps are given.
    """
    from cryomag.io import read_map
    from cryomag.io.mrc import check_map_values
    from cryomag.reconstruction.fsc import fsc, resolution_at

    mask_vol = None
    if mask is not None:
        mask_vol, _ = read_map(mask)

    def load(src):
        if isinstance(src, MapReference):
            return src
        vol, apix = read_map(src)
        if mask_vol is not None:
            if mask_vol.shape != vol.shape:
                raise ParticleDataError(
                    f"{mask}: mask shape {mask_vol.shape} differs from map {src} {vol.shape}"
                )
            vol = vol * mask_vol
        check_map_values(vol, f"{src}" + (f" masked by {mask}" if mask is not None else ""))
        return MapReference(vol, apix, eps=eps, nthreads=nthreads), vol

    refs: dict[int, MapReference] = {}
    res = None
    if half_maps:
        h1, v1 = load(half_maps[0])
        h2, v2 = load(half_maps[1])
        refs[1], refs[2] = h1, h2
        freq, curve = fsc(v1, v2, h1.pixel_size_A)
        res = resolution_at(freq, curve, 0.143)
    if reference is not None:
        full = load(reference)
        refs[0] = full if isinstance(full, MapReference) else full[0]
    if not refs:
        raise ValueError("give a reference map or two half maps")
    return refs, res


def _subset_chunks(subsets: dict, n: int, size: int, chunk_size: int) -> list:
    """The chunks of each group's subset (``subsets``: group number -> rows of ``n``
    particles, e.g. :func:`warm_subsets`), two per subset of ``size``: both workers of a
    small cluster busy, one 3D transform each."""
    labels = np.full(n, -1)
    for g, sub in subsets.items():
        labels[sub] = g
    per_chunk = max(1, min(chunk_size, -(-size // 2)))
    return [c for c in make_chunks(labels, per_chunk) if c.group >= 0]


def run_estimate(
    particles: ParticleSet,
    refs: dict[int, MapReference],
    image_source,
    options: EstimateOptions | None = None,
    fsc_res: float | None = None,
    progress: bool = True,
    executor: Executor | None = None,
    scratch=None,
    on_running: Callable[[], None] | None = None,
) -> EstimateResult:
    """The estimation engine on loaded inputs (see :func:`estimate` for files).

    ``executor`` runs the chunks of each pass (:mod:`cryomag.execution`; default: this
    process, synchronously); the result does not depend on it. ``scratch``: a factory of
    allocators for the reduced per-particle arrays of each pass
    (:func:`cryomag.io.stats.scratch_allocator`; default: memory). ``on_running``: called
    once, when the first chunk's result arrives: the passes are under way and this
    process mostly waits for them from then on.
    """
    opts = options or EstimateOptions()
    if opts.exact_gradient is None:  # resolved here, so results.json records what was used
        exact = default_exact_gradient(opts.fit, particles.boxes_px())
        opts = dataclasses.replace(opts, exact_gradient=exact)
    levels = opts.defocus_levels()  # "auto" resolved, so results.json records what was used
    opts = dataclasses.replace(opts, defocus=levels.defocus, astigmatism=levels.astigmatism)
    ps = particles
    ps.validate()
    t0 = time.perf_counter()
    settings = opts.gauss_newton()
    groups = ps.groups_used()
    rows = {g: ps.group_rows(g) for g in groups}
    labels = ps.particle_group_numbers()
    bands = make_bands(
        ps, min(r.nyquist for r in refs.values()), opts.low_res_A, opts.high_res_A, fsc_res
    )
    spec = PassSpec(
        {},
        extended="particle" in opts.fit or settings.ctf_moves,
        exact_gradient=opts.exact_gradient,
        ctf_moves=settings.ctf_moves,
        nthreads=opts.nthreads,
        defocus=levels.active,
        upsample_slices=opts.upsample_slices,
        adaptive_window=opts.adaptive_window,
    )
    images = StatisticsPass(ps, refs, image_source, bands, spec)  # for the first noise model
    full = make_chunks(labels, opts.chunk_size)
    warm = warm_subsets(rows, opts.warm_start) if settings.fit_aniso else {}
    mics_all = ps.micrographs()
    dz_in = ps.defocus_uva()
    warm_chunks = _subset_chunks(warm, len(ps), opts.warm_start, opts.chunk_size)
    check = (
        check_subsets(rows, settings.check_subset, settings.curvature_every)
        if settings.fit_aniso and settings.relinearise and not settings.joint
        else joint_check_subsets(rows, mics_all, settings.check_subset)
        if settings.fit_aniso and settings.joint and settings.joint_check
        else {}
    )
    check_chunks = _subset_chunks(check, len(ps), settings.check_subset, opts.chunk_size)
    chunks, fits = {}, {}
    for g in groups:
        chunks[g] = {
            "full": [c for c in full if c.group == g],
            "warm": [c for c in warm_chunks if c.group == g],
            "check": [c for c in check_chunks if c.group == g],
        }
        pad = opts.window_pad if opts.window_pad > 0 else auto_window_pad(ps, g, bands[g])
        log.info("optics group %d: prediction window padding %d", g, pad)
        first = np.asarray(chunks[g]["full"][0].rows)[:256]
        noise = initial_noise(images.spectra(first), bands[g])
        mag_in = ps.mag_matrix(g)
        fits[g] = GroupFit(
            g, len(rows[g]), mag_in, noise, pad, settings, warm=g in warm, rows=rows[g],
            micrographs=mics_all[rows[g]], defocus=dz_in[rows[g]], optics=ps.optics_params(g),
            check=g in check,
        )  # fmt: skip

    ex = executor or LocalExecutor()
    pass_seconds: list[float] = []  # each pass's wall time, for results.json
    running_hook = [on_running] if on_running is not None else []

    def run_pass(pass_spec: PassSpec, todo: list, label: str) -> dict[int, GroupStatistics]:
        reducer = StatisticsReducer(todo, scratch() if scratch is not None else None)
        fn = StatisticsPass(ps, refs, image_source, bands, pass_spec)

        def add(chunk, res) -> None:
            if running_hook:  # the first result: the passes are under way
                running_hook.pop()()
            reducer.add(chunk, res)

        t = time.perf_counter()
        ex.map(fn, todo, label, progress, on_result=add, collect=False)
        out = reducer.finish()
        pass_seconds.append(time.perf_counter() - t)
        return out

    particle_passes = iterate(fits, chunks, run_pass, spec)
    t1 = time.perf_counter()

    stats = {g: f.stats for g, f in fits.items()}
    results = [fits[g].result(bands[g]) for g in groups]
    for r in results:
        for problem in r.quality.problems:
            (log.error if r.failed else log.warning)("optics group %d: %s", r.group, problem)
    # a failed fit is reported, never applied: its particles keep their M, CTF and weights
    good = {r.group for r in results if not r.failed}
    scales = fit_scales({g: st for g, st in stats.items() if g in good}, len(ps))
    out = ps.copy()
    refined = levels.active and bool(good)
    # the mean defocus per particle in the input's CTF frame (M_in): refined where it was
    refined_dz = ps.defocus_mean_A()
    if refined:
        for g in good:
            refined_dz[rows[g]] = 0.5 * (fits[g].defocus[:, 0] + fits[g].defocus[:, 1])
    local = {}
    updates: dict[int, np.ndarray] = {}
    local_fits = tuple(f for f in opts.fit if f in LOCAL_FITS)
    if local_fits:
        mags = {g: (f.mag_in, f.mag_lin, f.mag) for g, f in fits.items() if g in good}
        joint = None
        if levels.active:
            joint = {}
            for g in good:
                sol = fits[g].defocus_solution
                # the last joint step's defocus change: the local fits start from the
                # defocus after it, not from the pass's
                joint[g] = (levels, sol.particle, sol.prior, sol.delta_a)
        local = fit_local(
            out,
            {g: st for g, st in stats.items() if g in good},
            mags,
            local_fits,
            defocus_A=refined_dz,
            defocus_measured=not settings.ctf_moves,
            joint=joint,
            defocus_updates=updates,
        )
    if refined:
        _write_refined_defocus(out, ps, {g: fits[g] for g in good}, rows, updates)
    if settings.fit_aniso:
        mats = ps.mag_matrices()
        for g in good:
            mats[ps.group_row(g)] = fits[g].mag
        out.set_mag_matrices(mats)
        if not settings.ctf_moves:  # keep each particle's CTF (defocus measured at M_in)
            for g in good:
                f = fits[g]
                inc = f.mag @ np.linalg.inv(f.mag_in)
                out.reexpress_astigmatism(rows[g], np.linalg.inv(inc))
    if len(settings.aberrations):
        for g in good:
            out.set_optics_params(g, fits[g].optics)
    if "scale" in opts.fit:
        old = out.contrast_scales()
        new = old * scales.raw
        if np.isfinite(new).any():
            new = new / np.nanmean(new)
        out.set_contrast_scales(np.where(np.isfinite(new), new, old))
        out.particles["cmagScale"] = scales.normalised
        out.particles["cmagScaleError"] = scales.error
    timings = {
        "statistics_s": t1 - t0,
        "passes": len(pass_seconds),
        "pass_seconds": pass_seconds,
        "particle_passes": particle_passes,
        "particles_per_s": particle_passes / max(t1 - t0, 1e-9),
        "dataset_particles_per_s": len(ps) / max(t1 - t0, 1e-9),
    }
    first_stats = {g: f.first_stats for g, f in fits.items()}
    return EstimateResult(
        out, results, scales, stats, opts, timings, bands, first_stats, local, refined_dz
    )


def _write_refined_defocus(out: ParticleSet, ps: ParticleSet, fits: dict, rows: dict,
                           updates: dict) -> None:  # fmt: skip
    """The refined defocus into ``out`` (in the input's CTF frame; the caller re-expresses
    it for the fitted M), the input's beside it (cmagDefocusUInput, ...), the change of the
    mean defocus and its standard error. ``updates``: per group, the defocus change of the
    local magnification model fitted with it (the defocus that goes with it): ``delta_a``
    (N, 3) and, for particle models, ``own_scale`` (N,) (see
    :func:`cryomag.fit.defocus.unit_mag_fits`)."""
    from cryomag.physics.ctf import defocus_from_matrix, defocus_matrix

    dz_input = ps.defocus_uva()
    for j, name in enumerate(("DefocusU", "DefocusV", "DefocusAngle")):
        out.particles[f"cmag{name}Input"] = dz_input[:, j]
    dz_se = np.full(len(ps), np.nan)
    for g, f in fits.items():
        value = f.defocus
        if g in updates:
            a = defocus_matrix(value[:, 0], value[:, 1], value[:, 2])
            da = updates[g]["delta_a"]
            a[:, 0, 0] += da[:, 0]
            a[:, 0, 1] += da[:, 1]
            a[:, 1, 0] += da[:, 1]
            a[:, 1, 1] += da[:, 2]
            if "own_scale" in updates[g]:  # a particle's CTF moves with its own M
                a *= updates[g]["own_scale"][:, None, None]
            value = np.stack(defocus_from_matrix(a), axis=1)
        arr = out.defocus_uva()
        arr[rows[g]] = value
        out.set_defocus_uva(arr)
        if f.defocus_solution is not None:
            dz_se[rows[g]] = f.defocus_solution.defocus_se
    out.particles["cmagDefocusChange"] = out.defocus_mean_A() - ps.defocus_mean_A()
    out.particles["cmagDefocusError"] = dz_se


def estimate(
    particles,
    reference=None,
    out=None,
    *,
    half_maps=None,
    mask=None,
    angpix: float | None = None,
    passthrough=None,
    write_cs: bool = False,
    plots: bool = True,
    progress: bool = True,
    executor=None,
    resume: bool = False,
    image_root=None,
    **options,
) -> EstimateResult:
    """Estimate per-particle scales and per-group magnification from files (Python API).

    Parameters
    ----------
    particles : path or ParticleSet
        RELION STAR or cryoSPARC .cs (with ``passthrough``), or a loaded set.
    reference : path or MapReference, optional
        The reference map (any pixel size and box). Optional when ``half_maps`` are given.
    out : path, optional
        Output folder; nothing is written when None.
    half_maps : (path, path), optional
        Half maps: half-set 1 is compared with map 1, half-set 2 with map 2, and the
        FSC = 0.143 resolution sets the default high-frequency limit.
    mask : path, optional
        Mask multiplied into the map(s).
    executor : Executor or ExecutorConfig, optional
        Where the passes run (:mod:`cryomag.execution`): an executor you own (left open), an
        :class:`~cryomag.execution.ExecutorConfig` (local workers, a scheduler address or
        SLURM / PBS jobs; started and stopped here) or None (this process, synchronously).
    resume : bool
        Continue an interrupted run into the same ``out``: finished chunks stored in
        ``out/.chunks`` are read back, only the rest is computed. With ``out``, chunk
        results are always stored while the run lasts and removed when it completes.
    image_root : path, optional
        Folder the written ``rlnImageName`` paths are relative to (default: ``out``). A
        RELION project folder when ``out`` is a job folder in it: RELION resolves image
        names from the project folder.
    **options
        Fields of :class:`EstimateOptions` (fit, low_res_A, high_res_A, max_iter, tol,
        chunk_size, joint_scale, eps, nthreads, ...).

    Examples
    --------
    >>> res = cryomag.estimate("particles.star", "map.mrc", out="run1")  # doctest: +SKIP
    >>> res.groups[0].mag, res.scales.normalised[:5]  # doctest: +SKIP
    """
    from cryomag.execution import ExecutorConfig, make_executor

    owned = None
    if isinstance(executor, ExecutorConfig):
        owned = make_executor(executor, WORKER_PRELOAD)
    if owned is not None:
        executor = owned
    try:
        if isinstance(executor, Executor):
            executor.start_in_background()  # workers start while the inputs are read
        return _estimate(particles, reference, out, half_maps, mask, angpix, passthrough,
                         write_cs, plots, progress, executor, resume, options,
                         image_root)  # fmt: skip
    finally:
        if owned is not None:
            owned.close()


def _estimate(particles, reference, out, half_maps, mask, angpix, passthrough, write_cs, plots,
              progress, executor, resume, options, image_root=None):  # fmt: skip
    """:func:`estimate` once its executor exists."""
    from cryomag.io import ImageSource, read_particles
    from cryomag.io.outdir import output_folder
    from cryomag.io.stats import StatisticsCodec, scratch_allocator
    from cryomag.workflows.outputs import write_outputs

    ps = particles
    inputs = []
    if not isinstance(ps, ParticleSet):
        inputs.append(Path(ps))
        ps = read_particles(ps, angpix=angpix, passthrough=passthrough)
    for x in (reference, mask, *(half_maps or ())):
        if x is not None and not isinstance(x, MapReference):
            inputs.append(Path(x))
    opts = EstimateOptions(**options)
    if opts.regroup:
        from cryomag.model.grouping import regroup_by

        n_before = ps.n_groups
        ps = regroup_by(ps, opts.regroup)
        log.info("regrouped by %s: %d optics group(s) -> %d", opts.regroup, n_before,
                 ps.n_groups)  # fmt: skip
    with output_folder(out, "estimate", inputs=[*inputs, passthrough], particles=ps,
                       resume=resume) as out, run_log(out) as out:  # fmt: skip
        log.info(
            "estimate: %d particles from %s, %d optics group(s)", len(ps), ps.name, ps.n_groups
        )
        refs, fsc_res = load_references(
            reference, half_maps, mask, eps=opts.eps, nthreads=opts.nthreads
        )
        if fsc_res is not None:
            log.info("half-map FSC = 0.143 at %.2f A", fsc_res)
        checkpoints = None if out is None else out / ".chunks"
        scratch = None if out is None else scratch_allocator(out / ".chunks" / "reduced")
        with run_executor(
            executor, checkpoints, resume, codec=StatisticsCodec(), preload=WORKER_PRELOAD
        ) as ex:
            log.info("executor: %s", ex.describe())
            running = None
            if out is not None and plots:
                from cryomag.report import preload

                # matplotlib imported while the passes run, not while this process prepares
                # and sends out the first pass (the import thread would share its
                # interpreter with that work while the workers wait)
                running = preload.start
            res = run_estimate(
                ps, refs, ImageSource(ps), opts, fsc_res, progress, executor=ex, scratch=scratch,
                on_running=running,
            )
            for gr in res.groups:
                log.info(
                    "group %d: M = %s +- %s after %d iterations",
                    gr.group,
                    np.round(gr.mag, 6).tolist(),
                    np.round(gr.mag_error, 6).tolist(),
                    gr.iterations,
                )
            if out is not None:
                write_outputs(res, out, inputs, write_cs=write_cs, plots=plots,
                              image_root=image_root)  # fmt: skip
    return res
