"""Reading, validating and writing RELION's fixed aberrations (issue 13): rlnBeamTiltX/Y,
rlnOddZernike, rlnEvenZernike, in STAR (3.0, 3.1+) and cryoSPARC .cs files."""

from __future__ import annotations

import numpy as np
import pytest

from cryomag.io import read_star, write_star
from cryomag.model.particles import ParticleDataError, format_zernike, parse_zernike
from cryomag.model.validation import DataWarning
from tests.data_paths import DATA

SIX = DATA / "star" / "relion31.6opticsgroups.star"
needs_data = pytest.mark.skipif(not SIX.is_file(), reason=f"{SIX} not found")

_OPTICS_31 = """# version 30001

data_optics

loop_
_rlnOpticsGroup
_rlnOpticsGroupName
_rlnAmplitudeContrast
_rlnSphericalAberration
_rlnVoltage
_rlnImagePixelSize
_rlnImageSize
_rlnImageDimensionality
_rlnBeamTiltX
_rlnBeamTiltY
_rlnOddZernike
_rlnEvenZernike
1 og1 0.1 2.7 300 1.0 64 2 {tx} 0.2 {odd} [0,0.5,0.1]

# version 30001

data_particles

loop_
_rlnImageName
_rlnMicrographName
_rlnOpticsGroup
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
_rlnOriginXAngst
_rlnOriginYAngst{pcols}
1@a.mrcs m1 1 10000 9000 5 10 20 30 0 0{pvals}
"""


def _write31(tmp_path, tx="0.5", odd="[0,0,3.5,0,0,-1.25]", pcols="", pvals=""):
    f = tmp_path / "ab.star"
    f.write_text(_OPTICS_31.format(tx=tx, odd=odd, pcols=pcols, pvals=pvals))
    return f


def test_parse_and_format_zernike():
    assert parse_zernike("[1.5,-2,3e-1]") == (1.5, -2.0, 0.3)
    assert parse_zernike("[]") == () and parse_zernike("") == () and parse_zernike(None) == ()
    assert parse_zernike(float("nan")) == ()
    assert parse_zernike([1, 2]) == (1.0, 2.0)
    assert format_zernike([1.5, -2.0, 0.1]) == "[1.5,-2,0.1]"
    v = (1.70554063513, 1.2131261042, -5.82415906716)
    assert parse_zernike(format_zernike(v)) == v
    with pytest.raises(ValueError):
        parse_zernike("[1,a]")


def test_optics_params_carry_the_aberrations(tmp_path):
    ps = read_star(_write31(tmp_path))
    o = ps.optics_params(1)
    assert o.beam_tilt_mrad == (0.5, 0.2)
    assert o.odd_zernike == (0.0, 0.0, 3.5, 0.0, 0.0, -1.25)
    assert o.even_zernike == (0.0, 0.5, 0.1)
    assert o.has_aberrations


@pytest.mark.parametrize(
    "tx, odd, column",
    [("nan", "[0,0,1]", "rlnBeamTiltX"), ("0.5", "[0,nan,1]", "rlnOddZernike"),
     ("0.5", "[0,x,1]", "rlnOddZernike"), ("inf", "[0]", "rlnBeamTiltX")],
)  # fmt: skip
def test_bad_aberration_values_name_file_row_and_column(tmp_path, tx, odd, column):
    f = _write31(tmp_path, tx=tx, odd=odd)
    with pytest.raises(ParticleDataError) as e:
        read_star(f)
    msg = str(e.value)
    assert str(f) in msg and "optics row 1" in msg and column in msg


def test_per_particle_tilt_in_a_31_file_is_ignored_with_a_warning(tmp_path):
    """RELION 3.1+ reads the tilt from the optics table only (obs_model.cpp:82-83)."""
    f = _write31(tmp_path, pcols="\n_rlnBeamTiltX\n_rlnBeamTiltY", pvals=" 1.0 -1.0")
    with pytest.warns(DataWarning, match="optics table only"):
        ps = read_star(f)
    assert ps.optics_params(1).beam_tilt_mrad == (0.5, 0.2)


def test_legacy_per_particle_tilt_becomes_an_optics_group_value(tmp_path):
    """RELION 3.0 files: beam tilt per particle; relion_convert_star splits optics groups by
    it (star_converter.cpp:38-47), and so does the reader."""
    text = """data_images

loop_
_rlnImageName
_rlnMicrographName
_rlnDefocusU
_rlnDefocusV
_rlnDefocusAngle
_rlnVoltage
_rlnSphericalAberration
_rlnAmplitudeContrast
_rlnMagnification
_rlnDetectorPixelSize
_rlnImageSize
_rlnBeamTiltX
_rlnBeamTiltY
_rlnAngleRot
_rlnAngleTilt
_rlnAnglePsi
1@a.mrcs m1 10000 9000 5 300 2.7 0.1 10000 5 64 0.4 -0.1 10 20 30
2@a.mrcs m1 10000 9000 5 300 2.7 0.1 10000 5 64 0.4 -0.1 10 20 30
3@b.mrcs m2 12000 9000 5 300 2.7 0.1 10000 5 64 -0.3 0.2 10 20 30
"""
    f = tmp_path / "legacy.star"
    f.write_text(text)
    ps = read_star(f)
    assert ps.n_groups == 2
    assert "rlnBeamTiltX" not in ps.particles.columns
    np.testing.assert_array_equal(ps.particles["rlnOpticsGroup"], [1, 1, 2])
    assert ps.optics_params(1).beam_tilt_mrad == (0.4, -0.1)
    assert ps.optics_params(2).beam_tilt_mrad == (-0.3, 0.2)


@needs_data
def test_six_groups_aberrations_read_and_written(tmp_path):
    """The real RELION 3.1 file: every group's tilt and Zernike terms, kept on write."""
    ps = read_star(SIX)
    o = ps.optics_params(int(ps.group_numbers()[0]))
    assert o.beam_tilt_mrad == pytest.approx((0.657334, 0.884982))
    assert len(o.odd_zernike) == 6 and o.odd_zernike[0] == pytest.approx(1.70554063513)
    assert len(o.even_zernike) == 9 and o.even_zernike[1] == pytest.approx(27.0686280677)
    out = tmp_path / "out.star"
    write_star(ps, out)
    back = read_star(out)
    for g in ps.group_numbers():
        assert back.aberrations(int(g)) == ps.aberrations(int(g))


def test_set_aberrations_round_trip(tmp_path):
    ps = read_star(_write31(tmp_path))
    ps.set_aberrations(1, beam_tilt_mrad=(-0.25, 0.75), odd=(1.0, 2.0), even=(0.5,))
    out = tmp_path / "set.star"
    write_star(ps, out)
    text = out.read_text()
    assert "[1,2]" in text and "[0.5]" in text
    assert read_star(out).aberrations(1) == ((-0.25, 0.75), (1.0, 2.0), (0.5,))


# ------------------------------------------------------------------------ cryoSPARC .cs
def test_cs_conversion_round_trip_of_representable_terms():
    """relion_to_cs_aberrations then cs_to_relion_aberrations: the beam tilt (with the coma
    terms moved into it by extractTilt), odd terms 0-5 and even terms 4, 5, 7, 8 come back;
    the rest is named as dropped."""
    from cryomag.io.cryosparc import cs_to_relion_aberrations, relion_to_cs_aberrations
    from cryomag.physics.aberrations import beam_tilt_to_odd
    from cryomag.physics.ctf import electron_wavelength_A

    lam = float(electron_wavelength_A(300.0))
    odd = [0.3, -0.2, 4.0, 1.5, -2.0, 3.0, 0.7]
    even = [0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0]
    fields, dropped = relion_to_cs_aberrations((0.4, -0.6), odd, even, 2.7, 300.0)
    assert fields["ctf/tilt_A"].shape == (2,) and fields["ctf/tetra_A"].shape == (4,)
    assert any("rlnOddZernike[6]" in d for d in dropped)
    assert sorted(int(d.split("[")[1].split("]")[0]) for d in dropped if "Even" in d) == [
        0, 1, 2, 3, 6, 9,
    ]  # fmt: skip
    tilt, odd2, even2 = cs_to_relion_aberrations(fields, 2.7, 300.0)
    total = beam_tilt_to_odd(0.4, -0.6, 2.7, lam, odd[:6])
    back = beam_tilt_to_odd(*tilt, 2.7, lam, odd2)
    np.testing.assert_allclose(back[:6], total[:6], rtol=1e-9, atol=1e-9)
    for i in (4, 5, 7, 8):
        assert even2[i] == pytest.approx(even[i], rel=1e-12)
    assert fields["ctf/tilt_A"][0] == pytest.approx(2.7e7 * np.sin(1e-3 * 0.4 + (
        1e-3 * 3 * 2.0 / (2.7 * 20000 * lam**2 * 3.141592654))), rel=1e-9)  # fmt: skip


@needs_data
def test_star_to_cs_to_star_keeps_the_representable_aberrations(tmp_path):
    """The real six-group RELION 3.1 file through cryoSPARC's fields and back: beam tilt and
    odd terms (the phase RELION applies) and the tetrafoil-type even terms survive; the
    terms cryoSPARC cannot hold are returned by write_cs and warned about."""
    from cryomag.io.cryosparc import read_cs, write_cs
    from cryomag.physics.aberrations import phase_even, phase_odd

    ps = read_star(SIX)
    cs = tmp_path / "six.cs"
    with pytest.warns(DataWarning, match="cannot hold"):
        dropped = write_cs(ps, cs)
    assert dropped and all(d.startswith("optics group ") for d in dropped)
    assert all("rlnEvenZernike" in d for d in dropped)  # odd terms 0-5 all representable
    back = read_cs(cs)
    out = tmp_path / "back.star"
    write_star(back, out)
    again = read_star(out)
    kx, ky = np.random.default_rng(0).uniform(-0.35, 0.35, (2, 200))
    g_in = ps.particles["rlnOpticsGroup"].to_numpy(int)
    g_out = again.particles["rlnOpticsGroup"].to_numpy(int)
    for a, b in sorted(set(zip(g_in, g_out, strict=True))):
        o_in, o_out = ps.optics_params(int(a)), again.optics_params(int(b))
        assert o_out.beam_tilt_mrad == pytest.approx(o_in.beam_tilt_mrad, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(
            phase_odd(o_out.odd_coefficients(), kx, ky),
            phase_odd(o_in.odd_coefficients(), kx, ky), rtol=1e-5, atol=1e-5,
        )  # fmt: skip
        keep = [c if i in (4, 5, 7, 8) else 0.0 for i, c in enumerate(o_in.even_zernike)]
        np.testing.assert_allclose(
            phase_even(o_out.even_zernike, kx, ky), phase_even(keep, kx, ky), rtol=1e-5,
            atol=1e-6,
        )  # fmt: skip
        lost = [d for d in dropped if d.startswith(f"optics group {int(a)}:")]
        assert {d.split("rlnEvenZernike[")[1][0] for d in lost} == {"0", "1", "2", "3", "6"}
