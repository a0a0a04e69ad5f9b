"""The forward model of a particle image (RELION's conventions; CONVENTIONS.md section 1).

On the particle's own rfft grid of observed frequencies k (1/A, declared pixel size a_g):

    Y_p(k) = a_p * C_p(k) * V(A_p^T (M_p k, 0)) * exp(+2 pi i k . t_p)

with a_p = s_p * det(M_p) * (a_ref / a_g)^2: s_p is the contrast scale (1 = the mean
particle), det(M_p) keeps the real-space contrast of a magnified image unchanged and
(a_ref / a_g)^2 converts voxel sums to pixel sums. C_p is RELION's CTF evaluated at M_p k
(:mod:`cryomag.physics.ctf`), V the reference's Fourier transform
(:mod:`cryomag.physics.reference`), t_p = (rlnOriginXAngst, rlnOriginYAngst).

This is the reference implementation in double precision: the statistics kernels
(:mod:`cryomag.fit.accumulate`) evaluate the same model in single precision with the pieces
of :mod:`cryomag.physics.grid`, which are tested against these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryomag.physics.ctf import ctf_split_frames
from cryomag.physics.fourier import shift_phase
from cryomag.physics.reference import MapReference, slice_values

__all__ = ["OpticsParams", "ParticleGeometry", "amplitude_factor", "ctf_at", "predict"]


@dataclass
class ParticleGeometry:
    """Per-particle inputs of the forward model for one optics group (N particles).

    Attributes
    ----------
    euler_deg : ndarray, shape (N, 3)
        RELION (rot, tilt, psi) in degrees.
    origin_A : ndarray, shape (N, 2)
        rlnOriginXAngst, rlnOriginYAngst.
    mag : ndarray, shape (N, 2, 2) or (2, 2)
        Magnification matrix M (k_ref = M k_obs).
    defocus_u_A, defocus_v_A, defocus_angle_deg, phase_shift_deg, bfactor_A2, ctf_scale :
        ndarray, shape (N,)
    ctf_mag : ndarray, shape (N, 2, 2) or (2, 2), optional
        Matrix at which the CTF's defocus term is evaluated (``ctf_mag @ k``); defaults to
        ``mag``. Set it to the input's M to hold the defocus fixed as measured while ``mag``
        changes; the Cs term always acts at the true frequency ``mag @ k``.
    """

    euler_deg: np.ndarray
    origin_A: np.ndarray
    mag: np.ndarray
    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_A2: np.ndarray
    ctf_scale: np.ndarray
    ctf_mag: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.euler_deg)


@dataclass
class OpticsParams:
    """Per-optics-group constants: pixel size (A), box (px), voltage (kV), Cs (mm), Q0."""

    pixel_size_A: float
    box: int
    voltage_kv: float
    cs_mm: float
    amplitude_contrast: float


def _per_particle(mat: np.ndarray, n: int) -> np.ndarray:
    m = np.asarray(mat, float)
    return np.broadcast_to(m, (n, 2, 2)) if m.ndim == 2 else m


def ctf_at(
    geom: ParticleGeometry,
    optics: OpticsParams,
    kx: np.ndarray,
    ky: np.ndarray,
    gradient: bool = False,
):
    """CTF of each particle at observed frequencies.

    The defocus term is evaluated at ``ctf_mag @ k`` (the frame where the input's defocus is
    expressed) and the Cs term at the true frequency ``mag @ k``; when ``ctf_mag`` is None both
    use ``mag`` and this is RELION's CTF(M k).

    Parameters
    ----------
    kx, ky : ndarray, shape (npix,)
        Observed frequencies (1/A).
    gradient : bool
        Also return dCTF/du at u = mag @ k (through the Cs term), shape (N, npix, 2).

    Returns
    -------
    ndarray, shape (N, npix) (and the gradient)
    """
    n = len(geom)
    m = _per_particle(geom.mag, n)
    cm = m if geom.ctf_mag is None else _per_particle(geom.ctf_mag, n)
    dx = cm[:, 0, 0, None] * kx[None] + cm[:, 0, 1, None] * ky[None]
    dy = cm[:, 1, 0, None] * kx[None] + cm[:, 1, 1, None] * ky[None]
    ux = m[:, 0, 0, None] * kx[None] + m[:, 0, 1, None] * ky[None]
    uy = m[:, 1, 0, None] * kx[None] + m[:, 1, 1, None] * ky[None]
    return ctf_split_frames(
        dx,
        dy,
        ux,
        uy,
        geom.defocus_u_A,
        geom.defocus_v_A,
        geom.defocus_angle_deg,
        optics.voltage_kv,
        optics.cs_mm,
        optics.amplitude_contrast,
        geom.phase_shift_deg,
        geom.bfactor_A2,
        geom.ctf_scale,
        gradient=gradient,
    )


def amplitude_factor(mag: np.ndarray, ref_pixel_A: float, pixel_A: float) -> np.ndarray:
    """det(M) (a_ref / a_g)^2 per particle: the scale of a contrast-1 particle, shape (N,)."""
    m = np.asarray(mag, float)
    det = np.linalg.det(m)
    return np.atleast_1d(det) * (ref_pixel_A / pixel_A) ** 2


def predict(
    reference: MapReference,
    geom: ParticleGeometry,
    optics: OpticsParams,
    kx: np.ndarray,
    ky: np.ndarray,
    scale: np.ndarray | float = 1.0,
    gradient: bool = False,
):
    """The forward model Y_p(k) at observed frequencies.

    Parameters
    ----------
    kx, ky : ndarray, shape (npix,)
        Observed frequencies (1/A), e.g. a masked subset of the rfft grid.
    scale : ndarray, shape (N,), or float
        Contrast scale s_p.
    gradient : bool
        Also return dY/du at u = M k with the CTF held fixed (for magnification fits).

    Returns
    -------
    pred : ndarray, complex, shape (N, npix)
    grad : ndarray, complex, shape (N, npix, 2), only when ``gradient``
    """
    n = len(geom)
    m = _per_particle(geom.mag, n)
    ctf = ctf_at(geom, optics, kx, ky)
    phase = shift_phase(kx, ky, geom.origin_A)
    amp = np.asarray(scale, float) * amplitude_factor(
        m, reference.pixel_size_A, optics.pixel_size_A
    )
    common = (amp[:, None] * ctf) * phase
    if not gradient:
        return common * slice_values(reference, geom.euler_deg, m, kx, ky)
    val, gu = slice_values(reference, geom.euler_deg, m, kx, ky, gradient=True)
    return common * val, common[..., None] * gu
