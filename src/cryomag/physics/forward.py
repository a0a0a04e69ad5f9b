"""The forward model of a particle image (RELION's conventions; CONVENTIONS.md section 1).

On the particle's own rfft grid of observed frequencies k (1/A, declared pixel size a_g):

    Y_p(k) = a_p * C_p(k) * V(A_p^T (M_p k, 0)) * exp(+2 pi i k . t_p)

with a_p = s_p * det(M_p) * (a_ref / a_g)^2: s_p is the contrast scale (1 = the mean
particle), det(M_p) keeps the real-space contrast of a magnified image unchanged and
(a_ref / a_g)^2 converts voxel sums to pixel sums. C_p is RELION's CTF evaluated at M_p k
(:mod:`cryomag.physics.ctf`), V the reference's Fourier transform
(:mod:`cryomag.physics.reference`), t_p = (rlnOriginXAngst, rlnOriginYAngst).

The group's fixed aberrations (:mod:`cryomag.physics.aberrations`) act at M_p k as RELION's
do: the even Zernike terms inside C_p's chi (chi -= phase_even(M k)), the odd terms and the
beam tilt as the factor exp(+i phase_odd(M k)) on the prediction. With none, nothing extra
is computed and every result is unchanged.

This is the reference implementation in double precision: the statistics kernels
(:mod:`cryomag.fit.accumulate`) evaluate the same model in single precision with the pieces
of :mod:`cryomag.physics.grid`, which are tested against these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryomag.physics.aberrations import beam_tilt_to_odd, has_aberration, zernike_phase
from cryomag.physics.ctf import ctf_split_frames, electron_wavelength_A
from cryomag.physics.fourier import shift_phase
from cryomag.physics.reference import MapReference, slice_values

__all__ = [
    "OpticsParams",
    "ParticleGeometry",
    "amplitude_factor",
    "ctf_at",
    "odd_factor",
    "predict",
]


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
    """Per-optics-group constants of the forward model.

    Attributes
    ----------
    pixel_size_A : float
        Declared pixel size (A/px).
    box : int
        Box (px).
    voltage_kv, cs_mm, amplitude_contrast : float
        Voltage (kV), spherical aberration (mm), amplitude contrast Q0.
    beam_tilt_mrad : tuple of float, shape (2,)
        rlnBeamTiltX, rlnBeamTiltY (mrad); added to the odd terms by RELION's insertTilt
        (:func:`cryomag.physics.aberrations.beam_tilt_to_odd`).
    odd_zernike, even_zernike : tuple of float
        rlnOddZernike, rlnEvenZernike (rad, RELION order; :mod:`cryomag.physics.aberrations`).
        All aberrations act at the true frequency u = M k and are held fixed by the fits.
    """

    pixel_size_A: float
    box: int
    voltage_kv: float
    cs_mm: float
    amplitude_contrast: float
    beam_tilt_mrad: tuple[float, float] = (0.0, 0.0)
    odd_zernike: tuple[float, ...] = ()
    even_zernike: tuple[float, ...] = ()

    def odd_coefficients(self) -> tuple[float, ...]:
        """The odd terms RELION applies: rlnOddZernike plus the beam tilt (insertTilt,
        obs_model.cpp:166-183); empty when every term is zero."""
        tx, ty = (float(t) for t in self.beam_tilt_mrad)
        odd = tuple(float(c) for c in self.odd_zernike)
        if tx != 0.0 or ty != 0.0:
            lam = float(electron_wavelength_A(self.voltage_kv))
            odd = tuple(beam_tilt_to_odd(tx, ty, self.cs_mm, lam, odd))
        return odd if has_aberration(odd) else ()

    def even_coefficients(self) -> tuple[float, ...]:
        """rlnEvenZernike; empty when every term is zero."""
        even = tuple(float(c) for c in self.even_zernike)
        return even if has_aberration(even) else ()

    @property
    def has_aberrations(self) -> bool:
        """Whether any beam tilt, odd or even term is non-zero."""
        return bool(self.odd_coefficients() or self.even_coefficients())


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
        even_zernike=optics.even_coefficients(),
    )


def odd_factor(geom: ParticleGeometry, optics: OpticsParams, kx: np.ndarray, ky: np.ndarray,
               gradient: bool = False):  # fmt: skip
    """exp(+i phase_odd(M k)) per particle (RELION's odd aberrations with the beam tilt),
    or None when the group has none.

    Parameters
    ----------
    kx, ky : ndarray, shape (npix,)
        Observed frequencies (1/A).
    gradient : bool
        Also return d phase_odd / du at u = M k, shape (N, npix, 2) (rad A).

    Returns
    -------
    factor : ndarray, complex, shape (N, npix), or None
    dphase : ndarray, shape (N, npix, 2), only with ``gradient`` (None when no odd terms)
    """
    odd = optics.odd_coefficients()
    if not odd:
        return (None, None) if gradient else None
    m = _per_particle(geom.mag, len(geom))
    ux = m[:, 0, 0, None] * kx[None] + m[:, 0, 1, None] * ky[None]
    uy = m[:, 1, 0, None] * kx[None] + m[:, 1, 1, None] * ky[None]
    if not gradient:
        return np.exp(1j * zernike_phase(odd, ux, uy, "odd"))
    ph, g = zernike_phase(odd, ux, uy, "odd", derivatives=1)
    return np.exp(1j * ph), np.moveaxis(g, 0, -1)


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
        Also return dY/du at u = M k with the CTF held fixed (for magnification fits); the
        odd aberration factor is differentiated with the reference.

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
    if gradient:
        odd, dodd = odd_factor(geom, optics, kx, ky, gradient=True)
    else:
        odd = odd_factor(geom, optics, kx, ky)
    if odd is not None:
        common = common * odd  # RELION: prediction x exp(+i phase_odd(M k))
    if not gradient:
        return common * slice_values(reference, geom.euler_deg, m, kx, ky)
    val, gu = slice_values(reference, geom.euler_deg, m, kx, ky, gradient=True)
    if odd is not None:
        gu = gu + 1j * dodd * val[..., None]
    return common * val, common[..., None] * gu
