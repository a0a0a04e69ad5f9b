"""What ``cryomag estimate`` writes: particles.star / .cs, results.json, stats/, plots/."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cryomag.workflows.estimate import EstimateResult

__all__ = ["finite_or_none", "results_dict", "save_statistics", "write_outputs"]


def finite_or_none(obj):
    """``obj`` (nested dicts, lists, numbers, arrays) with NaN and infinities as None, so
    that the JSON is valid (``null``) and no reader takes them for numbers."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    return obj


def results_dict(res: EstimateResult) -> dict:
    """The JSON-serialisable summary written to results.json."""
    from cryomag.model.magnification import polar, relion_to_cryosparc

    groups = []
    for gr in res.groups:
        p = polar(gr.mag)
        kinds = gr.step_kinds()
        groups.append(
            {
                "optics_group": gr.group,
                "n_particles": gr.n_particles,
                "M_input": gr.mag_in.tolist(),
                "M": gr.mag.tolist(),
                "M_standard_error": gr.mag_error.tolist(),
                "M_covariance": gr.covariance.tolist(),
                "cryosparc_anisomag": np.asarray(relion_to_cryosparc(gr.mag)).tolist(),
                "polar": p.as_dict(),
                "iterations": gr.iterations,
                # passes over the images (warm subset, all particles, check subset) and
                # Gauss-Newton steps re-linearised from the stored second-order statistics
                "passes": {
                    "subset": kinds.count("subset"),
                    "full": kinds.count("full"),
                    "check": kinds.count("check"),
                    "relinearised_steps": kinds.count("relinearised"),
                },
                "band_A": [float(gr.band_A[0]), float(gr.band_A[1])],
                "chi2_per_pixel": gr.chi2,
                "mean_raw_scale": res.scales.group_mean.get(gr.group),
                "converged": gr.converged,
                "quality": gr.quality.as_dict() if gr.quality is not None else None,
                "history": gr.history,
                "M_linearisation": None if gr.mag_lin is None else gr.mag_lin.tolist(),
                **({"local": res.local[gr.group]} if gr.group in res.local else {}),
                **(
                    {"defocus": defocus_summary(res, gr)}
                    if gr.defocus_solution is not None and not gr.failed
                    else {}
                ),
                **(
                    {"aberrations": aberration_summary(gr)}
                    if gr.aberration_terms is not None
                    else {}
                ),
            }
        )
    s = res.scales.normalised
    has_scales = bool(np.isfinite(s).any())
    from cryomag.runinfo import command_line, version

    return {
        "command": command_line(),
        "cryomag_version": version(),
        "verdict": res.verdict,
        "problems": res.problems,
        "fit": list(res.options.fit),
        "options": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(res.options).items()
        },
        "groups": groups,
        "scale": {
            "quantiles": {
                q: float(np.nanquantile(s, float(q))) if has_scales else None
                for q in ("0.05", "0.25", "0.5", "0.75", "0.95")
            },
            "median_standard_error": (
                float(np.nanmedian(res.scales.error)) if has_scales else None
            ),
        },
        "timings": res.timings,
    }


def aberration_summary(gr) -> dict:
    """The refined aberrations of one group for results.json: per parameter its unit, input,
    refined value, change, standard error and correlation with M's isotropic part, and their
    covariance (in the order of ``parameters``)."""
    terms = gr.aberration_terms
    se = np.sqrt(np.clip(np.diag(gr.aberration_cov), 0, None))
    if gr.failed:
        se = np.full(len(terms), np.nan)
    start = terms.values(gr.optics_in) if gr.optics_in is not None else None
    params = {}
    for i, (name, kind, unit) in enumerate(terms.params):
        params[name] = {
            "kind": kind,
            "unit": unit,
            "input": finite_or_none(start[i]) if start is not None else None,
            "refined": finite_or_none(start[i] + gr.aberration[i]) if start is not None else None,
            "change": finite_or_none(gr.aberration[i]),
            "standard_error": finite_or_none(se[i]),
            "correlation_with_isotropic_M": finite_or_none(gr.aberration_mag_corr[i]),
        }
    return {
        "fitted": list(terms.groups),
        "frame": "evaluated at M k (RELION's convention), written in RELION's units and "
        "index order (rlnBeamTiltX/Y, rlnOddZernike, rlnEvenZernike, rlnSphericalAberration)",
        "parameters": params,
        "covariance": [[finite_or_none(v) for v in row] for row in np.asarray(gr.aberration_cov)],
        "applied": not gr.failed,
    }


DEFOCUS_FRAME = {
    "measured": (
        "apparent (measured-frame) defocus, as CTF estimation reports it: rlnDefocusU/V/Angle "
        "are for the CTF at rlnMagMat k (RELION's convention); refined in the frame of the "
        "input's CTF and re-expressed for the fitted M so that each particle's CTF is the "
        "refined one"
    ),
    "true": "specimen-frame defocus: the CTF moves with M (CTF(M k)), written unchanged in frame",
}


def defocus_summary(res: EstimateResult, gr) -> dict:
    """The refined defocus of one group for results.json (levels, frame, per micrograph and
    per particle changes with standard errors, the spread of the particles' heights, the
    correlation of M with the defocus)."""
    sol = gr.defocus_solution
    ps = res.particles
    rows = gr.rows
    mics = ps.micrographs()[rows]
    change = ps.column("cmagDefocusChange")[rows]
    se = ps.column("cmagDefocusError")[rows]
    units, inv = np.unique(mics, return_inverse=True)
    cnt = np.bincount(inv, minlength=len(units))
    mean_change = np.bincount(inv, change, minlength=len(units)) / np.maximum(cnt, 1)
    out = {
        "levels": {"defocus": res.options.defocus, "astigmatism": res.options.astigmatism},
        "frame": DEFOCUS_FRAME[res.options.defocus_frame],
        "units": "A (defocus positive = underfocus)",
        "correlation_M_isotropic_with_defocus": sol.corr_mag_defocus,
        "particles": {
            "rms_change_A": float(np.sqrt(np.nanmean(change**2))),
            "median_standard_error_A": float(np.nanmedian(se)),
        },
    }
    if sol.group.size:
        out["group"] = {
            "parameters": _names(res, "group"),
            "last_step": sol.group.tolist(),
            "standard_error": np.sqrt(np.diag(sol.group_cov)).tolist(),
        }
    if sol.micrograph.shape[1]:
        mse = np.sqrt(np.einsum("uii->ui", sol.micrograph_cov))
        out["micrographs"] = {
            "n": int(len(units)),
            "parameters": _names(res, "micrograph"),
            "rms_mean_defocus_change_A": float(np.sqrt(np.mean(mean_change**2))),
            "median_standard_error": np.nanmedian(mse, axis=0).tolist(),
            "values": {
                str(u): {
                    "mean_defocus_change_A": float(mean_change[i]),
                    "standard_error": mse[i].tolist(),
                }
                for i, u in enumerate(units)
            },
        }
    if sol.particle.shape[1]:
        out["particle_deviations"] = {
            "parameters": _names(res, "particle"),
            "spread_A": sol.prior_spread.tolist(),
            "spread_se_A": sol.prior_se.tolist(),
            # the deviations move together where one cause moves several parameters (a
            # height moves the astigmatism through an anisotropic magnification)
            "correlation": sol.prior_correlation.tolist(),
            "prior_steps": int(sol.prior_steps),
            "converged": bool(sol.prior_converged),
            "meaning": "standard deviation of the particles' deviations from their "
            "micrograph (the heights in the ice for the defocus), empirical Bayes",
        }
    return out


def _names(res, level: str) -> list[str]:
    return res.options.defocus_levels().names(level)


def save_statistics(res, folder: Path, options: dict | None = None) -> None:
    """Store each group's last statistics in ``folder`` (:mod:`cryomag.io.stats`) for refits.

    ``options``: the run's options as written to results.json (derived from ``res`` if None).
    """
    from cryomag.io import stats as store

    folder.mkdir(parents=True, exist_ok=True)
    for gr in res.groups:
        st = res.stats[gr.group]
        dz = res.input_defocus_A
        extra = {}
        if gr.defocus_solution is not None:  # the refined defocus's state, for refit
            extra = {
                "defocus_deviation": gr.defocus_solution.particle,
                "defocus_prior": gr.defocus_solution.prior,
                "defocus_last_step": gr.defocus_solution.delta_a,
            }
        store.save_group(
            store.group_path(folder, gr.group),
            st,
            mag=gr.mag,
            mag_in=gr.mag_in,
            mag_lin=gr.mag if gr.mag_lin is None else gr.mag_lin,
            group=gr.group,
            defocus_mean_A=dz[st.rows] if dz is not None else np.full(len(st.rows), np.nan),
            **extra,
        )
    store.write_options(folder, options or results_dict(res)["options"])


def write_outputs(
    res: EstimateResult,
    out: Path,
    inputs: list,
    write_cs: bool = False,
    plots: bool = True,
    image_root: Path | None = None,
) -> dict[str, Path]:
    """Write the fixed-name outputs of an estimation into ``out``.

    ``particles.star`` (always), ``particles.cs`` + ``particles.csg`` (for .cs input or
    ``write_cs``; the .csg is the cryoSPARC result group naming it),
    ``results.json``, ``stats/group_NNN.npz``, ``plots/*.png`` + ``plots/estimate.pdf`` (every
    plot, one per page).
    The image names are written relative to ``image_root`` (default ``out``).
    """
    from cryomag.io import write_star
    from cryomag.io.atomic import ensure_not_input, write_json
    from cryomag.io.mrc import rebase_image_names

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    star = out / "particles.star"
    ensure_not_input(star, inputs)
    to_write = res.particles.copy()  # the in-memory result keeps its own image paths
    rebase_image_names(to_write, out if image_root is None else image_root)
    write_star(to_write, star)
    written["star"] = star
    if write_cs or res.particles.source.kind == "cs":
        from cryomag.io import write_cs as _write_cs

        cs = out / "particles.cs"
        ensure_not_input(cs, inputs)
        _write_cs(to_write, cs)
        written["cs"] = cs
    summary = finite_or_none(results_dict(res))
    write_json(out / "results.json", summary, inputs)
    written["results"] = out / "results.json"
    save_statistics(res, out / "stats", summary["options"])
    written["stats"] = out / "stats"
    if plots:
        from cryomag.report.plots_aberrations import aberration_figures
        from cryomag.report.plots_defocus import defocus_figures
        from cryomag.report.plots_estimate import estimate_figures
        from cryomag.report.plots_local import local_figures
        from cryomag.report.render import render_figures

        # each module gives the figures of the groups it has something to show for
        figures = [
            *estimate_figures(res, res.bands),
            *local_figures(res.particles, res.local or {}),
            *defocus_figures(res),
            *aberration_figures(res),
        ]
        # every figure a PNG and a page of the PDF (drawn at once where possible)
        render_figures(figures, out / "plots", "estimate.pdf")
        written["plots"] = out / "plots"
    return written
