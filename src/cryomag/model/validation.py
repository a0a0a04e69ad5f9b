"""One validation layer for particle metadata: every numeric column an engine uses is checked here.

Every reader (:func:`cryomag.io.read_star`, :func:`cryomag.io.read_cs`, hence
:func:`cryomag.io.read_particles`), every writer and every engine calls
:meth:`ParticleSet.validate`, which calls :func:`validate_particle_set`. The rules live in one
table per table (:data:`PARTICLE_RULES`, :data:`OPTICS_RULES`): what a value must be, and the
words used in the error message. An error is a :class:`ParticleDataError` naming the file, the
row (1-based, as a user counts data rows), the column, the bad value and what was expected.

Optional columns that are absent keep their neutral default
(:data:`cryomag.model.particles.PARTICLE_DEFAULTS`); an optional column that is present must
hold valid values in every row (a NaN is an error, never silently propagated).

Two limits can be relaxed, per call or for a block of code (:func:`validation_limits`):

- ``allow_negative_cs``: accept a negative spherical aberration (a Cs corrector can leave a
  tiny negative value); default: Cs must be >= 0.
- ``max_defocus_um``: the largest accepted |defocus| in um (default 20 um).

The limits a set was read with are stored on it (``ParticleSet.limits``), so that writers
and engines validate it again with the same limits.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from cryomag.model.particles import ParticleSet

log = logging.getLogger("cryomag")

__all__ = [
    "DEFAULT_MAX_DEFOCUS_UM",
    "OPTICS_RULES",
    "PARTICLE_RULES",
    "DataWarning",
    "Rule",
    "ValidationLimits",
    "check_column",
    "current_limits",
    "duplicate_images",
    "rules_for",
    "validate_particle_set",
    "validation_limits",
    "warn",
    "warn_duplicates",
    "warn_suspicious",
]

#: Default largest |defocus| accepted, in um (``--max-defocus``).
DEFAULT_MAX_DEFOCUS_UM = 20.0


class DataWarning(UserWarning):
    """Suspicious but usable input (duplicate particles, ambiguous image paths, ...)."""


def warn(message: str, stacklevel: int = 3) -> None:
    """Report ``message`` as a Python warning (the terminal) and, while a run log is open
    (OUT/cryomag.log), as a logging warning; never twice on the terminal."""
    if log.hasHandlers():  # not logging's last-resort handler: that would print it again
        log.warning(message)
    warnings.warn(message, DataWarning, stacklevel=stacklevel)


# ------------------------------------------------------------------------------ limits
@dataclass(frozen=True)
class ValidationLimits:
    """Relaxable limits of the validation.

    Attributes
    ----------
    allow_negative_cs : bool
        Accept rlnSphericalAberration < 0 (``--allow-negative-cs``).
    max_defocus_um : float
        Largest accepted |rlnDefocusU| and |rlnDefocusV| in um (``--max-defocus``).
    """

    allow_negative_cs: bool = False
    max_defocus_um: float = DEFAULT_MAX_DEFOCUS_UM

    def __post_init__(self) -> None:
        v = self.max_defocus_um
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"max_defocus_um (--max-defocus) must be a number > 0, got {v!r}")


_DEFAULT_LIMITS = ValidationLimits()
_LIMITS: contextvars.ContextVar[ValidationLimits | None] = contextvars.ContextVar(
    "cryomag_validation_limits", default=None
)


def current_limits() -> ValidationLimits:
    """The limits in force (set with :func:`validation_limits`; the defaults otherwise)."""
    lim = _LIMITS.get()
    return _DEFAULT_LIMITS if lim is None else lim


def resolve_limits(
    allow_negative_cs: bool | None = None, max_defocus_um: float | None = None
) -> ValidationLimits:
    """:func:`current_limits` with the given (non-None) values replaced."""
    lim = current_limits()
    changes = {}
    if allow_negative_cs is not None:
        changes["allow_negative_cs"] = bool(allow_negative_cs)
    if max_defocus_um is not None:
        changes["max_defocus_um"] = float(max_defocus_um)
    return replace(lim, **changes) if changes else lim


@contextlib.contextmanager
def validation_limits(
    allow_negative_cs: bool | None = None, max_defocus_um: float | None = None
) -> Iterator[ValidationLimits]:
    """Relax the limits for every particle file read in the block.

    Examples
    --------
    >>> with validation_limits(allow_negative_cs=True):  # doctest: +SKIP
    ...     ps = cryomag.io.read_particles("corrected_cs.star")
    """
    lim = resolve_limits(allow_negative_cs, max_defocus_um)
    token = _LIMITS.set(lim)
    try:
        yield lim
    finally:
        _LIMITS.reset(token)


# ------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """What the values of one column must be.

    Attributes
    ----------
    expected : str
        What the column holds and the accepted range, for the error message.
    lo, hi : float or None
        Bounds (None: unbounded).
    lo_open, hi_open : bool
        Exclusive bounds.
    integer : bool
        Values must be whole numbers.
    values : tuple or None
        The only accepted values.
    hint : str
        Appended to the message of a value out of range.
    abs_min : float or None
        Values of smaller magnitude (0 included) are refused.
    """

    expected: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    values: tuple | None = None
    hint: str = ""
    abs_min: float | None = None

    def out_of_range(self, v: np.ndarray) -> np.ndarray:
        """Mask of finite values outside the rule, shape of ``v``."""
        bad = np.zeros(v.shape, bool)
        if self.lo is not None:
            bad |= (v <= self.lo) if self.lo_open else (v < self.lo)
        if self.hi is not None:
            bad |= (v >= self.hi) if self.hi_open else (v > self.hi)
        if self.integer:
            bad |= v != np.round(v)
        if self.values is not None:
            bad |= ~np.isin(v, self.values)
        if self.abs_min is not None:
            bad |= np.abs(v) < self.abs_min
        return bad


_CS_HINT = (
    "; a Cs corrector can leave a tiny negative value: pass --allow-negative-cs "
    "(allow_negative_cs=True in Python) to accept it"
)
_DEFOCUS_HINT = "; pass --max-defocus UM (max_defocus_um= in Python) for larger defocus"

#: Particle columns any engine uses (absent optional columns take their neutral default).
PARTICLE_RULES: dict[str, Rule] = {
    "rlnOpticsGroup": Rule("optics group number, an integer >= 1", lo=1, integer=True),
    "rlnDefocusU": Rule("defocus U in A"),  # range from the limits (rules_for)
    "rlnDefocusV": Rule("defocus V in A"),
    "rlnDefocusAngle": Rule("astigmatism angle in degrees, a finite number"),
    "rlnPhaseShift": Rule("phase shift in degrees, -360 to 360", lo=-360, hi=360),
    "rlnCtfBfactor": Rule("CTF B-factor in A^2, -500 to 500", lo=-500, hi=500),
    # a contrast weight should be > 0, but cryomag estimate itself writes the fitted scale of
    # a particle that anti-correlates with the reference (< 0): accepted with a warning
    # (warn_suspicious), so that runs stay readable; 0, |s| < 1e-6 (the prediction underflows
    # single precision) and |s| > 100 are refused
    "rlnCtfScalefactor": Rule(
        "CTF scale factor (a contrast weight), 1e-6 <= |value| <= 100",
        lo=-100,
        hi=100,
        abs_min=1e-6,
    ),
    "rlnAngleRot": Rule("Euler angle rot in degrees, a finite number"),
    "rlnAngleTilt": Rule("Euler angle tilt in degrees, a finite number"),
    "rlnAnglePsi": Rule("Euler angle psi in degrees, a finite number"),
    "rlnOriginXAngst": Rule("origin X in A, within the box"),  # |origin| <= box (validate)
    "rlnOriginYAngst": Rule("origin Y in A, within the box"),
    "rlnRandomSubset": Rule("half set, 1 or 2", values=(1, 2)),
    # per-particle matrices (a cryomag extension honoured by reconstruct)
    "rlnMagMat00": Rule("magnification matrix element, a finite number"),
    "rlnMagMat01": Rule("magnification matrix element, a finite number"),
    "rlnMagMat10": Rule("magnification matrix element, a finite number"),
    "rlnMagMat11": Rule("magnification matrix element, a finite number"),
}

#: Optics columns any engine uses.
OPTICS_RULES: dict[str, Rule] = {
    "rlnOpticsGroup": Rule("optics group number, an integer >= 1", lo=1, integer=True),
    "rlnImagePixelSize": Rule("pixel size in A, > 0 and <= 100", lo=0, lo_open=True, hi=100),
    "rlnImageSize": Rule(
        "box size in pixels, an integer from 2 to 16384", lo=2, hi=16384, integer=True
    ),
    "rlnVoltage": Rule("voltage in kV, 20 to 3000", lo=20, hi=3000),
    "rlnSphericalAberration": Rule("Cs in mm, 0 to 50", lo=0, hi=50, hint=_CS_HINT),
    "rlnAmplitudeContrast": Rule(
        "amplitude contrast (a fraction), >= 0 and < 1", lo=0, hi=1, hi_open=True
    ),
    "rlnMagMat00": Rule("magnification matrix element, a finite number"),
    "rlnMagMat01": Rule("magnification matrix element, a finite number"),
    "rlnMagMat10": Rule("magnification matrix element, a finite number"),
    "rlnMagMat11": Rule("magnification matrix element, a finite number"),
    "rlnBeamTiltX": Rule("beam tilt X in mrad, a finite number"),
    "rlnBeamTiltY": Rule("beam tilt Y in mrad, a finite number"),
}

#: sqrt(det M) accepted for a magnification matrix. Wider than any magnification error: a
#: merged .cs written at a common pixel size carries the ratio of pixel sizes in M.
MAG_SCALE_RANGE = (0.1, 10.0)
#: Largest ratio of the singular values of a magnification matrix (real anisotropy: < 1.1).
MAX_MAG_ANISOTROPY = 1.5


def rules_for(limits: ValidationLimits) -> tuple[dict[str, Rule], dict[str, Rule]]:
    """The particle and optics rules under ``limits`` (defocus range, sign of Cs)."""
    pr = dict(PARTICLE_RULES)
    max_a = limits.max_defocus_um * 1e4
    for c, uv in (("rlnDefocusU", "U"), ("rlnDefocusV", "V")):
        pr[c] = Rule(
            f"defocus {uv} in A, |defocus| <= {max_a:g} A ({limits.max_defocus_um:g} um)",
            lo=-max_a,
            hi=max_a,
            hint=_DEFOCUS_HINT,
        )
    orules = dict(OPTICS_RULES)
    if limits.allow_negative_cs:
        orules["rlnSphericalAberration"] = Rule("Cs in mm, -50 to 50", lo=-50, hi=50)
    return pr, orules


# ------------------------------------------------------------------------------ checks
def _numbers(values) -> tuple[np.ndarray, pd.Series]:
    """(float64 values with NaN where not a number, the original values as a Series)."""
    s = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
    s = s.reset_index(drop=True)
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(float), s
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s.to_numpy(dtype=float, na_value=np.nan), s
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan), s


def _show(v) -> str:
    if isinstance(v, float | np.floating):
        return repr(float(v))
    if isinstance(v, np.integer):
        return str(int(v))
    return repr(v)


def check_column(
    values,
    column: str,
    rule: Rule,
    where: str,
    table: str = "particle",
    field: str | None = None,
    rows: np.ndarray | None = None,
) -> None:
    """Raise :class:`ParticleDataError` for the first value of ``values`` that breaks ``rule``.

    Parameters
    ----------
    values : array_like or pandas.Series, shape (n,)
        The column.
    column : str
        Its name (RELION label), for the message.
    rule : Rule
    where : str
        The file (or ``"<memory>"``), first in the message.
    table : str
        ``"particle"`` or ``"optics"``: the word before "row".
    field : str, optional
        The name in the source file when it differs (cryoSPARC field), shown after the column.
    rows : ndarray of int, optional
        0-based row in the file of each value (default: its position).
    """
    from cryomag.model.particles import ParticleDataError

    v, orig = _numbers(values)
    nonfinite = ~np.isfinite(v)
    bad = nonfinite.copy()
    with np.errstate(invalid="ignore"):
        bad |= rule.out_of_range(np.where(nonfinite, 0.0, v))
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    r = int(rows[i]) if rows is not None else i
    shown = orig.iloc[i]
    if nonfinite[i]:
        number = pd.to_numeric(pd.Series([shown]), errors="coerce").iloc[0]
        what = (
            "is not a number"
            if pd.isna(number) and not _is_nan_text(shown)
            else ("is not a finite number")
        )
        hint = ""
    else:
        what = "is out of range"
        if column == "rlnSphericalAberration" and v[i] < 0:
            what = "is negative"
        hint = rule.hint
    name = f"{column} ({field})" if field else column
    raise ParticleDataError(
        f"{where}: {table} row {r + 1}, column {name}: value {_show(shown)} {what} "
        f"(expected {rule.expected}{hint})"
    )


def _is_nan_text(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower().lstrip("+-") in ("nan", "inf", "infinity")
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def check_magnification(
    mats: np.ndarray,
    where: str,
    table: str,
    rows: np.ndarray | None = None,
    columns: str = "columns rlnMagMat00..11",
) -> None:
    """Each 2 x 2 matrix, shape (n, 2, 2), must be a plausible magnification matrix.

    det > 0 with sqrt(det) in :data:`MAG_SCALE_RANGE`, and an anisotropy (ratio of its
    singular values) of at most :data:`MAX_MAG_ANISOTROPY`.
    """
    from cryomag.model.particles import ParticleDataError

    mats = np.asarray(mats, dtype=float).reshape(-1, 2, 2)
    det = mats[:, 0, 0] * mats[:, 1, 1] - mats[:, 0, 1] * mats[:, 1, 0]
    lo, hi = MAG_SCALE_RANGE
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~(np.isfinite(det) & (det >= lo * lo) & (det <= hi * hi))
    if not bad.any():
        sv = np.linalg.svd(mats, compute_uv=False)
        ratio = sv[:, 0] / sv[:, 1]
        aniso = ratio > MAX_MAG_ANISOTROPY
        if aniso.any():
            i = int(np.flatnonzero(aniso)[0])
            r = int(rows[i]) if rows is not None else i
            raise ParticleDataError(
                f"{where}: {table} row {r + 1}, {columns}: matrix "
                f"{np.round(mats[i], 6).tolist()} stretches one axis {ratio[i]:.3g} times "
                f"more than the other (expected a magnification matrix with an anisotropy "
                f"of at most {MAX_MAG_ANISOTROPY:g})"
            )
        return
    i = int(np.flatnonzero(bad)[0])
    r = int(rows[i]) if rows is not None else i
    raise ParticleDataError(
        f"{where}: {table} row {r + 1}, {columns}: matrix "
        f"{np.round(mats[i], 6).tolist()} has determinant {det[i]:.6g} (expected a "
        f"magnification matrix with det > 0 and sqrt(det) between {lo:g} and {hi:g})"
    )


def validate_particle_set(ps: ParticleSet) -> None:
    """Check every column an engine uses; raise :class:`ParticleDataError` naming it.

    Required columns (``REQUIRED_PARTICLE_COLUMNS``, ``REQUIRED_OPTICS_COLUMNS``) must be
    present; every column of :data:`PARTICLE_RULES` / :data:`OPTICS_RULES` that is present
    must satisfy its rule in every row (under ``ps.limits``); optics group numbers must be
    unique and cover the particles' groups; magnification matrices must be complete (all four
    elements or none) with a positive determinant; origins must lie within the box.
    """
    from cryomag.model.particles import (
        MAGMAT_COLUMNS,
        REQUIRED_OPTICS_COLUMNS,
        REQUIRED_PARTICLE_COLUMNS,
        ParticleDataError,
    )

    name = ps.name
    for col, what in REQUIRED_OPTICS_COLUMNS.items():
        if col not in ps.optics.columns:
            raise ParticleDataError(f"{name}: optics table has no column {col} (expected {what})")
    for col, what in REQUIRED_PARTICLE_COLUMNS.items():
        if col not in ps.particles.columns:
            raise ParticleDataError(f"{name}: particle table has no column {col} (expected {what})")
    if len(ps.optics) == 0:
        raise ParticleDataError(f"{name}: the optics table has no rows")
    prules, orules = rules_for(ps.limits)
    cs_fields = ps.source.kind == "cs"
    for col, rule in orules.items():
        if col in ps.optics.columns:
            check_column(ps.optics[col], col, rule, name, "optics")
    for col, rule in prules.items():
        if col in ps.particles.columns:
            field = _CS_FIELDS.get(col) if cs_fields else None
            check_column(ps.particles[col], col, rule, name, "particle", field=field)
    groups = ps.optics["rlnOpticsGroup"].to_numpy(dtype=float).astype(np.int64)
    uniq, counts = np.unique(groups, return_counts=True)
    if (counts > 1).any():
        raise ParticleDataError(
            f"{name}: optics table defines optics group {int(uniq[counts > 1][0])} more than "
            "once (expected one row per group)"
        )
    used = set(ps.particles["rlnOpticsGroup"].to_numpy(dtype=float).astype(np.int64).tolist())
    missing = used - set(groups.tolist())
    if missing:
        raise ParticleDataError(
            f"{name}: particles refer to optics group(s) {sorted(missing)} that the "
            f"optics table does not define (it has {sorted(groups.tolist())})"
        )
    for table, label in ((ps.optics, "optics"), (ps.particles, "particle")):
        present = [c for c in MAGMAT_COLUMNS if c in table.columns]
        if present and len(present) < 4:
            absent = [c for c in MAGMAT_COLUMNS if c not in table.columns]
            raise ParticleDataError(
                f"{name}: {label} table has {', '.join(present)} but not {', '.join(absent)} "
                "(expected all four rlnMagMat00..11 or none)"
            )
        if present:
            mats = table[list(MAGMAT_COLUMNS)].to_numpy(dtype=float).reshape(-1, 2, 2)
            check_magnification(mats, name, label)
    _check_zernike(ps)
    _check_origins(ps)


def _check_zernike(ps: ParticleSet) -> None:
    """rlnOddZernike / rlnEvenZernike: RELION's ``[a,b,c]`` lists of finite numbers."""
    from cryomag.model.particles import ZERNIKE_COLUMNS, ParticleDataError, parse_zernike

    for col in ZERNIKE_COLUMNS:
        if col not in ps.optics.columns:
            continue
        for r, value in enumerate(ps.optics[col].tolist()):
            try:
                vals = parse_zernike(value)
                ok = all(math.isfinite(v) for v in vals)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ParticleDataError(
                    f"{ps.name}: optics row {r + 1}, column {col}: value {_show(value)} is not "
                    "a list of finite numbers (expected Zernike coefficients in rad written "
                    "as [a,b,c])"
                )


def _check_origins(ps: ParticleSet) -> None:
    """|origin| must not exceed the box extent (box x pixel size) of the particle's group."""
    from cryomag.model.particles import ParticleDataError

    cols = [c for c in ("rlnOriginXAngst", "rlnOriginYAngst") if c in ps.particles.columns]
    if not cols or len(ps) == 0:
        return
    extent = (ps.optics_value("rlnImageSize") * ps.optics_value("rlnImagePixelSize"))[
        ps.group_index()
    ]
    for c in cols:
        v = ps.particles[c].to_numpy(dtype=float)
        bad = np.abs(v) > extent
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ParticleDataError(
                f"{ps.name}: particle row {i + 1}, column {c}: value {v[i]!r} is out of range "
                f"(expected an origin in A within the box, |origin| <= {extent[i]:g} A)"
            )


#: cryoSPARC field each RELION column comes from, for messages about .cs files.
_CS_FIELDS = {
    "rlnDefocusU": "ctf/df1_A",
    "rlnDefocusV": "ctf/df2_A",
    "rlnDefocusAngle": "ctf/df_angle_rad, in degrees",
    "rlnPhaseShift": "ctf/phase_shift_rad, in degrees",
    "rlnAngleRot": "from alignments3D/pose",
    "rlnAngleTilt": "from alignments3D/pose",
    "rlnAnglePsi": "from alignments3D/pose",
    "rlnOriginXAngst": "alignments3D/shift x blob/psize_A",
    "rlnOriginYAngst": "alignments3D/shift x blob/psize_A",
    "rlnCtfScalefactor": "alignments3D/alpha",
    "rlnRandomSubset": "alignments3D/split + 1",
}

#: cryoSPARC per-particle fields that become optics columns (checked per particle row).
CS_OPTICS_FIELDS = {
    "blob/psize_A": "rlnImagePixelSize",
    "ctf/accel_kv": "rlnVoltage",
    "ctf/cs_mm": "rlnSphericalAberration",
    "ctf/amp_contrast": "rlnAmplitudeContrast",
}


# -------------------------------------------------------------------------- duplicates
def duplicate_images(ps: ParticleSet) -> dict:
    """Particles that point at the same image (same stack file and image number).

    Names are compared after dropping the zero padding of the image number and ``./`` after
    the ``@`` (``1@a.mrcs`` and ``000001@./a.mrcs`` are the same image); vectorised (about
    0.5 s per million particles).

    Returns
    -------
    dict
        ``count``: particles that repeat an earlier one; ``rows``: the first 20 such rows
        (1-based); ``first``: for those rows, the 1-based row they repeat.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if "rlnImageName" not in ps.particles.columns or len(ps) == 0:
        return {"count": 0, "rows": [], "first": []}
    col = ps.particles["rlnImageName"]
    try:
        arr = pa.array(col, type=pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        arr = pa.array(col.astype(str).to_numpy(dtype=object), type=pa.large_string())
    key = pc.replace_substring(pc.ascii_ltrim(arr, "0"), "@./", "@")
    codes, _ = pd.factorize(pd.Series(key, dtype=pd.ArrowDtype(pa.large_string())))
    n = len(codes)
    first = np.full(int(codes.max()) + 1, n, dtype=np.int64)
    np.minimum.at(first, codes, np.arange(n))  # first row of each name
    first_row = first[codes]
    dup = first_row != np.arange(n)
    rows = np.flatnonzero(dup)[:20]
    return {
        "count": int(dup.sum()),
        "rows": (rows + 1).tolist(),
        "first": (first_row[rows] + 1).tolist(),
    }


def warn_suspicious(ps: ParticleSet) -> None:
    """Warnings every reader gives: duplicate particles, negative contrast weights."""
    warn_duplicates(ps)
    if "rlnCtfScalefactor" in ps.particles.columns and len(ps):
        s = ps.particles["rlnCtfScalefactor"].to_numpy(dtype=float)
        neg = np.flatnonzero(s < 0)
        if neg.size:
            warn(
                f"{ps.name}: {neg.size} particle(s) have rlnCtfScalefactor < 0 (first: row "
                f"{neg[0] + 1}, {s[neg[0]]:g}); a contrast weight should be > 0: RELION and "
                "cryomag weight such a particle with a flipped sign (cryomag estimate writes "
                "this for particles that do not match the reference)"
            )


def warn_duplicates(ps: ParticleSet) -> dict:
    """Warn (log + :class:`DataWarning`) when particles repeat an image; returns the report."""
    rep = duplicate_images(ps)
    if rep["count"]:
        shown = zip(rep["rows"][:3], rep["first"][:3], strict=True)
        pairs = ", ".join(f"row {r} = row {f}" for r, f in shown)
        warn(
            f"{ps.name}: {rep['count']} duplicate particle(s) (same image file and index): "
            f"{pairs}{' ...' if rep['count'] > 3 else ''}; each copy counts as a separate "
            "particle"
        )
    return rep
