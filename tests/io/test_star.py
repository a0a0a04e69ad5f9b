"""Tests of cryomag.io.star (RELION STAR read / write) and cryomag.io.atomic."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryomag.io import (
    ParticleFileError,
    ParticleFileNotFoundError,
    atomic_write,
    ensure_not_input,
    read_particles,
    read_star,
    read_star_blocks,
    write_particles,
    write_star,
)
from cryomag.io import star as star_mod
from cryomag.model.particles import ParticleDataError, ParticleSet, SourceInfo
from tests.data_paths import DATA

needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared test data folder {DATA} not found"
)

STAR_FILES = [
    "particles/relion31.star",
    "particles/empiar_10076_7.star",
    "star/relion31.6opticsgroups.star",
    "star/relion5.star",
]

RELION31 = DATA / "particles" / "relion31.star"
LEGACY = DATA / "particles" / "empiar_10076_7.star"
SIX = DATA / "star" / "relion31.6opticsgroups.star"
R5 = DATA / "star" / "relion5.star"


def _copy_with_stack(src: Path, dst_dir: Path, text: str | None = None) -> Path:
    """Copy a STAR file into dst_dir (optionally with new text), linking its stack next to it."""
    dst = dst_dir / src.name
    dst.write_text(src.read_text() if text is None else text)
    for stack in src.parent.glob(src.stem + ".mrc*"):
        link = dst_dir / stack.name
        if not link.exists():
            os.symlink(stack, link)
    return dst


def _small_set(n: int = 4) -> ParticleSet:
    rng = np.random.default_rng(1)
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
            "rlnMicrographName": ["0001", "0001", "mic two.mrc", "0002"][:n],
            "rlnOpticsGroup": [1] * n,
            "rlnDefocusU": rng.uniform(1e4, 2e4, n),
            "rlnDefocusV": rng.uniform(1e4, 2e4, n),
            "rlnDefocusAngle": np.round(rng.uniform(-180, 180, n), 6),
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": [0.0, 90.0, 1e-7, 179.999999][:n],
            "rlnAnglePsi": [-0.5, 0.5, -0.0, 1e22][:n],
            "rlnOriginXAngst": [1.0, -2.0, 3.0, -4.0][:n],
            "rlnOriginYAngst": [0.0, 0.1 + 0.2, 1 / 3, -1e-9][:n],
            "rlnClassNumber": np.arange(n),
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [1.06],
            "rlnImageSize": [64],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnMagMat00": [1.0123456789012345],
            "rlnMagMat01": [-0.0012345678901],
            "rlnMagMat10": [0.0],
            "rlnMagMat11": [0.99],
        }
    )
    return ParticleSet(parts, optics, SourceInfo())


# ------------------------------------------------------------------------- known values
@needs_data
def test_relion31_known_values():
    ps = read_star(RELION31)
    assert len(ps) == 5
    assert ps.source.star_version == "30001"
    assert ps.source.block_order == ["optics", "particles"]
    assert not ps.source.legacy and ps.source.has_poses
    assert ps.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(2.806)
    assert int(ps.optics["rlnImageSize"].iloc[0]) == 256
    assert ps.particles.shape[1] == 26  # every column kept, nothing added
    assert ps.particles["rlnImageName"].iloc[0] == "000001@relion31.mrcs"
    assert ps.particles["rlnDefocusU"].iloc[0] == pytest.approx(13108.082418)
    assert ps.particles["rlnOriginYAngst"].iloc[0] == pytest.approx(-0.64686)
    assert ps.particles["rlnLogLikeliContribution"].iloc[0] == pytest.approx(2.586789e05)
    assert ps.particles["rlnOpticsGroup"].dtype.kind == "i"


@needs_data
def test_six_optics_groups_known_values():
    ps = read_star(SIX)
    assert len(ps) == 139
    assert ps.n_groups == 6
    assert ps.source.star_version is None
    assert sorted(set(ps.optics["rlnImagePixelSize"])) == [1.24, 1.25]
    mats = ps.mag_matrices()
    assert mats.shape == (6, 2, 2)
    np.testing.assert_allclose(mats[0], [[1.011472, 0.004231], [0.004560, 1.008858]])
    assert ps.optics["rlnOddZernike"].iloc[0].startswith("[1.70554063513,")
    assert set(ps.particles["rlnOpticsGroup"]) <= set(ps.optics["rlnOpticsGroup"])
    # micrograph names such as "0003" stay strings
    assert ps.particles["rlnMicrographName"].iloc[0] == "MotionCorr/job002/Micrographs/0003.mrc"


@needs_data
def test_relion5_known_values():
    ps = read_star(R5)
    assert ps.source.star_version == "50001"
    assert len(ps) == 17
    assert ps.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(0.89)
    assert int(ps.optics["rlnImageSize"].iloc[0]) == 448
    assert "rlnMagMat00" in ps.optics.columns


@needs_data
def test_legacy_relion30_known_values():
    ps = read_star(LEGACY)
    assert ps.source.legacy
    assert len(ps) == 7 and ps.n_groups == 1
    apix = ps.optics["rlnImagePixelSize"].iloc[0]
    assert apix == pytest.approx(5 * 1e4 / 38168) and apix == pytest.approx(1.31, abs=1e-3)
    assert int(ps.optics["rlnImageSize"].iloc[0]) == 320  # from the MRC stack
    assert ps.optics["rlnVoltage"].iloc[0] == 300
    for moved in ("rlnVoltage", "rlnMagnification", "rlnDetectorPixelSize"):
        assert moved not in ps.particles.columns
    # no angles in the file: filled with 0 and flagged
    assert not ps.source.has_poses
    assert np.all(ps.euler_deg() == 0)
    assert ps.particles["rlnMicrographName"].iloc[0] == "1"


@needs_data
def test_legacy_angpix_wins():
    ps = read_star(LEGACY, angpix=1.5)
    assert ps.optics["rlnImagePixelSize"].iloc[0] == 1.5


def test_legacy_groups_and_origins(tmp_path):
    text = """data_images

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnMagnification #9
_rlnDetectorPixelSize #10
_rlnImageSize #11
_rlnAngleRot #12
_rlnAngleTilt #13
_rlnAnglePsi #14
_rlnOriginX #15
_rlnOriginY #16
1@a.mrcs m1 10000 9000 5 300 2.7 0.1 10000 5 64 10 20 30 1.5 -2
2@a.mrcs m1 10000 9000 5 300 2.7 0.1 10000 5 64 10 20 30 0 1
3@b.mrcs m2 12000 9000 5 300 2.7 0.1 20000 5 64 10 20 30 2 2
"""
    f = tmp_path / "legacy.star"
    f.write_text(text)
    ps = read_star(f)
    assert ps.n_groups == 2
    np.testing.assert_allclose(ps.optics["rlnImagePixelSize"], [5.0, 2.5])
    np.testing.assert_array_equal(ps.particles["rlnOpticsGroup"], [1, 1, 2])
    np.testing.assert_allclose(ps.particles["rlnOriginXAngst"], [7.5, 0.0, 5.0])
    np.testing.assert_allclose(ps.particles["rlnOriginYAngst"], [-10.0, 5.0, 5.0])
    assert "rlnOriginX" not in ps.particles.columns
    assert ps.source.has_poses

    out = tmp_path / "out.star"
    write_star(ps, out)
    text_out = out.read_text()
    assert text_out.startswith("# version 30001")
    assert "data_optics" in text_out and "data_particles" in text_out
    back = read_star(out)
    assert not back.source.legacy
    pd.testing.assert_frame_equal(back.particles, ps.particles)
    pd.testing.assert_frame_equal(back.optics, ps.optics)


# ------------------------------------------------------------------------- round trips
@needs_data
@pytest.mark.parametrize("name", STAR_FILES)
def test_round_trip_every_shared_star(name, tmp_path):
    ps = read_star(DATA / name)
    out = tmp_path / "out.star"
    write_star(ps, out)
    back = read_star(out)
    pd.testing.assert_frame_equal(back.particles, ps.particles)
    pd.testing.assert_frame_equal(back.optics, ps.optics)
    assert back.source.star_version == (ps.source.star_version or "30001")
    assert back.source.block_order == ps.source.block_order
    # writing is deterministic and idempotent
    out2 = tmp_path / "out2.star"
    write_star(back, out2)
    assert out2.read_bytes() == out.read_bytes()


def test_round_trip_exact_floats_strings_and_ints(tmp_path):
    ps = _small_set()
    out = tmp_path / "s.star"
    write_star(ps, out)
    back = read_star(out)
    for c in ps.particles.columns:
        np.testing.assert_array_equal(back.particles[c].to_numpy(), ps.particles[c].to_numpy())
    np.testing.assert_array_equal(back.mag_matrices(), ps.mag_matrices())
    assert back.particles["rlnMicrographName"].tolist() == ["0001", "0001", "mic two.mrc", "0002"]
    assert back.particles["rlnClassNumber"].dtype.kind == "i"
    text = out.read_text()
    assert '"mic two.mrc"' in text
    assert " 90.000000 " in text  # RELION's %.6f for values exact at 6 decimals
    assert repr(1.0123456789012345) in text  # shortest round-trip repr otherwise


@needs_data
def test_only_changed_values_change(tmp_path):
    ps = read_star(SIX)
    ps2 = ps.copy()
    ps2.particles.loc[3, "rlnDefocusU"] += 1.25
    mats = ps2.mag_matrices().copy()
    mats[2] = [[1.0123456789, 0.001], [0.002, 0.99]]
    ps2.set_mag_matrices(mats)
    out = tmp_path / "changed.star"
    write_star(ps2, out)
    back = read_star(out)
    diff = back.particles["rlnDefocusU"].to_numpy() - ps.particles["rlnDefocusU"].to_numpy()
    assert diff[3] == pytest.approx(1.25) and np.count_nonzero(diff) == 1
    np.testing.assert_array_equal(back.mag_matrices(), mats)
    pd.testing.assert_frame_equal(
        back.particles.drop(columns="rlnDefocusU"), ps.particles.drop(columns="rlnDefocusU")
    )


def test_extra_blocks_nonloop_and_order_kept(tmp_path):
    text = """# version 30001

data_general

_rlnFinalResolution 3.25
_rlnComment "two words"

# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnImageSize #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
1 og1 1.0 32 300 2.7 0.1

# version 30001

data_particles

loop_
_rlnImageName #1
_rlnOpticsGroup #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnAngleRot #6
_rlnAngleTilt #7
_rlnAnglePsi #8
  1@s.mrcs 1 1000 1000 0 1 2 3
  2@s.mrcs 1 1000 1000 0 1 2 3

# version 30001

data_model_classes

loop_
_rlnReferenceImage #1
_rlnClassDistribution #2
000001@cls.mrcs 0.5
000002@cls.mrcs 0.5
"""
    f = tmp_path / "in.star"
    f.write_text(text)
    ps = read_star(f)
    assert ps.source.block_order == ["general", "optics", "particles", "model_classes"]
    assert ps.source.nonloop_blocks == ["general"]
    # absent origins are filled with 0 and left out again on write
    assert ps.source.filled_columns == ["rlnOriginXAngst", "rlnOriginYAngst"]
    out = tmp_path / "out.star"
    write_star(ps, out)
    version, blocks, nonloop = read_star_blocks(out)
    assert version == "30001"
    assert list(blocks) == ["general", "optics", "particles", "model_classes"]
    assert nonloop == ["general"]
    assert blocks["general"]["rlnFinalResolution"].iloc[0] == 3.25
    assert blocks["general"]["rlnComment"].iloc[0] == "two words"
    assert "rlnOriginXAngst" not in blocks["particles"].columns
    pd.testing.assert_frame_equal(blocks["model_classes"], ps.source.extra_blocks["model_classes"])
    # an origin set by the caller is written
    ps.particles["rlnOriginXAngst"] = [0.5, 0.0]
    write_star(ps, tmp_path / "out2.star")
    _, blocks2, _ = read_star_blocks(tmp_path / "out2.star")
    assert blocks2["particles"]["rlnOriginXAngst"].tolist() == [0.5, 0.0]


def test_memory_set_written_with_default_version(tmp_path):
    out = tmp_path / "mem.star"
    write_particles(_small_set(), out)
    assert out.read_text().startswith("# version 30001\n")
    assert len(read_particles(out)) == 4


def test_write_speed_smoke(tmp_path):
    """1e5 rows write well under a few seconds (1e6 rows: see bench/bench_star_write.py)."""
    n = 100_000
    base = _small_set(4)
    parts = base.particles.iloc[np.arange(n) % 4].reset_index(drop=True)
    parts["rlnDefocusU"] = np.linspace(1e4, 2e4, n)
    ps = ParticleSet(parts, base.optics, SourceInfo())
    t0 = time.perf_counter()
    write_star(ps, tmp_path / "big.star")
    assert time.perf_counter() - t0 < 5.0
    back = read_star(tmp_path / "big.star")
    np.testing.assert_array_equal(back.particles["rlnDefocusU"], parts["rlnDefocusU"])


# ------------------------------------------------------------------------------ errors
def _broken(tmp_path: Path, old: str, new: str, src: Path = RELION31) -> Path:
    text = src.read_text()
    assert old in text
    return _copy_with_stack(src, tmp_path, text.replace(old, new, 1))


def test_missing_file(tmp_path):
    with pytest.raises(ParticleFileNotFoundError, match="not found") as err:
        read_star(tmp_path / "nope.star")
    assert isinstance(err.value, FileNotFoundError)
    assert isinstance(err.value, ParticleDataError)


def test_no_particles_block(tmp_path):
    f = tmp_path / "mics.star"
    f.write_text("data_micrographs\n\nloop_\n_rlnMicrographName #1\na.mrc\n")
    with pytest.raises(ParticleFileError, match=r"mics\.star: no particle block"):
        read_star(f)


@needs_data
def test_missing_required_column(tmp_path):
    f = _broken(tmp_path, "_rlnDefocusU #7", "_rlnSomethingElse #7")
    with pytest.raises(ParticleDataError, match=r"relion31\.star.*rlnDefocusU.*defocus U in A"):
        read_star(f)


@needs_data
@pytest.mark.parametrize("bad", ["abc", "nan", "inf", "-inf"])
def test_non_numeric_or_non_finite_required_value(tmp_path, bad):
    f = _broken(tmp_path, "12730.825404", bad)  # rlnDefocusU of row 3
    with pytest.raises(
        ParticleDataError, match=r"relion31\.star: particle row 3, column rlnDefocusU"
    ):
        read_star(f)


@needs_data
def test_undefined_optics_group(tmp_path):
    f = _broken(tmp_path, "000002@relion31.mrcs            1", "000002@relion31.mrcs            7")
    with pytest.raises(ParticleDataError, match=r"optics group\(s\) \[7\]"):
        read_star(f)


@needs_data
def test_non_square_image_size(tmp_path):
    f = _broken(tmp_path, "          256            2", "      256,128            2")
    with pytest.raises(ParticleFileError, match="non-square boxes are unsupported"):
        read_star(f)


def test_non_square_image_size_xy(tmp_path):
    f = tmp_path / "xy.star"
    f.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSizeX\n"
        "_rlnImageSizeY\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
        "1 1.0 64 32 300 2.7 0.1\n\ndata_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n"
        "_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n1@a.mrcs 1 1 1 0\n"
    )
    with pytest.raises(ParticleFileError, match="rlnImageSizeY = 32.*non-square"):
        read_star(f)


def test_legacy_non_square_stack(tmp_path):
    import mrcfile

    with mrcfile.new(tmp_path / "rect.mrcs") as m:
        m.set_data(np.zeros((2, 32, 64), np.float32))
    f = tmp_path / "legacy.star"
    f.write_text(
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnMagnification\n"
        "_rlnDetectorPixelSize\n1@rect.mrcs 1 1 0 300 2.7 0.1 10000 5\n"
    )
    with pytest.raises(ParticleFileError, match=r"64 x 32 pixels.*non-square"):
        read_star(f)


def test_legacy_without_pixel_size(tmp_path):
    f = tmp_path / "legacy.star"
    f.write_text(
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImageSize\n"
        "1@a.mrcs 1 1 0 300 2.7 0.1 64\n"
    )
    with pytest.raises(ParticleFileError, match="--angpix"):
        read_star(f)
    assert read_star(f, angpix=2.0).optics["rlnImagePixelSize"].iloc[0] == 2.0


@needs_data
def test_row_with_too_few_values(tmp_path):
    f = _broken(tmp_path, "0.385262            1 \n", "0.385262\n")
    with pytest.raises(ParticleFileError, match=r"row 5: has 25 values, expected 26"):
        read_star(f)


@needs_data
def test_row_with_too_many_values(tmp_path):
    f = _broken(tmp_path, "0.385262            1 \n", "0.385262            1 9 \n")
    with pytest.raises(ParticleFileError, match=r"relion31\.star: block data_particles"):
        read_star(f)


def test_unknown_suffix(tmp_path):
    with pytest.raises(ParticleFileError, match=r"expected \.star or \.cs"):
        read_particles(tmp_path / "x.txt")
    with pytest.raises(ParticleFileError, match=r"expected \.star or \.cs"):
        write_particles(_small_set(), tmp_path / "x.json")


# ------------------------------------------------------------------------------ atomic
def test_atomic_write_success_and_failure(tmp_path):
    dest = tmp_path / "a.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(dest) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".txt"
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_write(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_write_star_failure_leaves_no_file(tmp_path, monkeypatch):
    def fail(fh, df):
        fh.write(b"half a row")
        raise RuntimeError("disk full")

    monkeypatch.setattr(star_mod, "_write_rows", fail)
    dest = tmp_path / "out.star"
    with pytest.raises(RuntimeError, match="disk full"):
        write_star(_small_set(), dest)
    assert list(tmp_path.iterdir()) == []


def test_invalid_set_is_not_written(tmp_path):
    ps = _small_set()
    ps.particles.loc[1, "rlnDefocusV"] = np.nan
    with pytest.raises(ParticleDataError, match="row 2, column rlnDefocusV"):
        write_star(ps, tmp_path / "out.star")
    assert list(tmp_path.iterdir()) == []


@needs_data
def test_refuses_to_overwrite_input(tmp_path):
    f = _copy_with_stack(RELION31, tmp_path)
    before = f.read_bytes()
    ps = read_star(f)
    with pytest.raises(ParticleFileError, match="refusing to overwrite an input"):
        write_star(ps, f)
    # also through another name of the same file
    link = tmp_path / "hard.star"
    os.link(f, link)
    with pytest.raises(ParticleFileError, match="refusing to overwrite"):
        write_star(ps, link)
    assert f.read_bytes() == before


def test_ensure_not_input(tmp_path):
    a = tmp_path / "a"
    a.write_text("x")
    ensure_not_input(tmp_path / "b", [a, None])
    with pytest.raises(ParticleFileError):
        ensure_not_input(tmp_path / "." / "a", [a])
    os.symlink(a, tmp_path / "sym")
    with pytest.raises(ParticleFileError):
        ensure_not_input(tmp_path / "sym", [a])


@needs_data
def test_angpix_ignored_with_optics_table():
    with pytest.warns(UserWarning, match=r"angpix=2\.0 ignored"):
        ps = read_star(RELION31, angpix=2.0)
    assert ps.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(2.806)
