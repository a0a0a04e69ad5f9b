"""``cryomag merge``: one particle set from data sets of different pixel sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import (
    EXIT_FIT_FAILED,
    AllowNegativeCs,
    MaxDefocus,
    fail_cleanly,
    input_limits,
)
from cryomag.cli.options import execution_options
from cryomag.execution.base import ExecutorConfig


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_cmd)


@execution_options
def merge_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="STAR and/or .cs files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    ref: Annotated[Path | None, typer.Option("--ref", help="reference map (MRC)")] = None,
    no_estimate: Annotated[
        bool, typer.Option("--no-estimate", help="merge the tables only (no images needed)")
    ] = False,
    resample: Annotated[
        bool, typer.Option("--resample", help="write stacks at one pixel size and box")
    ] = False,
    apix: Annotated[
        float | None, typer.Option("--apix", help="target pixel size (A); default the finest")
    ] = None,
    box: Annotated[
        int | None, typer.Option("--box", help="target box; default the largest")
    ] = None,
    angpix: Annotated[float | None, typer.Option("--angpix", help="for RELION 3.0 inputs")] = None,
    fsc: Annotated[
        bool,
        typer.Option(
            "--fsc/--no-fsc",
            help="also reconstruct before (M = I) and after (estimated M) and compare their "
            "half-map FSC (takes two reconstructions)",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    allow_negative_cs: AllowNegativeCs = False,
    max_defocus: MaxDefocus = 20.0,
    execution: ExecutorConfig | None = None,
) -> None:
    """Merge particle sets recorded at different pixel sizes and find their relative scale.

    Writes OUT/particles.star (per-group rlnMagMat), OUT/particles.cs (common blob/psize_A,
    anisomag carrying each group's difference), OUT/merge.json (true relative pixel sizes with
    standard errors, the best-calibrated anchor, duplicates, warnings), OUT/pixel_sizes.png and
    OUT/estimate/ (the estimate run); with --resample also OUT/Particles/*.mrcs. With --fsc
    the particles are reconstructed on the reference's grid with every group at its declared
    pixel size and with the estimated matrices: OUT/plots/merge_fsc.png and, in merge.json,
    both half-map FSC curves with their resolutions at 0.143 and 0.5.
    """
    from cryomag.report.console import make_console, make_table
    from cryomag.workflows.merge import merge

    with fail_cleanly(), input_limits(allow_negative_cs, max_defocus):
        rep = merge(
            inputs,
            out,
            ref,
            estimate=not no_estimate,
            resample=resample,
            pixel_size_A=apix,
            box=box,
            angpix=angpix,
            progress=not quiet,
            fsc=fsc,
            executor=execution,
            # the driver's threads (the reconstructions of --fsc; a cluster's workers set
            # their own)
            nthreads=execution.worker_threads if execution.synchronous else 0,
        )
        console = make_console()
        console.print(f"merged {rep['n_particles']} particles from {len(inputs)} files into {out}")
        if rep["duplicates"]["count"]:
            console.print(
                f"[yellow]{rep['duplicates']['count']} duplicate particles[/] (rows "
                f"{rep['duplicates']['rows'][:5]} ...)"
            )
        if "pixel_sizes" in rep:
            t = make_table(
                title="True pixel size per optics group (relative to the reference)",
                console=console,
            )
            for c in ("group", "name", "declared A", "true A", "+-", "vs anchor"):
                t.add_column(c, justify="right")
            for r in rep["pixel_sizes"]:
                t.add_row(
                    str(r["optics_group"]),
                    r["name"] + (" (anchor)" if r["is_anchor"] else ""),
                    f"{r['declared_pixel_size_A']:.4f}",
                    f"{r['true_pixel_size_A']:.5f}",
                    f"{r['true_pixel_size_se_A']:.5f}",
                    f"{r['relative_to_anchor']:.5f}",
                )
            console.print(t)
            console.print(rep["absolute_scale"])
            for problem in rep.get("problems", []):
                console.print(f"[red]{problem}[/]")
        f = rep.get("fsc", {})
        if "skipped" in f:
            console.print(f"[yellow]{f['skipped']}[/]")
        elif f:
            b, a = f["before"], f["after"]
            console.print(
                f"half-map FSC = 0.143: {b['resolution_0.143_A']:.2f} A with every group at "
                f"its declared pixel size, {a['resolution_0.143_A']:.2f} A with the estimated "
                f"M (0.5: {b['resolution_0.5_A']:.2f} -> {a['resolution_0.5_A']:.2f} A); "
                f"{Path(out) / f['plot']}"
            )
        if rep.get("verdict") == "failed":
            console.print(
                "[bold red]A fit failed its quality checks: its M was not applied "
                "(merge.json: verdict, problems).[/]"
            )
            raise typer.Exit(EXIT_FIT_FAILED)
