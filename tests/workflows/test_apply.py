"""Applying corrections (issue 4): resampled stacks re-estimate to M = I; RELION optics-group
split keeps every particle and CTF; per-particle anisomag in .cs; exact resampling."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import cryomag
from cryomag.cli.main import app
from cryomag.io import read_star
from cryomag.io.cryosparc import load_cs_array
from cryomag.physics.ctf import ctf_values
from cryomag.physics.forward import OpticsParams, ParticleGeometry, predict
from cryomag.physics.fourier import centered_irfft2, rfft_freqs
from cryomag.physics.reference import MapReference
from cryomag.physics.resample import resample_images
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset


def _blob_reference():
    n = 48
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    rng = np.random.default_rng(0)
    vol = np.zeros((n, n, n))
    for c in rng.normal(0, 5, (40, 3)):
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 3.0)
    return MapReference(vol, 1.0, eps=1e-9)


def _images(ref, mag, box=48, apix=1.0):
    kx, ky = rfft_freqs(box, apix)
    z = np.zeros(2)
    geom = ParticleGeometry(
        np.array([[10.0, 50, 20], [70, 100, -40]]), np.zeros((2, 2)), mag, z, z, z, z, z, np.ones(2)
    )
    spec = predict(ref, geom, OpticsParams(apix, box, 300, 0, 1.0), kx.ravel(), ky.ravel())
    return centered_irfft2(spec.reshape(2, box, box // 2 + 1), box), geom


def test_resampling_undoes_magnification_exactly():
    """A distorted projection resampled with its M equals the undistorted one, away from the
    box edge (the Fourier model's det(M) factor is exactly the real-space contrast kept)."""
    ref = _blob_reference()
    mag = np.array([[1.03, 0.01], [-0.005, 0.98]])
    distorted, _ = _images(ref, mag)
    plain, _ = _images(ref, np.eye(2))
    fixed = resample_images(distorted, mag, 1.0)
    c = slice(8, 40)
    err = np.abs(fixed[:, c, c] - plain[:, c, c]).max() / np.abs(plain).max()
    assert err < 1e-4


def test_resampling_identity_and_pixel_size_change():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(1, 32, 32))
    same = resample_images(img, np.eye(2), 1.0)
    np.testing.assert_allclose(same, img, atol=1e-6)
    # isotropic M = p_decl / p_true with output at the true pixel size: a plain relabel
    ref = _blob_reference()
    distorted, _ = _images(ref, 1.02 * np.eye(2))
    out = resample_images(distorted, 1.02 * np.eye(2), 1.0, pixel_size_out_A=1.0 / 1.02)
    np.testing.assert_allclose(out, distorted, atol=2e-4 * np.abs(distorted).max())


@pytest.fixture(scope="module")
def estimated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apply")
    cfg = SimulationConfig(seed=4)
    cfg.optics_groups = [
        OpticsGroupConfig(
            pixel_size_A=1.6,
            aniso=[1.01, 0.99, 30.0],
            box=48,
            n_particles=600,
            particles_per_micrograph=50,
        )
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.4, 0.9
    cfg.noise.snr = 2.0
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 50.0, 1000
    simulate_dataset(cfg, tmp / "sim", progress=False)
    cryomag.estimate(
        tmp / "sim" / "particles.star",
        tmp / "sim" / "ref.mrc",
        tmp / "est",
        fit=("scale", "aniso", "micrograph"),
        progress=False,
        plots=False,
    )
    return tmp


def test_resampled_stacks_reestimate_to_identity(estimated):
    tmp = estimated
    r = CliRunner().invoke(
        app, ["apply", str(tmp / "est"), "--out", str(tmp / "res"), "--resample", "-q"]
    )
    assert r.exit_code == 0, r.output
    ps = read_star(tmp / "res" / "particles.star")
    np.testing.assert_array_equal(ps.mag_matrices()[0], np.eye(2))
    res = cryomag.estimate(
        tmp / "res" / "particles.star",
        tmp / "sim" / "ref.mrc",
        tmp / "est2",
        fit=("scale", "aniso"),
        progress=False,
        plots=False,
    )
    g = res.groups[0]
    assert np.abs(g.mag - np.eye(2)).max() < max(3e-4, 4 * g.mag_error.max())


def test_split_by_micrograph_keeps_particles_and_ctf(estimated):
    tmp = estimated
    r = CliRunner().invoke(
        app,
        [
            "apply",
            str(tmp / "est"),
            "--out",
            str(tmp / "split"),
            "--split",
            "micrograph",
            "--model",
            "micrograph",
            "--cs",
        ],
    )
    assert r.exit_code == 0, r.output
    before = read_star(tmp / "est" / "particles.star")
    after = read_star(tmp / "split" / "particles.star")
    assert len(after) == len(before)
    assert after.n_groups == len(np.unique(before.micrographs()))
    assert set(before.particles.columns) <= set(after.particles.columns)
    # each particle's CTF (defocus term) is unchanged: CTF(M_old k; old) == CTF(M_new k; new)
    m_old = before.mag_matrices()[before.group_index()]
    m_new = after.mag_matrices()[after.group_index()]
    k = np.array([[0.1, 0.2, -0.15], [0.05, -0.12, 0.2]])
    for i in range(0, len(before), 97):
        uo, un = m_old[i] @ k, m_new[i] @ k
        cols = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
        a = ctf_values(uo[0], uo[1], *(before.column(c)[i] for c in cols), 300, 0, 0.1)
        b = ctf_values(un[0], un[1], *(after.column(c)[i] for c in cols), 300, 0, 0.1)
        np.testing.assert_allclose(a, b, atol=1e-6)
    arr = load_cs_array(tmp / "split" / "particles.cs")
    m_cs = np.linalg.inv(np.eye(2) + arr["ctf/anisomag"].reshape(-1, 2, 2))
    np.testing.assert_allclose(m_cs, m_new, atol=1e-6)


def test_per_particle_cs_and_bad_model(estimated, tmp_path):
    tmp = estimated
    r = CliRunner().invoke(
        app,
        ["apply", str(tmp / "est"), "--out", str(tmp_path / "c"), "--cs", "--model", "micrograph"],
    )
    assert r.exit_code == 0, r.output
    arr = load_cs_array(tmp_path / "c" / "particles.cs")
    est = read_star(tmp / "est" / "particles.star")
    cols = [f"cmagMicrographMagMat{c}" for c in ("00", "01", "10", "11")]
    m_p = est.particles[cols].to_numpy().reshape(-1, 2, 2)
    np.testing.assert_allclose(
        np.linalg.inv(np.eye(2) + arr["ctf/anisomag"].reshape(-1, 2, 2)), m_p, atol=1e-6
    )
    r = CliRunner().invoke(
        app,
        ["apply", str(tmp / "est"), "--out", str(tmp_path / "d"), "--model", "particle", "--cs"],
    )
    assert r.exit_code == 1 and "cmagParticleMagMat00" in r.output
