"""Sufficient statistics of the linearised forward model, accumulated per chunk of particles.

For particle p of an optics group, with the current magnification M0 and its contrast scale
profiled out, the model is

    Y_p(k) ~ s_p P_p(k) + sum_ab Delta_ab G_p,ab(k),   M = M0 + Delta,

where P_p = amp * C_p(k) * V(A_p^T (M0 k, 0)) * exp(2 pi i k.t_p) is the unit-scale prediction
(amp = det(M0) (a_ref / a_g)^2, the CTF C_p held fixed as the input measured it) and
G_p,ab = s_p amp C_p exp(2 pi i k.t_p) dV/du_a (M0 k) k_b its derivative with respect to the
element (a, b) of M. With noise weights w(k) = 1 / sigma^2(|k|) (per optics group, from the
residual power of the previous pass) each particle contributes the small normal-equation
blocks below; every later fit (global per group, per micrograph, per particle, defocus model)
uses only these blocks, never the images again. Parameters are ordered
(Delta00, Delta01, Delta10, Delta11). Sums run over independent Fourier pixels (half plane,
self-conjugate duplicates dropped) in the band kmin <= |k| <= kmax. Accumulation is float64.

Per particle (arrays of length N):
    npix    number of pixels used
    yy      sum w |Y|^2
    pp      sum w |P|^2
    py      sum w Re(conj(P) Y)          (s_hat = py / pp, the closed-form scale)
    rr      sum w |Y - s_hat P|^2
    hpg     sum w Re(conj(P) G_ab)       shape (N, 4)
    hgg     sum w Re(conj(G_ab) G_cd)    shape (N, 4, 4)
    bg      sum w Re(conj(G_ab) r)       shape (N, 4), r = Y - s_hat P

With ``extended`` statistics (local particle fits requested) the blocks have 8 columns: 0..3
as above, 4..7 the derivatives through the CTF's defocus term (a particle whose CTF moves
with its own magnification); the group fit uses the first 4.

Per group and radial shell (for the noise model and plots): sum |r|^2, sum |Y|^2,
sum |s P|^2, pixel count. Per group and rfft pixel (for the displacement-field plot):
sum Re(conj(h) h^T) (3 unique) and sum Re(conj(h) r) (2), h = s amp C phase dV/du.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cryomag.physics.fourier import rfft_freqs, shift_phase
from cryomag.physics.projection import (
    MapReference,
    OpticsParams,
    ParticleGeometry,
    amplitude_factor,
    ctf_at,
    slice_values,
)

#: Points per 3D evaluation (finufft call) in :func:`chunk_statistics`: ~100 MB of points
#: and values in single precision.
MAX_POINTS = 4_000_000

PARTICLE_FIELDS = ("npix", "yy", "pp", "py", "rr", "hpg", "hgg", "bg")


@dataclass
class Band:
    """Frequency band and pixel selection for one optics group.

    Attributes
    ----------
    box : int
        Particle box (px).
    pixel_size_A : float
        Declared pixel size (A).
    kmin, kmax : float
        Band limits in 1/A.
    n_shells : int
        Radial shells for the noise model (uniform in |k| up to Nyquist).
    """

    box: int
    pixel_size_A: float
    kmin: float
    kmax: float
    n_shells: int = 0
    mask: np.ndarray = field(init=False, repr=False)
    kx: np.ndarray = field(init=False, repr=False)
    ky: np.ndarray = field(init=False, repr=False)
    shell: np.ndarray = field(init=False, repr=False)
    shell_all: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        kx, ky = rfft_freqs(self.box, self.pixel_size_A)
        k = np.hypot(kx, ky)
        # independent pixels: drop the ky < 0 half of the self-conjugate columns kx = 0 and
        # (even box) kx = Nyquist
        indep = np.ones_like(k, dtype=bool)
        indep[:, 0] = ky[:, 0] >= 0
        if self.box % 2 == 0:
            indep[:, -1] = ky[:, -1] >= 0
            indep[self.box // 2, :] &= kx[self.box // 2, :] > 0  # ky = -Nyquist row duplicates
        indep[0, 0] = False  # DC carries no shape information
        self.mask = indep & (k >= self.kmin) & (k <= self.kmax)
        self.kx = kx[self.mask]
        self.ky = ky[self.mask]
        if self.n_shells <= 0:
            self.n_shells = self.box // 2
        nyq = 0.5 / self.pixel_size_A
        self.shell_all = np.minimum((k / nyq * self.n_shells).astype(int), self.n_shells)
        self.shell = self.shell_all[self.mask]

    @property
    def npix(self) -> int:
        return int(self.mask.sum())

    def shell_centres(self) -> np.ndarray:
        """Centre frequency (1/A) of each radial shell, shape (n_shells + 1,)."""
        nyq = 0.5 / self.pixel_size_A
        return (np.arange(self.n_shells + 1) + 0.5) * nyq / self.n_shells


@dataclass
class ChunkStatistics:
    """Statistics of one chunk (see module docstring); rows are particle indices ``rows``."""

    rows: np.ndarray
    npix: np.ndarray
    yy: np.ndarray
    pp: np.ndarray
    py: np.ndarray
    rr: np.ndarray
    hpg: np.ndarray
    hgg: np.ndarray
    bg: np.ndarray
    shell_rr: np.ndarray
    shell_yy: np.ndarray
    shell_ss: np.ndarray
    shell_n: np.ndarray
    pix_a: np.ndarray  # (3, npix_band): A00, A01, A11
    pix_b: np.ndarray  # (2, npix_band)


def model_terms(
    reference: MapReference,
    geom: ParticleGeometry,
    optics: OpticsParams,
    kx: np.ndarray,
    ky: np.ndarray,
    extended: bool = False,
    slices: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-scale prediction P and its derivative with respect to the elements of M.

    The CTF's defocus term is held at ``geom.ctf_mag @ k``; the Cs term and the reference
    move with M = ``geom.mag`` (see :func:`cryomag.physics.projection.ctf_at`).

    Parameters
    ----------
    kx, ky : ndarray, shape (npix,)
        Observed frequencies (1/A).
    extended : bool
        Also return the derivative through the CTF's defocus term (4 more columns): the
        model of a particle whose CTF moves with its own magnification (its defocus was
        measured per micrograph, not for the particle).
    slices : (value, grad), optional
        The central-slice values, shape (N, npix), and their gradient, shape (N, npix, 2),
        as :func:`cryomag.physics.projection.slice_values` returns them at ``geom.mag @ k``;
        evaluated here when not given.

    Returns
    -------
    p : ndarray, complex, shape (N, npix)
    dp : ndarray, complex, shape (N, npix, 4) or (N, npix, 8)
        dP/dM_ab, index a * 2 + b (det(M) in the amplitude is left to the scale); columns
        4..7 (``extended``): the same through the defocus term.
    """
    n = len(geom)
    p, parts = _model_parts(reference, geom, optics, kx, ky, extended, slices)
    kb = np.stack([kx, ky], axis=-1)
    # column (a, b) of a part block: d/dM_ab = (d/du_a) k_b
    dp = (parts[:, :, :, None] * kb[None, :, None, :]).reshape(n, len(kx), -1)
    return p, dp


def _model_parts(reference, geom, optics, kx, ky, extended, slices):
    """P and its derivatives with respect to the true frequency u = M k, before the k_b factor.

    Returns p, shape (N, npix), and parts, shape (N, npix, 2) (d/du_x, d/du_y of C V) or
    (N, npix, 4) with ``extended`` (then also the defocus term's d/du_x, d/du_y).
    """
    n = len(geom)
    m0 = np.asarray(geom.mag, float)
    m0 = np.broadcast_to(m0, (n, 2, 2)) if m0.ndim == 2 else m0
    if extended:
        ctf, dctf, ddef = ctf_at(geom, optics, kx, ky, gradient="both")
    else:
        ctf, dctf = ctf_at(geom, optics, kx, ky, gradient=True)
    ampphase = _amp_phase(reference, geom, optics, m0, kx, ky)
    if slices is None:
        slices = slice_values(reference, geom.euler_deg, m0, kx, ky, gradient=True)
    val, gu = slices
    p = ampphase * ctf * val
    # d/du of C(u) V(u): the reference term and the Cs term of the CTF
    parts = ampphase[..., None] * (ctf[..., None] * gu + dctf * val[..., None])
    if extended:
        parts = np.concatenate([parts, ampphase[..., None] * (ddef * val[..., None])], axis=-1)
    return p, parts


def _amp_phase(reference, geom, optics, m0, kx, ky) -> np.ndarray:
    """amp * exp(2 pi i k.t): amplitude factor and shift phase, shape (N, npix)."""
    amp = amplitude_factor(m0, reference.pixel_size_A, optics.pixel_size_A)
    return amp[:, None] * shift_phase(kx, ky, geom.origin_A)


def frequency_gradient(values: np.ndarray, box: int, pixel_size_A: float) -> np.ndarray:
    """d/dk of a spectrum on a full centred rfft grid, as the transform of -2 pi i x q(x).

    ``q`` is the real image of the spectrum (:func:`centered_irfft2`); the result is exact
    when q lies inside the box (no wrap-around).

    Parameters
    ----------
    values : ndarray, complex, shape (N, box, box // 2 + 1)

    Returns
    -------
    ndarray, complex, shape (N, box, box // 2 + 1, 2)
        d/dk_x, d/dk_y (A).
    """
    from cryomag.physics.fourier import centered_irfft2, centered_rfft2

    q = centered_irfft2(values, box)
    x = (np.arange(box) - box // 2) * pixel_size_A
    out = np.empty(values.shape + (2,), complex)
    out[..., 0] = centered_rfft2(q * x[None, None, :])
    out[..., 1] = centered_rfft2(q * x[None, :, None])
    out *= -2j * np.pi
    return out


def chunk_statistics(
    reference: MapReference,
    spectra: np.ndarray,
    geom: ParticleGeometry,
    optics: OpticsParams,
    band: Band,
    noise_power: np.ndarray,
    rows: np.ndarray,
    window_pad: int = 1,
    extended: bool = False,
    block: int = 64,
    exact_gradient: bool = False,
) -> ChunkStatistics:
    """Accumulate the statistics of one chunk of particles of one optics group.

    One 3D evaluation per particle and pass (four transforms with ``exact_gradient``): the
    central slice V(M k) on the full observed-frequency grid of the (padded) box, in as few
    non-uniform FFTs as memory allows (:data:`MAX_POINTS` points each; the FFT of the
    upsampled reference, which dominates a call, is paid once per call). Everything else is
    2D and runs in blocks of particles:

    - P at the band pixels: the evaluated values (box-periodic model) or the window-aware
      prediction (``window_pad`` > 1);
    - the slice's frequency gradient, from the same values as the transform of
      -2 pi i x q(x), q the slice's real image (d/dk V(M k) = M^T grad V): exact where q
      lies inside the grid, i.e. for the padded grid, and up to the part of q that wraps
      around the particle box for the box-periodic model. Measured against the exact 3D
      gradient (``exact_gradient``; box 64, 1,500 particles): normal equations within
      0.3 %, M within 0.1 standard error, at half the cost (tests/test_estimate.py).

    Parameters
    ----------
    reference : MapReference
    spectra : ndarray, complex, shape (N, box, box // 2 + 1)
        Centred rfft2 of the particle images.
    geom : ParticleGeometry
        ``mag`` = current M0 (per particle or group), ``ctf_mag`` = the input's M (CTF fixed).
    optics : OpticsParams
    band : Band
    noise_power : ndarray, shape (n_shells + 1,)
        sigma^2 per radial shell (E |noise(k)|^2); weights are 1 / sigma^2.
    rows : ndarray, shape (N,)
        Particle indices in the full set.
    window_pad : int
        1: box-periodic model (RELION's). >1: window-aware prediction: predict on a box
        ``window_pad`` times larger (every frequency up to the particle's Nyquist), go to real
        space, cut out the particle box and transform back, so that signal the CTF moves out
        of the box is missing from the prediction as it is from the data.
    extended : bool
        Also accumulate the derivatives through the CTF's defocus term (8 columns).
    block : int
        Particles per block of the 2D arithmetic.
    exact_gradient : bool
        Evaluate the slice gradient exactly (three more 3D transforms, in the same batched
        calls); the engine's default when local models are fitted (see
        :class:`cryomag.workflows.estimate.EstimateOptions`).
    """
    from cryomag.physics.fourier import centered_irfft2, centered_rfft2

    n = len(geom)
    box, apix = band.box, band.pixel_size_A
    pad = max(int(window_pad), 1)
    big = pad * box
    kxb, kyb = rfft_freqs(big, apix)
    sel = np.hypot(kxb, kyb) <= 0.5 / apix
    kxs, kys = kxb[sel], kyb[sel]
    m0 = np.asarray(geom.mag, float)
    m0 = np.broadcast_to(m0, (n, 2, 2)) if m0.ndim == 2 else m0
    band_idx = np.flatnonzero(band.mask.ravel())
    # the 3D evaluation: the exact gradient is needed where the model is formed (the band,
    # or the padded grid); the image-based one needs the values on the whole (padded) grid
    at_band = pad == 1 and exact_gradient
    ekx, eky = (band.kx, band.ky) if at_band else (kxs, kys)
    val, grad = _slices_batched(reference, geom, m0, ekx, eky, exact_gradient)
    minv_t = np.swapaxes(np.linalg.inv(m0), -1, -2)  # grad_u V = M^-T d/dk V(M k)
    y_all = spectra.reshape(n, -1)[:, band_idx]
    w = 1.0 / noise_power[band.shell]
    step = max(int(block) // (pad * pad), 1) if pad > 1 else max(int(block), 1)
    sel_flat = np.flatnonzero(sel.ravel())
    c0 = big // 2 - box // 2

    def window(values: np.ndarray) -> np.ndarray:
        """Values on the padded grid's disc -> real space, cut to the box -> band pixels."""
        grid = np.zeros((len(values), big, big // 2 + 1), complex)
        grid[:, sel] = values
        img = centered_irfft2(grid, big)[:, c0 : c0 + box, c0 : c0 + box]
        return centered_rfft2(img).reshape(len(values), -1)[:, band_idx]

    parts = []
    for lo in range(0, n, step):
        sl = slice(lo, min(n, lo + step))
        sub = geom_subset(geom, sl)
        if exact_gradient:
            slices = (val[sl], grad[sl])
        else:
            # d/dk of V(M k) from the slice image on the (padded) grid, then grad_u V
            f = np.zeros((len(val[sl]), big, big // 2 + 1), complex)
            f[:, sel] = val[sl]
            pix = band_idx if pad == 1 else sel_flat
            dfdk = frequency_gradient(f, big, apix).reshape(len(f), -1, 2)[:, pix]
            slices = (f.reshape(len(f), -1)[:, pix], _apply_2x2(minv_t[sl], dfdk))
        if pad == 1:
            p, dp = model_terms(reference, sub, optics, band.kx, band.ky, extended, slices)
        else:
            # window-aware: P and every derivative column predicted on the big grid, cut to
            # the particle box in real space
            p_s, d_s = _model_parts(reference, sub, optics, kxs, kys, extended, slices)
            p = window(p_s)
            dp = np.stack(
                [window(d_s[..., j] * kb) for j in range(d_s.shape[-1]) for kb in (kxs, kys)],
                axis=-1,
            )
        parts.append(_block_statistics(p, dp, y_all[sl], w, band))
    per = {f: np.concatenate([q[f] for q in parts]) for f in PARTICLE_FIELDS}
    summed = {f: sum(q[f] for q in parts) for f in parts[0] if f not in PARTICLE_FIELDS}
    return ChunkStatistics(rows=np.asarray(rows), **per, **summed)


def _slices_batched(reference, geom, m0, kx, ky, gradient: bool):
    """Central-slice values (and gradients) of every particle, in batches of MAX_POINTS.

    One finufft call per batch: its cost is dominated by the FFT of the upsampled reference,
    paid once per call, so batches are as large as memory allows. Returns (value, grad or
    None), shapes (N, npix) and (N, npix, 2).
    """
    n = len(geom)
    ntrans = 4 if gradient else 1
    per_call = max(1, MAX_POINTS // max(len(kx) * ntrans, 1))
    shared = np.ndim(geom.mag) == 2  # one M for the chunk: in-plane points computed once
    vals, grads = [], []
    for i in range(0, n, per_call):
        mag = geom.mag if shared else m0[i : i + per_call]
        got = slice_values(reference, geom.euler_deg[i : i + per_call], mag, kx, ky, gradient)
        vals.append(got[0] if gradient else got)
        if gradient:
            grads.append(got[1])
    if not vals:
        return np.zeros((0, len(kx)), complex), np.zeros((0, len(kx), 2), complex)
    return np.concatenate(vals), (np.concatenate(grads) if gradient else None)


def _apply_2x2(mats: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """out[n, p, a] = sum_b mats[n, a, b] vec[n, p, b] for 2x2 matrices, shape (N, npix, 2)."""
    out = np.empty_like(vec)
    for a in range(2):
        out[..., a] = mats[:, a, 0, None] * vec[..., 0] + mats[:, a, 1, None] * vec[..., 1]
    return out


def geom_subset(geom: ParticleGeometry, sl: slice) -> ParticleGeometry:
    """The particles ``sl`` of a :class:`ParticleGeometry` (group-wide matrices kept)."""
    from dataclasses import fields

    out = {}
    for f in fields(geom):
        v = getattr(geom, f.name)
        if v is None or (f.name in ("mag", "ctf_mag") and np.ndim(v) == 2):
            out[f.name] = v
        else:
            out[f.name] = np.asarray(v)[sl]
    return ParticleGeometry(**out)


def _block_statistics(
    p: np.ndarray, dp: np.ndarray, y: np.ndarray, w: np.ndarray, band: Band
) -> dict[str, np.ndarray]:
    """Normal-equation blocks of one block of particles (see the module docstring)."""
    n = len(p)
    kx, ky = band.kx, band.ky
    wp = w * p
    pp = np.einsum("np,np->n", wp.real, p.real) + np.einsum("np,np->n", wp.imag, p.imag)
    py = np.einsum("np,np->n", wp.real, y.real) + np.einsum("np,np->n", wp.imag, y.imag)
    yy = np.einsum("np,p->n", (y * y.conj()).real, w)
    s = np.where(pp > 0, py / np.where(pp > 0, pp, 1), 0.0)
    r = y - s[:, None] * p
    rr = np.einsum("np,p->n", (r * r.conj()).real, w)
    # G_ab = s dP/dM_ab (index a*2+b); h_a = s dP/du_a (= G_ab k_b / |k|^2)
    g = s[:, None, None] * dp
    k2 = kx * kx + ky * ky
    h = np.stack(
        [(g[..., 0] * kx + g[..., 1] * ky) / k2, (g[..., 2] * kx + g[..., 3] * ky) / k2], axis=-1
    )
    # Re(conj(a) b) sums as real dot products: complex (n, c, npix) viewed as (n, c, 2 npix)
    gt = np.ascontiguousarray(np.moveaxis(g, 2, 1)).view(np.float64)
    wgt = gt * np.repeat(w, 2)[None, None, :]
    hgg = np.matmul(wgt, np.swapaxes(gt, 1, 2))
    hpg = np.matmul(wgt, np.ascontiguousarray(p).view(np.float64)[..., None])[..., 0]
    bg = np.matmul(wgt, np.ascontiguousarray(r).view(np.float64)[..., None])[..., 0]

    nsh = band.n_shells + 1
    r2 = (r * r.conj()).real.sum(axis=0)
    y2 = (y * y.conj()).real.sum(axis=0)
    sp = s[:, None] * p
    s2 = (sp * sp.conj()).real.sum(axis=0)
    pa = np.stack(
        [
            (h[..., 0] * h[..., 0].conj()).real.sum(0),
            (h[..., 0].conj() * h[..., 1]).real.sum(0),
            (h[..., 1] * h[..., 1].conj()).real.sum(0),
        ]
    )
    pb = np.stack([(h[..., 0].conj() * r).real.sum(0), (h[..., 1].conj() * r).real.sum(0)])
    return {
        "npix": np.full(n, band.npix, float),
        "yy": yy,
        "pp": pp,
        "py": py,
        "rr": rr,
        "hpg": hpg,
        "hgg": hgg,
        "bg": bg,
        "shell_rr": np.bincount(band.shell, r2, minlength=nsh),
        "shell_yy": np.bincount(band.shell, y2, minlength=nsh),
        "shell_ss": np.bincount(band.shell, s2, minlength=nsh),
        "shell_n": np.bincount(band.shell, minlength=nsh).astype(float) * n,
        "pix_a": pa,
        "pix_b": pb,
    }


@dataclass
class GroupStatistics:
    """Statistics of every particle of one optics group, reduced from its chunks.

    Per-particle arrays follow the order of ``rows`` (sorted). Shell and pixel arrays are
    summed over the group in a fixed (row) order, in float64.
    """

    rows: np.ndarray
    npix: np.ndarray
    yy: np.ndarray
    pp: np.ndarray
    py: np.ndarray
    rr: np.ndarray
    hpg: np.ndarray
    hgg: np.ndarray
    bg: np.ndarray
    shell_rr: np.ndarray
    shell_yy: np.ndarray
    shell_ss: np.ndarray
    shell_n: np.ndarray
    pix_a: np.ndarray
    pix_b: np.ndarray

    @classmethod
    def reduce(cls, chunks: list[ChunkStatistics]) -> GroupStatistics:
        """Concatenate per-particle blocks and sum the rest, in the order of first rows."""
        chunks = sorted(chunks, key=lambda c: int(c.rows[0]) if len(c.rows) else -1)
        cat = {f: np.concatenate([getattr(c, f) for c in chunks]) for f in PARTICLE_FIELDS}
        rows = np.concatenate([c.rows for c in chunks])
        order = np.argsort(rows, kind="stable")
        summed = {}
        for f in ("shell_rr", "shell_yy", "shell_ss", "shell_n", "pix_a", "pix_b"):
            acc = np.zeros_like(getattr(chunks[0], f), dtype=float)
            for c in chunks:
                acc = acc + getattr(c, f)
            summed[f] = acc
        return cls(rows=rows[order], **{f: v[order] for f, v in cat.items()}, **summed)

    def scale(self) -> np.ndarray:
        """Closed-form contrast scale per particle, s = py / pp, shape (N,)."""
        return np.where(self.pp > 0, self.py / np.where(self.pp > 0, self.pp, 1), np.nan)

    def chi2_per_pixel(self) -> float:
        """Weighted residual power per complex pixel (1 when the noise model is exact)."""
        return float(self.rr.sum() / max(self.npix.sum(), 1))

    def scale_error(self) -> np.ndarray:
        """Standard error of :meth:`scale` (complex noise: var = chi2 / (2 pp)), shape (N,)."""
        return np.sqrt(self.chi2_per_pixel() / (2 * np.maximum(self.pp, 1e-300)))

    def noise_power(self) -> np.ndarray:
        """Residual power per shell, E|r|^2; shells without pixels get the nearest value."""
        with np.errstate(invalid="ignore", divide="ignore"):
            pw = self.shell_rr / self.shell_n
        good = np.isfinite(pw) & (pw > 0)
        if not good.any():
            return np.ones_like(pw)
        idx = np.arange(len(pw))
        return np.interp(idx, idx[good], pw[good])

    def as_arrays(self) -> dict[str, np.ndarray]:
        """All fields as a dict of arrays (for saving with numpy.savez)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}
