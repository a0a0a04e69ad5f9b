"""``cryomag calibrate``: the absolute pixel size of each optics group against an atomic model
(the engine is :mod:`cryomag.workflows.calibrate`)."""

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
    require,
)
from cryomag.cli.options import execution_options
from cryomag.execution.base import ExecutorConfig


def _centre(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = ()
    require(len(values) == 3, "--centre", text, "three numbers x,y,z in A")
    return values  # type: ignore[return-value]


@execution_options
def calibrate_cmd(
    particles: Annotated[
        Path, typer.Option("--particles", "-i", help="RELION .star or cryoSPARC .cs")
    ],
    model: Annotated[Path, typer.Option("--model", "-m", help="atomic model (.pdb or .cif)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    b_factor: Annotated[
        float,
        typer.Option("--b-factor", help="B-factor (A^2) added to every atom's own"),
    ] = 0.0,
    ref_resolution: Annotated[
        float | None,
        typer.Option(
            "--ref-resolution",
            help="the data's resolution (A): the fit's high-frequency limit (default 0.9 of "
            "the smaller Nyquist)",
        ),
    ] = None,
    centre: Annotated[
        str | None,
        typer.Option(
            "--centre",
            help="x,y,z (A): the model point at the particles' rotation centre (default: the "
            "centre voxel of the particles' box at the declared pixel size, a model in the "
            "frame of the map refined from them with origin 0)",
        ),
    ] = None,
    low_res: Annotated[float, typer.Option("--low-res", help="low-frequency cut (A)")] = 20.0,
    passthrough: Passthrough = None,
    quiet: Quiet = False,
    allow_negative_cs: AllowNegativeCs = False,
    max_defocus: MaxDefocus = 20.0,
    execution: ExecutorConfig | None = None,
) -> None:
    """Absolute pixel size of each optics group, with its standard error, from the particles
    and an atomic model of the specimen.

    The reference is the model's electron potential (gemmi, electron scattering factors,
    atoms' B-factors + --b-factor) on a grid whose voxel size is exact (the model is in A);
    each group's magnification M is fitted against it and the absolute pixel size is
    declared / sqrt(det M). Writes OUT/model_map.mrc, OUT/results.json, OUT/calibration.txt
    and OUT/cryomag.log. Exit status: 0 success; 1 bad input; 3 a fit failed its quality
    checks (its pixel size is not to be trusted); 130 interrupted.
    """
    from cryomag.cli.common import EXIT_FIT_FAILED, positive
    from cryomag.workflows.calibrate import calibrate, report_text

    with fail_cleanly():
        require(positive(ref_resolution), "--ref-resolution", ref_resolution, "a resolution "
                "in A > 0")  # fmt: skip
        for f in (particles, model, passthrough):
            if f is not None and not f.exists():
                raise FileNotFoundError(f"{f}: file not found")
        with input_limits(allow_negative_cs, max_defocus):
            res = calibrate(
                particles,
                model,
                out,
                b_factor=b_factor,
                ref_resolution_A=ref_resolution,
                centre_A=_centre(centre),
                executor=execution,
                progress=not quiet,
                passthrough=passthrough,
                low_res_A=low_res,
                nthreads=execution.worker_threads,
            )
        typer.echo(report_text(res.as_dict()))
        typer.echo(f"wrote {out}/results.json, calibration.txt, model_map.mrc")
        if any(g["verdict"] == "failed" for g in res.groups):
            raise typer.Exit(EXIT_FIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to the cryomag app."""
    app.command("calibrate")(calibrate_cmd)
