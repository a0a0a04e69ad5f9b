"""Terminal summaries of the commands' results."""

from __future__ import annotations

import numpy as np

__all__ = ["print_estimate_summary"]


def print_estimate_summary(res, console) -> None:
    """Print the per-group results (M, errors, polar form) and the scale distribution."""
    from rich.table import Table

    from cryomag.model.magnification import polar

    table = Table(title="Magnification per optics group (RELION M: k_ref = M k_obs)")
    for col in (
        "group",
        "particles",
        "M00",
        "M01",
        "M10",
        "M11",
        "+- (max)",
        "major",
        "minor",
        "angle",
        "pixel size change",
        "iter",
        "verdict",
    ):
        table.add_column(col, justify="right")
    for gr in res.groups:
        p = polar(gr.mag)
        table.add_row(
            str(gr.group),
            str(gr.n_particles),
            *[f"{v:.5f}" for v in gr.mag.ravel()],
            f"{gr.mag_error.max():.1e}",
            f"{p.major_scale:.5f}",
            f"{p.minor_scale:.5f}",
            f"{p.angle_deg:.1f}",
            f"{100 * p.pixel_size_change:+.3f} %",
            str(gr.iterations),
            _verdict_text(gr.quality.verdict if gr.quality is not None else "ok"),
        )
    console.print(table)
    for problem in res.problems:
        style = "red" if res.verdict == "failed" else "yellow"
        console.print(f"[{style}]{problem}[/]")
    if res.verdict == "failed":
        console.print(
            "[bold red]A fit failed its quality checks: its M and scales were not applied to "
            "the particles and are not to be used (results.json: verdict, problems).[/]"
        )
    s = res.scales.normalised
    if np.isfinite(s).any():
        q = np.nanquantile(s, [0.05, 0.25, 0.5, 0.75, 0.95])
        console.print(
            "Per-particle contrast scale (1 = mean particle; a contrast weight, mostly ice "
            "thickness, not a size): 5/25/50/75/95 % = "
            + " / ".join(f"{v:.2f}" for v in q)
            + f", median standard error {np.nanmedian(res.scales.error):.3f}"
        )


def _verdict_text(verdict: str) -> str:
    return {"ok": "[green]ok[/]", "warning": "[yellow]warning[/]"}.get(
        verdict, "[bold red]FAILED[/]"
    )
