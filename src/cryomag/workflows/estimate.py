"""``cryomag estimate``: per-particle contrast scale and per-group magnification.

Data flow: ParticleSet -> chunks (rows of one optics group) -> per chunk, read the images,
predict with the exact forward model and accumulate the statistics of
:mod:`cryomag.fit.statistics` -> reduce per group -> Gauss-Newton step for each group's M ->
repeat at the new M until the largest update is below ``tol`` -> scales, M with standard
errors, adapted defocus -> outputs.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryomag.execution.allocator import keep_block_arrays_on_heap
from cryomag.execution.chunks import Chunk, make_chunks
from cryomag.execution.executor import Executor, LocalExecutor, run_executor
from cryomag.fit.accumulate import chunk_statistics
from cryomag.fit.anisomag import MagUpdate, solve_group
from cryomag.fit.relinearise import relinearised_fit
from cryomag.fit.scale import ScaleResult, fit_scales
from cryomag.fit.statistics import Band, ChunkStatistics, GroupStatistics
from cryomag.model.particles import ParticleDataError, ParticleSet
from cryomag.physics.ctf import transform_astigmatism
from cryomag.physics.fourier import centered_rfft2
from cryomag.physics.projection import MapReference, OpticsParams, ParticleGeometry
from cryomag.workflows.local_fits import LOCAL_FITS, fit_local, mean_defocus_A
from cryomag.workflows.runlog import run_log

log = logging.getLogger("cryomag")

FITS = ("scale", "aniso", "particle", "micrograph", "defocus")


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
        Particles per chunk (see :mod:`cryomag.execution.executor` for the memory). Each
        chunk's 3D transform pays finufft's FFT of the upsampled map once (~0.1 s for a
        128^3 map), so chunks of about a thousand particles amortise it.
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
        signal the CTF delocalises out of the box is modelled (about pad^2 x slower).
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
    exact_gradient : bool or None
        How the reference's frequency gradient is evaluated. False: from the slice image
        (one 3D transform per particle; the group fit iterates to the same fixed point and its
        standard errors agree with the exact ones within 2 %). True: exactly, with three more
        3D transforms (about 1.5-2x slower). None (default): exact when local models
        (particle, micrograph, defocus) are fitted: they are single linear steps from the
        group solution, and the image-based gradient reads their deviations about 1 % low
        (measured: per-micrograph slope on the truth 0.981 vs 0.991 exact; box 48, pad 2).
    relinearise : bool
        Full passes also accumulate second-order statistics, and Gauss-Newton re-predicts at
        each updated M from them (:mod:`cryomag.fit.relinearise`) until the update is below
        ``tol``; another pass is made only when the second-order model cannot be trusted
        that far (its estimated remainder above ``tol / 2``). After the warm start one full
        pass then usually suffices. False: every Gauss-Newton iteration is a real pass.
    curvature_every : int
        The second-order sums through the model's second derivatives (which only enter the
        O(|dM|^2) correction of a step) from every n-th particle, weighted n; 1: from every
        particle. Measured on 20,000 particles (bench/bench_estimate.py's data): n = 4 moved
        M by at most 2.5e-7 (0.015 standard errors; 2 % of the correction) and saved ~10 %
        of the fit's time.
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
    exact_gradient: bool | None = None
    relinearise: bool = True
    curvature_every: int = 4

    def __post_init__(self) -> None:
        if self.defocus_frame not in ("measured", "true"):
            raise ValueError(
                f"defocus_frame must be 'measured' or 'true', got {self.defocus_frame!r}"
            )
        if self.warm_start < 0:
            raise ValueError(f"warm_start must be >= 0 (0 = off), got {self.warm_start}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        bad = set(self.fit) - set(FITS)
        if bad:
            raise ValueError(f"unknown fit(s) {sorted(bad)}; choose from {', '.join(FITS)}")


@dataclass
class GroupResult:
    """Result for one optics group."""

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

    def step_kinds(self) -> list[str]:
        """How each Gauss-Newton iteration of :attr:`history` was made: ``"subset"`` (a pass
        over the warm-start subset), ``"full"`` (a pass over every particle) or
        ``"relinearised"`` (from the stored second-order statistics, no pass)."""
        return [
            "relinearised"
            if h.get("relinearised")
            else ("subset" if h["particles"] < self.n_particles else "full")
            for h in self.history
        ]


@dataclass
class EstimateResult:
    """Everything an estimation produced (also written to ``out``)."""

    particles: ParticleSet
    groups: list[GroupResult]
    scales: ScaleResult
    stats: dict[int, GroupStatistics]
    options: EstimateOptions
    timings: dict
    bands: list = field(default_factory=list)
    first_stats: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)
    input_defocus_A: np.ndarray | None = None


def _geometry(ps: ParticleSet, rows: np.ndarray, mag: np.ndarray, ctf_mag: np.ndarray):
    t = ps.particles.iloc[rows]

    def col(name, default=0.0):
        return t[name].to_numpy(float) if name in t.columns else np.full(len(rows), default)

    return ParticleGeometry(
        euler_deg=np.stack([col("rlnAngleRot"), col("rlnAngleTilt"), col("rlnAnglePsi")], 1),
        origin_A=np.stack([col("rlnOriginXAngst"), col("rlnOriginYAngst")], 1),
        mag=mag,
        defocus_u_A=col("rlnDefocusU"),
        defocus_v_A=col("rlnDefocusV"),
        defocus_angle_deg=col("rlnDefocusAngle"),
        phase_shift_deg=col("rlnPhaseShift"),
        bfactor_A2=col("rlnCtfBfactor"),
        ctf_scale=col("rlnCtfScalefactor", 1.0),
        ctf_mag=ctf_mag,
    )


def _optics(ps: ParticleSet, g: int) -> OpticsParams:
    o = ps.optics.iloc[g]
    return OpticsParams(
        pixel_size_A=float(o["rlnImagePixelSize"]),
        box=int(o["rlnImageSize"]),
        voltage_kv=float(o["rlnVoltage"]),
        cs_mm=float(o["rlnSphericalAberration"]),
        amplitude_contrast=float(o["rlnAmplitudeContrast"]),
    )


def load_references(
    reference, half_maps=None, mask=None, eps: float = 1e-6, nthreads: int = 0
) -> tuple[dict[int, MapReference], float | None]:
    """Reference(s) by half set (key 0 = the full map) and the FSC=0.143 resolution (A).

    ``reference`` may be a path, a MapReference or None when two half maps are given.
    """
    from cryomag.io import read_map
    from cryomag.io.mrc import check_map_values
    from cryomag.reconstruct.fsc import fsc, resolution_at

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


def _reference_for(refs: dict[int, MapReference], half: int) -> MapReference:
    if 1 in refs and 2 in refs:
        return refs[half if half in (1, 2) else 1]
    return refs[0]


class _Pass:
    """One pass over the images at given group matrices: returns chunk statistics."""

    def __init__(self, ps, refs, bands, image_source, ctf_mags):
        self.ps = ps
        self.refs = refs
        self.bands = bands
        self.images = image_source
        self.ctf_mags = ctf_mags
        self.halves = ps.half_sets()
        self.mags = None
        self.noise = None
        self.window_pad = [1] * len(bands)
        self.extended = False
        self.exact_gradient = False
        self.second_order = [0] * len(bands)
        self.nthreads = 0
        self.ctf_moves = False

    def spectra(self, rows: np.ndarray) -> np.ndarray:
        # as many FFT threads as the 3D transforms use (1 in a Dask worker by default)
        workers = self.nthreads if self.nthreads > 0 else None
        return centered_rfft2(self.images.read(rows).astype(np.float32), workers=workers)

    def __call__(self, chunk: Chunk) -> list[ChunkStatistics]:
        keep_block_arrays_on_heap()
        rows = np.asarray(chunk.rows)
        g = chunk.group
        spectra = self.spectra(rows)
        out = []
        halves = self.halves[rows]
        for half in np.unique(halves) if (1 in self.refs and 2 in self.refs) else [0]:
            sel = halves == half if half else np.ones(len(rows), bool)
            geom = _geometry(self.ps, rows[sel], self.mags[g], self.ctf_mags[g])
            out.append(
                chunk_statistics(
                    _reference_for(self.refs, int(half)),
                    spectra[sel],
                    geom,
                    _optics(self.ps, g),
                    self.bands[g],
                    self.noise[g],
                    rows[sel],
                    window_pad=self.window_pad[g],
                    extended=self.extended,
                    exact_gradient=self.exact_gradient,
                    second_order=self.second_order[g],
                    ctf_moves=self.ctf_moves,
                )
            )
        return out


def _initial_noise(pass_: _Pass, chunks: list[Chunk], g: int) -> np.ndarray:
    """Radial power of the images themselves (signal + noise): weights for the first pass.

    From the first 256 particles of the group (a radial average: more add nothing).
    """
    first = next(c for c in chunks if c.group == g)
    spectra = pass_.spectra(np.asarray(first.rows)[:256])
    band = pass_.bands[g]
    p = (np.abs(spectra) ** 2).mean(axis=0)
    nsh = band.n_shells + 1
    num = np.bincount(band.shell_all.ravel(), p.ravel(), minlength=nsh)
    cnt = np.bincount(band.shell_all.ravel(), minlength=nsh)
    with np.errstate(invalid="ignore", divide="ignore"):
        pw = num / cnt
    pw[~np.isfinite(pw) | (pw <= 0)] = (
        np.nanmax(pw[np.isfinite(pw)]) if np.isfinite(pw).any() else 1
    )
    return pw


def _warm_chunks(gidx: np.ndarray, opts: EstimateOptions) -> dict[int, list[Chunk]]:
    """Chunks of the fixed random subset of each large group (see ``warm_start``)."""
    if opts.warm_start <= 0:
        return {}
    rng = np.random.default_rng(20261126)
    keep = np.full(len(gidx), -1)
    for g in np.unique(gidx):
        rows = np.flatnonzero(gidx == g)
        if len(rows) > 2 * opts.warm_start:
            keep[np.sort(rng.choice(rows, opts.warm_start, replace=False))] = g
    out: dict[int, list[Chunk]] = {}
    # two chunks per subset: both workers of a small cluster busy, one 3D transform each
    size = max(1, min(opts.chunk_size, -(-opts.warm_start // 2)))
    for c in make_chunks(keep, size):
        if c.group >= 0:
            out.setdefault(c.group, []).append(c)
    return out


def auto_window_pad(ps: ParticleSet, g: int, band: Band, cap: int = 3) -> int:
    """Padding factor that keeps the CTF-delocalised signal of group ``g`` in the model.

    The CTF moves signal at frequency k by D = lambda dz k + Cs lambda^3 k^3 (A); D_max at
    the group's largest defocus and the band's k_max. A particle of diameter d <= L
    (L = box * pixel size) then reaches d / 2 + D_max from the box centre. The prediction is
    periodic with period pad * L, so nothing wraps back into the cut-out box while
    d / 2 + D_max < pad L - L / 2, i.e. pad >= 1 + D_max / L for a particle that fills the
    box: pad = ceil(1 + D_max / L), capped at ``cap`` for speed (cost grows as pad^2); 1 (the
    box-periodic model) when D_max < L / 4.
    Measured (box 64 at 1.3 A, defocus 2-3 um, M = I, 3,000 particles): the box-periodic model
    read the isotropic magnification 0.58 % high (12 sigma), pad 2 0.32 %, pad 6 -0.003 %
    (0.4 sigma). Set ``window_pad`` explicitly for such extreme boxes.
    """
    from cryomag.physics.ctf import electron_wavelength_A

    o = _optics(ps, g)
    sel = ps.group_index() == g
    dz = np.maximum(ps.column("rlnDefocusU")[sel], ps.column("rlnDefocusV")[sel])
    if not len(dz):
        return 1
    lam = float(electron_wavelength_A(o.voltage_kv))
    k = band.kmax
    d_max = lam * float(np.max(np.abs(dz))) * k + o.cs_mm * 1e7 * lam**3 * k**3
    length = o.box * o.pixel_size_A
    if d_max < length / 4:
        return 1
    return int(min(cap, np.ceil(1 + d_max / length)))


def make_bands(
    ps: ParticleSet, refs: dict[int, MapReference], opts: EstimateOptions, fsc_res: float | None
) -> list[Band]:
    """The frequency band of each optics group (1/A)."""
    bands = []
    ref_nyq = min(r.nyquist for r in refs.values())
    mats = ps.mag_matrices()
    for g in range(ps.n_groups):
        o = _optics(ps, g)
        nyq = 0.5 / o.pixel_size_A
        smax = float(np.linalg.svd(mats[g], compute_uv=False).max())
        kmax_default = 0.9 * min(nyq, ref_nyq / (smax * 1.05))
        if opts.high_res_A is not None:
            kmax = 1.0 / opts.high_res_A
        elif fsc_res is not None:
            kmax = min(1.0 / fsc_res, kmax_default)
        else:
            kmax = kmax_default
        kmin = 1.0 / opts.low_res_A if opts.low_res_A > 0 else 0.0
        if kmax <= kmin:
            raise ValueError(
                f"optics group {ps.group_numbers()[g]}: empty band {1 / kmin:.2f}-{1 / kmax:.2f} A"
            )
        bands.append(Band(o.box, o.pixel_size_A, kmin, kmax))
    return bands


def run_estimate(
    particles: ParticleSet,
    refs: dict[int, MapReference],
    image_source,
    options: EstimateOptions | None = None,
    fsc_res: float | None = None,
    progress: bool = True,
    executor: Executor | None = None,
) -> EstimateResult:
    """The estimation engine on loaded inputs (see :func:`estimate` for files).

    ``executor`` runs the chunks of each pass (:mod:`cryomag.execution.executor`; default:
    this process, synchronously); the result does not depend on it.
    """
    opts = options or EstimateOptions()
    if opts.exact_gradient is None:  # resolved here, so results.json records what was used
        opts = dataclasses.replace(opts, exact_gradient=bool(set(opts.fit) & set(LOCAL_FITS)))
    ps = particles
    ps.validate()
    t0 = time.perf_counter()
    gidx = ps.group_index()
    chunks = make_chunks(gidx, opts.chunk_size)
    bands = make_bands(ps, refs, opts, fsc_res)
    mag_in = ps.mag_matrices()
    true_frame = opts.defocus_frame == "true"
    # "true": the CTF follows the current M (ctf_mag None -> CTF(M k))
    pass_ = _Pass(
        ps,
        refs,
        bands,
        image_source,
        ctf_mags=[None] * ps.n_groups if true_frame else mag_in.copy(),
    )
    pass_.mags = mag_in.copy()
    pass_.extended = "particle" in opts.fit or true_frame
    pass_.ctf_moves = true_frame
    pass_.exact_gradient = opts.exact_gradient
    pass_.nthreads = opts.nthreads
    pass_.window_pad = [
        opts.window_pad if opts.window_pad > 0 else auto_window_pad(ps, g, bands[g])
        for g in range(ps.n_groups)
    ]
    for g, pad in enumerate(pass_.window_pad):
        log.info("optics group %d: prediction window padding %d", g + 1, pad)
    pass_.noise = [
        _initial_noise(pass_, chunks, g) if (gidx == g).any() else np.ones(bands[g].n_shells + 1)
        for g in range(ps.n_groups)
    ]
    fit_aniso = "aniso" in opts.fit
    warm_chunks = _warm_chunks(gidx, opts) if fit_aniso else {}
    phase = {g: "warm" if g in warm_chunks else "full" for g in range(ps.n_groups)}
    history: dict[int, list] = {g: [] for g in range(ps.n_groups)}
    updates: dict[int, MagUpdate] = {}
    counts = {g: {"warm": 0, "full": 0} for g in range(ps.n_groups)}  # passes per phase
    converged = {g: not (gidx == g).any() for g in range(ps.n_groups)}
    stats: dict[int, GroupStatistics] = {}
    first_stats: dict[int, GroupStatistics] = {}
    lin = {g: mag_in[g].copy() for g in range(ps.n_groups)}
    particle_passes = 0
    it = 0
    while not all(converged.values()):
        todo = []
        for g in range(ps.n_groups):
            if not converged[g]:
                todo += (
                    warm_chunks[g] if phase[g] == "warm" else [c for c in chunks if c.group == g]
                )
        it += 1
        # full passes also accumulate the second-order statistics: Gauss-Newton then
        # re-linearises from them, and one full pass usually suffices
        pass_.second_order = [
            max(int(opts.curvature_every), 1)
            if fit_aniso and opts.relinearise and phase[g] == "full"
            else 0
            for g in range(ps.n_groups)
        ]
        particle_passes += sum(len(c) for c in todo)
        results = (executor or LocalExecutor()).map(pass_, todo, f"pass {it}", progress)
        by_group: dict[int, list[ChunkStatistics]] = {}
        for c, res in zip(todo, results, strict=True):
            by_group.setdefault(c.group, []).extend(res)
        for g, lst in by_group.items():
            st = GroupStatistics.reduce(lst)
            first_stats.setdefault(g, st)
            # the first pass weights by the images' own power; later ones by the residuals'
            weights_from_residuals = first_stats[g] is not st
            pass_.noise[g] = st.noise_power()
            kind = phase[g]
            counts[g][kind] += 1
            if kind == "full":
                stats[g] = st
            if not fit_aniso:
                converged[g] = True
                continue
            n_used = int(sum(len(c.rows) for c in todo if c.group == g))
            lin[g] = pass_.mags[g].copy()
            rel = None
            if kind == "full" and st.has_second_order:
                rel = relinearised_fit(
                    st,
                    joint_scale=opts.joint_scale,
                    tol=opts.tol,
                    accuracy=_second_order_accuracy(pass_.window_pad[g], opts.curvature_every),
                )
                upd = MagUpdate(rel.delta, rel.covariance, int((st.pp > 0).sum()))
                steps, path = rel.steps, rel.path
                # re-linearisation keeps the pass's weights: its fixed point is the data's
                # only when they came from residuals (the first pass of a group weights by
                # the images' power, which moves M by up to a few standard errors)
                done = rel.converged and rel.trusted and weights_from_residuals
            else:
                upd = solve_group(st, joint_scale=opts.joint_scale, ctf_moves=true_frame)
                steps, path = [float(np.abs(upd.delta).max())], [upd.delta]
                done = steps[0] < opts.tol
            pass_.mags[g] = lin[g] + upd.delta
            for i, (stp, d) in enumerate(zip(steps, path, strict=True)):
                history[g].append(
                    {
                        "iteration": len(history[g]) + 1,
                        "particles": n_used,
                        "max_step": stp,
                        "M": (lin[g] + d).tolist(),
                        "relinearised": i > 0,
                    }
                )
                log.info(
                    "group %d iteration %d (%s): max |dM| = %.2e",
                    g + 1,
                    len(history[g]),
                    "re-linearised from the statistics" if i else kind,
                    stp,
                )
            if rel is not None:
                log.info(
                    "group %d: remainder of the second-order model %.1e (%s)",
                    g + 1,
                    rel.remainder,
                    "converged" if done else "another pass",
                )
            step = steps[-1]
            if kind == "warm":
                if step < max(opts.warm_tol, opts.tol) or counts[g]["warm"] >= opts.max_iter:
                    phase[g] = "full"
                continue
            updates[g] = upd
            if done:
                converged[g] = True
            elif counts[g]["full"] >= opts.max_iter:
                _warn_not_converged(g, opts, step)
                converged[g] = True
    t1 = time.perf_counter()

    gnum = ps.group_numbers()
    scales = fit_scales({int(gnum[g]): st for g, st in stats.items()}, len(ps))
    out = ps.copy()
    groups = []
    for g in range(ps.n_groups):
        if g not in stats:
            continue
        upd = updates.get(g)
        groups.append(
            GroupResult(
                group=int(gnum[g]),
                n_particles=int((gidx == g).sum()),
                mag_in=mag_in[g],
                mag=pass_.mags[g].copy(),
                mag_error=upd.standard_error if upd else np.zeros((2, 2)),
                covariance=upd.covariance if upd else np.zeros((4, 4)),
                iterations=len(history[g]),
                band_A=(1 / bands[g].kmin if bands[g].kmin > 0 else np.inf, 1 / bands[g].kmax),
                chi2=stats[g].chi2_per_pixel(),
                history=history[g],
                mag_lin=lin[g],
            )
        )
    if fit_aniso and true_frame:
        out.set_mag_matrices(np.asarray(pass_.mags))  # defocus already in the true frame
    elif fit_aniso:
        _apply_magnification(out, mag_in, pass_.mags, gidx)
    if "scale" in opts.fit:
        old = out.column("rlnCtfScalefactor", 1.0)
        new = old * scales.raw
        mean = np.nanmean(new)
        out.particles["rlnCtfScalefactor"] = np.where(np.isfinite(new), new / mean, old)
        out.particles["cmagScale"] = scales.normalised
        out.particles["cmagScaleError"] = scales.error
    local = {}
    local_fits = tuple(f for f in opts.fit if f in LOCAL_FITS)
    if local_fits:
        mags = {g: (mag_in[g], lin[g], pass_.mags[g]) for g in stats}
        local = fit_local(
            out,
            stats,
            mags,
            local_fits,
            defocus_A=mean_defocus_A(ps),
            defocus_measured=not true_frame,
        )
    timings = {
        "statistics_s": t1 - t0,
        "passes": it,
        "particle_passes": particle_passes,
        "particles_per_s": particle_passes / max(t1 - t0, 1e-9),
        "dataset_particles_per_s": len(ps) / max(t1 - t0, 1e-9),
    }
    return EstimateResult(
        out, groups, scales, stats, opts, timings, bands, first_stats, local, mean_defocus_A(ps)
    )


def _second_order_accuracy(window_pad: int, every: int) -> float:
    """Relative accuracy of the second-order correction (see ``relinearised_fit``).

    The window-aware model uses the box-periodic second derivatives (its change of the sums
    was predicted within ~30 %: tests/test_accumulate.py); sampling every n-th particle
    adds a statistical error (measured 2 % of the correction for n = 4 on 20,000 particles;
    counted as 5 %).
    """
    acc = 0.3 if window_pad > 1 else 0.0
    return max(acc, 0.05) if every > 1 else acc


def _warn_not_converged(g: int, opts: EstimateOptions, step: float) -> None:
    log.warning(
        "group %d: not converged after %d passes (last |dM| = %.1e > tol %.0e)",
        g + 1,
        opts.max_iter,
        step,
        opts.tol,
    )


def _apply_magnification(ps: ParticleSet, mag_in, mag_new, gidx) -> None:
    """Write new group matrices and re-express each particle's astigmatism (CTF unchanged)."""
    ps.set_mag_matrices(np.asarray(mag_new))
    du = ps.column("rlnDefocusU").copy()
    dv = ps.column("rlnDefocusV").copy()
    ang = ps.column("rlnDefocusAngle").copy()
    for g in range(len(mag_new)):
        sel = gidx == g
        if not sel.any():
            continue
        inc = mag_new[g] @ np.linalg.inv(mag_in[g])
        u, v, a = transform_astigmatism(du[sel], dv[sel], ang[sel], np.linalg.inv(inc))
        du[sel], dv[sel], ang[sel] = u, v, a
    ps.particles["rlnDefocusU"] = du
    ps.particles["rlnDefocusV"] = dv
    ps.particles["rlnDefocusAngle"] = ang


def results_dict(res: EstimateResult) -> dict:
    """The JSON-serialisable summary written to results.json."""
    from cryomag.model.magnification import polar, relion_to_cryosparc

    groups = []
    for gr in res.groups:
        p = polar(gr.mag)
        kinds = gr.step_kinds()
        groups.append(
            {
                "optics_group": gr.group,
                "n_particles": gr.n_particles,
                "M_input": gr.mag_in.tolist(),
                "M": gr.mag.tolist(),
                "M_standard_error": gr.mag_error.tolist(),
                "M_covariance": gr.covariance.tolist(),
                "cryosparc_anisomag": np.asarray(relion_to_cryosparc(gr.mag)).tolist(),
                "polar": p.as_dict(),
                "iterations": gr.iterations,
                # passes over the images (subset and all particles) and Gauss-Newton steps
                # re-linearised from the stored second-order statistics
                "passes": {
                    "subset": kinds.count("subset"),
                    "full": kinds.count("full"),
                    "relinearised_steps": kinds.count("relinearised"),
                },
                "band_A": [float(gr.band_A[0]), float(gr.band_A[1])],
                "chi2_per_pixel": gr.chi2,
                "mean_raw_scale": res.scales.group_mean.get(gr.group),
                "history": gr.history,
                "M_linearisation": None if gr.mag_lin is None else gr.mag_lin.tolist(),
                **({"local": res.local[gr.group]} if gr.group in res.local else {}),
            }
        )
    s = res.scales.normalised
    return {
        "fit": list(res.options.fit),
        "options": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(res.options).items()
        },
        "groups": groups,
        "scale": {
            "quantiles": {
                q: float(np.nanquantile(s, float(q)))
                for q in ("0.05", "0.25", "0.5", "0.75", "0.95")
            },
            "median_standard_error": float(np.nanmedian(res.scales.error)),
        },
        "timings": res.timings,
    }


def save_statistics(res: EstimateResult, folder: Path, options: dict | None = None) -> None:
    """Store the per-particle statistics (one .npz per optics group) for later refits.

    ``options``: the run's options as written to results.json (derived from ``res`` if None).
    """
    from cryomag.io.atomic import atomic_write, write_json

    folder.mkdir(parents=True, exist_ok=True)
    for gr in res.groups:
        st = res.stats[next(g for g in res.stats if res.particles.group_numbers()[g] == gr.group)]
        path = folder / f"group_{gr.group:03d}.npz"
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    **st.as_arrays(),
                    mag=gr.mag,
                    mag_in=gr.mag_in,
                    mag_lin=gr.mag if gr.mag_lin is None else gr.mag_lin,
                    group=gr.group,
                    defocus_mean_A=(
                        res.input_defocus_A[st.rows]
                        if res.input_defocus_A is not None
                        else np.full(len(st.rows), np.nan)
                    ),
                )
    write_json(folder / "options.json", options or results_dict(res)["options"])


def write_outputs(
    res: EstimateResult, out: Path, inputs: list, write_cs: bool = False, plots: bool = True
) -> dict[str, Path]:
    """Write the fixed-name outputs of an estimation into ``out``.

    ``particles.star`` (always), ``particles.cs`` (for .cs input or ``write_cs``),
    ``results.json``, ``stats/group_NNN.npz``, ``plots/*.png`` + ``plots/estimate.pdf``.
    """
    from cryomag.io import write_star
    from cryomag.io.atomic import write_json
    from cryomag.io.mrc import rebase_image_names

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    star = out / "particles.star"
    from cryomag.io.atomic import ensure_not_input

    ensure_not_input(star, inputs)
    to_write = res.particles.copy()  # the in-memory result keeps its own image paths
    rebase_image_names(to_write, out)
    write_star(to_write, star)
    written["star"] = star
    if write_cs or res.particles.source.kind == "cs":
        from cryomag.io import write_cs as _write_cs

        cs = out / "particles.cs"
        ensure_not_input(cs, inputs)
        _write_cs(to_write, cs)
        written["cs"] = cs
    summary = results_dict(res)
    write_json(out / "results.json", summary, inputs)
    written["results"] = out / "results.json"
    save_statistics(res, out / "stats", summary["options"])
    written["stats"] = out / "stats"
    if plots:
        from cryomag.report.plots_estimate import plot_estimate

        plot_estimate(res, res.bands, out / "plots")
        if res.local:
            from cryomag.report.plots_local import plot_local

            plot_local(res.particles, res.local, out / "plots")
        written["plots"] = out / "plots"
    return written


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
        Where the passes run (:mod:`cryomag.execution.executor`): an executor you own (left
        open), an :class:`~cryomag.execution.executor.ExecutorConfig` (a LocalCluster, a
        scheduler address or SLURM / PBS jobs; started and stopped here) or None (this
        process, synchronously).
    resume : bool
        Continue an interrupted run into the same ``out``: finished chunks stored in
        ``out/.chunks`` are read back, only the rest is computed. With ``out``, chunk
        results are always stored while the run lasts and removed when it completes.
    **options
        Fields of :class:`EstimateOptions` (fit, low_res_A, high_res_A, max_iter, tol,
        chunk_size, joint_scale, eps, nthreads).

    Examples
    --------
    >>> res = cryomag.estimate("particles.star", "map.mrc", out="run1")  # doctest: +SKIP
    >>> res.groups[0].mag, res.scales.normalised[:5]  # doctest: +SKIP
    """
    from cryomag.execution.executor import Executor, ExecutorConfig, make_executor

    owned = make_executor(executor) if isinstance(executor, ExecutorConfig) else None
    if owned is not None:
        executor = owned
    try:
        if isinstance(executor, Executor):
            executor.start_in_background()  # workers start while the inputs are read
        return _estimate(particles, reference, out, half_maps, mask, angpix, passthrough,
                         write_cs, plots, progress, executor, resume, options)  # fmt: skip
    finally:
        if owned is not None:
            owned.close()


def _estimate(particles, reference, out, half_maps, mask, angpix, passthrough, write_cs, plots,
              progress, executor, resume, options):  # fmt: skip
    """:func:`estimate` once its executor exists."""
    from cryomag.io import ImageSource, read_particles
    from cryomag.io.outdir import output_folder

    ps = particles
    inputs = []
    if not isinstance(ps, ParticleSet):
        inputs.append(Path(ps))
        ps = read_particles(ps, angpix=angpix, passthrough=passthrough)
    for x in (reference, mask, *(half_maps or ())):
        if x is not None and not isinstance(x, MapReference):
            inputs.append(Path(x))
    opts = EstimateOptions(**options)
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
        with run_executor(executor, None if out is None else out / ".chunks", resume) as ex:
            log.info("executor: %s", ex.describe())
            res = run_estimate(ps, refs, ImageSource(ps), opts, fsc_res, progress, executor=ex)
            for gr in res.groups:
                log.info(
                    "group %d: M = %s +- %s after %d iterations",
                    gr.group,
                    np.round(gr.mag, 6).tolist(),
                    np.round(gr.mag_error, 6).tolist(),
                    gr.iterations,
                )
            if out is not None:
                write_outputs(res, out, inputs, write_cs=write_cs, plots=plots)
    return res


def print_summary(res: EstimateResult, console) -> None:
    """Print the per-group results (M, errors, polar form) and the scale distribution."""
    from rich.table import Table

    from cryomag.model.magnification import polar

    table = Table(title="Magnification per optics group (RELION M: k_ref = M k_obs)")
    for col in (
        "group",
        "particles",
        "M00",
        "M01",
        "M10",
        "M11",
        "+- (max)",
        "major",
        "minor",
        "angle",
        "pixel size change",
        "iter",
    ):
        table.add_column(col, justify="right")
    for gr in res.groups:
        p = polar(gr.mag)
        table.add_row(
            str(gr.group),
            str(gr.n_particles),
            *[f"{v:.5f}" for v in gr.mag.ravel()],
            f"{gr.mag_error.max():.1e}",
            f"{p.major_scale:.5f}",
            f"{p.minor_scale:.5f}",
            f"{p.angle_deg:.1f}",
            f"{100 * p.pixel_size_change:+.3f} %",
            str(gr.iterations),
        )
    console.print(table)
    s = res.scales.normalised
    if np.isfinite(s).any():
        q = np.nanquantile(s, [0.05, 0.25, 0.5, 0.75, 0.95])
        console.print(
            "Per-particle contrast scale (1 = mean particle; a contrast weight, mostly ice "
            "thickness, not a size): 5/25/50/75/95 % = "
            + " / ".join(f"{v:.2f}" for v in q)
            + f", median standard error {np.nanmedian(res.scales.error):.3f}"
        )
