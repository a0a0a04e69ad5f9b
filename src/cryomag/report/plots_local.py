"""Plots of the local magnification models (per particle, per micrograph, defocus)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from cryomag.report.render import FigureSpec, particle_points, plt, render_figures

__all__ = ["local_figures", "plot_local"]


def local_figures(ps, summary: dict) -> list[FigureSpec]:
    """Per optics group with local models: magnification vs defocus with the fitted line and
    95 % band, the per-micrograph values and the shrinkage diagnostics
    (:mod:`cryomag.report.render`)."""
    t = ps.particles
    figures = []
    for g, num in enumerate(ps.group_numbers()):
        info = summary.get(int(num))
        if info is None:
            continue
        # what this fit made (a refit's table may still carry an earlier run's columns)
        particle = "particle" in info and "cmagParticleMagRaw" in t.columns
        micrograph = "micrograph" in info and "cmagMicrographMagRaw" in t.columns
        if particle or "defocus" in info:
            figures.append(FigureSpec(f"mag_vs_defocus_group{int(num):03d}.png", partial(
                _mag_vs_defocus_figure, ps, g, num, info, particle, micrograph)))
        if "micrograph" in info:
            figures.append(FigureSpec(f"micrograph_mag_group{int(num):03d}.png",
                                      partial(_micrograph_figure, num, info)))
        if particle:
            figures.append(FigureSpec(f"shrinkage_group{int(num):03d}.png",
                                      partial(_shrinkage_figure, ps, g, num, info)))
    return figures


def plot_local(ps, summary: dict, folder: Path) -> list[Path]:
    """Write :func:`local_figures` into ``folder``; returns the PNG paths."""
    return render_figures(local_figures(ps, summary), Path(folder))


def _mag_vs_defocus_figure(ps, g, num, info, particle: bool, micrograph: bool):
    t = ps.particles
    dz = ps.defocus_mean_A() / 1e4  # um
    sel = ps.group_index() == g
    fig, ax = plt.subplots(figsize=(6, 4))
    if particle:
        raw = t["cmagParticleMagRaw"].to_numpy(float)[sel]
        particle_points(ax, dz[sel], 100 * (raw - 1), ms=2, alpha=0.3, label="particle (raw)")
    if micrograph:
        mic = t["cmagMicrographMagRaw"].to_numpy(float)[sel]
        names = ps.micrographs()[sel]
        _, first = np.unique(names, return_index=True)
        ax.plot(dz[sel][first], 100 * (mic[first] - 1), "o", ms=4, label="micrograph")
    if "defocus" in info:
        d = info["defocus"]
        x = np.linspace(dz[sel].min(), dz[sel].max(), 50)
        k, se = d["kappa_percent_per_um"], d["kappa_se_percent_per_um"]
        x0 = d["dz_ref_A"] / 1e4
        y0 = 100 * (d["magnification_at_dz_ref"] - 1)
        ax.plot(x, y0 + k * (x - x0), "k-", label=f"fit: kappa = {k:.3f} +- {se:.3f} %/um")
        ax.fill_between(
            x,
            y0 + (k - 1.96 * se) * (x - x0),
            y0 + (k + 1.96 * se) * (x - x0),
            color="k",
            alpha=0.15,
            label="95 % band (slope)",
        )
    ax.set_xlabel("defocus (um)")
    ax.set_ylabel("magnification - 1 (%), relative to the group")
    ax.set_title(f"Optics group {num}: magnification vs defocus")
    ax.legend(fontsize=7)
    return fig


def _micrograph_figure(num, info):
    vals = info["micrograph"]["values"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(len(vals)), 100 * (np.array(list(vals.values())) - 1), ".-")
    ax.set_xlabel("micrograph (sorted by name)")
    ax.set_ylabel("magnification - 1 (%), shrunk")
    sc = info["micrograph"]["isotropic_scatter"]
    ax.set_title(
        f"Optics group {num}: per-micrograph magnification (real scatter {100 * sc:.3f} %)"
    )
    return fig


def _shrinkage_figure(ps, g, num, info):
    t = ps.particles
    sel = ps.group_index() == g
    raw = t["cmagParticleMagRaw"].to_numpy(float)[sel]
    shr = t["cmagParticleMag"].to_numpy(float)[sel]
    fig, ax = plt.subplots(figsize=(5, 4))
    particle_points(ax, 100 * (raw - 1), 100 * (shr - 1), ms=2, alpha=0.4)
    ax.set_xlabel("raw particle magnification - 1 (%)")
    ax.set_ylabel("shrunk - 1 (%)")
    sc = info["particle"]["isotropic_scatter"]
    ax.set_title(f"Shrinkage, group {num}: real scatter {100 * sc:.3f} %")
    return fig
