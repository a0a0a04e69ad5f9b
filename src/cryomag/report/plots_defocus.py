"""Plots of the defocus refined with the magnification (:mod:`cryomag.fit.defocus`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from cryomag.report.render import FigureSpec, particle_points, plt, render_figures

__all__ = ["defocus_figures", "plot_defocus"]


def defocus_figures(result) -> list[FigureSpec]:
    """Per optics group with a refined defocus: the defocus change per micrograph, each
    particle's refined defocus against its micrograph's mean, and the magnification against
    the refined defocus (:mod:`cryomag.report.render`)."""
    return [
        FigureSpec(f"defocus_group{gr.group:03d}.png", partial(_defocus_figure, result, gr))
        for gr in result.groups
        if gr.defocus_solution is not None and gr.rows is not None and not gr.failed
    ]


def plot_defocus(result, folder: Path) -> list[Path]:
    """Write :func:`defocus_figures` into ``folder``; returns the PNG paths."""
    return render_figures(defocus_figures(result), Path(folder))


def _defocus_figure(result, gr):
    ps = result.particles
    rows = gr.rows
    mics = ps.micrographs()[rows]
    units, inv = np.unique(mics, return_inverse=True)
    cnt = np.maximum(np.bincount(inv, minlength=len(units)), 1)
    change = ps.column("cmagDefocusChange")[rows]
    # the written mean defocus in the input's CTF frame (before re-expression for M)
    refined = 0.5 * (ps.column("cmagDefocusUInput") + ps.column("cmagDefocusVInput"))[rows]
    refined = refined + change
    mic_change = np.bincount(inv, change, minlength=len(units)) / cnt
    mic_mean = np.bincount(inv, refined, minlength=len(units)) / cnt
    sol = gr.defocus_solution
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    order = np.argsort(mic_mean)
    err = None
    if sol.micrograph.shape[1] and result.options.defocus in ("micrograph", "particle"):
        err = np.sqrt(sol.micrograph_cov[:, 0, 0])[order]
    ax.errorbar(np.arange(len(units)), mic_change[order], yerr=err, fmt=".", ms=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("micrograph (sorted by defocus)")
    ax.set_ylabel("mean defocus change (A)")
    ax.set_title("Refined - input, per micrograph")
    ax = axes[1]
    particle_points(ax, mic_mean[inv] / 1e4, (refined - mic_mean[inv]), ms=2, alpha=0.5)
    ax.set_xlabel("micrograph mean defocus (um)")
    ax.set_ylabel("particle - micrograph mean (A)")
    spread = sol.prior_spread if sol.particle.shape[1] else None
    title = "Particles' defocus within their micrograph"
    if spread is not None and len(spread):
        # the prior's spread is of the refined changes (the input's own heights are kept)
        title += f" (their changes' spread {spread[0]:.0f} A)"
    ax.set_title(title, fontsize=9)
    ax = axes[2]
    if "cmagMicrographMagRaw" in ps.particles.columns:
        m = ps.column("cmagMicrographMagRaw")[rows]
        mm = np.bincount(inv, m, minlength=len(units)) / cnt
        ax.plot(mic_mean / 1e4, 100 * (mm - 1), "o", ms=3, label="micrographs")
        ax.set_ylabel("magnification - group (%)")
    elif "cmagParticleMagRaw" in ps.particles.columns:
        m = ps.column("cmagParticleMagRaw")[rows]
        particle_points(ax, refined / 1e4, 100 * (m - 1), ms=2, alpha=0.4, label="particles")
        ax.set_ylabel("magnification - group (%)")
    if "cmagDefocusMag" in ps.particles.columns:
        dm = ps.column("cmagDefocusMag")[rows]
        o = np.argsort(refined)
        ax.plot(refined[o] / 1e4, 100 * (dm[o] - 1), "-", color="C3", label="defocus model")
        ax.set_ylabel("magnification - group (%)")
    ax.set_xlabel("refined defocus (um)")
    ax.set_title("Magnification vs refined defocus")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(f"Optics group {gr.group}: defocus refined jointly with M")
    # fixed spacing (room for each panel's y label), not tight_layout: that draws the
    # figure once more per format (0.13 s), and the files are cropped to their content
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14, top=0.84, wspace=0.3)
    return fig
