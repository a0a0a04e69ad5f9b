"""Tests of the ground-truth simulator (phantom, image formation, data set, CLI).

The exactness tests compare rendered images with the forward model of CONVENTIONS_VERIFIED.md
3.4, evaluated independently from the analytic phantom transform:

    Y(k) = s det(M) (a_ref / a_g)^2 CTF(M k) V(A^T (M k, 0)) exp(+2 pi i k . t)   (* W(k))

with W the detector anti-aliasing filter of the simulator.
"""

from __future__ import annotations

import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryomag.physics.ctf import (
    ctf_values,
    defocus_from_matrix,
    defocus_matrix,
    transform_astigmatism,
)
from cryomag.physics.fourier import centered_irfft2, centered_rfft2, rfft_freqs
from cryomag.physics.geometry import euler_to_matrix
from cryomag.simulation.config import ConfigError, OpticsGroupConfig, SimulationConfig
from cryomag.simulation.phantom import Phantom, interpolation_deviation, map_fourier
from cryomag.simulation.simulator import (
    FineGrid,
    MapSource,
    PhantomSource,
    aniso_matrix,
    antialias_filter,
    band_mask,
    coloured_noise,
    draw_parameters,
    load_truth,
    noise_shape,
    render_particles,
    simulate_dataset,
)

EMD_MAP = Path("/work/shared/data/map/emd_6824.mrc")


# ------------------------------------------------------------------ helpers
def _poses(n: int, seed: int = 0, shift_std: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    euler = np.column_stack(
        [
            rng.uniform(-180, 180, n),
            np.degrees(np.arccos(rng.uniform(-1, 1, n))),
            rng.uniform(-180, 180, n),
        ]
    )
    return euler, rng.normal(0, shift_std, (n, 2))


def _model(
    phantom: Phantom,
    a_ref: float,
    box: int,
    a_g: float,
    euler: np.ndarray,
    origin: np.ndarray,
    mags: np.ndarray,
    du: np.ndarray,
    dv: np.ndarray,
    ang: np.ndarray,
    scale: np.ndarray,
    amplitude_contrast: float = 0.1,
    cs_mm: float = 2.7,
    antialias_start: float = 1.0,
) -> np.ndarray:
    """The lead's Fourier model on the rfft grid of ``box``, shape (n, box, box//2+1)."""
    kx, ky = rfft_freqs(box, a_g)
    w = antialias_filter(kx, ky, a_g, antialias_start)
    out = []
    for p in range(len(euler)):
        mk = np.einsum("ij,jyx->iyx", mags[p], np.stack([kx, ky]))
        a = euler_to_matrix(euler[p])
        k3 = mk[0][..., None] * a[0] + mk[1][..., None] * a[1]
        v = phantom.fourier(k3.reshape(-1, 3), a_ref, eps=1e-11).reshape(kx.shape)
        c = ctf_values(
            mk[0].ravel(), mk[1].ravel(), du[p], dv[p], ang[p], 300.0, cs_mm, amplitude_contrast
        )[0].reshape(kx.shape)
        shift = np.exp(2j * np.pi * (kx * origin[p, 0] + ky * origin[p, 1]))
        out.append(scale[p] * np.linalg.det(mags[p]) * (a_ref / a_g) ** 2 * c * v * shift * w)
    return np.array(out)


def _band_errors(img: np.ndarray, model: np.ndarray, a_g: float, kmax: float = 0.9):
    """Relative rms error overall and in 9 shells up to kmax * Nyquist."""
    box = img.shape[-1]
    kx, ky = rfft_freqs(box, a_g)
    k = np.hypot(kx, ky) * 2 * a_g  # units of Nyquist
    spec = centered_rfft2(img)
    edges = np.linspace(0, kmax, 10)
    bands = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (k >= lo) & (k < hi)
        bands.append(np.linalg.norm((spec - model)[:, m]) / np.linalg.norm(model[:, m]))
    m = k < kmax
    overall = np.linalg.norm((spec - model)[:, m]) / np.linalg.norm(model[:, m])
    return overall, np.array(bands)


@pytest.fixture(scope="module")
def small_phantom() -> Phantom:
    return Phantom.default(diameter_A=40.0, n_atoms=240, seed=1)


# ------------------------------------------------------------------ phantom
def test_phantom_default_is_deterministic_and_protein_like():
    p = Phantom.default(seed=0)
    q = Phantom.default(seed=0)
    assert np.array_equal(p.positions_A, q.positions_A)
    assert p.n_atoms == 4000
    from scipy.spatial import cKDTree

    d, _ = cKDTree(p.positions_A).query(p.positions_A, k=2)
    assert d[:, 1].min() >= 1.5 - 1e-9
    span = np.ptp(p.positions_A, axis=0)
    assert 80 < span.max() < 125
    assert not np.allclose(span, span[0], rtol=0.05)  # not spherical
    assert 19.9 < p.b_factors_A2.min() and p.b_factors_A2.max() < 40.1
    assert len(np.unique(p.weights)) >= 3
    assert np.allclose(p.positions_A.mean(axis=0), 0, atol=1e-9)
    assert p.radius_A() < 128 * 1.3 / 2  # fits a 128 box at 1.3 A


def test_phantom_fourier_direct_and_nufft_agree():
    p = Phantom.default(diameter_A=50, n_atoms=400, seed=4)
    k = np.random.default_rng(0).normal(size=(6000, 3)) * 0.15  # 2.4e6 pairs: finufft
    v_nufft = p.fourier(k, 1.2)
    ph = np.exp(-2j * np.pi * k @ p.positions_A.T)
    env = np.exp(-2 * np.pi**2 * np.sum(k * k, 1)[:, None] * p.sigma_A[None] ** 2)
    v_direct = (ph * env) @ p.weights / 1.2**3
    assert np.linalg.norm(v_nufft - v_direct) / np.linalg.norm(v_direct) < 1e-9


def test_phantom_fourier_gradient_matches_finite_difference():
    p = Phantom.default(diameter_A=40, n_atoms=200, seed=2)
    k = np.random.default_rng(1).normal(size=(30, 3)) * 0.1
    g = p.fourier_gradient(k, 1.0)
    h = 1e-6
    for d in range(3):
        e = np.zeros(3)
        e[d] = h
        num = (p.fourier(k + e, 1.0) - p.fourier(k - e, 1.0)) / (2 * h)
        assert np.abs(num - g[:, d]).max() < 1e-6 * np.abs(g).max()


def test_rasterize_dft_matches_analytic_fourier_on_the_grid():
    p = Phantom.default(diameter_A=60, n_atoms=800, seed=3)
    box, a = 48, 1.8
    vol = p.rasterize(box, a)
    assert vol.dtype == np.float32 and vol.shape == (box,) * 3
    dft = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol.astype(float))))
    m = (np.arange(box) - box // 2) / (box * a)
    idx = np.arange(1, box)  # leave out the unpaired Nyquist planes (index 0 = -N/2)
    iz, iy, ix = np.meshgrid(idx, idx, idx, indexing="ij")
    k = np.stack([m[ix], m[iy], m[iz]], -1).reshape(-1, 3)
    v = p.fourier(k, a)
    got = dft[iz, iy, ix].reshape(-1)
    assert np.linalg.norm(got - v) / np.linalg.norm(v) < 1e-6
    # the map is the density itself (per A^3): its voxel sum times a^3 is the total weight
    assert math.isclose(float(vol.astype(float).sum()) * a**3, p.weights.sum(), rel_tol=1e-5)


def test_map_interpolation_deviation_is_reported():
    """V_map off the grid vs analytic V, per shell (printed; run pytest -s to see it)."""
    p = Phantom.default(diameter_A=60, n_atoms=800, seed=3)
    c, dev = interpolation_deviation(p, 48, 1.8, n_shells=5, n_per_shell=400)
    print("\nmap trig-interpolation vs analytic V (box 48, 1.8 A, 60 A phantom):")
    for kc, d in zip(c, dev, strict=True):
        print(f"  |k| = {kc:.2f} Nyquist: relative rms deviation {d:.2e}")
    assert dev[0] < 1e-3 and dev.max() < 0.05
    assert dev[-1] > dev[0]  # worst near Nyquist


def test_write_map_header(tmp_path):
    p = Phantom.default(diameter_A=40, n_atoms=200, seed=0)
    vol = p.write_map(tmp_path / "ref.mrc", 32, 2.0)
    with mrcfile.open(tmp_path / "ref.mrc") as m:
        assert m.data.shape == (32, 32, 32)
        assert np.allclose(m.voxel_size.tolist(), 2.0)
        assert tuple(m.header.origin.tolist()) == (0.0, 0.0, 0.0)
        assert np.array_equal(m.data, vol)


def test_rasterize_refuses_too_small_box():
    with pytest.raises(ValueError, match="does not fit"):
        Phantom.default(diameter_A=60, n_atoms=400).rasterize(16, 1.0)


# ------------------------------------------------------------------ exactness
def test_render_is_exact_on_a_periodic_grid(small_phantom):
    """M = I, CTF = 1, fine grid = the box itself: the pipeline reproduces the model to 1e-8.

    This pins the normalisation (a_ref/a_g)^2, the rotation and the origin sign exactly.
    """
    box, a_g, a_ref = 64, 2.0, 1.7
    euler, origin = _poses(4)
    eye = np.tile(np.eye(2), (4, 1, 1))
    z = np.zeros(4)
    ones = np.ones(4)
    # CTF = 1 through ctf_values: Q0 = 1, defocus 0, Cs 0
    assert np.allclose(ctf_values(np.r_[0.1, 0.2], np.r_[0.0, 0.1], 0, 0, 0, 300, 0.0, 1.0), 1)
    img = render_particles(
        PhantomSource(small_phantom, a_ref),
        box,
        a_g,
        euler,
        origin,
        z,
        z,
        z,
        mag=eye,
        amplitude_contrast=1.0,
        cs_mm=0.0,
        eps=1e-12,
        antialias_start=1.0,
        grid=FineGrid(box * a_g, box + 2),
    )
    model = _model(small_phantom, a_ref, box, a_g, euler, origin, eye, z, z, z, ones, 1.0, 0.0)
    overall, bands = _band_errors(img, model, a_g)
    assert overall < 1e-8, bands


def test_render_matches_model_identity_no_ctf(small_phantom):
    """The brief's test 1: M = I, CTF off, box 64, 1e-4 rms over |k| < 0.9 Nyquist.

    The fine grid is the automatic one (no periodicity with the box). The remaining error is
    the image content that lies outside the 64 px window (ringing of the band limit); the
    anti-aliasing roll-off from 0.6 Nyquist keeps it below 1e-4 (the model includes W).
    """
    box, a_g, a_ref = 64, 2.0, 1.8
    n = 4
    euler, origin = _poses(n, seed=5)
    eye = np.tile(np.eye(2), (n, 1, 1))
    z, ones = np.zeros(n), np.ones(n)
    img = render_particles(
        small_phantom,
        box,
        a_g,
        euler,
        origin,
        z,
        z,
        z,
        mag=eye,
        amplitude_contrast=1.0,
        cs_mm=0.0,
        ref_pixel_size_A=a_ref,
        eps=1e-10,
        antialias_start=0.6,
    )
    model = _model(small_phantom, a_ref, box, a_g, euler, origin, eye, z, z, z, ones, 1.0, 0.0, 0.6)
    overall, bands = _band_errors(img, model, a_g)
    print(f"\nM = I, no CTF: overall {overall:.2e}; bands " + " ".join(f"{b:.1e}" for b in bands))
    assert overall < 1e-4


def test_render_matches_model_anisotropic_ctf(small_phantom):
    """The brief's test 2 (the proof of exactness): anisotropic M (2 %, 30 deg) times an
    isotropic part, CTF at 0.3 um with astigmatism, contrast scales; 1e-3 in every band."""
    box, a_g, a_ref = 64, 2.0, 1.8
    n = 4
    euler, origin = _poses(n, seed=6)
    mags = np.array([aniso_matrix(1.02, 0.98, 30.0) * (1 + 0.005 * i) for i in range(n)])
    du = np.array([3000.0, 3200.0, 2900.0, 3100.0])
    dv = du - 250
    ang = np.array([20.0, -40.0, 75.0, 0.0])
    s = np.array([0.6, 1.0, 1.4, 0.9])
    img = render_particles(
        small_phantom,
        box,
        a_g,
        euler,
        origin,
        du,
        dv,
        ang,
        mag=mags,
        scale=s,
        ref_pixel_size_A=a_ref,
        eps=1e-10,
        antialias_start=0.6,
    )
    model = _model(
        small_phantom, a_ref, box, a_g, euler, origin, mags, du, dv, ang, s, 0.1, 2.7, 0.6
    )
    overall, bands = _band_errors(img, model, a_g)
    print(f"\naniso + CTF: overall {overall:.2e}; bands " + " ".join(f"{b:.1e}" for b in bands))
    assert np.all(bands < 1e-3), bands


def test_render_defaults_match_windowed_model_in_real_space():
    """Production settings (anti-aliasing from 0.9 Nyquist, eps 1e-7), defocus up to 1.5 um,
    anisotropic + isotropic M, scales: the box-64 image equals, pixel by pixel, the model
    image built from the Fourier formula on a 4x larger box and cropped (so both see the
    same window). Signal delocalised out of the box is then accounted for on both sides."""
    box, a_g, a_ref, big = 64, 1.6, 1.5, 256
    n = 3
    ph = Phantom.default(diameter_A=50, n_atoms=400, seed=2)
    euler, origin = _poses(n, seed=7)
    mags = np.array([aniso_matrix(1.02, 0.98, 30) * (1 + 0.01 * i) for i in range(n)])
    du = np.array([10000.0, 15000.0, 5000.0])
    dv = du - 300
    ang = np.array([10.0, 50.0, -30.0])
    s = np.array([0.7, 1.0, 1.3])
    sim = render_particles(
        ph, box, a_g, euler, origin, du, dv, ang, mag=mags, scale=s, ref_pixel_size_A=a_ref
    )
    spec = _model(ph, a_ref, big, a_g, euler, origin, mags, du, dv, ang, s, antialias_start=0.9)
    o = (big - box) // 2
    model = np.array([centered_irfft2(y, big)[o : o + box, o : o + box] for y in spec])
    err = np.abs(sim - model).max() / np.abs(model).max()
    print(f"\nwindowed model vs image (defaults): max relative error {err:.1e}")
    assert err < 1e-4


def test_map_source_matches_phantom_source(small_phantom):
    """Rendering from the rasterised map agrees with the analytic phantom up to the map's
    trigonometric interpolation error, and is exact against V_map on a periodic grid."""
    box, a_g = 48, 2.0
    a_ref = 2.0
    vol = small_phantom.rasterize(40, a_ref)
    src = MapSource(vol, a_ref)
    euler, origin = _poses(2, seed=8)
    eye = np.tile(np.eye(2), (2, 1, 1))
    z = np.zeros(2)
    kw = dict(
        mag=eye,
        amplitude_contrast=1.0,
        cs_mm=0.0,
        eps=1e-10,
        antialias_start=1.0,
        grid=FineGrid(box * a_g, box + 2),
    )
    img_map = render_particles(src, box, a_g, euler, origin, z, z, z, **kw)
    kx, ky = rfft_freqs(box, a_g)
    for p in range(2):
        a = euler_to_matrix(euler[p])
        k3 = (kx[..., None] * a[0] + ky[..., None] * a[1]).reshape(-1, 3)
        v = map_fourier(vol, a_ref, k3).reshape(kx.shape)
        v[np.any(np.abs(k3) >= 0.5 / a_ref, axis=1).reshape(kx.shape)] = 0
        model = v * np.exp(2j * np.pi * (kx * origin[p, 0] + ky * origin[p, 1]))
        k = np.hypot(kx, ky) * 2 * a_g
        m = (k < 0.9) & (np.abs(kx) < 0.5 / a_g) & (np.abs(ky) < 0.5 / a_g)
        got = centered_rfft2(img_map[p])
        assert np.linalg.norm((got - model)[m]) / np.linalg.norm(model[m]) < 1e-8
    img_ph = render_particles(
        small_phantom, box, a_g, euler, origin, z, z, z, ref_pixel_size_A=a_ref, **kw
    )
    k = np.hypot(kx, ky) * 2 * a_g
    m = k < 0.9
    d = centered_rfft2(img_map) - centered_rfft2(img_ph)
    rel = np.linalg.norm(d[:, m]) / np.linalg.norm(centered_rfft2(img_ph)[:, m])
    print(f"\nmap path vs analytic phantom (|k| < 0.9 Nyquist): {rel:.1e}")
    assert rel < 0.02


# ------------------------------------------------------------------ noise
def test_coloured_noise_has_the_stated_spectrum():
    box, a = 64, 1.5
    rng = np.random.default_rng(0)
    noise = coloured_noise(rng, 400, box, a, 2.0, 1.5, 40.0)
    power = np.mean(np.abs(centered_rfft2(noise)) ** 2, axis=0)
    expected = box**2 * 4.0 * noise_shape(box, a, 1.5, 40.0)
    band = band_mask(box, a, 20.0)
    assert abs(power[band].mean() / expected[band].mean() - 1) < 0.02
    low = power[0, 1:3].mean() / expected[0, 1:3].mean()
    assert abs(low - 1) < 0.2


# ------------------------------------------------------------------ configuration
def test_config_toml_round_trip(tmp_path):
    cfg = SimulationConfig(seed=3, n_particles=77)
    cfg.optics_groups = [
        OpticsGroupConfig(name="a", pixel_size_A=1.1, aniso=None),
        OpticsGroupConfig(name="b", pixel_size_A=1.3, true_pixel_size_A=1.31, box=96),
    ]
    cfg.noise.snr = math.inf
    cfg.magnification.kappa_pct_per_um = 0.5
    text = cfg.to_toml(tmp_path / "sim.toml")
    assert "kappa_pct_per_um = 0.5" in text
    back = SimulationConfig.from_toml(tmp_path / "sim.toml")
    assert back == cfg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("seed = 'x'", "seed"),
        ("[[optics_groups]]\nbox = 63", "optics_groups[0].box"),
        ("[defocus]\nmin_um = 3.0\nmax_um = 1.0", "defocus.min_um"),
        ("[noise]\nsnrr = 1.0", "noise.snrr"),
        ("[[optics_groups]]\naniso = [1.0, 0.9]", "optics_groups[0].aniso"),
        ("[output]\nhalf_sets = 'odd'", "output.half_sets"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        SimulationConfig.from_toml(f)
    assert key in str(info.value)
    assert str(f) in str(info.value)


# ------------------------------------------------------------------ effects (parameters only)
def test_effects_have_the_requested_statistics():
    cfg = SimulationConfig(seed=11, n_particles=20000)
    g = cfg.optics_groups[0]
    g.particles_per_micrograph = 100
    g.true_pixel_size_A = 1.3 / 1.02
    cfg.magnification.kappa_pct_per_um = 0.5
    cfg.magnification.dz_ref_um = 1.5
    cfg.magnification.mic_iso_std_pct = 0.4
    cfg.magnification.mic_aniso_std_pct = 0.3
    cfg.magnification.particle_iso_std_pct = 0.2
    cfg.magnification.particle_aniso_std_pct = 0.1
    cfg.scale.ice_mfp_A = 1000.0
    cfg.output.half_sets = "random"
    t = draw_parameters(cfg)
    P, MIC = t["particles"], t["micrographs"]
    n = len(P["scale"])
    assert n == 20000 and len(MIC["name"]) == 200
    # group matrix: pixel-size ratio times the anisotropic part
    mg = aniso_matrix(1.01, 0.99, 30.0) * 1.02
    assert np.allclose(P["M_group"], mg)
    # composition M = m_def M_mic M_part M_group
    comp = P["m_def"][:, None, None] * P["M_mic"] @ P["M_part"] @ P["M_group"]
    assert np.allclose(P["M"], comp)
    # defocus-dependent magnification: kappa in 1/A
    assert math.isclose(t["kappa_per_A"], 0.5e-6)
    assert np.allclose(P["m_def"], 1 + 0.5e-6 * (P["defocus_mean_true_A"] - 15000.0))
    # scatter statistics (iso std, aniso std) per micrograph and per particle
    mm = MIC["M_mic"]
    assert abs(np.std((mm[:, 0, 0] + mm[:, 1, 1]) / 2 - 1) / 0.004 - 1) < 0.2
    assert abs(np.std(mm[:, 0, 1]) / 0.003 - 1) < 0.2
    mp = P["M_part"]
    assert abs(np.std((mp[:, 0, 0] + mp[:, 1, 1]) / 2 - 1) / 0.002 - 1) < 0.05
    assert abs(np.std(mp[:, 0, 1]) / 0.001 - 1) < 0.05
    assert np.allclose(mp[:, 0, 1], mp[:, 1, 0])
    # defocus: micrograph mean uniform in the range; particle spread 200 A; astigmatism
    assert 8000 <= MIC["defocus_A"].min() and MIC["defocus_A"].max() <= 25000
    resid = P["defocus_mean_true_A"] - MIC["defocus_A"][P["micrograph"]]
    assert abs(np.std(resid) / 200 - 1) < 0.05
    assert np.allclose(
        P["defocus_u_true_A"] - P["defocus_v_true_A"], MIC["astig_A"][P["micrograph"]]
    )
    assert abs(MIC["astig_A"].mean() / 300 - 1) < 0.15
    # contrast scale: mean 1, ~30 % spread, falls with ice thickness
    s = P["scale"]
    assert math.isclose(s.mean(), 1.0, rel_tol=1e-12)
    assert 0.25 < np.std(np.log(s)) < 0.35
    slope = np.polyfit(P["ice_thickness_A"], np.log(s), 1)[0]
    assert abs(slope * 1000 + 1) < 0.15
    # poses uniform on SO(3): mean rotation matrix ~ 0; shifts
    rots = euler_to_matrix(P["euler_deg"])
    assert np.abs(rots.mean(axis=0)).max() < 0.03
    assert abs(np.std(P["origin_A"]) / 3.0 - 1) < 0.05
    assert np.abs(P["origin_A"]).max() <= 10.0
    assert set(np.unique(P["half_set"])) == {1, 2}
    assert abs(np.mean(P["half_set"] == 1) - 0.5) < 0.02
    # centre in the true frame: x_obs = M^T x_true = -t
    assert np.allclose(np.einsum("nji,nj->ni", P["M"], P["centre_true_A"]), -P["origin_A"])


def test_written_defocus_is_the_apparent_one():
    cfg = SimulationConfig(seed=2, n_particles=300)
    cfg.magnification.mic_aniso_std_pct = 0.5
    t = draw_parameters(cfg)
    P, MIC = t["particles"], t["micrographs"]
    mbar = MIC["M_mean"][P["micrograph"]]
    du, dv, ang = transform_astigmatism(
        P["defocus_u_true_A"], P["defocus_v_true_A"], P["defocus_angle_true_deg"], mbar
    )
    # each particle keeps its own transformed mean defocus ...
    assert np.allclose((P["defocus_u_written_A"] + P["defocus_v_written_A"]) / 2, (du + dv) / 2)
    # ... and the astigmatism of the micrograph mean of the transformed matrices
    adef = defocus_matrix(P["defocus_u_true_A"], P["defocus_v_true_A"], P["defocus_angle_true_deg"])
    obs = np.swapaxes(mbar, 1, 2) @ adef @ mbar
    for mic in range(len(MIC["name"])):
        sel = P["micrograph"] == mic
        mu, mv, ma = defocus_from_matrix(obs[sel].mean(axis=0))
        assert np.allclose(P["defocus_u_written_A"][sel] - P["defocus_v_written_A"][sel], mu - mv)
        assert np.allclose(P["defocus_angle_written_deg"][sel], ma)
    # which differs from each particle's own apparent astigmatism only by dz spread x aniso
    assert np.abs((P["defocus_u_written_A"] - P["defocus_v_written_A"]) - (du - dv)).max() < 60
    d_ang = (P["defocus_angle_written_deg"] - ang + 90) % 180 - 90
    assert np.abs(d_ang).max() < 5.0
    cfg.output.true_defocus = True
    t2 = draw_parameters(cfg)
    assert np.array_equal(t2["particles"]["defocus_u_written_A"], P["defocus_u_true_A"])


def test_effect_streams_are_independent():
    """Switching one effect on leaves every other random draw unchanged."""
    a = draw_parameters(SimulationConfig(seed=5, n_particles=100))
    cfg = SimulationConfig(seed=5, n_particles=100)
    cfg.magnification.particle_iso_std_pct = 1.0
    b = draw_parameters(cfg)
    for key in ("euler_deg", "origin_A", "defocus_u_true_A", "scale", "M_mic"):
        assert np.array_equal(a["particles"][key], b["particles"][key])
    assert not np.array_equal(a["particles"]["M"], b["particles"]["M"])


# ------------------------------------------------------------------ data set
def _small_config(seed: int = 0) -> SimulationConfig:
    cfg = SimulationConfig(seed=seed, n_particles=24)
    g = cfg.optics_groups[0]
    g.box, g.pixel_size_A, g.particles_per_micrograph = 64, 2.5, 10
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 80.0, 1200
    cfg.noise.snr, cfg.noise.n_pilot = 0.5, 6
    cfg.render.n_workers = 1
    return cfg


def test_simulate_dataset_writes_a_readable_data_set(tmp_path):
    from cryomag.io import read_star
    from cryomag.io.mrc import ImageSource

    cfg = _small_config()
    cfg.output.write_cs = True
    ps, truth = simulate_dataset(cfg, tmp_path / "sim", progress=False)
    out = tmp_path / "sim"
    for name in (
        "particles.star",
        "particles.cs",
        "ref.mrc",
        "truth.npz",
        "truth.json",
        "simulation.toml",
    ):
        assert (out / name).is_file(), name
    back = read_star(out / "particles.star")
    assert len(back) == 24
    for col in (
        "rlnImageName",
        "rlnMicrographName",
        "rlnOpticsGroup",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnPhaseShift",
        "rlnCtfBfactor",
        "rlnCtfScalefactor",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnRandomSubset",
        "rlnCoordinateX",
        "rlnCoordinateY",
    ):
        assert col in back.particles.columns, col
    assert np.allclose(back.mag_matrices(), np.eye(2))
    assert np.allclose(back.column("rlnDefocusU"), truth["particles"]["defocus_u_written_A"])
    assert np.allclose(back.euler_deg(), truth["particles"]["euler_deg"], atol=1e-5)
    imgs = ImageSource(back).read(np.arange(24))
    assert imgs.shape == (24, 64, 64) and np.all(np.isfinite(imgs))
    with mrcfile.open(out / "ref.mrc") as m:
        assert m.data.shape == (64, 64, 64)
        assert np.isclose(m.voxel_size.x, 2.5)
    t = load_truth(out)
    assert t["groups"][0]["noise_sigma_white"] > 0
    assert np.allclose(t["particles"]["M"], truth["particles"]["M"])
    assert len(t["micrographs"]["name"]) == 3
    ratio = np.mean(t["particles"]["signal_power_band"]) / t["groups"][0]["noise_power_band"]
    assert 0.2 < ratio < 1.2  # the configured SNR 0.5, up to pose and scale variation


def test_two_optics_groups(tmp_path):
    from cryomag.io import read_star

    cfg = _small_config(seed=6)
    cfg.n_particles = 12
    cfg.noise.snr = math.inf
    cfg.optics_groups.append(
        OpticsGroupConfig(
            name="g2", pixel_size_A=3.0, true_pixel_size_A=3.06, box=56, aniso=[1.01, 0.99, -20]
        )
    )
    cfg.output.write_true_group_mag = True
    ps, truth = simulate_dataset(cfg, tmp_path / "g", progress=False)
    back = read_star(tmp_path / "g" / "particles.star")
    assert list(back.optics["rlnImageSize"]) == [64, 56]
    assert np.allclose(back.optics["rlnImagePixelSize"], [2.5, 3.0])
    mats = back.mag_matrices()
    assert np.allclose(mats[0], aniso_matrix(1.01, 0.99, 30.0))  # the default group
    assert np.allclose(mats[1], aniso_matrix(1.01, 0.99, -20) * 3.0 / 3.06)
    assert np.bincount(back.particles["rlnOpticsGroup"].to_numpy(int)).tolist() == [0, 6, 6]
    with mrcfile.open(tmp_path / "g" / truth["micrographs"]["stack"][-1]) as m:
        assert m.data.shape[1:] == (56, 56)


def _assert_same_stack(a: Path, b: Path) -> None:
    """Bitwise-identical image data (the MRC header label carries a time stamp)."""
    with mrcfile.open(a) as ma, mrcfile.open(b) as mb:
        assert ma.data.tobytes() == mb.data.tobytes()


def test_simulate_dataset_is_reproducible(tmp_path):
    cfg = _small_config(seed=4)
    cfg.n_particles = 8
    simulate_dataset(cfg, tmp_path / "a", progress=False)
    simulate_dataset(cfg, tmp_path / "b", progress=False)
    for f in sorted((tmp_path / "a" / "Particles").iterdir()):
        _assert_same_stack(f, tmp_path / "b" / "Particles" / f.name)
    assert (tmp_path / "a" / "particles.star").read_text() == (
        tmp_path / "b" / "particles.star"
    ).read_text()


def test_noise_free_images_have_the_truth_scale(tmp_path):
    """snr = inf: the written image is the noise-free render with the truth parameters."""
    cfg = _small_config(seed=9)
    cfg.n_particles = 4
    cfg.noise.snr = math.inf
    ps, truth = simulate_dataset(cfg, tmp_path / "s", progress=False)
    P = truth["particles"]
    src = PhantomSource(Phantom.default(diameter_A=80.0, n_atoms=1200, seed=0), 2.5)
    ref = render_particles(
        src,
        64,
        2.5,
        P["euler_deg"],
        P["origin_A"],
        P["defocus_u_true_A"],
        P["defocus_v_true_A"],
        P["defocus_angle_true_deg"],
        mag=P["M"],
        scale=P["scale"],
        eps=cfg.render.eps,
    )
    with mrcfile.open(tmp_path / "s" / truth["micrographs"]["stack"][0]) as m:
        assert np.allclose(m.data, ref.astype(np.float32))


# ------------------------------------------------------------------ CLI
def test_cli_simulate(tmp_path):
    from typer.testing import CliRunner

    from cryomag.cli.main import app

    runner = CliRunner()
    out = tmp_path / "cli"
    cfg = _small_config()
    cfg.to_toml(tmp_path / "sim.toml")
    args = [
        "simulate",
        "--out",
        str(out),
        "--config",
        str(tmp_path / "sim.toml"),
        "--n-particles",
        "6",
        "--snr",
        "inf",
        "--aniso",
        "1.02,0.98,45",
        "--kappa",
        "1.0",
        "--seed",
        "3",
        "--true-defocus",
        "--quiet",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    t = load_truth(out)
    assert t["n_particles"] == 6 and t["seed"] == 3
    assert np.allclose(t["M_group"][0], aniso_matrix(1.02, 0.98, 45))
    assert math.isclose(t["kappa_pct_per_um"], 1.0)
    assert t["written_defocus"].startswith("true")
    res = runner.invoke(app, args)  # non-empty folder
    assert res.exit_code != 0 and "not empty" in res.output
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "x"), "--aniso", "1,2"])
    assert res.exit_code != 0


@pytest.mark.skipif(not EMD_MAP.is_file(), reason="EMD-6824 map not available")
def test_real_map_as_specimen(tmp_path):
    from typer.testing import CliRunner

    from cryomag.cli.main import app

    out = tmp_path / "map"
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            "--out",
            str(out),
            "--map",
            str(EMD_MAP),
            "--n-particles",
            "4",
            "--box",
            "64",
            "--apix",
            "2.64",
            "--snr",
            "inf",
            "--workers",
            "1",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    t = load_truth(out)
    assert t["reference"]["kind"] == "map"
    with mrcfile.open(out / "ref.mrc") as m, mrcfile.open(EMD_MAP) as orig:
        assert np.array_equal(m.data, orig.data)
    with mrcfile.open(out / t["micrographs"]["stack"][0]) as m:
        assert np.all(np.isfinite(m.data)) and np.abs(m.data).max() > 0


@pytest.mark.skipif(not EMD_MAP.is_file(), reason="EMD-6824 map not available")
def test_real_map_path_is_never_overwritten(tmp_path):
    import shutil

    src = tmp_path / "ref.mrc"
    shutil.copy(EMD_MAP, src)
    cfg = _small_config()
    cfg.n_particles = 2
    cfg.phantom.map_path = str(src)
    before = src.read_bytes()
    with pytest.raises(Exception, match="overwrite"):
        simulate_dataset(cfg, tmp_path, progress=False)
    assert src.read_bytes() == before


# ------------------------------------------------------------------ slow
@pytest.mark.slow
def test_parallel_workers_give_identical_stacks(tmp_path):
    cfg = _small_config(seed=1)
    cfg.n_particles = 220
    simulate_dataset(cfg, tmp_path / "one", progress=False)
    cfg.render.n_workers = 2
    simulate_dataset(cfg, tmp_path / "two", progress=False)
    for f in sorted((tmp_path / "one" / "Particles").iterdir()):
        _assert_same_stack(f, tmp_path / "two" / "Particles" / f.name)


@pytest.mark.slow
def test_default_phantom_interpolation_deviation_table():
    p = Phantom.default()
    c, dev = interpolation_deviation(p, 128, 1.3, n_shells=10, n_per_shell=1000)
    print("\nmap trig-interpolation vs analytic V (default phantom, box 128, 1.3 A):")
    for kc, d in zip(c, dev, strict=True):
        print(f"  |k| = {kc:.2f} Nyquist: relative rms deviation {d:.2e}")
    assert dev[:9].max() < 5e-3


def test_render_applies_the_aberrations_as_relion(small_phantom):
    """Beam tilt, odd and even Zernike terms (issue 13): the rendered images equal RELION's
    model Y = s det(M) (a_ref/a_g)^2 CTF_even(M k) exp(+i phase_odd(M k)) V(M k) exp(2 pi i
    k.t) W(k), the odd terms with the tilt inserted by insertTilt, 1e-3 in every band."""
    from cryomag.physics.aberrations import beam_tilt_to_odd, phase_odd
    from cryomag.physics.ctf import electron_wavelength_A

    box, a_g, a_ref = 64, 2.0, 1.8
    n = 3
    euler, origin = _poses(n, seed=8)
    mags = np.array([aniso_matrix(1.02, 0.99, 25.0) * (1 + 0.004 * i) for i in range(n)])
    du = np.array([3000.0, 3300.0, 2800.0])
    dv = du - 200
    ang = np.array([10.0, -30.0, 60.0])
    s = np.ones(n)
    tilt, odd, even = (1.5, -1.0), [0.0, 0.0, 8.0, 0.0, 0.0, -5.0], [0.0, 0.4, 0.0, -0.3, 6.0]
    img = render_particles(
        small_phantom, box, a_g, euler, origin, du, dv, ang, mag=mags, scale=s,
        ref_pixel_size_A=a_ref, eps=1e-10, antialias_start=0.6, beam_tilt_mrad=tilt,
        odd_zernike=odd, even_zernike=even,
    )  # fmt: skip
    total = beam_tilt_to_odd(*tilt, 2.7, float(electron_wavelength_A(300.0)), odd)
    kx, ky = rfft_freqs(box, a_g)
    w = antialias_filter(kx, ky, a_g, 0.6)
    model = []
    for p in range(n):
        mk = np.einsum("ij,jyx->iyx", mags[p], np.stack([kx, ky]))
        a = euler_to_matrix(euler[p])
        k3 = mk[0][..., None] * a[0] + mk[1][..., None] * a[1]
        v = small_phantom.fourier(k3.reshape(-1, 3), a_ref, eps=1e-11).reshape(kx.shape)
        c = ctf_values(mk[0].ravel(), mk[1].ravel(), du[p], dv[p], ang[p], 300.0, 2.7, 0.1,
                       even_zernike=even)[0].reshape(kx.shape)  # fmt: skip
        o = np.exp(1j * phase_odd(total, mk[0], mk[1]))
        shift = np.exp(2j * np.pi * (kx * origin[p, 0] + ky * origin[p, 1]))
        model.append(np.linalg.det(mags[p]) * (a_ref / a_g) ** 2 * c * o * v * shift * w)
    model = np.array(model)
    overall, bands = _band_errors(img, model, a_g)
    assert np.all(bands < 1e-3), bands
    # and the aberrations matter at this level: without them the model is far off
    plain = render_particles(
        small_phantom, box, a_g, euler, origin, du, dv, ang, mag=mags, scale=s,
        ref_pixel_size_A=a_ref, eps=1e-10, antialias_start=0.6,
    )  # fmt: skip
    assert _band_errors(plain, model, a_g)[0] > 0.05


def test_simulated_star_carries_the_aberrations(tmp_path):
    """Per-group aberrations go to RELION's optics columns and into the truth (issue 13)."""
    from cryomag.io import read_star

    cfg = _small_config()
    g = cfg.optics_groups[0]
    g.beam_tilt_mrad = [0.5, -0.25]
    g.odd_zernike = [0.0, 0.0, 20.0, 0.0, 0.0, -10.0]
    g.even_zernike = [0.0, 0.3, 0.0, -0.2, 40.0]
    ps, truth = simulate_dataset(cfg, tmp_path / "sim", progress=False)
    back = read_star(tmp_path / "sim" / "particles.star")
    o = back.optics_params(1)
    assert o.beam_tilt_mrad == (0.5, -0.25)
    assert o.odd_zernike == tuple(g.odd_zernike) and o.even_zernike == tuple(g.even_zernike)
    t = load_truth(tmp_path / "sim")
    assert t["groups"][0]["beam_tilt_mrad"] == [0.5, -0.25]
    assert t["groups"][0]["odd_zernike"] == g.odd_zernike
    assert t["groups"][0]["even_zernike"] == g.even_zernike
