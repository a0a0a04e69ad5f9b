"""RELION's contrast transfer function (src/ctf.h, src/ctf.cpp of RELION 5.0.1).

CTF(k) = scale * exp(-B |k|^2 / 4) * [sqrt(1 - Q0^2) sin(chi) + Q0 cos(chi)],
chi(k) = pi lambda k^T Adef k - (pi/2) Cs lambda^3 |k|^4 + phase_shift,
Adef = Q^T diag(DfU, DfV) Q, Q = [[cos a, sin a], [-sin a, cos a]], a = rlnDefocusAngle.
Positive defocus is underfocus; CTF(0) = +Q0 and the CTF is positive at low frequency for
underfocus. The CTF is evaluated at the true (reference-frame) frequency k = M k_obs.
"""

from __future__ import annotations

import numpy as np

from cryomag.physics.aberrations import has_aberration, zernike_phase


def electron_wavelength_A(voltage_kv: float | np.ndarray) -> np.ndarray:
    """Relativistic electron wavelength in A for an acceleration voltage in kV."""
    v = np.asarray(voltage_kv, float) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


def delocalisation_A(defocus_A, wavelength_A: float, cs_mm: float, k: float) -> np.ndarray:
    """How far the CTF moves signal of frequency ``k`` in the image (A).

    The CTF's phase chi(k) = pi lambda dz k^2 - (pi/2) Cs lambda^3 k^4 shifts a wave packet of
    frequency k by |d chi / dk| / (2 pi) = lambda |dz| k + Cs lambda^3 k^3 (at most, the two
    terms taken with the same sign): stationary phase, the distance the signal of a point
    spreads to (Downing & Glaeser 2008).

    Parameters
    ----------
    defocus_A : float or ndarray
        Defocus (A; its magnitude is used).
    wavelength_A : float
        Electron wavelength lambda (A).
    cs_mm : float
        Spherical aberration (mm).
    k : float
        Spatial frequency (1/A).
    """
    lam = float(wavelength_A)
    return lam * np.abs(np.asarray(defocus_A, float)) * k + abs(cs_mm) * 1e7 * lam**3 * k**3


def defocus_matrix(defocus_u_A, defocus_v_A, angle_deg) -> np.ndarray:
    """Astigmatic defocus as a symmetric matrix, Adef = Q^T diag(DfU, DfV) Q, shape (N, 2, 2), A.

    k^T Adef k = defocus(k direction) * |k|^2.
    """
    u = np.atleast_1d(np.asarray(defocus_u_A, float))
    v = np.atleast_1d(np.asarray(defocus_v_A, float))
    a = np.deg2rad(np.atleast_1d(np.asarray(angle_deg, float)))
    c, s = np.cos(a), np.sin(a)
    out = np.empty(np.broadcast(u, v, a).shape + (2, 2))
    out[..., 0, 0] = u * c * c + v * s * s
    out[..., 1, 1] = u * s * s + v * c * c
    out[..., 0, 1] = out[..., 1, 0] = (u - v) * c * s
    return out


def defocus_from_matrix(adef: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`defocus_matrix`: (DfU, DfV, angle_deg) with DfU >= DfV.

    The angle is the direction of DfU, in (-90, 90] degrees.
    """
    m = np.asarray(adef, float)
    sym = 0.5 * (m + np.swapaxes(m, -1, -2))
    w, vecs = np.linalg.eigh(sym)
    du, dv = w[..., 1], w[..., 0]
    ang = np.rad2deg(np.arctan2(vecs[..., 1, 1], vecs[..., 0, 1]))
    ang = np.where(ang <= -90, ang + 180, ang)
    ang = np.where(ang > 90, ang - 180, ang)
    return du, dv, ang


def transform_astigmatism(defocus_u_A, defocus_v_A, angle_deg, mat: np.ndarray):
    """Re-express astigmatism for frequencies transformed by ``mat``: Adef' = mat^T Adef mat.

    With ``mat = M`` this gives the apparent (observed-frame) astigmatism of a particle whose
    true-frame defocus is given, since k_ref^T Adef k_ref = k_obs^T (M^T Adef M) k_obs.
    With ``mat = inc^-1`` it is RELION's adaptation after a magnification update
    (Adef <- inc^-T Adef inc^-1), which keeps the CTF unchanged.

    Parameters
    ----------
    mat : ndarray, shape (2, 2) or (N, 2, 2)

    Returns
    -------
    (DfU, DfV, angle_deg), each shape (N,)
    """
    adef = defocus_matrix(defocus_u_A, defocus_v_A, angle_deg)
    m = np.asarray(mat, float)
    out = np.swapaxes(m, -1, -2) @ adef @ m
    return defocus_from_matrix(out)


def ctf_values(
    kx: np.ndarray,
    ky: np.ndarray,
    defocus_u_A,
    defocus_v_A,
    angle_deg,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    phase_shift_deg=0.0,
    bfactor_A2=0.0,
    scale=1.0,
    even_zernike=(),
) -> np.ndarray:
    """Evaluate RELION's CTF.

    Parameters
    ----------
    kx, ky : ndarray, shape (N, npix) or (npix,)
        Frequencies in 1/A in the frame where the defocus is expressed (the true frame,
        k = M k_obs, for RELION semantics).
    defocus_u_A, defocus_v_A, angle_deg, phase_shift_deg, bfactor_A2, scale : array_like
        Per particle, shape (N,) or scalar.
    voltage_kv, cs_mm, amplitude_contrast : float
        Per optics group.
    even_zernike : sequence of float
        rlnEvenZernike (rad), at ``k`` (see :func:`ctf_split_frames`).

    Returns
    -------
    ndarray, shape (N, npix)
    """
    kx = np.atleast_2d(kx)
    ky = np.atleast_2d(ky)
    return ctf_split_frames(
        kx,
        ky,
        kx,
        ky,
        defocus_u_A,
        defocus_v_A,
        angle_deg,
        voltage_kv,
        cs_mm,
        amplitude_contrast,
        phase_shift_deg,
        bfactor_A2,
        scale,
        even_zernike=even_zernike,
    )


def ctf_split_frames(
    kx: np.ndarray,
    ky: np.ndarray,
    ux: np.ndarray,
    uy: np.ndarray,
    defocus_u_A,
    defocus_v_A,
    angle_deg,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    phase_shift_deg=0.0,
    bfactor_A2=0.0,
    scale=1.0,
    gradient: bool = False,
    even_zernike=(),
):
    """CTF with the defocus term at frequencies ``k`` and the Cs term at ``u``.

    This is the model of a magnification fit that holds the CTF "as measured": the defocus
    and astigmatism were measured on the distorted images, so their term is fixed in the frame
    where they were measured (``k``, e.g. M_in k_obs), while spherical aberration is a property
    of the objective lens and acts on the true frequency ``u = M k_obs`` at the current M.
    With ``u == k`` it equals :func:`ctf_values`.

    Parameters
    ----------
    kx, ky : ndarray, shape (N, npix)
        Frequencies of the defocus term (1/A).
    ux, uy : ndarray, shape (N, npix)
        True frequencies (1/A) of the Cs term.
    gradient : bool or "both"
        Also return dCTF/du (through the Cs term and the even Zernike terms), shape
        (N, npix, 2); with ``"both"`` also the gradient of the defocus term with respect to
        ``k``.
    even_zernike : sequence of float
        RELION's rlnEvenZernike (rad), evaluated at ``u`` (a property of the lens, like Cs):
        chi -= phase_even(u) (:func:`cryomag.physics.aberrations.chi_even`). Empty or all
        zero: not evaluated.

    Returns
    -------
    ctf : ndarray, shape (N, npix)
    dctf_du : ndarray, shape (N, npix, 2), only with ``gradient``
    dctf_dk : ndarray, shape (N, npix, 2), only with ``gradient="both"``
    """

    def col(x):
        return np.asarray(x, float).reshape(-1, 1)

    adef = defocus_matrix(defocus_u_A, defocus_v_A, angle_deg)
    a00, a01, a11 = col(adef[..., 0, 0]), col(adef[..., 0, 1]), col(adef[..., 1, 1])
    lam = float(electron_wavelength_A(voltage_kv))
    cs_A = cs_mm * 1e7
    quad = a00 * kx * kx + 2 * a01 * kx * ky + a11 * ky * ky
    u2 = ux * ux + uy * uy
    chi = (
        np.pi * lam * quad
        - 0.5 * np.pi * cs_A * lam**3 * u2 * u2
        + np.deg2rad(col(phase_shift_deg))
    )
    even = has_aberration(even_zernike)
    if even:
        got = zernike_phase(even_zernike, ux, uy, "even", derivatives=1 if gradient else 0)
        ph_even, g_even = (got, None) if not gradient else got
        chi = chi - ph_even
    q0 = float(amplitude_contrast)
    w = np.sqrt(1 - q0 * q0)
    env = col(scale)
    b = col(bfactor_A2)
    if np.any(b != 0):
        env = env * np.exp(-0.25 * b * (kx * kx + ky * ky))
    ctf = env * (w * np.sin(chi) + q0 * np.cos(chi))
    if not gradient:
        return ctf
    slope = env * (w * np.cos(chi) - q0 * np.sin(chi))  # dCTF / dchi
    dchi = slope * (-2 * np.pi * cs_A * lam**3 * u2)
    grad_cs = np.stack([dchi * ux, dchi * uy], axis=-1)
    if even:
        grad_cs = grad_cs - slope[..., None] * np.moveaxis(g_even, 0, -1)
    if gradient != "both":
        return ctf, grad_cs
    # defocus term: d(pi lambda k^T Adef k)/dk = 2 pi lambda Adef k
    f = slope * 2 * np.pi * lam
    grad_def = np.stack([f * (a00 * kx + a01 * ky), f * (a01 * kx + a11 * ky)], axis=-1)
    return ctf, grad_cs, grad_def
