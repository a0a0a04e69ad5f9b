"""``cryomag inspect``: the command (the engine is :mod:`cryomag.workflows.inspect`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import AllowNegativeCs, MaxDefocus


def inspect_command(
    path: Annotated[
        Path,
        typer.Argument(
            help="RELION .star or cryoSPARC .cs particle file, or an MRC map / image stack "
            "(.mrc, .mrcs, .map).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for scale_histogram.png, scale_vs_defocus.png and inspect.json.",
        ),
    ] = None,
    particles: Annotated[
        Path | None,
        typer.Option(
            "--particles",
            help="For an MRC file: a .star / .cs whose optics groups' pixel size and box the "
            "header is compared with.",
        ),
    ] = None,
    allow_negative_cs: AllowNegativeCs = False,
    max_defocus: MaxDefocus = 20.0,
) -> None:
    """Show optics groups, magnification (RELION, cryoSPARC, polar, MotionCor2) and scale of a
    particle file; or the header, voxel size, values and warnings of an MRC map or stack."""
    from cryomag.cli.common import input_limits
    from cryomag.model.particles import ParticleDataError
    from cryomag.report.console_inspect import render, render_mrc
    from cryomag.workflows.inspect import MRC_SUFFIXES, inspect_mrc, inspect_particles

    is_mrc = path.suffix.lower() in MRC_SUFFIXES
    try:
        with input_limits(allow_negative_cs, max_defocus):
            if is_mrc:
                result = inspect_mrc(path, particles, out)
            elif particles is not None:
                raise ValueError(f"--particles {particles}: applies to an MRC file, not {path}")
            else:
                result = inspect_particles(path, out)
    except (ParticleDataError, OSError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)  # one line, never wrapped
        raise typer.Exit(code=1) from None
    (render_mrc if is_mrc else render)(result)


def register(app: typer.Typer) -> None:
    """Add the ``inspect`` command to the cryomag app."""
    app.command("inspect")(inspect_command)
