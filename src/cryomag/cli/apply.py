"""``cryomag apply``: write the fitted magnification where downstream tools use it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import AllowNegativeCs, MaxDefocus, fail_cleanly, input_limits


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_cmd)


def apply_cmd(
    run: Annotated[Path, typer.Argument(help="estimate output folder or its particles.star")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    resample: Annotated[
        bool, typer.Option("--resample", help="write undistorted stacks and a STAR with M = I")
    ] = False,
    split: Annotated[
        str | None,
        typer.Option("--split", help="RELION: new optics groups by 'micrograph' or 'bins'"),
    ] = None,
    bins: Annotated[int, typer.Option("--bins", help="number of bins for --split bins")] = 10,
    model: Annotated[
        str, typer.Option("--model", help="group | micrograph | particle | defocus")
    ] = "group",
    cs: Annotated[
        bool, typer.Option("--cs", help="also write particles.cs (per-particle anisomag)")
    ] = False,
    apix: Annotated[float | None, typer.Option("--apix", help="output pixel size (A)")] = None,
    box: Annotated[int | None, typer.Option("--box", help="output box (px)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    allow_negative_cs: AllowNegativeCs = False,
    max_defocus: MaxDefocus = 20.0,
) -> None:
    """Apply a fitted magnification model: split optics groups, per-particle .cs, or resample."""
    from cryomag.workflows.apply import apply, check_apply_options

    with fail_cleanly(), input_limits(allow_negative_cs, max_defocus):
        check_apply_options(
            resample=resample,
            split=split,
            n_bins=bins,
            model=model,
            pixel_size_A=apix,
            box=box,
            cli=True,
        )
        written = apply(
            run,
            out,
            resample=resample,
            split=split,
            n_bins=bins,
            model=model,
            cs=cs,
            pixel_size_A=apix,
            box=box,
            progress=not quiet,
        )
        for kind, path in written.items():
            typer.echo(f"wrote {kind}: {path}")
