"""Per-particle, per-micrograph and defocus-dependent magnification recover simulated truth
(issue 4), from the stored statistics (``cryomag refit`` reads no image).

Fast variants run by default (small boxes, high SNR); tolerances are stated per test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cryomag
from cryomag.cli.main import app
from cryomag.io import read_star
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import load_truth, simulate_dataset
from tests.report.test_render import pdf_pages

FITS = ("scale", "aniso", "particle", "micrograph", "defocus")


def local_config(seed, kappa, mic_std, n=800, snr=1.0, full_size=False):
    """Small fast sets (box 48), or with ``full_size`` the issue's targets' set: box 128 at
    1.6 A, 50 particles per micrograph, defocus 0.8-2.5 um, a 120 A phantom."""
    box, per_mic, dz, diameter, atoms = (
        (128, 50, (0.8, 2.5), 120.0, 5000) if full_size else (48, 40, (0.3, 1.2), 50.0, 1000)
    )
    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(
            pixel_size_A=1.6,
            aniso=[1.01, 0.99, 30.0],
            box=box,
            n_particles=n,
            particles_per_micrograph=per_mic,
        )
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = dz
    cfg.magnification.kappa_pct_per_um = kappa
    cfg.magnification.mic_iso_std_pct = mic_std
    cfg.noise.snr = snr
    cfg.phantom.diameter_A = diameter
    cfg.phantom.n_atoms = atoms
    return cfg


def run(tmp: Path, cfg) -> tuple:
    simulate_dataset(cfg, tmp / "sim", progress=False)
    res = cryomag.estimate(
        tmp / "sim" / "particles.star",
        tmp / "sim" / "ref.mrc",
        tmp / "est",
        fit=FITS,
        progress=False,
    )
    return res, load_truth(tmp / "sim")


@pytest.fixture(scope="module")
def kappa_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("kappa"), local_config(21, kappa=1.0, mic_std=0.0))


@pytest.fixture(scope="module")
def scatter_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("scatter"), local_config(22, kappa=0.0, mic_std=0.5))


def test_kappa_recovered(kappa_run):
    """kappa = 1 %/um: within 4 standard errors, and the standard error below 0.2 %/um."""
    res, _ = kappa_run
    d = res.local[1]["defocus"]
    assert d["kappa_se_percent_per_um"] < 0.2
    assert abs(d["kappa_percent_per_um"] - 1.0) < 4 * d["kappa_se_percent_per_um"]
    assert d["p_value_kappa_zero"] < 1e-6
    assert res.local[1]["model_choice"]["chosen"] in ("defocus-linear", "per-micrograph")


def test_no_micrograph_scatter_reported_as_zero(kappa_run):
    res, _ = kappa_run
    d = res.local[1]["defocus"]
    # the only real scatter between micrographs is the defocus effect itself; what the
    # meta-regression attributes to other causes stays far below the 0.5 % of the scatter
    # test (the box-periodic prediction adds a little: the CTF moves signal out of the box)
    assert d["micrograph_scatter_not_from_defocus"] < 0.0015


def test_kappa_zero_interval_contains_zero_and_micrographs_recovered(scatter_run):
    res, truth = scatter_run
    d = res.local[1]["defocus"]
    lo, hi = d["kappa_ci95_percent_per_um"]
    assert lo < 0 < hi
    mic = res.local[1]["micrograph"]
    # real scatter 0.5 %: estimated within 3 standard errors
    assert abs(mic["isotropic_scatter"] - 0.005) < 3 * mic["isotropic_scatter_se"] + 5e-4
    p = truth["particles"]
    true_mic = np.sqrt(np.linalg.det(p["M_mic"]))
    est = res.particles.particles["cmagMicrographMag"].to_numpy()
    assert np.corrcoef(est, true_mic)[0, 1] > 0.8


def test_per_particle_values_and_columns(scatter_run):
    res, truth = scatter_run
    t = res.particles.particles
    for c in (
        "cmagParticleMag",
        "cmagParticleMagRaw",
        "cmagParticleMagError",
        "cmagParticleMagMat00",
        "cmagMicrographMag",
        "cmagDefocusMag",
    ):
        assert c in t.columns and np.all(np.isfinite(t[c]))
    raw = t["cmagParticleMagRaw"].to_numpy()
    shr = t["cmagParticleMag"].to_numpy()
    true = np.sqrt(np.linalg.det(truth["particles"]["M_mic"]))
    # shrinkage toward the group makes the per-particle values closer to the truth
    assert np.mean((shr - true) ** 2) < np.mean((raw - true) ** 2)


def test_refit_from_statistics_matches_and_writes_star(kappa_run, tmp_path):
    res, _ = kappa_run
    # the local fits' passes form every particle's matrix (no lean estimate)
    assert all(not st.matrix_estimated.any() for st in res.stats.values())
    run_dir = Path(res.particles.source.path).parent.parent / "est"
    # the run's PDF: every plot, the local models' too, one per page
    pngs = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert {"mag_vs_defocus_group001.png", "micrograph_mag_group001.png",
            "shrinkage_group001.png"} <= set(pngs), pngs  # fmt: skip
    assert pdf_pages(run_dir / "plots" / "estimate.pdf") == len(pngs)
    r = CliRunner().invoke(
        app,
        [
            "refit",
            str(run_dir),
            "--fit",
            "defocus,micrograph",
            "--out",
            str(tmp_path / "refit"),
            "--no-plots",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "refit" / "results.json").read_text())
    k_refit = out["groups"]["1"]["defocus"]["kappa_percent_per_um"]
    assert k_refit == pytest.approx(res.local[1]["defocus"]["kappa_percent_per_um"], rel=1e-6)
    ps = read_star(tmp_path / "refit" / "particles.star")
    assert "cmagMicrographMag" in ps.particles.columns
    # with plots, a subset of the run's fits (its particle columns stay in the table)
    r = CliRunner().invoke(
        app, ["refit", str(run_dir), "--fit", "micrograph", "--out", str(tmp_path / "mic")]
    )
    assert r.exit_code == 0, r.output
    plots = sorted(p.name for p in (tmp_path / "mic" / "plots").iterdir())
    assert "micrograph_mag_group001.png" in plots, plots
    assert not any(p.startswith("shrinkage") for p in plots), plots
    r = CliRunner().invoke(app, ["refit", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "nothing" in r.output


# ----------------------------------------------------------------------- full-size target
@pytest.mark.slow
def test_full_size_kappa(tmp_path):
    """Issue 4's target: kappa = 0.5 %/um over 0.8-2.5 um, 20,000 particles of box 128 at
    SNR 0.05 (50 per micrograph, 1 % anisotropy): recovered within 10 % of its value."""
    cfg = local_config(41, 0.5, 0.0, n=20000, snr=0.05, full_size=True)
    simulate_dataset(cfg, tmp_path / "sim", progress=False)
    res = cryomag.estimate(
        tmp_path / "sim" / "particles.star",
        tmp_path / "sim" / "ref.mrc",
        tmp_path / "est",
        fit=("scale", "aniso", "micrograph", "defocus"),
        progress=False,
    )
    d = res.local[1]["defocus"]
    print("kappa", d["kappa_percent_per_um"], "+-", d["kappa_se_percent_per_um"], d)
    assert abs(d["kappa_percent_per_um"] - 0.5) < 0.05
    # and statistically close: 4 standard errors or 1 % of the value
    assert abs(d["kappa_percent_per_um"] - 0.5) < max(4 * d["kappa_se_percent_per_um"], 0.005)


@pytest.mark.slow
def test_full_size_micrograph_scatter(tmp_path):
    """Issue 4's target: 0.5 % isotropic scatter between micrographs, 50 particles each, box
    128, SNR 0.05: per-micrograph values correlate > 0.8 with the truth. The correlation
    depends on the particles per micrograph, not on their total: 100 micrographs suffice."""
    cfg = local_config(43, 0.0, 0.5, n=5000, snr=0.05, full_size=True)
    simulate_dataset(cfg, tmp_path / "sim", progress=False)
    res = cryomag.estimate(
        tmp_path / "sim" / "particles.star",
        tmp_path / "sim" / "ref.mrc",
        fit=("scale", "aniso", "micrograph", "defocus"),
        progress=False,
    )
    truth = load_truth(tmp_path / "sim")
    true_mic = np.sqrt(np.linalg.det(truth["particles"]["M_mic"]))
    est = res.particles.particles["cmagMicrographMag"].to_numpy()
    raw = res.particles.particles["cmagMicrographMagRaw"].to_numpy()
    mic = res.local[1]["micrograph"]
    corr = np.corrcoef(est, true_mic)[0, 1]
    print("correlation", corr, "raw", np.corrcoef(raw, true_mic)[0, 1], mic["isotropic_scatter"])
    assert corr > 0.8
    assert abs(mic["isotropic_scatter"] - 0.005) < 3 * mic["isotropic_scatter_se"] + 5e-4
    lo, hi = res.local[1]["defocus"]["kappa_ci95_percent_per_um"]
    assert lo < 0 < hi
