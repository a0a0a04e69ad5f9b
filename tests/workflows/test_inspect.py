"""Tests of ``cryomag inspect`` on the real files of shared/data and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cryomag.cli.main import app
from cryomag.model.magnification import from_polar
from cryomag.workflows.inspect import inspect_mrc, inspect_particles
from tests.data_paths import DATA

PARTICLE_FILES = sorted(DATA.glob("**/*.star")) + sorted(DATA.glob("**/*.cs"))
CS_ALPHA = DATA / "cryosparc" / "cryosparc_P12_J24_001_particles.cs"
CS_ANISOMAG = DATA / "cryosparc" / "cryosparc_J2_particles_exported.cs"
SIX_GROUPS = DATA / "star" / "relion31.6opticsgroups.star"
MAP = DATA / "map" / "emd_6824.mrc"
STACK = DATA / "particles" / "relion31.mrcs"
STACK_STAR = DATA / "particles" / "relion31.star"

runner = CliRunner()


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data {path} not found")
    return path


@pytest.fixture(scope="module")
def alpha_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("alpha")
    return inspect_particles(need(CS_ALPHA), out=out)


@pytest.mark.parametrize("path", PARTICLE_FILES, ids=lambda p: p.name)
def test_inspect_every_data_file(path: Path):
    res = inspect_particles(path)
    assert res["n_particles"] > 0
    assert res["n_groups"] == len(res["groups"]) >= 1
    assert sum(g["n_particles"] for g in res["groups"]) == res["n_particles"]
    for g in res["groups"]:
        m = np.array(g["magmat_relion"])
        # both conventions and the polar form describe the same matrix
        np.testing.assert_allclose(np.array(g["magmat_cryosparc"]) @ m, np.eye(2), atol=1e-12)
        p = g["polar"]
        back = from_polar(p["major_scale"], p["minor_scale"], p["angle_deg"], p["rotation_deg"])
        np.testing.assert_allclose(back, m, atol=1e-12)
        assert g["pixel_size_A"] > 0
        assert g["true_pixel_size_A"] == pytest.approx(
            g["pixel_size_A"] / np.sqrt(np.linalg.det(m))
        )
        assert len(g["motioncor2_mag"]) == 3
    json.dumps(res, allow_nan=False)  # JSON-ready, no NaN


def test_inspect_cs_alpha(alpha_result):
    res = alpha_result
    assert res["format"] == "cs"
    assert res["n_particles"] == 2019
    sc = res["scale"]
    assert sc["present"]
    assert sc["source"] == "alignments3D/alpha"
    q = sc["quantiles"]
    assert q["p50"] == pytest.approx(1.29, abs=0.01)
    assert q["min"] == pytest.approx(0.67, abs=0.01)
    assert q["max"] == pytest.approx(3.08, abs=0.01)
    assert q["min"] <= q["p5"] <= q["p25"] <= q["p50"] <= q["p75"] <= q["p95"] <= q["max"]
    o = sc["outliers"]
    lo, hi = o["fences"]
    iqr = q["p75"] - q["p25"]
    assert lo == pytest.approx(q["p25"] - 1.5 * iqr)
    assert hi == pytest.approx(q["p75"] + 1.5 * iqr)
    assert o["count"] == o["n_low"] + o["n_high"] > 0
    assert 0 < len(o["examples"]) <= 10
    for e in o["examples"]:
        assert e["scale"] < lo or e["scale"] > hi
    sp = sc["spearman_vs_defocus"]
    assert -1 <= sp["rho"] <= 1 and 0 <= sp["p_value"] <= 1
    assert "contrast weight" in sc["explanation"]


def test_inspect_outputs_written(alpha_result):
    outputs = alpha_result["outputs"]
    assert set(outputs) == {"scale_histogram", "scale_vs_defocus", "inspect_json"}
    for key in ("scale_histogram", "scale_vs_defocus"):
        data = Path(outputs[key]).read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG")
    saved = json.loads(Path(outputs["inspect_json"]).read_text())
    assert saved == alpha_result
    # no temporary files are left behind
    assert sorted(p.name for p in Path(outputs["inspect_json"]).parent.iterdir()) == sorted(
        ["inspect.json", "scale_histogram.png", "scale_vs_defocus.png"]
    )


def test_inspect_six_optics_groups():
    res = inspect_particles(need(SIX_GROUPS))
    assert res["format"] == "star"
    assert res["n_groups"] == 6
    assert res["n_particles"] == 139
    for g in res["groups"]:
        assert not g["identity_matrix"]
        assert g["polar"]["anisotropy"] > 0
        assert abs(g["polar"]["pixel_size_change"]) < 0.03
        assert g["beam_tilt_mrad"] is not None and len(g["beam_tilt_mrad"]) == 2
        assert len(g["odd_zernike"]) == 6
        assert len(g["even_zernike"]) == 9
        assert g["box_px"] == 196
        assert g["voltage_kV"] == 200
    first = res["groups"][0]
    np.testing.assert_allclose(
        first["magmat_relion"], [[1.011472, 0.004231], [0.004560, 1.008858]], atol=1e-12
    )
    assert first["beam_tilt_mrad"] == pytest.approx([0.657334, 0.884982])
    assert not res["scale"]["present"]
    assert "No per-particle scale" in res["scale"]["message"]


def test_inspect_cs_exposure_group_anisomag():
    res = inspect_particles(need(CS_ANISOMAG))
    assert res["n_particles"] == 22
    assert res["group_kind"] == "exposure group"
    for g in res["groups"]:
        np.testing.assert_allclose(g["anisomag_cryosparc"], np.zeros(4), atol=1e-12)
        assert g["identity_matrix"]


def test_cli_inspect_six_groups(tmp_path):
    path = need(SIX_GROUPS)
    result = runner.invoke(app, ["inspect", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = result.output
    for word in ("optics group 6", "rlnMagMat", "MotionCor2", "No per-particle scale"):
        assert word in text
    saved = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert saved["n_groups"] == 6
    assert not (tmp_path / "out" / "scale_histogram.png").exists()  # no scale, no plots


def test_cli_inspect_cs_alpha(tmp_path):
    path = need(CS_ALPHA)
    out = tmp_path / "nested" / "dir"
    result = runner.invoke(app, ["inspect", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Spearman" in result.output and "outliers" in result.output
    for name in ("scale_histogram.png", "scale_vs_defocus.png", "inspect.json"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("bad", ["not-mrc", "missing", "garbage"])
def test_cli_inspect_unreadable_input(tmp_path, bad):
    if bad == "not-mrc":
        path = tmp_path / "short.mrc"
        path.write_bytes(b"MRC?" * 10)
    elif bad == "missing":
        path = tmp_path / "nothing.star"
    else:
        path = tmp_path / "garbage.cs"
        path.write_bytes(b"not a numpy file")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert str(path) in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_inspect_out_is_a_file(tmp_path):
    path = need(SIX_GROUPS)
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    result = runner.invoke(app, ["inspect", str(path), "--out", str(target)])
    assert result.exit_code == 1
    assert "folder" in result.output
    assert target.read_text() == "keep me"


def test_render_many_groups_compact():
    import copy

    from rich.console import Console

    from cryomag.report.console_inspect import render

    res = inspect_particles(need(SIX_GROUPS))
    many = copy.deepcopy(res)
    many["groups"] = res["groups"] * 3
    many["n_groups"] = 18
    console = Console(record=True, width=120)
    render(many, console)
    text = console.export_text()
    assert "18 optics groups" in text
    assert "rlnMagMat" not in text  # one line per group, details in inspect.json
    console = Console(record=True, width=120)
    render(res, console)
    assert "rlnMagMat" in console.export_text()


# ------------------------------------------------------------------------------ MRC files
def _write_mrc(path: Path, data: np.ndarray, voxel: float = 1.5, stack: bool = False) -> Path:
    import mrcfile

    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = voxel
        if stack:
            m.set_image_stack()
    return path


def test_inspect_map_header_and_values():
    import mrcfile

    res = inspect_mrc(need(MAP))
    with mrcfile.open(MAP) as m:
        data = m.data.astype(np.float64)
    assert res["kind"] == "map" and res["format"] == "mrc"
    h = res["header"]
    assert h["shape_xyz"] == [70, 70, 70] and h["mode"] == 2 and h["dtype"] == "float32"
    assert h["voxel_size_A"] == [2.64, 2.64, 2.64]
    assert h["origin_A"] == [0, 0, 0] and h["nstart"] == [0, 0, 0]
    assert h["map_id"] == "MAP " and "EMD-6824" in h["labels"][0]
    v = res["values"]
    assert v["n_values"] == data.size and v["nan_count"] == 0 == v["inf_count"]
    assert v["min"] == data.min() and v["max"] == data.max()
    assert v["mean"] == pytest.approx(data.mean(), abs=1e-12)
    assert v["std"] == pytest.approx(data.std(), rel=1e-12)
    assert res["warnings"] == []
    json.dumps(res, allow_nan=False)


def test_inspect_stack_against_its_star_pixel_size():
    """relion31.mrcs's header says 1 A, its STAR says 2.806 A: the warning names both."""
    res = inspect_mrc(need(STACK), particles=need(STACK_STAR))
    assert res["kind"] == "stack" and res["header"]["shape_xyz"] == [256, 256, 5]
    assert res["particles"]["optics_groups"] == [
        {"optics_group": 1, "pixel_size_A": 2.806, "box_px": 256}
    ]
    mismatch = [w for w in res["warnings"] if "header pixel size" in w]
    assert len(mismatch) == 1
    assert "1 A differs from" in mismatch[0] and "rlnImagePixelSize 2.806 A" in mismatch[0]
    assert "-64.362 %" in mismatch[0]
    assert not any("rlnImageSize" in w for w in res["warnings"])  # the box agrees


def test_inspect_warns_nan_non_cubic_and_box(tmp_path):
    vol = np.ones((8, 10, 10), np.float32)
    vol[1, 2, 3] = np.nan
    vol[0, 0, 0] = np.inf
    vol[2, 2, 2] = 5.0
    res = inspect_mrc(_write_mrc(tmp_path / "m.mrc", vol))
    text = " ".join(res["warnings"])
    assert "non-cubic map 10 x 10 x 8 voxels" in text
    assert "1 NaN and 1 Inf value(s) of 800" in text
    finite = vol[np.isfinite(vol)].astype(np.float64)
    assert res["values"]["max"] == 5.0 and res["values"]["mean"] == pytest.approx(finite.mean())
    stack = _write_mrc(tmp_path / "s.mrcs", np.zeros((3, 12, 12), np.float32), 2.806, True)
    res = inspect_mrc(stack, particles=need(STACK_STAR))
    text = " ".join(res["warnings"])
    assert "images are 12 px" in text and "rlnImageSize is 256 px" in text
    assert "every value is 0" in text and "header pixel size" not in text


def test_inspect_mode_size_mismatch_is_a_warning(tmp_path):
    f = _write_mrc(tmp_path / "m.mrc", np.zeros((6, 6, 6), np.float32))
    with open(f, "ab") as fh:
        fh.write(b"\0" * 100)
    res = inspect_mrc(f)
    assert res["values"] is None
    assert any("header disagrees with the data" in w for w in res["warnings"])


def test_cli_inspect_mrc(tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(
        app, ["--plain", "inspect", str(need(STACK)), "--particles", str(STACK_STAR),
              "--out", str(out)]  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "MRC stack of 5 images of 256 x 256 px" in result.output
    assert "rlnImagePixelSize 2.806 A" in result.output
    saved = json.loads((out / "inspect.json").read_text())
    assert saved["header"]["voxel_size_A"] == [1, 1, 1]
    result = runner.invoke(app, ["inspect", str(SIX_GROUPS), "--particles", str(STACK_STAR)])
    assert result.exit_code == 1 and "applies to an MRC file" in result.output
