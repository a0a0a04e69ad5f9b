"""Physical-property tests of the forward model: conventions pinned against RELION's formulas.

Each test names the fact of ../shared/CONVENTIONS_VERIFIED.md it pins.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryomag.physics.ctf import (
    ctf_values,
    defocus_from_matrix,
    defocus_matrix,
    delocalisation_A,
    electron_wavelength_A,
    transform_astigmatism,
)
from cryomag.physics.forward import OpticsParams, ParticleGeometry, predict
from cryomag.physics.fourier import centered_irfft2, centered_rfft2, rfft_freqs
from cryomag.physics.geometry import (
    euler_to_matrix,
    euler_to_rotvec,
    matrix_to_euler,
    rotvec_to_euler,
)
from cryomag.physics.reference import MapReference, direct_fourier, slice_values


def blob_map(n: int, centres_px, sigma_px: float = 1.2) -> np.ndarray:
    """Gaussian blobs at voxel offsets from the centre voxel n // 2, [z, y, x]."""
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    vol = np.zeros((n, n, n))
    for cx, cy, cz in centres_px:
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_px**2))
    return vol


def relion_euler_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix (src/euler.cpp), written out."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


def unit_ctf_geometry(n, euler, origin, mag):
    """Geometry whose CTF is exactly 1 (Q0 = 1, no defocus, Cs = 0)."""
    z = np.zeros(n)
    geom = ParticleGeometry(
        np.atleast_2d(euler), np.atleast_2d(origin), mag, z, z, z, z, z, np.ones(n)
    )
    return geom


def projection_image(ref, euler, origin=(0.0, 0.0), mag=None, box=64, apix=1.0):
    mag = np.eye(2) if mag is None else mag
    kx, ky = rfft_freqs(box, apix)
    geom = unit_ctf_geometry(1, euler, origin, mag)
    optics = OpticsParams(apix, box, 300.0, 0.0, 1.0)
    spec = predict(ref, geom, optics, kx.ravel(), ky.ravel()).reshape(1, box, box // 2 + 1)
    return centered_irfft2(spec, box)[0]


def peak_position(img):
    """Sub-pixel peak (x = column, y = row) by a parabola through the log of 3 samples.

    Exact for a well-sampled Gaussian blob, whose logarithm is quadratic.
    """
    iy, ix = np.unravel_index(np.argmax(img), img.shape)

    def offset(a, b, c):
        la, lb, lc = np.log([a, b, c])
        return 0.5 * (la - lc) / (la - 2 * lb + lc)

    dx = offset(img[iy, ix - 1], img[iy, ix], img[iy, ix + 1])
    dy = offset(img[iy - 1, ix], img[iy, ix], img[iy + 1, ix])
    return ix + dx, iy + dy


# --------------------------------------------------------------------- geometry (2.1, 6.3)
def test_euler_matrix_matches_relion_formula():
    rng = np.random.default_rng(0)
    for rot, tilt, psi in rng.uniform(-180, 180, (20, 3)):
        np.testing.assert_allclose(
            euler_to_matrix([rot, tilt, psi]), relion_euler_matrix(rot, tilt, psi), atol=1e-12
        )


def test_euler_round_trip_and_rotvec_round_trip():
    rng = np.random.default_rng(1)
    e = Rotation.random(50, random_state=2).as_euler("ZYZ", degrees=True)
    np.testing.assert_allclose(
        euler_to_matrix(matrix_to_euler(euler_to_matrix(e))), euler_to_matrix(e), atol=1e-10
    )
    rv = rng.normal(size=(50, 3))
    # CONVENTIONS_VERIFIED 6.1-6.3: RELION A = from_rotvec(pose).as_matrix().T
    np.testing.assert_allclose(
        euler_to_matrix(rotvec_to_euler(rv)),
        np.swapaxes(Rotation.from_rotvec(rv).as_matrix(), 1, 2),
        atol=1e-10,
    )
    np.testing.assert_allclose(
        Rotation.from_rotvec(euler_to_rotvec(rotvec_to_euler(rv))).as_matrix(),
        Rotation.from_rotvec(rv).as_matrix(),
        atol=1e-10,
    )


# ------------------------------------------------------------ exact slice (issue 2, part 2)
@pytest.fixture(scope="module")
def blob_reference():
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 5, (60, 3))
    vol = blob_map(48, centres, sigma_px=0.9)
    return vol, MapReference(vol, 1.2, eps=1e-8)


def test_slice_matches_direct_evaluation_per_shell(blob_reference):
    """Relative rms error per resolution shell < 1e-3 up to 0.9 Nyquist (issue 2 target)."""
    vol, ref = blob_reference
    rng = np.random.default_rng(4)
    nyq = ref.nyquist
    for lo, hi in [(0.05, 0.3), (0.3, 0.6), (0.6, 0.8), (0.8, 0.9)]:
        d = rng.normal(size=(40, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        k = d * rng.uniform(lo * nyq, hi * nyq, (40, 1))
        exact = direct_fourier(vol, ref.pixel_size_A, k)
        got = ref.evaluate(k)
        err = np.sqrt(np.mean(np.abs(got - exact) ** 2) / np.mean(np.abs(exact) ** 2))
        assert err < 1e-3, (lo, hi, err)


@pytest.mark.parametrize("values_by", ["ducc0", "finufft"])
@pytest.mark.parametrize("eps", [1e-3, 1e-6, 1e-10])
def test_kept_upsampled_grid_evaluates_as_finufft_does(eps, values_by, monkeypatch):
    """The map's kept upsampled grids (interpolation only per call: ducc0's incremental type
    2 for the values where ducc0 has it, else finufft's spreadinterponly; finufft's for the
    gradient) against finufft's plain type 2 (its own grid every call): errors against the
    direct sum within 1.1x of finufft's and below 3 eps, values and gradients, in single
    (eps >= 1e-5) and double precision and at both of finufft's upsampling factors (1.25; 2
    for eps < 1e-9)."""
    import cryomag.physics.reference as reference

    if values_by == "ducc0" and reference._ducc_u2nu is None:
        pytest.skip("ducc0 without incremental_u2nu")
    if values_by == "finufft":
        monkeypatch.setattr(reference, "_ducc_u2nu", None)
    rng = np.random.default_rng(8)
    vol = rng.normal(size=(24, 24, 24))
    k3 = rng.uniform(-0.5 / 1.3, 0.5 / 1.3, (300, 3))
    kept = MapReference(vol, 1.3, eps=eps, nthreads=1)
    plain = MapReference(vol, 1.3, eps=eps, nthreads=1, cache_fine_grid=False)
    exact = direct_fourier(vol, 1.3, k3)
    inside = np.linalg.norm(k3, axis=1) <= kept.nyquist
    norm = np.linalg.norm(exact[inside])
    err_kept, err_plain = (
        np.linalg.norm((r.evaluate(k3) - exact)[inside]) / norm for r in (kept, plain)
    )
    print(values_by, "relative error kept grid", err_kept, "finufft", err_plain)
    assert err_kept <= 1.1 * err_plain + 1e-13
    assert err_kept < 3 * eps
    if values_by == "ducc0" and eps >= 1e-6:
        assert kept._ducc[1] is not None and False not in kept._fine
    else:  # ducc0 has no kernel for eps / 2 = 5e-11 within its upsampling 1.5: finufft's
        assert (kept._ducc is None or kept._ducc[1] is None) and kept._fine[False] is not None
    assert plain._fine == {} and plain._ducc is None
    (_, g_kept), (_, g_plain) = (r.evaluate(k3, gradient=True) for r in (kept, plain))
    np.testing.assert_allclose(g_kept, g_plain, atol=20 * eps * np.abs(g_plain).max())
    assert kept._fine[True] is not None


def test_planes_by_ducc0_and_by_finufft_agree(blob_reference):
    """evaluate_planes' two layouts of the points (one (n, 3) array for ducc0, three arrays
    for finufft) give the same slices, and the values beside the gradient agree with the
    values alone."""
    import cryomag.physics.reference as reference

    vol, _ = blob_reference
    rot = Rotation.random(7, random_state=2).as_matrix()
    kx, ky = rfft_freqs(48, 1.2)
    kx, ky = kx.ravel(), ky.ravel()
    by_ducc = MapReference(vol, 1.2, eps=1e-6, nthreads=1)
    by_finufft = MapReference(vol, 1.2, eps=1e-6, nthreads=1, cache_fine_grid=False)
    v1 = by_ducc.evaluate_planes(rot, kx, ky)
    v2 = by_finufft.evaluate_planes(rot, kx, ky)
    v3, _ = by_ducc.evaluate_planes(rot, kx, ky, gradient=True)
    scale = np.abs(v2).max()
    np.testing.assert_allclose(v1, v2, atol=1e-5 * scale)
    np.testing.assert_allclose(v3, v2, atol=1e-5 * scale)
    if reference._ducc_u2nu is not None:
        assert by_ducc._ducc[1] is not None


def test_gradient_matches_finite_differences(blob_reference):
    vol, ref = blob_reference
    rng = np.random.default_rng(5)
    k = rng.uniform(-0.2, 0.2, (10, 3))
    _, g = ref.evaluate(k, gradient=True)
    h = 1e-5
    for a in range(3):
        e = np.zeros(3)
        e[a] = h
        fd = (direct_fourier(vol, 1.2, k + e) - direct_fourier(vol, 1.2, k - e)) / (2 * h)
        np.testing.assert_allclose(g[:, a], fd, rtol=1e-4, atol=1e-6 * np.abs(fd).max())


def test_slice_gradient_in_plane_matches_finite_differences(blob_reference):
    _, ref = blob_reference
    euler = np.array([[30.0, 60.0, -20.0]])
    kx = np.array([0.05, -0.11, 0.2])
    ky = np.array([0.13, 0.02, -0.07])
    _, gu = slice_values(ref, euler, np.eye(2), kx, ky, gradient=True)
    h = 1e-6
    for a in range(2):
        m_p = np.eye(2)
        m_m = np.eye(2)
        # shifting u = M k by h along axis a at each point: use M = I + h e_a k^T / |k|^2
        vp = np.array(
            [
                slice_values(
                    ref,
                    euler,
                    np.eye(2),
                    kx[i : i + 1] + h * (a == 0),
                    ky[i : i + 1] + h * (a == 1),
                )[0, 0]
                for i in range(3)
            ]
        )
        vm = np.array(
            [
                slice_values(
                    ref,
                    euler,
                    np.eye(2),
                    kx[i : i + 1] - h * (a == 0),
                    ky[i : i + 1] - h * (a == 1),
                )[0, 0]
                for i in range(3)
            ]
        )
        del m_p, m_m
        np.testing.assert_allclose(gu[0, :, a], (vp - vm) / (2 * h), rtol=1e-4)


# ------------------------------------------- projection geometry, shifts, M (2.2, 3.1, 1.2)
@pytest.fixture(scope="module")
def offcentre_reference():
    # one bright blob off-centre, a weak one at the centre (breaks no symmetry needed)
    vol = blob_map(64, [(8, -5, 3)], sigma_px=1.5)
    return MapReference(vol, 1.0, eps=1e-7)


def test_offcentre_blob_projects_to_A_r(offcentre_reference):
    """CONVENTIONS_VERIFIED 2.2: a map point r projects to (A r)_xy."""
    r = np.array([8.0, -5.0, 3.0])
    for euler in ([0, 0, 0], [40, 70, -30], [-120, 130, 75]):
        img = projection_image(offcentre_reference, np.array(euler, float))
        expect = (euler_to_matrix(np.array(euler, float)) @ r)[:2] + 32
        np.testing.assert_allclose(peak_position(img), expect, atol=0.05)


def test_origin_moves_particle_centre_to_minus_origin(offcentre_reference):
    """CONVENTIONS_VERIFIED 3.1: the particle centre sits at box/2 - origin/apix."""
    base = peak_position(projection_image(offcentre_reference, np.zeros(3)))
    origin = np.array([4.0, -6.5])
    moved = peak_position(projection_image(offcentre_reference, np.zeros(3), origin=origin))
    np.testing.assert_allclose(np.subtract(moved, base), -origin, atol=0.05)


def test_isotropic_M_above_one_makes_particle_look_larger():
    """CONVENTIONS_VERIFIED 1.1-1.2: x_obs = M^T x_true; M > 1 looks larger."""
    vol = blob_map(64, [(10, 0, 0), (-10, 0, 0)], sigma_px=1.5)
    ref = MapReference(vol, 1.0, eps=1e-7)
    m = 1.05
    img = projection_image(ref, np.zeros(3), mag=m * np.eye(2))
    left = peak_position(np.where(np.arange(64)[None, :] < 32, img, 0))
    right = peak_position(np.where(np.arange(64)[None, :] >= 32, img, 0))
    assert right[0] - left[0] == pytest.approx(20 * m, abs=0.05)


def test_anisotropic_M_maps_features_by_M_transpose():
    vol = blob_map(64, [(9, 4, 0)], sigma_px=1.5)
    ref = MapReference(vol, 1.0, eps=1e-7)
    mag = np.array([[1.04, 0.02], [-0.01, 0.97]])
    img = projection_image(ref, np.zeros(3), mag=mag)
    expect = mag.T @ np.array([9.0, 4.0]) + 32
    np.testing.assert_allclose(peak_position(img), expect, atol=0.05)


def test_centered_fft_round_trip():
    rng = np.random.default_rng(6)
    img = rng.normal(size=(3, 32, 32))
    np.testing.assert_allclose(centered_irfft2(centered_rfft2(img), 32), img, atol=1e-12)


# --------------------------------------------------------------------------- CTF (4.1-4.3)
def relion_ctf(kx, ky, du, dv, ang_deg, kv, cs_mm, q0, phase_deg=0.0):
    """RELION's getCTF written as in ctf.cpp/ctf.h: -sin(gamma_R)."""
    lam = 12.2643247 / np.sqrt(kv * 1e3 * (1 + 0.978466e-6 * kv * 1e3))
    k1 = np.pi * lam
    k2 = np.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = np.arctan(q0 / np.sqrt(1 - q0 * q0))
    k5 = np.deg2rad(phase_deg)
    a = np.deg2rad(ang_deg)
    q = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    adef = q.T @ np.diag([-du, -dv]) @ q
    quad = adef[0, 0] * kx * kx + 2 * adef[0, 1] * kx * ky + adef[1, 1] * ky * ky
    u2 = kx * kx + ky * ky
    gamma = k1 * quad + k2 * u2 * u2 - k5 - k3
    return -np.sin(gamma)


def test_ctf_matches_relion_formula():
    rng = np.random.default_rng(7)
    kx = rng.uniform(-0.4, 0.4, 500)
    ky = rng.uniform(-0.4, 0.4, 500)
    for du, dv, ang, ps in [(15000, 14000, 30, 0), (8000, 9000, -70, 0), (5000, 5000, 0, 90)]:
        mine = ctf_values(kx, ky, du, dv, ang, 300, 2.7, 0.1, ps)[0]
        np.testing.assert_allclose(
            mine, relion_ctf(kx, ky, du, dv, ang, 300, 2.7, 0.1, ps), atol=1e-10
        )


def test_ctf_physical_properties():
    q0 = 0.07
    assert ctf_values(np.zeros(1), np.zeros(1), 10000, 10000, 0, 300, 2.7, q0)[
        0, 0
    ] == pytest.approx(q0)
    # underfocus: positive at low frequency
    assert ctf_values(np.array([0.01]), np.zeros(1), 10000, 10000, 0, 300, 2.7, q0)[0, 0] > 0
    # first zero where chi + atan(q0/sqrt(1-q0^2)) = pi (Cs = 0)
    lam = float(electron_wavelength_A(300))
    k3 = np.arctan(q0 / np.sqrt(1 - q0**2))
    k0 = np.sqrt((np.pi - k3) / (np.pi * lam * 10000))
    val = ctf_values(np.array([k0]), np.zeros(1), 10000, 10000, 0, 300, 0.0, q0)[0, 0]
    assert abs(val) < 1e-9
    assert lam == pytest.approx(0.019687, abs=1e-6)  # 300 kV


def test_ctf_delocalises_a_point_by_the_phase_slope():
    """A point's image through the CTF, band-limited to a thin ring at k0: its signal sits on
    a ring of radius |d chi / dk| / (2 pi) = lambda dz k0 - Cs lambda^3 k0^3 (stationary
    phase), which :func:`delocalisation_A` bounds (it adds the two terms)."""
    n, apix, dz, cs, k0 = 512, 1.0, 15000.0, 2.7, 0.25
    kx, ky = rfft_freqs(n, apix)
    ring = np.exp(-0.5 * ((np.hypot(kx, ky) - k0) / 0.008) ** 2)
    ctf = ctf_values(kx.ravel(), ky.ravel(), dz, dz, 0.0, 300.0, cs, 0.0)[0].reshape(kx.shape)
    img = np.fft.fftshift(np.fft.irfft2(ctf * ring, s=(n, n)))
    x = np.arange(n) - n // 2
    r = np.hypot(x[:, None], x[None, :]) * apix
    profile = np.bincount(np.rint(r).astype(int).ravel(), (img**2).ravel())
    profile /= np.bincount(np.rint(r).astype(int).ravel())
    lam = float(electron_wavelength_A(300.0))
    slope = lam * dz * k0 - cs * 1e7 * lam**3 * k0**3
    energy = profile * np.arange(len(profile))  # per unit radius
    sel = slice(20, 200)  # beyond the in-focus remainder at the centre
    mean_r = np.sum(energy[sel] * np.arange(len(profile))[sel]) / energy[sel].sum()
    assert abs(mean_r - slope) <= 1.5, (mean_r, slope)
    bound = float(delocalisation_A(dz, lam, cs, k0))
    assert slope <= bound == pytest.approx(lam * dz * k0 + cs * 1e7 * lam**3 * k0**3)
    # the energy beyond the bound (plus the ring's own width, 1 / (2 pi 0.008) = 20 A) is
    # negligible
    assert energy[int(bound + 3 * 20) :].sum() < 1e-3 * energy.sum()


def test_defocus_angle_direction():
    """CONVENTIONS_VERIFIED 4.3: DfU applies along (cos a, sin a)."""
    a = np.deg2rad(25.0)
    m = defocus_matrix(12000, 9000, 25.0)[0]
    d = np.array([np.cos(a), np.sin(a)])
    assert d @ m @ d == pytest.approx(12000)
    e = np.array([-np.sin(a), np.cos(a)])
    assert e @ m @ e == pytest.approx(9000)
    du, dv, ang = defocus_from_matrix(m)
    assert (du, dv, ang) == pytest.approx((12000, 9000, 25.0))


def test_astigmatism_transform_keeps_ctf():
    """CONVENTIONS_VERIFIED 4.4/1.6: CTF(M k; Adef) == CTF(k; M^T Adef M)."""
    rng = np.random.default_rng(8)
    mag = np.array([[1.03, 0.01], [0.015, 0.98]])
    kx = rng.uniform(-0.3, 0.3, 200)
    ky = rng.uniform(-0.3, 0.3, 200)
    u = mag[0, 0] * kx + mag[0, 1] * ky
    v = mag[1, 0] * kx + mag[1, 1] * ky
    true = ctf_values(u, v, 14000, 12500, 40, 300, 0.0, 0.1)
    au, av, aa = transform_astigmatism(14000, 12500, 40, mag)
    apparent = ctf_values(kx, ky, au, av, aa, 300, 0.0, 0.1)
    np.testing.assert_allclose(apparent, true, atol=1e-10)
    # and back with the inverse
    bu, bv, ba = transform_astigmatism(au, av, aa, np.linalg.inv(mag))
    assert (bu[0], bv[0], ba[0]) == pytest.approx((14000, 12500, 40))


def test_origin_shift_is_not_distorted_by_M(offcentre_reference):
    """CONVENTIONS_VERIFIED 1.5/3.4: the shift phase uses k_obs, so with M != I the particle
    still moves by exactly -origin (observed A), not by -M^T origin."""
    mag = np.array([[1.04, 0.02], [-0.01, 0.97]])
    base = peak_position(projection_image(offcentre_reference, np.zeros(3), mag=mag))
    origin = np.array([5.0, -3.5])
    moved = peak_position(
        projection_image(offcentre_reference, np.zeros(3), origin=origin, mag=mag)
    )
    np.testing.assert_allclose(np.subtract(moved, base), -origin, atol=0.05)
