"""New optics groups from a column or a micrograph-name pattern (issue 13's grouping)."""

from __future__ import annotations

import numpy as np
import pytest

import cryomag
from cryomag.io import read_star
from cryomag.model.grouping import regroup_by
from cryomag.model.particles import ParticleDataError
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset
from tests.data_paths import DATA

SIX = DATA / "star" / "relion31.6opticsgroups.star"


def test_regroup_by_pattern_on_a_real_file():
    """Each old group splits by the micrograph number's parity digit; every optics column of
    the old group is copied, names say where they come from, the input is unchanged."""
    ps = read_star(SIX)
    before = ps.optics.copy()
    out = regroup_by(ps, r"pattern:(\d)\.mrc$")  # the micrograph number's last digit
    last = np.array([m[-5] for m in ps.micrographs()])
    old = ps.particle_group_numbers()
    pairs = set(zip(old.tolist(), last.tolist(), strict=True))
    assert out.n_groups == len(pairs)
    assert sorted(out.group_numbers().tolist()) == list(range(1, len(pairs) + 1))
    new = out.particle_group_numbers()
    for g in np.unique(new):
        sel = new == g
        assert len(set(old[sel])) == 1 and len(set(last[sel])) == 1
        row = out.optics.iloc[out.group_row(int(g))]
        src = ps.optics.iloc[ps.group_row(int(old[sel][0]))]
        assert row["rlnOpticsGroupName"] == f"{src['rlnOpticsGroupName']}_{last[sel][0]}"
        for col in ("rlnImagePixelSize", "rlnMagMat00", "rlnBeamTiltX", "rlnVoltage"):
            assert row[col] == src[col], col
    assert ps.optics.equals(before)


def test_regroup_by_column_and_clear_errors():
    ps = read_star(SIX)
    out = regroup_by(ps, "column:rlnRandomSubset")
    assert out.n_groups == 12  # 6 groups x 2 half sets
    with pytest.raises(ParticleDataError, match="no particle column rlnBeamShiftGroup"):
        regroup_by(ps, "column:rlnBeamShiftGroup")
    with pytest.raises(ParticleDataError, match="row 1: micrograph name .* does not match"):
        regroup_by(ps, "pattern:FoilHole_(\\d+)")
    with pytest.raises(ValueError, match="not a regular expression"):
        regroup_by(ps, "pattern:(")
    with pytest.raises(ValueError, match="expected column:NAME"):
        regroup_by(ps, "micrograph")


def test_estimate_fits_and_writes_the_new_groups(tmp_path):
    """Four beam-shift positions as micrograph-name groups of one optics group: the estimate
    fits each and writes four optics groups with their own M."""
    cfg = SimulationConfig(seed=3)
    cfg.optics_groups = [OpticsGroupConfig(pixel_size_A=1.6, box=48, n_particles=400,
                                           particles_per_micrograph=100)]  # fmt: skip
    cfg.noise.snr = 1.0
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 50.0, 1000
    cfg.render.n_workers = 1
    simulate_dataset(cfg, tmp_path / "sim", progress=False)
    ps = read_star(tmp_path / "sim" / "particles.star")
    mics = sorted(set(ps.micrographs()))
    assert len(mics) == 4
    res = cryomag.estimate(
        tmp_path / "sim" / "particles.star", tmp_path / "sim" / "ref.mrc", tmp_path / "run",
        regroup=r"pattern:mic\d*(\d)\.mrc$", progress=False, plots=False, nthreads=1,
    )  # fmt: skip
    assert len(res.groups) == 4 and res.verdict in ("ok", "warning")
    out = read_star(tmp_path / "run" / "particles.star")
    assert out.n_groups == 4
    assert all(name.startswith("opticsGroup1_") for name in out.group_names())
    mats = out.mag_matrices()
    for gr in res.groups:
        np.testing.assert_allclose(mats[out.group_row(gr.group)], gr.mag)
