"""``cryomag calibrate``: the absolute pixel size of each optics group against an atomic model.

The reference is the model's electron potential (:mod:`cryomag.calibration.density`: gemmi's
electron scattering factors, each atom's B-factor plus ``b_factor``), computed on a grid
whose voxel size is exact by construction: the atoms' coordinates are in A, so no pixel
size enters the reference. :func:`cryomag.estimate` then fits each group's magnification
matrix M against it (k_ref = M k_obs, frequencies of the particles in the declared pixel
size). The absolute pixel size is ``declared / sqrt(det M)``
(:func:`cryomag.model.magnification.true_pixel_size`) and its standard error follows from
the covariance of M: ``SE(p) = p SE(det M) / (2 det M)``, ``var(det M) = g^T C g`` with
``g = (M11, -M10, -M01, M00)``.

What the standard error covers: the statistical error of the fit (the particles' noise). It
does not cover an error of the model's own scale (its geometry): the calibration inherits
it. The result records, per group, what limits the precision: the frequency band used, the
attenuation of the model's signal there by its B-factors, and the box of the map.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CalibrationResult", "calibrate", "pixel_size_with_error"]

log = logging.getLogger("cryomag")


def pixel_size_with_error(
    declared_A: float, mag: np.ndarray, covariance: np.ndarray
) -> tuple[float, float]:
    """Absolute pixel size (A) implied by M and its standard error (A).

    Parameters
    ----------
    declared_A : float
        The declared pixel size (rlnImagePixelSize), A.
    mag : ndarray, shape (2, 2)
        RELION magnification matrix (k_ref = M k_obs).
    covariance : ndarray, shape (4, 4)
        Covariance of (M00, M01, M10, M11).

    Returns
    -------
    (float, float)
        ``declared / sqrt(det M)`` and its standard error (first-order propagation).
    """
    m = np.asarray(mag, float)
    det = float(np.linalg.det(m))
    p = declared_A / math.sqrt(det)
    g = np.array([m[1, 1], -m[1, 0], -m[0, 1], m[0, 0]])
    var_det = float(g @ np.asarray(covariance, float) @ g)
    se = p * math.sqrt(max(var_det, 0.0)) / (2 * det) if math.isfinite(var_det) else math.nan
    return p, se


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found.

    Attributes
    ----------
    groups : list of dict
        Per optics group: ``optics_group``, ``n_particles``, ``declared_pixel_size_A``,
        ``pixel_size_A`` (absolute) and ``pixel_size_se_A``, ``relative_change``
        (absolute / declared - 1), ``mag`` (M), ``polar`` (scales, anisotropy),
        ``verdict`` and ``limits`` (sentences).
    reference : dict
        The model map: file, voxel size (A), box, b_extra (A^2), centre (A), model summary.
    estimate : EstimateResult
        The underlying estimation.
    """

    groups: list[dict]
    reference: dict
    estimate: object = field(repr=False)

    def as_dict(self) -> dict:
        """JSON-ready (without the estimation's arrays)."""
        from cryomag.workflows.outputs import finite_or_none

        return finite_or_none({"groups": self.groups, "reference": self.reference})


def _map_geometry(ps, st, centre_A, pixel_size_A: float | None, box: int | None):
    """Voxel size and (even) box of the model map: fine enough and large enough for every
    group's particles, and holding the model (with its potential's tails)."""
    from cryomag.calibration.density import model_extent

    apix = ps.pixel_sizes_A()
    boxes = ps.boxes_px().astype(float)
    a = float(pixel_size_A) if pixel_size_A else float(apix.min())
    if box is None:
        need = float((boxes * apix).max()) / a
        radius = model_extent(st, centre_A) + 12.0  # the potential's tails (B <= ~250 A^2)
        need = max(need, 2 * radius / a)
        box = int(2 * math.ceil(need / 2))
    return a, int(box)


def calibrate(
    particles,
    model,
    out=None,
    *,
    b_factor: float = 0.0,
    ref_resolution_A: float | None = None,
    centre_A=None,
    map_pixel_size_A: float | None = None,
    map_box: int | None = None,
    executor=None,
    progress: bool = True,
    angpix: float | None = None,
    passthrough=None,
    **options,
) -> CalibrationResult:
    """Absolute pixel size of each optics group from its particles and an atomic model.

    Parameters
    ----------
    particles : path
        RELION STAR or cryoSPARC .cs (with poses refined against a map the model fits).
    model : path
        PDB or mmCIF atomic model in the frame of that map.
    out : path, optional
        Output folder: ``model_map.mrc`` (the reference), ``results.json``,
        ``calibration.txt`` (the report), ``cryomag.log``. Nothing is written when None.
    b_factor : float
        B-factor (A^2) added to every atom's own (a blur toward the data's resolution).
    ref_resolution_A : float, optional
        The data's resolution (A): the fit's high-frequency limit (default: estimate's, 0.9
        of the smaller Nyquist).
    centre_A : (float, float, float), optional
        The model point (x, y, z in A) at the particles' rotation centre. Default: the
        centre voxel (box // 2) of the first optics group's box at its declared pixel size,
        i.e. the model lies in the frame of a map refined from these particles with origin 0
        (RELION's convention).
    map_pixel_size_A, map_box : optional
        Voxel size (A) and box of the model map (default: the smallest declared pixel size;
        the box covers every group's particle box and the model).
    executor : Executor or ExecutorConfig, optional
        Where the passes run (as :func:`cryomag.estimate`).
    **options
        Fields of :class:`cryomag.workflows.estimate.EstimateOptions`.

    Returns
    -------
    CalibrationResult
    """
    from cryomag.calibration.density import (
        effective_b_extra,
        model_info,
        model_map,
        read_model,
    )
    from cryomag.io import read_particles
    from cryomag.io.outdir import output_folder
    from cryomag.model.magnification import polar
    from cryomag.simulation.phantom import write_mrc_map
    from cryomag.workflows.estimate import estimate
    from cryomag.workflows.runlog import run_log

    particles_path = Path(particles)
    model_path = Path(model)
    if not (math.isfinite(b_factor) and b_factor >= 0):
        raise ValueError(f"--b-factor {b_factor!r}: expected a B-factor in A^2 >= 0")
    st = read_model(model_path)
    ps = read_particles(particles_path, angpix=angpix, passthrough=passthrough)
    if centre_A is None:
        c = (int(ps.boxes_px()[0]) // 2) * float(ps.pixel_sizes_A()[0])
        centre_A = (c, c, c)
    centre_A = tuple(float(v) for v in centre_A)
    a, box = _map_geometry(ps, st, centre_A, map_pixel_size_A, map_box)
    info = model_info(st)
    if ref_resolution_A is not None:
        options.setdefault("high_res_A", float(ref_resolution_A))
    with output_folder(out, "calibrate", inputs=[particles_path, model_path, passthrough],
                       particles=ps) as out, run_log(out) as out:  # fmt: skip
        log.info("calibrate: %d particles from %s, model %s (%d atoms)", len(ps),
                 particles_path, model_path, info.n_atoms)  # fmt: skip
        vol = model_map(st, a, box, centre_A, b_extra=b_factor)
        b_used = effective_b_extra(st, b_factor)
        log.info("model map: box %d, voxel %.4f A, B added %.1f A^2", box, a, b_used)
        ref_path = None
        if out is not None:
            ref_path = out / "model_map.mrc"
            write_mrc_map(ref_path, vol, a)
            reference = ref_path
        else:
            from cryomag.physics.reference import MapReference

            reference = MapReference(vol, a, eps=options.get("eps", 1e-3))
        res = estimate(ps, reference, None, executor=executor, progress=progress,
                       **{"fit": ("scale", "aniso"), **options})  # fmt: skip
        groups = []
        for gr in res.groups:
            declared = float(ps.pixel_sizes_A()[ps.group_row(gr.group)])
            p, se = pixel_size_with_error(declared, gr.mag, gr.covariance)
            pol = polar(gr.mag).as_dict()
            limits = _limits(gr, info, b_used, a, box, se, p)
            groups.append(
                {
                    "optics_group": int(gr.group),
                    "n_particles": int(gr.n_particles),
                    "declared_pixel_size_A": declared,
                    "pixel_size_A": p,
                    "pixel_size_se_A": se,
                    "relative_change": p / declared - 1,
                    "mag": np.asarray(gr.mag).tolist(),
                    "mag_error": np.asarray(gr.mag_error).tolist(),
                    "polar": pol,
                    "band_A": list(gr.band_A),
                    "verdict": gr.quality.verdict if gr.quality is not None else None,
                    "problems": list(gr.quality.problems) if gr.quality is not None else [],
                    "limits": limits,
                }
            )
            log.info("optics group %d: pixel size %.5f +- %.5f A (declared %.5f A)",
                     gr.group, p, se, declared)  # fmt: skip
        result = CalibrationResult(
            groups,
            {
                "model": str(model_path),
                "map": None if ref_path is None else str(ref_path),
                "voxel_size_A": a,
                "box": box,
                "b_extra_A2": b_used,
                "centre_A": list(centre_A),
                "model_info": info.as_dict(),
            },
            res,
        )
        if out is not None:
            _write(result, out, [particles_path, model_path, passthrough])
    return result


def _limits(gr, info, b_extra: float, a: float, box: int, se: float, p: float) -> list[str]:
    """Sentences on what limits the group's calibration."""
    lo, hi = gr.band_A
    k = 1.0 / hi
    b_mean = info.b_iso_mean + b_extra
    att = math.exp(-b_mean * k * k / 4)
    return [
        f"statistical: standard error {se:.2g} A ({se / p:.1e} relative) from "
        f"{gr.n_particles} particles; it falls as 1 / sqrt(particles)",
        f"resolution: the fit used {lo:.1f} - {hi:.2f} A; the precision comes mostly from "
        "the highest frequencies with signal (a finer limit, where the data have signal, "
        "gives a smaller error)",
        f"model B-factors: mean B {info.b_iso_mean:.1f} A^2 (range {info.b_iso_range[0]:.1f} "
        f"- {info.b_iso_range[1]:.1f}) + {b_extra:.1f} added attenuate the model's signal at "
        f"{hi:.2f} A to {att:.2g} of its low-frequency value",
        f"map: box {box} x {a:.4f} A = {box * a:.1f} A, sampled every {1 / (box * a):.2e} "
        "1/A in frequency; its voxel size is exact (the model is in A)",
        "not included: any error of the model's own scale (its geometry), which the "
        "calibration inherits",
    ]


def _write(result: CalibrationResult, out: Path, inputs: list) -> None:
    """results.json and calibration.txt."""
    from cryomag.io.atomic import atomic_write, write_json

    summary = result.as_dict()
    write_json(out / "results.json", {"command": "calibrate", **summary}, inputs)
    with atomic_write(out / "calibration.txt", inputs=inputs) as tmp:
        tmp.write_text(report_text(summary))


def report_text(summary: dict) -> str:
    """The plain-text report of a calibration (the dict of :meth:`CalibrationResult.as_dict`)."""
    ref = summary["reference"]
    lines = [
        f"cryomag calibrate: absolute pixel size against {ref['model']}",
        f"model map: box {ref['box']}, voxel {ref['voxel_size_A']:.4f} A, B added "
        f"{ref['b_extra_A2']:.1f} A^2, centre {tuple(round(c, 3) for c in ref['centre_A'])} A",
        "",
    ]
    for g in summary["groups"]:
        se = g["pixel_size_se_A"]
        se_text = "n/a" if se is None else f"{se:.5f}"
        lines += [
            f"optics group {g['optics_group']} ({g['n_particles']} particles, verdict "
            f"{g['verdict']}):",
            f"  pixel size {g['pixel_size_A']:.5f} +- {se_text} A (declared "
            f"{g['declared_pixel_size_A']:.5f} A, {100 * g['relative_change']:+.3f} %)",
            f"  anisotropy {g['polar']['anisotropy_percent']:.3f} % at "
            f"{g['polar']['angle_deg']:.1f} deg",
        ]
        lines += [f"  - {s}" for s in g["limits"]]
        lines += [f"  ! {s}" for s in g["problems"]]
        lines.append("")
    return "\n".join(lines)
