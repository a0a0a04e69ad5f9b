"""The ground-truth simulator: exact image formation with magnification in real space.

Image formation for one particle (everything in A and 1/A; the observed frame uses the
group's declared pixel size ``a_g``, the true frame is the specimen frame):

a) **True-frame projection** on a fine periodic grid of period ``L`` (A) and ``n`` modes per
   axis: the Fourier-series coefficients of ``q(y) = (1/a_ref) * integral rho dz`` of the
   rotated specimen, centred at the true-frame particle centre ``c = M^-T (-t)`` (so that the
   centre appears at ``x_obs = -t``: RELION's origin, not distorted by M). For the phantom this
   is exact: a finufft type-1 2D sum over the projected atom positions ``(A r_j)_xy + c``
   times each atom's 2D Gaussian envelope ``exp(-2 pi^2 sigma_j^2 |u|^2)`` (one transform per
   distinct sigma, sharing the points). For a real map (``MapSource``) the coefficients are the
   map's DFT sampled off-grid at ``A^T (u, 0)`` by a finufft type-2 3D sum (this path shares
   the Fourier-slice idea with the estimators; its only approximation is that the map is a
   trigonometric polynomial band-limited to its own Nyquist cube).
   ``L`` is chosen so that nothing wraps: ``L > h + |c| + R + D + margin`` with ``h`` the
   half-width of the observed box in the true frame, ``R`` the specimen radius and ``D`` the
   largest CTF delocalisation ``lambda (dz_max + |dU - dV| / 2) u_max + 2 Cs lambda^3
   u_max^3`` per axis.
b) **CTF in the true frame**: ``ctf_values`` at the true frequency ``u`` with the true
   (specimen-frame) defocus. Signal delocalised out of the box is lost, as in a micrograph.
c) **Band limit** (anti-aliasing before point sampling): every true frequency whose observed
   frequency ``k = M^-1 u`` lies outside the open observed Nyquist square
   ``|k_x|, |k_y| < 1 / (2 a_g)`` is zeroed, and the rest is multiplied by the detector's
   anti-aliasing filter ``W(k)`` (:func:`antialias_filter`: 1 up to ``antialias_start`` x
   Nyquist per axis, default 0.9, raised-cosine roll-off to 0 at Nyquist). A hard cut
   (``antialias_start = 1``) gives the image sinc-like ringing tails that decay as 1/distance:
   they wrap around any finite grid and leak out of the box at the 1e-2 level; the roll-off
   makes them decay fast enough for 1e-5 exactness.
d) **Distortion**: the band-limited true image is evaluated exactly (finufft type-2 2D of its
   Fourier series) at ``x_true = M^-T x_obs`` for every observed pixel centre
   ``x_obs = ((col, row) - box/2) a_g``; hence a feature at ``x_true`` appears at
   ``x_obs = M^T x_true`` (RELION: ``k_ref = M k_obs``).
e) **Contrast**: times ``s_p`` (no det(M): real-space contrast is unchanged by
   magnification). With the image DFT taken as a plain pixel sum (phase origin at box/2),
   this gives exactly ``Y(k) = s det(M) (a_ref / a_g)^2 CTF(M k) V(A^T (M k, 0))
   exp(+2 pi i k . t) W(k)`` at every observed frequency inside the Nyquist square, up to the
   signal that falls outside the box window (tests/test_simulate.py). That window loss is
   physical (a real box loses it too) and grows with defocus: for the default phantom
   (110 A) in a 128 px box at 1.3 A the model misses 0.4-8 % of the signal at 0.8 um, up to
   ~65 % near 0.9 Nyquist at 1.5 um; a 256 px box keeps it below 0.1 % up to 1.5 um.
f) **Noise**: coloured Gaussian (see :class:`~cryomag.simulation.config.NoiseConfig`).

Magnification of particle p (k_ref = M_p k_obs)::

    M_p = m_def * M_mic * M_part * M_group,   m_def = 1 + kappa (dz_p - dz_ref)

with ``dz_p`` the particle's true mean defocus ((dU + dV) / 2, specimen frame).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import finufft
import numpy as np
import scipy.fft as sfft
from scipy.spatial.transform import Rotation

from cryomag.model.particles import ParticleSet
from cryomag.physics.aberrations import phase_odd, zernike_phase
from cryomag.physics.ctf import (
    ctf_values,
    defocus_from_matrix,
    defocus_matrix,
    electron_wavelength_A,
)
from cryomag.physics.fourier import centered_rfft2, rfft_freqs, rfft_weights
from cryomag.physics.geometry import euler_to_matrix
from cryomag.simulation.config import SimulationConfig
from cryomag.simulation.phantom import Phantom, write_mrc_map

__all__ = [
    "MapSource",
    "PhantomSource",
    "aniso_matrix",
    "coloured_noise",
    "noise_shape",
    "render_particles",
    "simulate_dataset",
]


# =============================================================================== matrices
def aniso_matrix(major: float, minor: float, angle_deg: float) -> np.ndarray:
    """M = R(angle) diag(major, minor) R(angle)^T, shape (2, 2).

    With k_ref = M k_obs and x_obs = M^T x_true, ``major > 1`` stretches the observed image by
    ``major`` along the direction ``angle_deg`` (from +x towards +y) and by ``minor``
    perpendicular to it.
    """
    a = np.deg2rad(angle_deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return r @ np.diag([major, minor]) @ r.T


def _scatter_matrices(rng: np.random.Generator, n: int, iso: float, aniso: float) -> np.ndarray:
    """(1 + d) I + [[a, b], [b, -a]] with d ~ N(0, iso), a, b ~ N(0, aniso); shape (n, 2, 2)."""
    z = rng.standard_normal((n, 3))
    d, a, b = iso * z[:, 0], aniso * z[:, 1], aniso * z[:, 2]
    out = np.empty((n, 2, 2))
    out[:, 0, 0] = 1 + d + a
    out[:, 1, 1] = 1 + d - a
    out[:, 0, 1] = out[:, 1, 0] = b
    return out


# ============================================================================ specimens
class PhantomSource:
    """Exact projections of a :class:`Phantom` (finufft type 1 over projected atoms).

    Parameters
    ----------
    phantom : Phantom
    ref_pixel_size_A : float
        a_ref of the normalisation (the reference map's voxel size).
    """

    kind = "phantom"

    def __init__(self, phantom: Phantom, ref_pixel_size_A: float) -> None:
        self.phantom = phantom
        self.ref_pixel_size_A = float(ref_pixel_size_A)
        self.radius_A = phantom.radius_A(n_sigma=5.0)
        self._sigmas, strengths = phantom.class_strengths()
        self._strengths = strengths.astype(complex)

    def spectra(
        self,
        rots: np.ndarray,
        centres_A: np.ndarray,
        period_A: float,
        n: int,
        eps: float,
        nthreads: int = 1,
    ) -> np.ndarray:
        """Fourier coefficients of (1/a_ref) x projected density, on the fine grid.

        Parameters
        ----------
        rots : ndarray, shape (b, 3, 3)
            RELION matrices A.
        centres_A : ndarray, shape (b, 2)
            True-frame particle centres c (x, y) in A.
        period_A : float
            Grid period L (A).
        n : int
            Modes per axis (even); mode m = i - n/2 is the frequency m / L.
        eps : float
            finufft tolerance.

        Returns
        -------
        ndarray, complex, shape (b, n, n), indexed [particle, m_y, m_x]
            ``a_ref^2 V(A^T (u, 0)) exp(-2 pi i u . c)`` (the continuous 2D FT of the
            projected, shifted specimen divided by a_ref).
        """
        pos = self.phantom.positions_A
        u = (np.arange(n) - n // 2) / period_A
        u2 = u[:, None] ** 2 + u[None, :] ** 2
        env = np.exp(-2 * np.pi**2 * self._sigmas[:, None, None] ** 2 * u2[None]) / (
            self.ref_pixel_size_A
        )
        plan = finufft.Plan(
            1, (n, n), n_trans=len(self._sigmas), eps=eps, isign=-1, nthreads=nthreads
        )
        out = np.empty((len(rots), n, n), complex)
        scale = 2 * np.pi / period_A
        for b, (rot, c) in enumerate(zip(rots, centres_A, strict=True)):
            y = pos @ rot[:2].T + c[None, :]  # (n_atoms, 2): (x, y)
            plan.setpts(scale * y[:, 1], scale * y[:, 0])
            parts = plan.execute(self._strengths).reshape(len(self._sigmas), n, n)
            out[b] = np.einsum("cyx,cyx->yx", env, parts)
        return out


class MapSource:
    """Projections of a real map through its DFT sampled off-grid (finufft type 2 3D).

    The map's transform ``V_map(k) = sum_x map(x) exp(-2 pi i k . x)`` (phase origin at voxel
    N/2) is taken as the truth, set to zero outside the map's Nyquist cube
    ``|k_i| < 1 / (2 a_map)``. This path shares the Fourier-slice idea with the estimators.

    Parameters
    ----------
    volume : ndarray, shape (N, N, N), indexed [z, y, x]
    pixel_size_A : float
        Voxel size; also a_ref.
    """

    kind = "map"

    def __init__(self, volume: np.ndarray, pixel_size_A: float) -> None:
        vol = np.asarray(volume, float)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"map must be a cube, got shape {vol.shape}")
        self.volume = vol
        self._coeffs = vol.astype(complex)
        self.ref_pixel_size_A = float(pixel_size_A)
        n = vol.shape[0]
        thr = 0.02 * np.abs(vol).max()
        iz, iy, ix = np.nonzero(np.abs(vol) > thr)
        r = np.sqrt((ix - n // 2) ** 2 + (iy - n // 2) ** 2 + (iz - n // 2) ** 2)
        self.radius_A = float((r.max() + 2) * pixel_size_A) if r.size else n * pixel_size_A / 2

    @classmethod
    def from_mrc(cls, path: str | os.PathLike, pixel_size_A: float | None = None) -> MapSource:
        """Read an MRC map; the header voxel size is used unless ``pixel_size_A`` is given."""
        from cryomag.io import read_map

        vol, apix = read_map(path, pixel_size_A)
        return cls(vol, apix)

    def fourier(self, k3: np.ndarray, eps: float = 1e-9, nthreads: int = 1) -> np.ndarray:
        """V_map at frequencies k3 (m, 3) (kx, ky, kz) in 1/A; zero outside the Nyquist cube."""
        k = np.asarray(k3, float).reshape(-1, 3)
        a = self.ref_pixel_size_A
        inside = np.all(np.abs(k) < 0.5 / a * (1 - 1e-12), axis=1)
        out = np.zeros(len(k), complex)
        if inside.any():
            ki = k[inside]
            vals = finufft.nufft3d2(
                2 * np.pi * a * ki[:, 2],
                2 * np.pi * a * ki[:, 1],
                2 * np.pi * a * ki[:, 0],
                self._coeffs,
                isign=-1,
                eps=eps,
                nthreads=nthreads,
            )
            out[inside] = vals
        return out

    def spectra(
        self,
        rots: np.ndarray,
        centres_A: np.ndarray,
        period_A: float,
        n: int,
        eps: float,
        nthreads: int = 1,
    ) -> np.ndarray:
        """Same contract as :meth:`PhantomSource.spectra`."""
        u = (np.arange(n) - n // 2) / period_A
        uy, ux = np.meshgrid(u, u, indexing="ij")
        b = len(rots)
        # k3 = A^T (u, 0) = u_x A[0, :] + u_y A[1, :]
        k3 = ux.reshape(1, -1, 1) * rots[:, 0:1, :] + uy.reshape(1, -1, 1) * rots[:, 1:2, :]
        v = self.fourier(k3.reshape(-1, 3), eps=eps, nthreads=nthreads).reshape(b, n, n)
        cx = centres_A[:, 0, None, None]
        cy = centres_A[:, 1, None, None]
        phase = np.exp(-2j * np.pi * (ux[None] * cx + uy[None] * cy))
        return self.ref_pixel_size_A**2 * v * phase


# ============================================================================= rendering
@dataclass
class FineGrid:
    """The true-frame periodic grid used for a batch: period (A) and modes per axis."""

    period_A: float
    n: int


def choose_grid(
    source_radius_A: float,
    box: int,
    pixel_size_A: float,
    mags: np.ndarray,
    centres_A: np.ndarray,
    defocus_u_A: np.ndarray,
    defocus_v_A: np.ndarray,
    voltage_kv: float,
    cs_mm: float,
    use_ctf: bool,
    margin_A: float,
    antialias_start: float = 1.0,
    odd_zernike: Sequence[float] = (),
    even_zernike: Sequence[float] = (),
) -> FineGrid:
    """Smallest grid on which nothing wraps into the observed window (see module docstring).

    Parameters
    ----------
    mags : ndarray, shape (b, 2, 2)
    centres_A : ndarray, shape (b, 2)
    defocus_u_A, defocus_v_A : ndarray, shape (b,)
    """
    k_nyq = 0.5 / pixel_size_A
    corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], float)
    u_corner = np.einsum("bij,cj->bci", mags, corners * k_nyq)
    u_ax = np.abs(u_corner).max(axis=(1, 2))  # (b,)
    minv_t = np.swapaxes(np.linalg.inv(mags), -1, -2)
    x_corner = corners * (box / 2) * pixel_size_A
    h = np.abs(np.einsum("bij,cj->bci", minv_t, x_corner)).max(axis=(1, 2))
    c = np.abs(centres_A).max(axis=1)
    deloc = np.zeros(len(mags))
    if use_ctf:
        lam = float(electron_wavelength_A(voltage_kv))
        du, dv = np.abs(defocus_u_A), np.abs(defocus_v_A)
        dz = np.maximum(du, dv) + 0.5 * np.abs(du - dv)
        deloc = lam * dz * u_ax + 2 * cs_mm * 1e7 * lam**3 * u_ax**3
        if odd_zernike or even_zernike:  # their delocalisation: |grad phase| / (2 pi)
            deloc = deloc + _aberration_deloc(odd_zernike, even_zernike, float(u_ax.max()))
    # the anti-aliasing roll-off of width dk = (1 - start) k_nyq has real-space tails that
    # decay over ~1/dk: keep 5/dk of them from wrapping (wrap error < 1e-5)
    if antialias_start < 1.0:
        margin_A = margin_A + _TAPER_MARGIN / ((1.0 - antialias_start) * k_nyq)
    period = float(np.max(h + c + source_radius_A + deloc)) + margin_A
    u_max = float(u_ax.max())
    n = 2 * math.ceil(u_max * period) + 2
    n = sfft.next_fast_len(n)
    while n % 2:
        n = sfft.next_fast_len(n + 1)
    return FineGrid(period, n)


def _aberration_terms(beam_tilt_mrad, odd_zernike, even_zernike, voltage_kv: float,
                      cs_mm: float) -> tuple[tuple[float, ...], tuple[float, ...]]:  # fmt: skip
    """The odd terms RELION applies (tilt inserted) and the even terms; () when zero."""
    from cryomag.physics.forward import OpticsParams

    o = OpticsParams(1.0, 2, voltage_kv, cs_mm, 0.0,
                     beam_tilt_mrad=tuple(beam_tilt_mrad or (0.0, 0.0)),
                     odd_zernike=tuple(odd_zernike or ()),
                     even_zernike=tuple(even_zernike or ()))  # fmt: skip
    return o.odd_coefficients(), o.even_coefficients()


def _aberration_deloc(odd, even, u_max: float) -> float:
    """Largest real-space displacement |grad phase| / (2 pi) (A) of the aberrations over
    |u_x|, |u_y| <= u_max (a 65 x 65 sample, times 1.1)."""
    u = np.linspace(-u_max, u_max, 65)
    ux, uy = np.meshgrid(u, u)
    g = np.zeros((2,) + ux.shape)
    for coeffs, parity in ((odd, "odd"), (even, "even")):
        if coeffs:
            g = g + np.abs(zernike_phase(coeffs, ux, uy, parity, derivatives=1)[1])
    return 1.1 * float(np.hypot(g[0], g[1]).max()) / (2 * np.pi)


def render_particles(
    source: PhantomSource | MapSource | Phantom,
    box: int,
    pixel_size_A: float,
    euler_deg: np.ndarray,
    origin_A: np.ndarray,
    defocus_u_A: np.ndarray | float,
    defocus_v_A: np.ndarray | float,
    defocus_angle_deg: np.ndarray | float,
    mag: np.ndarray | None = None,
    scale: np.ndarray | float = 1.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift_deg: np.ndarray | float = 0.0,
    ctf: bool = True,
    ref_pixel_size_A: float | None = None,
    eps: float = 1e-7,
    margin_A: float = 16.0,
    batch: int = 16,
    nthreads: int = 1,
    grid: FineGrid | None = None,
    antialias_start: float = 0.9,
    beam_tilt_mrad: Sequence[float] | None = None,
    odd_zernike: Sequence[float] | None = None,
    even_zernike: Sequence[float] | None = None,
) -> np.ndarray:
    """Noise-free particle images, exact up to the finufft tolerance (see module docstring).

    Parameters
    ----------
    source : PhantomSource, MapSource or Phantom
        The specimen (a bare Phantom needs ``ref_pixel_size_A``).
    box : int
        Image size (px).
    pixel_size_A : float
        Declared pixel size a_g (A/px).
    euler_deg : ndarray, shape (n, 3)
        RELION (rot, tilt, psi), degrees.
    origin_A : ndarray, shape (n, 2)
        rlnOriginX/YAngst (A).
    defocus_u_A, defocus_v_A, defocus_angle_deg : array_like, shape (n,) or scalar
        TRUE (specimen-frame) defocus.
    mag : ndarray, shape (n, 2, 2) or (2, 2), optional
        M_p with k_ref = M k_obs; identity when None.
    scale : array_like, shape (n,) or scalar
        Contrast scale s_p.
    voltage_kv, cs_mm, amplitude_contrast, phase_shift_deg
        Optics (true values).
    ctf : bool
        False multiplies by 1 instead of the CTF (pure projections).
    ref_pixel_size_A : float, optional
        a_ref when ``source`` is a bare :class:`Phantom`.
    eps : float
        finufft tolerance.
    margin_A : float
        Extra grid period (A).
    batch : int
        Particles per projection batch.
    nthreads : int
        finufft threads.
    grid : FineGrid, optional
        Force a fine grid (default: :func:`choose_grid` over all particles).
    beam_tilt_mrad, odd_zernike, even_zernike : optional
        The group's fixed aberrations (rlnBeamTiltX/Y in mrad; rlnOddZernike, rlnEvenZernike
        in rad), applied with the CTF (``ctf=True``) as RELION models them, at the true
        frequency u: the true-frame spectrum times exp(+i phase_odd(u)) (beam tilt by
        insertTilt), the even terms in chi (:mod:`cryomag.physics.aberrations`).
    antialias_start : float
        Detector anti-aliasing filter W(k_obs) (:func:`antialias_filter`): 1 up to this
        fraction of Nyquist per axis, raised-cosine roll-off to 0 at Nyquist. 1.0 = hard cut
        at Nyquist (long real-space ringing tails, which then wrap around the fine grid and
        leak out of the box at the 1e-2 level). The images then satisfy the model times W.

    Returns
    -------
    ndarray, float64, shape (n, box, box), indexed [particle, row (y), column (x)]
    """
    if isinstance(source, Phantom):
        if ref_pixel_size_A is None:
            raise ValueError("render_particles: a bare Phantom needs ref_pixel_size_A")
        source = PhantomSource(source, ref_pixel_size_A)
    euler = np.asarray(euler_deg, float).reshape(-1, 3)
    npart = len(euler)
    origin = np.asarray(origin_A, float).reshape(npart, 2)

    def per(x: Any) -> np.ndarray:
        return np.broadcast_to(np.asarray(x, float), (npart,)).copy()

    du, dv, ang = per(defocus_u_A), per(defocus_v_A), per(defocus_angle_deg)
    phase = per(phase_shift_deg)
    s = per(scale)
    if mag is None:
        mats = np.tile(np.eye(2), (npart, 1, 1))
    else:
        mats = np.broadcast_to(np.asarray(mag, float), (npart, 2, 2)).copy()
    minv = np.linalg.inv(mats)
    minv_t = np.swapaxes(minv, -1, -2)
    centres = -np.einsum("bij,bj->bi", minv_t, origin)  # x_true of x_obs = -t
    rots = euler_to_matrix(euler).reshape(npart, 3, 3)
    odd, even = _aberration_terms(beam_tilt_mrad, odd_zernike, even_zernike, voltage_kv, cs_mm)
    if not ctf:
        odd, even = (), ()
    if grid is None:
        grid = choose_grid(
            source.radius_A,
            box,
            pixel_size_A,
            mats,
            centres,
            du,
            dv,
            voltage_kv,
            cs_mm,
            ctf,
            margin_A,
            antialias_start,
            odd,
            even,
        )
    period, n = grid.period_A, grid.n
    u = (np.arange(n) - n // 2) / period
    uy, ux = np.meshgrid(u, u, indexing="ij")
    k_nyq = 0.5 / pixel_size_A * (1 - 1e-9)
    pix = (np.arange(box) - box // 2) * pixel_size_A
    yy, xx = np.meshgrid(pix, pix, indexing="ij")
    xo = xx.reshape(-1)
    yo = yy.reshape(-1)
    plan2 = finufft.Plan(2, (n, n), n_trans=1, eps=eps, isign=1, nthreads=nthreads)
    # the odd aberrations at the true frequency (RELION: prediction x exp(+i phase_odd(M k)))
    odd_factor = np.exp(1j * phase_odd(odd, ux, uy)) if odd else None
    tscale = 2 * np.pi / period
    images = np.empty((npart, box, box))
    for start in range(0, npart, batch):
        sl = slice(start, min(npart, start + batch))
        spec = source.spectra(rots[sl], centres[sl], period, n, eps, nthreads)
        for j, p in enumerate(range(sl.start, sl.stop)):
            mi = minv[p]
            kx = mi[0, 0] * ux + mi[0, 1] * uy
            ky = mi[1, 0] * ux + mi[1, 1] * uy
            mask = (np.abs(kx) < k_nyq) & (np.abs(ky) < k_nyq)
            f = np.zeros((n, n), complex)
            vals = spec[j][mask] / period**2
            if antialias_start < 1.0:
                vals = vals * antialias_filter(kx[mask], ky[mask], pixel_size_A, antialias_start)
            if ctf:
                vals = (
                    vals
                    * ctf_values(
                        ux[mask],
                        uy[mask],
                        du[p],
                        dv[p],
                        ang[p],
                        voltage_kv,
                        cs_mm,
                        amplitude_contrast,
                        phase_shift_deg=phase[p],
                        even_zernike=even,
                    )[0]
                )
                if odd_factor is not None:
                    vals = vals * odd_factor[mask]
            f[mask] = vals
            mt = minv_t[p]
            ytx = mt[0, 0] * xo + mt[0, 1] * yo
            yty = mt[1, 0] * xo + mt[1, 1] * yo
            plan2.setpts(tscale * yty, tscale * ytx)
            img = plan2.execute(f)
            images[p] = s[p] * img.real.reshape(box, box)
    return images


def antialias_filter(
    kx: np.ndarray, ky: np.ndarray, pixel_size_A: float, start: float
) -> np.ndarray:
    """Separable anti-aliasing filter of the detector, in the observed frame.

    W(k) = w(k_x) w(k_y), w = 1 for |k| <= start * k_nyq, raised-cosine (cos^2)
    roll-off to 0 at k_nyq.

    Parameters
    ----------
    kx, ky : ndarray
        Observed frequencies (1/A).
    pixel_size_A : float
        Declared pixel size.
    start : float
        Fraction of Nyquist where the roll-off starts (1 = hard cut at Nyquist).
    """
    k_nyq = 0.5 / pixel_size_A
    kx, ky = np.broadcast_arrays(np.asarray(kx, float), np.asarray(ky, float))
    out = np.ones(kx.shape)
    if start >= 1.0:
        return out
    for k in (kx, ky):
        t = (np.abs(k) / k_nyq - start) / (1.0 - start)
        sel = t > 0
        out[sel] *= np.cos(0.5 * np.pi * np.minimum(t[sel], 1.0)) ** 2
    return out


# ================================================================================= noise
def noise_shape(box: int, pixel_size_A: float, lowfreq_amp: float, lowfreq_width_A: float):
    """Relative noise power per rfft pixel, 1 + amp exp(-(|k| w)^2), shape (box, box//2+1)."""
    kx, ky = rfft_freqs(box, pixel_size_A)
    k = np.hypot(kx, ky)
    return 1.0 + lowfreq_amp * np.exp(-((k * lowfreq_width_A) ** 2))


def band_mask(box: int, pixel_size_A: float, low_A: float) -> np.ndarray:
    """rfft pixels with 1/low_A <= |k| <= Nyquist, shape (box, box//2+1)."""
    kx, ky = rfft_freqs(box, pixel_size_A)
    k = np.hypot(kx, ky)
    return (k >= 1.0 / low_A) & (k <= 0.5 / pixel_size_A)


def band_power(images: np.ndarray, pixel_size_A: float, low_A: float) -> np.ndarray:
    """Mean |Y(k)|^2 over the band's DFT pixels (full plane, via rfft weights), shape (n,)."""
    box = images.shape[-1]
    spec = centered_rfft2(images)
    w = rfft_weights(box) * band_mask(box, pixel_size_A, low_A)
    return np.einsum("nyx,yx->n", np.abs(spec) ** 2, w) / w.sum()


def coloured_noise(
    rng: np.random.Generator,
    n: int,
    box: int,
    pixel_size_A: float,
    sigma_white: float,
    lowfreq_amp: float,
    lowfreq_width_A: float,
) -> np.ndarray:
    """Gaussian noise with E|N(k)|^2 = box^2 sigma_white^2 shape(k), shape (n, box, box)."""
    white = rng.standard_normal((n, box, box))
    spec = sfft.rfft2(white, axes=(-2, -1))
    spec *= np.sqrt(noise_shape(box, pixel_size_A, lowfreq_amp, lowfreq_width_A))
    return sigma_white * sfft.irfft2(spec, s=(box, box), axes=(-2, -1))


# ======================================================================== the data set
_TAPER_MARGIN = 5.0

_STREAMS = (
    "defocus",
    "astig",
    "ice",
    "mag_mic",
    "mag_part",
    "pose",
    "shift",
    "scale",
    "halves",
    "coords",
    "pilot",
    "defocus_error",
    "ice_tilt",
)


def _rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent streams per effect, so that toggling one effect leaves the others' draws."""
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {k: np.random.default_rng(c) for k, c in zip(_STREAMS, children, strict=True)}


def _noise_rng(seed: int, mic_global: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0x6E6F, mic_global]))


def group_matrix(g) -> np.ndarray:
    """M_group of an :class:`OpticsGroupConfig`: (p_decl / p_true) R diag(maj, min) R^T."""
    m = np.eye(2)
    if g.aniso is not None:
        m = aniso_matrix(*g.aniso)
    if g.true_pixel_size_A is not None:
        m = m * (g.pixel_size_A / g.true_pixel_size_A)
    return m


def draw_parameters(cfg: SimulationConfig) -> dict[str, Any]:
    """Draw every random parameter of the data set (deterministic given ``cfg.seed``).

    Returns
    -------
    dict with ``particles`` (dict of per-particle arrays), ``micrographs`` (dict of
    per-micrograph arrays), ``groups`` (list of dicts) and global scalars.
    """
    r = _rngs(cfg.seed)
    dcfg, mcfg, scfg = cfg.defocus, cfg.magnification, cfg.scale
    counts = cfg.group_particle_counts()
    dz_ref = (
        mcfg.dz_ref_um * 1e4
        if mcfg.dz_ref_um is not None
        else 0.5 * (dcfg.min_um + dcfg.max_um) * 1e4
    )
    kappa = mcfg.kappa_pct_per_um / 100.0 / 1e4  # 1/A
    mic_rows: list[dict[str, Any]] = []
    part: dict[str, list] = {k: [] for k in ("group_index", "micrograph")}
    for gi, (g, n_g) in enumerate(zip(cfg.optics_groups, counts, strict=True)):
        n_mic = math.ceil(n_g / g.particles_per_micrograph)
        base, extra = divmod(n_g, n_mic)
        per_mic = [base + (1 if i < extra else 0) for i in range(n_mic)]
        for i, cnt in enumerate(per_mic):
            mic_rows.append(
                {
                    "group_index": gi,
                    "name": f"Micrographs/{g.name}_mic{i + 1:05d}.mrc",
                    "stack": f"Particles/{g.name}_mic{i + 1:05d}.mrcs",
                    "n_particles": cnt,
                }
            )
            part["group_index"] += [gi] * cnt
            part["micrograph"] += [len(mic_rows) - 1] * cnt
    n_mic_total = len(mic_rows)
    gidx = np.array(part["group_index"], int)
    mic = np.array(part["micrograph"], int)
    n = len(gidx)

    # --- micrographs
    dz_mic = r["defocus"].uniform(dcfg.min_um, dcfg.max_um, n_mic_total) * 1e4
    astig = r["astig"].uniform(0, 2 * dcfg.astig_mean_A, n_mic_total)
    astig_angle = r["astig"].uniform(-90, 90, n_mic_total)
    ice = r["ice"].normal(scfg.ice_mean_A, scfg.ice_std_A, n_mic_total)
    ice = np.maximum(ice, 0.2 * scfg.ice_mean_A)
    m_mic = _scatter_matrices(
        r["mag_mic"], n_mic_total, mcfg.mic_iso_std_pct / 100, mcfg.mic_aniso_std_pct / 100
    )
    m_group = np.array([group_matrix(g) for g in cfg.optics_groups])

    # --- particles
    mic_px = cfg.output.micrograph_size_px
    boxes = np.array([g.box for g in cfg.optics_groups])[gidx]
    coords = r["coords"].uniform(boxes[:, None] / 2, mic_px - boxes[:, None] / 2, (n, 2))
    coords = np.round(coords, 1)
    dz_part = dz_mic[mic] + r["defocus"].normal(0, dcfg.particle_std_A, n)
    if dcfg.ice_tilt_A > 0:  # a tilted ice layer: a height plane over each micrograph
        tilt_dir = r["ice_tilt"].uniform(0, 2 * np.pi, n_mic_total)
        unit = np.stack([np.cos(tilt_dir), np.sin(tilt_dir)], 1)[mic]
        dz_part = dz_part + dcfg.ice_tilt_A * np.sum((coords / mic_px - 0.5) * unit, axis=1)
    du = dz_part + 0.5 * astig[mic]
    dv = dz_part - 0.5 * astig[mic]
    ang = astig_angle[mic]
    m_part = _scatter_matrices(
        r["mag_part"], n, mcfg.particle_iso_std_pct / 100, mcfg.particle_aniso_std_pct / 100
    )
    m_def = 1 + kappa * (dz_part - dz_ref)
    mats = m_def[:, None, None] * m_mic[mic] @ m_part @ m_group[gidx]
    euler = Rotation.random(n, random_state=r["pose"]).as_euler("ZYZ", degrees=True)
    euler = np.asarray(euler).reshape(n, 3)
    origin = np.clip(
        r["shift"].normal(0, cfg.pose.shift_std_A, (n, 2)),
        -cfg.pose.shift_max_A,
        cfg.pose.shift_max_A,
    )
    if scfg.ice_mfp_A > 0 and np.isfinite(scfg.ice_mfp_A):
        s_ice = np.exp(-(ice[mic] - scfg.ice_mean_A) / scfg.ice_mfp_A)
    else:
        s_ice = np.ones(n)
    s_jit = np.exp(scfg.spread_pct / 100 * r["scale"].standard_normal(n))
    s_raw = s_ice * s_jit
    norm = s_raw.mean()
    s = s_raw / norm
    if cfg.output.half_sets == "alternate":
        halves = np.arange(n) % 2 + 1
    else:
        halves = r["halves"].integers(1, 3, n)

    # --- written defocus: apparent astigmatism of the per-micrograph mean magnification
    m_def_mic = 1 + kappa * (dz_mic - dz_ref)
    m_mean = m_def_mic[:, None, None] * m_mic @ m_group[[row["group_index"] for row in mic_rows]]
    adef = defocus_matrix(du, dv, ang)
    # apparent relative to the written rlnMagMat (RELION evaluates the CTF at M_written k):
    # the distortion left for the written defocus is M M_written^-1
    if cfg.output.write_true_group_mag:
        m_written = m_group[gidx]
        m_obs = m_mean[mic] @ np.linalg.inv(m_written)
        m_own = mats @ np.linalg.inv(m_written)
    else:
        m_obs, m_own = m_mean[mic], mats
    obs = np.swapaxes(m_obs, -1, -2) @ adef @ m_obs
    mean_obs = np.zeros((n_mic_total, 2, 2))
    np.add.at(mean_obs, mic, obs)
    mean_obs /= np.bincount(mic, minlength=n_mic_total)[:, None, None]
    mdu, mdv, mang = defocus_from_matrix(mean_obs)
    own_mean = 0.5 * (obs[:, 0, 0] + obs[:, 1, 1])
    # each particle's own apparent defocus: through its own M (its magnification too)
    own_obs = np.swapaxes(m_own, -1, -2) @ adef @ m_own
    own_obs_mean = 0.5 * (own_obs[:, 0, 0] + own_obs[:, 1, 1])
    half_astig = 0.5 * (mdu - mdv)
    app_u = own_mean + half_astig[mic]
    app_v = own_mean - half_astig[mic]
    app_ang = mang[mic]
    # what CTF estimation writes: per particle (exact), per micrograph or a patch plane,
    # with a per-micrograph estimation error of the mean defocus and the astigmatism
    est_err = np.zeros(n_mic_total)
    if dcfg.written != "particle":
        est_err = r["defocus_error"].normal(0, dcfg.estimation_error_A, n_mic_total)
        astig_err = r["defocus_error"].normal(0, dcfg.astig_error_A, (n_mic_total, 2))
        err_mat = np.zeros((n_mic_total, 2, 2))
        err_mat[:, 0, 0] = est_err + astig_err[:, 0]
        err_mat[:, 1, 1] = est_err - astig_err[:, 0]
        err_mat[:, 0, 1] = err_mat[:, 1, 0] = astig_err[:, 1]
        if dcfg.written == "micrograph":
            est_u, est_v, est_ang = defocus_from_matrix(mean_obs + err_mat)
            est_u, est_v, est_ang = est_u[mic], est_v[mic], est_ang[mic]
        else:  # patch: a plane in the coordinates fitted to the particles' apparent defocus
            plane = np.empty(n)
            for i in range(n_mic_total):
                sel = np.flatnonzero(mic == i)
                design = np.column_stack([np.ones(len(sel)), coords[sel] / mic_px - 0.5])
                if len(sel) < 3:
                    design = design[:, :1]
                coef = np.linalg.lstsq(design, own_mean[sel], rcond=None)[0]
                plane[sel] = design @ coef
            mu, mv, ma = defocus_from_matrix(mean_obs + err_mat)
            est_u = plane + est_err[mic] + 0.5 * (mu - mv)[mic]
            est_v = plane + est_err[mic] - 0.5 * (mu - mv)[mic]
            est_ang = ma[mic]
    else:
        est_u, est_v, est_ang = app_u, app_v, app_ang
    if cfg.output.true_defocus:
        w_u, w_v, w_a = du, dv, ang
    else:
        w_u, w_v, w_a = est_u, est_v, est_ang

    # true-frame centre of each particle (x_obs = -t)
    centres = -np.einsum("bij,bj->bi", np.swapaxes(np.linalg.inv(mats), -1, -2), origin)
    particles = {
        "group": gidx + 1,
        "group_index": gidx,
        "micrograph": mic,
        "euler_deg": euler,
        "origin_A": origin,
        "centre_true_A": centres,
        "defocus_u_true_A": du,
        "defocus_v_true_A": dv,
        "defocus_angle_true_deg": ang,
        "defocus_mean_true_A": dz_part,
        "defocus_u_apparent_A": app_u,
        "defocus_v_apparent_A": app_v,
        "defocus_angle_apparent_deg": app_ang,
        "defocus_mean_apparent_A": own_mean,
        "defocus_mean_apparent_own_M_A": own_obs_mean,
        "defocus_u_written_A": w_u,
        "defocus_v_written_A": w_v,
        "defocus_angle_written_deg": w_a,
        "M": mats,
        "M00": mats[:, 0, 0],
        "M01": mats[:, 0, 1],
        "M10": mats[:, 1, 0],
        "M11": mats[:, 1, 1],
        "det_M": np.linalg.det(mats),
        "m_def": m_def,
        "M_mic": m_mic[mic],
        "M_part": m_part,
        "M_group": m_group[gidx],
        "scale": s,
        "scale_ice": s_ice,
        "scale_jitter": s_jit,
        "ice_thickness_A": ice[mic],
        "half_set": halves,
        "coordinate_xy_px": coords,
    }
    micrographs = {
        "name": np.array([row["name"] for row in mic_rows]),
        "stack": np.array([row["stack"] for row in mic_rows]),
        "group_index": np.array([row["group_index"] for row in mic_rows], int),
        "n_particles": np.array([row["n_particles"] for row in mic_rows], int),
        "defocus_A": dz_mic,
        "defocus_written_error_A": est_err,
        "astig_A": astig,
        "astig_angle_deg": astig_angle,
        "ice_thickness_A": ice,
        "M_mic": m_mic,
        "m_def": m_def_mic,
        "M_mean": m_mean,
        "apparent_defocus_u_A": mdu,
        "apparent_defocus_v_A": mdv,
        "apparent_astig_angle_deg": mang,
    }
    return {
        "particles": particles,
        "micrographs": micrographs,
        "M_group": m_group,
        "kappa_per_A": kappa,
        "dz_ref_A": dz_ref,
        "scale_normalisation": norm,
    }


# ---------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(source: PhantomSource | MapSource) -> None:
    _WORKER["source"] = source


def _render_micrograph(task: dict[str, Any]) -> tuple[int, np.ndarray, float]:
    """Render, add noise, write one micrograph's stack; returns (mic, signal power, seconds)."""
    from cryomag.io import write_stack

    t0 = time.perf_counter()
    source = _WORKER["source"]
    imgs = render_particles(
        source,
        task["box"],
        task["pixel_size_A"],
        task["euler_deg"],
        task["origin_A"],
        task["du"],
        task["dv"],
        task["angle"],
        mag=task["mag"],
        scale=task["scale"],
        voltage_kv=task["voltage_kv"],
        cs_mm=task["cs_mm"],
        amplitude_contrast=task["amplitude_contrast"],
        phase_shift_deg=task["phase_shift_deg"],
        eps=task["eps"],
        margin_A=task["margin_A"],
        batch=task["batch"],
        antialias_start=task["antialias_start"],
        beam_tilt_mrad=task.get("beam_tilt_mrad"),
        odd_zernike=task.get("odd_zernike"),
        even_zernike=task.get("even_zernike"),
    )
    power = band_power(imgs, task["pixel_size_A"], task["band_low_A"])
    if task["sigma_white"] > 0:
        rng = _noise_rng(task["seed"], task["mic"])
        imgs = imgs + coloured_noise(
            rng,
            len(imgs),
            task["box"],
            task["pixel_size_A"],
            task["sigma_white"],
            task["lowfreq_amp"],
            task["lowfreq_width_A"],
        )
    write_stack(task["path"], imgs.astype(np.float32), task["pixel_size_A"])
    return task["mic"], power, time.perf_counter() - t0


def _make_source(cfg: SimulationConfig) -> tuple[PhantomSource | MapSource, dict[str, Any]]:
    """The specimen and a description of the reference written."""
    p = cfg.phantom
    g0 = cfg.optics_groups[0]
    if p.map_path is not None:
        src = MapSource.from_mrc(p.map_path)
        return src, {
            "kind": "map",
            "map_path": str(p.map_path),
            "pixel_size_A": src.ref_pixel_size_A,
            "box": int(src.volume.shape[0]),
        }
    phantom = Phantom.default(diameter_A=p.diameter_A, n_atoms=p.n_atoms, seed=p.seed)
    a_ref = p.ref_pixel_size_A if p.ref_pixel_size_A is not None else g0.pixel_size_A
    box_ref = p.ref_box if p.ref_box is not None else g0.box
    need = 2 * phantom.radius_A() / a_ref
    if p.ref_box is None and box_ref < need:
        box_ref = int(2 * math.ceil(need / 2))
    return PhantomSource(phantom, a_ref), {
        "kind": "phantom",
        "pixel_size_A": a_ref,
        "box": int(box_ref),
        "diameter_A": p.diameter_A,
        "n_atoms": phantom.n_atoms,
        "phantom_seed": p.seed,
    }


def _pilot_signal_power(
    cfg: SimulationConfig,
    source: PhantomSource | MapSource,
    gi: int,
    rng: np.random.Generator,
    m_group: np.ndarray,
) -> float:
    """Mean band power of noise-free, scale-1 particles of group ``gi`` (random poses and
    defocus from the configured distribution, origin 0, M = M_group)."""
    g = cfg.optics_groups[gi]
    d = cfg.defocus
    npil = cfg.noise.n_pilot
    euler = Rotation.random(npil, random_state=rng).as_euler("ZYZ", degrees=True).reshape(-1, 3)
    dz = rng.uniform(d.min_um, d.max_um, npil) * 1e4
    ast = rng.uniform(0, 2 * d.astig_mean_A, npil)
    ang = rng.uniform(-90, 90, npil)
    imgs = render_particles(
        source,
        g.box,
        g.pixel_size_A,
        euler,
        np.zeros((npil, 2)),
        dz + ast / 2,
        dz - ast / 2,
        ang,
        mag=m_group,
        voltage_kv=g.voltage_kv,
        cs_mm=g.cs_mm,
        amplitude_contrast=g.amplitude_contrast,
        phase_shift_deg=g.phase_shift_deg,
        eps=cfg.render.eps,
        margin_A=cfg.render.margin_A,
        batch=cfg.render.batch,
        antialias_start=cfg.render.antialias_start,
        beam_tilt_mrad=g.beam_tilt_mrad,
        odd_zernike=g.odd_zernike,
        even_zernike=g.even_zernike,
    )
    return float(band_power(imgs, g.pixel_size_A, cfg.noise.band_low_A).mean())


def simulate_dataset(
    cfg: SimulationConfig,
    out_dir: str | os.PathLike,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    protect: Sequence[str | os.PathLike] = (),
) -> tuple[ParticleSet, dict[str, Any]]:
    """Simulate a data set and write it to ``out_dir``.

    Files written (paths relative to ``out_dir``): ``Particles/<group>_micNNNNN.mrcs`` (one
    stack per micrograph), ``particles.star`` (RELION 3.1), ``particles.cs`` (if
    ``cfg.output.write_cs``), ``ref.mrc`` (the band-limited rasterised phantom at the
    reference pixel size, or a copy of the input map), ``truth.npz`` (per-particle,
    per-micrograph and per-group arrays), ``truth.json`` (everything but the per-particle
    arrays, plus the configuration) and ``simulation.toml`` (the configuration).

    Written defocus (default, ``output.true_defocus = false``): what per-micrograph CTF
    fitting followed by per-particle defocus refinement would report on the distorted images.
    For micrograph m with mean magnification ``Mbar_m = m_def(dz_m) M_mic,m M_group`` (the
    particle scatter averages out) every particle's true astigmatism matrix is transformed to
    the observed frame, ``Adef_obs = Mbar^T Adef Mbar`` (ctf.transform_astigmatism); the
    astigmatism (DefocusU - DefocusV and angle) is that of the micrograph mean of these
    matrices, and each particle keeps its own transformed mean defocus (trace / 2) -- RELION's
    adaptAstigmatism logic. rlnMagMat is the identity unless
    ``output.write_true_group_mag``.

    Parameters
    ----------
    cfg : SimulationConfig
    out_dir : path
        Output folder (created if needed).
    progress : bool
        Show a rich progress bar.
    on_progress : callable(done, total), optional
        Called after each micrograph.
    protect : sequence of path
        Input files that must never be overwritten (checked before anything is written; the
        map of ``cfg.phantom.map_path`` is always protected).

    Returns
    -------
    (ParticleSet, truth) : the written particle set and the truth dictionary (the content of
    truth.json with the per-particle arrays of truth.npz under ``"particles"``).
    """
    from cryomag.io import write_cs, write_star
    from cryomag.io.atomic import ensure_not_input

    cfg.validate()
    out = Path(out_dir)
    t_start = time.perf_counter()
    source, ref_info = _make_source(cfg)
    params = draw_parameters(cfg)
    P, MIC = params["particles"], params["micrographs"]
    inputs = [*protect, cfg.phantom.map_path]
    outputs = ["ref.mrc", "particles.star", "particles.cs", "truth.npz", "truth.json"]
    outputs += ["simulation.toml", *MIC["stack"]]
    for name in outputs:
        ensure_not_input(out / name, inputs)
    (out / "Particles").mkdir(parents=True, exist_ok=True)
    n = len(P["group"])
    rngs = _rngs(cfg.seed)

    # --- reference map
    ref_path = out / "ref.mrc"
    if isinstance(source, PhantomSource):
        source.phantom.write_map(ref_path, ref_info["box"], ref_info["pixel_size_A"])
    else:
        write_mrc_map(ref_path, source.volume, source.ref_pixel_size_A)
    ref_info["path"] = "ref.mrc"

    # --- noise levels per group
    groups_out: list[dict[str, Any]] = []
    for gi, g in enumerate(cfg.optics_groups):
        shape = noise_shape(g.box, g.pixel_size_A, cfg.noise.lowfreq_amp, cfg.noise.lowfreq_width_A)
        bmask = band_mask(g.box, g.pixel_size_A, cfg.noise.band_low_A)
        w = rfft_weights(g.box) * bmask
        shape_band = float((shape * w).sum() / w.sum())
        if math.isinf(cfg.noise.snr):
            p_sig, sigma_white, p_noise = float("nan"), 0.0, 0.0
        else:
            p_sig = _pilot_signal_power(cfg, source, gi, rngs["pilot"], params["M_group"][gi])
            p_noise = p_sig / cfg.noise.snr
            sigma_white = math.sqrt(p_noise / (g.box**2 * shape_band))
        groups_out.append(
            {
                "number": gi + 1,
                "name": g.name,
                "pixel_size_A": g.pixel_size_A,
                "true_pixel_size_A": g.true_pixel_size_A
                if g.true_pixel_size_A is not None
                else g.pixel_size_A,
                "aniso": list(g.aniso) if g.aniso is not None else None,
                "box": g.box,
                "voltage_kv": g.voltage_kv,
                "cs_mm": g.cs_mm,
                "amplitude_contrast": g.amplitude_contrast,
                "phase_shift_deg": g.phase_shift_deg,
                "beam_tilt_mrad": list(g.beam_tilt_mrad or [0.0, 0.0]),
                "odd_zernike": list(g.odd_zernike or []),
                "even_zernike": list(g.even_zernike or []),
                "M_group": params["M_group"][gi].tolist(),
                "n_particles": int(np.sum(P["group_index"] == gi)),
                "n_micrographs": int(np.sum(MIC["group_index"] == gi)),
                "noise_sigma_white": sigma_white,
                "noise_power_band": p_noise,
                "signal_power_band_pilot": p_sig,
                "noise_shape_band_mean": shape_band,
            }
        )

    # --- render micrographs
    tasks = []
    for mi in range(len(MIC["name"])):
        gi = int(MIC["group_index"][mi])
        g = cfg.optics_groups[gi]
        sel = np.flatnonzero(P["micrograph"] == mi)
        tasks.append(
            {
                "mic": mi,
                "path": str(out / MIC["stack"][mi]),
                "box": g.box,
                "pixel_size_A": g.pixel_size_A,
                "euler_deg": P["euler_deg"][sel],
                "origin_A": P["origin_A"][sel],
                "du": P["defocus_u_true_A"][sel],
                "dv": P["defocus_v_true_A"][sel],
                "angle": P["defocus_angle_true_deg"][sel],
                "mag": P["M"][sel],
                "scale": P["scale"][sel],
                "voltage_kv": g.voltage_kv,
                "cs_mm": g.cs_mm,
                "amplitude_contrast": g.amplitude_contrast,
                "phase_shift_deg": g.phase_shift_deg,
                "eps": cfg.render.eps,
                "margin_A": cfg.render.margin_A,
                "batch": cfg.render.batch,
                "antialias_start": cfg.render.antialias_start,
                "beam_tilt_mrad": g.beam_tilt_mrad,
                "odd_zernike": g.odd_zernike,
                "even_zernike": g.even_zernike,
                "band_low_A": cfg.noise.band_low_A,
                "sigma_white": groups_out[gi]["noise_sigma_white"],
                "lowfreq_amp": cfg.noise.lowfreq_amp,
                "lowfreq_width_A": cfg.noise.lowfreq_width_A,
                "seed": cfg.seed,
            }
        )
    signal_power = np.zeros(n)
    n_workers = cfg.render.n_workers or (os.cpu_count() or 1)
    n_workers = max(1, min(n_workers, len(tasks)))
    if n < 200:
        n_workers = 1
    t_render = time.perf_counter()
    _run_tasks(tasks, source, n_workers, progress, on_progress, P, signal_power, n)
    timing = {
        "setup_s": t_render - t_start,
        "render_s": time.perf_counter() - t_render,
        "n_workers": n_workers,
    }

    # --- particle set
    ps = _particle_set(cfg, P, MIC, params)
    ps.validate()
    write_star(ps, out / "particles.star")
    if cfg.output.write_cs:
        write_cs(ps, out / "particles.cs")

    # --- truth
    noise_power = np.array([groups_out[g]["noise_power_band"] for g in P["group_index"]])
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_real = np.where(noise_power > 0, signal_power / noise_power, np.inf)
    P["signal_power_band"] = signal_power
    P["snr_realised"] = snr_real
    P["image_name"] = ps.image_names()
    MIC["noise_sigma_white"] = np.array(
        [groups_out[g]["noise_sigma_white"] for g in MIC["group_index"]]
    )
    timing["total_s"] = time.perf_counter() - t_start
    truth = _truth_dict(cfg, params, ref_info, groups_out, timing, n)
    _write_truth(out, truth, P, MIC, params)
    cfg.to_toml(out / "simulation.toml")
    truth["particles"] = P
    truth["micrograph_arrays"] = MIC
    truth["M_group"] = params["M_group"]
    return ps, truth


def _run_tasks(tasks, source, n_workers, progress, on_progress, P, signal_power, n) -> None:
    total = len(tasks)
    bar = None
    task_id = None
    if progress:
        from cryomag.execution.local import LineProgress
        from cryomag.report.console import is_plain

    if progress and is_plain():  # a log: periodic lines
        bar = LineProgress()
        bar.start()
        task_id = bar.add_task("simulating particles", total=n)
    elif progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("simulating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("particles"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        bar.start()
        task_id = bar.add_task("simulate", total=n)
    done = 0

    def finished(mi: int, power: np.ndarray) -> None:
        nonlocal done
        signal_power[P["micrograph"] == mi] = power
        done += 1
        if bar is not None:
            bar.advance(task_id, len(power))
        if on_progress is not None:
            on_progress(done, total)

    try:
        if n_workers == 1:
            _init_worker(source)
            for t in tasks:
                mi, power, _ = _render_micrograph(t)
                finished(mi, power)
        else:
            # threads, not processes: finufft and numpy's FFTs release the GIL, and a thread
            # pool needs no ``if __name__ == "__main__"`` guard in the caller's script (a
            # spawned process pool re-runs an unguarded script and hangs)
            from concurrent.futures import ThreadPoolExecutor, as_completed

            _init_worker(source)
            with ThreadPoolExecutor(n_workers) as pool:
                futures = [pool.submit(_render_micrograph, t) for t in tasks]
                for fut in as_completed(futures):
                    mi, power, _ = fut.result()
                    finished(mi, power)
    finally:
        if bar is not None:
            bar.stop()


def _particle_set(cfg: SimulationConfig, P, MIC, params) -> ParticleSet:
    from cryomag.model.tables import OpticsGroupRow, particle_set_from_arrays

    n = len(P["group"])
    mic = P["micrograph"]
    # 1-based index of each particle within its micrograph's stack
    idx_in_stack = np.zeros(n, int)
    for mi in range(len(MIC["name"])):
        sel = np.flatnonzero(mic == mi)
        idx_in_stack[sel] = np.arange(1, len(sel) + 1)
    image_names = [f"{i:06d}@{MIC['stack'][m]}" for i, m in zip(idx_in_stack, mic, strict=True)]
    g0 = cfg.optics_groups
    optics = [
        OpticsGroupRow(
            name=g.name, pixel_size_A=g.pixel_size_A, box=g.box, voltage_kv=g.voltage_kv,
            cs_mm=g.cs_mm, amplitude_contrast=g.amplitude_contrast,
            mag=params["M_group"][gi] if cfg.output.write_true_group_mag else np.eye(2),
            beam_tilt_mrad=g.beam_tilt_mrad, odd_zernike=g.odd_zernike,
            even_zernike=g.even_zernike,
        )
        for gi, g in enumerate(g0)
    ]  # fmt: skip
    return particle_set_from_arrays(
        image_names=image_names,
        micrographs=MIC["name"][mic],
        coordinates_px=P["coordinate_xy_px"],
        optics_group=P["group"],
        defocus_uva=np.stack([P["defocus_u_written_A"], P["defocus_v_written_A"],
                              P["defocus_angle_written_deg"]], 1),  # fmt: skip
        phase_shift_deg=np.array([g0[g].phase_shift_deg for g in P["group_index"]]),
        euler_deg=P["euler_deg"],
        origin_A=P["origin_A"],
        half_sets=P["half_set"],
        optics=optics,
    )


def _truth_dict(cfg, params, ref_info, groups_out, timing, n) -> dict[str, Any]:
    return {
        "format": "cryomag-simulation-truth/1",
        "seed": cfg.seed,
        "n_particles": n,
        "kappa_per_A": params["kappa_per_A"],
        "kappa_pct_per_um": cfg.magnification.kappa_pct_per_um,
        "dz_ref_A": params["dz_ref_A"],
        "magnification_model": (
            "M_p = m_def * M_mic * M_part * M_group, m_def = 1 + kappa (dz_p - dz_ref), "
            "dz_p = (DefocusU + DefocusV) / 2 true; k_ref = M_p k_obs; x_obs = M_p^T x_true"
        ),
        "image_model": (
            "Y(k) = s det(M) (a_ref/a_g)^2 CTF_true(M k) V(A^T (M k, 0)) exp(+2 pi i k.t), "
            "image DFT = plain pixel sum with phase origin at box/2, V as Phantom.fourier"
        ),
        "written_defocus": "true (specimen frame)"
        if cfg.output.true_defocus
        else {
            "particle": (
                "apparent: per-micrograph astigmatism of Mbar^T Adef Mbar, "
                "Mbar = m_def(dz_mic) M_mic M_group; each particle's own transformed mean "
                "defocus"
            ),
            "micrograph": (
                "apparent, per micrograph: the mean of its particles' Mbar^T Adef Mbar plus "
                "the estimation error (micrographs.defocus_written_error_A)"
            ),
            "patch": (
                "apparent, a plane per micrograph fitted to its particles' apparent mean "
                "defocus over their coordinates, plus the estimation error"
            ),
        }[cfg.defocus.written],
        "written_magmat": "M_group" if cfg.output.write_true_group_mag else "identity",
        "antialias_start": cfg.render.antialias_start,
        "antialias_filter": (
            "W(k_obs) = w(k_x) w(k_y), w = 1 for |k| <= start k_nyq, "
            "cos^2(pi/2 (|k|/k_nyq - start)/(1 - start)) up to k_nyq, 0 beyond; "
            "the images follow the model times W"
        ),
        "scale_normalisation": params["scale_normalisation"],
        "snr": cfg.noise.snr,
        "snr_band_A": [cfg.noise.band_low_A, "nyquist"],
        "noise_model": (
            "E|N(k)|^2 = box^2 sigma_white^2 (1 + lowfreq_amp exp(-(|k| lowfreq_width_A)^2))"
        ),
        "reference": ref_info,
        "groups": groups_out,
        "micrographs": {
            k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in params["micrographs"].items()
        },
        "timing": timing,
        "config": cfg.to_dict(),
    }


def _write_truth(out: Path, truth: dict[str, Any], P, MIC, params) -> None:
    from cryomag.io.atomic import atomic_write

    arrays = {f"particle/{k}": np.asarray(v) for k, v in P.items()}
    arrays.update({f"micrograph/{k}": np.asarray(v) for k, v in MIC.items()})
    arrays["group/M_group"] = params["M_group"]
    with atomic_write(out / "truth.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    mic_json = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in MIC.items()}
    doc = dict(truth, micrographs=mic_json)
    doc["particle_arrays"] = sorted(arrays)
    with atomic_write(out / "truth.json") as tmp:
        text = json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False)
        Path(tmp).write_text(text)


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write inf as the string "inf" and nan as null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def load_truth(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read truth.json and truth.npz of a simulated data set.

    Returns
    -------
    dict
        truth.json's content (infinite values written as "inf" are read back as floats) with
        ``"particles"`` (dict of per-particle arrays), ``"micrograph_arrays"`` and
        ``"M_group"`` (G, 2, 2) from truth.npz -- the same structure as returned by
        :func:`simulate_dataset`.
    """
    out = Path(out_dir)
    truth = json.loads((out / "truth.json").read_text())
    if truth.get("snr") == "inf":
        truth["snr"] = math.inf
    with np.load(out / "truth.npz", allow_pickle=False) as z:
        truth["particles"] = {
            k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("particle/")
        }
        truth["micrograph_arrays"] = {
            k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("micrograph/")
        }
        truth["M_group"] = z["group/M_group"]
    return truth


def summarize(truth: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows (label, value) describing a simulated data set, for the CLI summary."""
    P = truth["particles"]
    rows = [
        ("particles", str(truth["n_particles"])),
        ("optics groups", str(len(truth["groups"]))),
        ("micrographs", str(len(truth["micrographs"]["name"]))),
        (
            "reference",
            f"{truth['reference']['kind']} {truth['reference']['box']} px @ "
            f"{truth['reference']['pixel_size_A']:.3f} A",
        ),
        ("SNR (band)", f"{truth['snr']}"),
        ("scale s_p mean / std", f"{np.mean(P['scale']):.3f} / {np.std(P['scale']):.3f}"),
        ("kappa", f"{truth['kappa_pct_per_um']} %/um (dz_ref {truth['dz_ref_A']:.0f} A)"),
        ("written defocus", truth["written_defocus"].split(":")[0]),
        (
            "time",
            f"{truth['timing']['total_s']:.1f} s (rendering {truth['timing']['render_s']:.1f} s"
            f" on {truth['timing']['n_workers']} worker(s))",
        ),
    ]
    for g in truth["groups"]:
        m = np.asarray(g["M_group"])
        rows.append(
            (
                f"group {g['number']} ({g['name']})",
                f"{g['n_particles']} ptcls, box {g['box']}, {g['pixel_size_A']} A, "
                f"M_group [[{m[0, 0]:.4f}, {m[0, 1]:.4f}], [{m[1, 0]:.4f}, {m[1, 1]:.4f}]]",
            )
        )
    return rows
