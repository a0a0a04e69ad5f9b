"""``cryomag reconstruct``: half maps, full map and FSC from particles with known poses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import (
    AllowNegativeCs,
    MaxDefocus,
    Passthrough,
    Quiet,
    fail_cleanly,
    input_limits,
    positive,
    require,
)


def register(app: typer.Typer) -> None:
    app.command("reconstruct")(reconstruct_cmd)


def reconstruct_cmd(
    particles: Annotated[
        Path, typer.Option("--particles", "-i", help="RELION .star or cryoSPARC .cs")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    mag: Annotated[
        bool,
        typer.Option(
            "--mag/--no-mag",
            help="place slices with the file's magnification matrices (rlnMagMat) or with "
            "the identity (the CTF is evaluated as the file describes it either way)",
        ),
    ] = True,
    scale: Annotated[
        bool,
        typer.Option(
            "--scale/--no-scale",
            help="use the per-particle contrast scale rlnCtfScalefactor, or 1",
        ),
    ] = True,
    sym: Annotated[
        str, typer.Option("--sym", help="point group (RELION): C1, Cn, Dn (also T, O, I)")
    ] = "C1",
    j: Annotated[int, typer.Option("--j", help="threads (0 = all cores)")] = 0,
    box: Annotated[
        int | None,
        typer.Option("--box", help="output box (px, even); default: largest particle box in A"),
    ] = None,
    apix: Annotated[
        float | None,
        typer.Option("--apix", help="output voxel size (A); default: finest particle pixel"),
    ] = None,
    regularization: Annotated[
        str,
        typer.Option(
            "--regularization",
            help="'fsc' (Wiener term from the half-map FSC) or a number tau (SSNR = 1/tau)",
        ),
    ] = "fsc",
    max_iter: Annotated[
        int, typer.Option("--max-iter", help="conjugate-gradient iterations per map (0 = none)")
    ] = 20,
    eps: Annotated[float, typer.Option("--eps", help="NUFFT accuracy")] = 1e-4,
    angpix: Annotated[
        float | None, typer.Option("--angpix", help="pixel size for RELION 3.0 files (A)")
    ] = None,
    passthrough: Passthrough = None,
    quiet: Quiet = False,
    allow_negative_cs: AllowNegativeCs = False,
    max_defocus: MaxDefocus = 20.0,
) -> None:
    """Reconstruct by direct Fourier inversion with the given poses (no search).

    Honours each optics group's pixel size, box and magnification matrix and each
    particle's contrast scale; half sets from rlnRandomSubset (alternating when absent).
    Writes OUT/half1.mrc, OUT/half2.mrc, OUT/map.mrc (voxel size in the header),
    OUT/fsc.json (FSC curve, resolution at 0.143, settings, command), OUT/fsc.png and
    OUT/cryomag.log.
    """
    from cryomag.report.console import make_console
    from cryomag.runinfo import command_line
    from cryomag.workflows.reconstruct import reconstruct

    command = command_line()
    with fail_cleanly(), input_limits(allow_negative_cs, max_defocus):
        require(j >= 0, "--j", j, "an integer >= 0 (0 = all cores)")
        require(positive(eps) and eps < 1, "--eps", eps, "a NUFFT accuracy > 0 and < 1")
        require(max_iter >= 0, "--max-iter", max_iter, "an integer >= 0")
        require(positive(apix), "--apix", apix, "a voxel size in A > 0")
        res = reconstruct(
            particles,
            out,
            mag=mag,
            scale=scale,
            symmetry=sym,
            box=box,
            pixel_size_A=apix,
            nthreads=j,
            angpix=angpix,
            passthrough=passthrough,
            progress=not quiet,
            command=command,
            regularization=regularization,
            max_iter=max_iter,
            eps=eps,
        )
        tm = res.info["timings"]
        make_console().print(
            f"[bold]FSC = 0.143 at {res.resolution_A:.2f} A[/bold] (half maps, "
            f"{res.info['n_particles_half'][0]} + {res.info['n_particles_half'][1]} particles, "
            f"box {res.box} at {res.pixel_size_A:.4g} A, symmetry {sym}); "
            f"{tm['total_s']:.1f} s, {tm['particles_per_s']:.0f} particles/s"
        )
        typer.echo(f"wrote {out}/half1.mrc, half2.mrc, map.mrc, fsc.json, fsc.png")
