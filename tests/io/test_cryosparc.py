"""Tests of cryomag.io.cryosparc (cryoSPARC .cs read / write and conversion to RELION)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from cryomag.io import (
    ParticleFileError,
    ParticleFileNotFoundError,
    load_cs_array,
    read_cs,
    read_particles,
    read_star,
    write_cs,
    write_particles,
    write_star,
)
from cryomag.io.mrc import parse_image_names
from cryomag.physics.geometry import euler_to_matrix
from tests.data_paths import DATA

pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared test data folder {DATA} not found"
)
J24 = DATA / "cryosparc" / "cryosparc_P12_J24_001_particles.cs"
J2 = DATA / "cryosparc" / "cryosparc_J2_particles_exported.cs"
RELION31 = DATA / "particles" / "relion31.star"
SIX = DATA / "star" / "relion31.6opticsgroups.star"
R5 = DATA / "star" / "relion5.star"


def _fields_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    for n in a.dtype.names:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def _with_aniso(tmp_path: Path, aniso: np.ndarray) -> Path:
    arr = load_cs_array(J2).copy()
    arr["ctf/anisomag"] = np.asarray(aniso, np.float32).reshape(-1, 4)
    out = tmp_path / "aniso.cs"
    with open(out, "wb") as fh:
        np.save(fh, arr)
    return out


# ------------------------------------------------------------------------- known values
def test_j24_known_values():
    ps = read_cs(J24)
    arr = ps.source.cs_data
    assert len(ps) == 2019
    assert ps.source.kind == "cs" and ps.source.has_poses
    alpha = ps.column("rlnCtfScalefactor")
    assert alpha.min() == pytest.approx(0.67, abs=0.01)
    assert alpha.max() == pytest.approx(3.08, abs=0.01)
    assert np.median(alpha) == pytest.approx(1.29, abs=0.01)
    assert ps.n_groups == 1
    assert ps.optics["rlnImagePixelSize"].iloc[0] == 2.95
    assert int(ps.optics["rlnImageSize"].iloc[0]) == 180
    assert ps.optics["rlnVoltage"].iloc[0] == 200.0
    assert ps.optics["rlnSphericalAberration"].iloc[0] == 2.0
    assert ps.optics["rlnAmplitudeContrast"].iloc[0] == 0.07
    assert "rlnMagMat00" not in ps.optics.columns  # no ctf/anisomag in this file
    np.testing.assert_array_equal(ps.particles["cmagUid"].to_numpy(), arr["uid"])
    assert ps.particles["cmagUid"].dtype == np.uint64
    assert ps.particles["rlnImageName"].iloc[0] == (
        "000001@J19/extract/20150917_05196_DNA-TET-25k-DE20_raw.region_000.sum-all_003-072_"
        "particles.mrc"
    )
    np.testing.assert_array_equal(ps.half_sets(), arr["alignments3D/split"] + 1)
    assert set(ps.micrographs()) == {"mic_0"}
    # defocus, angle
    np.testing.assert_array_equal(ps.column("rlnDefocusU").astype(np.float32), arr["ctf/df1_A"])
    np.testing.assert_allclose(
        np.deg2rad(ps.column("rlnDefocusAngle")), arr["ctf/df_angle_rad"], rtol=1e-6
    )


def test_j24_pose_and_shift_conversion():
    ps = read_cs(J24)
    arr = ps.source.cs_data
    relion = euler_to_matrix(ps.euler_deg())
    expected = np.swapaxes(Rotation.from_rotvec(arr["alignments3D/pose"]).as_matrix(), 1, 2)
    np.testing.assert_allclose(relion, expected, atol=1e-9)
    np.testing.assert_allclose(
        ps.origin_A(), arr["alignments3D/shift"].astype(float) * 2.95, rtol=1e-6
    )


def test_j2_anisomag_and_no_poses():
    ps = read_cs(J2)
    arr = ps.source.cs_data
    assert "ctf/anisomag" in arr.dtype.names
    assert len(ps) == 22
    np.testing.assert_array_equal(ps.mag_matrices(), np.eye(2)[None])  # anisomag all zero
    assert not ps.source.has_poses
    assert np.all(ps.euler_deg() == 0) and np.all(ps.origin_A() == 0)
    assert "rlnCtfScalefactor" not in ps.particles.columns  # alignments2D/alpha is not used
    assert ps.particles["rlnImageName"].iloc[0].startswith("000001@J1/imported/")  # '>' gone
    assert ps.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(1.345, rel=1e-6)


def test_anisomag_to_relion_matrix(tmp_path):
    a = np.array([[0.01, 0.003], [-0.002, -0.005]])
    ps = read_cs(_with_aniso(tmp_path, a.reshape(4)))
    m = ps.mag_matrices()[0]
    a32 = a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(m, np.linalg.inv(np.eye(2) + a32), rtol=1e-6)
    # written back unchanged
    out = tmp_path / "back.cs"
    write_cs(ps, out)
    _fields_equal(np.load(out), ps.source.cs_data)
    # a changed M is written as inv(M) - I
    m_new = np.array([[1.02, 0.001], [0.002, 0.98]])
    ps.set_mag_matrices(m_new[None])
    write_cs(ps, out)
    got = np.load(out)["ctf/anisomag"].astype(np.float64).reshape(-1, 2, 2)
    np.testing.assert_allclose(
        got, (np.linalg.inv(m_new) - np.eye(2))[None].repeat(22, 0), atol=1e-7
    )


def test_isotropic_anisomag_matches_pixel_size_convention(tmp_path):
    # cryosparc-tools: I + anisomag = p_true / p_declared; RELION: M = p_declared / p_true
    p_true, p_decl = 0.88, 0.66
    iso = (p_true / p_decl - 1.0) * np.eye(2)
    ps = read_cs(_with_aniso(tmp_path, iso.reshape(4)))
    np.testing.assert_allclose(ps.mag_matrices()[0], (p_decl / p_true) * np.eye(2), rtol=1e-6)


def test_anisomag_differing_within_group_warns(tmp_path):
    aniso = np.zeros((22, 4))
    aniso[5] = [0.01, 0, 0, 0.01]
    with pytest.warns(UserWarning, match="differs between particles"):
        ps = read_cs(_with_aniso(tmp_path, aniso))
    np.testing.assert_array_equal(ps.mag_matrices()[0], np.eye(2))  # first particle's


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("src", [J24, J2])
def test_cs_round_trip_equal_fields(src, tmp_path):
    ps = read_cs(src)
    out = tmp_path / "out.cs"
    write_cs(ps, out)
    # exact name, no .npy; the result-group file beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.cs", "out.csg"]
    _fields_equal(np.load(out), ps.source.cs_data)


def test_cs_subset_reordered_and_changed(tmp_path):
    ps = read_cs(J24)
    sub = ps.select(np.array([7, 2, 0]))
    sub.particles.loc[1, "rlnDefocusU"] = 20000.0
    sub.particles.loc[2, "rlnAnglePsi"] += 10.0
    out = tmp_path / "sub.cs"
    write_cs(sub, out)
    got = np.load(out)
    orig = ps.source.cs_data
    np.testing.assert_array_equal(got["uid"], orig["uid"][[7, 2, 0]])
    assert got["ctf/df1_A"][1] == np.float32(20000.0)
    assert got["ctf/df1_A"][0] == orig["ctf/df1_A"][7]
    np.testing.assert_array_equal(got["alignments3D/pose"][:2], orig["alignments3D/pose"][[7, 2]])
    back = read_cs(out)
    np.testing.assert_allclose(back.euler_deg()[2], sub.euler_deg()[2], atol=1e-4)
    for name in orig.dtype.names:
        if name not in ("ctf/df1_A", "alignments3D/pose"):
            np.testing.assert_array_equal(got[name], orig[name][[7, 2, 0]], err_msg=name)


def test_cs_to_star_to_cs(tmp_path):
    ps = read_cs(J24)
    write_star(ps, tmp_path / "j24.star")
    ps2 = read_star(tmp_path / "j24.star")
    write_cs(ps2, tmp_path / "j24.cs")  # from scratch (STAR input)
    got = np.load(tmp_path / "j24.cs")
    orig = ps.source.cs_data
    np.testing.assert_array_equal(got["uid"], orig["uid"])  # cmagUid reused
    for name in (
        "blob/idx",
        "blob/shape",
        "blob/psize_A",
        "ctf/df1_A",
        "ctf/df2_A",
        "ctf/df_angle_rad",
        "ctf/accel_kv",
        "alignments3D/shift",
        "alignments3D/alpha",
        "alignments3D/split",
    ):
        np.testing.assert_array_equal(got[name], orig[name], err_msg=name)
    assert got["blob/path"][0] == orig["blob/path"][0]
    r_got = Rotation.from_rotvec(got["alignments3D/pose"])
    r_orig = Rotation.from_rotvec(orig["alignments3D/pose"])
    assert (r_got.inv() * r_orig).magnitude().max() < 1e-6


@pytest.mark.parametrize("star", [RELION31, SIX, R5])
def test_star_to_cs_to_star(star, tmp_path):
    """STAR -> .cs -> STAR keeps every converted value to float32 precision.

    Tolerances: defocus, pixel size, voltage, Cs, Q0, scale: rtol 1e-6 (float32); angles via
    rotation matrices: atol 1e-6; origins: atol 1e-5 A; rlnMagMat: atol 1e-6.
    """
    ps = read_star(star)
    write_cs(ps, tmp_path / "x.cs")
    back = read_cs(tmp_path / "x.cs")
    assert len(back) == len(ps)
    # same image (number, file); cryomag writes the number zero-padded to 6 digits
    for a, b in zip(
        parse_image_names(back.particles["rlnImageName"]),
        parse_image_names(ps.particles["rlnImageName"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert back.micrographs().tolist() == ps.micrographs().tolist()
    for col in ("rlnDefocusU", "rlnDefocusV", "rlnCtfScalefactor"):
        np.testing.assert_allclose(back.column(col), ps.column(col), rtol=1e-6, err_msg=col)
    np.testing.assert_allclose(
        back.column("rlnDefocusAngle"), ps.column("rlnDefocusAngle"), atol=1e-4
    )
    np.testing.assert_allclose(back.column("rlnPhaseShift"), ps.column("rlnPhaseShift"), atol=1e-5)
    np.testing.assert_array_equal(back.half_sets(), ps.half_sets())
    np.testing.assert_allclose(
        euler_to_matrix(back.euler_deg()), euler_to_matrix(ps.euler_deg()), atol=1e-6
    )
    np.testing.assert_allclose(back.origin_A(), ps.origin_A(), atol=1e-5)
    # optics per particle (group numbering may differ)
    for col in (
        "rlnImagePixelSize",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnImageSize",
    ):
        a = back.optics[col].to_numpy(float)[back.group_index()]
        b = ps.optics[col].to_numpy(float)[ps.group_index()]
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=col)
    np.testing.assert_allclose(
        back.mag_matrices()[back.group_index()], ps.mag_matrices()[ps.group_index()], atol=1e-6
    )
    # and back to STAR through the generic writer
    write_particles(back, tmp_path / "y.star")
    assert len(read_particles(tmp_path / "y.star")) == len(ps)


@pytest.mark.parametrize("src", [J24, RELION31])
def test_csg_result_group_names_the_cs_and_its_slots(src, tmp_path):
    """The .csg beside a written .cs is YAML naming that file, its row count and one result
    slot per field prefix; cryosparc-tools loads the file it names with every listed slot."""
    import yaml
    from cryosparc.dataset import Dataset

    ps = read_particles(src)
    out = tmp_path / "particles.cs"
    write_cs(ps, out)
    csg = yaml.safe_load((tmp_path / "particles.csg").read_text())
    assert csg["group"]["type"] == "particle" and csg["group"]["name"] == "particles"
    arr = np.load(out)
    slots = {f.split("/")[0] for f in arr.dtype.names if "/" in f}
    assert set(csg["results"]) == slots
    assert {"blob", "ctf"} <= slots
    for slot, entry in csg["results"].items():
        assert entry == {
            "metafile": ">particles.cs",
            "num_items": len(ps),
            "type": f"particle.{slot}",
        }
    target = tmp_path / csg["results"]["ctf"]["metafile"].lstrip(">")
    ds = Dataset.load(target)
    assert len(ds) == len(ps)
    for slot in slots:
        assert any(f.startswith(slot + "/") for f in ds.fields()), slot
    np.testing.assert_array_equal(ds["ctf/df1_A"], arr["ctf/df1_A"])


def test_csg_refuses_an_input_and_a_bad_name(tmp_path):
    from cryomag.io.cryosparc import write_csg

    f = tmp_path / "in.csg"
    f.write_text("keep")
    with pytest.raises(ParticleFileError, match="refusing to overwrite an input"):
        write_csg(tmp_path / "in.cs", ["blob/path"], 3, inputs=[f])
    assert f.read_text() == "keep"
    with pytest.raises(ValueError, match="result group name"):
        write_csg(tmp_path / "x.cs", ["blob/path"], 3, name="no spaces")
    with pytest.raises(ParticleFileError, match="no result slots"):
        write_csg(tmp_path / "x.cs", ["uid"], 3)


def test_csdat_format_via_cryosparc_tools(tmp_path):
    from cryosparc.dataset import CSDAT_FORMAT, Dataset

    out = tmp_path / "new.cs"
    Dataset.load(J24).save(out, format=CSDAT_FORMAT)
    assert out.read_bytes()[:6] == b"\x95CSDAT"
    ps_new, ps_old = read_cs(out), read_cs(J24)
    pd.testing.assert_frame_equal(ps_new.particles, ps_old.particles)
    pd.testing.assert_frame_equal(ps_new.optics, ps_old.optics)


# ------------------------------------------------------------------------- passthrough
def _split(tmp_path: Path) -> tuple[Path, Path]:
    arr = load_cs_array(J24)
    prim_fields = ["uid"] + [n for n in arr.dtype.names if n.startswith(("blob/", "alignments3D/"))]
    pt_fields = ["uid"] + [n for n in arr.dtype.names if n.startswith("ctf/")] + ["blob/psize_A"]
    prim = np.empty(len(arr), dtype=[(n, arr.dtype[n]) for n in prim_fields])
    for n in prim_fields:
        prim[n] = arr[n]
    perm = np.random.default_rng(0).permutation(len(arr))
    pt = np.empty(len(arr), dtype=[(n, arr.dtype[n]) for n in pt_fields])
    for n in pt_fields:
        pt[n] = arr[n][perm]
    pt["blob/psize_A"] = 99.0  # primary fields win
    paths = (tmp_path / "J24_particles.cs", tmp_path / "J24_passthrough_particles.cs")
    for p, a in zip(paths, (prim, pt), strict=True):
        with open(p, "wb") as fh:
            np.save(fh, a)
    return paths


def test_passthrough_join(tmp_path):
    prim, pt = _split(tmp_path)
    ps = read_cs(prim, passthrough=pt)
    full = read_cs(J24)
    pd.testing.assert_frame_equal(ps.particles, full.particles)
    pd.testing.assert_frame_equal(ps.optics, full.optics)
    # the writer refuses to overwrite the passthrough
    with pytest.raises(ParticleFileError, match="refusing to overwrite"):
        write_cs(ps, pt)
    assert len(read_particles(prim, passthrough=pt)) == 2019


def test_primary_without_passthrough_names_missing_field(tmp_path):
    prim, _ = _split(tmp_path)
    with pytest.raises(
        ParticleFileError, match=r"J24_particles\.cs: no field ctf/accel_kv.*passthrough"
    ):
        read_cs(prim)


def test_passthrough_missing_uids(tmp_path):
    prim, pt = _split(tmp_path)
    arr = np.load(pt)[:-3]
    with open(pt, "wb") as fh:
        np.save(fh, arr)
    with pytest.raises(ParticleFileError, match="passthrough has no row for 3 of 2019"):
        read_cs(prim, passthrough=pt)


# ------------------------------------------------------------------------------ errors
def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(ParticleFileNotFoundError):
        read_cs(tmp_path / "nope.cs")
    bad = tmp_path / "bad.cs"
    bad.write_bytes(b"this is not a cs file")
    with pytest.raises(ParticleFileError, match=r"bad\.cs: not a readable cryoSPARC"):
        read_cs(bad)


def test_non_square_blob(tmp_path):
    arr = load_cs_array(J2).copy()
    arr["blob/shape"][4] = [300, 200]
    f = tmp_path / "rect.cs"
    with open(f, "wb") as fh:
        np.save(fh, arr)
    with pytest.raises(ParticleFileError, match=r"rect\.cs: row 5: blob/shape.*non-square"):
        read_cs(f)


def test_write_cs_refuses_input_and_is_atomic(tmp_path):
    f = tmp_path / "in.cs"
    f.write_bytes(J2.read_bytes())
    ps = read_cs(f)
    with pytest.raises(ParticleFileError, match="refusing to overwrite an input"):
        write_cs(ps, f)
    assert f.read_bytes() == J2.read_bytes()
    ps.particles.loc[0, "cmagUid"] = 12345  # not in the source array
    with pytest.raises(ParticleFileError, match="cmagUid 12345 is not in the source"):
        write_cs(ps, tmp_path / "out.cs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.cs"]


def test_angpix_rejected_for_cs():
    with pytest.raises(ParticleFileError, match="angpix applies to RELION 3.0"):
        read_particles(J2, angpix=1.0)


def test_no_warnings_for_clean_files():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_cs(J24)
        read_cs(J2)
