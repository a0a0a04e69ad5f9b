"""`cryomag calibrate` recovers the true pixel size of particles simulated from an atomic
model at a known wrong declared pixel size (declared 1.00 A, true 1.02 A)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("gemmi")

from cryomag.calibration.synthetic import simulate_from_model  # noqa: E402
from cryomag.cli.main import app  # noqa: E402
from cryomag.workflows.calibrate import calibrate, pixel_size_with_error  # noqa: E402

TRUE_A, DECLARED_A = 1.02, 1.00


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    return simulate_from_model(folder, n_particles=300, box=48, declared_pixel_A=DECLARED_A,
                               true_pixel_A=TRUE_A, render_eps=1e-5)  # fmt: skip


def test_recovers_the_true_pixel_size_within_its_error(dataset, tmp_path):
    star, model = dataset
    res = calibrate(star, model, tmp_path / "cal", progress=False)
    (g,) = res.groups
    assert g["declared_pixel_size_A"] == DECLARED_A
    # the standard error resolves the 2 % error many times over, and covers the truth
    assert 0 < g["pixel_size_se_A"] < 0.004
    assert abs(g["pixel_size_A"] - TRUE_A) < 4 * g["pixel_size_se_A"], g
    assert g["verdict"] != "failed"
    assert any(s.startswith("model B-factors") for s in g["limits"])
    saved = json.loads((tmp_path / "cal" / "results.json").read_text())
    assert saved["groups"][0]["pixel_size_A"] == pytest.approx(g["pixel_size_A"])
    assert saved["reference"]["voxel_size_A"] == DECLARED_A
    text = (tmp_path / "cal" / "calibration.txt").read_text()
    assert f"pixel size {g['pixel_size_A']:.5f} +-" in text
    assert (tmp_path / "cal" / "model_map.mrc").stat().st_size > 0


def test_cli_calibrate(dataset, tmp_path):
    star, model = dataset
    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["--plain", "calibrate", "--particles", str(star),
                                      "--model", str(model), "--out", str(out), "--j", "1",
                                      "--b-factor", "10", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pixel size 1.0" in result.output and "declared 1.00000 A" in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["reference"]["b_extra_A2"] == 10.0
    g = saved["groups"][0]
    assert abs(g["pixel_size_A"] - TRUE_A) < 4 * g["pixel_size_se_A"]
    bad = CliRunner().invoke(app, ["calibrate", "--particles", str(star), "--model",
                                   str(tmp_path / "none.pdb"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "none.pdb: file not found" in bad.output


def test_pixel_size_error_propagation():
    """SE of declared / sqrt(det M) against a Monte Carlo of M's distribution."""
    rng = np.random.default_rng(1)
    m = np.array([[0.981, 0.004], [0.003, 0.979]])
    a = rng.normal(size=(4, 4)) * 1e-4
    cov = a @ a.T
    p, se = pixel_size_with_error(1.0, m, cov)
    assert p == pytest.approx(1 / np.sqrt(np.linalg.det(m)))
    draws = rng.multivariate_normal(m.ravel(), cov, 20000).reshape(-1, 2, 2)
    mc = 1 / np.sqrt(np.linalg.det(draws))
    assert se == pytest.approx(mc.std(), rel=0.05)


@pytest.mark.slow
def test_calibrate_target_5000_particles_box_128(tmp_path):
    """The issue's target: within 2e-4 relative of the truth with 5,000 particles, box 128."""
    star, model = simulate_from_model(tmp_path / "d", n_particles=5000, box=128,
                                      n_residues=1500, render_eps=1e-5)  # fmt: skip
    (g,) = calibrate(star, model, tmp_path / "cal", progress=False).groups
    rel = g["pixel_size_A"] / TRUE_A - 1
    assert abs(rel) < 2e-4, g
    assert abs(g["pixel_size_A"] - TRUE_A) < 4 * g["pixel_size_se_A"]
