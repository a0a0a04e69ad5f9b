"""``cryomag estimate``: per-particle contrast scale and per-group magnification."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import (
    EXIT_FIT_FAILED,
    AllowNegativeCs,
    MaxDefocus,
    Passthrough,
    Quiet,
    fail_cleanly,
    input_limits,
    positive,
    require,
)
from cryomag.cli.options import execution_options
from cryomag.execution.base import ExecutorConfig


def register(app: typer.Typer) -> None:
    app.command("estimate")(estimate_cmd)


@execution_options
def estimate_cmd(
    particles: Annotated[
        Path, typer.Option("--particles", "-i", help="RELION .star or cryoSPARC .cs")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    ref: Annotated[Path | None, typer.Option("--ref", help="reference map (MRC)")] = None,
    half_maps: Annotated[
        tuple[Path, Path] | None, typer.Option("--half-maps", help="two half maps (MRC)")
    ] = None,
    mask: Annotated[
        Path | None, typer.Option("--mask", help="mask multiplied into the map(s)")
    ] = None,
    fit: Annotated[
        str,
        typer.Option(
            "--fit",
            help="comma-separated: scale, aniso (per-group M), particle, micrograph, defocus "
            "(local magnification models)",
        ),
    ] = "scale,aniso",
    low_res: Annotated[float, typer.Option("--low-res", help="low-frequency cut (A)")] = 20.0,
    high_res: Annotated[
        float | None,
        typer.Option("--high-res", help="high-frequency limit (A); default from half-map FSC"),
    ] = None,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Gauss-Newton iterations")] = 10,
    tol: Annotated[float, typer.Option("--tol", help="stop when |update of M| < tol")] = 1e-5,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="particles per chunk")] = 1024,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue an interrupted run into the same OUT: finished chunks stored in "
            "OUT/.chunks are read back, only the rest is computed",
            rich_help_panel="Execution",
        ),
    ] = False,
    angpix: Annotated[
        float | None, typer.Option("--angpix", help="pixel size for RELION 3.0 files (A)")
    ] = None,
    passthrough: Passthrough = None,
    cs: Annotated[bool, typer.Option("--cs", help="also write particles.cs")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="skip the plots")] = False,
    image_paths: Annotated[
        str,
        typer.Option(
            "--image-paths",
            help="the written rlnImageName relative to: out (the output folder) or cwd (the "
            "working folder: a RELION project, whose programs resolve image names from it)",
        ),
    ] = "out",
    defocus_frame: Annotated[
        str,
        typer.Option(
            "--defocus-frame",
            help="measured: defocus measured on the distorted images (held fixed, as RELION); "
            "true: defocus already in the specimen frame (the CTF moves with M)",
        ),
    ] = "measured",
    window_pad: Annotated[
        int,
        typer.Option(
            "--window-pad",
            help="0 = automatic; 1 = box-periodic prediction (RELION); >1 = predict on a "
            "box that many times larger and cut the particle window",
        ),
    ] = 0,
    warm_start: Annotated[
        int,
        typer.Option(
            "--warm-start",
            help="particles per optics group for the first Gauss-Newton iterations (a fixed "
            "random subset; groups of more than twice this many only); 0 = every pass on "
            "all particles. The result is the all-particle solution either way",
        ),
    ] = 500,
    exact_gradient: Annotated[
        bool | None,
        typer.Option(
            "--exact-gradient/--image-gradient",
            help="the reference's frequency gradient by three more 3D transforms, or from the "
            "slice image (faster; the group fit converges to the same solution); default: "
            "exact when local models (particle, micrograph, defocus) are fitted on boxes "
            "below 96 px",
            show_default=False,
        ),
    ] = None,
    defocus: Annotated[
        str,
        typer.Option(
            "--defocus",
            help="refine the mean defocus jointly with M: fixed | group | micrograph | "
            "particle (micrograph mean + per-particle heights, shrunk); auto = particle when "
            "local models (particle, micrograph, defocus) are fitted, else fixed",
            rich_help_panel="Defocus",
        ),
    ] = "auto",
    astigmatism: Annotated[
        str,
        typer.Option(
            "--astigmatism",
            help="refine the astigmatism: fixed | group | micrograph | particle; auto = "
            "micrograph with local models, else fixed",
            rich_help_panel="Defocus",
        ),
    ] = "auto",
    defocus_tol: Annotated[
        float,
        typer.Option(
            "--defocus-tol",
            help="with the defocus refined, iterate until its step is below this (A)",
            rich_help_panel="Defocus",
        ),
    ] = 1.0,
    aberrations: Annotated[
        str,
        typer.Option(
            "--aberrations",
            help="refine optical aberrations per optics group jointly with M: a comma-"
            "separated list of tilt (beam tilt, mrad), trefoil (odd Zernike Z3,+-3), cs "
            "(spherical aberration, mm), tetrafoil (even Z4,+-4), astig4 (even Z4,+-2), or "
            "odd | even | all; none = held as the input has them",
            rich_help_panel="Optics",
        ),
    ] = "none",
    regroup: Annotated[
        str | None,
        typer.Option(
            "--regroup",
            help="new optics groups before the fit, written as the output's: column:NAME (a "
            "particle column, e.g. column:rlnBeamShiftGroup) or pattern:REGEX (its first "
            "group in each micrograph name, e.g. pattern:FoilHole_(\\d+)); each old group "
            "splits by the value",
            rich_help_panel="Optics",
        ),
    ] = None,
    quiet: Quiet = False,
    allow_negative_cs: AllowNegativeCs = False,
    max_defocus: MaxDefocus = 20.0,
    execution: ExecutorConfig | None = None,
) -> None:
    """Estimate per-particle scales and each optics group's magnification matrix.

    Writes OUT/particles.star (rlnMagMat per group, adapted defocus, rlnCtfScalefactor and
    cmagScale), OUT/particles.cs + particles.csg (a cryoSPARC result group; for .cs
    input or --cs), OUT/results.json, OUT/stats/,
    OUT/plots/ and OUT/cryomag.log. Inputs are never overwritten.

    Execution: by default one single-threaded worker process per core (forked from this one
    on Linux, else a Dask LocalCluster); --j 1 runs in this process; --scheduler uses a
    running Dask cluster; --cluster slurm|pbs submits --jobs batch jobs (e.g. --cluster slurm
    --jobs 4 --cores 8 --memory 32GB --queue cpu --account proj --walltime 04:00:00). The
    results do not depend on where they are computed. While running, each finished chunk is
    stored in OUT/.chunks (removed at the end): after Ctrl-C, a killed job or a lost node,
    rerun the same command with --resume.

    Exit status: 0 success; 1 bad input or options (nothing written); 3 a fit failed its
    quality checks (not converged, the reference does not explain the particles, M not
    determined): the outputs are written, the failed group's M and scales are not applied,
    and results.json says why (verdict, problems); 130 interrupted.
    """
    from cryomag.report.console import make_console, print_estimate_summary
    from cryomag.workflows.estimate import estimate

    if ref is None and half_maps is None:
        raise typer.BadParameter("give --ref or --half-maps")
    with fail_cleanly():
        _check_options(
            particles, out, ref, half_maps, mask, passthrough, max_iter, tol, low_res,
            high_res, chunk_size, window_pad, warm_start, defocus_frame,
        )  # fmt: skip
        require(image_paths in ("out", "cwd"), "--image-paths", image_paths, "'out' or 'cwd'")
        try:
            with input_limits(allow_negative_cs, max_defocus):
                res = estimate(
                    particles,
                    ref,
                    out,
                    half_maps=half_maps,
                    mask=mask,
                    angpix=angpix,
                    passthrough=passthrough,
                    write_cs=cs,
                    plots=not no_plots,
                    progress=not quiet,
                    executor=execution,
                    resume=resume,
                    image_root=Path.cwd() if image_paths == "cwd" else None,
                    fit=tuple(f.strip() for f in fit.split(",") if f.strip()),
                    low_res_A=low_res,
                    high_res_A=high_res,
                    max_iter=max_iter,
                    tol=tol,
                    chunk_size=chunk_size,
                    nthreads=execution.worker_threads,
                    defocus_frame=defocus_frame,
                    window_pad=window_pad,
                    warm_start=warm_start,
                    exact_gradient=exact_gradient,
                    defocus=defocus,
                    astigmatism=astigmatism,
                    defocus_tol_A=defocus_tol,
                    aberrations=aberrations,
                    regroup=regroup,
                )
        except KeyboardInterrupt:
            typer.secho(
                f"interrupted: finished chunks are kept in {out}/.chunks; rerun the same "
                "command with --resume to continue",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(130) from None
        print_estimate_summary(res, make_console())
        typer.echo(f"wrote {out}/particles.star, results.json, stats/, plots/")
        if res.verdict == "failed":
            raise typer.Exit(EXIT_FIT_FAILED)


def _check_options(
    particles, out, ref, half_maps, mask, passthrough, max_iter, tol, low_res, high_res,
    chunk_size, window_pad, warm_start, defocus_frame,
) -> None:  # fmt: skip
    """Refuse nonsense options and an --out that is an input folder, before any work."""
    from cryomag.io.mrc import check_half_maps
    from cryomag.io.outdir import check_out_not_input

    require(max_iter >= 1, "--max-iter", max_iter, "an integer >= 1")
    require(math.isfinite(tol) and tol >= 0, "--tol", tol, "a number >= 0")
    require(positive(low_res), "--low-res", low_res, "a resolution in A > 0")
    require(positive(high_res), "--high-res", high_res, "a resolution in A > 0")
    if high_res is not None:
        require(high_res < low_res, "--high-res", high_res, f"a resolution finer than --low-res "
                f"({low_res:g} A)")  # fmt: skip
    require(chunk_size >= 1, "--chunk-size", chunk_size, "an integer >= 1")
    require(window_pad >= 0, "--window-pad", window_pad, "an integer >= 0 (0 = automatic)")
    require(warm_start >= 0, "--warm-start", warm_start, "an integer >= 0 (0 = off)")
    require(defocus_frame in ("measured", "true"), "--defocus-frame", defocus_frame,
            "'measured' or 'true'")  # fmt: skip
    maps = [m for m in (ref, mask, *(half_maps or ())) if m is not None]
    for m in [particles, *maps, passthrough]:
        if m is not None and not m.exists():
            raise FileNotFoundError(f"{m}: file not found")
    if half_maps:
        check_half_maps(*half_maps)
    check_out_not_input(out, [particles, passthrough, *maps])
