"""Plots of the defocus refined with the magnification (:mod:`cryomag.fit.defocus`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cryomag.report.plots_estimate import _save  # noqa: E402

__all__ = ["plot_defocus"]


def plot_defocus(result, folder: Path) -> list[Path]:
    """Per optics group: the defocus change per micrograph, each particle's refined defocus
    against its micrograph's mean, and the magnification against the refined defocus.

    Returns the PNG paths written into ``folder``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ps = result.particles
    paths: list[Path] = []
    for gr in result.groups:
        if gr.defocus_solution is None or gr.rows is None or gr.failed:
            continue
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
        ax.plot(mic_mean[inv] / 1e4, (refined - mic_mean[inv]), ".", ms=2, alpha=0.5)
        ax.set_xlabel("micrograph mean defocus (um)")
        ax.set_ylabel("particle - micrograph mean (A)")
        spread = np.sqrt(np.diag(sol.prior)) if sol.particle.shape[1] else None
        title = "Particles' defocus within their micrograph"
        if spread is not None and len(spread):
            title += f" (spread {spread[0]:.0f} A)"
        ax.set_title(title, fontsize=9)
        ax = axes[2]
        if "cmagMicrographMagRaw" in ps.particles.columns:
            m = ps.column("cmagMicrographMagRaw")[rows]
            mm = np.bincount(inv, m, minlength=len(units)) / cnt
            ax.plot(mic_mean / 1e4, 100 * (mm - 1), "o", ms=3, label="micrographs")
            ax.set_ylabel("magnification - group (%)")
        elif "cmagParticleMagRaw" in ps.particles.columns:
            m = ps.column("cmagParticleMagRaw")[rows]
            ax.plot(refined / 1e4, 100 * (m - 1), ".", ms=2, alpha=0.4, label="particles")
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
        fig.tight_layout()
        paths.append(_save(fig, folder / f"defocus_group{gr.group:03d}.png", None))
    return paths
