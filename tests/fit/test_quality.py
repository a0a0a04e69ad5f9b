"""No silent wrong results from a fit (issue 15, items 6 and 7): every group's fit carries a
verdict; a fit that did not converge, a reference that does not explain the particles or an
undetermined M is flagged in results.json, on the terminal, and by exit status 3, and is never
applied to the particles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cryomag
from cryomag.cli.main import app
from cryomag.fit.quality import MIN_SIGNAL_Z, assess_group
from cryomag.io import read_star
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset
from tests.data_paths import DATA

FAST = {"progress": False, "plots": False, "nthreads": 1, "chunk_size": 256}


def _config(snr: float, seed: int = 11) -> SimulationConfig:
    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(pixel_size_A=1.6, aniso=[1.01, 0.99, 30.0], box=48, n_particles=200,
                          particles_per_micrograph=20)  # fmt: skip
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.6, 1.2
    cfg.noise.snr = snr
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 50.0, 800
    cfg.render.n_workers = 1
    return cfg


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("q_good")
    simulate_dataset(_config(0.5), folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def noise_only(tmp_path_factory) -> Path:
    """The same geometry, but the images carry (almost) no signal: 1e-6 SNR."""
    folder = tmp_path_factory.mktemp("q_noise")
    simulate_dataset(_config(1e-6), folder, progress=False)
    return folder


def test_a_good_fit_is_ok_with_its_numbers(good, tmp_path):
    res = cryomag.estimate(good / "particles.star", good / "ref.mrc", tmp_path, **FAST)
    assert res.verdict == "ok" and res.problems == []
    q = res.groups[0].quality
    assert q.converged and q.signal_z > 50 and q.positive_scale_fraction > 0.95
    assert 0 < q.explained_fraction < 1 and 0.8 < q.chi2_per_pixel < 1.2
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["verdict"] == "ok" and summary["groups"][0]["quality"]["verdict"] == "ok"


def test_a_reference_that_does_not_explain_the_particles_fails(noise_only, tmp_path):
    res = cryomag.estimate(
        noise_only / "particles.star", noise_only / "ref.mrc", tmp_path, **FAST
    )
    gr = res.groups[0]
    assert res.verdict == "failed" and gr.failed
    assert gr.quality.signal_z < MIN_SIGNAL_Z
    assert any("does not explain" in p for p in res.problems)
    assert np.all(np.isnan(gr.mag_error))  # no standard errors from a failed fit
    # not applied: the particles keep their M and CTF weights; no scale is given
    out = read_star(tmp_path / "particles.star")
    inp = read_star(noise_only / "particles.star")
    np.testing.assert_array_equal(out.mag_matrices(), inp.mag_matrices())
    np.testing.assert_array_equal(out.column("rlnDefocusU"), inp.column("rlnDefocusU"))
    assert np.all(np.isnan(out.column("cmagScale")))
    summary = json.loads((tmp_path / "results.json").read_text())  # valid JSON: NaN -> null
    assert summary["verdict"] == "failed"
    assert summary["groups"][0]["M_standard_error"] == [[None, None], [None, None]]


def test_an_unconverged_fit_fails_with_exit_status_3(good, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        ["estimate", "-i", str(good / "particles.star"), "--ref", str(good / "ref.mrc"),
         "-o", str(out), "--j", "1", "--max-iter", "1", "--tol", "1e-9", "--warm-start", "0",
         "--no-plots", "-q"],
    )  # fmt: skip
    assert r.exit_code == 3, r.output
    assert "did not converge" in " ".join(r.output.split())
    summary = json.loads((out / "results.json").read_text())
    assert summary["verdict"] == "failed"
    assert summary["groups"][0]["converged"] is False
    assert "did not converge" in summary["problems"][0]


def test_real_particles_against_an_unrelated_map_fail(tmp_path):
    """The issue's case: 5 real RELION particles and an unrelated EMDB map gave standard
    errors of 2.4e-7 on a 6-9 % distortion."""
    res = cryomag.estimate(
        DATA / "particles" / "relion31.star", DATA / "map" / "emd_6824.mrc", tmp_path, **FAST
    )
    assert res.verdict == "failed"
    assert any("does not explain" in p for p in res.problems)
    assert np.all(np.isnan(res.groups[0].mag_error))


def test_degenerate_and_implausible_fits_are_caught(good, tmp_path):
    res = cryomag.estimate(good / "particles.star", good / "ref.mrc", None, **FAST)
    st = res.stats[1]
    gr = res.groups[0]
    base = dict(converged=True, iterations=3)
    ok = assess_group(st, gr.mag, gr.covariance, np.eye(4), **base)
    assert ok.verdict == "ok"
    singular = np.diag([1.0, 1.0, 1.0, 0.0])
    assert "do not determine M" in assess_group(st, gr.mag, gr.covariance, singular, **base)\
        .problems[0]  # fmt: skip
    runaway = assess_group(st, gr.mag * 1.5, gr.covariance, np.eye(4), **base)
    assert runaway.failed and "plausible" in runaway.problems[0]
    nan_cov = assess_group(st, gr.mag, np.full((4, 4), np.nan), np.eye(4), **base)
    assert nan_cov.failed
    # a prior of the particles' defocus spread that did not converge: a warning, not ok
    prior = assess_group(st, gr.mag, gr.covariance, np.eye(4), prior_steps=20, **base)
    assert prior.verdict == "warning" and not prior.failed
    assert "did not converge in 20 steps" in prior.problems[0]
