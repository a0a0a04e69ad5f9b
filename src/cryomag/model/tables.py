"""A particle set made from arrays with physical names (the simulator's output), so that
RELION's column names stay in the model layer.

:func:`particle_set_from_arrays` lays the arrays out as RELION 3.1+ tables (particle table in
the order RELION writes, optics table with rlnMagMat and, only when a group has them, the
aberration columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryomag.model.particles import (
    BEAM_TILT_COLUMNS,
    MAGMAT_COLUMNS,
    ZERNIKE_COLUMNS,
    ParticleSet,
    SourceInfo,
    format_zernike,
)

__all__ = ["OpticsGroupRow", "particle_set_from_arrays"]


@dataclass
class OpticsGroupRow:
    """One optics group of :func:`particle_set_from_arrays`.

    Attributes
    ----------
    name : str
    pixel_size_A : float
        Image pixel size (A), also written as the original micrograph pixel size.
    box : int
        Image size (px).
    voltage_kv, cs_mm, amplitude_contrast : float
    mag : ndarray, shape (2, 2)
        rlnMagMat (k_ref = M k_obs).
    beam_tilt_mrad : (float, float), optional
    odd_zernike, even_zernike : sequence of float, optional
        RELION order (rad).
    """

    name: str
    pixel_size_A: float
    box: int
    voltage_kv: float
    cs_mm: float
    amplitude_contrast: float
    mag: np.ndarray
    beam_tilt_mrad: Sequence[float] | None = None
    odd_zernike: Sequence[float] | None = None
    even_zernike: Sequence[float] | None = None


def particle_set_from_arrays(
    *,
    image_names: Sequence[str],
    micrographs: np.ndarray,
    coordinates_px: np.ndarray,
    optics_group: np.ndarray,
    defocus_uva: np.ndarray,
    phase_shift_deg: np.ndarray,
    euler_deg: np.ndarray,
    origin_A: np.ndarray,
    half_sets: np.ndarray,
    optics: Sequence[OpticsGroupRow],
) -> ParticleSet:
    """A ParticleSet from per-particle arrays and optics rows.

    Parameters
    ----------
    image_names : sequence of str, length N
        ``index@stack`` (1-based index).
    micrographs : ndarray, shape (N,)
    coordinates_px : ndarray, shape (N, 2)
        Picking coordinates (x, y) in the micrograph (px).
    optics_group : ndarray of int, shape (N,)
        Optics group number (1-based; the row's position in ``optics`` + 1).
    defocus_uva : ndarray, shape (N, 3)
        DefocusU, DefocusV (A), astigmatism angle (deg).
    phase_shift_deg : ndarray, shape (N,)
    euler_deg : ndarray, shape (N, 3)
        RELION's (rot, tilt, psi).
    origin_A : ndarray, shape (N, 2)
        Origin (x, y) in A.
    half_sets : ndarray of int, shape (N,)
        1 or 2.
    optics : sequence of OpticsGroupRow

    Returns
    -------
    ParticleSet
        Contrast scale 1 and B-factor 0 for every particle.
    """
    n = len(image_names)
    euler = np.asarray(euler_deg, float)
    origin = np.asarray(origin_A, float)
    dz = np.asarray(defocus_uva, float)
    coords = np.asarray(coordinates_px)
    particles = pd.DataFrame(
        {
            "rlnImageName": list(image_names),
            "rlnMicrographName": micrographs,
            "rlnCoordinateX": coords[:, 0],
            "rlnCoordinateY": coords[:, 1],
            "rlnOpticsGroup": optics_group,
            "rlnDefocusU": dz[:, 0],
            "rlnDefocusV": dz[:, 1],
            "rlnDefocusAngle": dz[:, 2],
            "rlnPhaseShift": np.asarray(phase_shift_deg, float),
            "rlnCtfBfactor": np.zeros(n),
            "rlnCtfScalefactor": np.ones(n),
            "rlnAngleRot": euler[:, 0],
            "rlnAngleTilt": euler[:, 1],
            "rlnAnglePsi": euler[:, 2],
            "rlnOriginXAngst": origin[:, 0],
            "rlnOriginYAngst": origin[:, 1],
            "rlnRandomSubset": np.asarray(half_sets).astype(int),
        }
    )
    rows = []
    for gi, g in enumerate(optics):
        mg = np.asarray(g.mag, float)
        rows.append(
            {
                "rlnOpticsGroup": gi + 1,
                "rlnOpticsGroupName": g.name,
                "rlnAmplitudeContrast": g.amplitude_contrast,
                "rlnSphericalAberration": g.cs_mm,
                "rlnVoltage": g.voltage_kv,
                "rlnImagePixelSize": g.pixel_size_A,
                "rlnMicrographOriginalPixelSize": g.pixel_size_A,
                "rlnImageSize": g.box,
                "rlnImageDimensionality": 2,
                "rlnCtfDataAreCtfPremultiplied": 0,
                **{c: mg.reshape(4)[j] for j, c in enumerate(MAGMAT_COLUMNS)},
            }
        )
    table = pd.DataFrame(rows)
    if any(g.beam_tilt_mrad for g in optics):  # RELION's columns, only when used
        for j, c in enumerate(BEAM_TILT_COLUMNS):
            table[c] = [float((g.beam_tilt_mrad or [0, 0])[j]) for g in optics]
    for c, attr in zip(ZERNIKE_COLUMNS, ("odd_zernike", "even_zernike"), strict=True):
        if any(getattr(g, attr) for g in optics):
            table[c] = [format_zernike(getattr(g, attr) or []) for g in optics]
    return ParticleSet(particles, table, SourceInfo(kind="memory"))
