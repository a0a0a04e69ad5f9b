"""``cryomag merge``: one particle set from data sets recorded at different pixel sizes.

Each input (RELION STAR or cryoSPARC .cs) keeps its optics groups, renumbered after the
previous inputs' groups and named ``<input stem>_<group name>``. The estimate engine then fits
every group's magnification matrix against the one reference: the isotropic part is the
group's true pixel size relative to the reference's, p_true = p_declared / sqrt(det M).
The absolute scale is the reference's pixel size: it needs an external calibration (an
atomic model, a diffraction standard); the merge only makes the groups consistent.

Two ways out:
1. keep the images: one STAR with per-group rlnMagMat (RELION handles mixed boxes and pixel
   sizes through optics groups) and one .cs with every ``blob/psize_A`` set to a common pixel
   size and ``ctf/anisomag`` carrying each group's difference (M' = M p_common / p_declared,
   anisomag = M'^-1 - I; shifts kept in pixels);
2. resample: new stacks at one pixel size and box (exact Fourier resampling), shifts rescaled,
   CTF values kept in A, M = I. A set upsampled to a finer pixel carries no signal beyond its
   own original Nyquist: refine (or re-estimate, ``--high-res``) within that limit.

With ``fsc`` (``--fsc``) the merged particles are also reconstructed twice on the reference's
grid, with half-set FSC: "before" takes every group at its declared pixel size (M = I, the
input defocus: what merging the tables naively gives), "after" uses the estimated matrices (the
merged output; with ``resample`` still the input images, which carry the same correction).
Both use the same contrast scales, so the difference is the magnification.
OUT/plots/merge_fsc.png shows both curves; merge.json gets the curves and resolutions.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np

from cryomag.io.atomic import write_json
from cryomag.model.combine import concatenate
from cryomag.model.particles import MAGMAT_COLUMNS, ParticleDataError, ParticleSet
from cryomag.model.validation import duplicate_images

log = logging.getLogger("cryomag")


def combine(inputs: list, angpix: float | None = None) -> tuple[ParticleSet, dict]:
    """Read and concatenate particle files; returns the merged set and a report.

    Image names become absolute paths where the stacks exist, so that the merged table is
    valid wherever it is written (:func:`merge` rebases them to the output folder). The
    tables are concatenated by :func:`cryomag.model.combine.concatenate`: a column some
    inputs lack gets its neutral value for their particles (rlnCtfBfactor 0,
    rlnCtfScalefactor 1, rlnPhaseShift 0, rlnNormCorrection 1, rlnRandomSubset alternating,
    beam tilt 0, ...); one without a neutral value gets 0 or "?" (reported in
    ``report["filled_columns"]``): no value is ever NaN. cryoSPARC uids (``cmagUid``) stay
    exact uint64; particles without one get new unused numbers.
    """
    from cryomag.io import read_particles
    from cryomag.io.mrc import rebase_image_names

    sets = []
    for path in inputs:
        ps = read_particles(Path(path), angpix=angpix)
        # absolute: valid wherever the merge is written (warns about ambiguous names)
        rebase_image_names(ps, None, warn_ambiguous=True)
        sets.append(ps)
    merged, report = concatenate(
        sets, [Path(p).stem for p in inputs], [str(Path(p)) for p in inputs]
    )
    report["duplicates"] = find_duplicates(merged)
    if report["duplicates"]["count"]:
        warnings.warn(
            f"{report['duplicates']['count']} duplicate particles (same image file and index)",
            stacklevel=2,
        )
    return merged, report


def find_duplicates(ps: ParticleSet) -> dict:
    """Particles that point at the same image (file and index): count and first rows.

    The same check every reader warns about (:func:`cryomag.model.validation.duplicate_images`).
    """
    rep = duplicate_images(ps)
    return {"count": rep["count"], "rows": rep["rows"]}


def relative_pixel_sizes(res) -> list[dict]:
    """True pixel size of each group from its fitted M, with standard error and anchor."""
    ps = res.particles
    out = []
    for gr in res.groups:
        g = list(ps.group_numbers()).index(gr.group)
        p_decl = float(ps.pixel_sizes_A()[g])
        m = gr.mag
        det = float(np.linalg.det(m))
        scale = np.sqrt(det)
        # d sqrt(det M) / d M = 0.5 sqrt(det) M^-T
        jac = 0.5 * scale * np.linalg.inv(m).T.ravel()
        se_scale = float(np.sqrt(jac @ gr.covariance @ jac))
        p_true = p_decl / scale
        out.append(
            {
                "optics_group": gr.group,
                "name": ps.group_names()[g],
                "declared_pixel_size_A": p_decl,
                "true_pixel_size_A": p_true,
                "true_pixel_size_se_A": p_true * se_scale / scale,
                "relative_scale": scale,
                "relative_scale_se": se_scale,
                "n_particles": gr.n_particles,
                "verdict": gr.quality.verdict if gr.quality is not None else "ok",
            }
        )
    anchor = min(out, key=lambda r: (abs(np.log(r["relative_scale"])), -r["n_particles"]))
    for r in out:
        r["relative_to_anchor"] = r["true_pixel_size_A"] / anchor["true_pixel_size_A"]
        r["is_anchor"] = r is anchor
    return out


def cs_with_common_pixel(ps: ParticleSet, common_A: float) -> ParticleSet:
    """Relabel every group to ``common_A``: M' = M p_common / p_declared, origins so that the
    shifts stay the same in pixels (cryoSPARC stores them in pixels)."""
    out = ps.copy()
    p_decl = out.pixel_sizes_A()
    mats = out.mag_matrices() * (common_A / p_decl)[:, None, None]
    out.set_mag_matrices(mats)
    ratio = (common_A / p_decl)[out.group_index()]
    out.set_origin_A(out.origin_A() * ratio[:, None])
    out.set_pixel_sizes_A(np.full(out.n_groups, common_A))
    return out


def merge(
    inputs: list,
    out,
    reference=None,
    *,
    estimate: bool = True,
    resample: bool = False,
    pixel_size_A: float | None = None,
    box: int | None = None,
    angpix: float | None = None,
    progress: bool = True,
    fsc: bool = False,
    **options,
) -> dict:
    """Python API of ``cryomag merge``; returns the report written to OUT/merge.json.

    ``fsc``: reconstruct the merged particles before (M = I) and after (estimated M) the
    correction and compare their half-map FSC (:func:`before_after_fsc`; needs the estimate).
    ``options`` go to :func:`cryomag.estimate`.
    """
    from cryomag.io import write_cs, write_star
    from cryomag.io.atomic import ensure_not_input
    from cryomag.io.mrc import rebase_image_names
    from cryomag.io.outdir import check_out_not_input, output_folder
    from cryomag.workflows.estimate import estimate as run_estimate

    if len(inputs) < 1:
        raise ValueError("merge needs at least one input file")
    if estimate and reference is None:
        raise ValueError("merge: give --ref (or --no-estimate to merge the tables only)")
    if pixel_size_A is not None and not (
        np.isfinite(float(pixel_size_A)) and 0 < float(pixel_size_A) <= 100
    ):
        raise ValueError(f"--apix {pixel_size_A!r}: the pixel size must be > 0 and <= 100 A")
    if box is not None and (int(box) != box or box < 8 or box % 2):
        raise ValueError(f"--box {box!r}: the box must be an even integer >= 8")
    if box is not None and not resample:
        raise ValueError("--box applies to --resample only")
    out = Path(out)
    map_inputs = [reference] if reference is not None and not hasattr(reference, "box") else []
    with output_folder(out, "merge", inputs=[*inputs, *map_inputs]) as out:
        for name in ("particles.star", "particles.cs"):
            ensure_not_input(out / name, inputs)
        merged, report = combine(list(inputs), angpix=angpix)
        check_out_not_input(out, particles=merged)  # the image stacks are inputs too
        if fsc and not estimate:
            msg = "the before/after FSC needs the estimate (images and --ref): skipped"
            warnings.warn(msg, stacklevel=2)
            report["fsc"] = {"skipped": msg}
        if estimate:
            res = run_estimate(merged, reference, out / "estimate", progress=progress, **options)
            naive = merged  # the tables as read: the "before" of the FSC
            merged = res.particles
            report["verdict"] = res.verdict
            report["problems"] = res.problems
            report["pixel_sizes"] = relative_pixel_sizes(res)
            report["scale_per_group"] = {str(k): v for k, v in res.scales.group_mean.items()}
            report["absolute_scale"] = (
                "relative to the reference map's pixel size; an absolute calibration needs an "
                "external standard (atomic model, diffraction ring)"
            )
            _plot_pixel_sizes(report["pixel_sizes"], out / "pixel_sizes.png")
            if fsc:
                report["fsc"] = before_after_fsc(
                    merged,
                    naive,
                    reference,
                    out / "plots" / "merge_fsc.png",
                    nthreads=int(options.get("nthreads", 0)),
                    progress=progress,
                )
                report["fsc"]["plot"] = "plots/merge_fsc.png"
        if resample:
            from cryomag.workflows.apply import resample_particles

            p_true = merged.pixel_sizes_A() / np.sqrt(
                np.linalg.det(merged.mag_matrices())
            )
            target = float(pixel_size_A or p_true.min())
            extent = float((merged.boxes_px() * p_true).max())
            nbox = int(box or 2 * int(np.ceil(extent / target / 2)))
            merged = resample_particles(merged, out, "group", target, nbox, progress=progress)
            report["resampled"] = {"pixel_size_A": target, "box": nbox}
        else:
            rebase_image_names(merged, out)
        write_star(merged, out / "particles.star")
        common = float(pixel_size_A or merged.pixel_sizes_A().min())
        write_cs(cs_with_common_pixel(merged, common), out / "particles.cs")
        report["cs_common_pixel_size_A"] = common
        report["n_particles"] = len(merged)
        from cryomag.workflows.outputs import finite_or_none

        write_json(out / "merge.json", finite_or_none(report))
    return report


def before_after_fsc(
    merged: ParticleSet,
    naive: ParticleSet,
    reference,
    plot_path: Path,
    *,
    nthreads: int = 0,
    progress: bool = True,
) -> dict:
    """Half-map FSC of the merged particles without and with the estimated magnification.

    Parameters
    ----------
    merged : ParticleSet
        The estimate's output (per-group M, adapted defocus, contrast scales): "after".
    naive : ParticleSet
        The same particles as read (same rows): "before", with every group's M set to the
        identity (its declared pixel size) and the contrast scales of ``merged``.
    reference : path or MapReference
        Sets the output grid (box and voxel size); a map file also gives the FSC of each
        full map against it.
    plot_path : path
        PNG with both half-map FSC curves (written atomically; its folder is created).

    Returns
    -------
    dict
        The grid, the shell frequencies (1/A) and per run the half-map FSC with its
        resolutions at 0.143 and 0.5 (and, with a map file, the FSC against the reference).
    """
    from cryomag.io import ImageSource, read_map
    from cryomag.physics.reference import MapReference
    from cryomag.reconstruction.fsc import fsc as fsc_curve
    from cryomag.reconstruction.fsc import resolution_at
    from cryomag.report.html import plot_fsc_curves
    from cryomag.workflows.reconstruct import ReconstructOptions, run_reconstruct

    t0 = time.perf_counter()
    if isinstance(reference, MapReference):
        ref_vol, box, apix = None, reference.box, reference.pixel_size_A
    else:
        ref_vol, apix = read_map(reference)
        box = int(ref_vol.shape[0])
    if box % 2:  # the reconstruction needs an even box: one zero plane first keeps the centre
        box += 1
        if ref_vol is not None:
            ref_vol = np.pad(ref_vol, ((1, 0),) * 3)
    before = naive.copy()
    before.set_mag_matrices(np.tile(np.eye(2), (before.n_groups, 1, 1)))
    before.particles = before.particles.drop(
        columns=[c for c in MAGMAT_COLUMNS if c in before.particles.columns]
    )
    if merged.has_contrast_scales():
        before.set_contrast_scales(merged.contrast_scales())
    opts = ReconstructOptions(box=box, pixel_size_A=float(apix), nthreads=nthreads)
    runs = {
        "before": (before, "every group at its declared pixel size (M = I)", "M = I"),
        "after": (merged, "estimated per-group magnification matrices", "estimated M"),
    }
    out: dict = {"grid": {"box": box, "pixel_size_A": float(apix), "from": "reference"}}
    curves = []
    for label, (ps, what, short) in runs.items():
        log.info("merge: reconstruction %s the correction (%s)", label, what)
        r = run_reconstruct(ps, ImageSource(ps), opts, progress=progress)
        out["frequency_1_per_A"] = r.freq.tolist()
        entry = {
            "magnification": what,
            "resolution_0.143_A": r.resolution_A,
            "resolution_0.5_A": resolution_at(r.freq, r.fsc, 0.5),
            "fsc": r.fsc.tolist(),
            "n_particles_half": r.info["n_particles_half"],
        }
        if ref_vol is not None:
            f, c = fsc_curve(r.full, ref_vol, r.pixel_size_A)
            entry["fsc_vs_reference"] = c.tolist()
            entry["resolution_vs_reference_0.5_A"] = resolution_at(f, c, 0.5)
            entry["resolution_vs_reference_0.143_A"] = resolution_at(f, c, 0.143)
        out[label] = entry
        curves.append((f"{label}, {short}: {r.resolution_A:.2f} A at 0.143", r.freq, r.fsc))
        log.info(
            "merge: half-map FSC %s: %.2f A at 0.143, %.2f A at 0.5",
            label,
            entry["resolution_0.143_A"],
            entry["resolution_0.5_A"],
        )
    plot_path = Path(plot_path)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_fsc_curves(curves, plot_path, title="merge: half-map FSC before / after the correction")
    out["seconds"] = time.perf_counter() - t0
    return out


def _plot_pixel_sizes(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryomag.io.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(rows))
    rel = [100 * (r["relative_scale"] - 1) for r in rows]
    err = [100 * r["relative_scale_se"] for r in rows]
    ax.errorbar(x, rel, yerr=err, fmt="o", capsize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [r["name"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("declared / true pixel size - 1 (%)")
    ax.set_title("Relative pixel size per optics group (vs the reference)")
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


__all__ = ["ParticleDataError", "before_after_fsc", "combine", "merge", "relative_pixel_sizes"]
