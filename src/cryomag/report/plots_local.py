"""Plots of the local magnification models (per particle, per micrograph, defocus)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cryomag.io.atomic import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_local(ps, summary: dict, folder: Path) -> list[Path]:
    """Magnification vs defocus with the fitted line and 95 % band, per-micrograph values and
    shrinkage diagnostics, one set per optics group; returns the PNG paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = ps.particles
    dz = ps.defocus_mean_A() / 1e4  # um
    gidx = ps.group_index()
    gnum = ps.group_numbers()
    paths = []
    for g, num in enumerate(gnum):
        info = summary.get(int(num))
        if info is None:
            continue
        sel = gidx == g
        # what this fit made (a refit's table may still carry an earlier run's columns)
        particle = "particle" in info and "cmagParticleMagRaw" in t.columns
        micrograph = "micrograph" in info and "cmagMicrographMagRaw" in t.columns
        if particle or "defocus" in info:
            fig, ax = plt.subplots(figsize=(6, 4))
            if particle:
                raw = t["cmagParticleMagRaw"].to_numpy(float)[sel]
                ax.plot(dz[sel], 100 * (raw - 1), ".", ms=2, alpha=0.3, label="particle (raw)")
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
            paths.append(_save(fig, folder / f"mag_vs_defocus_group{int(num):03d}.png"))
        if "micrograph" in info:
            vals = info["micrograph"]["values"]
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(np.arange(len(vals)), 100 * (np.array(list(vals.values())) - 1), ".-")
            ax.set_xlabel("micrograph (sorted by name)")
            ax.set_ylabel("magnification - 1 (%), shrunk")
            sc = info["micrograph"]["isotropic_scatter"]
            ax.set_title(
                f"Optics group {num}: per-micrograph magnification (real scatter {100 * sc:.3f} %)"
            )
            paths.append(_save(fig, folder / f"micrograph_mag_group{int(num):03d}.png"))
        if particle:
            raw = t["cmagParticleMagRaw"].to_numpy(float)[sel]
            shr = t["cmagParticleMag"].to_numpy(float)[sel]
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.plot(100 * (raw - 1), 100 * (shr - 1), ".", ms=2, alpha=0.4)
            ax.set_xlabel("raw particle magnification - 1 (%)")
            ax.set_ylabel("shrunk - 1 (%)")
            sc = info["particle"]["isotropic_scatter"]
            ax.set_title(f"Shrinkage, group {num}: real scatter {100 * sc:.3f} %")
            paths.append(_save(fig, folder / f"shrinkage_group{int(num):03d}.png"))
    return paths
