"""Concatenate particle sets (of different files, pixel sizes, optics) into one.

Each set keeps its optics groups, renumbered after the previous sets' groups and named
``<label>_<group name>``; a column some sets lack is filled with its neutral value, never NaN;
cryoSPARC uids stay exact uint64. Used by ``cryomag merge``
(:func:`cryomag.workflows.merge.combine` reads the files and calls :func:`concatenate`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cryomag.model.particles import MAGMAT_COLUMNS, PARTICLE_DEFAULTS, ParticleSet, SourceInfo
from cryomag.model.validation import current_limits

__all__ = ["OPTICS_FILL", "PARTICLE_FILL", "concatenate"]


#: Neutral values for optional columns that some inputs lack (never NaN in the merge).
PARTICLE_FILL = {
    **PARTICLE_DEFAULTS,
    "rlnNormCorrection": 1.0,
    "rlnClassNumber": 1,
    "rlnGroupNumber": 1,
    "rlnMicrographName": "?",
}
OPTICS_FILL = {
    "rlnBeamTiltX": 0.0,
    "rlnBeamTiltY": 0.0,
    "rlnImageDimensionality": 2,
    "rlnCtfDataAreCtfPremultiplied": 0,
    "rlnOddZernike": "[]",
    "rlnEvenZernike": "[]",
    # images extracted without binning: the micrograph pixel is the image pixel
    "rlnMicrographPixelSize": lambda t: t["rlnImagePixelSize"],
    "rlnMicrographOriginalPixelSize": lambda t: t["rlnImagePixelSize"],
}


def _fill_missing(
    frames: list[pd.DataFrame], fill: dict, table: str, report: dict, names: list[str]
) -> pd.DataFrame:
    """Concatenate ``frames``; a column some frames lack is filled for them, never with NaN.

    The value is the column's neutral one (``fill``; alternating half sets for
    rlnRandomSubset); a column without one (metadata no engine uses, e.g. rlnCoordinateX)
    gets 0 (numbers) or ``"?"`` (text), reported in ``report["filled_columns"]`` and warned
    about.
    """
    cols = list(dict.fromkeys(c for f in frames for c in f.columns))
    out = []
    guessed: dict[str, tuple] = {}
    for f in frames:
        f = f.copy()
        for c in cols:
            if c in f.columns or c == "cmagUid":
                continue
            if c == "rlnRandomSubset":  # as the reader would: alternating half sets
                f[c] = (np.arange(len(f)) % 2 + 1).astype(np.int64)
            elif c in fill:
                f[c] = fill[c](f) if callable(fill[c]) else fill[c]
            else:
                other = next(g[c] for g in frames if c in g.columns)
                value = 0 if pd.api.types.is_numeric_dtype(other.dtype) else "?"
                f[c] = value
                guessed.setdefault(c, (value, []))
        out.append(f)
    for c, (value, _) in guessed.items():
        lacking = [names[i] for i, f in enumerate(frames) if c not in f.columns]
        msg = (
            f"{table} column {c} is missing from {', '.join(lacking)} and has no neutral "
            f"value: set to {value!r} for those particles"
        )
        warnings.warn(msg, stacklevel=3)
        report.setdefault("filled_columns", []).append(msg)
    return pd.concat(out, ignore_index=True, sort=False)


def _merge_uids(parts: list[pd.DataFrame]) -> np.ndarray | None:
    """cmagUid for every merged particle, exact uint64: kept where an input had one (cryoSPARC
    uids), new unused numbers for the others; None when no input has uids."""
    if not any("cmagUid" in p.columns for p in parts):
        return None
    have = [
        p["cmagUid"].to_numpy().astype(np.uint64) if "cmagUid" in p.columns else None
        for p in parts
    ]
    used = set(np.concatenate([h for h in have if h is not None]).tolist())
    nxt = 1
    out = []
    for p, h in zip(parts, have, strict=True):
        if h is not None:
            out.append(h)
            continue
        new = []
        while len(new) < len(p):
            if nxt not in used:
                new.append(nxt)
            nxt += 1
        out.append(np.asarray(new, dtype=np.uint64))
    return np.concatenate(out)


def concatenate(sets: list[ParticleSet], stems: list[str], files: list[str]) -> tuple[
        ParticleSet, dict]:  # fmt: skip
    """One particle set from ``sets``, with a report.

    Parameters
    ----------
    sets : list of ParticleSet
        The inputs, in order; their optics groups are renumbered 1..G in that order.
    stems : list of str
        One label per set, prefixed to its group names (``<stem>_<group name>``).
    files : list of str
        One file name per set, for the report and the warnings.

    Returns
    -------
    merged : ParticleSet
        Validated; particles carry ``cmagInput`` (1-based index of their set).
    report : dict
        ``inputs`` (file, particles, optics_groups, pixel_size_A, box per set), and where it
        applies ``filled_columns`` and ``warning_voltage_cs``.
    """
    parts, optics, report = [], [], {"inputs": []}
    offset = 0
    kv_cs = set()
    for i, (ps, stem, file) in enumerate(zip(sets, stems, files, strict=True)):
        opt = ps.optics.copy()
        old = opt["rlnOpticsGroup"].astype(int).to_numpy()
        new = np.arange(1, len(opt) + 1) + offset
        remap = dict(zip(old, new, strict=True))
        names = (
            opt["rlnOpticsGroupName"].astype(str)
            if "rlnOpticsGroupName" in opt.columns
            else pd.Series([f"opticsGroup{g}" for g in old])
        )
        opt["rlnOpticsGroupName"] = [f"{stem}_{n}" for n in names]
        opt["rlnOpticsGroup"] = new
        if MAGMAT_COLUMNS[0] not in opt.columns:
            for c, v in zip(MAGMAT_COLUMNS, (1.0, 0.0, 0.0, 1.0), strict=True):
                opt[c] = v
        p = ps.particles.copy()
        p["rlnOpticsGroup"] = p["rlnOpticsGroup"].astype(int).map(remap)
        p["cmagInput"] = i + 1
        parts.append(p)
        optics.append(opt)
        for _, o in opt.iterrows():
            kv_cs.add((float(o["rlnVoltage"]), float(o["rlnSphericalAberration"])))
        report["inputs"].append(
            {
                "file": file,
                "particles": len(ps),
                "optics_groups": new.tolist(),
                "pixel_size_A": opt["rlnImagePixelSize"].astype(float).tolist(),
                "box": opt["rlnImageSize"].astype(int).tolist(),
            }
        )
        offset += len(opt)
    if len(kv_cs) > 1:
        msg = (
            f"inputs differ in voltage/Cs {sorted(kv_cs)}: the CTF of each group uses its "
            "own values, but check that this is intended"
        )
        warnings.warn(msg, stacklevel=3)
        report["warning_voltage_cs"] = msg
    labels = [Path(f).name for f in files]
    uids = _merge_uids(parts)
    particles = _fill_missing(parts, PARTICLE_FILL, "particle", report, labels)
    if uids is not None:
        particles["cmagUid"] = pd.Series(uids, dtype=np.uint64)
    optics_t = _fill_missing(optics, OPTICS_FILL, "optics", report, labels)
    merged = ParticleSet(
        particles,
        optics_t,
        SourceInfo(kind="memory", star_version="30001"),
        sets[0].limits if sets else current_limits(),
    )
    merged.validate()
    return merged, report
