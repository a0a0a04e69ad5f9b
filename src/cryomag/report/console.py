"""Terminal summaries of the commands' results, readable on a terminal and in a log.

On a terminal the commands print rich tables (colour, box drawing, fitted to the window).
In a log (stdout not a terminal: nohup, SLURM, a pipeline's job log), with ``cryomag
--plain`` or with the environment variable ``CRYOMAG_PLAIN=1``, output is *plain*: ASCII
tables as wide as their content (never squashed to 80 columns, never a truncated number),
no colour or markup, lines never wrapped, and progress as periodic lines
(:func:`cryomag.execution.local.progress_bar`). Every command makes its console and tables
with :func:`make_console` and :func:`make_table`.
"""

from __future__ import annotations

import sys

import numpy as np

from cryomag._plain import is_plain, set_plain

__all__ = [
    "is_plain",
    "make_console",
    "make_table",
    "print_estimate_summary",
    "set_plain",
]

#: Width of a plain console (characters): wide enough for any table, so none is squashed.
PLAIN_WIDTH = 1000

def make_console(stderr: bool = False):
    """A rich Console for stdout (or stderr): the terminal's, or a plain one for logs."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if not is_plain(stream):
        return Console(stderr=stderr)
    return Console(
        file=stream,
        width=PLAIN_WIDTH,
        no_color=True,
        color_system=None,
        highlight=False,
        emoji=False,
        soft_wrap=True,
        force_terminal=False,
        force_interactive=False,
    )


def make_table(*args, console=None, **kwargs):
    """A rich Table: box drawing on a terminal, ASCII and never truncated when plain."""
    from rich import box
    from rich.table import Table

    plain = console.no_color if console is not None else is_plain()
    if plain:
        kwargs.setdefault("box", box.ASCII)
        kwargs.setdefault("show_edge", True)
    return Table(*args, **kwargs)


def print_estimate_summary(res, console) -> None:
    """Print the per-group results (M, errors, polar form) and the scale distribution."""
    from cryomag.model.magnification import polar

    table = make_table(
        title="Magnification per optics group (RELION M: k_ref = M k_obs)", console=console
    )
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
    _print_aberrations(res, console)
    _print_particle_deviations(res, console)
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


def _print_aberrations(res, console) -> None:
    """The refined aberrations per group: input, refined +- SE, correlation with M's
    isotropic part."""
    rows = [gr for gr in res.groups if gr.aberration_terms is not None]
    if not rows:
        return
    table = make_table(title="Aberrations refined with M (RELION's units, at M k)",
                       console=console)  # fmt: skip
    for col in ("group", "parameter", "unit", "input", "refined", "+-", "corr. with iso. M"):
        table.add_column(col, justify="right")
    for gr in rows:
        terms = gr.aberration_terms
        start = terms.values(gr.optics_in)
        se = np.sqrt(np.clip(np.diag(gr.aberration_cov), 0, None))
        for i, (name, _, unit) in enumerate(terms.params):
            table.add_row(
                str(gr.group), name, unit, f"{start[i]:.5g}",
                f"{start[i] + gr.aberration[i]:.5g}", f"{se[i]:.2g}",
                f"{gr.aberration_mag_corr[i]:+.2f}",
            )  # fmt: skip
    console.print(table)


def _print_particle_deviations(res, console) -> None:
    """Per group with per-particle defocus: the spread of the particles' deviations from
    their micrograph (T's standard deviations +- SE) and, with more than one parameter,
    their correlation with the first (a height moves the astigmatism through an anisotropic
    magnification: correlated near 1, not independent scatter)."""
    from cryomag.fit.defocus import PARAMETER_LABELS as labels
    from cryomag.fit.defocus import follows_heights

    names = res.options.defocus_levels().names("particle")
    for gr in res.groups:
        sol = gr.defocus_solution
        if sol is None or not sol.particle.shape[1]:
            continue
        sd = sol.prior_spread
        parts = [f"{labels.get(n, n)} {v:.1f} +- {e:.1f} A"
                 for n, v, e in zip(names, sd, sol.prior_se, strict=False)]  # fmt: skip
        heights = names[0] == "defocus_A"
        line = (f"Particles' deviations from their micrograph (group {gr.group}"
                + ("; the heights in the ice" if heights else "") + "), spread: "
                + ", ".join(parts))  # fmt: skip
        if len(sd) > 1:
            corr = sol.prior_correlation[0, 1:]
            line += (f"; correlation with the {labels.get(names[0], names[0])} "
                     + " / ".join(f"{c:+.2f}" for c in corr))  # fmt: skip
            if follows_heights(names, sol.prior_correlation):
                line += (" (they move together: a height moves the astigmatism through the "
                         "anisotropic magnification, h M^T M)")  # fmt: skip
        console.print(line)


def _verdict_text(verdict: str) -> str:
    return {"ok": "[green]ok[/]", "warning": "[yellow]warning[/]"}.get(
        verdict, "[bold red]FAILED[/]"
    )
