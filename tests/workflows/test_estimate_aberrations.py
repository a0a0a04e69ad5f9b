"""`cryomag estimate` holds the data's known aberrations fixed (issue 13).

A data set simulated with a beam tilt of 0.5 mrad, trefoil and even Zernike terms (applied as
RELION models them) is estimated twice with default options: with the aberrations in the
STAR's optics table, M is recovered as accurately as on the same data set simulated without
aberrations; with the STAR's aberration columns removed, the error in M is measurably worse.
"""

from __future__ import annotations

import numpy as np
import pytest

import cryomag
from cryomag.io import read_star, write_star
from cryomag.model.particles import BEAM_TILT_COLUMNS, ZERNIKE_COLUMNS
from cryomag.simulation.simulator import load_truth, simulate_dataset
from tests.workflows.test_estimate import small_config

ABERRATIONS = {
    "beam_tilt_mrad": [0.5, -0.2],
    "odd_zernike": [0.0, 0.0, 25.0, 0.0, 0.0, -15.0],
    "even_zernike": [0.0, 0.3, 0.0, -0.3, 50.0, 0.0, 0.0, 0.0, -40.0],
}


def _simulate(folder, aberrated: bool):
    cfg = small_config(cs=False)
    if aberrated:
        for k, v in ABERRATIONS.items():
            setattr(cfg.optics_groups[0], k, list(v))
    simulate_dataset(cfg, folder, progress=False)
    return load_truth(folder)["M_group"][0]


def _error(folder, star, out):
    res = cryomag.estimate(folder / star, folder / "ref.mrc", out, progress=False)
    g = res.groups[0]
    return g.mag, g.mag_error


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    plain = tmp_path_factory.mktemp("plain")
    ab = tmp_path_factory.mktemp("aberrated")
    m_plain = _simulate(plain, False)
    m_ab = _simulate(ab, True)
    ps = read_star(ab / "particles.star")
    assert ps.optics_params(1).has_aberrations
    ps.optics = ps.optics.drop(columns=[*BEAM_TILT_COLUMNS, *ZERNIKE_COLUMNS])
    write_star(ps, ab / "particles_without_aberrations.star")
    out = {
        "plain": (m_plain, *_error(plain, "particles.star", tmp_path_factory.mktemp("e0"))),
        "held": (m_ab, *_error(ab, "particles.star", tmp_path_factory.mktemp("e1"))),
        "omitted": (
            m_ab,
            *_error(ab, "particles_without_aberrations.star", tmp_path_factory.mktemp("e2")),
        ),
    }
    for k, (m, mag, se) in out.items():
        print(f"\n{k}: |M - M_true| max {np.abs(mag - m).max():.2e}, se max {se.max():.2e}")
    return out


def test_known_aberrations_are_held_fixed(runs):
    """With the aberrations given, M is as accurate as without aberrations."""
    m_true, mag, se = runs["held"]
    err = np.abs(mag - m_true)
    assert np.all(err < 4 * se), (err, se)
    m0, mag0, se0 = runs["plain"]
    assert err.max() < max(2.0 * np.abs(mag0 - m0).max(), 4 * se.max())


def test_omitted_aberrations_bias_M(runs):
    """The same data without the aberrations in the STAR: the error in M is measurably
    worse (so the held-fixed test can fail)."""
    m_true, mag, se = runs["held"]
    _, mag_o, se_o = runs["omitted"]
    err_held = np.abs(mag - m_true).max()
    err_omitted = np.abs(mag_o - m_true).max()
    assert err_omitted > 3 * err_held and err_omitted > 4 * se_o.max(), (err_held, err_omitted)
