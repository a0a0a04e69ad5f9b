"""``cryomag reconstruct``: direct Fourier inversion from given poses (no search).

Data flow: ParticleSet -> per optics group, batches of particles (bounded memory) -> read
images (ImageSource), centred rfft, CTF at M k -> exact backprojection b and point-spread
function psi per half set (:class:`~cryomag.reconstruction.backproject.Backprojector`, finufft
type 1) -> pilot half maps by direct Fourier inversion -> half-map FSC -> SSNR per shell ->
Wiener-regularised least-squares half maps and full map by preconditioned conjugate
gradients -> FSC between the final half maps, resolution at FSC = 0.143 -> MRC files.

What each particle contributes (see :mod:`cryomag.reconstruction.backproject` for the maths):

- its slice is placed at A^T (M k, 0) with M from rlnMagMat of its optics group (identity when
  absent), or per particle when the particle table carries rlnMagMat00..11 columns (a
  cryomag extension) or an array is passed; ``mag=False`` places slices with M = I (the CTF is
  still evaluated as the STAR file describes it, at M k, so that switching the correction off
  changes only the geometry; a file without rlnMagMat gives the same map either way);
- its CTF is RELION's, times rlnCtfScalefactor (the per-particle contrast scale written by
  ``cryomag estimate``); ``scale=False`` uses 1;
- its amplitude is det(M) (a_out / a_g)^2, so that the map is in the units of the forward
  model of :mod:`cryomag.physics.forward` (a map reconstructed at the reference pixel size
  reproduces the reference's values);
- mixed optics groups (pixel sizes, boxes) all land on one output grid: frequencies are in
  1/A, so only |k| below each group's own Nyquist and |q| below the output Nyquist are used.

Half sets come from rlnRandomSubset (1 and 2); when absent, particles alternate 1, 2, 1, ...
(``ParticleSet.half_sets``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cryomag.io.atomic import write_json
from cryomag.model.particles import MAGMAT_COLUMNS, ParticleDataError, ParticleSet
from cryomag.physics.forward import ctf_at, odd_factor
from cryomag.physics.fourier import centered_rfft2
from cryomag.physics.geometry import euler_to_matrix
from cryomag.reconstruction.backproject import Backprojector, half_plane_pixels, wiener_lambda
from cryomag.reconstruction.fsc import fsc, resolution_at
from cryomag.reconstruction.symmetry import symmetry_operators
from cryomag.workflows.runlog import run_log

log = logging.getLogger("cryomag")

#: Fourier points per image read (bounds the CTF's float64 temporaries, ~50 bytes each).
READ_POINTS = 1_500_000

#: SSNR of the pilot (direct-inversion) half maps, whose FSC sets the Wiener term.
SSNR_PILOT = 1e3

__all__ = [
    "ReconstructOptions",
    "ReconstructResult",
    "output_grid",
    "reconstruct",
    "run_reconstruct",
    "write_map",
]


@dataclass
class ReconstructOptions:
    """Settings of a reconstruction.

    Attributes
    ----------
    mag : bool
        Place slices at A^T (M k, 0) with the file's magnification matrices (else M = I).
    scale : bool
        Use rlnCtfScalefactor (per-particle contrast scale) in the CTF (else 1).
    symmetry : str
        RELION point group: C1, Cn, Dn (also T, O, I).
    box : int or None
        Output box (voxels, even). Default: the largest particle box in A divided by
        ``pixel_size_A``, rounded up to even.
    pixel_size_A : float or None
        Output voxel size (A). Default: the finest particle pixel size.
    nthreads : int
        Threads for finufft and FFTs (0 = all cores).
    eps : float
        finufft accuracy (relative to the sum of |strengths| of a batch).
    regularization : str or float
        ``"fsc"``: Wiener term from the SSNR of the pilot half-map FSC (SSNR = FSC / (1 - FSC)
        per shell, doubled for the full map); a number tau > 0: constant SSNR = 1 / tau.
    max_iter : int
        Conjugate-gradient iterations at most per map (0 = direct Fourier inversion only).
        Within the resolved range 10 iterations change shells by < 0.5 %, 20 by < 0.01 %
        (box 128, 2000 particles per half).
    tol : float
        Stop when ||b - (H + Lambda) f|| / ||b|| is below this.
    batch_points : int
        Fourier points (pixels x symmetry operators) per finufft call; the point buffer
        takes 28 bytes per point, finufft another ~8 during a call (default: ~0.5 GB).
    """

    mag: bool = True
    scale: bool = True
    symmetry: str = "C1"
    box: int | None = None
    pixel_size_A: float | None = None
    nthreads: int = 0
    eps: float = 1e-4
    regularization: str | float = "fsc"
    max_iter: int = 20
    tol: float = 1e-2
    batch_points: int = 12_000_000

    def __post_init__(self) -> None:
        symmetry_operators(self.symmetry)  # validates the name
        if isinstance(self.regularization, str):
            if self.regularization != "fsc":
                try:
                    self.regularization = float(self.regularization)
                except ValueError:
                    raise ValueError(
                        f"regularization must be 'fsc' or a number tau > 0, got "
                        f"{self.regularization!r}"
                    ) from None
        if not isinstance(self.regularization, str) and not self.regularization > 0:
            raise ValueError(f"regularization tau must be > 0, got {self.regularization}")
        if self.box is not None and (self.box < 8 or self.box % 2):
            raise ValueError(f"box must be an even number >= 8, got {self.box}")
        if self.pixel_size_A is not None and not self.pixel_size_A > 0:
            raise ValueError(f"pixel size must be > 0, got {self.pixel_size_A}")
        if self.max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {self.max_iter}")


@dataclass
class ReconstructResult:
    """Maps, FSC and bookkeeping of a reconstruction.

    Attributes
    ----------
    half1, half2, full : ndarray, shape (N, N, N)
        Maps indexed [z, y, x], voxel centre N // 2 at the origin.
    pixel_size_A : float
    freq : ndarray, shape (N // 2,)
        Shell frequencies (1/A).
    fsc : ndarray, shape (N // 2,)
        FSC between the final half maps.
    resolution_A : float
        FSC = 0.143 resolution.
    fsc_pilot : ndarray, shape (N // 2,)
        FSC of the direct-inversion pilot half maps (source of the SSNR; NaN with a constant
        regularisation).
    info : dict
        Particle counts, iterations, timings, options.
    files : dict
        Paths written (empty without ``out``).
    """

    half1: np.ndarray
    half2: np.ndarray
    full: np.ndarray
    pixel_size_A: float
    freq: np.ndarray
    fsc: np.ndarray
    resolution_A: float
    fsc_pilot: np.ndarray
    info: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    @property
    def box(self) -> int:
        return int(self.full.shape[0])

    def summary(self) -> dict:
        """JSON-serialisable summary (the content of fsc.json)."""
        return {
            "pixel_size_A": self.pixel_size_A,
            "box": self.box,
            "resolution_A": self.resolution_A,
            "resolution_0.5_A": resolution_at(self.freq, self.fsc, 0.5),
            "frequency_1_per_A": self.freq.tolist(),
            "fsc": self.fsc.tolist(),
            "fsc_pilot": [None if not np.isfinite(v) else float(v) for v in self.fsc_pilot],
            **self.info,
        }


# ----------------------------------------------------------------------------- helpers
def output_grid(ps: ParticleSet, box: int | None, pixel_size_A: float | None) -> tuple[int, float]:
    """Output box and voxel size: defaults are the finest pixel and the largest box in A."""
    apix = ps.pixel_sizes_A()
    boxes = ps.boxes_px().astype(float)
    used = np.unique(ps.group_index())
    a_out = float(pixel_size_A) if pixel_size_A is not None else float(apix[used].min())
    if box is None:
        extent = float((boxes[used] * apix[used]).max())
        n = int(np.ceil(extent / a_out - 1e-6))
        box = n + (n % 2)
    return int(box), a_out


def _particle_mags(ps: ParticleSet, mag: bool | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(geometry M, CTF M) per particle, each shape (N, 2, 2).

    The CTF is always evaluated as the file describes it (at the file's M times k), so that
    the defocus written for that M keeps its meaning; ``mag`` only changes the geometry.
    """
    n = len(ps)
    gidx = ps.group_index()
    if all(c in ps.particles.columns for c in MAGMAT_COLUMNS):
        file_m = ps.particles[list(MAGMAT_COLUMNS)].to_numpy(float).reshape(n, 2, 2)
    else:
        file_m = ps.mag_matrices()[gidx]
    if isinstance(mag, bool | np.bool_):
        geom_m = file_m if mag else np.broadcast_to(np.eye(2), (n, 2, 2))
        return np.ascontiguousarray(geom_m), file_m
    m = np.asarray(mag, float)
    if m.shape == (2, 2):
        m = np.broadcast_to(m, (n, 2, 2))
    elif m.ndim == 3 and m.shape[0] == ps.n_groups and m.shape[0] != n:
        m = m[gidx]
    if m.shape != (n, 2, 2):
        raise ValueError(
            f"mag array must have shape (2, 2), ({ps.n_groups}, 2, 2) or ({n}, 2, 2); "
            f"got {np.asarray(mag).shape}"
        )
    return np.ascontiguousarray(m), file_m


def _half_index(ps: ParticleSet) -> np.ndarray:
    halves = ps.half_sets()
    bad = ~np.isin(halves, (1, 2))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ParticleDataError(
            f"{ps.name}: particle row {row + 1}: rlnRandomSubset is {halves[row]} (expected 1 or 2)"
        )
    if not ((halves == 1).any() and (halves == 2).any()):
        raise ParticleDataError(
            f"{ps.name}: both half sets need particles (rlnRandomSubset has only "
            f"{sorted(set(halves.tolist()))})"
        )
    return halves - 1


def write_map(path: Path, volume: np.ndarray, pixel_size_A: float, inputs=()) -> None:
    """Write a map as MRC (mode 2) with the voxel size in the header, atomically."""
    import warnings

    import mrcfile

    from cryomag.io.atomic import atomic_write

    with atomic_write(path, inputs) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.new(tmp, overwrite=True) as m:
                m.set_data(np.ascontiguousarray(volume, dtype=np.float32))
                m.voxel_size = float(pixel_size_A)
                m.update_header_stats()


def _check_finite_maps(half1: np.ndarray, half2: np.ndarray, full: np.ndarray) -> None:
    """Final guard: a map with NaN / inf values (or all zero) is an error, never an output."""
    for name, vol in (("half map 1", half1), ("half map 2", half2), ("full map", full)):
        finite = np.isfinite(vol)
        if not finite.all():
            raise ParticleDataError(
                f"reconstruction failed: the {name} has {int((~finite).sum())} non-finite "
                "voxel(s) (NaN or inf); nothing was written. Check the particles' CTF values "
                "and images (every input is validated, so please report this case)"
            )
        if not np.any(vol):
            raise ParticleDataError(
                f"reconstruction failed: the {name} is all zero (no particle contributed); "
                "nothing was written"
            )


# ------------------------------------------------------------------------------ engine
def run_reconstruct(
    ps: ParticleSet,
    image_source,
    options: ReconstructOptions | None = None,
    mag: bool | np.ndarray | None = None,
    progress: bool = True,
) -> ReconstructResult:
    """The reconstruction engine on loaded inputs (see :func:`reconstruct` for files).

    Parameters
    ----------
    ps : ParticleSet
    image_source : ImageSource-like
        ``read(rows) -> float32 (n, box, box)`` for rows of one optics group.
    options : ReconstructOptions
    mag : bool or ndarray, optional
        Overrides ``options.mag``; an array gives M per group (G, 2, 2) or per particle
        (N, 2, 2) for the slice geometry (the CTF stays as the file describes it).
    progress : bool
        Show a progress bar.
    """
    from cryomag.execution.local import progress_bar

    opts = options or ReconstructOptions()
    ps.validate()
    t0 = time.perf_counter()
    box, a_out = output_grid(ps, opts.box, opts.pixel_size_A)
    gidx = ps.group_index()
    halves = _half_index(ps)
    geom_m, ctf_m = _particle_mags(ps, opts.mag if mag is None else mag)
    rot = euler_to_matrix(ps.euler_deg())
    origin = ps.origin_A()
    bp = Backprojector(
        box,
        a_out,
        n_sets=2,
        symmetry=opts.symmetry,
        eps=opts.eps,
        nthreads=opts.nthreads,
        flush_points=opts.batch_points,
    )
    n_ops = len(bp.ops)
    log.info(
        "reconstruct: %d particles, %d optics group(s) -> box %d at %.4f A, symmetry %s "
        "(%d operators), mag %s, scale %s",
        len(ps),
        ps.n_groups,
        box,
        a_out,
        opts.symmetry,
        n_ops,
        "given" if mag is not None and not isinstance(mag, bool) else opts.mag,
        opts.scale,
    )
    t_read = t_prep = 0.0
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("backprojecting", total=len(ps))
        for g, number in enumerate(ps.group_numbers()):
            optics = ps.optics_params(number)
            a_g = optics.pixel_size_A
            mask, kx, ky = half_plane_pixels(optics.box, a_g)
            # images are read in small batches (bounded float64 temporaries of the CTF); the
            # Backprojector gathers their points into large finufft calls
            per_read = int(np.clip(READ_POINTS // max(1, kx.size), 1, 4096))
            for h in (0, 1):
                rows_gh = np.flatnonzero((gidx == g) & (halves == h))
                for start in range(0, rows_gh.size, per_read):
                    rows = rows_gh[start : start + per_read]
                    t1 = time.perf_counter()
                    images = image_source.read(rows)
                    t2 = time.perf_counter()
                    spectra = centered_rfft2(images)[:, mask]
                    del images
                    geom = ps.geometry(rows, geom_m[rows], ctf_m[rows], ctf_scale=opts.scale)
                    ctf = ctf_at(geom, optics, kx, ky)
                    odd = odd_factor(geom, optics, kx, ky)
                    if odd is not None:  # the adjoint of exp(+i phase_odd(M k)), |odd| = 1
                        spectra = spectra * odd.conj()
                    amp = np.linalg.det(geom_m[rows]) * (a_out / a_g) ** 2
                    bp.insert(h, spectra, kx, ky, ctf, amp, rot[rows], geom_m[rows], origin[rows])
                    t_read += t2 - t1
                    t_prep += time.perf_counter() - t2
                    bar.advance(task, rows.size)
        t_prep -= bp.seconds_nufft
        bp.release()
    t_insert = time.perf_counter() - t0
    log.info(
        "backprojection: %.1f s (read %.1f s, FFT + CTF + points %.1f s, finufft %.1f s), "
        "%.0f particles/s",
        t_insert,
        t_read,
        t_prep,
        bp.seconds_nufft,
        len(ps) / max(t_insert, 1e-9),
    )

    # ---- solve
    t5 = time.perf_counter()
    ops = [bp.operator(0), bp.operator(1)]
    op_full = ops[0] + ops[1]
    b = [bp.rhs(0), bp.rhs(1)]
    del bp.psi  # the operators hold what is needed (memory)
    if opts.regularization == "fsc":
        lam0 = [wiener_lambda(op, SSNR_PILOT)[0] for op in ops]
        pilot = [op.solve(bi, lam, max_iter=0)[0] for op, bi, lam in zip(ops, b, lam0, strict=True)]
        freq, fsc_pilot = fsc(pilot[0], pilot[1], a_out)
        f = np.clip(fsc_pilot, 1e-3, 0.999)
        ssnr_half = f / (1 - f)
        ssnr_full = 2 * ssnr_half
    else:
        tau = float(opts.regularization)
        ssnr_half = ssnr_full = np.full(box // 2, 1.0 / tau)
        pilot = [None, None]
        fsc_pilot = np.full(box // 2, np.nan)
    halves_out = []
    iters = []
    for h in (0, 1):
        lam, _ = wiener_lambda(ops[h], ssnr_half)
        m, info = ops[h].solve(b[h], lam, max_iter=opts.max_iter, tol=opts.tol)
        halves_out.append(m)
        iters.append(info)
        log.info(
            "half map %d: %d CG iterations, residual %.2e", h + 1, info.iterations, info.residual
        )
    lam, _ = wiener_lambda(op_full, ssnr_full)
    full, info_full = op_full.solve(
        b[0] + b[1],
        lam,
        x0=0.5 * (halves_out[0] + halves_out[1]),
        max_iter=opts.max_iter,
        tol=opts.tol,
    )
    iters.append(info_full)
    log.info("full map: %d CG iterations, residual %.2e", info_full.iterations, info_full.residual)
    _check_finite_maps(halves_out[0], halves_out[1], full)
    freq, curve = fsc(halves_out[0], halves_out[1], a_out)
    res = resolution_at(freq, curve, 0.143)
    t6 = time.perf_counter()
    log.info("FSC = 0.143 at %.2f A (solve %.1f s)", res, t6 - t5)
    n_half = [int((halves == 0).sum()), int((halves == 1).sum())]
    info = {
        "n_particles": len(ps),
        "n_particles_half": n_half,
        "symmetry": opts.symmetry,
        "mag": "given" if mag is not None and not isinstance(mag, bool) else bool(opts.mag),
        "scale": bool(opts.scale),
        "regularization": opts.regularization,
        "cg_iterations": [i.iterations for i in iters],
        "cg_residual": [i.residual for i in iters],
        "timings": {
            "backprojection_s": t_insert,
            "read_s": t_read,
            "fft_ctf_s": t_prep,
            "finufft_s": bp.seconds_nufft,
            "solve_s": t6 - t5,
            "total_s": t6 - t0,
            "particles_per_s": len(ps) / max(t6 - t0, 1e-9),
        },
        "options": {k: v for k, v in asdict(opts).items()},
        "groups": [
            {
                "optics_group": int(num),
                "pixel_size_A": ps.optics_params(num).pixel_size_A,
                "box": ps.optics_params(num).box,
                "n_particles": len(ps.group_rows(num)),
            }
            for num in ps.group_numbers()
        ],
    }
    return ReconstructResult(
        halves_out[0], halves_out[1], full, a_out, freq, curve, res, fsc_pilot, info
    )


def plot_fsc(result: ReconstructResult, path: Path, title: str | None = None) -> Path:
    """Plot the half-map FSC with the 0.143 and 0.5 thresholds (PNG)."""
    from cryomag.report.html import plot_fsc_curves

    label = f"half maps ({result.resolution_A:.2f} A at 0.143)"
    return plot_fsc_curves([(label, result.freq, result.fsc)], path, title=title)


def write_outputs(result: ReconstructResult, out: Path, inputs=(), command: str | None = None):
    """Write half1.mrc, half2.mrc, map.mrc, fsc.json and fsc.png into ``out``."""

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, vol in (("half1", result.half1), ("half2", result.half2), ("map", result.full)):
        p = out / f"{name}.mrc"
        write_map(p, vol, result.pixel_size_A, inputs)
        files[name] = p
    summary = result.summary()
    if command:
        summary["command"] = command
    write_json(out / "fsc.json", summary, inputs)
    files["fsc_json"] = out / "fsc.json"
    files["fsc_png"] = plot_fsc(result, out / "fsc.png", title=str(out.name))
    return files


def reconstruct(
    particles,
    out=None,
    *,
    mag: bool | np.ndarray = True,
    scale: bool = True,
    symmetry: str = "C1",
    box: int | None = None,
    pixel_size_A: float | None = None,
    nthreads: int = 0,
    angpix: float | None = None,
    passthrough=None,
    image_source=None,
    progress: bool = True,
    command: str | None = None,
    allow_negative_cs: bool | None = None,
    max_defocus_um: float | None = None,
    **options,
) -> ReconstructResult:
    """Reconstruct half maps, full map and FSC from particles with known poses (Python API).

    Parameters
    ----------
    particles : path or ParticleSet
        RELION STAR or cryoSPARC .cs (with ``passthrough``), or a loaded set.
    out : path, optional
        Output folder: half1.mrc, half2.mrc, map.mrc (voxel size in the header), fsc.json,
        fsc.png, cryomag.log. Nothing is written when None.
    mag : bool or ndarray
        True: the file's magnification matrices (rlnMagMat); False: identity; an array:
        M per group (G, 2, 2) or per particle (N, 2, 2). Only the slice geometry changes:
        the CTF is evaluated as the file describes it (at the file's M k).
    scale : bool
        Use rlnCtfScalefactor (per-particle contrast scale).
    symmetry : str
        RELION point group (C1, Cn, Dn, T, O, I).
    box, pixel_size_A : optional
        Output grid (default: the largest particle box in A at the finest pixel size).
    nthreads : int
        Threads (0 = all cores).
    image_source : optional
        Object with ``read(rows)``; default ``ImageSource(particles)``.
    command : str, optional
        Command line recorded in fsc.json and the log.
    **options
        Other fields of :class:`ReconstructOptions` (eps, regularization, max_iter, tol,
        batch_points).

    allow_negative_cs, max_defocus_um : optional
        Relaxed validation limits for reading ``particles`` (see
        :mod:`cryomag.model.validation`).

    Returns
    -------
    ReconstructResult

    Raises
    ------
    ParticleDataError
        Invalid input (named file, row, column), or a reconstruction with non-finite values
        (final guard: nothing is written then).
    OutputFolderError
        ``out`` is an input folder or is locked by another run (before any work).

    Examples
    --------
    >>> res = cryomag.reconstruction("particles.star", out="recon")  # doctest: +SKIP
    >>> res.resolution_A, res.full.shape  # doctest: +SKIP
    """
    from cryomag.io import ImageSource, read_particles
    from cryomag.io.outdir import check_out_not_input, output_folder

    ps = particles
    inputs: list[Path] = []
    if not isinstance(ps, ParticleSet):
        inputs.append(Path(ps))
    if passthrough is not None:
        inputs.append(Path(passthrough))
    if out is not None:
        check_out_not_input(out, inputs)  # before reading anything
    if not isinstance(ps, ParticleSet):
        ps = read_particles(
            ps,
            angpix=angpix,
            passthrough=passthrough,
            allow_negative_cs=allow_negative_cs,
            max_defocus_um=max_defocus_um,
        )
    opts = ReconstructOptions(
        mag=mag if isinstance(mag, bool) else True,
        scale=scale,
        symmetry=symmetry,
        box=box,
        pixel_size_A=pixel_size_A,
        nthreads=nthreads,
        **options,
    )
    with (
        output_folder(out, "reconstruct", inputs=inputs, particles=ps) as out,
        run_log(out) as out,
    ):
        if command:
            log.info("command: %s", command)
        log.info("reconstruct: particles from %s", ps.name)
        src = image_source if image_source is not None else ImageSource(ps)
        res = run_reconstruct(
            ps, src, opts, mag=None if isinstance(mag, bool) else mag, progress=progress
        )
        if out is not None:
            res.files = write_outputs(res, out, inputs, command=command)
            log.info("wrote %s", ", ".join(str(p) for p in res.files.values()))
    return res
