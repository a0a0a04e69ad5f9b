"""``cryomag refit``: local magnification models from a run's statistics, no images read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import AllowNegativeCs, MaxDefocus, fail_cleanly, input_limits


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
    allow_negative_cs: AllowNegativeCs = False,
    max_defocus: MaxDefocus = 20.0,
) -> None:
    """Refit per-particle, per-micrograph and defocus-dependent magnification from RUN/stats.

    Writes OUT/particles.star (documented cmag* columns), OUT/results.json (kappa with its
    95 % interval and the test of kappa = 0, real scatter, model choice) and OUT/plots/.
    """
    from cryomag.io.outdir import output_folder
    from cryomag.report.console import make_console
    from cryomag.workflows.local_fits import LOCAL_FITS, print_local_summary
    from cryomag.workflows.refit import refit

    with fail_cleanly(), input_limits(allow_negative_cs, max_defocus):
        fits = tuple(f.strip() for f in fit.split(",") if f.strip())
        bad = sorted(set(fits) - set(LOCAL_FITS))
        if bad or not fits:
            raise ValueError(f"--fit {fit!r}: choose from {', '.join(LOCAL_FITS)}")
        if not run.is_dir():
            raise FileNotFoundError(f"{run}: run folder not found (expected a cryomag estimate "
                                    "output folder)")  # fmt: skip
        target = out if out is not None else run / "refit"
        inputs = [run / "particles.star", run / "stats"]
        with output_folder(target, "refit", inputs=inputs):
            summary = refit(
                run, fits, target, plots=not no_plots, defocus=defocus, astigmatism=astigmatism
            )
        print_local_summary(summary, make_console())
