"""``cryomag apply``: make downstream tools benefit from the fitted magnification.

Three ways, from a STAR written by ``cryomag estimate`` (group matrices in rlnMagMat, local
models in the documented ``cmag*`` columns):

- ``split`` (RELION, which has one M per optics group): new optics groups, one per micrograph
  or per bin of the fitted isotropic magnification, each with its own rlnMagMat (the mean of
  its particles' matrices); every other column kept; each particle's astigmatism re-expressed
  so that its CTF is unchanged.
- ``cs`` (cryoSPARC, whose CTF is per particle): a .cs with each particle's own
  ``ctf/anisomag`` (= M_p^-1 - I).
- ``resample`` (any tool): new stacks with each image undistorted to the nominal (or a chosen)
  pixel size (exact Fourier interpolation, :mod:`cryomag.physics.resample`), origins
  transformed (t_new = M^-T t) and a STAR with M = I.

Which matrix each particle gets (``model``): ``group`` (rlnMagMat), ``micrograph``
(cmagMicrographMagMat..), ``particle`` (cmagParticleMagMat..) or ``defocus``
(group matrix times cmagDefocusMag).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cryomag.model.particles import ParticleDataError, ParticleSet

MODELS = ("group", "micrograph", "particle", "defocus")
SPLITS = ("micrograph", "bins")

#: Option names in messages: Python API and command line.
_API_NAMES = {
    "model": "model",
    "split": "split",
    "bins": "n_bins",
    "apix": "pixel_size_A",
    "box": "box",
    "resample": "resample",
}
_CLI_NAMES = {k: f"--{k}" for k in _API_NAMES}


def check_apply_options(
    *,
    resample: bool = False,
    split: str | None = None,
    n_bins: int = 10,
    model: str = "group",
    pixel_size_A: float | None = None,
    box: int | None = None,
    cli: bool = False,
) -> None:
    """Refuse nonsense options of ``apply`` before any work (``ValueError``).

    ``cli``: name the options as the command line does (``--model``), else as the Python API.
    """
    n = _CLI_NAMES if cli else _API_NAMES
    if model not in MODELS:
        raise ValueError(f"{n['model']} {model!r}: choose one of {', '.join(MODELS)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{n['split']} {split!r}: choose one of {', '.join(SPLITS)}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"{n['bins']} {n_bins!r}: the number of bins must be an integer >= 1")
    if resample and split is not None:
        raise ValueError(
            f"{n['resample']} and {n['split']} exclude each other (resampled stacks have M = I: "
            "nothing is left to split)"
        )
    if pixel_size_A is not None:
        try:
            ok = np.isfinite(float(pixel_size_A)) and 0 < float(pixel_size_A) <= 100
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{n['apix']} {pixel_size_A!r}: the output pixel size must be a number of A, "
                "> 0 and <= 100"
            )
    if box is not None and (
        isinstance(box, bool) or not isinstance(box, int | np.integer) or box < 8 or box % 2
    ):
        raise ValueError(f"{n['box']} {box!r}: the output box must be an even integer >= 8")
    if not resample and (pixel_size_A is not None or box is not None):
        which = n["apix"] if pixel_size_A is not None else n["box"]
        raise ValueError(f"{which} applies to {n['resample']} only")


def particle_matrices(ps: ParticleSet, model: str = "group") -> np.ndarray:
    """The magnification matrix of each particle under ``model``, shape (N, 2, 2).

    A particle without a local value (NaN: no fit for it) gets its group's matrix; a local
    matrix that is not a magnification (inf, det <= 0, sqrt(det) outside 0.1-10, more than
    1.5x anisotropic) is an error naming the row.
    """
    from cryomag.model.validation import check_magnification

    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    mg = ps.mag_matrices()[ps.group_index()]
    t = ps.particles
    if model == "group":
        return mg.copy()
    if model == "defocus":
        if "cmagDefocusMag" not in t.columns:
            raise ParticleDataError(f"{ps.name}: no cmagDefocusMag column (fit defocus first)")
        d = pd.to_numeric(t["cmagDefocusMag"], errors="coerce").to_numpy(float)
        d = np.where(np.isnan(d), 1.0, d)  # NaN: no local fit; inf is refused below
        m = mg * d[:, None, None]
        check_magnification(m, ps.name, "particle", columns="column cmagDefocusMag (x rlnMagMat)")
        return m
    prefix = "cmagParticleMagMat" if model == "particle" else "cmagMicrographMagMat"
    cols = [f"{prefix}{c}" for c in ("00", "01", "10", "11")]
    missing = [c for c in cols if c not in t.columns]
    if missing:
        raise ParticleDataError(f"{ps.name}: no column {missing[0]} (fit {model} first)")
    m = t[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float, copy=True).reshape(-1, 2, 2)
    bad = np.isnan(m).any(axis=(1, 2))  # no local fit for the particle: its group's matrix
    m[bad] = mg[bad]
    check_magnification(m, ps.name, "particle", columns=f"columns {prefix}00..11")
    return m


def split_optics_groups(
    ps: ParticleSet, model: str = "micrograph", by: str = "micrograph", n_bins: int = 10
) -> ParticleSet:
    """New optics groups by micrograph or by bins of the isotropic magnification.

    Returns a new set whose optics table has one row per (old group, new unit), named
    ``<old name>_<unit>``, every old optics column kept, rlnMagMat the mean matrix of the
    unit's particles; defocus re-expressed so that each particle's CTF is unchanged.
    """
    mats = particle_matrices(ps, model)
    mg = ps.mag_matrices()[ps.group_index()]
    gidx = ps.group_index()
    if by == "micrograph":
        unit = pd.factorize(ps.micrographs())[0]
    elif by == "bins":
        iso = np.sqrt(np.abs(np.linalg.det(mats) / np.linalg.det(mg)))
        edges = np.quantile(iso, np.linspace(0, 1, n_bins + 1))
        unit = np.clip(np.searchsorted(edges, iso, side="right") - 1, 0, n_bins - 1)
    else:
        raise ValueError(f"split by 'micrograph' or 'bins', got {by!r}")
    key = pd.factorize(pd.Series(list(zip(gidx, unit, strict=True))))[0]
    n_new = key.max() + 1
    mean_m = np.stack([mats[key == k].mean(axis=0) for k in range(n_new)])
    suffixes = [f"{by}{unit[key == k][0] + 1}" for k in range(n_new)]
    out = ps.regroup(key, suffixes)
    out.set_mag_matrices(mean_m)
    new_group = key + 1
    # CTF(M_old k; Adef) = CTF(M_new k; Adef') with Adef' = T^T Adef T, T = M_old M_new^-1
    t = mg @ np.linalg.inv(mean_m[new_group - 1])
    out.reexpress_astigmatism(np.arange(len(ps)), t)
    return out


def per_particle_cs(ps: ParticleSet, path: Path, model: str = "particle") -> None:
    """Write a .cs whose ctf/anisomag holds each particle's own matrix."""
    from cryomag.io import write_cs
    from cryomag.io.atomic import atomic_write
    from cryomag.io.cryosparc import load_cs_array

    mats = particle_matrices(ps, model)
    write_cs(ps, path)
    arr = np.array(load_cs_array(path), copy=True)
    if "ctf/anisomag" not in (arr.dtype.names or ()):
        raise ParticleDataError(f"{path}: written .cs has no ctf/anisomag field")
    arr["ctf/anisomag"] = (np.linalg.inv(mats) - np.eye(2)).reshape(-1, 4)
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def resample_particles(
    ps: ParticleSet,
    out: Path,
    model: str = "group",
    pixel_size_A: float | None = None,
    box: int | None = None,
    chunk: int = 500,
    progress: bool = True,
) -> ParticleSet:
    """Write undistorted stacks into ``out/Particles`` and return the matching set (M = I).

    Each particle is resampled with its own matrix (``model``) to ``pixel_size_A`` (default:
    each group's declared pixel size) and ``box`` (default: each group's box); shifts become
    t_new = M^-T t; the CTF is kept: defocus is re-expressed with M_group M_p^-1 (nothing
    changes for ``model="group"``, since RELION's defocus already refers to the true frame).
    """
    from cryomag.execution.local import progress_bar
    from cryomag.io import ImageSource, write_stack
    from cryomag.physics.resample import new_origins_A, resample_images

    out = Path(out)
    (out / "Particles").mkdir(parents=True, exist_ok=True)
    mats = particle_matrices(ps, model)
    gidx = ps.group_index()
    mg = ps.mag_matrices()[gidx]
    new = ps.copy()
    src = ImageSource(ps)
    names = np.empty(len(ps), dtype=object)
    apix_in = ps.pixel_sizes_A()
    box_in = ps.boxes_px()
    apix_out = np.full(ps.n_groups, pixel_size_A) if pixel_size_A else apix_in.copy()
    box_out = np.full(ps.n_groups, box) if box else box_in.copy()
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("resampling", total=len(ps))
        stack_no = 0
        for g in range(ps.n_groups):
            rows = np.flatnonzero(gidx == g)
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                imgs = resample_images(
                    src.read(part), mats[part], apix_in[g], apix_out[g], int(box_out[g])
                )
                stack_no += 1
                rel = Path("Particles") / f"resampled_{stack_no:05d}.mrcs"
                write_stack(out / rel, imgs, float(apix_out[g]))
                names[part] = [f"{i + 1:06d}@{rel.as_posix()}" for i in range(len(part))]
                bar.advance(task, len(part))
    new.set_image_names(names)
    new.set_origin_A(new_origins_A(ps.origin_A(), mats))
    new.reexpress_astigmatism(np.arange(len(ps)), mg @ np.linalg.inv(mats))
    new.set_pixel_sizes_A(apix_out)
    new.set_boxes_px(box_out)
    # the local matrices referred to the old images
    drop = [c for c in new.particles.columns if c.startswith("cmag") and "MagMat" in c]
    new.particles = new.particles.drop(columns=drop)
    new.set_mag_matrices(np.tile(np.eye(2), (ps.n_groups, 1, 1)))
    return new


def apply(
    star,
    out,
    *,
    resample: bool = False,
    split: str | None = None,
    n_bins: int = 10,
    model: str = "group",
    cs: bool = False,
    pixel_size_A: float | None = None,
    box: int | None = None,
    progress: bool = True,
) -> dict:
    """Python API of ``cryomag apply``; returns the paths written.

    Options are checked before anything is read (:func:`check_apply_options`); ``out`` must
    not be (or hold) the run folder or the image stacks, and is locked and cleaned of an
    earlier run's outputs (:func:`cryomag.io.outdir.output_folder`).
    """
    from cryomag.io import read_particles, write_star
    from cryomag.io.atomic import ensure_not_input
    from cryomag.io.outdir import check_out_not_input, output_folder

    check_apply_options(
        resample=resample,
        split=split,
        n_bins=n_bins,
        model=model,
        pixel_size_A=pixel_size_A,
        box=box,
    )
    star = Path(star)
    if star.is_dir():
        star = star / "particles.star"
    out = Path(out)
    check_out_not_input(out, [star])
    ps = read_particles(star)
    written = {}
    with output_folder(out, "apply", inputs=[star], particles=ps) as out:
        if resample:
            res = resample_particles(ps, out, model, pixel_size_A, box, progress=progress)
        elif split:
            res = split_optics_groups(ps, model, split, n_bins)
        else:
            res = ps.copy()
        target = out / "particles.star"
        ensure_not_input(target, [star])
        if not resample:
            from cryomag.io.mrc import rebase_image_names

            rebase_image_names(res, out)
        write_star(res, target)
        written["star"] = target
        if cs:
            target_cs = out / "particles.cs"
            ensure_not_input(target_cs, [star])
            per_particle_cs(res, target_cs, "group" if (resample or split) else model)
            written["cs"] = target_cs
    return written
