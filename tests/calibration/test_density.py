"""The model map of cryomag.calibration.density against analytic ground truth: the Fourier
transform of one atom's potential is its form factor times its Debye-Waller factor, with the
phase of its position; the grid's spacing is exact."""

from __future__ import annotations

import numpy as np
import pytest

gemmi = pytest.importorskip("gemmi")

from cryomag.calibration.density import (  # noqa: E402
    electron_form_factor,
    model_map,
    read_model,
)


def _structure(atoms) -> object:
    """A gemmi structure of (element, (x, y, z), B) atoms."""
    st = gemmi.Structure()
    model = gemmi.Model(1)
    chain = gemmi.Chain("A")
    for i, (el, xyz, b) in enumerate(atoms):
        res = gemmi.Residue()
        res.name = "UNK"
        res.seqid = gemmi.SeqId(i + 1, " ")
        a = gemmi.Atom()
        a.name = el
        a.element = gemmi.Element(el)
        a.pos = gemmi.Position(*xyz)
        a.b_iso = b
        a.occ = 1.0
        res.add_atom(a)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    return st


def _transform(vol: np.ndarray, pixel: float):
    """Continuous Fourier transform (A^3 x density) with the centre voxel as origin, and |k|."""
    n = vol.shape[0]
    f = np.fft.fftn(np.fft.ifftshift(vol)) * pixel**3
    k = np.fft.fftfreq(n, d=pixel)
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    return f, (kx, ky, kz)


@pytest.mark.parametrize(("element", "b", "pixel"), [("C", 20.0, 1.1), ("S", 45.0, 0.83)])
def test_single_atom_transform_is_form_factor_times_debye_waller(element, b, pixel):
    centre = (10.3, -2.1, 5.5)
    vol = model_map(_structure([(element, centre, b)]), pixel, 48, centre)
    f, (kx, ky, kz) = _transform(vol, pixel)
    s = np.sqrt(kx**2 + ky**2 + kz**2)
    truth = electron_form_factor(element, s) * np.exp(-b * s**2 / 4)
    band = s < 0.45 / pixel
    assert np.abs(f[band] - truth[band]).max() < 1e-4 * truth.max()
    assert np.abs(f.imag).max() < 1e-5 * truth.max()  # a centred atom: a real transform


def test_displaced_atom_has_the_phase_of_its_position():
    """An atom at c + d: F(k) = f(k) DW(k) exp(-2 pi i k.d) -- the voxel size is exact."""
    pixel, d = 0.9, np.array([3.7, -5.2, 1.9])
    c = np.zeros(3)
    vol = model_map(_structure([("N", tuple(c + d), 30.0)]), pixel, 48, tuple(c))
    f, (kx, ky, kz) = _transform(vol, pixel)
    s = np.sqrt(kx**2 + ky**2 + kz**2)
    phase = np.exp(-2j * np.pi * (kx * d[0] + ky * d[1] + kz * d[2]))
    truth = electron_form_factor("N", s) * np.exp(-30.0 * s**2 / 4) * phase
    band = s < 0.45 / pixel
    assert np.abs(f[band] - truth[band]).max() < 1e-4 * np.abs(truth).max()


def test_bad_geometry_and_files(tmp_path):
    st = _structure([("C", (0, 0, 0), 20.0), ("C", (30.0, 0, 0), 20.0)])
    with pytest.raises(ValueError, match="expected a box of at least"):
        model_map(st, 1.0, 32, (0, 0, 0))
    with pytest.raises(ValueError, match="even number"):
        model_map(st, 1.0, 33, (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="atomic model not found"):
        read_model(tmp_path / "none.pdb")
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell.length_a 10\n")
    with pytest.raises(ValueError, match="bad.cif"):
        read_model(bad)
