"""Tests of cryomag.io.mrc (ImageSource, write_stack, read_map)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryomag.io import (
    ImageSource,
    ParticleFileError,
    ParticleFileNotFoundError,
    read_cs,
    read_map,
    read_star,
    stack_shape,
    write_cs,
    write_stack,
)
from cryomag.model.particles import ParticleSet, SourceInfo
from tests.data_paths import DATA

needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared test data folder {DATA} not found"
)
RELION31 = DATA / "particles" / "relion31.star"
LEGACY = DATA / "particles" / "empiar_10076_7.star"
MAP = DATA / "map" / "emd_6824.mrc"


def _set(
    names: list[str],
    box: int = 16,
    apix: float = 2.0,
    star: Path | None = None,
    groups: list[int] | None = None,
    optics_boxes: list[int] | None = None,
) -> ParticleSet:
    n = len(names)
    groups = groups or [1] * n
    optics_boxes = optics_boxes or [box]
    parts = pd.DataFrame(
        {
            "rlnImageName": names,
            "rlnOpticsGroup": groups,
            "rlnDefocusU": [1e4] * n,
            "rlnDefocusV": [1e4] * n,
            "rlnDefocusAngle": [0.0] * n,
            "rlnAngleRot": [0.0] * n,
            "rlnAngleTilt": [0.0] * n,
            "rlnAnglePsi": [0.0] * n,
            "rlnOriginXAngst": [0.0] * n,
            "rlnOriginYAngst": [0.0] * n,
        }
    )
    g = len(optics_boxes)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, g + 1),
            "rlnImagePixelSize": [apix] * g,
            "rlnImageSize": optics_boxes,
            "rlnVoltage": [300.0] * g,
            "rlnSphericalAberration": [2.7] * g,
            "rlnAmplitudeContrast": [0.1] * g,
        }
    )
    src = SourceInfo(path=star, kind="star") if star is not None else SourceInfo()
    return ParticleSet(parts, optics, src)


def _stack(path: Path, n: int = 5, box: int = 16, apix: float = 2.0, seed: int = 0) -> np.ndarray:
    imgs = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    write_stack(path, imgs, apix)
    return imgs


# --------------------------------------------------------------------------- real images
@needs_data
def test_read_relion31_images_with_star_pixel_size():
    ps = read_star(RELION31)
    with pytest.warns(UserWarning, match=r"header pixel size 1 A differs .* 2\.806 A") as rec:
        src = ImageSource(ps)
        imgs = src.read([4, 0, 2])
        src.read([1, 3])  # second read: no second warning
    assert len([w for w in rec if "header pixel size" in str(w.message)]) == 1
    assert imgs.shape == (3, 256, 256) and imgs.dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this stack has no MAP id / machine stamp
        with mrcfile.mmap(DATA / "particles" / "relion31.mrcs", permissive=True) as m:
            ref = np.array(m.data)
    np.testing.assert_array_equal(imgs, ref[[4, 0, 2]])
    assert src.box == 256
    assert src.path_of(0) == DATA / "particles" / "relion31.mrcs"
    # pickling for workers drops the open files and reopens them
    src2 = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(src2.read_one(4), ref[4])
    src.close()


@needs_data
def test_read_legacy_images():
    ps = read_star(LEGACY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # header pixel size 0 = unset: no warning
        imgs = ImageSource(ps).read(np.arange(7))
    assert imgs.shape == (7, 320, 320)
    assert stack_shape(DATA / "particles" / "empiar_10076_7.mrc") == (7, 320, 320)


# --------------------------------------------------------------------------- synthetic
def test_write_stack_and_read_back(tmp_path):
    imgs = _stack(tmp_path / "s.mrcs", n=4, box=16, apix=1.7)
    with mrcfile.open(tmp_path / "s.mrcs") as m:
        assert m.voxel_size.x == pytest.approx(1.7)
        assert m.is_image_stack()
    star = tmp_path / "p.star"
    ps = _set([f"{i:06d}@s.mrcs" for i in (3, 1, 4, 2)], box=16, apix=1.7, star=star)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ImageSource(ps).read([0, 1, 2, 3])
    np.testing.assert_array_equal(got, imgs[[2, 0, 3, 1]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mrcs"]  # no temp files


def test_write_stack_refuses_input(tmp_path):
    _stack(tmp_path / "s.mrcs")
    with pytest.raises(ParticleFileError, match="refusing to overwrite"):
        write_stack(tmp_path / "s.mrcs", np.zeros((1, 16, 16)), 1.0, inputs=[tmp_path / "s.mrcs"])


def test_resolution_cwd_then_star_folder(tmp_path, monkeypatch):
    """As RELION: a relative name resolves from the working directory (the project folder)
    first, then beside the STAR file; a name found in both warns, naming both files.
    (Until issue 15 the STAR folder won silently.)"""
    (tmp_path / "proj").mkdir()
    (tmp_path / "work").mkdir()
    imgs = _stack(tmp_path / "work" / "s.mrcs", n=2)
    ps = _set(["1@s.mrcs", "2@s.mrcs"], star=tmp_path / "proj" / "p.star")
    with pytest.raises(ParticleFileNotFoundError, match=r"particle row 1: image stack s\.mrcs not"):
        ImageSource(ps).read([0])
    monkeypatch.chdir(tmp_path / "work")
    np.testing.assert_array_equal(ImageSource(ps).read([1, 0]), imgs[[1, 0]])
    # the working directory wins over the STAR folder, with a warning naming both
    other = _stack(tmp_path / "proj" / "s.mrcs", n=2, seed=5)
    with pytest.warns(UserWarning, match=r"using .*work/s\.mrcs, but .*proj/s\.mrcs also exists"):
        src = ImageSource(ps)
    np.testing.assert_array_equal(src.read([0]), imgs[[0]])
    # without the working directory's copy, the STAR folder's is used (no warning)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(ImageSource(ps).read([0]), other[[0]])
    # explicit search folders come first
    with pytest.warns(UserWarning, match="also exists"):
        src = ImageSource(ps, search_dirs=[tmp_path / "work"])
    np.testing.assert_array_equal(src.read([0]), imgs[[0]])


def test_cs_images_resolved_from_project_folder(tmp_path):
    proj = tmp_path / "P1"
    (proj / "J3").mkdir(parents=True)
    (proj / "J1").mkdir()
    imgs = _stack(proj / "J1" / "stack.mrcs", n=3, box=16, apix=2.0)
    ps = _set(["1@J1/stack.mrcs", "3@J1/stack.mrcs"], box=16, apix=2.0)
    write_cs(ps, proj / "J3" / "particles.cs")
    ps_cs = read_cs(proj / "J3" / "particles.cs")
    np.testing.assert_array_equal(ImageSource(ps_cs).read([0, 1]), imgs[[0, 2]])


def test_index_out_of_range(tmp_path):
    _stack(tmp_path / "s.mrcs", n=5)
    ps = _set(["1@s.mrcs", "9@s.mrcs"], star=tmp_path / "p.star")
    with pytest.raises(
        ParticleFileError, match=r"s\.mrcs: stack has 5 images, particle row 2 asks for image 9"
    ):
        ImageSource(ps).read([0, 1])
    with pytest.raises(IndexError):
        ImageSource(ps).read([2])


def test_truncated_stack(tmp_path):
    _stack(tmp_path / "full.mrcs", n=5, box=16)
    data = (tmp_path / "full.mrcs").read_bytes()
    (tmp_path / "cut.mrcs").write_bytes(data[: len(data) - 100])
    ps = _set(["1@cut.mrcs"], star=tmp_path / "p.star")
    with pytest.raises(
        ParticleFileError, match=r"cut\.mrcs: truncated MRC file: header promises 5"
    ):
        ImageSource(ps).read([0])
    (tmp_path / "tiny.mrcs").write_bytes(data[:500])
    with pytest.raises(ParticleFileError, match="shorter than the 1024-byte header"):
        stack_shape(tmp_path / "tiny.mrcs")


def test_wrong_box_vs_optics(tmp_path):
    _stack(tmp_path / "s.mrcs", n=2, box=16)
    ps = _set(["1@s.mrcs"], box=32, star=tmp_path / "p.star")
    with pytest.raises(
        ParticleFileError,
        match=r"16 x 16 pixels but particle row 1 is in optics group 1 with rlnImageSize 32",
    ):
        ImageSource(ps).read([0])


def test_non_square_stack(tmp_path):
    with mrcfile.new(tmp_path / "rect.mrcs") as m:
        m.set_data(np.zeros((2, 16, 8), np.float32))
    ps = _set(["1@rect.mrcs"], star=tmp_path / "p.star")
    with pytest.raises(ParticleFileError, match=r"8 x 16 pixels.*non-square boxes are unsupported"):
        ImageSource(ps).read([0])


def test_mixed_boxes_in_one_read(tmp_path):
    _stack(tmp_path / "a.mrcs", n=1, box=16)
    _stack(tmp_path / "b.mrcs", n=1, box=8)
    ps = _set(
        ["1@a.mrcs", "1@b.mrcs"], star=tmp_path / "p.star", groups=[1, 2], optics_boxes=[16, 8]
    )
    src = ImageSource(ps)
    assert src.read([0]).shape == (1, 16, 16) and src.read([1]).shape == (1, 8, 8)
    with pytest.raises(ParticleFileError, match="read each box size separately"):
        src.read([0, 1])


def test_bad_image_name(tmp_path):
    ps = _set(["x@s.mrcs"], star=tmp_path / "p.star")
    with pytest.raises(ParticleFileError, match="particle row 1, column rlnImageName"):
        ImageSource(ps)


# ------------------------------------------------------------------------------- maps
@needs_data
def test_read_map_real():
    vol, apix = read_map(MAP)
    assert vol.shape == (70, 70, 70) and vol.dtype == np.float32
    assert apix == 2.64
    assert read_map(MAP, pixel_size_A=1.5)[1] == 1.5


def test_read_map_errors(tmp_path):
    # (maps with density: an all-zero map is refused since issue 15, test_validation.py)
    with mrcfile.new(tmp_path / "box.mrc") as m:
        m.set_data(np.ones((10, 12, 12), np.float32))
        m.voxel_size = 1.0
    with pytest.raises(
        ParticleFileError, match=r"12 x 12 x 10 voxels; non-cubic maps are unsupported"
    ):
        read_map(tmp_path / "box.mrc")
    with mrcfile.new(tmp_path / "nopix.mrc") as m:
        m.set_data(np.arange(512, dtype=np.float32).reshape(8, 8, 8))
    with pytest.raises(ParticleFileError, match="no voxel size"):
        read_map(tmp_path / "nopix.mrc")
    assert read_map(tmp_path / "nopix.mrc", pixel_size_A=2.0)[1] == 2.0
    with pytest.raises(ParticleFileNotFoundError):
        read_map(tmp_path / "missing.mrc")


def test_relion_project_layout(tmp_path, monkeypatch):
    """A STAR two levels below the project folder finds project-relative stacks."""
    job = tmp_path / "proj" / "Refine3D" / "job001"
    job.mkdir(parents=True)
    (tmp_path / "proj" / "Extract").mkdir()
    imgs = _stack(tmp_path / "proj" / "Extract" / "s.mrcs", n=2)
    monkeypatch.chdir(tmp_path)
    ps = _set(["2@Extract/s.mrcs"], star=job / "run_data.star")
    np.testing.assert_array_equal(ImageSource(ps).read(0), imgs[[1]])
    assert ImageSource(ps).read([]).shape == (0, 16, 16)
