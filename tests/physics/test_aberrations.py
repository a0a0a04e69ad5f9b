"""RELION's Zernike aberrations and beam tilt (cryomag.physics.aberrations), pinned to source.

Every convention is checked against a transcription of the RELION 5.0.1 source line it comes
from (/work/relion/src; CONVENTIONS_VERIFIED.md section 9) and by a physical property.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryomag.physics.aberrations import (
    RELION_PI,
    beam_tilt_to_odd,
    chi_even,
    even_index_to_mn,
    even_mn_to_index,
    odd_index_to_mn,
    odd_mn_to_index,
    odd_to_beam_tilt,
    phase_even,
    phase_odd,
    zernike_cart,
    zernike_phase,
)
from cryomag.physics.ctf import ctf_split_frames, ctf_values, electron_wavelength_A
from cryomag.physics.forward import OpticsParams, ParticleGeometry, predict
from cryomag.physics.fourier import rfft_freqs
from cryomag.physics.reference import MapReference

RNG = np.random.default_rng(13)


# ------------------------------------------------------------- RELION transcriptions
def _relion_odd_index(i: int) -> tuple[int, int]:
    """Zernike.cpp:71-79 (oddIndexToMN), C++ integer arithmetic."""
    k = int((math.sqrt(1 + 4 * i) - 1.0) / 2.0)
    i0 = k * k + k
    n = 2 * k + 1
    return 2 * (i - i0) - n, n


def _relion_even_index(i: int) -> tuple[int, int]:
    """Zernike.cpp:57-63 (evenIndexToMN)."""
    k = int(math.sqrt(float(i)))
    return 2 * (i - k * k - k), 2 * k


def _relion_R(m: int, n: int, rho: float) -> float:
    """Zernike.cpp:33-55 with the coefficients of prepCoeffs (105-127)."""
    if (n - m) % 2 == 1:
        return 0.0
    f = math.factorial
    return sum(
        (1 - 2 * (k % 2)) * f(n - k) / (f(k) * f((n + m) // 2 - k) * f((n - m) // 2 - k))
        * rho ** (n - 2 * k)
        for k in range((n - m) // 2 + 1)
    )  # fmt: skip


def _relion_Z_cart(m: int, n: int, x: float, y: float) -> float:
    """Zernike.cpp:9-31 (Z, Z_cart): phi = atan2(y, x), 0 at the origin."""
    rho = math.sqrt(x * x + y * y)
    phi = 0.0 if (x == 0 and y == 0) else math.atan2(y, x)
    if m >= 0:
        return _relion_R(m, n, rho) * math.cos(m * phi)
    return _relion_R(-m, n, rho) * math.sin(-m * phi)


def _relion_insert_tilt(coeffs, tx, ty, cs_mm, lam):
    """tilt_helper.cpp:557-574 (TiltHelper::insertTilt)."""
    c = list(coeffs)
    if len(c) <= 5:
        c += [0.0] * (5 - len(c))
    scale = cs_mm * 20000 * lam * lam * 3.141592654
    z3x, z3y = -scale * tx / 3.0, -scale * ty / 3.0
    c[1] += 2.0 * z3x
    c[0] += 2.0 * z3y
    c[4] += z3x
    c[3] += z3y
    return c


# ---------------------------------------------------------------------------- indices
def test_index_maps_follow_relion():
    """Zernike.cpp:57-79: the maps and their documented first terms; mn -> index inverts."""
    for i in range(60):
        assert odd_index_to_mn(i) == _relion_odd_index(i)
        assert even_index_to_mn(i) == _relion_even_index(i)
        assert odd_mn_to_index(*odd_index_to_mn(i)) == i
        assert even_mn_to_index(*even_index_to_mn(i)) == i
    assert [odd_index_to_mn(i) for i in range(6)] == [(-1, 1), (1, 1), (-3, 3), (-1, 3),
                                                     (1, 3), (3, 3)]  # fmt: skip
    assert [even_index_to_mn(i) for i in range(9)] == [(0, 0), (-2, 2), (0, 2), (2, 2), (-4, 4),
                                                      (-2, 4), (0, 4), (2, 4), (4, 4)]  # fmt: skip
    with pytest.raises(ValueError):
        odd_mn_to_index(0, 2)
    with pytest.raises(ValueError):
        even_mn_to_index(1, 3)


def test_zernike_cart_equals_relion_Z_cart():
    """Zernike.cpp:9-55: Z_cart with the unnormalised radius (1/A), origin included."""
    pts = [(0.0, 0.0), (0.3, 0.0), (0.0, -0.2)]
    pts += [tuple(p) for p in RNG.uniform(-0.7, 0.7, (30, 2))]
    for n in range(0, 9):
        for m in range(-n, n + 1, 2):
            for x, y in pts:
                want = _relion_Z_cart(m, n, x, y)
                assert zernike_cart(m, n, x, y) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_zernike_orthogonality_and_normalisation_on_the_unit_disc():
    """R_n^m(1) = 1 (no normalisation, as RELION's prepCoeffs) and, on the unit disc,
    integral Z_i Z_j dA = eps_m pi / (2 n + 2) delta_ij (eps_0 = 2, else 1)."""
    nr, nphi = 200, 256
    r, wr = np.polynomial.legendre.leggauss(nr)
    r = 0.5 * (r + 1)
    wr = 0.5 * wr
    phi = np.arange(nphi) * 2 * np.pi / nphi
    rr, pp = np.meshgrid(r, phi, indexing="ij")
    x, y = rr * np.cos(pp), rr * np.sin(pp)
    w = (wr * r)[:, None] * (2 * np.pi / nphi)
    terms = [even_index_to_mn(i) for i in range(9)] + [odd_index_to_mn(i) for i in range(12)]
    zs = [zernike_cart(m, n, x, y) for m, n in terms]
    for m, n in terms:
        assert zernike_cart(m, n, 1.0, 0.0) == pytest.approx(1.0 if m >= 0 else 0.0, abs=1e-12)
        if m >= 0:  # R_n^m(1) = 1
            assert _relion_R(m, n, 1.0) == pytest.approx(1.0)
    gram = np.array([[np.sum(w * a * b) for b in zs] for a in zs])
    want = np.diag([(2 if m == 0 else 1) * np.pi / (2 * n + 2) for m, n in terms])
    np.testing.assert_allclose(gram, want, atol=1e-10)


# --------------------------------------------------------------------------- beam tilt
@pytest.mark.parametrize("kv, cs", [(300.0, 2.7), (200.0, 1.4), (300.0, 0.01)])
def test_beam_tilt_is_relions_insert_tilt_and_its_phase(kv, cs):
    """tilt_helper.cpp:557-574: coefficients as RELION's insertTilt (added to existing odd
    terms), and their phase = -2 pi Cs lambda^2 |k|^2 (k . t) (Cs in A, t in rad)."""
    lam = float(electron_wavelength_A(kv))
    tx, ty = 0.5, -0.3
    base = [0.1, -0.2, 3.0, 0.0, 1.0, -2.0, 4.0]
    for odd in ([], [0.0] * 3, base):
        assert beam_tilt_to_odd(tx, ty, cs, lam, odd) == pytest.approx(
            _relion_insert_tilt(odd, tx, ty, cs, lam), rel=1e-15
        )
    c = beam_tilt_to_odd(tx, ty, cs, lam)
    assert len(c) == 5  # insertTilt resizes to 5
    kx, ky = RNG.uniform(-0.5, 0.5, (2, 500))
    t = np.array([tx, ty]) * 1e-3
    want = -2 * np.pi * cs * 1e7 * lam**2 * (kx * kx + ky * ky) * (kx * t[0] + ky * t[1])
    np.testing.assert_allclose(phase_odd(c, kx, ky), want * RELION_PI / np.pi, rtol=1e-12)
    np.testing.assert_allclose(phase_odd(c, kx, ky), want, rtol=1e-9)


def test_extract_tilt_inverts_insert_tilt_and_keeps_the_phase():
    """tilt_helper.cpp:530-555 (extractTilt): exact inverse, phase unchanged for any vector;
    a pure tilt leaves a zero rest."""
    lam = float(electron_wavelength_A(300.0))
    tx, ty, rest = odd_to_beam_tilt(beam_tilt_to_odd(0.7, -0.4, 2.7, lam), 2.7, lam)
    assert (tx, ty) == pytest.approx((0.7, -0.4), rel=1e-12)
    assert np.abs(rest).max() < 1e-12
    odd = list(RNG.normal(0, 5, 10))
    tx, ty, rest = odd_to_beam_tilt(odd, 2.7, lam)
    kx, ky = RNG.uniform(-0.5, 0.5, (2, 200))
    np.testing.assert_allclose(
        phase_odd(beam_tilt_to_odd(tx, ty, 2.7, lam, rest), kx, ky), phase_odd(odd, kx, ky),
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip
    assert rest[3] == rest[4] == 0.0


def test_optics_params_adds_the_tilt_to_the_odd_terms():
    """obs_model.cpp:166-183: rlnOddZernike read, then insertTilt on top of it."""
    lam = float(electron_wavelength_A(300.0))
    o = OpticsParams(1.0, 64, 300.0, 2.7, 0.1, beam_tilt_mrad=(0.5, 0.2),
                     odd_zernike=(0.0, 0.0, 3.0))  # fmt: skip
    assert o.odd_coefficients() == pytest.approx(beam_tilt_to_odd(0.5, 0.2, 2.7, lam, [0, 0, 3]))
    plain = OpticsParams(1.0, 64, 300.0, 2.7, 0.1, odd_zernike=(0.0,), even_zernike=(0.0, 0.0))
    assert plain.odd_coefficients() == () and plain.even_coefficients() == ()
    assert not plain.has_aberrations and o.has_aberrations


# --------------------------------------------------------------------- the CTF's chi
def _relion_ctf(kx, ky, du, dv, ang_deg, kv, cs_mm, q0, phase_deg, gamma_offset):
    """ctf.cpp:211-261 (initialise) and ctf.h:184-216 (getCTF): -sin(gamma),
    gamma = K1 k^T A k + K2 |k|^4 - K5 - K3 + gammaOffset, A = Q^T diag(-DfU, -DfV) Q."""
    lam = float(electron_wavelength_A(kv))
    k1, k2 = np.pi * lam, np.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    k5 = np.deg2rad(phase_deg)
    a = np.deg2rad(ang_deg)
    q = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    adef = q.T @ np.diag([-du, -dv]) @ q
    u2 = kx * kx + ky * ky
    quad = adef[0, 0] * kx * kx + 2 * adef[0, 1] * kx * ky + adef[1, 1] * ky * ky
    gamma = k1 * quad + k2 * u2 * u2 - k5 - k3 + gamma_offset
    return -np.sin(gamma)


def test_even_terms_enter_chi_as_relions_gamma_offset():
    """ctf.h:205 (gammaOffset added to gamma) with obs_model.cpp:1287-1298 (the offset is
    sum c_i Z_even(i)): cryomag's CTF with even terms equals RELION's getCTF."""
    even = (0.3, 0.5, 0.2, -0.4, 80.0, 10.0, 60.0, -20.0, -50.0)
    kx, ky = RNG.uniform(-0.35, 0.35, (2, 400))
    args = (14000.0, 12500.0, 33.0, 300.0, 2.7, 0.1)
    got = ctf_split_frames(kx[None], ky[None], kx[None], ky[None], *args, 20.0,
                           even_zernike=even)[0]  # fmt: skip
    want = _relion_ctf(kx, ky, *args, 20.0, phase_even(even, kx, ky))
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(chi_even(even, kx, ky), -phase_even(even, kx, ky))
    # and without even terms, the plain CTF is RELION's too
    np.testing.assert_allclose(ctf_values(kx, ky, *args, 20.0)[0],
                               _relion_ctf(kx, ky, *args, 20.0, 0.0), atol=1e-12)  # fmt: skip


def test_even_z02_is_a_defocus_change():
    """RELION's even index 2 is Z(0,2) = 2|k|^2 - 1 (its index 4 is Z(-4,4)): a coefficient c
    changes gamma by c (2|k|^2 - 1), i.e. cryomag's chi by -2c|k|^2 + c: the same CTF as a
    defocus change of -2c / (pi lambda) A and a phase shift of +c rad."""
    assert even_index_to_mn(2) == (0, 2) and even_index_to_mn(4) == (-4, 4)
    c = 0.8
    lam = float(electron_wavelength_A(300.0))
    kx, ky = RNG.uniform(-0.4, 0.4, (2, 300))
    even = (0.0, 0.0, c)
    with_even = ctf_split_frames(kx[None], ky[None], kx[None], ky[None], 15000.0, 14000.0, 20.0,
                                 300.0, 2.7, 0.1, 10.0, even_zernike=even)  # fmt: skip
    dz = -2 * c / (np.pi * lam)
    as_defocus = ctf_values(kx, ky, 15000.0 + dz, 14000.0 + dz, 20.0, 300.0, 2.7, 0.1,
                            10.0 + np.rad2deg(c))  # fmt: skip
    np.testing.assert_allclose(with_even, as_defocus, atol=1e-12)
    assert abs(dz) > 20  # a visible change (about -26 A for c = 0.8 rad at 300 kV)


def test_even_derivative_in_ctf_gradient():
    """dCTF/du of ctf_split_frames includes the even terms (central differences)."""
    even = (0.0, 0.5, 0.2, -0.4, 80.0, 10.0, 60.0, -20.0, -50.0)
    kx, ky = RNG.uniform(-0.3, 0.3, (2, 1, 200))
    args = (15000.0, 14000.0, 20.0, 300.0, 2.7, 0.1, 0.0)
    _, g = ctf_split_frames(kx, ky, kx, ky, *args, gradient=True, even_zernike=even)
    h = 1e-6
    for a, (ex, ey) in enumerate(((h, 0), (0, h))):
        num = (
            ctf_split_frames(kx, ky, kx + ex, ky + ey, *args, even_zernike=even)
            - ctf_split_frames(kx, ky, kx - ex, ky - ey, *args, even_zernike=even)
        ) / (2 * h)
        np.testing.assert_allclose(g[..., a], num, atol=1e-5 * np.abs(num).max())


# -------------------------------------------------------------- the forward model
def _small_setup():
    box, apix = 32, 1.5
    rng = np.random.default_rng(5)
    x = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(x, x, x, indexing="ij")
    vol = sum(
        np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2) / 2.4)
        for c in rng.uniform(-7, 7, (20, 3))
    )
    ref = MapReference(vol, apix, eps=1e-10, nthreads=1)
    n = 4
    geom = ParticleGeometry(
        euler_deg=rng.uniform(0, 180, (n, 3)), origin_A=rng.normal(0, 2, (n, 2)),
        mag=np.array([[1.01, 0.003], [-0.002, 0.995]]), defocus_u_A=np.full(n, 12000.0),
        defocus_v_A=np.full(n, 11000.0), defocus_angle_deg=np.full(n, 25.0),
        phase_shift_deg=np.zeros(n), bfactor_A2=np.zeros(n), ctf_scale=np.ones(n),
    )  # fmt: skip
    kx, ky = rfft_freqs(box, apix)
    return ref, geom, box, apix, kx.ravel(), ky.ravel()


def test_odd_aberrations_only_change_the_phase_of_the_prediction():
    """Odd terms multiply the prediction by exp(+i phase_odd(M k)) (obs_model.cpp:327-331):
    |prediction| is unchanged, the phase moves by phase_odd(M k) exactly, and the image stays
    real (phase_odd(-k) = -phase_odd(k))."""
    ref, geom, box, apix, kx, ky = _small_setup()
    plain = OpticsParams(apix, box, 300.0, 2.7, 0.1)
    odd = (0.4, -0.3, 25.0, 3.0, -4.0, -15.0)
    ab = OpticsParams(apix, box, 300.0, 2.7, 0.1, beam_tilt_mrad=(0.6, -0.2), odd_zernike=odd)
    p0 = predict(ref, geom, plain, kx, ky)
    p1 = predict(ref, geom, ab, kx, ky)
    np.testing.assert_allclose(np.abs(p1), np.abs(p0), rtol=1e-10, atol=1e-12)
    u = geom.mag @ np.stack([kx, ky])
    want = p0 * np.exp(1j * phase_odd(ab.odd_coefficients(), u[0], u[1]))
    np.testing.assert_allclose(p1, want, rtol=1e-10, atol=1e-12 * np.abs(p0).max())
    assert np.abs(p1 - p0).max() > 0.1 * np.abs(p0).max()
    np.testing.assert_allclose(phase_odd(odd, -u[0], -u[1]), -phase_odd(odd, u[0], u[1]))


def test_even_terms_in_the_forward_model_at_Mk():
    """ctf_at evaluates the even terms at u = M k (obs_model.cpp:1295, getGammaOffset)."""
    from cryomag.physics.forward import ctf_at

    ref, geom, box, apix, kx, ky = _small_setup()
    even = (0.0, 0.5, 0.0, -0.4, 80.0)
    ab = OpticsParams(apix, box, 300.0, 2.7, 0.1, even_zernike=even)
    u = geom.mag @ np.stack([kx, ky])
    want = _relion_ctf(u[0], u[1], 12000.0, 11000.0, 25.0, 300.0, 2.7, 0.1, 0.0,
                       phase_even(even, u[0], u[1]))  # fmt: skip
    np.testing.assert_allclose(ctf_at(geom, ab, kx, ky)[0], want, atol=1e-12)


def test_zernike_phase_derivatives():
    """zernike_phase's gradient and Hessian against central differences."""
    c = tuple(RNG.normal(0, 5, 12))
    kx, ky = RNG.uniform(-0.4, 0.4, (2, 100))
    for parity in ("odd", "even"):
        ph, g, hs = zernike_phase(c, kx, ky, parity, derivatives=2)
        h = 1e-6
        gx = (zernike_phase(c, kx + h, ky, parity) - zernike_phase(c, kx - h, ky, parity)) / (2 * h)
        gy = (zernike_phase(c, kx, ky + h, parity) - zernike_phase(c, kx, ky - h, parity)) / (2 * h)
        np.testing.assert_allclose(g, [gx, gy], rtol=1e-6, atol=1e-6)
        _, g1 = zernike_phase(c, kx + h, ky, parity, derivatives=1)
        _, g2 = zernike_phase(c, kx - h, ky, parity, derivatives=1)
        np.testing.assert_allclose(hs[:2], (g1 - g2) / (2 * h), rtol=1e-5, atol=1e-4)
