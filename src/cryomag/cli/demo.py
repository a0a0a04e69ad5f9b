"""``cryomag demo``: the whole pipeline on a built-in simulated data set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import fail_cleanly


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("cryomag-demo"),
    n_particles: Annotated[int, typer.Option("--n-particles", help="particles")] = 1500,
    box: Annotated[int, typer.Option("--box", help="box (px)")] = 96,
    seed: Annotated[int, typer.Option("--seed", help="random seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Simulate particles with known distortions, estimate them, print truth beside estimate.

    Writes into OUT (default ./cryomag-demo): simulated/ (stacks, STAR, map, truth) and
    estimate/ (the outputs of cryomag estimate). Refuses a non-empty OUT.
    """
    from cryomag.workflows.demo import run_demo

    if out.exists() and any(out.iterdir()):
        typer.secho(
            f"error: {out} exists and is not empty; choose another --out",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    from cryomag.io.outdir import output_folder

    with fail_cleanly(), output_folder(out, "demo"):
        typer.echo(f"cryomag demo: writing into {out.resolve()}")
        run_demo(out, n_particles, box, seed, progress=not quiet)
