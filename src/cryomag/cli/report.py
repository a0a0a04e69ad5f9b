"""``cryomag report``: one self-contained HTML page of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cryomag.cli.common import fail_cleanly


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)


def report_cmd(
    run_dir: Annotated[
        Path, typer.Argument(help="run folder (cryomag estimate or reconstruct output)")
    ],
    before: Annotated[
        Path | None,
        typer.Option("--before", help="cryomag reconstruct folder without the correction"),
    ] = None,
    after: Annotated[
        Path | None,
        typer.Option("--after", help="cryomag reconstruct folder with the correction"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file (default DIR/report.html)")
    ] = None,
    title: Annotated[str | None, typer.Option("--title", help="page title")] = None,
) -> None:
    """Write DIR/report.html: inputs and command lines, per-group results with
    uncertainties, every plot of DIR/plots, and with --before/--after the FSC curves of
    both reconstructions on one plot and the resolution gain. The page is self-contained
    (images embedded), and DIR/report_fsc.png is written beside it.
    """
    from cryomag.report.html import build_report

    with fail_cleanly():
        res = build_report(run_dir, before=before, after=after, out=out, title=title)
        if res.gain_A is not None:
            typer.echo(
                f"resolution (FSC 0.143): {res.resolution_before_A:.2f} A before, "
                f"{res.resolution_after_A:.2f} A after: gain {res.gain_A:+.2f} A"
            )
        typer.echo(f"wrote {res.path} ({len(res.images)} images embedded)")
