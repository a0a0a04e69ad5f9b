"""``cryomag estimate``: per-particle contrast scale and per-group magnification."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import fail_cleanly


def register(app: typer.Typer) -> None:
    app.command("estimate")(estimate_cmd)


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
    fit: Annotated[str, typer.Option("--fit", help="comma-separated: scale,aniso")] = "scale,aniso",
    low_res: Annotated[float, typer.Option("--low-res", help="low-frequency cut (A)")] = 20.0,
    high_res: Annotated[
        float | None,
        typer.Option("--high-res", help="high-frequency limit (A); default from half-map FSC"),
    ] = None,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Gauss-Newton iterations")] = 10,
    tol: Annotated[float, typer.Option("--tol", help="stop when |update of M| < tol")] = 1e-5,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="particles per chunk")] = 64,
    j: Annotated[int, typer.Option("--j", help="threads (0 = all cores)")] = 0,
    angpix: Annotated[
        float | None, typer.Option("--angpix", help="pixel size for RELION 3.0 files (A)")
    ] = None,
    passthrough: Annotated[
        Path | None, typer.Option("--passthrough", help="cryoSPARC passthrough .cs")
    ] = None,
    cs: Annotated[bool, typer.Option("--cs", help="also write particles.cs")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="skip the plots")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Estimate per-particle scales and each optics group's magnification matrix.

    Writes OUT/particles.star (rlnMagMat per group, adapted defocus, rlnCtfScalefactor and
    cmagScale), OUT/particles.cs (for .cs input or --cs), OUT/results.json, OUT/stats/,
    OUT/plots/ and OUT/cryomag.log. Inputs are never overwritten.
    """
    from rich.console import Console

    from cryomag.workflows.estimate import estimate, print_summary

    if ref is None and half_maps is None:
        raise typer.BadParameter("give --ref or --half-maps")
    with fail_cleanly():
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
            fit=tuple(f.strip() for f in fit.split(",") if f.strip()),
            low_res_A=low_res,
            high_res_A=high_res,
            max_iter=max_iter,
            tol=tol,
            chunk_size=chunk_size,
            nthreads=j,
        )
        print_summary(res, Console())
        typer.echo(f"wrote {out}/particles.star, results.json, stats/, plots/")
