"""cryoSPARC ``.cs`` particle files: read into a :class:`ParticleSet`, write back.

A ``.cs`` file is a numpy structured array, one row per particle (the classic format, read
with :func:`numpy.load`), or cryosparc-tools' newer compressed stream (read with
``cryosparc.dataset.Dataset.load``). Jobs often write a primary file plus a passthrough file
with the remaining fields, joined on ``uid``.

Conversion to RELION columns (units of :mod:`cryomag.model.particles`)
-----------------------------------------------------------------------
======================  ============================================================
RELION column           from cryoSPARC
======================  ============================================================
rlnImageName            ``f"{blob/idx + 1:06d}@{blob/path}"`` (leading ``>`` removed;
                        path relative to the cryoSPARC project folder, kept as given)
rlnMicrographName       ``location/micrograph_path``, else ``"mic_<exp_group_id>"``
rlnOpticsGroup          one group per distinct ``ctf/exp_group_id`` (1 when absent),
                        split further if pixel size, box, kV, Cs or Q0 differ in it
rlnDefocusU / V         ``ctf/df1_A`` / ``ctf/df2_A``
rlnDefocusAngle         ``ctf/df_angle_rad`` in degrees
rlnPhaseShift           ``ctf/phase_shift_rad`` in degrees
rlnAngleRot/Tilt/Psi    ``Rotation.from_rotvec(alignments3D/pose).as_euler("ZYZ")``
                        (CONVENTIONS_VERIFIED 6.3, settled)
rlnOriginX/YAngst       ``alignments3D/shift`` (pixels, same sign) * ``blob/psize_A``
rlnCtfScalefactor       ``alignments3D/alpha`` (cryoSPARC's per-particle scale)
rlnRandomSubset         ``alignments3D/split + 1``
cmagUid                 ``uid`` (uint64), used to match rows when writing back
optics rlnImagePixelSize  ``blob/psize_A``; rlnImageSize ``blob/shape[0]``; rlnVoltage
                        ``ctf/accel_kv``; rlnSphericalAberration ``ctf/cs_mm``;
                        rlnAmplitudeContrast ``ctf/amp_contrast``
optics rlnMagMat00..11  ``inv(I + ctf/anisomag.reshape(2, 2))`` (row-major)
======================  ============================================================

Assumptions
-----------
- Magnification: cryoSPARC stores ``anisomag`` with the identity subtracted, and ``I + A`` is
  a passive transform of Fourier coordinates (CONVENTIONS_VERIFIED 5.1, 5.2). For the
  isotropic part ``M_RELION = (I + A)^-1`` is settled (5.3). For the anisotropic part cryomag
  CHOOSES ``M = (I + A)^-1``, i.e. cryoSPARC's ``I + A`` maps true frequency to observed,
  ``k_obs = (I + A) k_true``, while RELION's M maps observed to true, ``k_true = M k_obs``
  (the alternative ``(I + A)^-T`` differs only by a rotation of the distortion axes, 5.6).
  RELION has one M per optics group: it is taken from the group's first particle, with a
  warning when particles of a group differ.
- Shifts (U2): ``alignments3D/shift`` is taken to be in pixels of ``blob/psize_A`` (as pyem
  and cryoDRGN do); a warning is given when ``alignments3D/psize_A`` differs.
- No ``alignments3D`` (e.g. 2D classification or import): angles and origins are set to 0 and
  ``source.has_poses`` is False.
- ``ctf/bfactor`` is not converted (kept in the array, written back unchanged).

Higher-order aberrations (issue 13)
-----------------------------------
cryoSPARC's Global CTF Refinement stores per particle (one value per exposure group)
``ctf/tilt_A`` (2), ``ctf/trefoil_A`` (2), ``ctf/tetra_A`` (4), ``ctf/shift_A`` (2) and
``ctf/cs_mm``. cryoSPARC is closed source; what is known:

- cryoSPARC staff (discuss.cryosparc.com/t/understanding-values-of-beamtilt/17411): the
  fields are Zernike-type phase terms "converted to lengths using the wavelength of an
  electron", in A; the tilt in mrad is the third-order (coma) term divided by Cs.
- pyem (pyem/metadata/cryosparc2.py, ``cryosparc_2_cs_ctf_parameters``, never called and
  "untested" per asarnow, CONVENTIONS_VERIFIED 5.5): rlnBeamTiltX/Y =
  1e3 arcsin(tilt_A / (cs_mm 1e7)), i.e. tilt_A = Cs[A] sin(tilt); trefoil and tetrafoil
  are left unconverted there ("pass").
- No source found (pyem, cryoDRGN, cryosparc-tools, the cryoSPARC guide and forum in the
  stored corpus) gives the sign or axis convention of tilt_A relative to RELION's, nor the
  scale, order or sign of trefoil_A, tetra_A or shift_A.

cryomag therefore converts as follows (:func:`cs_to_relion_aberrations`,
:func:`relion_to_cs_aberrations`), with the status of each line:

==================  =======================================  ===============================
cryoSPARC           RELION                                   status
==================  =======================================  ===============================
tilt_A (x, y)       rlnBeamTiltX/Y = 1e3 arcsin(tilt_A/Cs_A)  scale: pyem; sign/axes:
                                                             UNVERIFIED (same axes assumed,
                                                             :data:`CS_TILT_SIGN`)
shift_A (x, y)      odd c1 (Z(1,1)) = 2 pi x, c0 = 2 pi y     UNVERIFIED
                    (the linear image-shift phase)           (:data:`CS_SHIFT_TO_ZERNIKE`)
trefoil_A (a, b)    odd c5 (Z(3,3)) = 2 pi lambda^2 a,        UNVERIFIED
                    c2 (Z(-3,3)) = 2 pi lambda^2 b            (:data:`CS_TREFOIL_TO_ZERNIKE`)
tetra_A (a,b,c,d)   even c8 Z(4,4), c4 Z(-4,4), c7 Z(2,4),    UNVERIFIED
                    c5 Z(-2,4) = 2 pi lambda^3 (a, b, c, d)   (:data:`CS_TETRA_TO_ZERNIKE`)
cs_mm               rlnSphericalAberration                    exact
==================  =======================================  ===============================

The length-to-phase factor 2 pi lambda^(n-1) is the forum's "phase converted to a length
with the wavelength" taken literally (phase = 2 pi W / lambda with W = A (lambda |k|)^n),
the same reading that gives pyem's tilt_A = Cs tilt. RELION's coma terms (odd c3, c4) are
written through the beam tilt (RELION's extractTilt, exact). Given these conventions the
round trip RELION -> .cs -> RELION is exact for the beam tilt and odd terms 0-5 and the even
terms 4, 5, 7, 8; what cryoSPARC's fields cannot hold (odd n >= 5, even terms 0-3 and 6
(Z(0,4)), even n >= 6, a tilt with Cs = 0) is dropped, named in a logged warning and
returned by :func:`write_cs`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.spatial.transform import Rotation

from cryomag.io.atomic import ParticleFileError, ParticleFileNotFoundError, atomic_write
from cryomag.io.mrc import parse_image_names
from cryomag.model.particles import ParticleSet, SourceInfo
from cryomag.model.validation import (
    CS_OPTICS_FIELDS,
    Rule,
    check_column,
    check_magnification,
    resolve_limits,
    rules_for,
    warn_suspicious,
)
from cryomag.physics.geometry import euler_to_rotvec, rotvec_to_euler

__all__ = [
    "CS_ABERRATION_FIELDS",
    "cs_to_relion_aberrations",
    "load_cs_array",
    "read_cs",
    "relion_to_cs_aberrations",
    "write_cs",
    "write_csg",
]

#: cryoSPARC's higher-order aberration fields and their number of values per particle.
CS_ABERRATION_FIELDS = {"ctf/tilt_A": 2, "ctf/shift_A": 2, "ctf/trefoil_A": 2, "ctf/tetra_A": 4}
#: Sign of cryoSPARC's tilt_A relative to RELION's beam tilt (UNVERIFIED: no source found).
CS_TILT_SIGN = 1.0
#: (RELION odd index, factor of 2 pi) per shift_A component (UNVERIFIED): c = 2 pi s.
CS_SHIFT_TO_ZERNIKE = ((1, 1.0), (0, 1.0))
#: RELION odd index per trefoil_A component, times 2 pi lambda^2 (UNVERIFIED).
CS_TREFOIL_TO_ZERNIKE = (5, 2)
#: RELION even index per tetra_A component, times 2 pi lambda^3 (UNVERIFIED).
CS_TETRA_TO_ZERNIKE = (8, 4, 7, 5)

_MAX_HEADER = 1 << 30
_EXP_GROUP_RE = re.compile(r"^exp_group_(\d+)")
#: Micrograph names made up by :func:`read_cs` when the file had none (not written back).
_SYNTH_MIC_RE = re.compile(r"^mic_\d+$")
#: Rotation difference (rad) below which a written pose keeps the input's rotation vector.
POSE_TOL_RAD = 1e-6

_REQUIRED = {
    "blob/path": "image stack path",
    "blob/idx": "0-based image index in the stack",
    "blob/shape": "image size (ny, nx) in pixels",
    "blob/psize_A": "pixel size in A",
    "ctf/accel_kv": "voltage in kV",
    "ctf/cs_mm": "Cs in mm",
    "ctf/amp_contrast": "amplitude contrast",
    "ctf/df1_A": "defocus 1 in A",
    "ctf/df2_A": "defocus 2 in A",
    "ctf/df_angle_rad": "astigmatism angle in rad",
}


def _warn_varying(path, differ: np.ndarray, codes: np.ndarray, group_names, what: str,
                  kept: str, stacklevel: int) -> None:  # fmt: skip
    """Warn that a per-group value ``what`` varies within the optics groups of the particles
    ``differ`` (bool, (N,)): each group's first particle's is used."""
    if differ.any():
        bad_groups = sorted({group_names[c] for c in codes[differ]})
        warnings.warn(
            f"{path}: {what} between particles of optics group(s) {bad_groups}; using each "
            f"group's first particle (RELION keeps {kept} per optics group)",
            stacklevel=stacklevel,
        )


# ------------------------------------------------------------------------------- loading
def _plain_structured(rec) -> np.ndarray:
    """A plain (non-record) structured ndarray with the same fields."""
    names = rec.dtype.names
    out = np.empty(len(rec), dtype=[(n, rec.dtype[n]) for n in names])
    for n in names:
        out[n] = rec[n]
    return out


def load_cs_array(path: str | os.PathLike) -> np.ndarray:
    """Load a ``.cs`` file as a 1D numpy structured array.

    Parameters
    ----------
    path : path
        Classic (``.npy``-format) or compressed-stream ``.cs`` file.

    Returns
    -------
    ndarray, shape (N,)
        Structured array with cryoSPARC field names (``uid``, ``blob/path``, ...); string
        fields as fixed-length bytes.

    Raises
    ------
    ParticleFileNotFoundError, ParticleFileError
    """
    path = Path(path)
    if not path.is_file():
        raise ParticleFileNotFoundError(f"{path}: cryoSPARC .cs file not found")
    first_err: Exception | None = None
    try:
        arr = np.load(path, allow_pickle=False, max_header_size=_MAX_HEADER)
    except Exception as err:  # not the classic format: try cryosparc-tools
        first_err = err
        try:
            from cryosparc.dataset import Dataset

            arr = _plain_structured(Dataset.load(path).to_records(fixed=True))
        except Exception as err2:
            raise ParticleFileError(
                f"{path}: not a readable cryoSPARC .cs file (numpy: {first_err}; "
                f"cryosparc-tools: {err2})"
            ) from err2
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise ParticleFileError(
            f"{path}: expected a 1D structured array of particles, got "
            f"{type(arr).__name__} {getattr(arr, 'shape', '')}"
        )
    return arr


def _join_passthrough(arr: np.ndarray, pt: np.ndarray, path: Path, pt_path: Path) -> np.ndarray:
    """Join ``pt`` fields onto ``arr`` by uid; fields of ``arr`` win; order of ``arr``."""
    for a, p in ((arr, path), (pt, pt_path)):
        if "uid" not in a.dtype.names:
            raise ParticleFileError(f"{p}: no uid field; cannot join primary and passthrough")
    order = np.argsort(pt["uid"], kind="stable")
    sorted_uid = pt["uid"][order]
    pos = np.searchsorted(sorted_uid, arr["uid"])
    pos_c = np.minimum(pos, len(sorted_uid) - 1)
    found = (pos < len(sorted_uid)) & (sorted_uid[pos_c] == arr["uid"]) if len(pt) else pos < 0
    if not found.all():
        r = int(np.flatnonzero(~found)[0])
        raise ParticleFileError(
            f"{pt_path}: passthrough has no row for {int((~found).sum())} of {len(arr)} "
            f"particles of {path} (first: row {r + 1}, uid {int(arr['uid'][r])})"
        )
    take = order[pos_c]
    extra = [n for n in pt.dtype.names if n not in arr.dtype.names]
    dtype = [(n, arr.dtype[n]) for n in arr.dtype.names] + [(n, pt.dtype[n]) for n in extra]
    out = np.empty(len(arr), dtype=dtype)
    for n in arr.dtype.names:
        out[n] = arr[n]
    for n in extra:
        out[n] = pt[n][take]
    return out


def _decode_paths(values: np.ndarray) -> np.ndarray:
    """Byte / str paths -> str (object array), a leading '>' removed. Shape (N,)."""
    uniq, inv = np.unique(values, return_inverse=True)
    dec = [
        (u.decode("utf-8", errors="replace") if isinstance(u, bytes) else str(u)).lstrip(">")
        for u in uniq
    ]
    return np.asarray(dec, dtype=object)[inv.reshape(-1)]


def _to_float64(values: np.ndarray) -> np.ndarray:
    """float32 -> float64 through the shortest decimal (2.95f -> 2.95, not 2.9500000477).

    The result rounds back to the same float32 exactly, so nothing is lost; other dtypes are
    cast directly. Shape is kept.
    """
    values = np.asarray(values)
    if values.dtype != np.float32:
        return values.astype(np.float64)
    flat = pa.array(values.reshape(-1))
    out = pc.cast(pc.cast(flat, pa.string()), pa.float64()).to_numpy(zero_copy_only=False)
    return out.reshape(values.shape)


# ------------------------------------------------------------------------------- reading
def read_cs(
    path: str | os.PathLike,
    passthrough: str | os.PathLike | None = None,
    *,
    allow_negative_cs: bool | None = None,
    max_defocus_um: float | None = None,
) -> ParticleSet:
    """Read a cryoSPARC particle ``.cs`` file (optionally joined with its passthrough).

    Parameters
    ----------
    path : path
        Primary ``.cs`` file.
    passthrough : path, optional
        Passthrough ``.cs`` file of the same job; joined on ``uid``, primary fields win.
    allow_negative_cs : bool, optional
        Accept a negative ``ctf/cs_mm`` (a Cs corrector); default: refused.
    max_defocus_um : float, optional
        Largest accepted |defocus| in um (default 20).

    Returns
    -------
    ParticleSet
        RELION-named tables (see the module docstring for the conversion), ``cmagUid``, and
        the original structured array in ``source.cs_data``.

    Raises
    ------
    ParticleFileNotFoundError
        Missing file.
    ParticleFileError
        Unreadable file, missing required fields, non-square blobs, passthrough without some
        uids, or values that fail :meth:`ParticleSet.validate` (the message names the row and
        the cryoSPARC field).

    Warns
    -----
    DataWarning
        When particles repeat an image (same stack and index).
    """
    path = Path(path)
    limits = resolve_limits(allow_negative_cs, max_defocus_um)
    arr = load_cs_array(path)
    pt_path = None
    if passthrough is not None:
        pt_path = Path(passthrough)
        arr = _join_passthrough(arr, load_cs_array(pt_path), path, pt_path)
    names = set(arr.dtype.names)
    missing = [f for f in _REQUIRED if f not in names]
    if missing:
        raise ParticleFileError(
            f"{path}: no field {missing[0]} (expected {_REQUIRED[missing[0]]})"
            + (f"; also missing {missing[1:]}" if len(missing) > 1 else "")
            + ("" if passthrough else "; pass the job's passthrough file if it has them")
        )
    n = len(arr)
    if n == 0:
        raise ParticleFileError(f"{path}: contains no particles")
    shape = np.asarray(arr["blob/shape"]).reshape(n, -1)
    if shape.shape[1] != 2:
        raise ParticleFileError(f"{path}: blob/shape has {shape.shape[1]} values, expected 2")
    bad = np.flatnonzero(shape[:, 0] != shape[:, 1])
    if bad.size:
        r = int(bad[0])
        raise ParticleFileError(
            f"{path}: row {r + 1}: blob/shape is {shape[r].tolist()}; non-square boxes are "
            "unsupported"
        )
    f64 = lambda name: _to_float64(arr[name])  # noqa: E731
    # optics values are per particle in a .cs file: check them with the particle's row
    _, orules = rules_for(limits)
    for fname, col in CS_OPTICS_FIELDS.items():
        check_column(f64(fname), col, orules[col], str(path), "particle", field=fname)
    check_column(
        shape[:, 0], "rlnImageSize", orules["rlnImageSize"], str(path), "particle", "blob/shape"
    )
    if "ctf/anisomag" in names:
        aniso_all = _to_float64(arr["ctf/anisomag"]).reshape(n, -1)
        if aniso_all.shape[1] != 4:
            raise ParticleFileError(
                f"{path}: ctf/anisomag has {aniso_all.shape[1]} values per particle, expected 4"
            )
        with np.errstate(invalid="ignore"):
            fine = np.isfinite(aniso_all).all(axis=1)
        if not fine.all():
            r = int(np.flatnonzero(~fine)[0])
            raise ParticleFileError(
                f"{path}: particle row {r + 1}, field ctf/anisomag: value "
                f"{aniso_all[r].tolist()} is not finite (expected 4 finite numbers)"
            )
        check_magnification(
            np.eye(2) + aniso_all.reshape(n, 2, 2), str(path), "particle",
            columns="field ctf/anisomag (as I + anisomag)",
        )  # fmt: skip
    for fname, what in (("blob/idx", "0-based image index"), ("ctf/exp_group_id", "group id")):
        if fname in names and np.asarray(arr[fname]).dtype.kind == "f":
            check_column(
                arr[fname], fname, Rule(f"{what}, an integer >= 0", lo=0, integer=True),
                str(path), "particle",
            )  # fmt: skip
    for fname in ("alignments3D/pose", "alignments3D/shift"):
        if fname in names:
            vals = np.asarray(arr[fname], np.float64).reshape(n, -1)
            with np.errstate(invalid="ignore"):
                fine = np.isfinite(vals).all(axis=1)
            if not fine.all():
                r = int(np.flatnonzero(~fine)[0])
                raise ParticleFileError(
                    f"{path}: particle row {r + 1}, field {fname}: value {vals[r].tolist()} is "
                    "not finite (expected finite numbers)"
                )
    psize = f64("blob/psize_A")
    exp = (
        np.asarray(arr["ctf/exp_group_id"], dtype=np.int64)
        if "ctf/exp_group_id" in names
        else np.ones(n, dtype=np.int64)
    )

    # ---------------------------------------------------------------- optics groups
    key = pd.DataFrame(
        {
            "exp": exp,
            "psize": psize,
            "box": shape[:, 0].astype(np.int64),
            "kv": f64("ctf/accel_kv"),
            "cs": f64("ctf/cs_mm"),
            "q0": f64("ctf/amp_contrast"),
        }
    )
    codes, _ = pd.factorize(pd.MultiIndex.from_frame(key), sort=True)
    n_groups = int(codes.max()) + 1
    first = np.zeros(n_groups, dtype=np.int64)
    first[codes[::-1]] = np.arange(n - 1, -1, -1)  # first row of each group
    uniq = key.iloc[first].reset_index(drop=True)
    counts = uniq["exp"].value_counts()
    split_exp = counts[counts > 1].index.tolist()
    if split_exp:
        warnings.warn(
            f"{path}: exposure group(s) {split_exp} mix pixel sizes, boxes or microscope "
            "settings; they are split into several optics groups",
            stacklevel=2,
        )
    group_names, seen = [], {}
    for e in uniq["exp"]:
        seen[e] = seen.get(e, 0) + 1
        group_names.append(f"exp_group_{e}" + (f"_{seen[e]}" if counts[e] > 1 else ""))
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, n_groups + 1, dtype=np.int64),
            "rlnOpticsGroupName": group_names,
            "rlnAmplitudeContrast": uniq["q0"].to_numpy(),
            "rlnSphericalAberration": uniq["cs"].to_numpy(),
            "rlnVoltage": uniq["kv"].to_numpy(),
            "rlnImagePixelSize": uniq["psize"].to_numpy(),
            "rlnImageSize": uniq["box"].to_numpy(),
            "rlnImageDimensionality": np.full(n_groups, 2, dtype=np.int64),
            "rlnCtfDataAreCtfPremultiplied": np.zeros(n_groups, dtype=np.int64),
        }
    )
    if "ctf/anisomag" in names:
        aniso = _to_float64(arr["ctf/anisomag"]).reshape(n, 4)
        differ = np.abs(aniso - aniso[first[codes]]).max(axis=1) > 1e-6
        _warn_varying(path, differ, codes, group_names, "ctf/anisomag differs", "one matrix",
                      stacklevel=3)  # fmt: skip
        mats = np.linalg.inv(np.eye(2) + aniso[first].reshape(n_groups, 2, 2))
        for j, col in enumerate(("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")):
            optics[col] = mats.reshape(n_groups, 4)[:, j]
    _read_aberrations(arr, path, first, codes, optics, group_names)

    # ---------------------------------------------------------------- particles
    paths = _decode_paths(arr["blob/path"])
    idx1 = np.asarray(arr["blob/idx"], dtype=np.int64) + 1
    image_names = pd.Series(idx1).astype(str).str.zfill(6).to_numpy(dtype=object) + "@" + paths
    if "location/micrograph_path" in names:
        mics = _decode_paths(arr["location/micrograph_path"])
    else:
        mics = np.array([f"mic_{e}" for e in exp], dtype=object)
    cols: dict[str, np.ndarray] = {
        "rlnImageName": image_names,
        "rlnMicrographName": mics,
        "rlnOpticsGroup": codes.astype(np.int64) + 1,
        "rlnDefocusU": f64("ctf/df1_A"),
        "rlnDefocusV": f64("ctf/df2_A"),
        "rlnDefocusAngle": np.rad2deg(f64("ctf/df_angle_rad")),
    }
    if "ctf/phase_shift_rad" in names:
        cols["rlnPhaseShift"] = np.rad2deg(f64("ctf/phase_shift_rad"))
    source = SourceInfo(path=path, kind="cs", cs_data=arr, passthrough=pt_path)
    if "alignments3D/pose" in names:
        with warnings.catch_warnings():  # tilt 0 or 180: the matrix is still exact
            warnings.filterwarnings("ignore", message="Gimbal lock")
            euler = rotvec_to_euler(np.asarray(arr["alignments3D/pose"], np.float64).reshape(n, 3))
        cols["rlnAngleRot"], cols["rlnAngleTilt"], cols["rlnAnglePsi"] = euler.T
        if "alignments3D/shift" in names:
            shift = np.asarray(arr["alignments3D/shift"], np.float64).reshape(n, 2)  # exact
            if "alignments3D/psize_A" in names:
                ap = f64("alignments3D/psize_A")
                if np.any(np.abs(ap / psize - 1.0) > 1e-3):
                    warnings.warn(
                        f"{path}: alignments3D/psize_A differs from blob/psize_A; shifts are "
                        "taken in blob pixels (assumption U2 of CONVENTIONS_VERIFIED)",
                        stacklevel=2,
                    )
            cols["rlnOriginXAngst"] = shift[:, 0] * psize
            cols["rlnOriginYAngst"] = shift[:, 1] * psize
        else:
            cols["rlnOriginXAngst"] = np.zeros(n)
            cols["rlnOriginYAngst"] = np.zeros(n)
            source.filled_columns += ["rlnOriginXAngst", "rlnOriginYAngst"]
        if "alignments3D/alpha" in names:
            cols["rlnCtfScalefactor"] = f64("alignments3D/alpha")
        if "alignments3D/split" in names:
            cols["rlnRandomSubset"] = np.asarray(arr["alignments3D/split"], np.int64) + 1
    else:
        for c in (
            "rlnAngleRot",
            "rlnAngleTilt",
            "rlnAnglePsi",
            "rlnOriginXAngst",
            "rlnOriginYAngst",
        ):
            cols[c] = np.zeros(n)
            source.filled_columns.append(c)
        source.has_poses = False
    cols["cmagUid"] = np.asarray(arr["uid"], dtype=np.uint64) if "uid" in names else None
    if cols["cmagUid"] is None:
        del cols["cmagUid"]
    particles = pd.DataFrame(cols)
    ps = ParticleSet(particles, optics, source, limits)
    ps.validate()
    warn_suspicious(ps)
    return ps


# ------------------------------------------------------------------ aberration conversion
def cs_to_relion_aberrations(fields: dict[str, np.ndarray], cs_mm: float, voltage_kv: float):
    """cryoSPARC's aberration fields of one exposure group -> RELION's (module docstring).

    Parameters
    ----------
    fields : dict
        Any of :data:`CS_ABERRATION_FIELDS` -> values, shape (2,) or (4,) (A).
    cs_mm, voltage_kv : float
        ``ctf/cs_mm`` (mm) and ``ctf/accel_kv`` (kV).

    Returns
    -------
    beam_tilt_mrad : (float, float)
    odd : list of float
        rlnOddZernike (rad), 6 long (empty when zero).
    even : list of float
        rlnEvenZernike (rad), 9 long (empty when zero).
    """
    from cryomag.physics.aberrations import beam_tilt_to_odd, has_aberration
    from cryomag.physics.ctf import electron_wavelength_A

    lam = float(electron_wavelength_A(voltage_kv))
    odd, even = [0.0] * 6, [0.0] * 9
    tilt = (0.0, 0.0)
    t = np.asarray(fields.get("ctf/tilt_A", np.zeros(2)), float) * CS_TILT_SIGN
    if np.any(t != 0):
        if cs_mm != 0:
            tilt = tuple(float(v) for v in 1e3 * np.arcsin(np.clip(t / (cs_mm * 1e7), -1, 1)))
        else:  # no Cs: the same coma phase, written as odd terms (Cs tilt = tilt_A)
            odd = beam_tilt_to_odd(t[0] * 1e-4, t[1] * 1e-4, 1.0, lam, odd)
    for (i, f), v in zip(CS_SHIFT_TO_ZERNIKE, fields.get("ctf/shift_A", np.zeros(2)),
                         strict=True):  # fmt: skip
        odd[i] += 2 * np.pi * f * float(v)
    for i, v in zip(CS_TREFOIL_TO_ZERNIKE, fields.get("ctf/trefoil_A", np.zeros(2)), strict=True):
        odd[i] += 2 * np.pi * lam**2 * float(v)
    for i, v in zip(CS_TETRA_TO_ZERNIKE, fields.get("ctf/tetra_A", np.zeros(4)), strict=True):
        even[i] += 2 * np.pi * lam**3 * float(v)
    return (
        (float(tilt[0]), float(tilt[1])),
        odd if has_aberration(odd) else [],
        even if has_aberration(even) else [],
    )


def relion_to_cs_aberrations(
    beam_tilt_mrad, odd, even, cs_mm: float, voltage_kv: float
) -> tuple[dict[str, np.ndarray], list[str]]:
    """RELION's aberrations of one optics group -> cryoSPARC's fields (module docstring).

    The coma terms of ``odd`` (c3, c4) go into the tilt with RELION's extractTilt (exact);
    terms that cryoSPARC's fields cannot hold are returned by name.

    Returns
    -------
    fields : dict
        :data:`CS_ABERRATION_FIELDS` -> values (A), shapes (2,) or (4,).
    dropped : list of str
        ``"rlnOddZernike[6] (Z(-5,5)) = 1.2"``-style descriptions of what was not written.
    """
    from cryomag.physics.aberrations import (
        even_index_to_mn,
        odd_index_to_mn,
        odd_to_beam_tilt,
    )
    from cryomag.physics.ctf import electron_wavelength_A

    lam = float(electron_wavelength_A(voltage_kv))
    dropped: list[str] = []
    tx, ty = (float(v) for v in beam_tilt_mrad)
    odd = [float(c) for c in odd]
    if cs_mm != 0 and any(odd[3:5]):
        dtx, dty, odd = odd_to_beam_tilt(odd, cs_mm, lam)
        tx, ty = tx + dtx, ty + dty
    tilt_a = np.array([0.0, 0.0])
    if tx or ty:
        if cs_mm == 0:
            dropped.append(f"beam tilt ({tx:g}, {ty:g}) mrad with Cs = 0")
        else:
            tilt_a = CS_TILT_SIGN * cs_mm * 1e7 * np.sin(np.array([tx, ty]) * 1e-3)
    odd = odd + [0.0] * max(0, 6 - len(odd))
    shift = np.array([odd[i] / (2 * np.pi * f) for i, f in CS_SHIFT_TO_ZERNIKE])
    tre = np.array([odd[i] / (2 * np.pi * lam**2) for i in CS_TREFOIL_TO_ZERNIKE])
    used_odd = {i for i, _ in CS_SHIFT_TO_ZERNIKE} | set(CS_TREFOIL_TO_ZERNIKE)
    for i, c in enumerate(odd):
        if c != 0 and i not in used_odd:
            dropped.append(f"rlnOddZernike[{i}] (Z{odd_index_to_mn(i)}) = {c:g} rad")
    even = [float(c) for c in even] + [0.0] * max(0, 9 - len(even))
    tetra = np.array([even[i] / (2 * np.pi * lam**3) for i in CS_TETRA_TO_ZERNIKE])
    for i, c in enumerate(even):
        if c != 0 and i not in CS_TETRA_TO_ZERNIKE:
            dropped.append(f"rlnEvenZernike[{i}] (Z{even_index_to_mn(i)}) = {c:g} rad")
    fields = {"ctf/tilt_A": tilt_a, "ctf/shift_A": shift, "ctf/trefoil_A": tre,
              "ctf/tetra_A": tetra}  # fmt: skip
    return fields, dropped


def _read_aberrations(arr: np.ndarray, path: Path, first: np.ndarray, codes: np.ndarray,
                      optics: pd.DataFrame, group_names: list[str]) -> None:  # fmt: skip
    """Set the optics table's RELION aberration columns from the .cs fields (non-zero only)."""
    from cryomag.model.particles import BEAM_TILT_COLUMNS, ZERNIKE_COLUMNS, format_zernike

    names = arr.dtype.names
    present = [f for f in CS_ABERRATION_FIELDS if f in names]
    if not present:
        return
    n = len(arr)
    vals = {f: _to_float64(arr[f]).reshape(n, -1) for f in present}
    for f, v in vals.items():
        if v.shape[1] != CS_ABERRATION_FIELDS[f]:
            raise ParticleFileError(
                f"{path}: {f} has {v.shape[1]} values per particle, expected "
                f"{CS_ABERRATION_FIELDS[f]}"
            )
        bad = ~np.isfinite(v).all(axis=1)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise ParticleFileError(
                f"{path}: particle row {r + 1}, field {f}: value {v[r].tolist()} is not finite "
                "(expected aberration coefficients in A)"
            )
    if not any(np.any(v != 0) for v in vals.values()):
        return
    differ = np.zeros(n, bool)
    for v in vals.values():
        differ |= np.abs(v - v[first[codes]]).max(axis=1) > 1e-6 * max(np.abs(v).max(), 1e-30)
    _warn_varying(path, differ, codes, group_names,
                  f"the aberration fields ({', '.join(present)}) differ", "one set",
                  stacklevel=4)  # fmt: skip
    tilts, odds, evens = [], [], []
    for g, r in enumerate(first):
        tilt, odd, even = cs_to_relion_aberrations(
            {f: v[r] for f, v in vals.items()},
            float(optics["rlnSphericalAberration"].iloc[g]),
            float(optics["rlnVoltage"].iloc[g]),
        )
        tilts.append(tilt)
        odds.append(format_zernike(odd))
        evens.append(format_zernike(even))
    tilts = np.array(tilts)
    for j, c in enumerate(BEAM_TILT_COLUMNS):
        optics[c] = tilts[:, j]
    optics[ZERNIKE_COLUMNS[0]] = odds
    optics[ZERNIKE_COLUMNS[1]] = evens


# ------------------------------------------------------------------------------- writing
def _with_field(arr: np.ndarray, name: str, dtype) -> np.ndarray:
    """``arr`` with field ``name`` of ``dtype`` (added, or re-typed when different)."""
    dtype = np.dtype(dtype)
    names = arr.dtype.names
    if name in names and arr.dtype[name] == dtype:
        return arr
    fields = [(n, dtype if n == name else arr.dtype[n]) for n in names]
    if name not in names:
        fields.append((name, dtype))
    out = np.zeros(len(arr), dtype=fields)
    for n in names:
        if n == name:
            out[n] = arr[n] if dtype.kind != "S" else np.asarray(arr[n]).astype(dtype)
        else:
            out[n] = arr[n]
    return out


def _set_float(arr: np.ndarray, name: str, values: np.ndarray, shape: tuple = ()) -> np.ndarray:
    """Write float ``values`` (N, *shape) into ``arr[name]`` where they differ beyond 2 ulp."""
    if name not in arr.dtype.names:
        arr = _with_field(arr, name, np.dtype((np.float32, shape)) if shape else np.float32)
        arr[name] = values
        return arr
    old = np.asarray(arr[name])
    base = old.dtype if old.dtype.kind == "f" else np.dtype(np.float32)
    tol = 2.0 * np.abs(np.spacing(old.astype(base))).astype(np.float64)
    changed = np.abs(np.asarray(values, np.float64) - old.astype(np.float64)) > tol
    if changed.ndim > 1:
        changed = changed.reshape(len(arr), -1).any(axis=1)
    if changed.any():
        sub = arr[name]
        sub[changed] = np.asarray(values)[changed]
    return arr


def _set_exact(arr: np.ndarray, name: str, values: np.ndarray, dtype) -> np.ndarray:
    """Write values into ``arr[name]`` (exact comparison; added with ``dtype`` when absent)."""
    if name not in arr.dtype.names:
        arr = _with_field(arr, name, dtype)
    arr[name] = values
    return arr


def _set_strings(arr: np.ndarray, name: str, values: np.ndarray) -> np.ndarray:
    """Write str ``values`` into a bytes field, keeping entries equal after '>' stripping."""
    if name in arr.dtype.names:
        old = _decode_paths(arr[name])
        changed = old != values
        if not changed.any():
            return arr
    else:
        changed = np.ones(len(arr), dtype=bool)
    enc = np.array([v.encode() for v in values[changed]], dtype=bytes)
    width = max(enc.dtype.itemsize, 1)
    cur = arr.dtype[name].itemsize if name in arr.dtype.names else 0
    arr = _with_field(arr, name, f"S{max(width, cur)}")
    col = arr[name]
    col[changed] = enc
    return arr


def _scratch_array(ps: ParticleSet) -> np.ndarray:
    """A new structured array with ``uid`` for a set that did not come from a .cs file."""
    n = len(ps)
    uid = np.arange(1, n + 1, dtype=np.uint64)
    if "cmagUid" in ps.particles.columns:
        given = pd.to_numeric(ps.particles["cmagUid"], errors="coerce")
        if given.notna().all() and given.is_unique and (given >= 0).all():
            uid = given.to_numpy().astype(np.uint64)
    arr = np.zeros(n, dtype=[("uid", np.uint64)])
    arr["uid"] = uid
    return arr


def write_cs(ps: ParticleSet, path: str | os.PathLike, csg: bool = True) -> list[str]:
    """Write a particle set as a cryoSPARC ``.cs`` file (classic numpy format), atomically.

    With ``csg`` (default) the result-group file ``<stem>.csg`` is written beside it
    (:func:`write_csg`), so that cryoSPARC's Import Result Group job can bring the particles
    into a project.

    If the set was read from a ``.cs`` file, the output starts from the original structured
    array (rows matched by ``cmagUid``, so subsets and reordering are fine) and every input
    field is kept; fields are only overwritten where the table's value differs (beyond 2 ulp
    of the stored float32, or :data:`POSE_TOL_RAD` for poses). Otherwise an array is built
    from scratch: ``uid`` (``cmagUid`` if present and unique, else 1..N), ``blob/path``,
    ``blob/idx``, ``blob/shape``, ``blob/psize_A``, ``blob/sign`` (-1, the value cryoSPARC
    gives RELION-style stacks), ``location/micrograph_path``, ``ctf/*`` and, when the set has
    poses, ``alignments3D/pose``, ``shift``, ``psize_A``, ``alpha``, ``split``.

    Inverse conversions: ``anisomag = inv(M) - I`` (row-major), pose =
    ``Rotation.from_euler("ZYZ", [rot, tilt, psi]).as_rotvec()``, shift = origin_A /
    rlnImagePixelSize, split = rlnRandomSubset - 1, alpha = rlnCtfScalefactor; the beam tilt
    and Zernike terms go to ``ctf/tilt_A``, ``shift_A``, ``trefoil_A``, ``tetra_A`` by
    :func:`relion_to_cs_aberrations` (written when the input had them or any is non-zero).

    Parameters
    ----------
    ps : ParticleSet
        Particles to write.
    path : path
        Destination; the name is used exactly (no ``.npy`` is appended).
    csg : bool
        Also write ``path`` with the suffix ``.csg`` (refused if that is an input).

    Returns
    -------
    list of str
        The aberration terms cryoSPARC's fields cannot hold (not written; also warned).

    Raises
    ------
    ParticleFileError
        If ``path`` (or its .csg) is an input of ``ps``, or a ``cmagUid`` is not in the source
        array.
    """
    ps.validate()
    src = ps.source
    n = len(ps)
    p = ps.particles
    from_cs = (
        src.kind == "cs"
        and src.cs_data is not None
        and "cmagUid" in p.columns
        and "uid" in src.cs_data.dtype.names
    )
    if from_cs:
        base_all = src.cs_data
        order = np.argsort(base_all["uid"], kind="stable")
        suid = base_all["uid"][order]
        want = p["cmagUid"].to_numpy().astype(np.uint64)
        pos = np.minimum(np.searchsorted(suid, want), len(suid) - 1)
        ok = suid[pos] == want
        if not ok.all():
            r = int(np.flatnonzero(~ok)[0])
            raise ParticleFileError(
                f"{ps.name}: particle row {r + 1}: cmagUid {int(want[r])} is not in the source "
                ".cs array; drop cmagUid to write a new file"
            )
        arr = base_all[order[pos]].copy()
    else:
        arr = _scratch_array(ps)
    fresh = not from_cs
    names = lambda: arr.dtype.names  # noqa: E731

    gi = ps.group_index()
    optics = ps.optics
    apix = optics["rlnImagePixelSize"].to_numpy(float)[gi]
    box = optics["rlnImageSize"].to_numpy(float).astype(np.int64)[gi]

    # blob
    numbers, files = (
        parse_image_names(p["rlnImageName"], ps.name)
        if ("rlnImageName" in p.columns)
        else (None, None)
    )
    if numbers is not None:
        arr = _set_strings(arr, "blob/path", np.asarray(files, dtype=object))
        arr = _set_exact(arr, "blob/idx", numbers - 1, np.uint32)
    elif fresh:
        raise ParticleFileError(f"{ps.name}: no rlnImageName column; cannot write blob/path")
    arr = _set_exact(arr, "blob/shape", np.stack([box, box], axis=1), np.dtype((np.uint32, 2)))
    arr = _set_float(arr, "blob/psize_A", apix)
    if fresh:
        arr = _set_exact(arr, "blob/sign", np.full(n, -1.0), np.float32)
        mics = ps.micrographs().astype(object)
        if "rlnMicrographName" in p.columns and not all(_SYNTH_MIC_RE.match(m) for m in set(mics)):
            arr = _set_strings(arr, "location/micrograph_path", mics)

    # ctf
    arr = _set_float(arr, "ctf/accel_kv", optics["rlnVoltage"].to_numpy(float)[gi])
    arr = _set_float(arr, "ctf/cs_mm", optics["rlnSphericalAberration"].to_numpy(float)[gi])
    arr = _set_float(arr, "ctf/amp_contrast", optics["rlnAmplitudeContrast"].to_numpy(float)[gi])
    arr = _set_float(arr, "ctf/df1_A", ps.column("rlnDefocusU"))
    arr = _set_float(arr, "ctf/df2_A", ps.column("rlnDefocusV"))
    arr = _set_float(arr, "ctf/df_angle_rad", np.deg2rad(ps.column("rlnDefocusAngle")))
    if "rlnPhaseShift" in p.columns or "ctf/phase_shift_rad" in names() or fresh:
        arr = _set_float(arr, "ctf/phase_shift_rad", np.deg2rad(ps.column("rlnPhaseShift")))
    group_names = optics.get("rlnOpticsGroupName")
    exp_ids = []
    for j, g in enumerate(optics["rlnOpticsGroup"].to_numpy(int)):
        m = _EXP_GROUP_RE.match(str(group_names.iloc[j])) if group_names is not None else None
        exp_ids.append(int(m.group(1)) if m else int(g))
    if "ctf/exp_group_id" in names() or fresh:
        arr = _set_exact(arr, "ctf/exp_group_id", np.asarray(exp_ids, np.int64)[gi], np.uint32)

    # magnification: per group, compare with what read_cs derived from the input
    mats = ps.mag_matrices()
    has_field = "ctf/anisomag" in names()
    if has_field or not np.allclose(mats, np.eye(2), rtol=0, atol=1e-12):
        new_aniso = np.linalg.inv(mats) - np.eye(2)
        if not has_field:
            arr = _with_field(arr, "ctf/anisomag", np.dtype((np.float32, 4)))
            arr["ctf/anisomag"] = new_aniso.reshape(-1, 4)[gi]
        else:
            cur = np.asarray(arr["ctf/anisomag"], np.float64).reshape(n, 4)
            for g in range(ps.n_groups):
                rows = np.flatnonzero(gi == g)
                if rows.size == 0:
                    continue
                m_in = np.linalg.inv(np.eye(2) + cur[rows[0]].reshape(2, 2))
                if np.abs(m_in - mats[g]).max() > 1e-6:
                    arr["ctf/anisomag"][rows] = new_aniso[g].reshape(4)

    arr, dropped = _write_aberrations(ps, arr, gi)

    # alignments
    euler = ps.euler_deg()
    origin = ps.origin_A()
    poses = src.has_poses or bool(np.any(euler != 0) or np.any(origin != 0))
    if poses:
        new_rv = euler_to_rotvec(euler).reshape(n, 3)
        if "alignments3D/pose" in names():
            old_rv = np.asarray(arr["alignments3D/pose"], np.float64).reshape(n, 3)
            diff = (Rotation.from_rotvec(old_rv).inv() * Rotation.from_rotvec(new_rv)).magnitude()
            changed = diff > POSE_TOL_RAD
            if changed.any():
                arr["alignments3D/pose"][changed] = new_rv[changed]
        else:
            arr = _with_field(arr, "alignments3D/pose", np.dtype((np.float32, 3)))
            arr["alignments3D/pose"] = new_rv
        arr = _set_float(arr, "alignments3D/shift", origin / apix[:, None], (2,))
        if "alignments3D/psize_A" not in names():
            arr = _set_float(arr, "alignments3D/psize_A", apix)
        if "rlnCtfScalefactor" in p.columns:
            arr = _set_float(arr, "alignments3D/alpha", ps.column("rlnCtfScalefactor"))
        if "rlnRandomSubset" in p.columns:
            arr = _set_exact(arr, "alignments3D/split", ps.half_sets() - 1, np.uint32)

    inputs = [src.path, src.passthrough]
    with atomic_write(path, inputs=inputs) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    if csg:
        write_csg(path, arr.dtype.names, n, inputs=inputs)
    return dropped


def _write_aberrations(ps: ParticleSet, arr: np.ndarray,
                       gi: np.ndarray) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Write each group's aberrations into cryoSPARC's fields; returns the array (a new one
    when a field is added) and the dropped terms (also warned about)."""
    from cryomag.model.validation import warn

    n = len(arr)
    per = {f: np.zeros((ps.n_groups, k)) for f, k in CS_ABERRATION_FIELDS.items()}
    dropped: list[str] = []
    any_value = False
    for g, number in enumerate(ps.group_numbers()):
        tilt, odd, even = ps.aberrations(int(number))
        o = ps.optics.iloc[g]
        fields, lost = relion_to_cs_aberrations(
            tilt, odd, even, float(o["rlnSphericalAberration"]), float(o["rlnVoltage"])
        )
        for f, v in fields.items():
            per[f][g] = v
            any_value |= bool(np.any(v != 0))
        dropped += [f"optics group {int(number)}: {d}" for d in lost]
    for f, k in CS_ABERRATION_FIELDS.items():
        if f in arr.dtype.names or any_value:
            arr = _set_float(arr, f, per[f][gi].reshape(n, k), (k,))
    if dropped:
        warn(
            f"{ps.name}: aberration terms that cryoSPARC's fields (ctf/tilt_A, shift_A, "
            f"trefoil_A, tetra_A) cannot hold were not written: {'; '.join(dropped)}"
        )
    return arr, dropped


#: Type of a particle result group; each slot's type is ``particle.<slot>``.
CSG_GROUP_TYPE = "particle"


def write_csg(
    cs_path: str | os.PathLike,
    fields,
    num_items: int,
    name: str = "particles",
    inputs=(),
) -> Path:
    """Write the cryoSPARC result-group file (``.csg``) of a particle ``.cs`` file, atomically.

    A ``.csg`` is YAML: ``group`` (name, type ``particle``, title, description) and
    ``results``, one entry per result slot of the particles (the prefix of the .cs fields
    before ``/``: blob, ctf, location, alignments3D, ...) naming the file that holds it
    (``metafile: '>particles.cs'``, ``>`` = relative to the .csg's folder), the number of rows
    and the slot type ``particle.<slot>``. This is the layout cryoSPARC writes when it exports
    a result group, and what its Import Result Group job reads.

    Parameters
    ----------
    cs_path : path
        The ``.cs`` file described (need not exist yet; the .csg is ``cs_path`` with the
        suffix ``.csg``, in the same folder).
    fields : sequence of str
        The .cs field names (``uid`` and fields without a slot prefix are not listed).
    num_items : int
        Rows of the .cs file.
    name : str
        Name of the result group (letters, digits and underscores).
    inputs : iterable of path
        Files that must not be overwritten.

    Returns
    -------
    Path
        The written ``.csg``.
    """
    import datetime

    cs_path = Path(cs_path)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"result group name {name!r}: expected letters, digits, underscores")
    slots: list[str] = []
    for f in fields:
        if "/" in f:
            slot = f.split("/", 1)[0]
            if re.fullmatch(r"[A-Za-z0-9_]+", slot) and slot not in slots:
                slots.append(slot)
    if not slots:
        raise ParticleFileError(f"{cs_path}: no result slots (fields 'slot/name') to describe")
    metafile = ">" + cs_path.name.replace("'", "''")
    created = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    lines = [
        f"created: '{created}'",
        "group:",
        "  description: particles written by cryomag (magnification, scale, CTF)",
        f"  name: {name}",
        "  title: cryomag particles",
        f"  type: {CSG_GROUP_TYPE}",
        "results:",
    ]
    for slot in slots:
        lines += [
            f"  {slot}:",
            f"    metafile: '{metafile}'",
            f"    num_items: {int(num_items)}",
            f"    type: {CSG_GROUP_TYPE}.{slot}",
        ]
    out = cs_path.with_suffix(".csg")
    with atomic_write(out, inputs=inputs) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out
