"""Figures to files: one PNG each and one multi-page PDF of them, the two rendered at once.

A run's plots are given as :class:`FigureSpec` (a file name and a function that builds the
matplotlib figure), so that they can be drawn twice -- once into their PNG files, once as
the pages of the PDF -- without holding every figure open. matplotlib draws in Python
(about 0.1-0.5 s per figure and format on a laptop core), and the run's workers are idle
by then: where a process can be forked (Linux), a child process draws the PDF while this
one draws the PNGs (about 1 s less of a default 5,000-particle run's ~3 s of plots,
bench/RESULTS.md, issue 14). The child writes into a temporary file of the destination
folder that this process renames onto the PDF once the child has ended well; a child that
fails, is killed or takes longer than :data:`PDF_CHILD_TIMEOUT_S` is replaced by drawing the
PDF here, and an interruption here ends the child and removes its file. Either way the
files are the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import RendererAgg  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages, RendererPdf  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogFormatterSciNotation  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from cryomag._files import atomic_path  # noqa: E402
from cryomag.report import preload  # noqa: E402

__all__ = [
    "FIGURE_RC", "PDF_CHILD_TIMEOUT_S", "PNG_COMPRESS_LEVEL", "PNG_DPI", "FigureSpec",
    "PDF_RASTER_DPI", "RASTER_POINTS", "UnicodeLogFormatter", "particle_points",
    "render_figures", "tight_bbox", "unicode_log_ticks",
]

log = logging.getLogger(__name__)

#: Resolution of the PNG files (dots per inch).
PNG_DPI = 110
#: zlib level of the PNG files: the same pixels as the default 6, ~2 % larger files, and a
#: few tens of ms less per figure (PIL's encoder, bench/RESULTS.md, issue 14).
PNG_COMPRESS_LEVEL = 3
#: matplotlib settings the figures are built with. ``axes.titley`` 1.0 places each axes'
#: title at its top (plus the usual pad) instead of searching every tick label's box for
#: top-side labels to clear, ~10 % of a figure's drawing: no figure of a run has labels
#: above its axes (one that does sets its title's ``y`` itself); the PNG files of the runs'
#: figures are pixel for pixel those of matplotlib's automatic placement.
FIGURE_RC = {"axes.titley": 1.0}
#: A layer of one point per particle with at least this many points is drawn as an image
#: in the PDF (:func:`particle_points`; the PNG files are images anyway): a vector marker per
#: particle makes a PDF that grows with the data set and is slow to write and to view
#: (matplotlib writes each marker in Python, ~0.1 s per 5,000).
RASTER_POINTS = 1000
#: Resolution of the PDF's image layers (dots per inch; axes, text and lines stay vectors).
PDF_RASTER_DPI = 200
#: Seconds the PDF's child process may take (beyond them it is ended and the PDF drawn here).
PDF_CHILD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class FigureSpec:
    """One figure of a run: its PNG file name and the function that builds it.

    Attributes
    ----------
    name : str
        File name of the PNG (e.g. ``"convergence_group001.png"``).
    build : callable
        Returns a new :class:`matplotlib.figure.Figure` (called once per format, with
        :data:`FIGURE_RC` in effect).
    """

    name: str
    build: Callable[[], Figure]

    def figure(self) -> Figure:
        """The figure, built with :data:`FIGURE_RC` in effect."""
        with matplotlib.rc_context(FIGURE_RC):
            return self.build()


_SUPERSCRIPT = str.maketrans("-0123456789.", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076"
                              "\u2077\u2078\u2079\u00b7")
_MATH = re.compile(r"^\$\\mathdefault\{(.*)\}\$$")
_POWER = re.compile(r"\^\{([^}]*)\}")


class UnicodeLogFormatter(LogFormatterSciNotation):
    """matplotlib's log-axis labels (which ticks, and 10^-4, 2 x 10^-4) as plain text with
    Unicode superscripts, not mathtext: the same look without mathtext's parser (~0.25 s of
    a process's first figure with a log axis, bench/RESULTS.md, issue 14)."""

    def __call__(self, x, pos=None) -> str:
        label = super().__call__(x, pos)
        m = _MATH.match(label)
        if m is None:
            return label
        text = m.group(1).replace("\\times", "\u00d7")
        return _POWER.sub(lambda e: e.group(1).translate(_SUPERSCRIPT), text)


def unicode_log_ticks(axis) -> None:
    """Label a log-scaled ``axis`` (``ax.yaxis``) by :class:`UnicodeLogFormatter`, with the
    arguments matplotlib's log scale gives its own formatters."""
    base = axis.get_transform().base
    axis.set_major_formatter(UnicodeLogFormatter(base))
    axis.set_minor_formatter(UnicodeLogFormatter(base, labelOnlyBase=False))


def particle_points(ax, x, y, fmt: str = ".", **kwargs):
    """``ax.plot(x, y, fmt, **kwargs)`` of a layer of one point per particle: drawn as an
    image in the PDF when it has :data:`RASTER_POINTS` points or more (the same pixels in
    the PNG). Returns the Line2D."""
    (line,) = ax.plot(x, y, fmt, rasterized=bool(np.size(x) >= RASTER_POINTS), **kwargs)
    return line


@contextlib.contextmanager
def _at_dpi(fig: Figure, dpi: float):
    """``fig`` at ``dpi`` for the duration (as ``savefig`` sets it while saving)."""
    old = fig.dpi
    fig.dpi = dpi
    try:
        yield
    finally:
        fig.dpi = old


def _all_axes(axes) -> list:
    """``axes`` and their child axes (insets), at every depth."""
    out = []
    for ax in axes:
        out += [ax, *_all_axes(ax.child_axes)]
    return out


def tight_bbox(fig: Figure, fmt: str) -> Bbox | str:
    """The box (inches) that ``savefig(..., bbox_inches="tight")`` crops ``fig`` to in
    ``fmt`` ("png" at :data:`PNG_DPI`, "pdf"), measured without drawing the figure.

    matplotlib's "tight" draws the whole figure once with its output switched off, to lay it
    out, takes the artists' extents from that renderer, then draws the figure again into the
    file: about a fifth of a PNG's time and a third of a PDF page's here (bench/RESULTS.md,
    issue 14). The figures of a run are laid out when they are built (no layout engine, no
    axes locator), so their extents can be taken from the file format's renderer at once:
    the same box, saved as an explicit ``bbox_inches``, gives the same PNG pixels and the
    same PDF bytes (tests/report/test_render.py). A figure whose layout happens while it
    is drawn (a layout engine, subfigures, or an axes placed by a locator, as insets are)
    gets ``"tight"``.
    """
    if fig.get_layout_engine() is not None or fig.subfigs or any(
        ax.get_axes_locator() is not None for ax in _all_axes(fig.axes)
    ):
        return "tight"
    if fmt == "png":
        with _at_dpi(fig, PNG_DPI):
            width, height = fig.bbox.size  # px, as FigureCanvasAgg sizes its renderer
            box = fig.get_tightbbox(RendererAgg(width, height, PNG_DPI))
    elif fmt == "pdf":
        with _at_dpi(fig, 72):  # PDF points, as the PDF backend draws
            width, height = fig.get_size_inches()
            # the text's extents only: no file to draw into
            box = fig.get_tightbbox(RendererPdf(None, PDF_RASTER_DPI, height, width))
    else:
        raise ValueError(f"format {fmt!r}: expected 'png' or 'pdf'")
    return box.padded(matplotlib.rcParams["savefig.pad_inches"])


def _png(fig: Figure, path: Path) -> None:
    bbox = tight_bbox(fig, "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PNG_DPI, bbox_inches=bbox,
                    pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})


def _save_png(spec: FigureSpec, folder: Path) -> Path:
    path = folder / spec.name
    fig = spec.figure()
    try:
        _png(fig, path)
    finally:
        plt.close(fig)
    return path


def _write_pdf(figures: Sequence[FigureSpec], path: Path, png_folder: Path | None = None
               ) -> None:  # fmt: skip
    """Every figure as a page of the PDF ``path`` (written as it is, not atomically); with
    ``png_folder``, each figure also as its PNG file there (one build for both formats)."""
    with PdfPages(path) as pdf:
        for spec in figures:
            fig = spec.figure()
            try:
                if png_folder is not None:
                    _png(fig, png_folder / spec.name)
                pdf.savefig(fig, bbox_inches=tight_bbox(fig, "pdf"), dpi=PDF_RASTER_DPI)
            finally:
                plt.close(fig)


def _can_fork() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def _fork_pdf(figures: Sequence[FigureSpec], tmp: Path) -> int | None:
    """Start a child process that writes the PDF into ``tmp``; its pid, or None when it
    could not be started."""
    try:
        pid = os.fork()
    except OSError as exc:
        log.info("plots: no child process for the PDF (%s); drawn here", exc)
        return None
    if pid:
        return pid
    # the child: draw, and leave without running this process's exit handlers
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _write_pdf(figures, tmp)
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the exit status
        with contextlib.suppress(Exception):
            os.write(2, f"cryomag: the plots' PDF failed:\n{traceback.format_exc()}".encode())
    finally:
        os._exit(code)


def _end_child(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _wait_child(pid: int, timeout_s: float) -> str | None:
    """Wait for the child; None when it ended well, else why not (it is ended)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "its process was reaped elsewhere"
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code == 0:
                return None
            return f"exit status {code}" if code > 0 else f"signal {-code}"
        if time.monotonic() > deadline:
            _end_child(pid)
            return f"no result after {timeout_s:.0f} s"
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def render_figures(figures: Sequence[FigureSpec], folder: Path, pdf_name: str | None = None,
                   parallel: bool = True) -> list[Path]:  # fmt: skip
    """Write each figure as ``folder/name`` (PNG) and, with ``pdf_name``, all of them as the
    pages of ``folder/pdf_name``, in the order given.

    Parameters
    ----------
    figures : sequence of FigureSpec
    folder : Path
        Created if missing.
    pdf_name : str, optional
        File name of the multi-page PDF (no PDF when None or without figures).
    parallel : bool
        Draw the PDF in a child process while this one draws the PNGs (where processes can
        be forked and there is more than one figure).

    Returns
    -------
    list of Path
        The PNG files, in the order of ``figures``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = list(figures)
    if not pdf_name or not figures:
        return [_save_png(spec, folder) for spec in figures]
    if not (parallel and len(figures) > 1 and _can_fork()):
        with atomic_path(folder / pdf_name) as tmp:
            _write_pdf(figures, tmp, png_folder=folder)
        return [folder / spec.name for spec in figures]
    preload.wait()  # no import half-done in the child
    with atomic_path(folder / pdf_name) as tmp:
        pid = _fork_pdf(figures, tmp)
        try:
            paths = [_save_png(spec, folder) for spec in figures]
            why = "no child process" if pid is None else _wait_child(pid, PDF_CHILD_TIMEOUT_S)
        except BaseException:  # an error or an interruption here (also while waiting)
            if pid is not None:
                _end_child(pid)
            raise
        if why is not None:
            if pid is not None:
                log.warning("plots: the PDF's child process failed (%s); drawing it here", why)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            _write_pdf(figures, tmp)
    return paths
