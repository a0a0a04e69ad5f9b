"""A reference map computed from an atomic model (gemmi, electron scattering factors).

The map is the model's electrostatic potential as electrons see it: every atom contributes
its electron scattering factor (International Tables Vol. C, table 4.3.2.2: gemmi's
``c4322`` coefficients, five Gaussians per element, ``f(s) = sum_i a_i exp(-b_i s^2 / 4)``,
s = |k| in 1/A) times its Debye-Waller factor ``exp(-B s^2 / 4)`` (the atom's own B-factor
plus ``b_extra``, the blur that matches the data's resolution), with its occupancy. Its
Fourier transform is therefore, exactly,

    F(k) = sum_atoms occ f_el(|k|) exp(-(B_atom + b_extra) |k|^2 / 4) exp(-2 pi i k . (r - c)),

c the model point placed at the centre voxel ``N // 2`` (the rotation centre of the particles'
poses, see :func:`model_map`).

How the grid is filled: gemmi's ``DensityCalculatorE`` sums the Gaussians in real space on a
grid ``oversample`` times finer than the requested one (a voxel of at most 0.6 A), inside a
cubic cell of the requested size (``box * pixel_size_A``); that grid is then band-limited to
the requested grid by cropping its Fourier transform (the Nyquist planes set to 0). The
result is the model's potential band-limited to the requested Nyquist, sampled on a grid
whose spacing is exact by construction (the coordinates are in A; no pixel size enters).
Aliasing of the fine grid folds frequencies above ``1 / a_fine - 1 / (2 a)`` into the band,
where the atoms' Gaussians (B >= 1 A^2 plus the form factors' own widths) have decayed below
1e-6 of their value at 0; gemmi truncates each Gaussian where it falls below 1e-5 of its peak
(``cutoff``), which changes F(k) by less than 1e-4 relative (tests/calibration).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ModelInfo",
    "electron_form_factor",
    "model_extent",
    "model_info",
    "model_map",
    "model_transform",
    "read_model",
]

#: Largest fine-grid voxel (A) on which the atoms' Gaussians are summed.
FINE_VOXEL_A = 0.6
#: gemmi truncates each Gaussian where it falls below this fraction of its peak.
CUTOFF = 1e-8
#: Smallest total B-factor (atom + extra, A^2) used for any atom.
MIN_TOTAL_B = 1.0


def read_model(path: str | os.PathLike):
    """Read a PDB or mmCIF model with gemmi (first model; waters kept, hydrogens kept).

    Parameters
    ----------
    path : path
        ``.pdb``, ``.ent``, ``.cif``, ``.mmcif`` (gzipped allowed).

    Returns
    -------
    gemmi.Structure
        The structure with one model, alternative conformations reduced to the first.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When gemmi cannot read it or it has no atoms (the message names the file).
    """
    import gemmi

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: atomic model not found")
    try:
        st = gemmi.read_structure(str(p))
    except (RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"{p}: not a readable PDB / mmCIF model ({err})") from err
    if len(st) == 0:
        raise ValueError(f"{p}: the file has no model (no ATOM / HETATM records)")
    while len(st) > 1:
        del st[len(st) - 1]
    st.remove_alternative_conformations()
    st.remove_empty_chains()
    n = st[0].count_atom_sites()
    if n == 0:
        raise ValueError(f"{p}: the model has no atoms")
    return st


@dataclass
class ModelInfo:
    """What the map computation took from a model.

    Attributes
    ----------
    n_atoms : int
        Atom sites of the first model.
    elements : dict
        Atom count per element symbol.
    b_iso_range : (float, float)
        Smallest and largest isotropic B-factor (A^2) of the atoms.
    b_iso_mean : float
        Mean B-factor (A^2).
    centre_of_mass_A : (float, float, float)
        Of the atoms (x, y, z), in the model's coordinates.
    """

    n_atoms: int
    elements: dict
    b_iso_range: tuple[float, float]
    b_iso_mean: float
    centre_of_mass_A: tuple[float, float, float]

    def as_dict(self) -> dict:
        """JSON-ready."""
        return {
            "n_atoms": self.n_atoms,
            "elements": self.elements,
            "b_iso_range_A2": list(self.b_iso_range),
            "b_iso_mean_A2": self.b_iso_mean,
            "centre_of_mass_A": list(self.centre_of_mass_A),
        }


def _atoms(st) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Positions (n, 3) in A, B-factors (n,), occupancies (n,) and element symbols."""
    pos, b, occ, el = [], [], [], []
    for ch in st[0]:
        for res in ch:
            for at in res:
                pos.append((at.pos.x, at.pos.y, at.pos.z))
                b.append(at.b_iso)
                occ.append(at.occ)
                el.append(at.element.name)
    return np.asarray(pos, float), np.asarray(b, float), np.asarray(occ, float), el


def model_info(st) -> ModelInfo:
    """Atom count, elements, B-factor range and centre of mass of a gemmi structure."""
    pos, b, _occ, el = _atoms(st)
    names, counts = np.unique(el, return_counts=True)
    com = st[0].calculate_center_of_mass()
    return ModelInfo(
        n_atoms=len(pos),
        elements={str(k): int(v) for k, v in zip(names, counts, strict=True)},
        b_iso_range=(float(b.min()), float(b.max())),
        b_iso_mean=float(b.mean()),
        centre_of_mass_A=(com.x, com.y, com.z),
    )


def model_extent(st, centre_A) -> float:
    """Largest distance (A) of an atom from ``centre_A`` (x, y, z)."""
    pos, *_ = _atoms(st)
    return float(np.sqrt(((pos - np.asarray(centre_A, float)) ** 2).sum(1)).max())


def electron_form_factor(element: str, s: np.ndarray) -> np.ndarray:
    """The electron scattering factor of ``element`` at |k| = ``s`` (1/A), in A.

    gemmi's ``c4322`` coefficients (International Tables Vol. C, table 4.3.2.2):
    ``f(s) = sum_i a_i exp(-b_i s^2 / 4)``.
    """
    import gemmi

    c = gemmi.Element(element).c4322
    s2 = np.asarray(s, float) ** 2 / 4.0
    return sum(a * np.exp(-bb * s2) for a, bb in zip(c.a, c.b, strict=True))


def model_transform(st, centre_A, cell_A: float):
    """A copy of ``st`` translated so that ``centre_A`` lies at the cell centre."""
    import gemmi

    out = st.clone()
    c = np.asarray(centre_A, float)
    shift = gemmi.Vec3(*(0.5 * cell_A - c))
    out[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), shift))
    return out


def _band_limit(fine: np.ndarray, box: int) -> np.ndarray:
    """Crop the Fourier transform of a cube (N_f^3, float) to ``box``^3 (even), keeping the
    frequencies |m| < box / 2 per axis (the Nyquist planes are 0); values stay densities."""
    import scipy.fft

    nf = fine.shape[0]
    h = box // 2
    f = scipy.fft.rfftn(fine, workers=-1)
    keep = np.r_[0:h, nf - h + 1 : nf]  # 0..h-1 and -(h-1)..-1
    dest = np.r_[0:h, box - h + 1 : box]
    g = np.zeros((box, box, h + 1), dtype=f.dtype)
    g[np.ix_(dest, dest, np.arange(h))] = f[np.ix_(keep, keep, np.arange(h))]
    vol = scipy.fft.irfftn(g, s=(box, box, box), workers=-1)
    return (vol * (box / nf) ** 3).astype(np.float32)


def model_map(
    st,
    pixel_size_A: float,
    box: int,
    centre_A,
    b_extra: float = 0.0,
    oversample: int | None = None,
) -> np.ndarray:
    """The model's electron potential on a grid of ``box``^3 voxels of ``pixel_size_A``.

    Parameters
    ----------
    st : gemmi.Structure
        The model (:func:`read_model`); its first model is used.
    pixel_size_A : float
        Voxel size of the map (A), exact: the atoms' coordinates are in A.
    box : int
        Voxels per axis (even).
    centre_A : (float, float, float)
        The model point (x, y, z, A) placed at voxel ``box // 2``: the rotation centre of the
        particles' poses (RELION: the centre of the refined map's box).
    b_extra : float
        B-factor (A^2) added to every atom's own: the blur that matches the data.
    oversample : int, optional
        Fine-grid factor (default: the smallest integer >= 2 giving a voxel <= 0.6 A).

    Returns
    -------
    ndarray of float32, shape (box, box, box)
        Indexed [z, y, x], band-limited to the map's Nyquist (see the module docstring).

    Raises
    ------
    ValueError
        Odd or tiny box, non-positive voxel size, or a model that does not fit in the box
        (the message gives the box it needs).
    """
    import gemmi

    if box % 2 or box < 8:
        raise ValueError(f"box {box}: expected an even number of voxels >= 8")
    if not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise ValueError(f"pixel size {pixel_size_A!r}: expected a voxel size in A > 0")
    if not math.isfinite(b_extra):
        raise ValueError(f"b_extra {b_extra!r}: expected a finite B-factor in A^2")
    cell = box * pixel_size_A
    radius = model_extent(st, centre_A)
    pos, b, *_ = _atoms(st)
    # an atom's potential reaches ~ 3 sigma + the form factor's own width beyond its centre
    b_max = float(b.max()) + max(b_extra, 0.0) + 50.0
    tail = 3.0 * math.sqrt(b_max / (8 * math.pi**2))
    if radius + tail > 0.5 * cell:
        need = 2 * math.ceil((radius + tail) / pixel_size_A)
        raise ValueError(
            f"the model reaches {radius:.1f} A from the centre (+{tail:.1f} A of potential); "
            f"a box of {box} x {pixel_size_A:g} A = {cell:.1f} A does not hold it (expected a "
            f"box of at least {need} voxels, or a centre nearer the model)"
        )
    o = oversample or max(2, math.ceil(pixel_size_A / FINE_VOXEL_A))
    nf = o * box
    moved = model_transform(st, centre_A, cell)
    # no atom below MIN_TOTAL_B: gemmi's Gaussians need a positive width
    extra = max(float(b_extra), MIN_TOTAL_B - float(b.min()))
    dc = gemmi.DensityCalculatorE()
    dc.grid.set_unit_cell(gemmi.UnitCell(cell, cell, cell, 90, 90, 90))
    dc.grid.spacegroup = gemmi.find_spacegroup_by_name("P 1")
    dc.grid.set_size(nf, nf, nf)
    dc.blur = extra
    dc.cutoff = CUTOFF
    dc.put_model_density_on_grid(moved[0])
    fine = np.array(dc.grid, copy=True, dtype=np.float32).transpose(2, 1, 0)  # [x,y,z]->[z,y,x]
    return _band_limit(fine, box)


def effective_b_extra(st, b_extra: float) -> float:
    """The B-factor actually added by :func:`model_map` (raised so no atom is below 1 A^2)."""
    _, b, *_ = _atoms(st)
    return max(float(b_extra), MIN_TOTAL_B - float(b.min()))
