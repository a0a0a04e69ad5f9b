"""`cryomag merge` (issue 5): relative pixel sizes recovered, both ways out, real metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cryomag
import cryomag.workflows.merge
from cryomag.cli.main import app
from cryomag.io import read_cs, read_star
from cryomag.simulate.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulate.simulator import simulate_dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def dataset(folder, seed, apix, box, true_apix, n=500):
    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(
            name=f"set{seed}",
            pixel_size_A=apix,
            box=box,
            true_pixel_size_A=true_apix,
            n_particles=n,
            particles_per_micrograph=50,
        )
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.4, 0.9
    cfg.noise.snr = 2.0
    cfg.phantom.diameter_A, cfg.phantom.n_atoms, cfg.phantom.seed = 50.0, 1000, 7
    cfg.phantom.ref_pixel_size_A = 1.28
    simulate_dataset(cfg, folder, progress=False)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    # declared pixel sizes 1.6 and 1.28 A, true sizes 1 % off in opposite directions
    dataset(tmp / "a", 1, 1.6, 48, 1.6 * 1.01)
    dataset(tmp / "b", 2, 1.28, 60, 1.28 * 0.99)
    return tmp


def test_merge_recovers_relative_pixel_sizes(two_sets):
    tmp = two_sets
    r = CliRunner().invoke(
        app,
        [
            "merge",
            str(tmp / "a" / "particles.star"),
            str(tmp / "b" / "particles.star"),
            "--ref",
            str(tmp / "a" / "ref.mrc"),
            "--out",
            str(tmp / "m"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp / "m" / "merge.json").read_text())
    sizes = {p["optics_group"]: p for p in rep["pixel_sizes"]}
    for g, truth in ((1, 1.6 * 1.01), (2, 1.28 * 0.99)):
        p = sizes[g]
        assert abs(p["true_pixel_size_A"] - truth) < max(
            4 * p["true_pixel_size_se_A"], 2e-4 * truth
        ), (p, truth)
    ratio = sizes[1]["true_pixel_size_A"] / sizes[2]["true_pixel_size_A"]
    assert ratio == pytest.approx(1.6 * 1.01 / (1.28 * 0.99), rel=1e-3)
    ps = read_star(tmp / "m" / "particles.star")
    assert len(ps) == 1000 and ps.n_groups == 2
    assert list(ps.optics["rlnOpticsGroupName"]) == ["particles_set1", "particles_set2"]
    # the .cs carries one pixel size and the difference in anisomag
    cs = read_cs(tmp / "m" / "particles.cs")
    assert np.allclose(cs.optics_value("rlnImagePixelSize"), rep["cs_common_pixel_size_A"])
    p_true_cs = rep["cs_common_pixel_size_A"] / np.sqrt(np.linalg.det(cs.mag_matrices()))
    np.testing.assert_allclose(
        sorted(p_true_cs), sorted(p["true_pixel_size_A"] for p in rep["pixel_sizes"]), rtol=1e-5
    )
    assert (tmp / "m" / "pixel_sizes.png").stat().st_size > 1000


def test_resampled_merge_reestimates_to_identity(two_sets, tmp_path):
    tmp = two_sets
    rep = cryomag.workflows.merge.merge(
        [tmp / "a" / "particles.star", tmp / "b" / "particles.star"],
        tmp_path / "r",
        tmp / "a" / "ref.mrc",
        resample=True,
        progress=False,
        plots=False,
    )
    ps = read_star(tmp_path / "r" / "particles.star")
    assert np.allclose(ps.optics_value("rlnImagePixelSize"), rep["resampled"]["pixel_size_A"])
    assert len(set(ps.optics_value("rlnImageSize"))) == 1
    # the coarser set (1.616 A) carries nothing beyond its own Nyquist after upsampling:
    # keep the re-estimate's band inside it
    res = cryomag.estimate(
        tmp_path / "r" / "particles.star",
        tmp / "a" / "ref.mrc",
        fit=("scale", "aniso"),
        progress=False,
        high_res_A=2 * 1.616 / 0.9,
    )
    # the first fit and the re-estimate use different bands (the re-estimate stays inside
    # the coarser set's Nyquist), so they differ by noise of about sqrt(2) standard errors
    for g in res.groups:
        assert np.abs(g.mag - np.eye(2)).max() < max(3e-4, 4 * np.sqrt(2) * g.mag_error.max())


def test_duplicates_are_reported(two_sets, tmp_path):
    tmp = two_sets
    rep = cryomag.workflows.merge.merge(
        [tmp / "a" / "particles.star", tmp / "a" / "particles.star"], tmp_path / "d", estimate=False
    )
    assert rep["duplicates"]["count"] == 500
    assert rep["n_particles"] == 1000


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")
def test_real_metadata_merge_keeps_every_particle_and_column(tmp_path):
    star = DATA / "star" / "relion31.6opticsgroups.star"
    cs = DATA / "cryosparc" / "cryosparc_P12_J24_001_particles.cs"
    r = CliRunner().invoke(
        app, ["merge", str(star), str(cs), "--no-estimate", "--out", str(tmp_path / "m")]
    )
    assert r.exit_code == 0, r.output
    a, b = read_star(star), cryomag.io.read_particles(cs)
    m = read_star(tmp_path / "m" / "particles.star")
    assert len(m) == len(a) + len(b)
    assert set(a.particles.columns) <= set(m.particles.columns)
    assert set(b.particles.columns) <= set(m.particles.columns)
    assert m.n_groups == a.n_groups + b.n_groups
    assert len(set(m.optics["rlnOpticsGroup"])) == m.n_groups
    # group matrices of the STAR input kept
    np.testing.assert_allclose(m.mag_matrices()[: a.n_groups], a.mag_matrices(), atol=1e-9)
    assert (tmp_path / "m" / "particles.cs").exists()
