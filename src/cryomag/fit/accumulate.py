"""One chunk of particles -> its sufficient statistics (the hot loop of ``cryomag estimate``).

The quantities are defined in :mod:`cryomag.fit.statistics`; this module computes them fast:

- one 3D evaluation per particle and pass: the central slice V(M k) on the disc of the
  (padded) observed grid, batched over the chunk in as few non-uniform FFTs as memory
  allows (:data:`MAX_POINTS` points each; the map keeps its upsampled grid, so a call only
  interpolates); with ``upsample_slices`` the window-aware model evaluates the particle's own
  grid and upsamples the slice by zero-padding its image (pad^2 times fewer 3D points), and
  with ``adaptive_window`` each particle's padded grid is as large as its own
  delocalisation needs;
- everything else is 2D, in single precision, in blocks of particles: the slice's frequency
  gradient (and, for the second-order statistics, its Hessian) as transforms of
  (-2 pi i x)^n q(x), q the slice's real image; the CTF, the shift phase and the box window
  from :mod:`cryomag.physics.grid` (the forward model's single-precision pieces, tested
  against :mod:`cryomag.physics.forward`); the box-periodic kernel moves the shift phase onto
  the data (Y exp(-2 pi i k.t)), so its model needs no phase;
- every weighted sum over pixels is an elementwise product of two float32 views of complex
  arrays (Re(conj(a) b) = a_re b_re + a_im b_im) reduced by one matrix product with the
  monomials w k^n the sum needs (1, k_b, k_b k_d or k_b k_d k_f: the derivative with respect
  to M_ab is (d/du_a) k_b, so the k factors come out of the pixel sums).

Two kernels share the set-up: :class:`PeriodicKernel` (the box-periodic model, RELION's) and
:class:`WindowedKernel` (predicted on a padded box, cut to the particle window); one frozen
:class:`KernelOptions` says what to accumulate.

Sums are accumulated by BLAS in float32 over at most a few thousand pixels and stored in
float64; against the definitions evaluated in float64 (derivatives by finite differences)
they agree to 1e-4 relative with the exact gradient and 2e-3 with the slice-image one
(tests/test_accumulate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cryomag.physics import fft as _fft
from cryomag.physics.forward import OpticsParams, ParticleGeometry, amplitude_factor
from cryomag.physics.fourier import rfft_freqs
from cryomag.physics.grid import GridCTF, WindowCut, padded_box_px, padded_rfft2, shift_phase32
from cryomag.physics.reference import MapReference, slice_values

from .aberrations import AberrationTerms
from .control_variate import regression_estimate
from .defocus_profile import RingProfile, ring_sums, search
from .projection import sandwich
from .statistics import Band, ChunkStatistics

__all__ = ["KernelOptions", "chunk_statistics", "geom_subset", "gradient_taper"]

#: Points per 3D evaluation (finufft call): ~320 MB of points and values in single precision
#: (a chunk of 1,024 box-128 particles in one call, in two with the window padding 2).
MAX_POINTS = 16_000_000

_F32 = np.float32
_C64 = np.complex64


@dataclass(frozen=True)
class KernelOptions:
    """What :func:`chunk_statistics` accumulates, and how.

    Attributes
    ----------
    window_pad : int
        1: box-periodic model (RELION's). >1: window-aware prediction: predict on a box
        ``window_pad`` times larger (every frequency up to the particle's Nyquist), go to
        real space, cut out the particle box and transform back, so that signal the CTF
        moves out of the box is missing from the prediction as it is from the data.
    extended : bool
        Also accumulate the derivatives through the CTF's defocus term (8 columns).
    exact_gradient : bool
        The slice gradient from three more 3D transforms instead of the slice image.
    second_order : int
        0: none. n >= 1: also accumulate the second-order statistics of the group model (see
        :mod:`cryomag.fit.relinearise`): Gauss-Newton can then re-linearise at a new M
        without another pass. For n > 1 the sums through the second derivatives (kyy, kp,
        jk) only for the particles with row % n == 0, multiplied by n (an unbiased estimate
        of their group total, which only enters the O(|dM|^2) correction of a step); jp,
        jy, jj always for every particle. The second derivatives come from the box-periodic
        model also when ``window_pad`` > 1.
    ctf_moves : bool or None
        Whether the group model's CTF defocus term moves with M (None: when the geometry's
        ``ctf_mag`` is None); decides which columns the second-order statistics describe.
    block : int
        Particles per block of the 2D arithmetic (divided by window_pad^2 when padded). 32:
        the default group fit's statistics passes 3-5 % faster than with 16 (5,000
        particles of box 128, bench/RESULTS.md, issue 14); the local models' the same.
    defocus : bool
        Also accumulate the derivatives with respect to each particle's defocus matrix
        Adef = (a00, a01, a11) (A) in the frame of the CTF's defocus term (d = ctf_mag k,
        chi_defocus = pi lambda d^T Adef d): 3 more columns after the others (see
        :mod:`cryomag.fit.statistics` for the layout). An isotropic defocus change dz is
        the combination (1, 0, 1).
    aberrations : AberrationTerms, optional
        Also accumulate the derivatives with respect to the group's aberration parameters
        (:mod:`cryomag.fit.aberrations`), one plain column each after all others: an odd
        parameter's is i (d phi_odd / d theta) P, an even one's (dCTF / dchi)
        (d chi / d theta) V, both at u = M k.
    upsample_slices : bool
        Window-aware model only: the slice values on the padded grid (and the exact
        gradient's) from one 3D evaluation on the particle's own grid, upsampled by
        zero-padding the slice's image in real space (trigonometric interpolation, exact for
        a projection inside the box) instead of a 3D evaluation on the padded grid (pad^2
        times the points). Against the padded 3D evaluation (eps 1e-3) the values differ by
        0.03-1 % rms per shell below 0.9 Nyquist (the map's density beyond the box and
        finufft's own error); the fitted M by a small fraction of its standard error
        (bench/RESULTS.md, issue 14).
    defocus_profile : bool
        Box-periodic model only: also search each particle's isotropic defocus on its exact
        likelihood (:mod:`cryomag.fit.defocus_profile`): the best change from the pass's
        state and the curvature there (``dz_profile``). It needs no defocus columns: a
        warm-start pass without them uses it to see whether the input defocus is within the
        noise (:attr:`cryomag.fit.gauss_newton.GaussNewtonSettings.linear_start_probe`).
    padded_box : int
        Window-aware model only: the padded grid's size (px, even, above the box); 0:
        ``window_pad`` times the box. A size that is not a multiple of the box needs
        ``upsample_slices``.
    adaptive_window : bool
        Window-aware model with ``upsample_slices`` only: each particle predicted on the
        smallest padded grid that holds its own CTF-delocalised signal
        (:func:`cryomag.physics.grid.padded_box_px` at its largest defocus), at most
        ``window_pad`` times the box, instead of the group's largest. The prediction on
        a larger grid is the same where nothing wraps around it; the cost of a particle
        grows with the grid's area.
    pixel_maps : bool
        Also accumulate ``pix_a`` and ``pix_b``, the per-pixel sums of the displacement
        plot (:func:`cryomag.report.plots_estimate.displacement_images`), which shows a
        fit's first pass. Without them (the later passes) their shapes are (3, 0) and
        (2, 0); nothing else changes.
    lean_hessian : bool
        Window-aware group model with second-order statistics every n > 1 particles, and
        nothing else (no extended, defocus or aberration columns, no pixel maps, the CTF
        held): the gradient sums exact for every particle, the Gauss-Newton matrix
        (hpg, hgg, jp, jj) exact only for the curvature particles (row % n == 0). The
        others' gradient comes from one cut of the prediction and one of its adjoint
        (:meth:`cryomag.physics.grid.WindowCut.adjoint`) instead of a cut per column; their
        matrix is estimated from a proxy, the unwindowed columns' matrix on a subsample of
        the padded disc (every particle), by the regression estimator over the chunk's
        curvature particles (:func:`_lean_hessian`, :mod:`cryomag.fit.control_variate`);
        they are marked (``matrix_estimated``). The sums over the chunk are unbiased to
        O(1/n); the fit's fixed
        point (where the gradient vanishes) is the exact model's, and a step made with the
        estimated matrix differs from the exact step by the matrix's relative error times
        the step (bench/RESULTS.md, issue 14). Ignored where it does not apply.
    """

    window_pad: int = 1
    extended: bool = False
    exact_gradient: bool = False
    second_order: int = 0
    ctf_moves: bool | None = None
    block: int = 32
    defocus: bool = False
    aberrations: AberrationTerms | None = None
    upsample_slices: bool = False
    defocus_profile: bool = False
    padded_box: int = 0
    adaptive_window: bool = False
    pixel_maps: bool = True
    lean_hessian: bool = False


#: A chunk (or half of one) uses the lean matrix (``lean_hessian``) only with at least this
#: many curvature particles: the regression estimator's lines are fitted to them.
LEAN_MIN_EXACT = 16
#: The lean matrix's proxy is summed over every PROXY_STRIDE-th row and column of the padded
#: disc (only its correlation with the exact matrix matters: every third row gave the
#: group's matrix within 0.26 % instead of 0.19 %, bench/RESULTS.md, issue 14).
PROXY_STRIDE = 2


def chunk_statistics(
    reference: MapReference,
    spectra: np.ndarray,
    geom: ParticleGeometry,
    optics: OpticsParams,
    band: Band,
    noise_power: np.ndarray,
    rows: np.ndarray,
    options: KernelOptions | None = None,
) -> ChunkStatistics:
    """Accumulate the statistics of one chunk of particles of one optics group.

    Parameters
    ----------
    reference : MapReference
    spectra : ndarray, complex, shape (N, box, box // 2 + 1)
        Centred rfft2 of the particle images.
    geom : ParticleGeometry
        ``mag`` = current M0 (per group, or per particle), ``ctf_mag`` = the frame of the
        CTF's defocus term (the input's M: CTF fixed as measured), None: the whole CTF moves
        with M (defocus in the true frame).
    optics : OpticsParams
    band : Band
    noise_power : ndarray, shape (n_shells + 1,)
        sigma^2 per radial shell (E |noise(k)|^2); weights are 1 / sigma^2.
    rows : ndarray, shape (N,)
        Particle indices in the full set.
    options : KernelOptions, optional
    """
    opts = options or KernelOptions()
    n = len(geom)
    mag = np.asarray(geom.mag, float)
    if opts.ctf_moves is None:
        opts = replace(opts, ctf_moves=geom.ctf_mag is None)
    if mag.ndim == 3 or (geom.ctf_mag is not None and np.ndim(geom.ctf_mag) == 3):
        # per-particle matrices: blocks of one particle (never on the engine's hot path)
        parts = []
        for i in range(n):
            sub = geom_subset(geom, slice(i, i + 1))
            sub.mag = np.asarray(sub.mag, float).reshape(-1, 2, 2)[0]
            if sub.ctf_mag is not None:
                sub.ctf_mag = np.asarray(sub.ctf_mag, float).reshape(-1, 2, 2)[0]
            parts.append(
                chunk_statistics(
                    reference, spectra[i : i + 1], sub, optics, band, noise_power,
                    np.asarray(rows)[i : i + 1], replace(opts, block=1),
                )
            )  # fmt: skip
        return ChunkStatistics.concatenate(parts, rows)
    rows = np.asarray(rows)
    if opts.defocus_profile and max(int(opts.window_pad), 1) > 1:
        raise ValueError("the defocus search needs the box-periodic model (window_pad 1)")
    windowed = max(int(opts.window_pad), 1) > 1
    kernel = WindowedKernel if windowed else PeriodicKernel
    kern = kernel(reference, geom, optics, band, noise_power, opts)
    val, grad = kern.slices(geom)
    y_all = np.asarray(spectra).reshape(n, -1)[:, kern.band_idx].astype(_C64)
    exact = np.ones(n, bool)
    if kern.lean:
        exact = rows % kern.stride == 0
        if exact.sum() < LEAN_MIN_EXACT or exact.all():
            exact[:] = True
    if not (windowed and opts.adaptive_window) and exact.all():
        return ChunkStatistics.from_blocks(
            _blocks(kern, geom, np.arange(n), val, grad, y_all, rows, opts.block), rows
        )
    kernels = [(kern, np.arange(n))]
    if windowed and opts.adaptive_window:
        if not kern.upsample:
            raise ValueError("adaptive_window needs upsample_slices")
        # each particle on the smallest padded grid that holds its delocalised signal: one
        # 3D evaluation on the particle grid (above), one kernel per padded size
        sizes = padded_box_px(kern.box, kern.apix, _delocalisation(geom, kern), kern.big)
        kernels = [
            (kern if size == kern.big else kernel(
                reference, geom, optics, band, noise_power, replace(opts, padded_box=int(size))
            ), np.flatnonzero(sizes == size))
            for size in np.unique(sizes)
        ]  # fmt: skip
    parts, order = [], []
    for k_s, idx in kernels:
        # the curvature particles (exact matrix) apart from the others (lean_hessian)
        for sel, lean in ((idx[exact[idx]], False), (idx[~exact[idx]], True)):
            if len(sel):
                parts += _blocks(k_s, geom, sel, val, grad, y_all, rows, opts.block, lean)
                order.append(sel)
    if not exact.all():
        _lean_hessian(parts)
    order = np.concatenate(order)
    return ChunkStatistics.from_blocks(parts, rows[order]).take(np.argsort(order))


def _lean_hessian(parts: list[dict]) -> None:
    """Fill in the lean particles' matrix (``lean_hessian``), in place: each element of the
    (5, 5) matrix of P and M's four columns from the particle's proxy ``_gt`` by the
    regression estimator over the exact particles (:func:`regression_estimate`: intercept
    and slope, the window's loss being a fraction of the proxy that grows with the
    particle's delocalisation). The chunk's total is then the exact particles' own plus an
    estimate of the others' unbiased to O(1/n). Their gradient sums ``_jr`` (<J, r>) are
    exact, so jy = <J, r> + s <J, P> carries the estimate only through s <J, P>."""
    known = [p for p in parts if "_gx" in p]
    lean = [p for p in parts if p.get("_lean")]
    est = regression_estimate(np.concatenate([p["_gt"] for p in known]),
                              np.concatenate([p["_gx"] for p in known]),
                              np.concatenate([p["_gt"] for p in lean]))  # fmt: skip
    at = 0
    for p in lean:
        g = est[at : at + len(p["_gt"])]
        at += len(g)
        s = p["_s"]
        jp, jj = g[:, 0, 1:5], g[:, 1:5, 1:5]
        p["hpg"] = s[:, None] * jp
        p["hgg"] = (s * s)[:, None, None] * jj
        if "jp" in p:
            p["jp"], p["jj"] = jp, jj
            p["jy"] = p["_jr"] + s[:, None] * jp


def _blocks(kern, geom, idx, val, grad, y_all, rows, block: int, lean: bool = False
            ) -> list[dict]:  # fmt: skip
    """The block statistics of the chunk's particles ``idx`` (in that order) by ``kern``,
    in blocks of ``block`` particles at the box's size (fewer on a padded grid); ``lean``:
    the lean matrix's particles (:attr:`KernelOptions.lean_hessian`)."""
    step = max(int(block) * kern.box**2 // kern.big**2, 1)
    parts = []
    for lo in range(0, len(idx), step):
        sl = idx[lo : lo + step]
        n = len(sl)
        if sl[-1] - sl[0] == len(sl) - 1:
            sl = slice(int(sl[0]), int(sl[-1]) + 1)  # contiguous: views, not copies
        out = kern.block(geom, sl, val[sl], None if grad is None else grad[sl], y_all[sl],
                         rows[sl], lean)  # fmt: skip
        out["matrix_estimated"] = np.full(n, bool(lean))
        parts.append(out)
    return parts


def _delocalisation(geom: ParticleGeometry, kern: _Kernel) -> np.ndarray:
    """How far each particle's CTF moves signal in the band at most (A): the defocus term
    at its larger defocus and the band's highest frequency plus the group's Cs and
    aberration terms (:meth:`cryomag.physics.grid.GridCTF.delocalisation_A`)."""
    dz = np.maximum(np.abs(geom.defocus_u_A), np.abs(geom.defocus_v_A))
    return kern.ctf_band.delocalisation_A(dz, kern.band.kmax)


def gradient_taper(k: np.ndarray, kmax: float, nyquist: float) -> np.ndarray:
    """Taper of the slice before its image-based derivatives, float32, same shape as ``k``.

    The derivative dV/du of a central slice is taken as the transform of -2 pi i x q(x), q
    the slice's real image. Cut sharply at the grid's Nyquist disc, q has slowly decaying
    (jinc) tails that wrap around the box, and x q(x) is then wrong near the disc's edge:
    1-3 % rms per shell in the band. Tapered smoothly to zero between the band's edge and
    Nyquist (raised cosine), the image is compact and the derivatives at the band's pixels
    (where the taper is 1) are within 0.1-0.4 % of the exact 3D gradient (box 128 at
    1.25 A, band to 0.86 Nyquist; bench/RESULTS.md, issue 14). Used by the box-periodic
    model only.

    Parameters
    ----------
    k : ndarray
        |k| of the pixels (1/A).
    kmax : float
        The band's upper edge (1/A): the taper is 1 up to it.
    nyquist : float
        The grid's Nyquist frequency (1/A): the taper is 0 beyond it.
    """
    k = np.asarray(k, float)
    k0 = min(float(kmax), float(nyquist))
    width = float(nyquist) - k0
    if width <= 0:
        return (k <= nyquist).astype(_F32)
    t = np.clip((k - k0) / width, 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(_F32)


def geom_subset(geom: ParticleGeometry, sl: slice | np.ndarray) -> ParticleGeometry:
    """The particles ``sl`` (a slice or indices) of a :class:`ParticleGeometry` (group-wide
    matrices kept)."""
    from dataclasses import fields

    out = {}
    for f in fields(geom):
        v = getattr(geom, f.name)
        if v is None or (f.name in ("mag", "ctf_mag") and np.ndim(v) == 2):
            out[f.name] = v
        else:
            out[f.name] = np.asarray(v)[sl]
    return ParticleGeometry(**out)


def _slices_batched(reference, geom, kx, ky, gradient: bool):
    """Central-slice values (and exact gradients) of every particle, MAX_POINTS per call.

    Returns (value, grad or None), shapes (N, npix) and (N, npix, 2), complex64.
    """
    n = len(geom)
    ntrans = 4 if gradient else 1
    per_call = max(1, MAX_POINTS // max(len(kx) * ntrans, 1))
    val = np.empty((n, len(kx)), _C64)
    grad = np.empty((n, len(kx), 2), _C64) if gradient else None
    for i in range(0, n, per_call):
        sl = slice(i, min(n, i + per_call))
        got = slice_values(reference, geom.euler_deg[sl], geom.mag, kx, ky, gradient)
        if gradient:
            val[sl], grad[sl] = got
        else:
            val[sl] = got
    return val, grad


def _padded_size(box: int, opts: KernelOptions) -> int:
    """The model grid's size (px): the box (box-periodic), ``padded_box``, or ``window_pad``
    times the box."""
    pad = max(int(opts.window_pad), 1)
    if pad == 1:
        return int(box)
    return int(opts.padded_box) if opts.padded_box else pad * int(box)


def _positions(flat: np.ndarray, disc_flat: np.ndarray, size: int) -> np.ndarray:
    """Index of each flat grid pixel ``flat`` among the disc's pixels ``disc_flat``."""
    pos = np.full(size, -1)
    pos[disc_flat] = np.arange(len(disc_flat))
    out = pos[flat]
    if (out < 0).any():
        raise ValueError("band pixels beyond Nyquist")
    return out


def _x_uncentred(box: int, pixel_size_A: float) -> np.ndarray:
    """Real-space coordinate (A) of each index of an unshifted (origin at 0) image axis."""
    i = np.arange(box)
    return (((i + box // 2) % box) - box // 2) * pixel_size_A


class _Kernel:
    """Shared per-chunk set-up (grids, CTF constants, monomials) and the per-block work.

    Subclasses say where the model lives (the band of the box grid, or the disc of a padded
    grid) and how its sums are formed; the columns of the model and its derivatives are
    built once, here.
    """

    def __init__(self, reference, geom, optics, band, noise_power, opts: KernelOptions):
        self.ref = reference
        self.band = band
        self.extended = bool(opts.extended)
        self.defocus = bool(opts.defocus)
        self.exact = bool(opts.exact_gradient)
        self.stride = max(int(opts.second_order), 0)
        self.second = self.stride > 0
        self.pixel_maps = bool(opts.pixel_maps)
        self.ctf_moves = bool(opts.ctf_moves)
        self.aberr = opts.aberrations if opts.aberrations is not None and len(
            opts.aberrations) else None  # fmt: skip
        self._abasis = None
        self.cs_mm = float(optics.cs_mm)
        self.beam_tilt = tuple(float(v) for v in getattr(optics, "beam_tilt_mrad", (0.0, 0.0)))
        box, apix = band.box, band.pixel_size_A
        self.box, self.apix = box, apix
        self.big = big = _padded_size(box, opts)
        # the model's grid is `pad` times the box's (1: box-periodic; 0: a padded size that
        # is not a multiple of the box, whose pixels then do not hold the box grid's)
        self.pad = pad = big // box if big % box == 0 else 0
        kxb, kyb = rfft_freqs(big, apix)
        self.disc = np.hypot(kxb, kyb) <= 0.5 / apix
        self.disc_flat = np.flatnonzero(self.disc.ravel())
        self.kxd, self.kyd = kxb[self.disc], kyb[self.disc]
        # the disc of the particle's own grid (the 3D evaluation when upsampling)
        self.upsample = big > box and bool(opts.upsample_slices)
        if pad == 0 and not self.upsample:
            raise ValueError(
                f"a padded grid of {big} px is not a multiple of the box ({box} px): "
                "it needs upsample_slices"
            )
        kx1, ky1 = rfft_freqs(box, apix)
        disc1 = np.hypot(kx1, ky1) <= 0.5 / apix
        self.disc1_flat = np.flatnonzero(disc1.ravel())
        self.kx1, self.ky1 = kx1[disc1], ky1[disc1]
        # box-periodic model: the slice-image derivatives are taken of the slice tapered
        # beyond the band (:func:`gradient_taper`; the model's own values are not). Not
        # with a window: the padded columns' values between the band and Nyquist reach
        # the band through the cut, and the taper would change them.
        self.taper = (
            gradient_taper(np.hypot(self.kxd, self.kyd), band.kmax, 0.5 / apix) if pad == 1
            else None
        )  # fmt: skip
        self.band_idx = np.flatnonzero(band.mask.ravel())
        rows_b, cols_b = np.divmod(self.band_idx, box // 2 + 1)
        fy = np.rint(np.fft.fftfreq(box) * box).astype(int)
        # band pixels inside the particle grid's disc (the upsampled models' box values)
        self.band_in_disc1 = _positions(rows_b * (box // 2 + 1) + cols_b, self.disc1_flat,
                                        box * (box // 2 + 1))  # fmt: skip
        self.band_in_disc = self.box_rows = self.box_cols = None
        if pad:
            # band pixels inside the big grid (row j -> pad j mod big, column i -> pad i)
            big_flat = ((pad * fy[rows_b]) % big) * (big // 2 + 1) + pad * cols_b
            self.band_in_disc = _positions(big_flat, self.disc_flat, big * (big // 2 + 1))
            # the box grid inside the big grid (its rows and columns), for the box-periodic
            # second derivatives of a padded model
            self.box_rows = (pad * fy) % big
            self.box_cols = pad * np.arange(box // 2 + 1)
        self.m0 = np.asarray(geom.mag, float)
        self.minv = np.linalg.inv(self.m0)
        self.cm = None if geom.ctf_mag is None else np.asarray(geom.ctf_mag, float)
        self.amp = float(amplitude_factor(self.m0, reference.pixel_size_A, optics.pixel_size_A)[0])
        w = (1.0 / noise_power[band.shell]).astype(float)
        self.w = w
        kx, ky = band.kx, band.ky
        self.kx_b, self.ky_b = kx, ky
        # monomials w k^n on the band, repeated for the (re, im) float view
        mono = {
            1: np.stack([w], 1),
            2: np.stack([w * kx, w * ky], 1),
            3: np.stack([w * kx * kx, w * kx * ky, w * ky * ky], 1),
            4: np.stack([w * kx**3, w * kx * kx * ky, w * kx * ky * ky, w * ky**3], 1),
        }
        self.mono = {k: _Mono(np.repeat(v, 2, axis=0)) for k, v in mono.items()}
        self.w2 = np.repeat(w, 2).astype(_F32)
        self.shell = band.shell
        self.nsh = band.n_shells + 1
        self.k2_f32 = (kx * kx + ky * ky).astype(_F32)
        self._xcache: dict[int, list[np.ndarray]] = {}
        # CTF grids: the band (box grid) and, when padded, the big disc
        optics_args = (optics.voltage_kv, optics.cs_mm, optics.amplitude_contrast)
        # the group's fixed aberrations (held fixed; they act at u = M k and move with M)
        self.aberrations = {
            "even_zernike": optics.even_coefficients(),
            "odd_zernike": optics.odd_coefficients(),
        }
        self.ctf_band = GridCTF(kx, ky, self.m0, self.cm, *optics_args, **self.aberrations)
        self.lam = self.ctf_band.lam
        self.rings: RingProfile | None = None  # the defocus search (box-periodic only)
        # the Cs term's chi derivatives on the band, float32 (second-order sums)
        g = [self.ctf_band.gcs[a].astype(_F32) for a in range(2)]
        self.so_shared = {
            "g": g,
            "gg": {(a, c): g[a] * g[c] for a, c in _AC},
            "hm": {ac: self.ctf_band.hcs[i].astype(_F32) for i, ac in enumerate(_AC)},
        }
        # w g_i g_j on the band (pairs _CHI_PAIRS), g the phase derivatives of the joint
        # fit's parameters, repeated for the float view (_chi_curvature)
        self._chi_w = None
        if self.defocus:
            gcs, dq = self.ctf_band.gcs, self.ctf_band.dq
            k = (kx, ky)
            g = [gcs[a] * k[b] for a in range(2) for b in range(2)]
            g += [np.pi * self.lam * dq[i] for i in range(3)]
            self._chi_w = np.repeat(
                np.stack([w * g[i] * g[j] for i, j in _CHI_PAIRS], 1), 2, axis=0
            ).astype(_F32)

    def _chi_curvature(self, p: np.ndarray, r: np.ndarray, factor: np.ndarray) -> np.ndarray:
        """The residual's term of the second derivative of rr / 2 through the CTF's phase,
        which Gauss-Newton leaves out, in the joint fit's parameters (M00, M01, M10, M11,
        a00, a01, a11), shape (b, 7, 7).

        The parameters move the phase by g_i = d chi / d theta_i (M through the Cs term,
        g = (d chi_Cs / du_a) k_b; the defocus matrix through chi_defocus, g = pi lambda dq_i),
        and d2 CTF / d chi2 = -CTF, so d2P / d theta_i d theta_j contains -g_i g_j P, whose
        term -s sum w Re(conj(d2P) r) is ``factor`` sum w g_i g_j Re(conj(p) r), with ``p``
        the prediction on the band (b, npix) whose scale times ``factor`` (b,) is s P, and
        ``r`` the residual. Left out: the terms through the reference's second derivatives
        and through dCTF/dchi times the reference's gradient. Without defocus columns shape
        (b, 0, 0): nothing is stored.
        """
        if self._chi_w is None:
            return np.zeros((len(p), 0, 0))
        out = np.zeros((len(p), 7, 7))
        c = ((_F32view(p) * _F32view(r)) @ self._chi_w).astype(float)
        c *= np.asarray(factor, float)[:, None]
        for k, (i, j) in enumerate(_CHI_PAIRS):
            out[:, i, j] = out[:, j, i] = c[:, k]
        return out

    def slices(self, geom):
        """3D evaluation of the chunk on the disc of the (padded) grid; with
        ``upsample_slices``, on the disc of the particle's grid (see :meth:`_upsample`)."""
        if self.upsample:
            return _slices_batched(self.ref, geom, self.kx1, self.ky1, self.exact)
        return _slices_batched(self.ref, geom, self.kxd, self.kyd, self.exact)

    def _box_image(self, values: np.ndarray) -> np.ndarray:
        """Values (b, n) on the particle grid's disc -> the slice's real image (unshifted,
        box x box, float32)."""
        nb, box = len(values), self.box
        grid = np.zeros((nb, box * (box // 2 + 1)), _C64)
        grid[:, self.disc1_flat] = values
        return self._image(grid.reshape(nb, box, box // 2 + 1))

    def _upsample(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slice values on the particle grid's disc (b, n1) -> (values on the padded grid's
        disc (b, n_disc), the slice's box image (b, box, box)).

        The padded grid's values are the transform of the box image zero-padded to the big
        box: the trigonometric interpolation of the box-grid samples (their values at the
        box grid's frequencies are kept exactly).
        """
        q1 = self._box_image(values)
        spec = padded_rfft2(q1, self.big).reshape(len(values), -1)[:, self.disc_flat]
        return spec.astype(_C64, copy=False), q1

    # ------------------------------------------------------------------ the model's grid
    #: The CTF on the model's pixels (set by the subclass).
    model_ctf: GridCTF
    #: Flat rfft indices of the model's pixels on the (padded) grid.
    model_pick: np.ndarray

    #: Observed frequencies (1/A) of the model's pixels, (kx, ky) (set by the subclass).
    model_k: tuple[np.ndarray, np.ndarray]

    def _aberration_basis(self) -> tuple[np.ndarray, np.ndarray]:
        """The fitted aberrations' (even, odd) parts at u = M0 k on the model's pixels,
        float32 (K, npix) each (:meth:`cryomag.fit.aberrations.AberrationTerms.parts`), and
        which parameters have a non-zero part of each kind, (K,) each."""
        if self._abasis is None:
            kx, ky = self.model_k
            m = self.m0
            ux, uy = m[0, 0] * kx + m[0, 1] * ky, m[1, 0] * kx + m[1, 1] * ky
            even, odd = self.aberr.parts(ux, uy, self.lam, self.cs_mm, self.beam_tilt)
            self._abasis = (even.astype(_F32), odd.astype(_F32),
                            np.any(even, axis=1), np.any(odd, axis=1))  # fmt: skip
        return self._abasis

    def _aberration_columns(self, pt, slope, v_model) -> list[np.ndarray]:
        """d prediction / d theta of each fitted aberration parameter on the model grid:
        (dCTF/dchi) (d chi/d theta) V + i (d phi_odd/d theta) P (V and P with the odd
        factor)."""
        if self.aberr is None:
            return []
        even, odd, has_even, has_odd = self._aberration_basis()
        cols = []
        for j in range(len(self.aberr)):
            col = None
            if has_even[j]:
                col = slope * even[j] * v_model
            if has_odd[j]:
                o = _C64(1j) * odd[j] * pt
                col = o if col is None else col + o
            cols.append(col if col is not None else np.zeros_like(pt))
        return cols

    #: Whether the defocus term's columns (extended, defocus) are formed from the three
    #: columns of the quadratic monomials (:data:`_QUAD`) rather than one by one.
    quadratic_basis = False

    #: Whether the kernel forms the lean matrix (:attr:`KernelOptions.lean_hessian`; only
    #: the window-aware kernel can).
    lean = False

    def _model_values(self, val: np.ndarray) -> np.ndarray:
        """The slice values (on the disc) at the model's pixels."""
        raise NotImplementedError

    def _on_band(self, arr: np.ndarray) -> np.ndarray:
        """Model-grid values at the band pixels."""
        raise NotImplementedError

    # ------------------------------------------------------------------ per-block pieces
    def _coords(self, n: int) -> list[np.ndarray]:
        """x' = M^-T x on an unshifted n x n image (A), float32: d/du_a of V(u) at u = M k
        is the transform of -2 pi i x'_a q(x), since V(M k) = sum_x q(x) exp(-2 pi i k.x)."""
        if n not in self._xcache:
            x = _x_uncentred(n, self.apix)
            xx, yy = x[None, :], x[:, None]
            mi = self.minv
            self._xcache[n] = [(mi[0, a] * xx + mi[1, a] * yy).astype(_F32) for a in range(2)]
        return self._xcache[n]

    def _derivatives(self, q, order: int, pick, padded: bool = False) -> list[np.ndarray]:
        """d/du (order 1: x, y) or d2/du2 (order 2: xx, xy, yy) of V at u = M k.

        ``q``: the slice's real image (unshifted, n x n, from :meth:`_image`); returned at the
        flat rfft-grid indices ``pick`` as complex64 arrays (b, npix). ``padded``: ``q`` is
        the box image and the transforms are of it zero-padded to the big grid.
        """
        xs = self._coords(q.shape[-1])
        if order == 1:
            facs, c = [xs[0], xs[1]], -2j * np.pi
        else:
            facs, c = [xs[0] * xs[0], xs[0] * xs[1], xs[1] * xs[1]], -4 * np.pi * np.pi
        nb = len(q)
        out = []
        for fac in facs:
            if padded:
                spec = padded_rfft2(q * fac, self.big).reshape(nb, -1)[:, pick]
            else:
                spec = _fft.rfft2(q * fac).reshape(nb, -1)[:, pick]
            spec *= _C64(c)
            out.append(spec)
        return out

    @staticmethod
    def _image(f_grid) -> np.ndarray:
        """The real image (unshifted) of a spectrum on a full rfft grid, float32."""
        n = f_grid.shape[-2]
        return _fft.irfft2(f_grid, n)

    def _box_hessian(self, f_big, q_big=None):
        """d2V/du2 (xx, xy, yy) at the band from the box-grid samples of the slice (with
        ``upsample_slices``, ``q_big`` is the box image itself)."""
        if self.upsample:
            return self._derivatives(q_big, 2, self.band_idx)
        if self.pad == 1:
            q = q_big if q_big is not None else self._image(f_big)
        else:
            q = self._image(f_big[:, self.box_rows][:, :, self.box_cols])
        return self._derivatives(q, 2, self.band_idx)

    def block(self, geom, sl, val, grad, y, rows, lean: bool = False):
        """Statistics of the particles ``sl`` of ``geom`` (see :class:`ChunkStatistics`);
        ``lean``: without their exact matrix (:attr:`KernelOptions.lean_hessian`)."""
        sub = geom_subset(geom, sl)
        nb = len(val)
        f_big = q_big = None
        q_box = box_vals = None
        if self.upsample:
            box_vals = (val, grad)  # on the particle grid's disc
            # the box image of the slice: derivatives from it, padded (no big inverse FFT)
            val, q_box = self._upsample(val)
            if grad is not None:
                # dV/du is the transform of -2 pi i x q(x), an imaginary image: upsample
                # i dV/du (a real image's, Hermitian) and multiply back
                grad = np.stack(
                    [self._upsample(_C64(1j) * grad[..., a])[0] * _C64(-1j) for a in range(2)], -1
                )
            if not self.exact:
                du = self._derivatives(q_box, 1, self.model_pick, padded=True)
        elif not self.exact or self.second:
            # the slice on the (padded) grid, tapered for pad 1: only its derivatives are
            # taken
            f_big = np.zeros((nb, self.big * (self.big // 2 + 1)), _C64)
            f_big[:, self.disc_flat] = val if self.taper is None else val * self.taper
            f_big = f_big.reshape(nb, self.big, self.big // 2 + 1)
        # first derivatives in u on the model grid (band for pad 1, disc otherwise)
        if self.exact:
            du = self._model_values(grad)
            du = [du[..., 0], du[..., 1]]
        elif not self.upsample:
            q_big = self._image(f_big)
            du = self._derivatives(q_big, 1, self.model_pick)
        v_model = self._model_values(val)
        grid = self.model_ctf
        # the odd aberrations: V -> exp(i phase_odd(u)) V, with their u-derivative
        v_model, du_model = grid.apply_odd(v_model, du)
        ctf, slope, adef = grid.of(sub)
        pt = ctf * v_model
        # d/du_a of C V: the reference term and the CTF's Cs term (the part that moves with M)
        hcols = [
            ctf * du_model[a] + (slope * grid.gcs[a].astype(_F32)) * v_model for a in range(2)
        ]
        hdef = None
        dcols = []
        quad = []
        if self.quadratic_basis:
            # the windowed model: the defocus term's columns are combinations of three
            # windowed columns (see _QUAD)
            if self.extended:
                quad.append(self._hdef_coefficients(adef))
            if self.defocus:
                quad.append(np.broadcast_to(self._dq_coef, (nb, 3, 3)))
        else:
            if self.extended or self.ctf_moves:
                # the defocus term's derivative
                hdef = [slope * g * v_model for g in grid.chi_defocus_grad(adef)]
                if self.extended:
                    hcols += hdef
            if self.defocus:
                # d/da_i of C V through chi_defocus = pi lambda (a00, a01, a11) . dq
                c = np.pi * self.lam
                dcols = [slope * (c * grid.dq[i]).astype(_F32) * v_model for i in range(3)]
        dcols += self._aberration_columns(pt, slope, v_model)
        out = self._first_order(sub, pt, hcols, y, hdef, dcols,
                                (quad, slope * v_model) if quad else None, lean)  # fmt: skip
        out["pix_aberr"] = (
            self._aberration_maps(sub, pt, slope * v_model, y, out)
            if self.aberr is not None
            else np.zeros(0)
        )
        out["dz_profile"] = (
            search(
                ring_sums(self.rings, ctf, slope, v_model, out["_yt"], self.w),
                self.rings,
                out["rr"] / out["npix"],
            )
            if self.rings is not None
            else np.zeros((nb, 2))
        )
        if self.second:
            q_hess = q_box if self.upsample else q_big
            out.update(self._second_order(sub, rows, f_big, q_hess, val, du, adef, (ctf, slope),
                                          out, y, box_vals))  # fmt: skip
        return out

    def _shells(self, p_rr, p_yy, ss, n: int) -> dict[str, np.ndarray]:
        """Per-shell sums of |r|^2, |Y|^2, |s P|^2 (products over the float view) and counts."""
        shell, nsh = self.shell, self.nsh
        return {
            "shell_rr": np.bincount(shell, _pairsum(p_rr.sum(0)), minlength=nsh),
            "shell_yy": np.bincount(shell, _pairsum(p_yy.sum(0)), minlength=nsh),
            "shell_ss": np.bincount(shell, _pairsum(ss), minlength=nsh),
            "shell_n": np.bincount(shell, minlength=nsh).astype(float) * n,
        }

    # ------------------------------------------------------------------ second order
    def _band_slice(self, pick, val, du, box_vals, q_box):
        """The slice V and its first derivatives dV/du at the band pixels (the box grid) of
        the block's particles ``pick``: from the model grid where it holds the box grid's
        pixels, else from the particle grid's values ``box_vals`` (values, exact gradient or
        None) and the box image ``q_box``."""
        if self.band_in_disc is not None:
            return val[pick][:, self.band_in_disc], [self._on_band(d[pick]) for d in du]
        v1, g1 = box_vals
        v = v1[pick][:, self.band_in_disc1]
        if g1 is not None:
            return v, [g1[pick][:, self.band_in_disc1, a] for a in range(2)]
        return v, self._derivatives(q_box[pick], 1, self.band_idx)

    def _second_order(self, sub, rows, f_big, q_big, val, du, adef, model_ctf, first, y,
                      box_vals=None):  # fmt: skip
        """Second-order statistics of the group model (see :mod:`cryomag.fit.relinearise`).

        jp, jy, jj (first derivatives) for every particle; kyy, kp, jk (through the second
        derivatives) for the particles with row % stride == 0, multiplied by the stride.
        """
        amp = self.amp
        f = _F32view
        m3 = self.mono[3]
        nb = len(val)
        jp = np.zeros((nb, 4))
        jy = np.zeros((nb, 4))
        jj = np.zeros((nb, 4, 4))
        kyy = np.zeros((nb, 4, 4))
        kp = np.zeros((nb, 4, 4))
        jk = np.zeros((nb, 4, 4, 4))
        out = {"jp": jp, "jy": jy, "jj": jj, "kyy": kyy, "kp": kp, "jk": jk}
        if first.get("_lean"):
            return out  # jp, jy, jj from _lean_hessian; no curvature particles here
        self._first_derivative_sums(first, jp, jy, jj)
        # the curvature sums, on every stride-th particle
        pick = np.flatnonzero(np.asarray(rows) % self.stride == 0)
        if not len(pick):
            return out
        weight = float(self.stride)
        sub = geom_subset(sub, pick)
        hk = self._box_hessian(None if f_big is None else f_big[pick],
                               None if q_big is None else q_big[pick])  # fmt: skip
        v, dub = self._band_slice(pick, val, du, box_vals, q_big)
        if self.ctf_band.odd is not None:  # V -> exp(i phase_odd(u)) V, to second order
            v, dub, hk = self.ctf_band.apply_odd(v, dub, hk)
        hu = {(0, 0): hk[0], (0, 1): hk[1], (1, 1): hk[2]}
        adef = adef[pick]
        ctf, slope = self._band_ctf(sub, pick, model_ctf)
        so = self.so_shared
        if self.ctf_moves:
            c = 2 * np.pi * self.lam
            gdef = self.ctf_band.chi_defocus_grad(adef)
            g_raw = [so["g"][a] + gdef[a] for a in range(2)]
            gg = {(a, cc): g_raw[a] * g_raw[cc] for a, cc in _AC}
            hm = {
                (a, cc): so["hm"][a, cc] + (c * adef[:, a, cc, None]).astype(_F32) for a, cc in _AC
            }
        else:
            g_raw, gg, hm = so["g"], so["gg"], so["hm"]
        gm = [slope * g_raw[a] for a in range(2)]  # dCTF/du_a through the moving chi
        qs = [
            ctf * hu[a, cc]
            + gm[a] * dub[cc]
            + gm[cc] * dub[a]
            + (slope * hm[a, cc] - ctf * gg[a, cc]) * v
            for a, cc in _AC
        ]
        left_y, left_p, jsrc = self._curvature_left(sub, pick, first, y)
        kyy_s = np.zeros((len(pick), 4, 4))
        kp_s = np.zeros((len(pick), 4, 4))
        jk_s = np.zeros((len(pick), 4, 4, 4))
        for (a, cc), qi in zip(_AC, qs, strict=True):
            qyv = m3.dot(f(qi) * f(left_y))
            qpv = m3.dot(f(qi) * f(left_p))
            for b in range(2):
                for d in range(2):
                    kyy_s[:, a * 2 + b, cc * 2 + d] = kyy_s[:, cc * 2 + d, a * 2 + b] = qyv[
                        :, b + d
                    ]
                    kp_s[:, a * 2 + b, cc * 2 + d] = kp_s[:, cc * 2 + d, a * 2 + b] = qpv[:, b + d]
            self._jk_sums(qi, jsrc, jk_s, a, cc)
        kyy[pick] = weight * amp * kyy_s
        kp[pick] = weight * amp * amp * kp_s
        jk[pick] = weight * amp * amp * jk_s
        return out


class PeriodicKernel(_Kernel):
    """The box-periodic model (RELION's): predicted on the particle's own grid, at the band
    pixels only; the shift phase is moved onto the data."""

    def __init__(self, reference, geom, optics, band, noise_power, opts):
        super().__init__(reference, geom, optics, band, noise_power, opts)
        self.model_ctf = self.ctf_band
        self.model_pick = self.band_idx
        self.model_k = (self.kx_b, self.ky_b)
        if opts.defocus_profile:
            dq = self.ctf_band.dq
            self.rings = RingProfile(dq[0] + dq[2], self.lam)

    def _model_values(self, val):
        return val[:, self.band_in_disc]

    def _on_band(self, arr):
        return arr

    def _first_order(self, sub, pt, hcols, y, hdef, dcols, quad=None, lean=False):
        return self._stats_periodic(sub, pt, hcols, y, hdef if self.ctf_moves else None, dcols)

    def _aberration_maps(self, sub, pt, dv, y, out):
        """Per-pixel sums of the phase- and amplitude-error maps
        (:data:`cryomag.fit.statistics.ABERRATION_MAPS`), shape (4, npix_band)."""
        yt = y * shift_phase32(sub.origin_A, self.kx_b, self.ky_b).conj()
        return _aberration_map_sums(_scale(out) * self.amp, pt, yt, dv)  # s * amp

    def _stats_periodic(self, sub, pt, hcols, y, hdef, dcols=()):
        amp = self.amp
        phase = shift_phase32(sub.origin_A, self.kx_b, self.ky_b)
        yt = y * phase.conj()
        f = _F32view
        m1, m2, m3 = self.mono[1].col(0), self.mono[2], self.mono[3]
        p_pp, p_py, p_yy = f(pt) * f(pt), f(pt) * f(yt), f(yt) * f(yt)
        pp_t, py_t, yy = p_pp @ m1, p_py @ m1, p_yy @ m1
        ok = pp_t > 0
        sa = np.where(ok, py_t / np.where(ok, pp_t, 1), 0.0)  # s * amp
        r = yt - sa.astype(_F32)[:, None] * pt
        p_rr = f(r) * f(r)
        nc = len(hcols)
        ncol = 4 * (nc // 2)
        nd = len(dcols)
        hpg = np.zeros((len(pt), ncol + nd))
        bg = np.zeros((len(pt), ncol + nd))
        hgg = np.zeros((len(pt), ncol + nd, ncol + nd))
        maps = self.pixel_maps
        pix_b = np.zeros((2, len(self.kx_b) if maps else 0))
        pix_a = np.zeros((3, len(self.kx_b) if maps else 0))
        sa32, sa2 = sa.astype(_F32), (sa * sa).astype(_F32)

        def col(ci, b):
            return (ci // 2) * 4 + (ci % 2) * 2 + b

        raw_p, raw_y, raw_q = {}, {}, {}
        for ci, h in enumerate(hcols):
            p_ph, p_hy = f(pt) * f(h), f(h) * f(yt)
            lin_p, lin_y = m2.dot(p_ph), m2.dot(p_hy)
            raw_p[ci], raw_y[ci] = lin_p, lin_y
            for b in range(2):
                hpg[:, col(ci, b)] = sa * amp * lin_p[:, b]
                bg[:, col(ci, b)] = sa * (lin_y[:, b] - sa * lin_p[:, b])
            if ci < 2 and maps:
                pix_b[ci] = _pairsum(sa32 @ p_hy - sa2 @ p_ph)
            for cj in range(ci, nc):
                p_hh = f(h) * f(hcols[cj])
                quad = m3.dot(p_hh)
                raw_q[ci, cj] = raw_q[cj, ci] = quad
                if ci < 2 and cj < 2 and maps:
                    pix_a[ci + cj] = _pairsum(sa2 @ p_hh)
                for b in range(2):
                    for d in range(2):
                        v = sa * sa * quad[:, b + d]
                        hgg[:, col(ci, b), col(cj, d)] = v
                        hgg[:, col(cj, d), col(ci, b)] = v
        # the plain (one-parameter) columns: the defocus matrix
        for j, dc in enumerate(dcols):
            cj = ncol + j
            lin_p = (f(pt) * f(dc)) @ m1
            hpg[:, cj] = sa * amp * lin_p
            bg[:, cj] = sa * ((f(dc) * f(yt)) @ m1 - sa * lin_p)
            for ci, h in enumerate(hcols):
                cross = m2.dot(f(h) * f(dc))
                for b in range(2):
                    hgg[:, col(ci, b), cj] = hgg[:, cj, col(ci, b)] = sa * sa * cross[:, b]
            for jj, dc2 in enumerate(dcols[j:], start=j):
                v = sa * sa * ((f(dc) * f(dc2)) @ m1)
                hgg[:, cj, ncol + jj] = hgg[:, ncol + jj, cj] = v
        out = {
            "npix": np.full(len(pt), float(self.band.npix)),
            "yy": yy.astype(float),
            "pp": (amp * amp * pp_t).astype(float),
            "py": (amp * py_t).astype(float),
            "rr": (p_rr @ m1).astype(float),
            "hpg": hpg,
            "hgg": hgg,
            "bg": bg,
            **self._shells(p_rr, p_yy, sa2 @ p_pp, len(pt)),
            "pix_a": pix_a,
            "pix_b": pix_b,
        }
        out["chi_curv"] = self._chi_curvature(pt, r, sa)
        out["_pt"] = pt  # unit-amplitude model without phase, for the second-order sums
        out["_yt"] = yt
        out["_hg"] = hcols[:2] if hdef is None else [hcols[a] + hdef[a] for a in range(2)]
        # unscaled sums of the group model's columns (+ the defocus ones when the CTF moves)
        parts = [(0,), (1,)] if hdef is None else [(0, 2), (1, 3)]
        out["_raw"] = (
            [sum(raw_p[i] for i in parts[a]) for a in range(2)],
            [sum(raw_y[i] for i in parts[a]) for a in range(2)],
            {
                (a, c): sum(raw_q[i, j] for i in parts[a] for j in parts[c])
                for a in range(2)
                for c in range(2)
            },
        )
        return out

    # ------------------------------------------------------------------ second order
    def _first_derivative_sums(self, first, jp, jy, jj):
        amp = self.amp
        raw_p, raw_y, raw_q = first["_raw"]
        for a in range(2):
            for b in range(2):
                jp[:, a * 2 + b] = amp * amp * raw_p[a][:, b]
                jy[:, a * 2 + b] = amp * raw_y[a][:, b]
            for c2 in range(2):
                for b in range(2):
                    for d in range(2):
                        jj[:, a * 2 + b, c2 * 2 + d] = amp * amp * raw_q[a, c2][:, b + d]

    def _band_ctf(self, sub, pick, model_ctf):
        return model_ctf[0][pick], model_ctf[1][pick]  # the model grid is the band

    def _curvature_left(self, sub, pick, first, y):
        left_y, left_p = first["_yt"][pick], first["_pt"][pick]
        hg = [h[pick] for h in first["_hg"]]
        return left_y, left_p, hg

    def _jk_sums(self, qi, hg, jk_s, a, cc):
        f = _F32view
        m4 = self.mono[4]
        for e in range(2):
            cub = m4.dot(f(hg[e]) * f(qi))
            for fi in range(2):
                for b in range(2):
                    for d in range(2):
                        v3 = cub[:, fi + b + d]
                        jk_s[:, e * 2 + fi, a * 2 + b, cc * 2 + d] = v3
                        jk_s[:, e * 2 + fi, cc * 2 + d, a * 2 + b] = v3


class WindowedKernel(_Kernel):
    """The window-aware model: predicted on the disc of a grid ``window_pad`` times larger,
    then cut to the particle box (:class:`cryomag.physics.grid.WindowCut`)."""

    def __init__(self, reference, geom, optics, band, noise_power, opts):
        super().__init__(reference, geom, optics, band, noise_power, opts)
        self.model_ctf = GridCTF(self.kxd, self.kyd, self.m0, self.cm, optics.voltage_kv,
                                 optics.cs_mm, optics.amplitude_contrast,
                                 **self.aberrations)  # fmt: skip
        self.model_pick = self.disc_flat
        self.model_k = (self.kxd, self.kyd)
        self._window = WindowCut(self.box, self.big, self.disc_flat, self.band_idx)
        kx, ky = self.kxd.astype(_F32), self.kyd.astype(_F32)
        self._kd32 = (kx, ky)
        self._quad_monomials = (kx * kx, kx * ky, ky * ky)  # the order of _QUAD
        self._dq_coef = self._dq_coefficients()
        self.lean = bool(
            opts.lean_hessian and self.stride > 1 and not self.extended and not self.defocus
            and self.aberr is None and not self.pixel_maps and not self.ctf_moves
        )  # fmt: skip
        if self.lean:
            self._lean_setup(noise_power)

    def _lean_setup(self, noise_power: np.ndarray) -> None:
        """Constants of the lean matrix (:attr:`KernelOptions.lean_hessian`): the band's
        weights (float32), the disc's (kx, ky) for the gradient sums in the float view, and
        the proxy's subsample of the disc (every PROXY_STRIDE-th row and column of the
        padded grid) with the band's weight there times box^2 / big^2 (the cut's density),
        amp^2, 1/2 on the self-conjugate columns and PROXY_STRIDE^2 (the subsample)."""
        band, big, box = self.band, self.big, self.box
        self._w32 = self.w.astype(_F32)
        # (kx, ky) times the adjoint's weight per disc pixel, for the float view
        kw = np.stack([self.kxd, self.kyd], 1) * self._window.adjoint_weight[:, None]
        self._kd_rep = np.repeat(kw, 2, axis=0).astype(_F32)
        row, col = np.divmod(self.disc_flat, big // 2 + 1)
        k = np.hypot(self.kxd, self.kyd)
        shell = band.shell_index(k)
        sub = PROXY_STRIDE
        pick = (row % sub == 0) & (col % sub == 0) & (k >= band.kmin) & (k <= band.kmax) & (k > 0)
        w = float(sub * sub) * box**2 / big**2 * self.amp**2
        w = w / np.asarray(noise_power, float)[shell[pick]]
        w[(col[pick] == 0) | (col[pick] == big // 2)] *= 0.5
        self._proxy_idx = np.flatnonzero(pick)
        self._proxy_w2 = np.repeat(w, 2).astype(_F32)
        self._proxy_k = (self.kxd[pick].astype(_F32), self.kyd[pick].astype(_F32))

    def _proxy_gram(self, pt: np.ndarray, hcols: list[np.ndarray]) -> np.ndarray:
        """The proxy matrix (b, 5, 5) of P and M's columns (phase h_a k_b) from their
        unwindowed values on the disc's subsample, float64: ``pt`` = C V and ``hcols`` =
        h_a on the disc, without the shift phase (the products of two columns do not see
        it: |phase| = amp, in the weights)."""
        i = self._proxy_idx
        kx, ky = self._proxy_k
        cols = [pt[:, i]]
        for h in hcols:
            hs = h[:, i]
            cols += [hs * kx, hs * ky]
        zf = _F32view(np.stack(cols, 1))
        return np.matmul(zf * self._proxy_w2, np.swapaxes(zf, 1, 2)).astype(float)

    def _stats_lean(self, sub, pt, hcols, y):
        """The sums of the lean particles (:attr:`KernelOptions.lean_hessian`): everything
        but the matrix (hpg, hgg and the second-order jp, jj, jy, set by
        :func:`_lean_hessian`) exact, from the cut prediction and the adjoint of the
        weighted residual; ``_jr`` the exact <J_i, r>, ``_gt`` the proxy."""
        amp = self.amp
        phase = shift_phase32(sub.origin_A, self.kxd, self.kyd) * _C64(amp)
        z0 = self._window(phase * pt)
        f = _F32view
        one = self.mono[1].col(0)
        zf = f(z0)
        pp = ((zf * zf) @ one).astype(float)
        py = ((zf * f(y)) @ one).astype(float)
        s, r, out = self._fit_sums(z0, y, pp, py)
        # Re sum conj(phase h_a k_b) A = Re sum conj(h_a) k_b conj(phase) A
        adj = self._window.adjoint(r * self._w32, weighted=False)
        adj = f(adj * phase.conj())
        nb = len(y)
        jr = np.empty((nb, 4))
        for a, h in enumerate(hcols):
            jr[:, 2 * a : 2 * a + 2] = (f(h) * adj) @ self._kd_rep
        return {
            **out,
            "hpg": np.zeros((nb, 4)),
            "hgg": np.zeros((nb, 4, 4)),
            "bg": s[:, None] * jr,
            **self._pixel_maps(None, r, s),
            "chi_curv": np.zeros((nb, 0, 0)),
            "_lean": True,
            "_s": s,
            "_jr": jr,
            "_gt": self._proxy_gram(pt, hcols),
            "_nk": 4,
        }

    def _fit_sums(self, z0, y, pp, py) -> tuple[np.ndarray, np.ndarray, dict]:
        """From the windowed prediction ``z0`` (b, npix), the data ``y`` and their sums
        ``pp``, ``py``: the closed-form scale s (b,), the residual r = y - s z0, and the
        sums of the fit (npix, yy, pp, py, rr and the per-shell sums)."""
        f = _F32view
        one = self.mono[1].col(0)
        ok = pp > 0
        s = np.where(ok, py / np.where(ok, pp, 1), 0.0)
        r = y - s.astype(_F32)[:, None] * z0
        p_rr = f(r) * f(r)
        p_yy = f(y) * f(y)
        p_pp = f(z0) * f(z0)
        sums = {
            "npix": np.full(len(z0), float(self.band.npix)),
            "yy": (p_yy @ one).astype(float),
            "pp": pp,
            "py": py,
            "rr": (p_rr @ one).astype(float),
            **self._shells(p_rr, p_yy, (s * s).astype(_F32) @ p_pp, len(z0)),
        }
        return s, r, sums

    def _model_values(self, val):
        return val

    def _on_band(self, arr):
        return arr[:, self.band_in_disc]

    quadratic_basis = True

    def _first_order(self, sub, pt, hcols, y, hdef, dcols, quad=None, lean=False):
        if lean:
            return self._stats_lean(sub, pt, hcols, y)
        return self._stats_windowed(sub, pt, hcols, y, dcols, quad)

    def _hdef_coefficients(self, adef: np.ndarray) -> np.ndarray:
        """The extended columns (d chi_defocus / du_a) k_b (dCTF/dchi) V on the quadratic
        monomials: d chi_defocus / du_a = 2 pi lambda (Adef C k)_a with d = C k (C the CTF
        frame), so column (a, b) is sum_e 2 pi lambda (Adef C)_ae k_e k_b; shape (b, 4, 3)."""
        c = self.m0 if self.cm is None else self.cm
        ac = 2 * np.pi * self.lam * (adef @ c)
        out = np.zeros((len(adef), 4, 3))
        for a in range(2):
            for b in range(2):
                for e in range(2):
                    out[:, 2 * a + b, _QUAD[e][b]] += ac[:, a, e]
        return out

    def _dq_coefficients(self) -> np.ndarray:
        """The defocus columns pi lambda dq_i (dCTF/dchi) V on the quadratic monomials
        (dq = d_x^2, 2 d_x d_y, d_y^2 with d = C k); shape (3, 3)."""
        c = self.m0 if self.cm is None else self.cm
        (c00, c01), (c10, c11) = c
        return np.pi * self.lam * np.array([
            [c00 * c00, 2 * c00 * c01, c01 * c01],
            [2 * c00 * c10, 2 * (c00 * c11 + c01 * c10), 2 * c01 * c11],
            [c10 * c10, 2 * c10 * c11, c11 * c11],
        ])  # fmt: skip

    def _aberration_maps(self, sub, pt, dv, y, out):
        """Per-pixel sums of the phase- and amplitude-error maps of the windowed model
        (:data:`cryomag.fit.statistics.ABERRATION_MAPS`), shape (4, npix_band)."""
        phase = shift_phase32(sub.origin_A, self.kxd, self.kyd) * _C64(self.amp)
        return _aberration_map_sums(_scale(out), out["_zb"][:, 0], y, self._window(phase * dv))

    def _stats_windowed(self, sub, pt, hcols, y, dcols=(), quad=None):
        """The windowed model's sums. ``quad``: (coefficient arrays (b, n, 3), (dCTF/dchi)
        V) of the columns formed from the windowed quadratic monomials (the extended
        columns, then the defocus ones), placed after the columns of ``hcols``.

        The window cuts the basis: P, the columns of ``hcols`` times kx and ky, the three
        quadratic monomials, the columns of ``dcols``; their products with each other and
        with the data are one matrix product, and the quadratic columns' products follow
        from the basis's by their coefficients (:meth:`_basis_map`, float64), without
        forming the columns (:meth:`_column` forms one where it is needed). Without
        ``quad`` the columns are the basis and the sums the same arithmetic as forming them.
        """
        amp = self.amp
        phase = shift_phase32(sub.origin_A, self.kxd, self.kyd) * _C64(amp)
        kx, ky = self._kd32
        padded = [phase * pt]
        for h in hcols:
            hp = phase * h
            padded += [hp * kx, hp * ky]
        n_direct = len(padded)
        if quad is not None:
            sv = phase * quad[1]
            padded += [sv * m for m in self._quad_monomials]
        padded += [phase * dc for dc in dcols]
        # one window cut per column (batching them all is slower: the grid leaves the
        # cache), into the basis array whose last row is the data
        nbasis = len(padded)
        zb = np.empty((len(y), nbasis + 1, len(self.band_idx)), _C64)
        for j, c in enumerate(padded):
            zb[:, j] = self._window(c)
        zb[:, nbasis] = y
        f = _F32view
        zf = f(zb)
        lhs = zf[:, :nbasis] * self.w2
        gb = np.matmul(lhs, np.swapaxes(zf, 1, 2)).astype(float)  # (b, nbasis, nbasis + 1)
        t = None
        if quad is None:
            g = gb  # (b, 1 + nc, 2 + nc): P, then dP/dM columns, then defocus, then y
        else:
            t = self._basis_map(n_direct, nbasis, quad[0])
            tg = np.matmul(t, gb)  # (b, 1 + nc, nbasis + 1)
            g = np.concatenate([np.matmul(tg[:, :, :nbasis], np.swapaxes(t, 1, 2)),
                                tg[:, :, nbasis:]], 2)  # fmt: skip
        nc = g.shape[1] - 1
        z0 = zb[:, 0]
        s, r, out = self._fit_sums(z0, y, g[:, 0, 0], g[:, 0, -1])
        out.update({
            "hpg": s[:, None] * g[:, 0, 1 : 1 + nc],
            "hgg": (s * s)[:, None, None] * g[:, 1 : 1 + nc, 1 : 1 + nc],
            "bg": s[:, None] * (g[:, 1 : 1 + nc, -1] - s[:, None] * g[:, 1 : 1 + nc, 0]),
            **self._pixel_maps(zb, r, s),
        })  # fmt: skip
        out["chi_curv"] = self._chi_curvature(z0, r, s)
        if self.lean:  # the control variate's exact and proxy matrices (lean_hessian)
            out["_gx"] = g[:, :5, :5]
            out["_gt"] = self._proxy_gram(pt, hcols)
        out["_g"] = g
        out["_zb"] = zb
        out["_t"] = t
        # the columns of M (k-expanded): the reference's, and the extended ones
        out["_nk"] = 2 * len(hcols) + (4 if self.extended else 0)
        return out

    @staticmethod
    def _basis_map(n_direct: int, nbasis: int, coefs) -> np.ndarray:
        """The columns (P, M's, the quadratic ones, then the others) as combinations of
        the cut basis (the first ``n_direct``, the three quadratic monomials, the others),
        float64 (b, 1 + nc, nbasis); ``coefs``: the quadratic columns' coefficient arrays
        (b, n, 3)."""
        coefs = [np.asarray(c, float) for c in coefs]
        nq = sum(c.shape[1] for c in coefs)
        n_rest = nbasis - n_direct - 3
        nb = len(coefs[0])
        t = np.zeros((nb, n_direct + nq + n_rest, nbasis))
        i = np.arange(n_direct)
        t[:, i, i] = 1.0
        at = n_direct
        for c in coefs:
            t[:, at : at + c.shape[1], n_direct : n_direct + 3] = c
            at += c.shape[1]
        j = np.arange(n_rest)
        t[:, at + j, n_direct + 3 + j] = 1.0
        return t

    @staticmethod
    def _column(first: dict, pick: np.ndarray, j: int) -> np.ndarray:
        """Column ``j`` of the windowed columns (P, M's, ...) of the particles ``pick``,
        complex64 (n, npix), from the cut basis and its map (:meth:`_stats_windowed`)."""
        zb, t = first["_zb"], first["_t"]
        if t is None:
            return zb[pick, j]
        tj = t[pick, j].astype(_F32)  # (n, nbasis)
        nz = np.flatnonzero(np.any(tj != 0, axis=0))
        out = np.zeros((len(tj), zb.shape[-1]), _C64)
        for k in nz:
            out += tj[:, k, None] * zb[pick, k]
        return out

    def _pixel_maps(self, z, r, s) -> dict[str, np.ndarray]:
        """``pix_a`` (3, npix_band) and ``pix_b`` (2, npix_band) from the windowed M columns
        ``z`` and residual ``r`` (``pixel_maps``; else shapes (3, 0) and (2, 0))."""
        if not self.pixel_maps:
            return {"pix_a": np.zeros((3, 0)), "pix_b": np.zeros((2, 0))}
        f = _F32view
        kxb, kyb = self.kx_b.astype(_F32), self.ky_b.astype(_F32)
        s32 = s.astype(_F32)[:, None]
        h = [s32 * (z[:, 1 + 2 * a] * kxb + z[:, 2 + 2 * a] * kyb) / self.k2_f32 for a in range(2)]
        return {
            "pix_a": np.stack(
                [
                    _pairsum((f(h[0]) * f(h[0])).sum(0)),
                    _pairsum((f(h[0]) * f(h[1])).sum(0)),
                    _pairsum((f(h[1]) * f(h[1])).sum(0)),
                ]
            ),
            "pix_b": np.stack([_pairsum((f(h[a]) * f(r)).sum(0)) for a in range(2)]),
        }

    # ------------------------------------------------------------------ second order
    def _moves(self, first) -> bool:
        return self.ctf_moves and first["_nk"] == 8  # the group column: ref + def

    def _first_derivative_sums(self, first, jp, jy, jj):
        g = first["_g"]
        nc = g.shape[1] - 1
        sel = np.zeros((nc, 4))
        sel[:4, :4] = np.eye(4)
        if self._moves(first):
            sel[4:8, :4] = np.eye(4)  # the extended columns (defocus ones after)
        jp[:] = g[:, 0, 1 : 1 + nc] @ sel
        jy[:] = g[:, 1 : 1 + nc, -1] @ sel
        jj[:] = sandwich(sel, g[:, 1 : 1 + nc, 1 : 1 + nc], sel)

    def _band_ctf(self, sub, pick, model_ctf):
        ctf, slope, _ = self.ctf_band.of(sub)
        return ctf, slope

    def _curvature_left(self, sub, pick, first, y):
        amp = self.amp
        moves = self._moves(first)
        phase = shift_phase32(sub.origin_A, self.kx_b, self.ky_b).conj()
        left_y = y[pick] * phase
        # the windowed columns carry amp; the sums below multiply by amp once more
        phase_a = phase * _C64(1.0 / amp)
        col = self._column
        left_p = col(first, pick, 0) * phase_a
        jcols = []
        for i in range(4):
            j = col(first, pick, 1 + i)
            if moves:  # the group column: the reference's and the CTF defocus term's
                j = j + col(first, pick, 5 + i)
            jcols.append(j * phase_a)
        return left_y, left_p, jcols

    def _jk_sums(self, qi, jcols, jk_s, a, cc):
        f = _F32view
        m3 = self.mono[3]
        for i in range(4):
            quad = m3.dot(f(jcols[i]) * f(qi))
            for b in range(2):
                for d in range(2):
                    jk_s[:, i, a * 2 + b, cc * 2 + d] = quad[:, b + d]
                    jk_s[:, i, cc * 2 + d, a * 2 + b] = quad[:, b + d]


_AC = ((0, 0), (0, 1), (1, 1))

#: The unique pairs (i, j) of the joint fit's 7 parameters (M's 4 elements, a00, a01, a11).
_CHI_PAIRS = tuple((i, j) for i in range(7) for j in range(i, 7))

#: Index of the quadratic monomial k_e k_b among (kx^2, kx ky, ky^2), by (e, b). The
#: columns through the CTF's defocus term are (dCTF/dchi) V times a quadratic form of k, with
#: per-particle coefficients: in the windowed model, three window cuts make all of them
#: (the cut is linear).
_QUAD = ((0, 1), (1, 2))


class _Mono:
    """Weighted monomials w k^n over the (re, im) float view, as contiguous float32 columns.

    ``dot(prod)``: prod (b, 2 npix) against every column, one BLAS matrix-vector product
    each (OpenBLAS's single-precision matrix product is 2-3x slower for 2-4 columns).
    """

    def __init__(self, cols: np.ndarray) -> None:
        self.cols = [np.ascontiguousarray(cols[:, i], dtype=_F32) for i in range(cols.shape[1])]

    def col(self, i: int) -> np.ndarray:
        return self.cols[i]

    def dot(self, prod: np.ndarray) -> np.ndarray:
        return np.stack([prod @ c for c in self.cols], axis=-1)


def _scale(out: dict) -> np.ndarray:
    """Each particle's least-squares scale py / pp of a block's sums (0 where pp is 0)."""
    ok = out["pp"] > 0
    return np.where(ok, out["py"] / np.where(ok, out["pp"], 1), 0.0)


def _aberration_map_sums(s, p, y, dv) -> np.ndarray:
    """Per-pixel sums of the phase- and amplitude-error maps
    (:data:`cryomag.fit.statistics.ABERRATION_MAPS`) from each particle's scale ``s`` (b,),
    its model ``p``, data ``y`` and the model's derivative ``dv`` through chi (b, npix), all
    in the same phase frame; shape (4, npix)."""
    r = y - s.astype(_F32)[:, None] * p
    return np.stack([
        s @ (np.conj(p) * y).imag,
        (s * s) @ (np.abs(p) ** 2),
        s @ (np.conj(dv) * r).real,
        (s * s) @ (np.abs(dv) ** 2),
    ]).astype(float)  # fmt: skip


def _F32view(z: np.ndarray) -> np.ndarray:
    """Complex64 (..., n) as float32 (..., 2 n): (re, im) pairs."""
    z = np.ascontiguousarray(z, dtype=_C64)
    return z.view(_F32)


def _pairsum(x: np.ndarray) -> np.ndarray:
    """Sum the (re, im) pairs of a float32 view back to one value per pixel (float64)."""
    return x.reshape(-1, 2).sum(axis=1, dtype=float)
