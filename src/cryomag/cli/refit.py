"""``cryomag refit``: local magnification models from a run's statistics, no images read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import fail_cleanly


def register(app: typer.Typer) -> None:
    app.command("refit")(refit_cmd)


def refit_cmd(
    run: Annotated[Path, typer.Argument(help="output folder of cryomag estimate")],
    fit: Annotated[
        str, typer.Option("--fit", help="comma-separated: particle,micrograph,defocus")
    ] = "particle,micrograph,defocus",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="default RUN/refit")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots")] = False,
    defocus: Annotated[
        str | None,
        typer.Option(
            "--defocus",
            help="defocus level (default: the run's); another level needs a new pass and "
            "is refused",
        ),
    ] = None,
    astigmatism: Annotated[
        str | None, typer.Option("--astigmatism", help="astigmatism level (default: the run's)")
    ] = None,
) -> None:
    """Refit per-particle, per-micrograph and defocus-dependent magnification from RUN/stats.

    Writes OUT/particles.star (documented cmag* columns), OUT/results.json (kappa with its
    95 % interval and the test of kappa = 0, real scatter, model choice) and OUT/plots/.
    """
    from rich.console import Console

    from cryomag.workflows.local_fits import print_local_summary
    from cryomag.workflows.refit import refit

    with fail_cleanly():
        summary = refit(
            run, tuple(f.strip() for f in fit.split(",") if f.strip()), out,
            plots=not no_plots, defocus=defocus, astigmatism=astigmatism,
        )  # fmt: skip
        print_local_summary(summary, Console())
