"""``cryomag inspect``: what a STAR or .cs file says about optics, magnification and scale,
and what an MRC map or stack's header and values say (:func:`inspect_mrc`).

:func:`inspect_particles` computes everything (a JSON-ready dict, also the Python API) and
writes the optional plots and inspect.json; :func:`cryomag.report.console_inspect.render`
prints the dict; the command is :mod:`cryomag.cli.inspect_cmd`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryomag.io import atomic_write, ensure_not_input, read_particles
from cryomag.model.magnification import motioncor2_mag, polar, true_pixel_size
from cryomag.model.particles import ParticleDataError, ParticleSet

SCALE_EXPLANATION = (
    "The per-particle scale (rlnCtfScalefactor; cryoSPARC alignments3D/alpha) is a contrast "
    "weight: a particle with scale 1.5 is weighted 1.5 times as much as the mean particle "
    "(scale 1) in refinement. It mostly follows ice thickness and local contrast. It is not "
    "a particle size or a magnification."
)

#: Optics columns shown per group: key in the result -> RELION column.
_OPTICS_FIELDS = {
    "name": "rlnOpticsGroupName",
    "pixel_size_A": "rlnImagePixelSize",
    "box_px": "rlnImageSize",
    "voltage_kV": "rlnVoltage",
    "cs_mm": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
}

#: cryoSPARC higher-order aberration fields (used when the optics table has no RELION ones).
_CS_ABERRATIONS = ("ctf/tilt_A", "ctf/trefoil_A", "ctf/tetra_A")

_MAX_OUTLIER_ROWS = 10


# --------------------------------------------------------------------------- helpers
def _json_ready(x: Any) -> Any:
    """Numpy scalars/arrays to Python, non-finite floats to None, recursively."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_ready(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_ready(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _parse_vector(value: Any) -> list[float] | None:
    """A Zernike vector (RELION's ``[a,b,c]`` or a sequence) as a list; None if empty
    (:func:`cryomag.model.particles.parse_zernike`)."""
    from cryomag.model.particles import parse_zernike

    values = parse_zernike(value)
    return list(values) if values else None


def _cs_field(cs_data: Any, name: str) -> np.ndarray | None:
    """A field of the original .cs array (numpy structured array or cryosparc Dataset)."""
    if cs_data is None:
        return None
    try:
        return np.asarray(cs_data[name], float)
    except (KeyError, ValueError, IndexError, TypeError):
        return None


def _read(path: Path) -> ParticleSet:
    """Read a particle file; every failure becomes a ParticleDataError naming the file."""
    try:
        return read_particles(path)
    except ParticleDataError:
        raise
    except Exception as exc:  # any parser failure: report it as unreadable input
        raise ParticleDataError(
            f"{path}: cannot read as a particle file (RELION .star or cryoSPARC .cs): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


# --------------------------------------------------------------------------- optics groups
def _group_summaries(ps: ParticleSet) -> list[dict[str, Any]]:
    """One dict per optics group: optics values, matrices, polar form, aberrations."""
    mats = ps.mag_matrices()
    gidx = ps.group_index()
    counts = np.bincount(gidx, minlength=ps.n_groups)
    cs_aberr = {}
    if ps.source.kind == "cs" and not {"rlnOddZernike", "rlnEvenZernike"} & set(ps.optics):
        for name in _CS_ABERRATIONS:
            values = _cs_field(ps.source.cs_data, name)
            if values is not None and len(values) == len(ps):
                cs_aberr[name.split("/")[1]] = values.reshape(len(ps), -1)
    out = []
    for i, row in enumerate(ps.optics.to_dict("records")):
        m = mats[i]
        g: dict[str, Any] = {
            "optics_group": int(row["rlnOpticsGroup"]),
            "n_particles": int(counts[i]),
        }
        for key, col in _OPTICS_FIELDS.items():
            value = row.get(col)
            g[key] = value if value is None or isinstance(value, str) else float(value)
        g["magmat_relion"] = m.tolist()
        g["magmat_cryosparc"] = np.linalg.inv(m).tolist()  # I + anisomag
        g["anisomag_cryosparc"] = (np.linalg.inv(m) - np.eye(2)).ravel().tolist()
        g["identity_matrix"] = bool(np.array_equal(m, np.eye(2)))
        p = polar(m)
        g["polar"] = p.as_dict()
        g["true_pixel_size_A"] = (
            true_pixel_size(g["pixel_size_A"], m) if g["pixel_size_A"] else None
        )
        major, minor, angle = motioncor2_mag(m)
        g["motioncor2_mag"] = [major, minor, angle]
        tilt = [row.get("rlnBeamTiltX"), row.get("rlnBeamTiltY")]
        g["beam_tilt_mrad"] = None if None in tilt else [float(t) for t in tilt]
        g["odd_zernike"] = _parse_vector(row.get("rlnOddZernike"))
        g["even_zernike"] = _parse_vector(row.get("rlnEvenZernike"))
        cs = {}
        for name, values in cs_aberr.items():
            mine = values[gidx == i]
            if mine.size:
                cs[name] = {
                    "mean": mine.mean(axis=0).tolist(),
                    "varies_within_group": bool(np.ptp(mine, axis=0).max() > 0),
                }
        g["cryosparc_aberrations"] = cs or None
        out.append(g)
    return out


# --------------------------------------------------------------------------- scale
def _micrographs(ps: ParticleSet) -> tuple[np.ndarray | None, str | None]:
    """Micrograph number per particle (0-based, order of first appearance) and its source.

    Uses rlnMicrographName; for a .cs file without ``location/micrograph_path`` (whose
    micrograph names the reader can only make up per exposure group) and for files without
    micrograph names, the image stack of rlnImageName instead (extraction writes one stack per
    micrograph). Returns ``(None, None)`` when neither is available.
    """
    cs_fields = getattr(getattr(ps.source.cs_data, "dtype", None), "names", None) or ()
    genuine = ps.source.kind != "cs" or "location/micrograph_path" in cs_fields
    if genuine and "rlnMicrographName" in ps.particles.columns:
        names, key = ps.micrographs(), "rlnMicrographName"
    elif "rlnImageName" in ps.particles.columns:
        image = ps.particles["rlnImageName"].astype(str)
        names, key = image.str.split("@", n=1).str[-1].to_numpy(), "image stack of rlnImageName"
    else:
        return None, None
    codes, _ = pd.factorize(pd.Series(names), sort=False)
    return codes, key


def _scale_arrays(
    ps: ParticleSet,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str | None]:
    """Scale (N,), mean defocus in um (N,), micrograph number (N,) and its source."""
    defocus_sum_A = ps.column("rlnDefocusU", np.nan) + ps.column("rlnDefocusV", np.nan)
    return ps.column("rlnCtfScalefactor"), 0.5e-4 * defocus_sum_A, *_micrographs(ps)


def _scale_summary(
    ps: ParticleSet,
    s: np.ndarray,
    defocus_um: np.ndarray,
    mic: np.ndarray | None,
    mic_key: str | None,
) -> dict[str, Any]:
    """Quantiles, outliers, defocus correlation and micrograph spread of the scale ``s``."""
    source = "alignments3D/alpha" if ps.source.kind == "cs" else "rlnCtfScalefactor"
    result: dict[str, Any] = {"column": "rlnCtfScalefactor", "source": source}
    result["explanation"] = SCALE_EXPLANATION
    has_column = "rlnCtfScalefactor" in ps.particles.columns
    result["present"] = bool(has_column and len(s) and not np.all(s == 1.0))
    if not result["present"]:
        where = "all equal 1" if has_column else "absent"
        result["message"] = f"No per-particle scale in this file ({source} {where})."
        return result

    qs = np.percentile(s, [0, 5, 25, 50, 75, 95, 100])
    result["n"] = int(s.size)
    result["mean"] = float(s.mean())
    result["std"] = float(s.std(ddof=1)) if s.size > 1 else 0.0
    result["quantiles"] = dict(
        zip(("min", "p5", "p25", "p50", "p75", "p95", "max"), qs, strict=True)
    )

    iqr = qs[4] - qs[2]
    lo, hi = qs[2] - 1.5 * iqr, qs[4] + 1.5 * iqr
    rows = np.flatnonzero((s < lo) | (s > hi))
    result["outliers"] = {
        "rule": "outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR]",
        "fences": [lo, hi],
        "count": int(rows.size),
        "n_low": int((s < lo).sum()),
        "n_high": int((s > hi).sum()),
        "examples": [{"row": int(r) + 1, "scale": float(s[r])} for r in rows[:_MAX_OUTLIER_ROWS]],
        "row_numbering": "1-based, order of the particle table in the file",
    }

    if np.ptp(defocus_um) > 0:
        from scipy.stats import spearmanr  # 0.3 s to import: only when needed

        rho, pval = spearmanr(s, defocus_um)
        result["spearman_vs_defocus"] = {"rho": float(rho), "p_value": float(pval)}
    else:
        result["spearman_vs_defocus"] = None

    if mic is None:
        result["micrographs"] = None
    else:
        frame = pd.DataFrame({"mic": mic, "s": s}).groupby("mic")["s"]
        medians, variances, sizes = frame.median(), frame.var(ddof=1), frame.size()
        multi = sizes >= 2
        dof = (sizes[multi] - 1).sum()
        within = math.sqrt(((sizes[multi] - 1) * variances[multi]).sum() / dof) if dof else None
        between = float(medians.std(ddof=1)) if len(medians) > 1 else None
        n_typical = float(sizes.median())
        summary = {
            "micrograph_key": mic_key,
            "n_micrographs": int(len(medians)),
            "particles_per_micrograph_median": n_typical,
            "std_of_micrograph_medians": between,
            "pooled_within_micrograph_std": within,
        }
        if between is not None and within:
            # spread of medians that within-micrograph scatter alone would give (normal data)
            noise = math.sqrt(math.pi / 2) * within / math.sqrt(n_typical)
            summary["sampling_std_of_medians"] = noise
            summary["ratio"] = between / within
            if between > 2 * noise:
                summary["interpretation"] = (
                    "micrographs differ beyond sampling noise: part of the scale is a property "
                    "of the micrograph (e.g. its ice thickness); it varies "
                    + (
                        "more between micrographs than within them"
                        if between > within
                        else "less between micrographs than within them"
                    )
                )
            else:
                summary["interpretation"] = "no per-micrograph effect beyond sampling noise"
        result["micrographs"] = summary
    return result


# --------------------------------------------------------------------------- main API
def inspect_particles(path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Summarise a particle file: optics groups, magnification and per-particle scale.

    Parameters
    ----------
    path : str or Path
        RELION ``.star`` or cryoSPARC ``.cs`` file.
    out : str or Path, optional
        Folder (created if needed) for ``scale_histogram.png``, ``scale_vs_defocus.png`` (only
        when the file has a per-particle scale) and ``inspect.json`` (this dict). Files are
        written atomically; an input file is never overwritten.

    Returns
    -------
    dict
        JSON-ready: ``file``, ``format``, ``n_particles``, ``n_groups``, ``groups`` (one dict
        per optics group: ``pixel_size_A``, ``box_px``, ``voltage_kV``, ``cs_mm``,
        ``amplitude_contrast``, ``magmat_relion`` (k_ref = M k_obs), ``magmat_cryosparc``
        (I + anisomag = M^-1), ``polar`` (see :class:`~cryomag.model.magnification.PolarMag`),
        ``true_pixel_size_A``, ``motioncor2_mag`` [major, minor, angle_deg], beam tilt and
        Zernike terms when present), ``scale`` (see the printed report) and ``outputs``.

    Raises
    ------
    ParticleDataError
        When the file cannot be read or written to; the message names the file.
    """
    path = Path(path)
    if out is not None:
        from cryomag.io.outdir import check_out_not_input

        check_out_not_input(out, [path])
    ps = _read(path)
    s, defocus_um, mic, mic_key = _scale_arrays(ps)
    result: dict[str, Any] = {
        "file": str(path),
        "format": ps.source.kind,
        "legacy_star": bool(ps.source.legacy),
        "n_particles": len(ps),
        "n_groups": ps.n_groups,
        "group_kind": "exposure group" if ps.source.kind == "cs" else "optics group",
        "groups": _group_summaries(ps),
        "scale": _scale_summary(ps, s, defocus_um, mic, mic_key),
        "outputs": {},
    }
    if out is not None:
        _write_outputs(path, Path(out), result, s, defocus_um, mic)
    return _json_ready(result)


def _write_outputs(
    path: Path,
    out: Path,
    result: dict[str, Any],
    s: np.ndarray,
    defocus_um: np.ndarray,
    mic: np.ndarray | None,
) -> None:
    """Write the plots and inspect.json into ``out``; record their paths in ``result``."""
    # matplotlib is imported only when plots are asked for (keeps `cryomag --help` fast)
    from cryomag.report.plots_inspect import plot_scale_histogram, plot_scale_vs_defocus

    if out.exists() and not out.is_dir():
        raise ParticleDataError(f"{out}: --out must be a folder, but this is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParticleDataError(f"{out}: cannot create output folder: {exc}") from exc
    scale = result["scale"]
    names = {"inspect_json": "inspect.json"}
    if scale["present"]:
        names = {
            "scale_histogram": "scale_histogram.png",
            "scale_vs_defocus": "scale_vs_defocus.png",
            **names,
        }
    targets = {key: out / name for key, name in names.items()}
    for target in targets.values():
        ensure_not_input(target, [path])
    result["outputs"] = {key: str(t) for key, t in targets.items()}
    if scale["present"]:
        plot_scale_histogram(
            s, targets["scale_histogram"], fences=scale["outliers"]["fences"], title=path.name
        )
        plot_scale_vs_defocus(s, defocus_um, mic, targets["scale_vs_defocus"], title=path.name)
    text = json.dumps(_json_ready(result), indent=2, allow_nan=False)
    with atomic_write(targets["inspect_json"], inputs=[path]) as tmp:
        tmp.write_text(text + "\n")


# --------------------------------------------------------------------------- MRC files
#: Suffixes read as MRC maps / stacks by ``cryomag inspect``.
MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".st", ".rec", ".ali")

#: Relative difference between the header's voxel size and a STAR's pixel size above which
#: ``inspect`` warns (a STAR stores 6 digits; 1e-4 is a 0.01 % magnification error).
PIXEL_SIZE_RTOL = 1e-4

#: Sections read at a time for the value statistics (bounds the memory to a few slabs).
_STATS_SECTIONS = 64

_ISPG_MEANING = {0: "image stack (ispg 0)", 1: "single volume (ispg 1)"}


def _f32(x) -> float:
    """A float32 header value as the shortest decimal that reads back to it."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _header_fields(path: Path) -> tuple[dict[str, Any], list[str], Any]:
    """The header as a JSON-ready dict, mrcfile's own complaints, and the raw header."""
    import warnings

    import mrcfile

    from cryomag.io.mrc import _read_header

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        header = _read_header(path)
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as m:
            voxel = m.voxel_size
    complaints = sorted({f"mrcfile: {w.message}" for w in caught})
    labels = [
        bytes(header.label[i]).decode("ascii", "replace").rstrip("\x00 ").strip()
        for i in range(min(int(header.nlabl), 10))
    ]
    fields = {
        "shape_xyz": [int(header.nx), int(header.ny), int(header.nz)],
        "mode": int(header.mode),
        "voxel_size_A": [_f32(voxel.x), _f32(voxel.y), _f32(voxel.z)],
        "cell_A": [_f32(header.cella.x), _f32(header.cella.y), _f32(header.cella.z)],
        "sampling_mxyz": [int(header.mx), int(header.my), int(header.mz)],
        "origin_A": [_f32(header.origin.x), _f32(header.origin.y), _f32(header.origin.z)],
        "nstart": [int(header.nxstart), int(header.nystart), int(header.nzstart)],
        "axis_order_crs": [int(header.mapc), int(header.mapr), int(header.maps)],
        "ispg": int(header.ispg),
        "extended_header_bytes": int(header.nsymbt),
        "exttyp": bytes(header.exttyp).decode("ascii", "replace").strip("\x00 "),
        "map_id": bytes(header.map).decode("ascii", "replace"),
        "machine_stamp": [int(b) for b in header.machst],
        "header_stats": {
            "dmin": _f32(header.dmin),
            "dmax": _f32(header.dmax),
            "dmean": _f32(header.dmean),
            "rms": _f32(header.rms),
        },
        "labels": [s for s in labels if s],
    }
    return fields, complaints, header


def _value_stats(path: Path, dtype: np.dtype) -> dict[str, Any]:
    """min, max, mean, std (of the finite values), NaN and Inf counts, read in slabs."""
    import warnings

    import mrcfile

    n = 0
    total = 0.0
    total2 = 0.0
    lo, hi = math.inf, -math.inf
    nan = inf = 0
    with warnings.catch_warnings():  # the header's complaints are reported once, by the caller
        warnings.simplefilter("ignore")
        m = mrcfile.mmap(path, mode="r", permissive=True)
    with m:
        data = m.data
        if data.ndim == 2:
            data = data[None]
        for start in range(0, data.shape[0], _STATS_SECTIONS):
            block = np.asarray(data[start : start + _STATS_SECTIONS], dtype=np.float64)
            if np.issubdtype(dtype, np.floating):
                nan += int(np.isnan(block).sum())
                inf += int(np.isinf(block).sum())
                block = block[np.isfinite(block)]
            if block.size == 0:
                continue
            n += block.size
            total += float(block.sum())
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        mean = total / n if n else math.nan
        for start in range(0, data.shape[0], _STATS_SECTIONS):  # two-pass variance: exact
            block = np.asarray(data[start : start + _STATS_SECTIONS], dtype=np.float64)
            block = block[np.isfinite(block)]
            total2 += float(((block - mean) ** 2).sum())
    return {
        "n_values": n + nan + inf,
        "min": lo if n else None,
        "max": hi if n else None,
        "mean": mean if n else None,
        "std": math.sqrt(total2 / n) if n else None,
        "nan_count": nan,
        "inf_count": inf,
    }


def _star_pixel_sizes(star: Path) -> list[dict[str, Any]]:
    """Per optics group of a particle file: group, pixel size (A), box (px)."""
    ps = _read(star)
    out = []
    for row in ps.optics.to_dict("records"):
        box = row.get("rlnImageSize")
        out.append(
            {
                "optics_group": int(row["rlnOpticsGroup"]),
                "pixel_size_A": float(row["rlnImagePixelSize"]),
                "box_px": None if box is None or box != box else int(box),
            }
        )
    return out


def inspect_mrc(
    path: str | os.PathLike,
    particles: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Summarise an MRC map or image stack: header, voxel size, values, and warnings.

    Parameters
    ----------
    path : path
        ``.mrc`` / ``.mrcs`` / ``.map`` (a volume, a stack of images or a single image).
    particles : path, optional
        A RELION ``.star`` or cryoSPARC ``.cs`` file whose optics groups' pixel sizes (A) and
        boxes (px) the header is compared with.
    out : path, optional
        Folder (created if needed) for ``inspect.json`` (this dict), written atomically.

    Returns
    -------
    dict
        JSON-ready: ``file``, ``kind`` ("map", "stack" or "image"), ``header`` (``shape_xyz``
        in voxels, ``mode`` and ``dtype``, ``voxel_size_A`` (x, y, z), ``cell_A``,
        ``sampling_mxyz``, ``origin_A``, ``nstart``, ``axis_order_crs``, ``ispg``,
        ``extended_header_bytes``, ``map_id``, ``machine_stamp``, ``header_stats``,
        ``labels``), ``size_check`` (expected and actual bytes), ``values`` (min, max, mean,
        std of the finite values, ``nan_count``, ``inf_count``; None when the data cannot be
        read), ``particles`` (the compared optics groups) and ``warnings`` (sentences).

    Raises
    ------
    ParticleDataError
        When the file is missing or not an MRC file at all (the message names it).
    """
    from cryomag.io.atomic import ParticleFileError
    from cryomag.io.mrc import _check_size

    path = Path(path)
    if out is not None:
        from cryomag.io.outdir import check_out_not_input

        check_out_not_input(out, [path, particles])
    try:
        header, complaints, raw = _header_fields(path)
    except (OSError, ValueError) as exc:
        raise ParticleDataError(f"{path}: cannot read as an MRC file: {exc}") from exc
    warnings_: list[str] = [f"{path}: {c}" for c in complaints]
    nx, ny, nz = header["shape_xyz"]
    dtype_name = _REAL_MODE_NAMES.get(header["mode"])
    header["dtype"] = dtype_name
    if header["ispg"] == 0 or path.suffix.lower() == ".mrcs":
        kind = "stack" if nz > 1 or path.suffix.lower() == ".mrcs" else "image"
    else:
        kind = "map" if nz > 1 else "image"
    size = {"actual_bytes": path.stat().st_size}
    values = None
    try:
        _, _, _, dtype = _check_size(path, raw)
        size["expected_bytes"] = size["actual_bytes"]
    except ParticleFileError as exc:
        warnings_.append(str(exc))
        dtype = None
    if dtype is not None:
        values = _value_stats(path, dtype)

    vx, vy, vz = header["voxel_size_A"]
    if vx <= 0 or vy <= 0 or (kind == "map" and vz <= 0):
        warnings_.append(
            f"{path}: no voxel size in the header (cell {header['cell_A']} A over sampling "
            f"{header['sampling_mxyz']}); give the pixel size explicitly where it is used"
        )
    elif not (math.isclose(vx, vy, rel_tol=1e-5) and (kind != "map" or math.isclose(vx, vz,
              rel_tol=1e-5))):  # fmt: skip
        warnings_.append(f"{path}: anisotropic voxel {vx:g} x {vy:g} x {vz:g} A")
    if kind == "map" and not nx == ny == nz:
        warnings_.append(
            f"{path}: non-cubic map {nx} x {ny} x {nz} voxels (cryomag expects a cubic map: "
            "pad it to a cube)"
        )
    if kind != "map" and nx != ny:
        warnings_.append(f"{path}: non-square images {nx} x {ny} pixels")
    if header["axis_order_crs"] != [1, 2, 3]:
        warnings_.append(
            f"{path}: axis order (mapc, mapr, maps) = {tuple(header['axis_order_crs'])}, not "
            "(1, 2, 3): readers that ignore it (most cryo-EM programs) see the axes permuted"
        )
    if values is not None:
        if values["nan_count"] or values["inf_count"]:
            warnings_.append(
                f"{path}: {values['nan_count']} NaN and {values['inf_count']} Inf value(s) "
                f"of {values['n_values']}"
            )
        if values["std"] == 0:
            warnings_.append(f"{path}: every value is {values['min']:g} (no signal)")

    compared = None
    if particles is not None:
        compared = _star_pixel_sizes(Path(particles))
        for g in compared:
            rel = (vx - g["pixel_size_A"]) / g["pixel_size_A"]
            if abs(rel) > PIXEL_SIZE_RTOL:
                warnings_.append(
                    f"{path}: header pixel size {vx:g} A differs from {particles} optics group "
                    f"{g['optics_group']} rlnImagePixelSize {g['pixel_size_A']:g} A "
                    f"({100 * rel:+.3f} %)"
                    + (
                        "; RELION and cryomag use the STAR's value for particle images"
                        if kind != "map"
                        else "; cryomag uses each file's own value, so check which is right"
                    )
                )
            if kind != "map" and g["box_px"] is not None and g["box_px"] != nx:
                warnings_.append(
                    f"{path}: images are {nx} px, {particles} optics group "
                    f"{g['optics_group']} rlnImageSize is {g['box_px']} px"
                )
    result: dict[str, Any] = {
        "file": str(path),
        "format": "mrc",
        "kind": kind,
        "header": header,
        "size_check": size,
        "values": values,
        "particles": None if particles is None else {"file": str(particles),
                                                     "optics_groups": compared},  # fmt: skip
        "warnings": warnings_,
        "outputs": {},
    }
    if out is not None:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ParticleDataError(f"{folder}: --out must be a folder, but this is a file")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "inspect.json"
        result["outputs"] = {"inspect_json": str(target)}
        text = json.dumps(_json_ready(result), indent=2, allow_nan=False)
        with atomic_write(target, inputs=[path, particles]) as tmp:
            tmp.write_text(text + "\n")
    return _json_ready(result)


_REAL_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 3: "complex int16",
                    4: "complex float32", 6: "uint16", 12: "float16"}  # fmt: skip
