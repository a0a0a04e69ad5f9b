"""RELION STAR files: read into a :class:`ParticleSet`, write back keeping what was not changed.

Supported inputs
----------------
- RELION 3.1, 4 and 5 particle files (``# version 30001`` / ``50001``): ``data_optics`` and
  ``data_particles``, any further blocks (kept, in order).
- RELION 3.0 ("legacy") particle files: one table with no optics block. An optics table is
  built (see :func:`read_star`), pixel origins become ``rlnOriginX/YAngst``, and
  :func:`write_star` then writes a RELION 3.1 file (optics + particles).

Parsing is done here, not with the ``starfile`` package, for three reasons: the
``# version`` line is kept, string columns such as ``rlnMicrographName = 0001`` are never
turned into numbers (labels ending in ``Name``, ``File``, ``Image`` ... are always text), and
rows are parsed by pandas' C reader in one call per block. Writing formats whole columns at
once with pyarrow compute kernels (no Python loop over rows), so 10^6 particles write in a
few seconds.

Number format on write: a float that is exactly representable with 6 decimals (everything
RELION itself wrote, which uses ``%.6f``) is written as ``%.6f``; any other float is written
with its shortest round-trip representation (e.g. ``1.0114723481924912``, ``1e-07``). Reading
a written file therefore gives back bit-identical float64 values.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from cryomag.io.atomic import ParticleFileError, ParticleFileNotFoundError, atomic_write
from cryomag.model.particles import ParticleSet, SourceInfo
from cryomag.model.validation import (
    Rule,
    ValidationLimits,
    check_column,
    resolve_limits,
    rules_for,
    warn_suspicious,
)

__all__ = ["read_star", "write_star", "read_star_blocks", "DEFAULT_STAR_VERSION"]

#: Version line written when the source had none (RELION 3.1 format).
DEFAULT_STAR_VERSION = "30001"

_VERSION_RE = re.compile(rb"#[ \t]*version[ \t]+(\d+)")

#: Label suffixes that RELION types as strings; such columns are never parsed as numbers.
_STRING_SUFFIXES = (
    "Name",
    "File",
    "Filename",
    "Image",
    "Metadata",
    "Spectrum",
    "Zernike",
    "Path",
)
_STRING_LABELS = {"rlnCtfImage", "rlnMicrographMovieName", "rlnImageOriginalName"}
_NUMERIC_NA = ["nan", "NaN", "NAN", "-nan", "+nan", "-NaN", ""]

#: Legacy (RELION 3.0) particle columns that become optics-group properties (as RELION's
#: convert_3p0_particlesTo_3p1, star_converter.cpp:38-47, beam tilt included).
_LEGACY_OPTICS_KEYS = (
    "rlnBeamTiltX",
    "rlnBeamTiltY",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMagnification",
    "rlnDetectorPixelSize",
    "rlnImagePixelSize",
    "rlnImageSize",
)


def _is_string_label(label: str) -> bool:
    return label in _STRING_LABELS or label.endswith(_STRING_SUFFIXES)


def check_angpix(angpix: float | None) -> None:
    """Refuse a pixel-size override that is not a finite number > 0 (``--angpix``)."""
    if angpix is None:
        return
    try:
        ok = np.isfinite(float(angpix)) and float(angpix) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--angpix (angpix=) must be a pixel size in A > 0, got {angpix!r}")


# --------------------------------------------------------------------------------- parsing
def _count_values(line: bytes) -> int:
    """Whitespace-separated values of one STAR row (double-quoted strings count as one)."""
    if b'"' not in line and b"'" not in line:
        return len(line.split())
    try:
        return len(shlex.split(line.decode(errors="replace"), posix=True))
    except ValueError:
        return -1


def _bad_row(data: bytes, start: int, end: int, n_labels: int) -> tuple[int, int] | None:
    """(1-based data row, number of values) of the first row without ``n_labels`` values."""
    r = 0
    for ln in data[start:end].split(b"\n"):
        if not ln.strip():
            continue
        r += 1
        n_tok = _count_values(ln)
        if n_tok != n_labels:
            return r, n_tok
    return None


def _row_error(path: Path, block: str, labels: list[str], row: int, n_tok: int):
    return ParticleFileError(
        f"{path}: block data_{block}, row {row}: has {n_tok} values, expected "
        f"{len(labels)} (one per label: {', '.join(labels[:3])}, ...)"
    )


def _parse_loop_rows(
    path: Path, block: str, data: bytes, start: int, end: int, labels: list[str]
) -> pd.DataFrame:
    """Parse the rows of one loop (bytes ``data[start:end]``) into a DataFrame.

    Every row must have one value per label: a row with too many or too few values (the
    first row included) raises :class:`ParticleFileError` naming the block, the 1-based row
    and the counts.
    """
    str_cols = {lab: str for lab in labels if _is_string_label(lab)}
    na_values = {lab: _NUMERIC_NA for lab in labels if lab not in str_cols}
    try:
        with warnings.catch_warnings():
            # pandas only warns (and drops the extra values) when the FIRST row is too long
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(
                io.BytesIO(data[start:end]),
                sep=r"\s+",
                header=None,
                names=labels,
                dtype=str_cols,
                keep_default_na=False,
                na_values=na_values,
                quotechar='"',
                engine="c",
                skip_blank_lines=True,
                index_col=False,
            )
    except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError) as err:
        bad = _bad_row(data, start, end, len(labels))
        if bad is not None:
            raise _row_error(path, block, labels, *bad) from err
        raise ParticleFileError(
            f"{path}: block data_{block}: cannot parse the rows ({err}); expected "
            f"{len(labels)} whitespace-separated values per row"
        ) from err
    # rows with too few values come back with a missing last column: check those rows
    last = df[labels[-1]]
    suspicious = last.isna().to_numpy().copy()
    if last.dtype == object or isinstance(last.dtype, pd.StringDtype):
        suspicious |= (last.astype(str) == "").to_numpy()
    if suspicious.any():
        lines = [ln for ln in data[start:end].split(b"\n") if ln.strip()]
        for r in np.flatnonzero(suspicious):
            n_tok = _count_values(lines[r])
            if n_tok != len(labels):
                raise _row_error(path, block, labels, int(r) + 1, n_tok)
    return df


def _parse_value(text: str):
    """Type a single (non-loop) STAR value: int, float or string."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _find_line_start(data: bytes, token: bytes, pos: int, end: int) -> int:
    """First position >= pos where ``token`` starts a line (after optional blanks), or -1."""
    while True:
        i = data.find(token, pos, end)
        if i < 0:
            return -1
        j = i
        while j > 0 and data[j - 1] in (32, 9):  # spaces / tabs before the token
            j -= 1
        if j == 0 or data[j - 1] in (10, 13):
            return j
        pos = i + 1


def read_star_blocks(
    path: str | os.PathLike,
) -> tuple[str | None, dict[str, pd.DataFrame], list[str]]:
    """Read every data block of a STAR file.

    Parameters
    ----------
    path : path
        STAR file.

    Returns
    -------
    version : str or None
        The number of the first ``# version NNNNN`` comment, if any.
    blocks : dict of str to pandas.DataFrame
        One table per data block, in file order, keyed by the name after ``data_``. A
        non-loop block (``_label value`` pairs) becomes a one-row table.
    nonloop : list of str
        Names of the non-loop blocks.

    Raises
    ------
    ParticleFileNotFoundError
        If the file does not exist.
    ParticleFileError
        On malformed content (duplicate blocks or labels, rows with the wrong number of values).
    """
    path = Path(path)
    if not path.is_file():
        raise ParticleFileNotFoundError(f"{path}: STAR file not found")
    data = path.read_bytes()
    n = len(data)
    version: str | None = None
    blocks: dict[str, pd.DataFrame] = {}
    nonloop: list[str] = []
    name: str | None = None
    labels: list[str] = []
    pairs: dict[str, object] = {}
    in_loop = False
    rows_ended_at_comment = False  # the last loop's rows were cut by a '#' line

    def close_block() -> None:
        if name is None:
            return
        if in_loop:
            blocks[name] = pd.DataFrame({lab: pd.Series([], dtype=object) for lab in labels})
        else:
            blocks[name] = pd.DataFrame({k: [v] for k, v in pairs.items()})
            nonloop.append(name)

    pos = 0
    while pos < n:
        le = data.find(b"\n", pos)
        le = n if le < 0 else le
        line = data[pos:le].strip()
        if not line:
            pos = le + 1
            continue
        if line.startswith(b"#"):
            m = _VERSION_RE.match(line)
            if m and version is None:
                version = m.group(1).decode()
        elif line.startswith(b"data_"):
            close_block()
            name = line[5:].split()[0].decode(errors="replace") if line[5:].strip() else ""
            if name in blocks:
                raise ParticleFileError(f"{path}: data block data_{name} appears twice")
            labels, pairs, in_loop = [], {}, False
            rows_ended_at_comment = False
        elif name is None:
            if blocks:
                where = f"after the rows of data_{list(blocks)[-1]}"
                hint = (
                    " (comment lines inside a loop's rows are not allowed)"
                    if rows_ended_at_comment
                    else " (expected 'data_NAME' to start the next block)"
                )
            else:
                where = "before the first data_ block"
                hint = " (expected a STAR file: '# version', 'data_NAME', 'loop_', '_rlnLabel')"
            raise ParticleFileError(f"{path}: unexpected line {line[:60]!r} {where}{hint}")
        elif line == b"loop_":
            in_loop = True
        elif line.startswith(b"_"):
            tokens = line.decode(errors="replace").split(None, 1)
            label = tokens[0][1:]
            if in_loop:
                labels.append(label)
            else:
                pairs[label] = _parse_value(tokens[1]) if len(tokens) > 1 else ""
        elif in_loop and labels:
            # loop rows: up to the next line starting with 'data_' or '#'
            ends = [i for i in (_find_line_start(data, t, pos, n) for t in (b"data_", b"#"))]
            end = min([i for i in ends if i >= 0], default=n)
            rows_ended_at_comment = end < n and ends[1] == end
            dup = sorted({lab for lab in labels if labels.count(lab) > 1})
            if dup:
                raise ParticleFileError(f"{path}: block data_{name}: duplicate labels {dup}")
            blocks[name] = _parse_loop_rows(path, name, data, pos, end, labels)
            name, in_loop = None, False
            pos = end
            continue
        else:
            raise ParticleFileError(
                f"{path}: block data_{name}: unexpected line {line[:60]!r} "
                "(expected 'loop_', '_label' or '_label value')"
            )
        pos = le + 1
    close_block()
    return version, blocks, nonloop


# ----------------------------------------------------------------------------- read_star
def _check_square(path: Path, optics: pd.DataFrame) -> None:
    """Non-square boxes: rlnImageSize given as two values, or rlnImageSizeX != Y."""
    if "rlnImageSize" in optics.columns and not pd.api.types.is_numeric_dtype(
        optics["rlnImageSize"]
    ):
        for r, v in enumerate(optics["rlnImageSize"].astype(str)):
            parts = [p for p in re.split(r"[\s,x\[\]()]+", v) if p]
            if len(parts) > 1:
                raise ParticleFileError(
                    f"{path}: optics row {r + 1}, column rlnImageSize: {v!r} gives two sizes; "
                    "non-square boxes are unsupported (expected one box size in pixels)"
                )
    if {"rlnImageSizeX", "rlnImageSizeY"} <= set(optics.columns):
        nx = pd.to_numeric(optics["rlnImageSizeX"], errors="coerce").to_numpy(float)
        ny = pd.to_numeric(optics["rlnImageSizeY"], errors="coerce").to_numpy(float)
        bad = np.flatnonzero(nx != ny)
        if bad.size:
            r = int(bad[0])
            raise ParticleFileError(
                f"{path}: optics row {r + 1}: rlnImageSizeX = {nx[r]:g} but rlnImageSizeY = "
                f"{ny[r]:g}; non-square boxes are unsupported"
            )
        if "rlnImageSize" not in optics.columns:
            optics["rlnImageSize"] = optics["rlnImageSizeX"]


def _warn_particle_tilt(path: Path, particles: pd.DataFrame, source: SourceInfo) -> None:
    """RELION 3.1+ reads the beam tilt from the optics table only (obs_model.cpp:82-83): a
    per-particle tilt in such a file is ignored by RELION, and so by cryomag; say so."""
    from cryomag.model.particles import BEAM_TILT_COLUMNS
    from cryomag.model.validation import warn

    if source.legacy:
        return
    cols = [c for c in BEAM_TILT_COLUMNS if c in particles.columns]
    vals = [pd.to_numeric(particles[c], errors="coerce").to_numpy(float) for c in cols]
    if any(np.nanmax(np.abs(v), initial=0.0) > 0 for v in vals):
        warn(
            f"{path}: the particle table has {', '.join(cols)}: RELION 3.1 and later take the "
            "beam tilt from the optics table only and ignore these columns; cryomag does too"
        )


def _fill_missing_poses(path: Path, particles: pd.DataFrame, source: SourceInfo) -> None:
    """Fill absent angles (all three) and origins (both) with 0 and record it in ``source``.

    One origin without the other is a damaged table, not a file without poses: refused (the
    missing angle of an incomplete set is refused by the validation).
    """
    angles = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    if not any(a in particles.columns for a in angles):
        for a in angles:
            particles[a] = 0.0
            source.filled_columns.append(a)
        source.has_poses = False
    origins = ("rlnOriginXAngst", "rlnOriginYAngst")
    present = [o for o in origins if o in particles.columns]
    if len(present) == 1:
        absent = next(o for o in origins if o not in present)
        raise ParticleFileError(
            f"{path}: particle table has {present[0]} but no {absent} (expected both origins "
            "in A, or neither)"
        )
    for o in origins:
        if o not in particles.columns:
            particles[o] = 0.0
            source.filled_columns.append(o)


def _legacy_to_optics(
    path: Path, particles: pd.DataFrame, angpix: float | None, limits: ValidationLimits
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build an optics table for a RELION 3.0 particle table (no optics block)."""
    from cryomag.io.mrc import image_search_dirs, parse_image_names, resolve_image_path, stack_shape

    particles = particles.copy()
    for col, what in (
        ("rlnVoltage", "voltage in kV"),
        ("rlnSphericalAberration", "Cs in mm"),
        ("rlnAmplitudeContrast", "amplitude contrast"),
    ):
        if col not in particles.columns:
            raise ParticleFileError(
                f"{path}: RELION 3.0 particle table (no data_optics) has no column {col} "
                f"(expected {what})"
            )
    keys = [k for k in _LEGACY_OPTICS_KEYS if k in particles.columns]
    for k in keys:
        vals = pd.to_numeric(particles[k], errors="coerce").to_numpy(float)
        bad = np.flatnonzero(~np.isfinite(vals))
        if bad.size:
            r = int(bad[0])
            raise ParticleFileError(
                f"{path}: particle row {r + 1}, column {k}: value {particles[k].iloc[r]!r} is "
                "not a finite number"
            )
    # the optics values are per particle here: check them with the particle's row
    _, orules = rules_for(limits)
    extra = {
        "rlnMagnification": Rule("magnification, > 0", lo=0, lo_open=True),
        "rlnDetectorPixelSize": Rule("detector pixel size in um, > 0", lo=0, lo_open=True),
    }
    for k in keys:
        rule = orules.get(k) or extra.get(k)
        if rule is not None:
            check_column(particles[k], k, rule, str(path), "particle")
    key_df = particles[keys].apply(pd.to_numeric)
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(key_df), sort=False)
    group = codes.astype(int) + 1
    first_rows = np.array([np.flatnonzero(codes == g)[0] for g in range(len(uniques))], int)
    optics = pd.DataFrame({"rlnOpticsGroup": np.arange(1, len(uniques) + 1, dtype=int)})
    optics["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]]
    for k in keys:
        optics[k] = key_df[k].to_numpy()[first_rows]
    if angpix is not None:
        apix = np.full(len(optics), float(angpix))
    elif "rlnImagePixelSize" in keys:
        apix = optics["rlnImagePixelSize"].to_numpy(float)
    elif {"rlnMagnification", "rlnDetectorPixelSize"} <= set(keys):
        apix = (
            optics["rlnDetectorPixelSize"].to_numpy(float)
            * 1e4
            / optics["rlnMagnification"].to_numpy(float)
        )
    else:
        raise ParticleFileError(
            f"{path}: RELION 3.0 particle table without rlnMagnification and "
            "rlnDetectorPixelSize: cannot tell the pixel size (give it with --angpix; "
            "angpix= in Python)"
        )
    optics["rlnImagePixelSize"] = apix
    if "rlnImageSize" not in keys:
        if "rlnImageName" not in particles.columns:
            raise ParticleFileError(
                f"{path}: RELION 3.0 particle table without rlnImageSize or rlnImageName: "
                "cannot tell the box size"
            )
        sizes = []
        _, files = parse_image_names(particles["rlnImageName"].iloc[first_rows], path)
        dirs = image_search_dirs(path, "star")
        for r, f in zip(first_rows, files, strict=True):
            stack = resolve_image_path(f, dirs)
            if stack is None:
                raise ParticleFileError(
                    f"{path}: particle row {r + 1}: rlnImageSize is missing and its stack {f} "
                    f"was not found (looked in {', '.join(str(d) for d in dirs)}); cannot tell "
                    "the box size"
                )
            _, ny, nx = stack_shape(stack)
            if ny != nx:
                raise ParticleFileError(
                    f"{stack}: images are {nx} x {ny} pixels (particle row {r + 1} of {path}); "
                    "non-square boxes are unsupported"
                )
            sizes.append(nx)
        optics["rlnImageSize"] = np.array(sizes, dtype=int)
    optics["rlnImageDimensionality"] = 2
    first = [
        "rlnOpticsGroup",
        "rlnOpticsGroupName",
        "rlnAmplitudeContrast",
        "rlnSphericalAberration",
        "rlnVoltage",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnImageDimensionality",
    ]
    optics = optics[first + [c for c in optics.columns if c not in first]]
    optics["rlnImageSize"] = optics["rlnImageSize"].astype(int)

    particles = particles.drop(columns=keys)
    particles["rlnOpticsGroup"] = group
    px = apix[codes]
    for ax in ("X", "Y"):
        old, new = f"rlnOrigin{ax}", f"rlnOrigin{ax}Angst"
        if old in particles.columns:
            if new not in particles.columns:
                vals = pd.to_numeric(particles[old], errors="coerce").to_numpy(float)
                particles.insert(particles.columns.get_loc(old), new, vals * px)
            particles = particles.drop(columns=[old])
    return particles, optics


def read_star(
    path: str | os.PathLike,
    angpix: float | None = None,
    *,
    allow_negative_cs: bool | None = None,
    max_defocus_um: float | None = None,
) -> ParticleSet:
    """Read a RELION particle STAR file.

    Parameters
    ----------
    path : path
        RELION 3.0, 3.1, 4 or 5 particle STAR file.
    angpix : float, optional
        Pixel size in A/px for RELION 3.0 files; wins over rlnDetectorPixelSize * 1e4 /
        rlnMagnification. Ignored (with no effect) for files that have an optics table.
    allow_negative_cs : bool, optional
        Accept a negative rlnSphericalAberration (a Cs corrector); default: refused, or as
        set by :func:`cryomag.model.validation.validation_limits`.
    max_defocus_um : float, optional
        Largest accepted |defocus| in um (default 20, or as set by ``validation_limits``).

    Returns
    -------
    ParticleSet
        ``particles`` and ``optics`` tables with RELION column names and every input column;
        the version line, other blocks and block order in ``source``.

    Notes
    -----
    RELION 3.0 files (no ``data_optics``): one optics group per distinct combination of
    rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast, rlnMagnification,
    rlnDetectorPixelSize (and rlnImagePixelSize / rlnImageSize when present); these columns
    move from the particle table to the optics table. The pixel size is ``angpix`` or
    rlnDetectorPixelSize [um] * 1e4 / rlnMagnification; the box size is rlnImageSize or the
    size of the first image stack of the group. rlnOriginX/Y (px) become rlnOriginX/YAngst (A).

    A file without rlnAngleRot/Tilt/Psi (e.g. straight from extraction) reads with zero
    angles and ``source.has_poses = False``; missing origins read as 0. Such filled columns are
    left out again by :func:`write_star` while they are still all zero.

    Raises
    ------
    ParticleFileNotFoundError
        Missing file.
    ParticleDataError
        (or its subclass :class:`ParticleFileError`) for: no particle block, rows with the
        wrong number of values, missing required columns, any value that breaks the rules of
        :mod:`cryomag.model.validation` (non-numeric, NaN or inf in any column an engine uses,
        optional ones included; non-physical optics or defocus), particles referring to an
        undefined optics group, non-square boxes. The message names the file, the row, the
        column and what was expected.

    Warns
    -----
    DataWarning
        When particles repeat an image (same stack and index).
    """
    path = Path(path)
    limits = resolve_limits(allow_negative_cs, max_defocus_um)
    check_angpix(angpix)
    version, blocks, nonloop = read_star_blocks(path)
    if "particles" in blocks:
        pname = "particles"
    else:
        candidates = [n for n, b in blocks.items() if "rlnImageName" in b.columns]
        if not candidates or "optics" in blocks:
            raise ParticleFileError(
                f"{path}: no particle block (expected data_particles, or a RELION 3.0 table "
                f"with rlnImageName); found blocks {[f'data_{n}' for n in blocks]}"
            )
        pname = candidates[0]
    if pname in nonloop and len(blocks[pname].columns):
        raise ParticleFileError(f"{path}: block data_{pname} is not a loop_ table")
    particles = blocks[pname]
    source = SourceInfo(path=path, kind="star", star_version=version)
    if "optics" in blocks:
        if angpix is not None:
            warnings.warn(
                f"{path}: angpix={angpix} ignored: the file has an optics table "
                "(rlnImagePixelSize)",
                stacklevel=2,
            )
        optics = blocks["optics"]
        order = list(blocks)
    else:
        source.legacy = True
        particles, optics = _legacy_to_optics(path, particles, angpix, limits)
        order = ["optics", "particles"] + [n for n in blocks if n != pname]
    source.block_order = order
    source.extra_blocks = {n: b for n, b in blocks.items() if n not in ("optics", pname)}
    source.nonloop_blocks = [n for n in nonloop if n in source.extra_blocks]
    if len(particles) == 0:
        raise ParticleFileError(f"{path}: block data_{pname} has no particles")
    _check_square(path, optics)
    _warn_particle_tilt(path, particles, source)
    _fill_missing_poses(path, particles, source)
    ps = ParticleSet(
        particles.reset_index(drop=True), optics.reset_index(drop=True), source, limits
    )
    ps.validate()
    warn_suspicious(ps)
    return ps


# ---------------------------------------------------------------------------- write_star
_LS = pa.large_string()


def _fmt_float(x: np.ndarray) -> pa.Array:
    """Format float64 values: ``%.6f`` when exact at 6 decimals, else shortest round-trip.

    A value ``x`` is "exact at 6 decimals" when ``round(x * 1e6) / 1e6 == x``: the decimal
    string built from that integer then parses back to the same double (IEEE division is
    correctly rounded), so both branches are lossless.
    """
    finite = np.isfinite(x)
    small = finite & (np.abs(x) < 1e12)
    k = np.round(np.where(small, x, 0.0) * 1e6)
    exact = small & (k / 1e6 == x)
    out = None
    if exact.any():
        # digits of |k| padded to >= 7 characters, then a '.' before the last six
        digits = pc.cast(pa.array(np.abs(k).astype(np.int64)), _LS)
        out = pc.utf8_replace_slice(pc.utf8_lpad(digits, 7, "0"), -6, -6, ".")
        neg = k < 0
        if neg.any():
            mask = pa.array(neg)
            signed = pc.utf8_replace_slice(pc.filter(out, mask), 0, 0, "-")
            out = pc.replace_with_mask(out, mask, signed)
    if not exact.all():
        short = pc.cast(pa.array(x), _LS)
        # shortest repr of an integral value may lack '.' and 'e' ("300"): add ".0"
        integral = finite & ~exact & (x == np.round(x))
        if integral.any():
            mask = pa.array(integral)
            sub = pc.filter(short, mask)
            plain = pc.invert(pc.match_substring_regex(sub, r"[.eE]"))
            fixed = pc.if_else(
                plain,
                pc.binary_join_element_wise(sub, pa.scalar(".0", _LS), pa.scalar("", _LS)),
                sub,
            )
            short = pc.replace_with_mask(short, mask, fixed)
        out = short if out is None else pc.if_else(pa.array(exact), out, short)
    return out


def _format_column(s: pd.Series) -> tuple[pa.Array, bool]:
    """One column as a large_string arrow array with no nulls.

    Returns
    -------
    values : pyarrow.LargeStringArray, shape (N,)
        Formatted values; strings that are empty or contain whitespace are double-quoted.
    quoted : bool
        True when some value was quoted.
    """
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt):
        return pc.cast(pa.array(s.to_numpy().astype(np.int64)), _LS), False
    if pd.api.types.is_integer_dtype(dt):
        return pc.fill_null(pc.cast(pa.array(s), _LS), pa.scalar("nan", _LS)), False
    if pd.api.types.is_numeric_dtype(dt):
        return _fmt_float(s.to_numpy(dtype=np.float64, na_value=np.nan)), False
    if isinstance(dt, pd.StringDtype):
        arr = pa.array(s.fillna(""))
    else:
        arr = pa.array(s.fillna("").astype(str).to_numpy(dtype=object), type=_LS)
    arr = pc.cast(arr, _LS)
    needs_quote = pc.match_substring_regex(arr, r"(^$)|\s")
    if pc.any(needs_quote).as_py():
        q = pa.scalar('"', _LS)
        quoted = pc.binary_join_element_wise(q, arr, q, pa.scalar("", _LS))
        return pc.if_else(needs_quote, quoted, arr), True
    return arr, False


def _write_rows(fh, df: pd.DataFrame) -> None:
    """Write all rows of ``df`` ('v1 v2 ... vn' per line) to the binary file ``fh``."""
    if len(df) == 0:
        return
    formatted = [_format_column(df[c]) for c in df.columns]
    cols = [f[0] for f in formatted]
    if not any(f[1] for f in formatted):
        # fast path: arrow's CSV writer (no value needs quoting, so no structural characters)
        table = pa.table(cols, names=[f"c{i}" for i in range(len(cols))])
        opts = pcsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none")
        pcsv.write_csv(table, fh, write_options=opts)
        return
    rows = pc.binary_join_element_wise(*cols, pa.scalar(" ", _LS)) if len(cols) > 1 else cols[0]
    # append the newline: join (row, "") with "\n" as separator
    rows = pc.binary_join_element_wise(rows, pa.scalar("", _LS), pa.scalar("\n", _LS))
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks()
    offsets = np.frombuffer(rows.buffers()[1], dtype=np.int64)[
        rows.offset : rows.offset + len(rows) + 1
    ]
    fh.write(memoryview(rows.buffers()[2])[int(offsets[0]) : int(offsets[-1])])


def _drop_filled(ps: ParticleSet) -> pd.DataFrame:
    """The particle table without reader-filled columns that still hold only zeros."""
    drop = []
    for c in ps.source.filled_columns:
        if c in ps.particles.columns:
            v = pd.to_numeric(ps.particles[c], errors="coerce").to_numpy(float)
            if np.all(v == 0.0):
                drop.append(c)
    return ps.particles.drop(columns=drop) if drop else ps.particles


def _write_block(fh, name: str, df: pd.DataFrame, version: str, loop: bool = True) -> None:
    head = [f"# version {version}", "", f"data_{name}", ""]
    if not loop:
        for c in df.columns:
            head.append(f"_{c} {_format_column(df[c].iloc[:1])[0][0].as_py()}")
        fh.write(("\n".join(head) + "\n\n").encode())
        return
    head.append("loop_ ")
    head += [f"_{c} #{i + 1} " for i, c in enumerate(df.columns)]
    fh.write(("\n".join(head) + "\n").encode())
    _write_rows(fh, df)
    fh.write(b"\n")


def write_star(ps: ParticleSet, path: str | os.PathLike) -> None:
    """Write a particle set as a RELION 3.1+ STAR file (optics + particles), atomically.

    Every column of both tables is written, with every other data block of the source file
    and its version line (``# version 30001`` when the source had none). A set read from a
    RELION 3.0 file (``source.legacy``) is written as RELION 3.1: an optics block, rlnOpticsGroup
    and rlnOriginX/YAngst (see :func:`read_star`). Columns the reader filled in (absent angles
    or origins) are left out while they are still all zero.

    Parameters
    ----------
    ps : ParticleSet
        The particles to write.
    path : path
        Destination. Written to a temporary file in the same folder and renamed on success.

    Raises
    ------
    ParticleFileError
        If ``path`` is the file ``ps`` was read from.
    ParticleDataError
        If the set fails :meth:`ParticleSet.validate`.
    """
    ps.validate()
    src = ps.source
    version = src.star_version or DEFAULT_STAR_VERSION
    order = list(src.block_order) if src.kind == "star" and src.block_order else []
    extra = src.extra_blocks if src.kind == "star" else {}
    if "particles" not in order:
        order.append("particles")
    if "optics" not in order:
        order.insert(order.index("particles"), "optics")
    order += [n for n in extra if n not in order]
    particles = _drop_filled(ps)
    inputs = [src.path, src.passthrough]
    with atomic_write(path, inputs=inputs) as tmp, open(tmp, "wb") as fh:
        for name in order:
            if name == "optics":
                _write_block(fh, "optics", ps.optics, version)
            elif name == "particles":
                _write_block(fh, "particles", particles, version)
            elif name in extra:
                _write_block(fh, name, extra[name], version, loop=name not in src.nonloop_blocks)
