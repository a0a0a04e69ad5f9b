"""RELION-style aberration plots: the observed per-pixel phase error (odd aberrations) and
error of the CTF's phase chi (even aberrations) beside the fitted ones, per optics group.

Observed: per frequency pixel, from the first pass with the aberrations' statistics (at the
input's optics; :data:`cryomag.fit.statistics.ABERRATION_MAPS`): the phase error
sum w s Im(conj(P) Y) / sum w s^2 |P|^2 and the chi error sum w s Re(conj(C' V) r) /
sum w s^2 |C' V|^2, binned on the full frequency plane (odd maps mirror with a sign, even
ones without). Fitted: the refined change of the parameters times their basis at M k
(:meth:`cryomag.fit.aberrations.AberrationTerms.basis`). RELION's CtfRefine shows the same
pairs (its ``aberr_delta_phase`` and ``beamtilt_delta_phase`` images).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from cryomag.report.render import FigureSpec, plt, render_figures

__all__ = ["aberration_figures", "aberration_images", "plot_aberrations"]


def aberration_images(maps: np.ndarray, band, terms, delta: np.ndarray, mag: np.ndarray,
                      lam_A: float, cs_mm: float, bins: int = 48,
                      beam_tilt_mrad=(0.0, 0.0)) -> dict:  # fmt: skip
    """Observed and fitted odd-phase and chi-error images (rad) on a full-plane grid.

    Returns
    -------
    dict
        ``odd_observed``, ``odd_fitted``, ``even_observed``, ``even_fitted`` (each (bins,
        bins), NaN where no pixel falls) and ``extent`` (1/A).
    """
    kx, ky = band.kx, band.ky
    nyq = 0.5 / band.pixel_size_A
    edges = np.linspace(-nyq, nyq, bins + 1)
    kxs, kys = np.concatenate([kx, -kx]), np.concatenate([ky, -ky])

    def binned(v):
        return np.histogram2d(kys, kxs, bins=[edges, edges], weights=v)[0]

    out = {"extent": (-nyq, nyq, -nyq, nyq)}
    ux = mag[0, 0] * kx + mag[0, 1] * ky
    uy = mag[1, 0] * kx + mag[1, 1] * ky
    even_b, odd_b = terms.parts(ux, uy, lam_A, cs_mm, beam_tilt_mrad)
    cnt = binned(np.ones_like(kxs))
    for kind, sign, rows, basis in (("odd", -1.0, (0, 1), odd_b), ("even", 1.0, (2, 3), even_b)):
        num, den = maps[rows[0]], maps[rows[1]]
        s_num = binned(np.concatenate([num, sign * num]))
        s_den = binned(np.concatenate([den, den]))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"{kind}_observed"] = np.where(s_den > 0, s_num / s_den, np.nan)
        fit = delta @ basis if len(delta) else np.zeros_like(kx)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"{kind}_fitted"] = np.where(
                cnt > 0, binned(np.concatenate([fit, sign * fit])) / cnt, np.nan
            )
    return out


def aberration_figures(res) -> list[FigureSpec]:
    """One figure per group with refined aberrations: observed and fitted phase error (odd)
    and chi error (even), rad (:mod:`cryomag.report.render`)."""
    return [
        FigureSpec(f"aberrations_group{gr.group:03d}.png", partial(_aberration_figure, res, gr))
        for gr in res.groups
        if gr.aberration_maps is not None and gr.aberration_terms is not None
    ]


def plot_aberrations(res, folder: Path) -> list[Path]:
    """Write :func:`aberration_figures` into ``folder``; returns the files written."""
    return render_figures(aberration_figures(res), Path(folder))


def _aberration_figure(res, gr):
    from cryomag.physics.ctf import electron_wavelength_A

    band = res.bands[gr.group]
    opt = gr.optics_in
    img = aberration_images(gr.aberration_maps, band, gr.aberration_terms, gr.aberration,
                            gr.mag, float(electron_wavelength_A(opt.voltage_kv)),
                            opt.cs_mm, beam_tilt_mrad=opt.beam_tilt_mrad)  # fmt: skip
    fig, axes = plt.subplots(2, 2, figsize=(9, 8), sharex=True, sharey=True)
    fig.suptitle(f"Optics group {gr.group}: aberrations (first pass vs fitted change)")
    for r, kind, title in ((0, "odd", "phase error (odd)"), (1, "even", "chi error (even)")):
        obs, fit = img[f"{kind}_observed"], img[f"{kind}_fitted"]
        lim = float(np.nanpercentile(np.abs(np.concatenate([obs.ravel(), fit.ravel()])),
                                     98)) if np.isfinite(obs).any() else 1.0  # fmt: skip
        lim = lim if lim > 0 else 1.0
        for c, (data, what) in enumerate(((obs, "observed"), (fit, "fitted"))):
            ax = axes[r, c]
            im = ax.imshow(data, origin="lower", extent=img["extent"], cmap="RdBu_r",
                           vmin=-lim, vmax=lim)  # fmt: skip
            ax.set_title(f"{title}: {what}", fontsize=10)
        axes[r, 0].set_ylabel("ky (1/A)")
        # one colour scale per row: observed and fitted compare directly
        fig.colorbar(im, ax=axes[r].tolist(), label="rad", shrink=0.8)
    for ax in axes[1]:
        ax.set_xlabel("kx (1/A)")
    return fig
