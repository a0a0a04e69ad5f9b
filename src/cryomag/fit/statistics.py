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

from cryomag.physics.fourier import rfft_freqs
from cryomag.physics.projection import (
    MapReference,
    OpticsParams,
    ParticleGeometry,
    amplitude_factor,
    ctf_at,
    slice_values,
)

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

    Returns
    -------
    p : ndarray, complex, shape (N, npix)
    dp : ndarray, complex, shape (N, npix, 4) or (N, npix, 8)
        dP/dM_ab, index a * 2 + b (det(M) in the amplitude is left to the scale); columns
        4..7 (``extended``): the same through the defocus term.
    """
    n = len(geom)
    m0 = np.asarray(geom.mag, float)
    m0 = np.broadcast_to(m0, (n, 2, 2)) if m0.ndim == 2 else m0
    if extended:
        ctf, dctf, ddef = ctf_at(geom, optics, kx, ky, gradient="both")
    else:
        ctf, dctf = ctf_at(geom, optics, kx, ky, gradient=True)
    phase = np.exp(
        2j * np.pi * (geom.origin_A[:, 0:1] * kx[None] + geom.origin_A[:, 1:2] * ky[None])
    )
    amp = amplitude_factor(m0, reference.pixel_size_A, optics.pixel_size_A)
    ampphase = amp[:, None] * phase
    val, gu = slice_values(reference, geom.euler_deg, m0, kx, ky, gradient=True)
    p = ampphase * ctf * val
    # d/du of C(u) V(u): the reference term and the Cs term of the CTF
    du = ampphase[..., None] * (ctf[..., None] * gu + dctf * val[..., None])
    kb = np.stack([kx, ky], axis=-1)
    dp = (du[:, :, :, None] * kb[None, :, None, :]).reshape(n, -1, 4)
    if extended:
        dd = ampphase[..., None] * (ddef * val[..., None])
        dp2 = (dd[:, :, :, None] * kb[None, :, None, :]).reshape(n, -1, 4)
        dp = np.concatenate([dp, dp2], axis=-1)
    return p, dp


def _model_windowed(
    reference: MapReference,
    geom: ParticleGeometry,
    optics: OpticsParams,
    band: Band,
    pad: int,
    extended: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`model_terms` with the particle box as a real-space window (see chunk_statistics)."""
    from cryomag.physics.fourier import centered_irfft2, centered_rfft2

    n = len(geom)
    box = band.box
    big = int(pad * box) + (int(pad * box) % 2)
    kxb, kyb = rfft_freqs(big, band.pixel_size_A)
    nyq = 0.5 / band.pixel_size_A
    sel = np.hypot(kxb, kyb) <= nyq
    p_s, dp_s = model_terms(reference, geom, optics, kxb[sel], kyb[sel], extended)
    ncol = dp_s.shape[-1]
    out_p = np.empty((n, band.npix), complex)
    out_dp = np.empty((n, band.npix, ncol), complex)
    lo = big // 2 - box // 2
    grid = np.zeros((n, big, big // 2 + 1), complex)
    # the model is a pixel-sum DFT whatever the box: irfft2 on the big grid, cut, rfft2
    for src, dst in [(p_s, out_p)] + [(dp_s[..., c], out_dp[..., c]) for c in range(ncol)]:
        grid[:] = 0
        grid[:, sel] = src
        img = centered_irfft2(grid, big)[:, lo : lo + box, lo : lo + box]
        dst[...] = centered_rfft2(img).reshape(n, -1)[:, band.mask.ravel()]
    return out_p, out_dp


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
) -> ChunkStatistics:
    """Accumulate the statistics of one chunk of particles of one optics group.

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
        1: box-periodic model (RELION's). >1: window-aware model: predict on a box
        ``window_pad`` times larger, go to real space, cut out the particle box and transform
        back, so that signal the CTF moves out of the box is missing from the prediction as
        it is from the data.
    """
    n = len(geom)
    kx, ky = band.kx, band.ky
    y = spectra.reshape(n, -1)[:, band.mask.ravel()]
    w = 1.0 / noise_power[band.shell]
    if window_pad > 1:
        p, dp = _model_windowed(reference, geom, optics, band, window_pad, extended)
    else:
        p, dp = model_terms(reference, geom, optics, kx, ky, extended)
    wp = w * p
    pp = np.einsum("np,np->n", wp.real, p.real) + np.einsum("np,np->n", wp.imag, p.imag)
    py = np.einsum("np,np->n", wp.real, y.real) + np.einsum("np,np->n", wp.imag, y.imag)
    yy = np.einsum("np,p->n", (y * y.conj()).real, w)
    s = np.where(pp > 0, py / np.where(pp > 0, pp, 1), 0.0)
    r = y - s[:, None] * p
    rr = np.einsum("np,p->n", (r * r.conj()).real, w)
    # G_ab = s dP/dM_ab (index a*2+b); h_a = s dP/du_a (= G_ab k_b / |k|^2 without window)
    g = s[:, None, None] * dp
    k2 = kx * kx + ky * ky
    h = np.stack(
        [(g[..., 0] * kx + g[..., 1] * ky) / k2, (g[..., 2] * kx + g[..., 3] * ky) / k2], axis=-1
    )

    wg = w[None, :, None] * g
    hpg = np.einsum("np,npi->ni", p.real, wg.real) + np.einsum("np,npi->ni", p.imag, wg.imag)
    hgg = np.einsum("npi,npj->nij", wg.real, g.real) + np.einsum("npi,npj->nij", wg.imag, g.imag)
    bg = np.einsum("npi,np->ni", wg.real, r.real) + np.einsum("npi,np->ni", wg.imag, r.imag)

    nsh = band.n_shells + 1
    r2 = (r * r.conj()).real.sum(axis=0)
    y2 = (y * y.conj()).real.sum(axis=0)
    sp = s[:, None] * p
    s2 = (sp * sp.conj()).real.sum(axis=0)
    shell_rr = np.bincount(band.shell, r2, minlength=nsh)
    shell_yy = np.bincount(band.shell, y2, minlength=nsh)
    shell_ss = np.bincount(band.shell, s2, minlength=nsh)
    shell_n = np.bincount(band.shell, minlength=nsh).astype(float) * n

    pa = np.stack(
        [
            (h[..., 0] * h[..., 0].conj()).real.sum(0),
            (h[..., 0].conj() * h[..., 1]).real.sum(0),
            (h[..., 1] * h[..., 1].conj()).real.sum(0),
        ]
    )
    pb = np.stack([(h[..., 0].conj() * r).real.sum(0), (h[..., 1].conj() * r).real.sum(0)])
    return ChunkStatistics(
        rows=np.asarray(rows),
        npix=np.full(n, band.npix, float),
        yy=yy,
        pp=pp,
        py=py,
        rr=rr,
        hpg=hpg,
        hgg=hgg,
        bg=bg,
        shell_rr=shell_rr,
        shell_yy=shell_yy,
        shell_ss=shell_ss,
        shell_n=shell_n,
        pix_a=pa,
        pix_b=pb,
    )


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
