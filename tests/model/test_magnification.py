"""Tests of cryomag.model.magnification: conventions, polar form, MotionCor2 triple."""

from __future__ import annotations

import numpy as np
import pytest

from cryomag.model.magnification import (
    PolarMag,
    cryosparc_to_relion,
    from_motioncor2,
    from_polar,
    motioncor2_mag,
    polar,
    relion_to_cryosparc,
    true_pixel_size,
)
from tests.data_paths import DATA

SIX_GROUPS = DATA / "star" / "relion31.6opticsgroups.star"


def random_mags(n: int, spread: float = 0.03, seed: int = 0) -> np.ndarray:
    """Random near-identity matrices (with rotation parts), shape (n, 2, 2)."""
    rng = np.random.default_rng(seed)
    return np.eye(2) + rng.uniform(-spread, spread, size=(n, 2, 2))


def is_rotation(m: np.ndarray, atol: float = 1e-12) -> bool:
    return np.allclose(m @ np.swapaxes(m, -1, -2), np.eye(2), atol=atol) and np.allclose(
        np.linalg.det(m), 1.0, atol=atol
    )


# ------------------------------------------------------------------ RELION <-> cryoSPARC
def test_identity_is_zero_anisomag():
    np.testing.assert_array_equal(relion_to_cryosparc(np.eye(2)), np.zeros(4))
    np.testing.assert_array_equal(cryosparc_to_relion(np.zeros(4)), np.eye(2))


def test_relion_cryosparc_round_trip_vectorised():
    mags = random_mags(50).reshape(5, 10, 2, 2)
    aniso = relion_to_cryosparc(mags)
    assert aniso.shape == (5, 10, 4)
    np.testing.assert_allclose(cryosparc_to_relion(aniso), mags, atol=1e-14)
    # I + anisomag (row-major) is the inverse of M
    np.testing.assert_allclose(
        (np.eye(2) + aniso.reshape(5, 10, 2, 2)) @ mags,
        np.broadcast_to(np.eye(2), mags.shape),
        atol=1e-14,
    )


def test_cryosparc_isotropic_merge_example():
    """CONVENTIONS_VERIFIED 5.3: data of true 0.88 A relabelled 0.66 A in cryoSPARC."""
    p_true, p_declared = 0.88, 0.66
    anisomag = (p_true / p_declared - 1.0) * np.array([1.0, 0.0, 0.0, 1.0])  # I + A = 0.88/0.66
    m = cryosparc_to_relion(anisomag)
    np.testing.assert_allclose(m, p_declared / p_true * np.eye(2), atol=1e-15)  # = 0.75 I
    assert true_pixel_size(p_declared, m) == pytest.approx(p_true, abs=1e-14)
    p = polar(m)
    assert p.overall_scale == pytest.approx(0.75)
    assert p.pixel_size_change == pytest.approx(-0.25)
    assert p.anisotropy == pytest.approx(0.0, abs=1e-15)
    # MotionCor2 must enlarge the 0.66-A-labelled images by 0.88 / 0.66
    major, minor, angle = motioncor2_mag(m)
    assert major == pytest.approx(p_true / p_declared)
    assert minor == pytest.approx(p_true / p_declared)
    assert angle == 0.0


def test_bad_shapes_and_mirrors_raise():
    with pytest.raises(ValueError, match="shape"):
        relion_to_cryosparc(np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        cryosparc_to_relion(np.zeros(3))
    with pytest.raises(ValueError, match="mirror"):
        polar(np.diag([1.0, -1.0]))
    with pytest.raises(ValueError, match="det"):
        true_pixel_size(1.0, np.diag([1.0, -1.0]))


# ------------------------------------------------------------------ polar form
@pytest.mark.parametrize("m", [0.75, 1.0, 1.013])
def test_isotropic_polar(m):
    p = polar(m * np.eye(2))
    assert isinstance(p, PolarMag)
    assert p.major_scale == pytest.approx(m, abs=1e-15)
    assert p.minor_scale == pytest.approx(m, abs=1e-15)
    assert p.angle_deg == 0.0
    assert p.rotation_deg == pytest.approx(0.0, abs=1e-12)
    assert p.overall_scale == pytest.approx(m)
    assert p.pixel_size_change_percent == pytest.approx(100 * (m - 1))
    assert true_pixel_size(1.0, m * np.eye(2)) == pytest.approx(1.0 / m)


def test_polar_of_random_matrices_reproduces_them():
    mags = random_mags(500, seed=1)
    p = polar(mags)
    assert np.shape(p.major_scale) == (500,)
    assert np.all(p.major_scale >= p.minor_scale)
    assert np.all((p.angle_deg > -90) & (p.angle_deg <= 90))
    back = from_polar(p.major_scale, p.minor_scale, p.angle_deg, p.rotation_deg)
    np.testing.assert_allclose(back, mags, atol=1e-14)
    np.testing.assert_allclose(p.overall_scale, np.sqrt(np.linalg.det(mags)), rtol=1e-14)


def test_from_polar_then_polar_recovers_parameters():
    rng = np.random.default_rng(2)
    n = 300
    minor = rng.uniform(0.95, 1.02, n)
    major = minor + rng.uniform(1e-4, 0.04, n)
    angle = rng.uniform(-89.9, 90.0, n)
    rotation = rng.uniform(-5, 5, n)
    p = polar(from_polar(major, minor, angle, rotation))
    np.testing.assert_allclose(p.major_scale, major, atol=1e-14)
    np.testing.assert_allclose(p.minor_scale, minor, atol=1e-14)
    np.testing.assert_allclose(p.angle_deg, angle, atol=1e-8)
    np.testing.assert_allclose(p.rotation_deg, rotation, atol=1e-10)


def test_polar_geometry_major_axis_is_real_space_stretch():
    """The observed image is stretched most along angle_deg (x_obs = M^T x_true)."""
    m = from_polar(1.04, 0.98, 30.0, rotation_deg=7.0)
    p = polar(m)
    # rotate the true unit vector by R first; the result must map onto the major axis
    r = from_polar(1.0, 1.0, 0.0, p.rotation_deg)
    a = np.deg2rad(p.angle_deg)
    axis = np.array([np.cos(a), np.sin(a)])
    x_true = r @ axis  # the true direction that lands on the major axis
    x_obs = m.T @ x_true
    np.testing.assert_allclose(x_obs, 1.04 * axis, atol=1e-14)
    # no other direction is stretched more
    t = np.deg2rad(np.linspace(0, 180, 721))
    dirs = np.stack([np.cos(t), np.sin(t)])
    assert np.linalg.norm(m.T @ dirs, axis=0).max() <= 1.04 + 1e-12


def test_real_space_relation_from_fourier_definition():
    """Y_obs(k) = Y_true(M k) puts an off-centre blob at M^T c (CONVENTIONS_VERIFIED 1.2)."""
    n, sigma = 128, 3.0
    c = np.array([20.0, -9.0])  # (x, y) in pixels from the box centre
    m = from_polar(1.06, 0.96, 35.0, rotation_deg=4.0)
    k = np.fft.fftfreq(n)
    kx, ky = np.meshgrid(k, k, indexing="xy")  # arrays indexed [row = y, column = x]
    kt_x = m[0, 0] * kx + m[0, 1] * ky
    kt_y = m[1, 0] * kx + m[1, 1] * ky
    # analytic FT of a Gaussian at c (phase origin at the box centre), sampled at M k
    f = np.exp(-2 * np.pi**2 * sigma**2 * (kt_x**2 + kt_y**2)) * np.exp(
        -2j * np.pi * (kt_x * c[0] + kt_y * c[1])
    )
    img = np.fft.fftshift(np.fft.ifft2(f).real)  # centre at pixel n // 2
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    centroid = np.array([(img * xx).sum(), (img * yy).sum()]) / img.sum()
    np.testing.assert_allclose(centroid, m.T @ c, atol=1e-6)


def test_six_optics_group_matrices_polar_exact():
    starfile = pytest.importorskip("starfile")
    if not SIX_GROUPS.exists():
        pytest.skip(f"{SIX_GROUPS} not found")
    optics = starfile.read(SIX_GROUPS)["optics"]
    mats = optics[["rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11"]].to_numpy(float)
    mats = mats.reshape(-1, 2, 2)
    assert len(mats) == 6
    p = polar(mats)
    back = from_polar(p.major_scale, p.minor_scale, p.angle_deg, p.rotation_deg)
    np.testing.assert_allclose(back, mats, atol=1e-12, rtol=0)
    for one, m in zip(p.major_scale, mats, strict=True):
        assert polar(m).major_scale == pytest.approx(one, abs=1e-15)
    # real CtfRefine output: magnification changes of up to about 2 %
    assert np.all(np.abs(p.pixel_size_change) < 0.03)
    assert np.any(np.abs(p.pixel_size_change) > 0.005)


# ------------------------------------------------------------------ MotionCor2
def test_motioncor2_correction_undoes_distortion():
    """C M^T is a pure rotation: the corrected image equals the true one up to psi."""
    mags = random_mags(200, seed=3)
    major, minor, angle = motioncor2_mag(mags)
    assert np.all(major >= minor)
    c = from_polar(major, minor, angle)  # the stretch MotionCor2 applies to x_obs
    corrected = c @ np.swapaxes(mags, -1, -2)
    for one in corrected:
        assert is_rotation(one)


def test_motioncor2_axis_is_lowest_magnification():
    m = from_polar(1.02, 0.99, 25.0)
    major, minor, angle = motioncor2_mag(m)
    assert major == pytest.approx(1 / 0.99)
    assert minor == pytest.approx(1 / 1.02)
    assert angle == pytest.approx(-65.0)
    assert motioncor2_mag(m, flip_y=True)[2] == pytest.approx(65.0)


def test_motioncor2_round_trip():
    rng = np.random.default_rng(4)
    minor = rng.uniform(0.97, 1.03, 100)
    major = minor + rng.uniform(1e-4, 0.03, 100)
    angle = rng.uniform(-89.9, 90.0, 100)
    for flip in (False, True):
        got = motioncor2_mag(from_motioncor2(major, minor, angle, flip_y=flip), flip_y=flip)
        np.testing.assert_allclose(got[0], major, atol=1e-13)
        np.testing.assert_allclose(got[1], minor, atol=1e-13)
        np.testing.assert_allclose(got[2], angle, atol=1e-8)


def test_motioncor2_isotropic():
    assert motioncor2_mag(1.25 * np.eye(2)) == pytest.approx((0.8, 0.8, 0.0))


def test_polar_as_dict_is_json_ready():
    import json

    d = polar(from_polar(1.01, 0.99, 10.0)).as_dict()
    text = json.dumps(d)
    assert "anisotropy_percent" in text
    assert d["anisotropy_percent"] == pytest.approx(2.0)
