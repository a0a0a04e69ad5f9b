"""Plots of ``cryomag inspect``: the per-particle scale histogram and its relation to defocus.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch, no display needed) and written atomically with :func:`cryomag.io.atomic.atomic_write`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cryomag.io.atomic import atomic_write

_SCALE_LABEL = "per-particle scale (rlnCtfScalefactor)"


def _save(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG at ``path`` atomically and return the path."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def plot_scale_histogram(
    scale: np.ndarray,
    path: str | Path,
    *,
    fences: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    """Histogram of the per-particle scale, with its median and outlier fences.

    Parameters
    ----------
    scale : ndarray, shape (N,)
        Per-particle contrast scale (dimensionless, 1 = mean particle).
    path : str or Path
        PNG to write (atomically).
    fences : (float, float), optional
        Lower and upper outlier fences (1.5 IQR), drawn as dashed lines.
    title : str
        Figure title, e.g. the input file name.

    Returns
    -------
    Path
        ``path``.
    """
    s = np.asarray(scale, float)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    bins = min(100, max(10, int(np.sqrt(s.size))))
    ax.hist(s, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(np.median(s), color="k", lw=1.5, label=f"median {np.median(s):.3f}")
    if fences is not None:
        for k, f in enumerate(fences):
            ax.axvline(
                f, color="tab:red", ls="--", lw=1, label="1.5 IQR fences" if k == 0 else None
            )
    ax.set_xlabel(_SCALE_LABEL)
    ax.set_ylabel("particles")
    ax.set_title(title or f"{s.size} particles", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_scale_vs_defocus(
    scale: np.ndarray,
    defocus_um: np.ndarray,
    micrograph_index: np.ndarray | None,
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Scale against mean defocus, and per-micrograph median scale against micrograph index.

    Parameters
    ----------
    scale : ndarray, shape (N,)
        Per-particle contrast scale.
    defocus_um : ndarray, shape (N,)
        Mean defocus (DefocusU + DefocusV) / 2 in micrometres (positive = underfocus).
    micrograph_index : ndarray of int, shape (N,), optional
        0-based micrograph number of each particle (order of first appearance); ``None`` when
        the file names no micrographs (the right panel then says so).
    path : str or Path
        PNG to write (atomically).
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    s = np.asarray(scale, float)
    fig = Figure(figsize=(11.0, 4.0))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(np.asarray(defocus_um, float), s, s=4, alpha=0.5, lw=0)
    ax1.set_xlabel("mean defocus (um)")
    ax1.set_ylabel(_SCALE_LABEL)
    ax1.set_title("scale vs defocus", fontsize=9)
    if micrograph_index is None:
        ax2.text(0.5, 0.5, "no micrograph names in the file", ha="center", va="center")
        ax2.set_axis_off()
    else:
        idx = np.asarray(micrograph_index, int)
        n_mic = int(idx.max()) + 1
        order = np.argsort(idx, kind="stable")
        groups = np.split(s[order], np.flatnonzero(np.diff(idx[order])) + 1)
        present = np.unique(idx)
        q25, med, q75 = np.array([np.percentile(g, [25, 50, 75]) for g in groups]).T
        ax2.vlines(present, q25, q75, color="0.7", lw=1, label="25-75 %")
        ax2.plot(present, med, "o", ms=3, color="tab:blue", label="median")
        ax2.set_xlabel(f"micrograph index (0-{n_mic - 1}, order of first appearance)")
        ax2.set_ylabel("per-micrograph scale")
        ax2.set_title("per-micrograph median scale", fontsize=9)
        ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))
