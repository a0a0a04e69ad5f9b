"""RELION's higher-order aberrations: Zernike terms and beam tilt (RELION 5.0.1 conventions).

RELION describes the aberrations of an optics group by two coefficient vectors,
``rlnOddZernike`` (antisymmetric: beam tilt, coma, trefoil) and ``rlnEvenZernike`` (symmetric:
defocus-like, astigmatism-like, spherical-like, tetrafoil), plus the legacy beam tilt
``rlnBeamTiltX/Y`` (mrad). Every convention below is taken from the RELION 5.0.1 source
(/work/relion/src, files quoted with line numbers; CONVENTIONS_VERIFIED.md section 9) and
pinned by a test in tests/physics/test_aberrations.py.

Zernike polynomials (``src/jaz/math/Zernike.cpp``)
    ``Z_cart(m, n, x, y)`` = R_n^|m|(rho) cos(m phi) for m >= 0 and R_n^|m|(rho) sin(|m| phi)
    for m < 0, rho = sqrt(x^2 + y^2), phi = atan2(y, x) (Zernike.cpp:9-31), with the standard
    radial polynomial R_n^m(rho) = sum_k (-1)^k (n-k)! / (k! ((n+m)/2-k)! ((n-m)/2-k)!)
    rho^(n-2k) (Zernike.cpp:33-55, prepCoeffs 105-127): R_n^m(1) = 1, no normalisation.
    The argument is the frequency in 1/A itself: **the radius is not normalised** to an
    aperture (obs_model.cpp:1246-1251, ``xx0 = x/as`` with ``as`` = pixel size x box).
Index maps (Zernike.cpp:57-79)
    odd ``i -> (m, n)``: k = floor((sqrt(1 + 4 i) - 1) / 2), n = 2k + 1, m = 2 (i - k^2 - k) - n:
    0 (-1,1) [k_y], 1 (1,1) [k_x], 2 (-3,3), 3 (-1,3), 4 (1,3), 5 (3,3), ...
    even ``i -> (m, n)``: k = floor(sqrt(i)), m = 2 (i - k^2 - k), n = 2k:
    0 (0,0), 1 (-2,2), 2 (0,2), 3 (2,2), 4 (-4,4), 5 (-2,4), 6 (0,4), 7 (2,4), 8 (4,4), ...
Where they act (all at the true frequency u = M k_obs, M = rlnMagMat)
    odd: the prediction (reference x CTF) is multiplied by exp(+i phase_odd(u)),
    phase_odd = sum_i c_i Z_i(u) (obs_model.cpp:327-331 ``destination *= corr``,
    getPhaseCorrection 1215-1262: ``xx = M(0,0)*xx0 + M(0,1)*yy0`` at 1248,
    ``img = cos(phase) + i sin(phase)``);
    even: phase_even = sum_i c_i Z_i(u) is added to RELION's gamma (getGammaOffset 1266-1305,
    also at M k; ``gamma = K1 ... + K2 u4 - K5 - K3 + gammaOffset`` in ctf.h:205, CTF = -sin
    gamma at ctf.h:216). cryomag's chi (:mod:`cryomag.physics.ctf`) is chi = -gamma - K3, so
    **an even term enters cryomag's chi with a minus sign**: chi += -phase_even(u)
    (:func:`chi_even`).
Beam tilt (``src/jaz/single_particle/ctf/tilt_helper.cpp``)
    rlnBeamTiltX/Y (mrad) are added to the odd coefficients by ``TiltHelper::insertTilt``
    (tilt_helper.cpp:557-574, called at obs_model.cpp:183 whenever the optics table has the
    tilt columns, on top of rlnOddZernike when both are present): scale = Cs[mm] 20000
    lambda[A]^2 pi, Z3x = -scale t_x / 3, Z3y = -scale t_y / 3, c1 += 2 Z3x, c0 += 2 Z3y,
    c4 += Z3x, c3 += Z3y. The resulting phase is exactly -2 pi Cs lambda^2 |u|^2 (u . t)
    (Cs in A, t in rad). ``TiltHelper::extractTilt`` (tilt_helper.cpp:530-555) is the exact
    inverse that moves c3, c4 into a tilt and leaves c0 -= 2 Z3y, c1 -= 2 Z3x, so that the
    phase is unchanged (:func:`odd_to_beam_tilt`). RELION's pi there is the literal
    3.141592654 (:data:`RELION_PI`), kept for bit-level agreement.

Units: frequencies in 1/A, phases in rad, coefficients in rad (RELION stores them so: the
Zernike argument is in 1/A, hence Z is in (1/A)^n and c_i in rad A^n), tilt in mrad, Cs in mm,
wavelength in A.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = [
    "RELION_PI",
    "beam_tilt_to_odd",
    "chi_even",
    "even_index_to_mn",
    "even_mn_to_index",
    "has_aberration",
    "odd_index_to_mn",
    "odd_mn_to_index",
    "odd_to_beam_tilt",
    "phase_even",
    "phase_odd",
    "zernike_cart",
    "zernike_phase",
    "zernike_poly",
]

#: The value of pi in TiltHelper::insertTilt / extractTilt (tilt_helper.cpp:536, 563).
RELION_PI = 3.141592654


# ----------------------------------------------------------------------------- indices
def odd_index_to_mn(i: int) -> tuple[int, int]:
    """RELION's odd Zernike index -> (m, n) (Zernike::oddIndexToMN, Zernike.cpp:71-79).

    Parameters
    ----------
    i : int
        0-based index into rlnOddZernike.

    Returns
    -------
    (m, n) : tuple of int
        Azimuthal and radial order, n odd.
    """
    k = int((math.sqrt(1 + 4 * i) - 1.0) / 2.0)
    n = 2 * k + 1
    return 2 * (i - (k * k + k)) - n, n


def even_index_to_mn(i: int) -> tuple[int, int]:
    """RELION's even Zernike index -> (m, n) (Zernike::evenIndexToMN, Zernike.cpp:57-63).

    Parameters
    ----------
    i : int
        0-based index into rlnEvenZernike.

    Returns
    -------
    (m, n) : tuple of int
        Azimuthal and radial order, n even.
    """
    k = int(math.sqrt(i))
    return 2 * (i - k * k - k), 2 * k


def odd_mn_to_index(m: int, n: int) -> int:
    """Inverse of :func:`odd_index_to_mn` (n odd, |m| <= n, m odd)."""
    if n % 2 != 1 or abs(m) > n or (m - n) % 2:
        raise ValueError(f"(m, n) = ({m}, {n}) is not an odd Zernike term")
    k = (n - 1) // 2
    return k * k + k + (m + n) // 2


def even_mn_to_index(m: int, n: int) -> int:
    """Inverse of :func:`even_index_to_mn` (n even, |m| <= n, m even)."""
    if n % 2 or abs(m) > n or m % 2:
        raise ValueError(f"(m, n) = ({m}, {n}) is not an even Zernike term")
    k = n // 2
    return k * k + k + m // 2


# ---------------------------------------------------------------------------- polynomials
@lru_cache(maxsize=256)
def zernike_poly(m: int, n: int) -> np.ndarray:
    """Z_cart(m, n, x, y) as a polynomial in x, y: coefficients ``c[a, b]`` of x^a y^b.

    RELION's Z (Zernike.cpp:9-55) is R_n^|m|(rho) cos(m phi) (m >= 0) or R_n^|m|(rho)
    sin(|m| phi) (m < 0); since n - |m| is even, rho^(n-2k) cos(m phi) = (x^2 + y^2)^j
    Re (x + i y)^|m| (j = (n - 2k - |m|) / 2), a polynomial of degree n.

    Returns
    -------
    ndarray, shape (n + 1, n + 1)
        For :func:`numpy.polynomial.polynomial.polyval2d` (read-only, cached).
    """
    am = abs(m)
    if am > n or (n - am) % 2:
        raise ValueError(f"(m, n) = ({m}, {n}) is not a Zernike term")
    # Re / Im of (x + i y)^|m| as 2-D coefficient arrays
    ang = np.zeros((n + 1, n + 1))
    for a in range(am + 1):
        b = am - a  # x^a (i y)^b
        c = math.comb(am, a)
        if m >= 0 and b % 4 in (0, 2):
            ang[a, b] = c * (1 if b % 4 == 0 else -1)
        elif m < 0 and b % 4 in (1, 3):
            ang[a, b] = c * (1 if b % 4 == 1 else -1)
    r2 = np.zeros((3, 3))
    r2[2, 0] = r2[0, 2] = 1.0  # x^2 + y^2
    out = np.zeros((n + 1, n + 1))
    for k in range((n - am) // 2 + 1):
        f = math.factorial
        coef = ((-1) ** k * f(n - k)) / (f(k) * f((n + am) // 2 - k) * f((n - am) // 2 - k))
        term = ang.copy()
        for _ in range((n - 2 * k - am) // 2):
            term = _mul2d(term, r2)
        out += coef * term[: n + 1, : n + 1]
    out.setflags(write=False)
    return out


def _mul2d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Product of two 2-D polynomial coefficient arrays, cut to a's shape."""
    out = np.zeros((a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1))
    for (i, j), v in np.ndenumerate(b):
        if v:
            out[i : i + a.shape[0], j : j + a.shape[1]] += v * a
    return out[: a.shape[0], : a.shape[1]]


def zernike_cart(m: int, n: int, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """RELION's ``Zernike::Z_cart(m, n, x, y)`` (Zernike.cpp:21-31), radius not normalised.

    Parameters
    ----------
    m, n : int
        Azimuthal and radial order.
    kx, ky : ndarray, any (broadcastable) shape
        Frequencies in 1/A.

    Returns
    -------
    ndarray
        Z, in (1/A)^n.
    """
    kx, ky = np.broadcast_arrays(np.asarray(kx, float), np.asarray(ky, float))
    return np.polynomial.polynomial.polyval2d(kx, ky, zernike_poly(m, n))


def _combined_poly(coeffs: Sequence[float], parity: str) -> np.ndarray | None:
    """sum_i c_i Z_i as one coefficient array, or None when every c_i is 0."""
    c = [float(v) for v in coeffs]
    if not any(c):
        return None
    to_mn = odd_index_to_mn if parity == "odd" else even_index_to_mn
    terms = [(ci, *to_mn(i)) for i, ci in enumerate(c) if ci != 0.0]
    deg = max(n for _, _, n in terms)
    out = np.zeros((deg + 1, deg + 1))
    for ci, m, n in terms:
        out[: n + 1, : n + 1] += ci * zernike_poly(m, n)
    return out


def zernike_phase(coeffs: Sequence[float], kx: np.ndarray, ky: np.ndarray, parity: str,
                  derivatives: int = 0):  # fmt: skip
    """sum_i c_i Z_i(k) for RELION's odd or even coefficient vector, and its derivatives.

    Parameters
    ----------
    coeffs : sequence of float
        rlnOddZernike or rlnEvenZernike (rad), RELION order.
    kx, ky : ndarray, same shape S
        Frequencies (1/A) at which the terms are evaluated (RELION: u = M k_obs).
    parity : {"odd", "even"}
    derivatives : int
        0: the phase only; 1: also the gradient; 2: also the Hessian.

    Returns
    -------
    phase : ndarray, shape S (rad)
    grad : ndarray, shape (2,) + S, d phase / d(kx, ky) (rad A); only with derivatives >= 1
    hess : ndarray, shape (3,) + S, (xx, xy, yy) second derivatives (rad A^2); only with 2
    """
    if parity not in ("odd", "even"):
        raise ValueError(f"parity must be 'odd' or 'even', got {parity!r}")
    kx, ky = np.broadcast_arrays(np.asarray(kx, float), np.asarray(ky, float))
    poly = _combined_poly(coeffs, parity)
    P = np.polynomial.polynomial
    if poly is None:
        z = np.zeros(kx.shape)
        out = [z]
        if derivatives >= 1:
            out.append(np.zeros((2,) + kx.shape))
        if derivatives >= 2:
            out.append(np.zeros((3,) + kx.shape))
        return out[0] if derivatives == 0 else tuple(out)
    phase = P.polyval2d(kx, ky, poly)
    if derivatives == 0:
        return phase
    px, py = P.polyder(poly, axis=0), P.polyder(poly, axis=1)
    grad = np.stack([P.polyval2d(kx, ky, px), P.polyval2d(kx, ky, py)])
    if derivatives == 1:
        return phase, grad
    hess = np.stack(
        [
            P.polyval2d(kx, ky, P.polyder(px, axis=0)),
            P.polyval2d(kx, ky, P.polyder(px, axis=1)),
            P.polyval2d(kx, ky, P.polyder(py, axis=1)),
        ]
    )
    return phase, grad, hess


def phase_odd(coeffs: Sequence[float], kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """The odd aberration phase sum_i c_i Z_odd(i)(k) (rad); the prediction is multiplied by
    exp(+i phase) (obs_model.cpp:1240-1257, 327-331). ``kx, ky`` in 1/A (RELION: u = M k)."""
    return zernike_phase(coeffs, kx, ky, "odd")


def phase_even(coeffs: Sequence[float], kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """The even aberration phase sum_i c_i Z_even(i)(k) (rad), RELION's gamma offset
    (obs_model.cpp:1287-1298; added to gamma at ctf.h:205). ``kx, ky`` in 1/A."""
    return zernike_phase(coeffs, kx, ky, "even")


def chi_even(coeffs: Sequence[float], kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """The even terms' contribution to cryomag's chi: -phase_even (rad).

    RELION: CTF = -sin(gamma), gamma = K1 k^T Adef_R k + K2 |k|^4 - K5 - K3 + phase_even
    (ctf.h:205, 216) with Adef_R = -Adef; cryomag: CTF = sin(chi + K3), chi = pi lambda
    k^T Adef k - (pi/2) Cs lambda^3 |k|^4 + phase shift = -gamma - K3 + phase_even. So
    chi = chi_0 - phase_even.
    """
    return -phase_even(coeffs, kx, ky)


def has_aberration(coeffs: Sequence[float] | None) -> bool:
    """True when ``coeffs`` holds a non-zero coefficient."""
    return coeffs is not None and any(float(c) != 0.0 for c in coeffs)


# ------------------------------------------------------------------------------ beam tilt
def _tilt_scale(cs_mm: float, wavelength_A: float) -> float:
    return float(cs_mm) * 20000 * float(wavelength_A) ** 2 * RELION_PI


def beam_tilt_to_odd(tilt_x_mrad: float, tilt_y_mrad: float, cs_mm: float,
                     wavelength_A: float, odd: Sequence[float] = ()) -> list[float]:  # fmt: skip
    """RELION's ``TiltHelper::insertTilt`` (tilt_helper.cpp:557-574): beam tilt -> odd terms.

    scale = Cs[mm] 20000 lambda^2 pi; Z3x = -scale t_x / 3, Z3y = -scale t_y / 3;
    c1 += 2 Z3x, c0 += 2 Z3y, c4 += Z3x, c3 += Z3y. The phase is then
    -2 pi Cs lambda^2 |k|^2 (k . t) (Cs in A, t in rad): c4 Z(1,3) + c1 Z(1,1) = 3 Z3x |k|^2 kx.

    Parameters
    ----------
    tilt_x_mrad, tilt_y_mrad : float
        rlnBeamTiltX, rlnBeamTiltY (mrad).
    cs_mm : float
        rlnSphericalAberration (mm).
    wavelength_A : float
        Electron wavelength (A), :func:`cryomag.physics.ctf.electron_wavelength_A`.
    odd : sequence of float
        rlnOddZernike to add to (RELION adds the tilt to them, obs_model.cpp:166-183).

    Returns
    -------
    list of float
        The odd coefficients, at least 5 long (insertTilt resizes a shorter vector to 5).
    """
    out = [float(c) for c in odd]
    if len(out) <= 5:
        out += [0.0] * (5 - len(out))
    scale = _tilt_scale(cs_mm, wavelength_A)
    z3x = -scale * float(tilt_x_mrad) / 3.0
    z3y = -scale * float(tilt_y_mrad) / 3.0
    out[1] += 2.0 * z3x
    out[0] += 2.0 * z3y
    out[4] += z3x
    out[3] += z3y
    return out


def odd_to_beam_tilt(odd: Sequence[float], cs_mm: float,
                     wavelength_A: float) -> tuple[float, float, list[float]]:  # fmt: skip
    """RELION's ``TiltHelper::extractTilt`` (tilt_helper.cpp:530-555): odd terms -> beam tilt.

    Moves the coma terms c4 (Z(1,3)) and c3 (Z(-1,3)) into a beam tilt, t_x = -3 c4 / scale,
    t_y = -3 c3 / scale, and compensates the linear terms (c1 -= 2 c4, c0 -= 2 c3) so that
    beam_tilt_to_odd(t, rest) gives back ``odd`` and the phase is the same (exact, for any
    vector). The tilt is a *pure* beam tilt (phase -2 pi Cs lambda^2 |k|^2 k . t only) when the
    returned rest is zero; the linear rest c0, c1 is a plain image shift.

    Returns
    -------
    (tilt_x_mrad, tilt_y_mrad, rest) : float, float, list of float
        ``rest`` at least 5 long.
    """
    rest = [float(c) for c in odd]
    if len(rest) <= 5:
        rest += [0.0] * (5 - len(rest))
    scale = _tilt_scale(cs_mm, wavelength_A)
    z3x, z3y = rest[4], rest[3]
    rest[4] = rest[3] = 0.0
    rest[1] -= 2.0 * z3x
    rest[0] -= 2.0 * z3y
    return -3.0 * z3x / scale, -3.0 * z3y / scale, rest
