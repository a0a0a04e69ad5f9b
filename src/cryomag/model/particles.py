"""The in-memory particle set shared by every reader, writer and estimator.

A :class:`ParticleSet` holds two tables with RELION column names (the common language of
the field) plus where they came from:

- ``particles``: one row per particle. Columns used by cryomag (all in RELION units):
  ``rlnImageName`` (``"000001@stack.mrcs"``, 1-based), ``rlnMicrographName``,
  ``rlnOpticsGroup`` (1-based, refers to ``optics``), ``rlnDefocusU``/``rlnDefocusV`` (A,
  positive = underfocus), ``rlnDefocusAngle`` (deg), ``rlnPhaseShift`` (deg),
  ``rlnCtfBfactor`` (A^2), ``rlnCtfScalefactor``, ``rlnAngleRot``/``Tilt``/``Psi`` (deg),
  ``rlnOriginXAngst``/``rlnOriginYAngst`` (A), ``rlnRandomSubset`` (1 or 2). Any other
  column read from a file is kept untouched and written back.
- ``optics``: one row per optics group: ``rlnOpticsGroup``, ``rlnOpticsGroupName``,
  ``rlnImagePixelSize`` (A/px), ``rlnImageSize`` (px), ``rlnVoltage`` (kV),
  ``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast``, ``rlnMagMat00..11``, and the
  fixed aberrations ``rlnBeamTiltX``/``rlnBeamTiltY`` (mrad), ``rlnOddZernike``,
  ``rlnEvenZernike`` (rad, RELION order, written ``[a,b,c]``; see
  :mod:`cryomag.physics.aberrations`). As in RELION 3.1+ (obs_model.cpp:73-84) they are
  read from the optics table only; a RELION 3.0 file's per-particle rlnBeamTiltX/Y become
  optics-group values on reading (as relion_convert_star, star_converter.cpp:38-47).

Magnification matrices follow RELION: ``k_ref = M @ k_obs`` (see CONVENTIONS.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from cryomag.model.validation import ValidationLimits

MAGMAT_COLUMNS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")
DEFOCUS_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
#: RELION's beam tilt columns (mrad), optics table.
BEAM_TILT_COLUMNS = ("rlnBeamTiltX", "rlnBeamTiltY")
#: RELION's Zernike coefficient columns (rad, RELION order), optics table: (odd, even).
ZERNIKE_COLUMNS = ("rlnOddZernike", "rlnEvenZernike")

#: Particle columns every estimator needs, with the unit, for error messages.
REQUIRED_PARTICLE_COLUMNS = {
    "rlnOpticsGroup": "optics group number (1-based)",
    "rlnDefocusU": "defocus U in A",
    "rlnDefocusV": "defocus V in A",
    "rlnDefocusAngle": "astigmatism angle in degrees",
    "rlnAngleRot": "Euler angle rot in degrees",
    "rlnAngleTilt": "Euler angle tilt in degrees",
    "rlnAnglePsi": "Euler angle psi in degrees",
    "rlnOriginXAngst": "origin X in A",
    "rlnOriginYAngst": "origin Y in A",
}

REQUIRED_OPTICS_COLUMNS = {
    "rlnOpticsGroup": "optics group number (1-based)",
    "rlnImagePixelSize": "pixel size in A",
    "rlnImageSize": "box size in pixels",
    "rlnVoltage": "voltage in kV",
    "rlnSphericalAberration": "Cs in mm",
    "rlnAmplitudeContrast": "amplitude contrast (fraction)",
}

#: Defaults for optional particle columns that have a neutral value.
PARTICLE_DEFAULTS = {
    "rlnPhaseShift": 0.0,
    "rlnCtfBfactor": 0.0,
    "rlnCtfScalefactor": 1.0,
}


def parse_zernike(value: Any) -> tuple[float, ...]:
    """A Zernike vector as RELION writes it (``[a,b,c]``, no spaces) or a sequence -> floats.

    Empty (``[]``, ``""``, None, NaN) gives ``()``. Raises ValueError for text that is not a
    comma-separated list of numbers; the values are not checked for finiteness here
    (:func:`cryomag.model.validation.validate_particle_set` does that, naming the row).
    """
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        text = text.strip()
        if not text:
            return ()
        return tuple(float(v) for v in text.split(","))
    if isinstance(value, float | np.floating) and np.isnan(value):
        return ()
    return tuple(float(v) for v in np.ravel(value))


def format_zernike(values) -> str:
    """Coefficients -> RELION's ``[a,b,c]`` text (12 significant digits, no spaces)."""
    return "[" + ",".join(f"{float(v):.12g}" for v in values) + "]"


class ParticleDataError(ValueError):
    """Bad or missing particle metadata; the message names the file, row/column and expectation."""


def _current_limits() -> ValidationLimits:
    from cryomag.model.validation import current_limits

    return current_limits()


@dataclass
class SourceInfo:
    """Where a particle set came from, so that writers can keep what they did not change.

    Attributes
    ----------
    path : Path or None
        The file read (STAR or .cs); ``None`` for sets built in memory.
    kind : str
        ``"star"``, ``"cs"`` or ``"memory"``.
    star_version : str or None
        The ``# version NNNNN`` line of a STAR file, kept on write.
    extra_blocks : dict
        STAR data blocks other than optics and particles, in file order, kept on write.
    block_order : list of str
        Order of the data blocks in the source STAR file.
    cs_data : Any
        For .cs input: the original structured array (primary joined with passthrough),
        kept so that a written .cs carries every input field.
    legacy : bool
        True for RELION 3.0 STAR files (no optics table).
    has_poses : bool
        False when the source had no orientations (a .cs file without ``alignments3D``, a STAR
        file without ``rlnAngleRot/Tilt/Psi``): the reader then filled angles and origins
        with 0, and these zeros are not real poses.
    filled_columns : list of str
        Particle columns the reader added with a default value (not in the file). Writers
        leave them out again while they still hold that default.
    nonloop_blocks : list of str
        Names of STAR blocks written as ``_label value`` pairs rather than a ``loop_``.
    passthrough : Path or None
        For .cs input: the passthrough file joined to the primary file, if any.
    """

    path: Path | None = None
    kind: str = "memory"
    star_version: str | None = None
    extra_blocks: dict[str, pd.DataFrame] = field(default_factory=dict)
    block_order: list[str] = field(default_factory=list)
    cs_data: Any = None
    legacy: bool = False
    has_poses: bool = True
    filled_columns: list[str] = field(default_factory=list)
    nonloop_blocks: list[str] = field(default_factory=list)
    passthrough: Path | None = None


@dataclass
class ParticleSet:
    """A particle table and its optics groups, with lazy access to the images.

    Parameters
    ----------
    particles : pandas.DataFrame
        One row per particle, RELION column names (see module docstring).
    optics : pandas.DataFrame
        One row per optics group, RELION column names.
    source : SourceInfo
        Provenance, used by the writers to keep untouched content.
    limits : ValidationLimits
        The relaxable limits of :meth:`validate` (negative Cs, largest defocus); default: the
        limits in force when the set is made (:func:`cryomag.model.validation.validation_limits`).
    """

    particles: pd.DataFrame
    optics: pd.DataFrame
    source: SourceInfo = field(default_factory=SourceInfo)
    limits: ValidationLimits = field(default_factory=_current_limits)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.particles)

    @property
    def name(self) -> str:
        """A short label for messages: the source file name or ``"<memory>"``."""
        return str(self.source.path) if self.source.path is not None else "<memory>"

    def __cryomag_token__(self) -> str:
        """Content digest of both tables: the set travels once per worker process."""
        h = hashlib.sha1(self.name.encode())
        for df in (self.particles, self.optics):
            h.update(",".join(map(str, df.columns)).encode())
            h.update(pd.util.hash_pandas_object(df, index=True).to_numpy().tobytes())
        return h.hexdigest()

    def copy(self) -> ParticleSet:
        """Deep copy of both tables (the source information is shared)."""
        return ParticleSet(self.particles.copy(), self.optics.copy(), self.source, self.limits)

    def validate(self) -> None:
        """Check that every column an engine uses is present, finite and physical.

        The rules are those of :mod:`cryomag.model.validation` (under ``self.limits``); the
        first violation raises :class:`ParticleDataError` naming the file, the row (1-based),
        the column, the value and what was expected.
        """
        from cryomag.model.validation import validate_particle_set

        validate_particle_set(self)

    # ------------------------------------------------------------ per group
    @property
    def n_groups(self) -> int:
        return len(self.optics)

    def group_numbers(self) -> np.ndarray:
        """The optics group numbers (1-based, as in the file), shape (G,)."""
        return self.optics["rlnOpticsGroup"].to_numpy(int)

    def group_index(self) -> np.ndarray:
        """For each particle, the 0-based row of its optics group in ``optics``, shape (N,)."""
        numbers = self.group_numbers()
        order = np.argsort(numbers, kind="stable")
        values = self.particles["rlnOpticsGroup"].to_numpy(int)
        pos = np.searchsorted(numbers[order], values)
        pos = np.clip(pos, 0, len(numbers) - 1)
        if len(values) and not np.array_equal(numbers[order][pos], values):
            bad = values[numbers[order][pos] != values][0]
            raise ParticleDataError(f"{self.name}: optics group {bad} is not in the optics table")
        return order[pos].astype(int)

    def mag_matrices(self) -> np.ndarray:
        """RELION magnification matrix per optics group, shape (G, 2, 2); identity if absent."""
        mats = np.tile(np.eye(2), (self.n_groups, 1, 1))
        if all(c in self.optics.columns for c in MAGMAT_COLUMNS):
            vals = self.optics[list(MAGMAT_COLUMNS)].to_numpy(float, copy=True)
            mats = vals.reshape(-1, 2, 2)
        return mats

    def set_mag_matrices(self, mats: np.ndarray) -> None:
        """Write RELION matrices, shape (G, 2, 2), into ``rlnMagMat00..11``."""
        mats = np.asarray(mats, float).reshape(self.n_groups, 4)
        for j, col in enumerate(MAGMAT_COLUMNS):
            self.optics[col] = mats[:, j]

    def mag_matrix(self, group: int) -> np.ndarray:
        """RELION magnification matrix of optics group number ``group``, shape (2, 2)."""
        return self.mag_matrices()[self.group_row(group)]

    def group_row(self, group: int) -> int:
        """The 0-based row of optics group number ``group`` in ``optics``."""
        hit = np.flatnonzero(self.group_numbers() == int(group))
        if not len(hit):
            raise ParticleDataError(f"{self.name}: optics group {group} is not in the optics table")
        return int(hit[0])

    def group_rows(self, group: int) -> np.ndarray:
        """Particle rows (0-based, sorted) of optics group number ``group``, shape (n,)."""
        return np.flatnonzero(self.particles["rlnOpticsGroup"].to_numpy(int) == int(group))

    def groups_used(self) -> list[int]:
        """Optics group numbers that have particles, in the optics table's order."""
        used = set(self.particles["rlnOpticsGroup"].to_numpy(int).tolist())
        return [int(g) for g in self.group_numbers() if int(g) in used]

    def optics_params(self, group: int):
        """The forward model's constants of optics group number ``group``.

        Returns
        -------
        cryomag.physics.forward.OpticsParams
            Pixel size (A), box (px), voltage (kV), Cs (mm), amplitude contrast, and the
            fixed aberrations (beam tilt in mrad, odd and even Zernike terms; absent = 0).
        """
        from cryomag.physics.forward import OpticsParams

        o = self.optics.iloc[self.group_row(group)]
        tilt, odd, even = self.aberrations(group)
        return OpticsParams(
            pixel_size_A=float(o["rlnImagePixelSize"]),
            box=int(o["rlnImageSize"]),
            voltage_kv=float(o["rlnVoltage"]),
            cs_mm=float(o["rlnSphericalAberration"]),
            amplitude_contrast=float(o["rlnAmplitudeContrast"]),
            beam_tilt_mrad=tilt,
            odd_zernike=odd,
            even_zernike=even,
        )

    def aberrations(self, group: int) -> tuple[tuple[float, float], tuple[float, ...],
                                               tuple[float, ...]]:  # fmt: skip
        """The fixed aberrations of optics group number ``group``.

        Returns
        -------
        beam_tilt_mrad : (float, float)
            rlnBeamTiltX, rlnBeamTiltY (mrad), 0 when absent.
        odd, even : tuple of float
            rlnOddZernike, rlnEvenZernike (rad, RELION order), ``()`` when absent.
        """
        o = self.optics.iloc[self.group_row(group)]
        tilt = tuple(
            float(o[c]) if c in self.optics.columns and not pd.isna(o[c]) else 0.0
            for c in BEAM_TILT_COLUMNS
        )
        odd, even = (
            parse_zernike(o[c]) if c in self.optics.columns else () for c in ZERNIKE_COLUMNS
        )
        return (tilt[0], tilt[1]), odd, even

    def set_aberrations(self, group: int, beam_tilt_mrad=None, odd=None, even=None) -> None:
        """Write the aberrations of optics group number ``group`` (None: leave unchanged).

        Parameters
        ----------
        beam_tilt_mrad : (float, float), optional
            rlnBeamTiltX, rlnBeamTiltY (mrad).
        odd, even : sequence of float, optional
            rlnOddZernike, rlnEvenZernike (rad), written as RELION's ``[a,b,c]``.
        """
        row = self.optics.index[self.group_row(group)]
        if beam_tilt_mrad is not None:
            for c, v in zip(BEAM_TILT_COLUMNS, beam_tilt_mrad, strict=True):
                if c not in self.optics.columns:
                    self.optics[c] = 0.0
                self.optics.loc[row, c] = float(v)
        for c, vals in zip(ZERNIKE_COLUMNS, (odd, even), strict=True):
            if vals is None:
                continue
            if c not in self.optics.columns:
                self.optics[c] = "[]"
            self.optics[c] = self.optics[c].astype(object)
            self.optics.loc[row, c] = format_zernike(vals)

    def geometry(self, rows: np.ndarray, mag: np.ndarray, ctf_mag: np.ndarray | None = None,
                 ctf_scale: bool = True):  # fmt: skip
        """The forward model's per-particle inputs of ``rows``.

        Parameters
        ----------
        rows : ndarray of int, shape (n,)
            Particle rows (0-based).
        mag : ndarray, shape (2, 2) or (n, 2, 2)
            Magnification matrix M at which the reference is sampled (k_ref = M k_obs).
        ctf_mag : ndarray, shape (2, 2) or (n, 2, 2), optional
            Frame of the CTF's defocus term (None: the CTF moves with ``mag``).
        ctf_scale : bool
            Use rlnCtfScalefactor (else 1).

        Returns
        -------
        cryomag.physics.forward.ParticleGeometry
        """
        from cryomag.physics.forward import ParticleGeometry

        rows = np.asarray(rows)
        t = self.particles.iloc[rows]

        def col(name):
            if name in t.columns:
                return t[name].to_numpy(float)
            if name in REQUIRED_PARTICLE_COLUMNS:
                self.column(name)  # raises, naming the column
            return np.full(len(rows), PARTICLE_DEFAULTS.get(name, 0.0))

        return ParticleGeometry(
            euler_deg=np.stack([col("rlnAngleRot"), col("rlnAngleTilt"), col("rlnAnglePsi")], 1),
            origin_A=np.stack([col("rlnOriginXAngst"), col("rlnOriginYAngst")], 1),
            mag=mag,
            defocus_u_A=col("rlnDefocusU"),
            defocus_v_A=col("rlnDefocusV"),
            defocus_angle_deg=col("rlnDefocusAngle"),
            phase_shift_deg=col("rlnPhaseShift"),
            bfactor_A2=col("rlnCtfBfactor"),
            ctf_scale=col("rlnCtfScalefactor") if ctf_scale else np.ones(len(rows)),
            ctf_mag=ctf_mag,
        )

    def reexpress_astigmatism(self, rows: np.ndarray, mats: np.ndarray) -> None:
        """Re-express the astigmatism of ``rows`` for frequencies transformed by ``mats``.

        Adef <- mats^T Adef mats per particle (rlnDefocusU/V/Angle rewritten in place; see
        :func:`cryomag.physics.ctf.transform_astigmatism`). With ``mats = inc^-1``, inc the
        change of M, the CTF stays what it was (RELION's adaptation after --fit_aniso).

        Parameters
        ----------
        rows : ndarray of int, shape (n,)
        mats : ndarray, shape (2, 2) or (n, 2, 2)
        """
        from cryomag.physics.ctf import transform_astigmatism

        cols = DEFOCUS_COLUMNS
        du, dv, ang = (self.column(c)[rows] for c in cols)
        new = transform_astigmatism(du, dv, ang, mats)
        for c, val in zip(cols, new, strict=True):
            arr = self.column(c)
            arr[rows] = val
            self.particles[c] = arr

    def defocus_mean_A(self) -> np.ndarray:
        """(rlnDefocusU + rlnDefocusV) / 2 per particle (A), shape (N,)."""
        return 0.5 * (self.column("rlnDefocusU") + self.column("rlnDefocusV"))

    def optics_value(self, column: str) -> np.ndarray:
        """An optics column as floats, shape (G,)."""
        return self.optics[column].to_numpy(float)

    # --------------------------------------------------------- per particle
    def column(self, name: str, default: float | None = None) -> np.ndarray:
        """A particle column as float64, shape (N,); ``default`` fills a missing column."""
        if name not in self.particles.columns:
            if default is None and name in PARTICLE_DEFAULTS:
                default = PARTICLE_DEFAULTS[name]
            if default is None:
                raise ParticleDataError(
                    f"{self.name}: particle table has no column {name}"
                    + (
                        f" (expected {REQUIRED_PARTICLE_COLUMNS[name]})"
                        if name in REQUIRED_PARTICLE_COLUMNS
                        else ""
                    )
                )
            return np.full(len(self), float(default))
        return self.particles[name].to_numpy(float, copy=True)

    def euler_deg(self) -> np.ndarray:
        """(rot, tilt, psi) per particle in degrees, shape (N, 3)."""
        return np.stack(
            [self.column("rlnAngleRot"), self.column("rlnAngleTilt"), self.column("rlnAnglePsi")],
            axis=1,
        )

    def origin_A(self) -> np.ndarray:
        """(rlnOriginXAngst, rlnOriginYAngst) per particle in A, shape (N, 2)."""
        return np.stack([self.column("rlnOriginXAngst"), self.column("rlnOriginYAngst")], axis=1)

    def micrographs(self) -> np.ndarray:
        """Micrograph name per particle (``"?"`` when the column is absent), shape (N,)."""
        if "rlnMicrographName" not in self.particles.columns:
            return np.full(len(self), "?", dtype=object)
        return self.particles["rlnMicrographName"].astype(str).to_numpy()

    def half_sets(self) -> np.ndarray:
        """rlnRandomSubset per particle (1 or 2); alternating 1, 2 when absent. Shape (N,)."""
        if "rlnRandomSubset" in self.particles.columns:
            return self.particles["rlnRandomSubset"].to_numpy(int)
        return (np.arange(len(self)) % 2 + 1).astype(int)

    def select(self, mask_or_index: np.ndarray) -> ParticleSet:
        """A new set with the chosen particles (optics table copied whole)."""
        idx = np.asarray(mask_or_index)
        sub = self.particles.iloc[np.flatnonzero(idx) if idx.dtype == bool else idx]
        return ParticleSet(
            sub.reset_index(drop=True), self.optics.copy(), self.source, self.limits
        )

    # ------------------------------------------------- named access for the engines
    # The engines, workflows and reports read and write the tables through these, so that
    # RELION's column names stay in io/ and model/.
    def particle_group_numbers(self) -> np.ndarray:
        """Each particle's optics group number (as in the file), shape (N,)."""
        return self.particles["rlnOpticsGroup"].to_numpy(int)

    def set_particle_group_numbers(self, numbers: np.ndarray) -> None:
        """Assign each particle to optics group number ``numbers[i]``, shape (N,)."""
        self.particles["rlnOpticsGroup"] = np.asarray(numbers, int)

    def pixel_sizes_A(self) -> np.ndarray:
        """Declared image pixel size of each optics group (A), shape (G,)."""
        return self.optics_value("rlnImagePixelSize")

    def set_pixel_sizes_A(self, values: np.ndarray) -> None:
        """Set each optics group's declared image pixel size (A), shape (G,)."""
        self.optics["rlnImagePixelSize"] = np.asarray(values, float)

    def boxes_px(self) -> np.ndarray:
        """Image box of each optics group (px), shape (G,)."""
        return self.optics["rlnImageSize"].to_numpy(int)

    def set_boxes_px(self, values: np.ndarray) -> None:
        """Set each optics group's image box (px), shape (G,)."""
        self.optics["rlnImageSize"] = np.asarray(values, int)

    def group_names(self) -> list[str]:
        """Each optics group's name (rlnOpticsGroupName, or ``opticsGroup<N>``), length G."""
        if "rlnOpticsGroupName" in self.optics.columns:
            return [str(v) for v in self.optics["rlnOpticsGroupName"]]
        return [f"opticsGroup{g}" for g in self.group_numbers()]

    def defocus_uva(self) -> np.ndarray:
        """(defocus U (A), defocus V (A), astigmatism angle (deg)) per particle, shape (N, 3)."""
        return np.stack([self.column(c) for c in DEFOCUS_COLUMNS], axis=1)

    def set_defocus_uva(self, values: np.ndarray) -> None:
        """Write (U (A), V (A), angle (deg)) per particle, shape (N, 3)."""
        values = np.asarray(values, float)
        for j, c in enumerate(DEFOCUS_COLUMNS):
            self.particles[c] = values[:, j]

    def contrast_scales(self, default: float = 1.0) -> np.ndarray:
        """The CTF scale factor per particle (rlnCtfScalefactor; ``default`` when absent),
        shape (N,)."""
        return self.column("rlnCtfScalefactor", default)

    def has_contrast_scales(self) -> bool:
        """Whether the table carries a per-particle CTF scale factor."""
        return "rlnCtfScalefactor" in self.particles.columns

    def set_contrast_scales(self, values: np.ndarray) -> None:
        """Write the CTF scale factor per particle, shape (N,)."""
        self.particles["rlnCtfScalefactor"] = np.asarray(values, float)

    def set_optics_params(self, group: int, optics) -> None:
        """Write the refinable optics of group number ``group`` (an
        :class:`~cryomag.physics.forward.OpticsParams`, e.g. with fitted aberrations) into
        its optics row: the spherical aberration (mm), the beam tilt (mrad) and the odd and
        even Zernike coefficients (rad, RELION order), each only where it differs from the
        table's (a table without aberration columns stays without them)."""
        row = self.group_row(group)
        col = self.optics.columns.get_loc("rlnSphericalAberration")
        self.optics.iloc[row, col] = float(optics.cs_mm)
        tilt, odd, even = self.aberrations(group)
        new_tilt = tuple(float(v) for v in optics.beam_tilt_mrad)
        new_odd = tuple(float(v) for v in optics.odd_zernike)
        new_even = tuple(float(v) for v in optics.even_zernike)
        self.set_aberrations(
            group,
            beam_tilt_mrad=None if new_tilt == tuple(tilt) else new_tilt,
            odd=None if new_odd == tuple(odd) else new_odd,
            even=None if new_even == tuple(even) else new_even,
        )

    def set_origin_A(self, origin: np.ndarray) -> None:
        """Write each particle's origin (x, y) in A, shape (N, 2)."""
        origin = np.asarray(origin, float)
        self.particles["rlnOriginXAngst"] = origin[:, 0]
        self.particles["rlnOriginYAngst"] = origin[:, 1]

    def image_names(self) -> np.ndarray:
        """Each particle's image name (``index@stack``), str, shape (N,)."""
        return self.particles["rlnImageName"].to_numpy(str)

    def set_image_names(self, names: np.ndarray) -> None:
        """Write each particle's image name (``index@stack``), shape (N,)."""
        self.particles["rlnImageName"] = np.asarray(names, dtype=object)

    def regroup(self, key: np.ndarray, suffixes: list[str]) -> ParticleSet:
        """A new set with one optics group per distinct ``key`` value.

        Parameters
        ----------
        key : ndarray of int, shape (N,)
            New group index per particle, 0..K-1; all particles of one new group must share
            one old group.
        suffixes : list of str, length K
            Appended to the old group's name (``<old name>_<suffix>``).

        Every old optics column is kept (the new group's row copies its old group's row),
        groups are numbered 1..K in the order of ``key``; the magnification matrices are
        left to the caller.
        """
        key = np.asarray(key, int)
        gidx = self.group_index()
        names = self.group_names()
        rows = []
        for k in range(int(key.max()) + 1 if len(key) else 0):
            g = int(gidx[key == k][0])
            row = self.optics.iloc[g].copy()
            row["rlnOpticsGroup"] = k + 1
            row["rlnOpticsGroupName"] = f"{names[g]}_{suffixes[k]}"
            rows.append(row)
        out = self.copy()
        out.optics = pd.DataFrame(rows).reset_index(drop=True)
        out.set_particle_group_numbers(key + 1)
        return out
