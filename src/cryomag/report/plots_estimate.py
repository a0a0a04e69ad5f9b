"""Plots of an estimation run: displacement field, scales, convergence (PNG + one PDF)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from cryomag.report.render import (
    FigureSpec,
    particle_points,
    plt,
    render_figures,
    unicode_log_ticks,
)

__all__ = ["displacement_images", "estimate_figures", "plot_estimate"]


def displacement_images(stats, band, delta: np.ndarray, bins: int = 32):
    """Observed and fitted per-pixel displacement (1/A) on a binned full-plane grid.

    Observed: per pixel d = A(k)^-1 b(k) from the accumulated Re(conj(h) h^T) and
    Re(conj(h) r); fitted: delta @ k. Returns (observed_x, observed_y, fitted_x, fitted_y,
    extent) with images of shape (bins, bins) in units of 1e-3 of |k|.
    """
    kx, ky = band.kx, band.ky
    a00, a01, a11 = stats.pix_a
    b0, b1 = stats.pix_b
    nyq = 0.5 / band.pixel_size_A
    edges = np.linspace(-nyq, nyq, bins + 1)
    # mirror the half plane (displacement of -k is -d)
    kxs = np.concatenate([kx, -kx])
    kys = np.concatenate([ky, -ky])

    def binned(v):
        return np.histogram2d(kys, kxs, bins=[edges, edges], weights=v)[0]

    sa00 = binned(np.concatenate([a00, a00]))
    sa01 = binned(np.concatenate([a01, a01]))
    sa11 = binned(np.concatenate([a11, a11]))
    sb0 = binned(np.concatenate([b0, -b0]))
    sb1 = binned(np.concatenate([b1, -b1]))
    det = sa00 * sa11 - sa01**2
    ok = det > 1e-12 * np.nanmax(np.abs(det)) if np.any(det) else det > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = np.where(ok, (sa11 * sb0 - sa01 * sb1) / det, np.nan)
        dy = np.where(ok, (sa00 * sb1 - sa01 * sb0) / det, np.nan)
    centres = 0.5 * (edges[1:] + edges[:-1])
    gy, gx = np.meshgrid(centres, centres, indexing="ij")
    fx = delta[0, 0] * gx + delta[0, 1] * gy
    fy = delta[1, 0] * gx + delta[1, 1] * gy
    cnt = binned(np.ones_like(kxs)) > 0
    fx = np.where(cnt, fx, np.nan)
    fy = np.where(cnt, fy, np.nan)
    return dx, dy, fx, fy, (-nyq, nyq, -nyq, nyq)


def _displacement_figure(gr, st, band):
    dx0, dy0, fx0, fy0, ext = displacement_images(st, band, gr.mag - gr.mag_in)
    fig, axes = plt.subplots(2, 2, figsize=(8, 7), sharex=True, sharey=True)
    lim = np.nanmax(np.abs([fx0, fy0])) if np.isfinite(fx0).any() else 1
    lim = lim if lim > 0 else np.nanmax(np.abs(dx0[np.isfinite(dx0)]), initial=1e-6)
    for ax, img, title in zip(
        axes.ravel(),
        [dx0, dy0, fx0, fy0],
        ["observed x", "observed y", "fitted x", "fitted y"],
        strict=True,
    ):
        im = ax.imshow(img, origin="lower", extent=ext, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{title} displacement (1/A)")
    for ax in axes[1]:
        ax.set_xlabel("kx (1/A)")
    for ax in axes[:, 0]:
        ax.set_ylabel("ky (1/A)")
    # one colour scale for the four panels (observed and fitted compare directly)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="displacement (1/A)")
    fig.suptitle(
        f"Optics group {gr.group}: displacement of the reference frequency, "
        "first pass (at the input M)"
    )
    return fig


def _convergence_figure(gr, tol: float):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = [h["max_step"] for h in gr.history]
    if steps:
        it = np.arange(1, len(steps) + 1)
        ax.semilogy(it, steps, "-", color="C0")
        kinds = [
            ("relinearised", "s", "re-linearised (no pass)"),
            ("subset", "^", "pass on the warm-start subset"),
            ("full", "o", "pass over all particles"),
        ]
        step_kinds = gr.step_kinds()
        for kind, marker, label in kinds:
            sel = [i for i, k in enumerate(step_kinds) if k == kind]
            if sel:
                ax.semilogy(it[sel], np.asarray(steps)[sel], marker, color="C0",
                            mfc="white" if kind == "relinearised" else "C0",
                            label=label)  # fmt: skip
    ax.axhline(tol, color="grey", ls="--", label="tolerance")
    if ax.get_yscale() == "log":
        unicode_log_ticks(ax.yaxis)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("Gauss-Newton iteration")
    ax.set_ylabel("max |update of M|")
    ax.set_title(f"Convergence, optics group {gr.group}")
    ax.legend()
    return fig


def _scale_histogram_figure(s, groups, numbers):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for num in numbers:
        sel = (groups == num) & np.isfinite(s)
        if sel.any():
            ax.hist(s[sel], bins=50, histtype="step", label=f"group {num}")
    ax.set_xlabel("per-particle contrast scale (1 = mean particle)")
    ax.set_ylabel("particles")
    ax.legend(fontsize=7)
    return fig


def _scale_vs_defocus_figure(s, dz_um, mics):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    particle_points(axes[0], dz_um, s, ms=2, alpha=0.5)
    axes[0].set_xlabel("mean defocus (um)")
    axes[0].set_ylabel("scale")
    names, inv = np.unique(mics, return_inverse=True)
    med = np.array([np.nanmedian(s[inv == i]) for i in range(len(names))])
    axes[1].plot(np.arange(len(names)), med, ".")
    axes[1].set_xlabel("micrograph index")
    axes[1].set_ylabel("median scale")
    fig.suptitle("Per-particle scale vs defocus and micrograph")
    return fig


def estimate_figures(result, bands) -> list[FigureSpec]:
    """The figures of an estimation (:mod:`cryomag.report.render`), in the PDF's order:
    per optics group the displacement field of its first pass and the convergence, then the
    per-particle scales' histogram and their trend with defocus and micrograph.

    ``bands``: each optics group's Band, by group number.
    """
    figures: list[FigureSpec] = []
    ps = result.particles
    for gr in result.groups:
        # the first pass was linearised at the input M: it shows the whole distortion
        # (only the first pass of a fit has the per-pixel sums: later ones have no pixels)
        st = result.first_stats.get(gr.group) or result.stats.get(gr.group)
        if st is not None and st.pix_a.size:
            figures.append(FigureSpec(f"displacement_group{gr.group:03d}.png",
                                      partial(_displacement_figure, gr, st, bands[gr.group])))
        figures.append(FigureSpec(f"convergence_group{gr.group:03d}.png",
                                  partial(_convergence_figure, gr, result.options.tol)))
    s = result.scales.normalised
    if np.isfinite(s).any():
        figures.append(FigureSpec("scale_histogram.png", partial(
            _scale_histogram_figure, s, ps.particle_group_numbers(), ps.group_numbers())))
        figures.append(FigureSpec("scale_vs_defocus_micrograph.png", partial(
            _scale_vs_defocus_figure, s, ps.defocus_mean_A() / 1e4, ps.micrographs())))
    return figures


def plot_estimate(result, bands, folder: Path) -> list[Path]:
    """Write every plot of an estimation into ``folder`` (PNG files and ``estimate.pdf``);
    returns the PNG paths.

    ``bands``: each optics group's Band, by group number.
    """
    return render_figures(estimate_figures(result, bands), Path(folder), "estimate.pdf")
