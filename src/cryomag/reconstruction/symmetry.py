"""Point-group symmetry operators in RELION's conventions.

A symmetry group is given by its RELION name (case-insensitive):

- ``Cn``: n-fold axis along z (RELION: ``rot_axis n 0 0 1``).
- ``Dn``: n-fold axis along z and a 2-fold axis along x (``rot_axis 2 1 0 0``); the other
  n - 1 two-fold axes lie in the xy plane.
- ``T``: 3-fold along z, 2-fold along (0, 0.816496, 0.577350).
- ``O``: 3-fold along (1, 1, 1) / sqrt(3), 4-fold along z.
- ``I`` (= ``I2``), ``I1``, ``I3``, ``I4``: the icosahedral settings of RELION
  (src/symmetries.cpp, ``fill_symmetry_class``).

Each group is generated from these axes by closure, so its operators form a group (tested).
Operators are proper rotations R (3 x 3) acting on map coordinates: a map f is symmetric when
f(R x) = f(x) for every R. A particle with RELION matrix A (a map point r projects to
(A r)_xy) then shows the same image as a particle with matrix A R, whose central slice
samples the frequencies R^T A^T (u, 0): reconstructing with symmetry adds each particle at
all of these |G| orientations (see :mod:`cryomag.reconstruction.backproject`).
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["SymmetryError", "group_order", "symmetry_operators"]

_GOLDEN_AXES = {
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))],
    "I1": [
        (2, (1, 0, 0)),
        (5, (0.85065080702670, 0, -0.5257311142635)),
        (3, (0.9341723640, 0.3568220765, 0)),
    ],
    "I3": [
        (2, (-0.5257311143, 0, 0.8506508070)),
        (5, (0, 0, 1)),
        (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
    "I4": [
        (2, (0.5257311143, 0, 0.8506508070)),
        (5, (0.8944271932547096, 0, 0.4472135909903704)),
        (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
}


class SymmetryError(ValueError):
    """An unknown or unsupported symmetry name."""


def axis_rotation(fold: int, axis) -> np.ndarray:
    """Rotation by 360 / fold degrees about ``axis`` (right-handed), shape (3, 3)."""
    u = np.asarray(axis, float)
    u = u / np.linalg.norm(u)
    ang = 2 * np.pi / fold
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * (k @ k)


def _generators(name: str) -> list[np.ndarray]:
    s = name.strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", s)
    if m:
        n = int(m.group(2))
        if n < 1 or (m.group(1) == "D" and n < 2):
            raise SymmetryError(f"symmetry {name!r}: order must be >= 1 (C) or >= 2 (D)")
        gens = [axis_rotation(n, (0, 0, 1))] if n > 1 else []
        if m.group(1) == "D":
            gens.append(axis_rotation(2, (1, 0, 0)))
        return gens
    if s == "T":
        return [axis_rotation(3, (0, 0, 1)), axis_rotation(2, (0, 0.816496, 0.577350))]
    if s == "O":
        return [axis_rotation(3, (1, 1, 1)), axis_rotation(4, (0, 0, 1))]
    if s == "I":
        s = "I2"
    if s in _GOLDEN_AXES:
        return [axis_rotation(f, ax) for f, ax in _GOLDEN_AXES[s]]
    raise SymmetryError(
        f"unknown symmetry {name!r}: expected Cn (n >= 1), Dn (n >= 2), T, O, I, I1, I2, I3 or I4"
    )


def _close(gens: list[np.ndarray], max_order: int = 120) -> np.ndarray:
    """All products of the generators (a finite rotation group), identity first."""
    ops = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in gens:
                p = g @ a
                # RELION's axes are given to ~1e-9; 1e-5 separates distinct operators easily
                if not any(np.abs(p - o).max() < 1e-5 for o in ops):
                    ops.append(p)
                    new.append(p)
        if len(ops) > max_order:
            raise SymmetryError("symmetry generators do not close into a finite group")
        frontier = new
    out = np.array(ops)
    # snap to exact orthogonal matrices (polar decomposition) to remove generator rounding
    u, _, vt = np.linalg.svd(out)
    return u @ vt


def symmetry_operators(name: str) -> np.ndarray:
    """The rotations of a point group.

    Parameters
    ----------
    name : str
        RELION symmetry name: ``C1``, ``C4``, ``D7``, ``T``, ``O``, ``I`` ... (see module
        docstring for the axis conventions).

    Returns
    -------
    ndarray, shape (G, 3, 3)
        The G operators, identity first; each is a proper rotation acting on map coordinates
        (x, y, z) in A.

    Raises
    ------
    SymmetryError
        Unknown name.

    Examples
    --------
    >>> symmetry_operators("D2").shape
    (4, 3, 3)
    """
    return _close(_generators(name))


def group_order(name: str) -> int:
    """Number of operators of the group ``name`` (C_n: n, D_n: 2n, T: 12, O: 24, I: 60)."""
    return len(symmetry_operators(name))
