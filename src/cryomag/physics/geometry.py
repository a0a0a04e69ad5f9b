"""Rotations in RELION's convention (Euler ZYZ) and cryoSPARC's (rotation vectors).

RELION's matrix A = Euler_angles2matrix(rot, tilt, psi) maps a map point r (A, relative to the
map centre) to the image: it projects to (A r)_xy. The 3D reference frequency sampled by an
image frequency (kx, ky) is A^T (kx, ky, 0). In scipy terms
``A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T``.
cryoSPARC's ``alignments3D/pose`` is a rotation vector with
``Rotation.from_rotvec(pose) == Rotation.from_euler("ZYZ", [rot, tilt, psi])``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def euler_to_matrix(euler_deg: np.ndarray) -> np.ndarray:
    """RELION rotation matrices A from (rot, tilt, psi).

    Parameters
    ----------
    euler_deg : ndarray, shape (N, 3) or (3,)
        Euler angles in degrees.

    Returns
    -------
    ndarray, shape (N, 3, 3) or (3, 3)
        A such that a map point r projects to (A r)_xy.
    """
    e = np.asarray(euler_deg, float)
    mats = Rotation.from_euler("ZYZ", e.reshape(-1, 3), degrees=True).as_matrix()
    mats = np.swapaxes(mats, -1, -2)
    return mats[0] if e.ndim == 1 else mats


def matrix_to_euler(mats: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix`: (rot, tilt, psi) in degrees, shape (N, 3)."""
    m = np.asarray(mats, float)
    e = Rotation.from_matrix(np.swapaxes(m.reshape(-1, 3, 3), -1, -2)).as_euler("ZYZ", degrees=True)
    return e[0] if m.ndim == 2 else e


def rotvec_to_euler(rotvec: np.ndarray) -> np.ndarray:
    """cryoSPARC pose (rotation vector, rad), shape (N, 3) -> RELION (rot, tilt, psi) in deg."""
    r = np.asarray(rotvec, float)
    e = Rotation.from_rotvec(r.reshape(-1, 3)).as_euler("ZYZ", degrees=True)
    return e[0] if r.ndim == 1 else e


def euler_to_rotvec(euler_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in deg, shape (N, 3) -> cryoSPARC pose (rotation vector, rad)."""
    e = np.asarray(euler_deg, float)
    r = Rotation.from_euler("ZYZ", e.reshape(-1, 3), degrees=True).as_rotvec()
    return r[0] if e.ndim == 1 else r
