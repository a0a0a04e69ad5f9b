"""RELION 5 reads cryomag's output STAR and keeps its cmag* columns (relion_star_handler).

Needs a RELION 5 build: set RELION5_BIN to the folder holding relion_star_handler (e.g.
``RELION5_BIN=/path/to/relion/build/bin pytest -m slow tests/test_relion5_compat.py``).
Marked slow and skipped without it: RELION is not a CI dependency. bench/check_relion5.sh
runs the fuller check (split / combine, relion_reconstruct, the real test file).

RELION keeps labels it does not know as the text it read, so cmag* values must come back
identical; its own double labels are rewritten in its print format (%12.6f, %12.5f when
negative, %12.6e / %12.5e below 1e-3 or above 1e5), which is what they are compared against.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cryomag
from cryomag.io import read_star_blocks
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset

RELION5_BIN = os.environ.get("RELION5_BIN", "")
STAR_HANDLER = Path(RELION5_BIN) / "relion_star_handler"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (RELION5_BIN and STAR_HANDLER.is_file()),
        reason="RELION5_BIN does not point at a folder with relion_star_handler",
    ),
]


def relion_text(v: float) -> str:
    """``v`` as RELION 5 writes a double label (MetaDataTable::getValueToString)."""
    if (0.0 < abs(v) < 0.001) or abs(v) > 100000.0:
        s = f"{v:12.5e}" if v < 0 else f"{v:12.6e}"
    else:
        s = f"{v:12.5f}" if v < 0 else f"{v:12.6f}"
    return s[:12]


@pytest.fixture(scope="module")
def estimated(tmp_path_factory) -> Path:
    """est/particles.star of a 200-particle box-48 simulation, fitted with every local model."""
    tmp = tmp_path_factory.mktemp("relion5")
    cfg = SimulationConfig(seed=5)
    cfg.optics_groups = [
        OpticsGroupConfig(
            pixel_size_A=1.6, aniso=[1.01, 0.99, 30.0], box=48, n_particles=200,
            particles_per_micrograph=40,
        )
    ]  # fmt: skip
    cfg.defocus.min_um, cfg.defocus.max_um = 0.3, 1.2
    cfg.magnification.kappa_pct_per_um = 1.0
    cfg.magnification.mic_iso_std_pct = 0.5
    cfg.noise.snr = 1.0
    cfg.phantom.diameter_A = 50.0
    cfg.phantom.n_atoms = 1000
    simulate_dataset(cfg, tmp / "sim", progress=False)
    cryomag.estimate(
        tmp / "sim" / "particles.star",
        tmp / "sim" / "ref.mrc",
        tmp / "est",
        fit=("scale", "aniso", "particle", "micrograph", "defocus"),
        progress=False,
        plots=False,
    )
    return tmp / "est" / "particles.star"


def numeric(col) -> np.ndarray | None:
    try:
        return np.asarray(col, dtype=float)
    except (TypeError, ValueError):
        return None


def star_handler(*args: str) -> str:
    r = subprocess.run(
        [str(STAR_HANDLER), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def assert_kept(fin: Path, fout: Path, may_drop: tuple[str, ...] = ()) -> None:
    _, a_blocks, _ = read_star_blocks(fin)
    _, b_blocks, _ = read_star_blocks(fout)
    for name, a in a_blocks.items():
        b = b_blocks[name]
        assert len(b) == len(a), name
        lost = [c for c in a.columns if c not in b.columns and c not in may_drop]
        assert not lost, f"data_{name}: RELION dropped {lost}"
        for c in a.columns:
            if c not in b.columns:
                continue
            x, y = numeric(a[c]), numeric(b[c])
            if x is None or y is None:  # text column
                assert np.array_equal(a[c].astype(str), b[c].astype(str)), c
                continue
            assert np.array_equal(np.isnan(x), np.isnan(y)), c
            ok = ~np.isnan(x)
            if c.startswith("cmag"):
                np.testing.assert_allclose(y[ok], x[ok], rtol=1e-6, atol=0, err_msg=c)
            else:
                pairs = zip(x[ok], y[ok], strict=True)
                expected = [v if v == w else float(relion_text(v)) for v, w in pairs]
                assert np.array_equal(y[ok], expected), c


def test_cryomag_output_has_cmag_columns(estimated):
    _, blocks, _ = read_star_blocks(estimated)
    cols = set(blocks["particles"].columns)
    for c in (
        "cmagScale",
        "cmagParticleMag",
        "cmagParticleMagRaw",
        "cmagParticleMagError",
        "cmagParticleMagMat00",
        "cmagParticleMagMat11",
        "cmagMicrographMag",
        "cmagDefocusMag",
    ):
        assert c in cols


def test_star_handler_select_keeps_cmag_columns(estimated, tmp_path):
    log = star_handler(
        "--i", str(estimated), "--o", str(tmp_path / "select.star"),
        "--select", "rlnDefocusU", "--minval", "0", "--maxval", "1e9",
    )  # fmt: skip
    assert "ignoring unknown label" not in log
    assert_kept(estimated, tmp_path / "select.star")


def test_star_handler_split_and_combine_keep_cmag_columns(estimated, tmp_path):
    star_handler(
        "--i", str(estimated), "--o", str(tmp_path / "s.star"), "--split", "--nr_split", "2"
    )
    halves = sorted(tmp_path.glob("s_split*.star"))
    assert len(halves) == 2
    star_handler("--combine", "--i", " ".join(map(str, halves)), "--o", str(tmp_path / "c.star"))
    # --combine removes RELION's rlnGroupNumber on purpose (star_handler.cpp)
    assert_kept(estimated, tmp_path / "c.star", may_drop=("rlnGroupNumber",))
