"""Issue 13's full-size targets (slow): box 128, SNR 0.05, 5,000 particles.

``pytest -m slow tests/fit/test_aberrations_full.py -s``; the numbers measured are in
bench/RESULTS.md.
"""

from __future__ import annotations

import numpy as np
import pytest

import cryomag
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import load_truth, simulate_dataset
from tests.fit.test_aberrations import TILT, TREFOIL, found_and_truth, hide_aberrations

pytestmark = pytest.mark.slow



def test_full_size_tilt_trefoil_cs(tmp_path):
    cfg = SimulationConfig(seed=61)
    cfg.optics_groups = [
        OpticsGroupConfig(pixel_size_A=1.25, aniso=[1.01, 0.99, 30.0], box=128, n_particles=5000,
                          particles_per_micrograph=50, beam_tilt_mrad=list(TILT),
                          odd_zernike=[0.0, 0.0, 0.0, 0.0, 0.0, TREFOIL])  # fmt: skip
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.5
    cfg.noise.snr = 0.05
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 120.0, 5000
    simulate_dataset(cfg, tmp_path / "sim", progress=False)
    sim = hide_aberrations(tmp_path / "sim")
    res = cryomag.estimate(sim / "unknown.star", sim / "ref.mrc", None,
                           aberrations="tilt,trefoil,cs", progress=False, plots=False)  # fmt: skip
    gr = res.groups[0]
    names, got, want, se = found_and_truth(gr)
    m_true = load_truth(sim)["M_group"][0]
    for n, g, w, s, c in zip(names, got, want, se, gr.aberration_mag_corr, strict=True):
        print(f"{n}: {g:.5g} +- {s:.2g} (truth {w:g}, {(g - w) / s:+.2f} SE; corr iso M {c:+.2f})")
    print("M error", (gr.mag - m_true).ravel(), "SE", gr.mag_error.ravel(),
          "time", res.timings["statistics_s"])  # fmt: skip
    assert np.all(np.abs(got - want) < 2.5 * se)
    assert np.all(np.abs(gr.mag - m_true) < 2.5 * gr.mag_error)
