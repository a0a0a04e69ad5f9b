"""Issue 15, "no silent wrong results": the validation layer at input (cryomag.model.validation
and the readers), images and maps (cryomag.io.mrc), merge of STAR + .cs, STAR rows, error
messages and the options of apply / estimate / reconstruct."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import cryomag
from cryomag.cli.main import app
from cryomag.io import (
    ImageSource,
    ParticleFileError,
    load_cs_array,
    read_cs,
    read_map,
    read_particles,
    read_star,
    write_cs,
    write_stack,
    write_star,
)
from cryomag.io.mrc import check_map_values
from cryomag.model.particles import ParticleDataError, ParticleSet, SourceInfo
from cryomag.model.validation import DataWarning, validation_limits
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset
from tests.data_paths import DATA

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not found")

OPTICS_LABELS = [
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMagMat00",
    "rlnMagMat01",
    "rlnMagMat10",
    "rlnMagMat11",
]
OPTICS_ROW = ["1", "og1", "2.0", "32", "300", "2.7", "0.1", "1.0", "0.0", "0.0", "1.0"]
PARTICLE_LABELS = [
    "rlnImageName",
    "rlnMicrographName",
    "rlnOpticsGroup",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnRandomSubset",
]


def _particle_row(i: int) -> list[str]:
    return [
        f"{i + 1:06d}@s.mrcs",
        f"mic{i // 2}",
        "1",
        f"{10000 + 100 * i}",
        f"{9800 + 100 * i}",
        "12.5",
        "0",
        "0",
        "1",
        f"{10 * i}",
        "90",
        "-30",
        "1.5",
        "-0.5",
        f"{i % 2 + 1}",
    ]


def star_text(
    particle_edit: dict | None = None,
    optics_edit: dict | None = None,
    n: int = 4,
    drop: tuple = (),
) -> str:
    """A valid RELION 3.1 STAR; ``particle_edit`` {(row0, label): text}, ``optics_edit``
    {label: text} replace values, ``drop`` removes labels."""
    plabels = [lab for lab in PARTICLE_LABELS if lab not in drop]
    olabels = [lab for lab in OPTICS_LABELS if lab not in drop]
    orow = dict(zip(OPTICS_LABELS, OPTICS_ROW, strict=True))
    orow.update(optics_edit or {})
    lines = ["# version 30001", "", "data_optics", "", "loop_"]
    lines += [f"_{lab} #{i + 1}" for i, lab in enumerate(olabels)]
    lines += [" ".join(orow[lab] for lab in olabels), "", "", "# version 30001", ""]
    lines += ["data_particles", "", "loop_"]
    lines += [f"_{lab} #{i + 1}" for i, lab in enumerate(plabels)]
    for i in range(n):
        row = dict(zip(PARTICLE_LABELS, _particle_row(i), strict=True))
        for (r, lab), v in (particle_edit or {}).items():
            if r == i:
                row[lab] = v
        lines.append(" ".join(row[lab] for lab in plabels))
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, text: str, name: str = "p.star") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


# ------------------------------------------------------------------- the rule table
def test_valid_template_reads(tmp_path):
    ps = read_star(write(tmp_path, star_text()))
    assert len(ps) == 4


@pytest.mark.parametrize(
    ("label", "value", "expected"),
    [
        ("rlnDefocusU", "nan", "not a finite number"),
        ("rlnDefocusV", "inf", "not a finite number"),
        ("rlnDefocusU", "300000", r"\|defocus\| <= 200000 A \(20 um\)"),
        ("rlnDefocusAngle", "abc", "not a number"),
        ("rlnPhaseShift", "nan", "not a finite number"),
        ("rlnCtfBfactor", "nan", "not a finite number"),
        ("rlnCtfBfactor", "-1e6", "-500 to 500"),
        ("rlnCtfScalefactor", "nan", "not a finite number"),
        ("rlnCtfScalefactor", "0", r"1e-6 <= \|value\|"),
        ("rlnCtfScalefactor", "1e-30", r"1e-6 <= \|value\|"),
        ("rlnPhaseShift", "1e300", "-360 to 360"),
        ("rlnCtfScalefactor", "1e30", r"\|value\| <= 100"),
        ("rlnAngleRot", "nan", "not a finite number"),
        ("rlnAngleTilt", "-inf", "not a finite number"),
        ("rlnAnglePsi", "nan", "not a finite number"),
        ("rlnOriginXAngst", "nan", "not a finite number"),
        ("rlnOriginYAngst", "1e9", r"within the box, \|origin\| <= 64 A"),
        ("rlnRandomSubset", "3", "half set, 1 or 2"),
        ("rlnRandomSubset", "nan", "not a finite number"),
        ("rlnOpticsGroup", "1.5", "integer >= 1"),
    ],
)
def test_bad_particle_value_names_file_row_column(tmp_path, label, value, expected):
    f = write(tmp_path, star_text({(2, label): value}))
    with pytest.raises(ParticleDataError) as err:
        read_star(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}: particle row 3, column {label}: value "), msg
    assert "expected" in msg
    import re

    assert re.search(expected, msg), msg


@pytest.mark.parametrize(
    ("label", "value", "expected"),
    [
        ("rlnVoltage", "0", "voltage in kV, 20 to 3000"),
        ("rlnVoltage", "-300", "voltage in kV, 20 to 3000"),
        ("rlnVoltage", "nan", "not a finite number"),
        ("rlnSphericalAberration", "-2.7", "--allow-negative-cs"),
        ("rlnAmplitudeContrast", "1", r">= 0 and < 1"),
        ("rlnAmplitudeContrast", "-0.1", r">= 0 and < 1"),
        ("rlnImagePixelSize", "0", "pixel size in A, > 0"),
        ("rlnImagePixelSize", "-1.5", "pixel size in A, > 0"),
        ("rlnImageSize", "0", "box size in pixels"),
        ("rlnImageSize", "31.5", "box size in pixels"),
        ("rlnMagMat00", "nan", "not a finite number"),
        ("rlnMagMat00", "-1", "determinant"),
        ("rlnMagMat10", "-2.5", "anisotropy of at most 1.5"),
        ("rlnMagMat11", "1e300", "determinant"),
    ],
)
def test_bad_optics_value_names_file_row_column(tmp_path, label, value, expected):
    f = write(tmp_path, star_text(optics_edit={label: value}))
    with pytest.raises(ParticleDataError) as err:
        read_star(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}: optics row 1, column"), msg
    assert label in msg or "rlnMagMat" in msg
    import re

    assert re.search(expected, msg), msg


def test_negative_cs_needs_the_override(tmp_path):
    f = write(tmp_path, star_text(optics_edit={"rlnSphericalAberration": "-0.01"}))
    with pytest.raises(ParticleDataError, match="Cs corrector"):
        read_particles(f)
    ps = read_particles(f, allow_negative_cs=True)
    assert ps.optics_value("rlnSphericalAberration")[0] == -0.01
    # the limits stay with the set: writing and validating again accept it
    write_star(ps, tmp_path / "out.star")
    ps.copy().validate()
    with validation_limits(allow_negative_cs=True):
        assert read_star(tmp_path / "out.star").limits.allow_negative_cs
    # and on the command line
    r = CliRunner().invoke(app, ["inspect", str(f)])
    assert r.exit_code == 1 and "--allow-negative-cs" in r.output
    r = CliRunner().invoke(app, ["inspect", str(f), "--allow-negative-cs"])
    assert r.exit_code == 0, r.output


def test_defocus_override(tmp_path):
    f = write(tmp_path, star_text({(0, "rlnDefocusU"): "250000"}))
    with pytest.raises(ParticleDataError, match="--max-defocus"):
        read_particles(f)
    assert read_particles(f, max_defocus_um=30).column("rlnDefocusU")[0] == 250000
    r = CliRunner().invoke(app, ["inspect", str(f), "--max-defocus", "30"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["inspect", str(f), "--max-defocus", "-1"])
    assert r.exit_code == 1 and "--max-defocus" in r.output


def test_absent_optional_columns_keep_neutral_defaults(tmp_path):
    drop = ("rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnRandomSubset")
    ps = read_star(write(tmp_path, star_text(drop=drop)))
    np.testing.assert_array_equal(ps.column("rlnPhaseShift"), 0.0)
    np.testing.assert_array_equal(ps.column("rlnCtfBfactor"), 0.0)
    np.testing.assert_array_equal(ps.column("rlnCtfScalefactor"), 1.0)
    np.testing.assert_array_equal(ps.half_sets(), [1, 2, 1, 2])


def test_one_origin_without_the_other(tmp_path):
    with pytest.raises(ParticleFileError, match="has rlnOriginXAngst but no rlnOriginYAngst"):
        read_star(write(tmp_path, star_text(drop=("rlnOriginYAngst",))))
    ps = read_star(write(tmp_path, star_text(drop=("rlnOriginYAngst", "rlnOriginXAngst"))))
    np.testing.assert_array_equal(ps.origin_A(), 0.0)  # neither: no poses yet, zeros


def test_partial_or_degenerate_magnification_matrix(tmp_path):
    f = write(tmp_path, star_text(drop=("rlnMagMat11",)))
    with pytest.raises(ParticleDataError, match="but not rlnMagMat11"):
        read_star(f)
    f = write(tmp_path, star_text(optics_edit={"rlnMagMat00": "0", "rlnMagMat11": "0"}))
    with pytest.raises(ParticleDataError, match="determinant 0"):
        read_star(f)


def test_duplicate_optics_group(tmp_path):
    text = star_text().replace(
        " ".join(OPTICS_ROW), " ".join(OPTICS_ROW) + "\n" + " ".join(OPTICS_ROW)
    )
    with pytest.raises(ParticleDataError, match="defines optics group 1 more than once"):
        read_star(write(tmp_path, text))


def test_in_memory_set_is_validated_by_writers(tmp_path):
    ps = read_star(write(tmp_path, star_text()))
    ps.particles.loc[1, "rlnCtfBfactor"] = np.nan
    with pytest.raises(ParticleDataError, match="<memory>|p.star: particle row 2, column rlnCtf"):
        write_star(ps, tmp_path / "o.star")
    assert not (tmp_path / "o.star").exists()
    with pytest.raises(ParticleDataError, match="particle row 2, column rlnCtfBfactor"):
        write_cs(ps, tmp_path / "o.cs")


def test_legacy_star_optics_values_checked_per_particle(tmp_path):
    f = write(
        tmp_path,
        "data_\nloop_\n_rlnImageName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnImageSize\n"
        "1@a.mrcs 1 1 0 300 2.7 0.1 64\n2@a.mrcs 1 1 0 0 2.7 0.1 64\n",
    )
    with pytest.raises(ParticleDataError, match=r"particle row 2, column rlnVoltage: value 0"):
        read_star(f, angpix=1.0)
    with pytest.raises(ValueError, match="--angpix"):
        read_star(f, angpix=-1.0)


# ------------------------------------------------------------------------ .cs files
def _cs_file(tmp_path: Path, edit=None) -> Path:
    ps = read_star(write(tmp_path, star_text()))
    write_cs(ps, tmp_path / "p.cs")
    arr = np.array(load_cs_array(tmp_path / "p.cs"), copy=True)
    if edit:
        edit(arr)
    with open(tmp_path / "q.cs", "wb") as fh:
        np.save(fh, arr)
    return tmp_path / "q.cs"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("ctf/accel_kv", 0.0, r"particle row 2, column rlnVoltage \(ctf/accel_kv\): value 0"),
        ("ctf/cs_mm", -2.0, r"column rlnSphericalAberration \(ctf/cs_mm\).*negative"),
        ("ctf/amp_contrast", 1.5, r"column rlnAmplitudeContrast \(ctf/amp_contrast\)"),
        ("blob/psize_A", np.nan, r"column rlnImagePixelSize \(blob/psize_A\)"),
        ("ctf/df1_A", np.nan, r"particle row 2, column rlnDefocusU \(ctf/df1_A\)"),
        ("alignments3D/alpha", np.nan, r"column rlnCtfScalefactor \(alignments3D/alpha\)"),
        ("alignments3D/shift", np.inf, r"particle row 2, field alignments3D/shift"),
        ("alignments3D/pose", np.nan, r"particle row 2, field alignments3D/pose"),
    ],
)
def test_bad_cs_value_names_row_and_field(tmp_path, field, value, expected):
    def edit(arr):
        arr[field][1] = value

    f = _cs_file(tmp_path, edit)
    with pytest.raises(ParticleDataError, match=expected) as err:
        read_cs(f)
    assert str(err.value).startswith(str(f))


def test_cs_anisomag_checked(tmp_path):
    ps = read_star(write(tmp_path, star_text()))
    ps.set_mag_matrices(np.array([[[1.01, 0.0], [0.0, 0.99]]]))
    write_cs(ps, tmp_path / "m.cs")
    arr = np.array(load_cs_array(tmp_path / "m.cs"), copy=True)
    for row, value, msg in (
        (0, [np.nan, 0, 0, 0], r"particle row 1, field ctf/anisomag.*not finite"),
        (3, [-2.0, 0, 0, 0], r"particle row 4, field ctf/anisomag.*determinant"),  # det < 0
    ):
        a = arr.copy()
        a["ctf/anisomag"][row] = value
        with open(tmp_path / "bad.cs", "wb") as fh:
            np.save(fh, a)
        with pytest.raises(ParticleDataError, match=msg):
            read_cs(tmp_path / "bad.cs")


# ------------------------------------------------------------------------- STAR rows
@pytest.mark.parametrize("row", [0, 2])
@pytest.mark.parametrize(("extra", "count"), [(" 7", 16), (" 7 8", 17), (None, 14)])
def test_wrong_value_count_in_any_row(tmp_path, row, extra, count):
    """An extra (or missing) value in the FIRST row gives the same error as in later rows
    (until issue 15 pandas dropped the first row's extra values silently)."""
    text = star_text().splitlines()
    first = next(i for i, ln in enumerate(text) if ln.startswith("000001@"))
    line = text[first + row]
    text[first + row] = line + extra if extra else line.rsplit(" ", 1)[0]
    f = write(tmp_path, "\n".join(text) + "\n")
    with pytest.raises(
        ParticleFileError,
        match=rf"block data_particles, row {row + 1}: has {count} values, expected 15",
    ):
        read_star(f)


def test_comment_hint_only_when_relevant(tmp_path):
    f = write(tmp_path, "this is not a STAR file\n")
    with pytest.raises(ParticleFileError) as err:
        read_star(f)
    assert "comment lines" not in str(err.value)
    assert "before the first data_ block" in str(err.value)
    text = star_text().splitlines()
    first = next(i for i, ln in enumerate(text) if ln.startswith("000002@"))
    text.insert(first, "# a comment between rows")
    with pytest.raises(ParticleFileError, match="comment lines inside a loop's rows"):
        read_star(write(tmp_path, "\n".join(text) + "\n"))


# ------------------------------------------------------------------------ duplicates
def test_duplicates_reported_by_every_reader(tmp_path):
    text = star_text().replace("000003@s.mrcs", "1@s.mrcs")  # the same image as row 1
    f = write(tmp_path, text)
    with pytest.warns(DataWarning, match=r"1 duplicate particle\(s\).*row 3 = row 1"):
        ps = read_star(f)
    write_cs(ps, tmp_path / "d.cs")
    with pytest.warns(DataWarning, match="duplicate particle"):
        read_cs(tmp_path / "d.cs")
    r = CliRunner().invoke(app, ["inspect", str(f)])
    assert r.exit_code == 0


def test_negative_scale_warns(tmp_path):
    with pytest.warns(DataWarning, match="rlnCtfScalefactor < 0"):
        read_star(write(tmp_path, star_text({(1, "rlnCtfScalefactor"): "-0.3"})))


# ---------------------------------------------------------------------------- images
def _images_set(tmp_path: Path, imgs: np.ndarray) -> ParticleSet:
    write_stack(tmp_path / "s.mrcs", imgs, 2.0)
    f = write(tmp_path, star_text(n=len(imgs)))
    return read_star(f)


def test_nan_or_huge_pixel_names_stack_and_image(tmp_path):
    imgs = np.random.default_rng(0).normal(size=(4, 32, 32)).astype(np.float32)
    imgs[2, 5, 7] = np.nan
    ps = _images_set(tmp_path, imgs)
    src = ImageSource(ps)
    np.testing.assert_array_equal(src.read([0, 1]), imgs[:2])
    with pytest.raises(ParticleFileError, match=r"s\.mrcs: image 3 has a non-finite pixel"):
        src.read([3, 2])
    imgs[2, 5, 7] = 1e30
    write_stack(tmp_path / "s.mrcs", imgs, 2.0)
    with pytest.raises(ParticleFileError, match=r"image 3 has a pixel of absurd magnitude"):
        ImageSource(ps).read([2])


def test_mrc_mode_disagreeing_with_size_is_refused(tmp_path):
    imgs = np.random.default_rng(0).normal(size=(4, 32, 32)).astype(np.float32)
    ps = _images_set(tmp_path, imgs)
    data = bytearray((tmp_path / "s.mrcs").read_bytes())
    data[12:16] = np.int32(1).tobytes()  # mode 1 (int16) over float32 data
    (tmp_path / "s.mrcs").write_bytes(bytes(data))
    with pytest.raises(
        ParticleFileError,
        match=r"s\.mrcs: MRC header mode 1 \(int16.*need 9216 bytes, the file has 17408 bytes.*"
        r"fits mode 2 \(float32\)",
    ):
        ImageSource(ps).read([0])
    # a file longer than its header says is refused too (not read partly)
    (tmp_path / "s.mrcs").write_bytes(bytes(data[:12]) + np.int32(2).tobytes() + data[16:] + b"x")
    with pytest.raises(ParticleFileError, match="the header disagrees with the data"):
        ImageSource(ps).read([0])


# ------------------------------------------------------------------------------ maps
def _map(path: Path, vol, apix: float = 2.0) -> Path:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(vol, np.float32))
        m.voxel_size = apix
    return path


def test_read_map_refuses_nan_zero_and_constant(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8))
    assert read_map(_map(tmp_path / "ok.mrc", vol))[0].shape == (8, 8, 8)
    bad = vol.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ParticleFileError, match=r"nan\.mrc: the map has 1 non-finite voxel"):
        read_map(_map(tmp_path / "nan.mrc", bad))
    bad[1, 2, 3] = 3e37  # garbage bytes read as float32
    with pytest.raises(ParticleFileError, match=r"huge\.mrc: the map has a voxel of absurd"):
        read_map(_map(tmp_path / "huge.mrc", bad))
    with pytest.raises(ParticleFileError, match=r"zero\.mrc: every voxel is 0"):
        read_map(_map(tmp_path / "zero.mrc", np.zeros((8, 8, 8))))
    with pytest.raises(ParticleFileError, match="the map is constant"):
        read_map(_map(tmp_path / "one.mrc", np.ones((8, 8, 8))), kind="map")
    assert read_map(tmp_path / "one.mrc", kind="mask")[0].max() == 1  # a mask of ones is fine
    with pytest.raises(ParticleFileError, match="every voxel is 0; expected a mask"):
        check_map_values(np.zeros(5), "m.mrc", "mask")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """20 particles, box 32, with .cs (a few seconds)."""
    folder = tmp_path_factory.mktemp("tiny")
    cfg = SimulationConfig(seed=3)
    cfg.optics_groups = [
        OpticsGroupConfig(
            pixel_size_A=2.0,
            aniso=[1.01, 0.99, 30.0],
            box=32,
            n_particles=20,
            particles_per_micrograph=10,
        )
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.0
    cfg.noise.snr = 1.0
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 40.0, 300
    cfg.output.write_cs = True
    cfg.render.n_workers = 1
    simulate_dataset(cfg, folder, progress=False)
    return folder


def _estimate_cli(tiny, out, *extra):
    return CliRunner().invoke(
        app,
        [
            "estimate",
            "-i",
            str(tiny / "particles.star"),
            "--out",
            str(out),
            "--j",
            "1",
            "--max-iter",
            "2",
            "--tol",
            "0",
            "--no-plots",
            "-q",
            *extra,
        ],
    )


def test_reference_masked_to_zero_or_bad_mask_refused(tiny, tmp_path):
    vol, apix = read_map(tiny / "ref.mrc")
    vol[:4, :4, :4] = 0.0
    _map(tmp_path / "ref.mrc", vol, apix)
    corner = np.zeros_like(vol)
    corner[:4, :4, :4] = 1.0  # a mask where the map has no density
    _map(tmp_path / "far.mrc", corner, apix)
    r = _estimate_cli(tiny, tmp_path / "o", "--ref", str(tmp_path / "ref.mrc"), "--mask",
                      str(tmp_path / "far.mrc"))  # fmt: skip
    assert r.exit_code == 1
    assert "masked by" in r.output and "every voxel is 0" in r.output, r.output
    assert "Traceback" not in r.output
    _map(tmp_path / "empty.mrc", np.zeros_like(vol), apix)
    r = _estimate_cli(tiny, tmp_path / "o2", "--ref", str(tiny / "ref.mrc"), "--mask",
                      str(tmp_path / "empty.mrc"))  # fmt: skip
    assert r.exit_code == 1 and "empty.mrc: every voxel is 0" in r.output, r.output
    _map(tmp_path / "const.mrc", np.full_like(vol, 2.0), apix)
    r = _estimate_cli(tiny, tmp_path / "o3", "--ref", str(tmp_path / "const.mrc"))
    assert r.exit_code == 1 and "the map is constant" in r.output, r.output


def test_half_map_size_mismatch_names_both_files(tiny, tmp_path):
    vol, apix = read_map(tiny / "ref.mrc")
    _map(tmp_path / "h1.mrc", vol, apix)
    _map(tmp_path / "h2.mrc", vol[:-2, :-2, :-2], apix)
    r = _estimate_cli(tiny, tmp_path / "o", "--half-maps", str(tmp_path / "h1.mrc"),
                      str(tmp_path / "h2.mrc"))  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "h1.mrc" in r.output and "h2.mrc" in r.output and "differ in size" in r.output
    assert not (tmp_path / "o").exists()


def test_estimate_options_rejected_before_any_work(tiny, tmp_path):
    for opt, val in (("--max-iter", "0"), ("--low-res", "-5"), ("--tol", "nan"), ("--j", "-2")):
        r = _estimate_cli(tiny, tmp_path / "o", "--ref", str(tiny / "ref.mrc"), opt, val)
        assert r.exit_code == 1 and r.output.count("\n") <= 2, r.output
        assert f"error: {opt}" in r.output, r.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------- reconstruct guard
def test_reconstruct_never_writes_a_nan_map(tiny, tmp_path, monkeypatch):
    """After validation no NaN can get in; the final guard still refuses a non-finite map
    (here forced) and writes nothing."""
    from cryomag.reconstruction import backproject

    real = backproject.Backprojector.rhs

    def poisoned(self, h):
        b = real(self, h)
        b[(0,) * b.ndim] = np.nan
        return b

    monkeypatch.setattr(backproject.Backprojector, "rhs", poisoned)
    r = CliRunner().invoke(
        app,
        ["reconstruct", "-i", str(tiny / "particles.star"), "--out", str(tmp_path / "r"),
         "--max-iter", "2", "-q"],
    )  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "non-finite" in r.output and "nothing was written" in r.output
    assert not list((tmp_path / "r").glob("*.mrc")) and not (tmp_path / "r" / "fsc.json").exists()


def test_reconstruct_options_checked(tiny, tmp_path):
    for opt, val in (("--apix", "-1"), ("--eps", "0"), ("--box", "7")):
        r = CliRunner().invoke(
            app, ["reconstruct", "-i", str(tiny / "particles.star"), "--out",
                  str(tmp_path / "r"), opt, val, "-q"],
        )  # fmt: skip
        assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output


# --------------------------------------------------------------------- merge STAR + .cs
def test_merge_star_and_cs_no_nan_and_exact_uids(tiny, tmp_path):
    r = CliRunner().invoke(
        app,
        ["merge", str(tiny / "particles.star"), str(tiny / "particles.cs"), "--no-estimate",
         "--out", str(tmp_path / "m"), "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = read_star(tmp_path / "m" / "particles.star")
    numeric = m.particles.select_dtypes("number")
    assert not numeric.isna().any().any()
    for c in ("rlnCtfBfactor", "rlnPhaseShift", "rlnCtfScalefactor"):
        assert np.isfinite(m.column(c)).all()
    # cryoSPARC uids: exact uint64 through merge and write (give them values above 2^53)
    arr = np.array(load_cs_array(tiny / "particles.cs"), copy=True)
    arr["uid"] = np.uint64(2**63) + np.arange(len(arr), dtype=np.uint64) * np.uint64(7919)
    with open(tmp_path / "big.cs", "wb") as fh:
        np.save(fh, arr)
    r = CliRunner().invoke(
        app,
        ["merge", str(tiny / "particles.star"), str(tmp_path / "big.cs"), "--no-estimate",
         "--out", str(tmp_path / "m2"), "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = load_cs_array(tmp_path / "m2" / "particles.cs")
    assert out["uid"].dtype == np.uint64
    assert np.isin(arr["uid"], out["uid"]).all()  # every uid survives exactly
    assert len(np.unique(out["uid"])) == len(out)
    star_uids = read_star(tmp_path / "m2" / "particles.star").particles["cmagUid"]
    assert np.isin(arr["uid"], star_uids.to_numpy().astype(np.uint64)).all()


# ------------------------------------------------------------------------- messages
def test_garbage_json_errors_name_the_file(tiny, tmp_path):
    run = tmp_path / "run"
    r = _estimate_cli(tiny, run, "--ref", str(tiny / "ref.mrc"))
    assert r.exit_code == 0, r.output
    (run / "results.json").write_text("{ not json")
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 1 and f"{run / 'results.json'}: not valid JSON" in r.output
    (run / "results.json").write_text(json.dumps({"groups": 5}))
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 1 and "results.json: unexpected content" in r.output, r.output
    (run / "stats" / "options.json").write_text("garbage")
    r = CliRunner().invoke(app, ["refit", str(run), "--fit", "micrograph", "--no-plots"])
    assert r.exit_code == 1 and "options.json: not valid JSON" in r.output, r.output


def test_no_message_names_an_api_argument(tmp_path):
    """CLI-facing messages name the command-line option, not a Python argument."""
    with mrcfile.new(tmp_path / "nopix.mrc") as m:
        m.set_data(np.arange(512, dtype=np.float32).reshape(8, 8, 8))
    with pytest.raises(ParticleFileError) as err:
        read_map(tmp_path / "nopix.mrc")
    assert "pixel_size_A" not in str(err.value)
    src = Path(cryomag.__file__).parent
    offenders = []
    for py in src.rglob("*.py"):
        for i, line in enumerate(py.read_text().splitlines(), 1):
            if ("raise" in line or 'f"' in line) and "pass pixel_size_A" in line:
                offenders.append(f"{py}:{i}")
    assert not offenders


# ----------------------------------------------------------------------- apply options
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "foo"], "--model 'foo': choose one of group"),
        (["--bins", "0", "--split", "bins"], "--bins 0: the number of bins"),
        (["--split", "foo"], "--split 'foo'"),
        (["--resample", "--apix", "-1"], "--apix -1.0: the output pixel size"),
        (["--resample", "--box", "7"], "--box 7: the output box"),
        (["--apix", "1.5"], "--apix applies to --resample only"),
        (["--resample", "--split", "micrograph"], "--resample and --split exclude each other"),
    ],
)
def test_apply_rejects_nonsense_before_any_work(tmp_path, args, expected):
    r = CliRunner().invoke(app, ["apply", str(tmp_path / "nowhere"), "--out",
                                 str(tmp_path / "o"), *args])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert f"error: {expected}" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_apply_api_names_api_arguments():
    from cryomag.workflows.apply import check_apply_options

    with pytest.raises(ValueError, match="n_bins 0"):
        check_apply_options(n_bins=0)


def test_in_memory_set_defaults(tmp_path):
    """A set built in memory without the optional columns validates (neutral defaults)."""
    parts = pd.DataFrame(
        {
            "rlnImageName": ["1@a.mrcs"],
            "rlnOpticsGroup": [1],
            "rlnDefocusU": [1e4],
            "rlnDefocusV": [1e4],
            "rlnDefocusAngle": [0.0],
            "rlnAngleRot": [0.0],
            "rlnAngleTilt": [0.0],
            "rlnAnglePsi": [0.0],
            "rlnOriginXAngst": [0.0],
            "rlnOriginYAngst": [0.0],
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnImagePixelSize": [1.0],
            "rlnImageSize": [16],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ParticleSet(parts, optics, SourceInfo()).validate()
