"""`cryomag merge` (issue 5): relative pixel sizes recovered, both ways out, real metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import cryomag
import cryomag.workflows.merge
from cryomag.cli.main import app
from cryomag.io import read_cs, read_star
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset
from tests.data_paths import DATA


def dataset(folder, seed, apix, box, true_apix, n=500, snr=2.0):
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
    cfg.noise.snr = snr
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


@pytest.fixture(scope="module")
def fsc_merge(tmp_path_factory):
    """Two small, noisier sets 3 % apart (1.5 % each way) merged with the before/after FSC."""
    tmp = tmp_path_factory.mktemp("merge_fsc")
    dataset(tmp / "a", 1, 1.6, 48, 1.6 * 1.015, n=250, snr=0.5)
    dataset(tmp / "b", 2, 1.28, 60, 1.28 * 0.985, n=250, snr=0.5)
    rep = cryomag.workflows.merge.merge(
        [tmp / "a" / "particles.star", tmp / "b" / "particles.star"],
        tmp / "m",
        tmp / "a" / "ref.mrc",
        fsc=True,
        progress=False,
        plots=False,
    )
    return tmp, rep


def test_merge_fsc_before_after(fsc_merge):
    from PIL import Image

    tmp, rep = fsc_merge
    png = tmp / "m" / "plots" / "merge_fsc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    assert not list((tmp / "m" / "plots").glob(".*tmp*")), "temporary file left behind"
    f = json.loads((tmp / "m" / "merge.json").read_text())["fsc"]
    assert f["plot"] == "plots/merge_fsc.png"
    # the reference's grid (box 50 at 1.28 A)
    assert f["grid"]["box"] == 50 and f["grid"]["pixel_size_A"] == pytest.approx(1.28)
    freq = np.array(f["frequency_1_per_A"])
    assert freq.shape == (25,)
    for k in ("before", "after"):
        assert len(f[k]["fsc"]) == len(f[k]["fsc_vs_reference"]) == freq.size
        assert f[k]["resolution_0.5_A"] >= f[k]["resolution_0.143_A"] >= 2 * 1.28
        assert f[k]["n_particles_half"] == [250, 250]
    before, after = f["before"], f["after"]
    # the correction makes the groups consistent: at least as good, better between 0.3 and
    # 0.9 of Nyquist (same particles and noise, so the difference is systematic)
    assert after["resolution_0.143_A"] <= before["resolution_0.143_A"] + 0.05
    nyquist = 0.5 / f["grid"]["pixel_size_A"]
    shells = (freq >= 0.3 * nyquist) & (freq <= 0.9 * nyquist)
    mean = {k: np.mean(np.array(f[k]["fsc"])[shells]) for k in ("before", "after")}
    assert mean["after"] > mean["before"] + 0.003, mean
    ref = {k: np.mean(np.array(f[k]["fsc_vs_reference"])[shells]) for k in ("before", "after")}
    assert ref["after"] > ref["before"], ref


def test_merge_cli_fsc_option(fsc_merge, monkeypatch):
    """--fsc reaches merge(fsc=True) (off by default) and its summary is printed."""
    tmp, rep = fsc_merge
    calls = []

    def fake_merge(inputs, out, ref, **kw):
        calls.append(kw)
        return rep

    monkeypatch.setattr(cryomag.workflows.merge, "merge", fake_merge)
    args = ["merge", str(tmp / "a" / "particles.star"), "--ref", str(tmp / "a" / "ref.mrc")]
    for extra, expected in (([], False), (["--fsc"], True), (["--no-fsc"], False)):
        r = CliRunner().invoke(app, [*args, "--out", str(tmp / "cli"), "-q", *extra])
        assert r.exit_code == 0, r.output
        assert calls[-1]["fsc"] is expected
        assert "half-map FSC = 0.143" in r.output
        assert "merge_fsc.png" in r.output


def test_merge_fsc_without_estimate_is_skipped(fsc_merge, tmp_path):
    tmp, _ = fsc_merge
    with pytest.warns(UserWarning, match="needs the estimate"):
        rep = cryomag.workflows.merge.merge(
            [tmp / "a" / "particles.star"], tmp_path / "n", estimate=False, fsc=True
        )
    assert "skipped" in rep["fsc"]
    assert not (tmp_path / "n" / "plots").exists()


# ----------------------------------------------------------------------- full-size target
@pytest.mark.slow
def test_full_size_relative_pixel_size(tmp_path):
    """Issue 5's target: 1.06 A / box 160 and 0.83 A / box 200, nominal sizes 1 % off,
    10,000 particles per set at SNR 0.05: relative pixel size within 0.02 %."""
    for name, seed, apix, box, true_apix in (
        ("a", 51, 1.06, 160, 1.06 * 1.01),
        ("b", 52, 0.83, 200, 0.83 * 0.99),
    ):
        cfg = SimulationConfig(seed=seed)
        cfg.optics_groups = [
            OpticsGroupConfig(
                name=f"set{name}",
                pixel_size_A=apix,
                box=box,
                true_pixel_size_A=true_apix,
                n_particles=10000,
                particles_per_micrograph=100,
            )
        ]
        cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.2
        cfg.noise.snr = 0.05
        cfg.phantom.diameter_A, cfg.phantom.n_atoms, cfg.phantom.seed = 110.0, 5000, 7
        cfg.phantom.ref_pixel_size_A = 0.83
        simulate_dataset(cfg, tmp_path / name, progress=False)
    rep = cryomag.workflows.merge.merge(
        [tmp_path / "a" / "particles.star", tmp_path / "b" / "particles.star"],
        tmp_path / "m",
        reference=tmp_path / "b" / "ref.mrc",
        progress=False,
    )
    sizes = {p["optics_group"]: p for p in rep["pixel_sizes"]}
    ratio = sizes[1]["true_pixel_size_A"] / sizes[2]["true_pixel_size_A"]
    truth = 1.06 * 1.01 / (0.83 * 0.99)
    print("relative pixel size", ratio, "truth", truth, "rel error", ratio / truth - 1, sizes)
    assert abs(ratio / truth - 1) < 2e-4
