"""Magnification matrices: RELION and cryoSPARC conventions, polar form, MotionCor2 triple.

Conventions (CONVENTIONS_VERIFIED.md sections 1 and 5)
------------------------------------------------------
Coordinates are (x, y) = (column, row) of the image array as stored; angles are in degrees,
measured from +x towards +y (the convention of rlnDefocusAngle).

RELION matrix ``M`` (rlnMagMat00..11, per optics group) maps an observed frequency to the true
(reference) frequency, both in 1/A computed with the declared pixel size::

    k_ref = M @ k_obs

so the observed image is ``Y_obs(k) ~ Y_true(M k)``. In real space this means (substitute
``x = M^T y`` in the Fourier integral) that a feature at ``x_true`` appears at::

    x_obs = M^T @ x_true            (declared A)

An isotropic ``M = m I`` is ``m = p_declared / p_true``: ``m > 1`` makes the particle look
larger than the declared pixel size implies, and the true pixel size is ``p_declared / m``.

cryoSPARC ``ctf/anisomag`` (4 floats, row-major 2x2) stores a matrix ``A`` with the identity
subtracted: ``I + A`` is a passive transform of Fourier coordinates, and
``I + A = p_true / p_declared`` in the isotropic case (cryosparc-tools' magnification example).
Hence ``M = (I + A)^-1``. For the anisotropic part the choice between ``(I + A)^-1`` and its
transpose is not settled by any public source (CONVENTIONS_VERIFIED U1); the two differ only
by the rotation part of ``I + A`` (zero for a symmetric matrix). We use ``(I + A)^-1``,
the same choice as :mod:`cryomag.io`.

Polar form
----------
Every ``M`` with ``det M > 0`` factors uniquely as ``M = R S`` with ``R`` a rotation by
``rotation_deg`` and ``S`` symmetric positive definite,
``S = Q(angle) diag(major, minor) Q(angle)^T``, ``Q(a)`` the rotation by ``a``. Then

    x_obs = M^T x_true = S (R^T x_true):

the true image is rotated by ``-rotation_deg`` and then stretched, in the observed-image frame,
by ``major_scale`` along the unit vector ``(cos angle, sin angle)`` and by ``minor_scale`` along
the perpendicular. ``major_scale >= minor_scale`` are the singular values of ``M``;
``angle_deg`` in (-90, 90] is therefore the direction, in the observed image, along which the
image is stretched most (relative to what the declared pixel size implies). In SPA the rotation
is absorbed by the in-plane angle psi and the defocus angle; only ``S`` (or ``M^T M``) is
physically identifiable, and ``rotation_deg != 0`` only says that the matrix is not symmetric.

MotionCor2 ``-Mag major minor angle``
-------------------------------------
MotionCor2 (>= 1.0.0) corrects the anisotropy "by stretching the image along the major axis,
the axis where the lower magnification is detected", with the major and minor scale factors and
the major-axis angle from the image x axis, i.e. the exact output of cisTEM's
mag_distortion_estimate (Grant & Grigorieff 2015). We read the triple as the symmetric
real-space correction ``C = Q(angle) diag(major, minor) Q(angle)^T`` applied to observed
coordinates, ``x_corrected = C x_obs``. The correction that undoes the distortion up to the
(harmless) rotation is ``C = S^-1``, because ``S^-1 x_obs = R^T x_true``. Hence

    major = 1 / minor_scale,   minor = 1 / major_scale,   angle = angle_deg + 90 (mod 180),

the axis of least magnification, where the image must be stretched most. An isotropic
``M = m I`` gives ``major = minor = 1 / m``: the images are resampled to the declared pixel size.
The correction includes the isotropic part, so after it the declared pixel size is right.
Caveats: a pre-1.0 MotionCor2 expected ``(1/major, 1/minor, -angle)`` (Scipion issue 1162);
the statement in CONVENTIONS.md section 4 that MotionCor2 negates cisTEM's angle matches only
that old version. Micrographs written by cryoSPARC Patch Motion are flipped in Y relative to
the movies MotionCor2 reads (pyem issue 81): for a matrix estimated on such particles pass
``flip_y=True``, which negates the angle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Relative difference of the singular values below which the axis angle is undefined (set to 0).
ISOTROPIC_RTOL = 1e-12


def _rot(angle_deg: np.ndarray) -> np.ndarray:
    """Rotation matrices by ``angle_deg`` (from +x towards +y), shape angle.shape + (2, 2)."""
    a = np.deg2rad(np.asarray(angle_deg, float))
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _wrap_axis(angle_deg: np.ndarray) -> np.ndarray:
    """Wrap an axis direction (defined modulo 180 deg) into (-90, 90]."""
    a = np.mod(np.asarray(angle_deg, float) + 90.0, 180.0) - 90.0
    return np.where(a <= -90.0, a + 180.0, a)


def _scalar(x: np.ndarray) -> float | np.ndarray:
    """A 0-d array as a Python float, anything else unchanged."""
    return float(x) if np.ndim(x) == 0 else x


def _as_matrices(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, float)
    if m.shape[-2:] != (2, 2):
        raise ValueError(f"expected magnification matrices of shape (..., 2, 2), got {m.shape}")
    return m


# --------------------------------------------------------------------------- conventions
def relion_to_cryosparc(mag: np.ndarray) -> np.ndarray:
    """cryoSPARC ``ctf/anisomag`` from a RELION matrix: ``A = M^-1 - I``, flattened row-major.

    Parameters
    ----------
    mag : ndarray, shape (..., 2, 2)
        RELION magnification matrices (``k_ref = M k_obs``), dimensionless.

    Returns
    -------
    ndarray, shape (..., 4)
        ``[A00, A01, A10, A11]``; zeros for ``M = I``.
    """
    m = _as_matrices(mag)
    return (np.linalg.inv(m) - np.eye(2)).reshape(m.shape[:-2] + (4,))


def cryosparc_to_relion(anisomag: np.ndarray) -> np.ndarray:
    """RELION matrix from cryoSPARC ``ctf/anisomag``: ``M = (I + A)^-1``.

    Parameters
    ----------
    anisomag : ndarray, shape (..., 4)
        cryoSPARC's stored matrix, identity subtracted, row-major.

    Returns
    -------
    ndarray, shape (..., 2, 2)
        RELION magnification matrices.
    """
    a = np.asarray(anisomag, float)
    if a.shape[-1:] != (4,):
        raise ValueError(f"expected anisomag of shape (..., 4), got {a.shape}")
    return np.linalg.inv(np.eye(2) + a.reshape(a.shape[:-1] + (2, 2)))


def true_pixel_size(declared_A: float | np.ndarray, mag: np.ndarray) -> float | np.ndarray:
    """True pixel size implied by a magnification matrix: ``declared / sqrt(det M)``.

    Parameters
    ----------
    declared_A : float or ndarray, shape (...)
        Declared pixel size (rlnImagePixelSize) in A.
    mag : ndarray, shape (..., 2, 2)
        RELION magnification matrices.

    Returns
    -------
    float or ndarray, shape (...)
        Pixel size in A for which the isotropic part of ``M`` would be 1 (geometric mean over
        directions for an anisotropic ``M``).
    """
    det = np.linalg.det(_as_matrices(mag))
    if np.any(det <= 0):
        raise ValueError(f"magnification matrix with det <= 0 ({det}) has no pixel size")
    return _scalar(np.asarray(declared_A, float) / np.sqrt(det))


# --------------------------------------------------------------------------- polar form
@dataclass(frozen=True)
class PolarMag:
    """Polar form ``M = R(rotation_deg) Q(angle_deg) diag(major, minor) Q(angle_deg)^T``.

    Fields are floats for a single matrix, arrays of shape (...) for a stack. See the module
    docstring for the geometry.

    Attributes
    ----------
    major_scale, minor_scale : float or ndarray
        Singular values of ``M``, ``major_scale >= minor_scale > 0``: the stretch of the
        observed image along the major axis and along the perpendicular axis.
    angle_deg : float or ndarray
        Direction of the major axis in the observed image, degrees from +x towards +y, in
        (-90, 90]; 0 when the scales are equal (undefined).
    rotation_deg : float or ndarray
        Rotation angle of ``R`` in degrees, (-180, 180]; the observed image is the true one
        rotated by ``-rotation_deg`` before stretching. Zero for a symmetric ``M``.
    """

    major_scale: float | np.ndarray
    minor_scale: float | np.ndarray
    angle_deg: float | np.ndarray
    rotation_deg: float | np.ndarray

    @property
    def overall_scale(self) -> float | np.ndarray:
        """``sqrt(det M) = sqrt(major * minor)``: the isotropic part, ``p_declared / p_true``."""
        return np.sqrt(self.major_scale * self.minor_scale)

    @property
    def pixel_size_change(self) -> float | np.ndarray:
        """``p_declared / p_true - 1 = overall_scale - 1``; true pixel = declared / overall."""
        return self.overall_scale - 1.0

    @property
    def anisotropy(self) -> float | np.ndarray:
        """``major - minor``, the anisotropy RELION's CtfRefine reports."""
        return self.major_scale - self.minor_scale

    @property
    def major_percent(self) -> float | np.ndarray:
        """``100 (major - 1)``."""
        return 100.0 * (self.major_scale - 1.0)

    @property
    def minor_percent(self) -> float | np.ndarray:
        """``100 (minor - 1)``."""
        return 100.0 * (self.minor_scale - 1.0)

    @property
    def anisotropy_percent(self) -> float | np.ndarray:
        """``100 (major - minor)``."""
        return 100.0 * self.anisotropy

    @property
    def pixel_size_change_percent(self) -> float | np.ndarray:
        """``100 (overall_scale - 1)``: positive when the declared pixel size is too large."""
        return 100.0 * self.pixel_size_change

    def as_dict(self) -> dict[str, float | list]:
        """All fields and derived quantities, as JSON-ready floats or nested lists."""
        names = (
            "major_scale",
            "minor_scale",
            "angle_deg",
            "rotation_deg",
            "overall_scale",
            "pixel_size_change",
            "anisotropy",
            "major_percent",
            "minor_percent",
            "anisotropy_percent",
            "pixel_size_change_percent",
        )
        return {n: np.asarray(getattr(self, n), float).tolist() for n in names}


def polar(mag: np.ndarray) -> PolarMag:
    """Polar decomposition ``M = R S`` of RELION magnification matrices.

    Parameters
    ----------
    mag : ndarray, shape (..., 2, 2)
        RELION magnification matrices with ``det M > 0``.

    Returns
    -------
    PolarMag
        Scalars for a (2, 2) input, arrays of shape (...) otherwise.

    Raises
    ------
    ValueError
        If a matrix has ``det M <= 0`` (a mirror, not a magnification).
    """
    m = _as_matrices(mag)
    det = np.linalg.det(m)
    if np.any(det <= 0):
        raise ValueError(f"magnification matrix with det <= 0 ({det}) is a mirror, not a mag")
    u, sig, vt = np.linalg.svd(m)  # m = u diag(sig) vt, sig descending
    r = u @ vt  # det(r) = +1 because det(m) > 0
    major, minor = sig[..., 0], sig[..., 1]
    angle = _wrap_axis(np.rad2deg(np.arctan2(vt[..., 0, 1], vt[..., 0, 0])))
    angle = np.where(major - minor <= ISOTROPIC_RTOL * major, 0.0, angle)
    rotation = np.rad2deg(np.arctan2(r[..., 1, 0], r[..., 0, 0]))
    return PolarMag(_scalar(major), _scalar(minor), _scalar(angle), _scalar(rotation))


def from_polar(
    major: float | np.ndarray,
    minor: float | np.ndarray,
    angle_deg: float | np.ndarray,
    rotation_deg: float | np.ndarray = 0.0,
) -> np.ndarray:
    """RELION matrix from its polar form; exact inverse of :func:`polar`.

    Parameters
    ----------
    major, minor : float or ndarray, shape (...)
        Scales along the axis at ``angle_deg`` and along the perpendicular axis (> 0; if
        ``minor > major`` :func:`polar` returns them swapped with the angle moved by 90 deg).
    angle_deg : float or ndarray, shape (...)
        Direction of the ``major`` axis in the observed image, degrees from +x towards +y.
    rotation_deg : float or ndarray, shape (...)
        Rotation part ``R`` in degrees.

    Returns
    -------
    ndarray, shape (..., 2, 2)
        ``M = R(rotation) Q(angle) diag(major, minor) Q(angle)^T``.
    """
    major, minor, angle_deg, rotation_deg = np.broadcast_arrays(
        *(np.asarray(x, float) for x in (major, minor, angle_deg, rotation_deg))
    )
    q = _rot(angle_deg)
    d = np.zeros(major.shape + (2, 2))
    d[..., 0, 0], d[..., 1, 1] = major, minor
    s = q @ d @ np.swapaxes(q, -1, -2)
    return _rot(rotation_deg) @ s


# --------------------------------------------------------------------------- MotionCor2
def motioncor2_mag(
    mag: np.ndarray, flip_y: bool = False
) -> tuple[float | np.ndarray, float | np.ndarray, float | np.ndarray]:
    """MotionCor2 ``-Mag major minor angle`` that corrects the distortion described by ``M``.

    Parameters
    ----------
    mag : ndarray, shape (..., 2, 2)
        RELION magnification matrices (for cryoSPARC, first :func:`cryosparc_to_relion`).
    flip_y : bool
        Set when ``M`` was estimated on micrographs flipped in Y relative to the movies
        MotionCor2 reads (cryoSPARC Patch Motion output): negates the angle.

    Returns
    -------
    major, minor, angle_deg : float or ndarray, shape (...)
        ``major = 1 / minor_scale >= minor = 1 / major_scale``, and the axis of least
        magnification, degrees from the image x axis in (-90, 90] (0 if isotropic). The
        symmetric stretch ``C = Q(angle) diag(major, minor) Q(angle)^T`` of observed
        coordinates satisfies ``C M^T = R^T``, a pure rotation (see the module docstring).
    """
    p = polar(mag)
    major = 1.0 / np.asarray(p.minor_scale)
    minor = 1.0 / np.asarray(p.major_scale)
    angle = _wrap_axis(np.asarray(p.angle_deg) + 90.0)
    angle = np.where(major - minor <= ISOTROPIC_RTOL * major, 0.0, angle)
    if flip_y:
        angle = _wrap_axis(-angle)
    return _scalar(major), _scalar(minor), _scalar(angle)


def from_motioncor2(
    major: float | np.ndarray,
    minor: float | np.ndarray,
    angle_deg: float | np.ndarray,
    flip_y: bool = False,
) -> np.ndarray:
    """The symmetric RELION matrix whose distortion a MotionCor2 ``-Mag`` triple corrects.

    Inverse of :func:`motioncor2_mag` up to the rotation part of ``M`` (which MotionCor2 does
    not represent): ``M = Q(angle) diag(1/major, 1/minor) Q(angle)^T``.

    Parameters
    ----------
    major, minor, angle_deg : float or ndarray, shape (...)
        MotionCor2 / mag_distortion_estimate scales and major-axis angle (degrees).
    flip_y : bool
        As in :func:`motioncor2_mag`.

    Returns
    -------
    ndarray, shape (..., 2, 2)
    """
    angle = -np.asarray(angle_deg, float) if flip_y else angle_deg
    return from_polar(1.0 / np.asarray(major, float), 1.0 / np.asarray(minor, float), angle)
