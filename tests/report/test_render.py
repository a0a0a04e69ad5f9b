"""Figures to PNG files and one PDF (cryomag.report.render): the PDF drawn by a child process
gives the same files as drawing everything here, and no failure of either process leaves a
half-written file, a missing PDF or a child process behind."""

from __future__ import annotations

import io
import logging
import os
import re
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cryomag._files import TEMP_GLOB
from cryomag.report import render
from cryomag.report.render import FigureSpec, plt, render_figures

pytestmark = pytest.mark.skipif(not render._can_fork(), reason="forks a process (Linux)")


def _line(seed: int):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(np.random.default_rng(seed).normal(size=20), ".-")
    ax.set_title(f"figure {seed}")
    return fig


def _only_in_child(parent: int, what: str, seed: int):
    """A figure that fails (``raise``), kills its process (``kill``) or hangs (``hang``) when
    built in another process than ``parent``."""
    if os.getpid() != parent:
        if what == "raise":
            raise RuntimeError("drawing failed in the child")
        if what == "kill":
            os.kill(os.getpid(), 9)
        if what == "hang":
            time.sleep(60)
    return _line(seed)


def _specs(build=_line, n: int = 3) -> list[FigureSpec]:
    return [FigureSpec(f"f{i}.png", partial(build, i)) for i in range(n)]


def pdf_pages(path) -> int:
    """The number of pages of the PDF file ``path`` (its page objects)."""
    data = Path(path).read_bytes()
    return data.count(b"/Type /Page\n") + data.count(b"/Type /Page ")


@pytest.fixture
def forked(monkeypatch):
    """The pids of the child processes forked during the test."""
    pids: list[int] = []
    real_fork = os.fork

    def fork():
        pid = real_fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    return pids


def _reaped(pids: list[int]) -> bool:
    """Whether every one of ``pids`` has ended and been waited for (no zombie, no orphan)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        return False
    return True


def test_the_pdf_drawn_by_a_child_gives_the_same_files(tmp_path, forked):
    a, b = tmp_path / "parallel", tmp_path / "serial"
    pa = render_figures(_specs(), a, "all.pdf")
    pb = render_figures(_specs(), b, "all.pdf", parallel=False)
    assert [p.name for p in pa] == [p.name for p in pb] == ["f0.png", "f1.png", "f2.png"]
    for x, y in zip(pa, pb, strict=True):  # the PNG files bit for bit
        assert x.read_bytes() == y.read_bytes()
    assert pdf_pages(a / "all.pdf") == pdf_pages(b / "all.pdf") == 3
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert len(forked) == 1 and _reaped(forked)  # the parallel run's child only
    assert not list(a.glob(TEMP_GLOB))
    # without a PDF: the PNG files only
    assert [p.name for p in render_figures(_specs(n=2), tmp_path / "png")] == ["f0.png", "f1.png"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["f0.png", "f1.png"]


@pytest.mark.parametrize("what", ["raise", "kill", "hang"])
def test_a_failed_child_leaves_the_pdf_to_this_process(tmp_path, monkeypatch, caplog, what,
                                                       forked):  # fmt: skip
    """A child that raises, is killed or takes too long: the PDF is drawn here, complete."""
    monkeypatch.setattr(render, "PDF_CHILD_TIMEOUT_S", 2.0)
    build = partial(_only_in_child, os.getpid(), what)
    with caplog.at_level(logging.WARNING, logger="cryomag.report.render"):
        t0 = time.monotonic()
        paths = render_figures(_specs(build), tmp_path, "all.pdf")
    assert time.monotonic() - t0 < 30
    assert [p.name for p in paths] == ["f0.png", "f1.png", "f2.png"]
    assert pdf_pages(tmp_path / "all.pdf") == 3
    assert "the PDF's child process failed" in caplog.text
    expect = {"raise": "exit status 1", "kill": "signal 9", "hang": "no result after 2 s"}[what]
    assert expect in caplog.text
    assert len(forked) == 1 and _reaped(forked)
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_a_failure_here_ends_the_child_and_leaves_no_pdf(tmp_path, forked):
    """A figure that fails in this process (not in the child): the error is raised, the
    child is ended and reaped, no PDF and no temporary file remain."""
    parent = os.getpid()

    def fails_here(seed):
        if os.getpid() == parent and seed == 1:
            raise ValueError("bad figure")
        return _line(seed)

    with pytest.raises(ValueError, match="bad figure"):
        render_figures(_specs(fails_here), tmp_path, "all.pdf")
    assert not (tmp_path / "all.pdf").exists()
    assert not list(tmp_path.glob(TEMP_GLOB))
    assert len(forked) == 1 and _reaped(forked)


def test_an_interruption_while_waiting_ends_the_child(tmp_path, monkeypatch, forked):
    """Ctrl-C (or SIGTERM, which the command line raises as one) while this process waits
    for the PDF's child: the child is ended and reaped, no PDF, no temporary file."""

    def interrupted(pid, timeout_s):
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "_wait_child", interrupted)
    with pytest.raises(KeyboardInterrupt):
        render_figures(_specs(partial(_only_in_child, os.getpid(), "hang")), tmp_path,
                       "all.pdf")  # fmt: skip
    assert len(forked) == 1 and _reaped(forked)
    assert not (tmp_path / "all.pdf").exists() and not list(tmp_path.glob(TEMP_GLOB))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0.png", "f1.png", "f2.png"]


def test_log_axis_labels_in_unicode_as_matplotlib_labels_them():
    """UnicodeLogFormatter labels the ticks matplotlib's log formatters label, with the same
    numbers (10^-4 -> 10⁻⁴, 2 x 10^-4 -> 2×10⁻⁴) as plain text: no mathtext to parse."""
    from matplotlib import mathtext

    from cryomag.report.render import unicode_log_ticks

    def labels(ax):
        ax.figure.canvas.draw()
        return ([t.get_text() for t in ax.get_yticklabels()]
                + [t.get_text() for t in ax.yaxis.get_minorticklabels()])  # fmt: skip

    def plain(label: str) -> str:  # matplotlib's mathtext label, as we write it
        m = re.fullmatch(r"\$\\mathdefault\{(.*)\}\$", label)
        if not m:
            return label
        sup = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
        text = m.group(1).replace("\\times", "×")
        return re.sub(r"\^\{([^}]*)\}", lambda e: e.group(1).translate(sup), text)

    for lo, hi in [(1e-6, 3e-2), (2e-4, 5e-4), (0.5, 40.0)]:
        fig, ax = plt.subplots()
        ax.semilogy([1, 2], [lo, hi])
        own = labels(ax)
        unicode_log_ticks(ax.yaxis)
        ours = labels(ax)
        plt.close(fig)
        assert ours == [plain(t) for t in own], (lo, hi)
        assert not any("$" in t for t in ours)
        assert any(ours)
    # a figure with such an axis draws without mathtext's parser
    fig, ax = plt.subplots()
    ax.semilogy([1, 2, 3], [1e-2, 3e-4, 1e-6])
    unicode_log_ticks(ax.yaxis)
    real = mathtext.MathTextParser.parse
    try:
        mathtext.MathTextParser.parse = None  # any use fails
        fig.savefig(io.BytesIO(), format="png")
    finally:
        mathtext.MathTextParser.parse = real
        plt.close(fig)


def _plain_pixels(fig):
    """The pixels of ``fig`` saved as a PNG with matplotlib's defaults (then closed)."""
    from matplotlib.image import imread

    plain = io.BytesIO()
    fig.savefig(plain, format="png", dpi=render.PNG_DPI, bbox_inches="tight")
    plt.close(fig)
    plain.seek(0)
    return imread(plain)


def _panels():
    """Two titled panels sharing y, a log axis with Unicode labels, a suptitle and labels: the
    parts whose placement matplotlib works out while drawing."""
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), sharey=True)
    rng = np.random.default_rng(3)
    for i, ax in enumerate(axes):
        ax.semilogy(np.arange(1, 9), 10.0 ** rng.uniform(-6, -2, 8), "o-")
        render.unicode_log_ticks(ax.yaxis)
        ax.set_title(f"panel {i}")
        ax.set_xlabel("iteration")
    axes[0].set_ylabel("step")
    fig.suptitle("two panels")
    return fig


def test_the_figure_settings_leave_the_pixels_as_matplotlib_draws_them(tmp_path):
    """FIGURE_RC (titles placed without searching the tick labels) and PNG_COMPRESS_LEVEL
    are for speed only: the PNG written by render_figures has the pixels of the same figure
    saved with matplotlib's defaults, and the settings do not outlive the drawing."""
    import matplotlib
    from matplotlib.image import imread

    assert matplotlib.rcParams["axes.titley"] is None
    (path,) = render_figures([FigureSpec("panels.png", _panels)], tmp_path)
    fig = _panels()
    ours, theirs = imread(path), _plain_pixels(fig)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    assert matplotlib.rcParams["axes.titley"] is None
    # the settings are in effect while a figure is built (its axes take them then)
    seen = []

    def build():
        seen.append(matplotlib.rcParams["axes.titley"])
        return _panels()

    plt.close(FigureSpec("x.png", build).figure())
    assert seen == [render.FIGURE_RC["axes.titley"]]


def _cloud(n: int, dense_as_points: bool = True):
    fig, ax = plt.subplots(figsize=(4, 3))
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(2, n))
    if dense_as_points:
        render.particle_points(ax, x, y, ms=2, alpha=0.5)
    else:
        ax.plot(x, y, ".", ms=2, alpha=0.5)
    ax.set_title(f"{n} particles")
    return fig


@pytest.mark.parametrize("n", [200, 5000])
def test_particle_layers_are_images_in_the_pdf_only(tmp_path, n):
    """A layer of RASTER_POINTS or more particles is an image in the PDF (axes and text stay
    vector), a smaller one vector markers; the PNG has the pixels of a plain ax.plot."""
    from matplotlib.image import imread

    (path,) = render_figures([FigureSpec("cloud.png", partial(_cloud, n))], tmp_path,
                             "cloud.pdf", parallel=False)  # fmt: skip
    fig = _cloud(n, dense_as_points=False)
    assert np.array_equal(imread(path), _plain_pixels(fig))
    pdf = (tmp_path / "cloud.pdf").read_bytes()
    assert (b"/Subtype /Image" in pdf) == (n >= render.RASTER_POINTS)
    assert b"/Font" in pdf  # the title and tick labels are text


def _maps():
    """2 x 2 shared image panels with a common colorbar and a suptitle (the displacement
    figure's layout)."""
    fig, axes = plt.subplots(2, 2, figsize=(6, 5), sharex=True, sharey=True)
    rng = np.random.default_rng(5)
    for i, ax in enumerate(axes.flat):
        im = ax.imshow(rng.normal(size=(20, 20)), origin="lower", cmap="RdBu_r",
                       extent=(-0.4, 0.4, -0.4, 0.4))  # fmt: skip
        ax.set_title(f"map {i} (1/A)")
    for ax in axes[1]:
        ax.set_xlabel("kx (1/A)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="displacement (1/A)")
    fig.suptitle("four maps, one colorbar")
    return fig


def _wide():
    """Three panels placed by hand (subplots_adjust), a legend, text beyond the axes and a
    histogram: the defocus and scale figures' parts."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    fig.subplots_adjust(wspace=0.35, left=0.06, right=0.98)
    rng = np.random.default_rng(6)
    axes[0].hist(rng.lognormal(size=500), bins=40)
    axes[1].plot(rng.normal(size=30), "o", label="micrographs")
    axes[1].legend(loc="upper right")
    render.particle_points(axes[2], *rng.normal(size=(2, 2000)), ms=1)
    axes[2].annotate("outside", (1.02, 0.5), xycoords="axes fraction")
    for ax in axes:
        ax.set_xlabel("defocus (um)")
    return fig


def _pdf_bytes(fig, bbox) -> bytes:
    out = io.BytesIO()
    with render.PdfPages(out) as pdf:
        pdf.savefig(fig, bbox_inches=bbox, dpi=render.PDF_RASTER_DPI)
    return out.getvalue()


@pytest.mark.parametrize("build", [_panels, _maps, _wide, partial(_cloud, 5000)])
def test_tight_box_without_drawing_gives_matplotlibs_files(build, monkeypatch):
    """tight_bbox measures the box that bbox_inches="tight" draws the figure once to find,
    without that draw: the PNG has matplotlib's tight pixels and the PDF its bytes."""
    from matplotlib.image import imread

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # the PDF's creation date
    fig = build()
    ours = io.BytesIO()
    fig.savefig(ours, format="png", dpi=render.PNG_DPI, bbox_inches=render.tight_bbox(fig, "png"))
    pdf_ours = _pdf_bytes(fig, render.tight_bbox(fig, "pdf"))
    plt.close(fig)
    fig = build()
    pdf_theirs = _pdf_bytes(fig, "tight")
    ours.seek(0)
    assert np.array_equal(imread(ours), _plain_pixels(fig))  # closes fig
    assert pdf_ours == pdf_theirs
    plt.close("all")


def test_tight_box_left_to_matplotlib_where_drawing_lays_out():
    """A figure with a layout engine, subfigures or an axes placed by a locator is laid out
    while drawing: its box is left to matplotlib ("tight")."""
    fig, ax = plt.subplots(layout="constrained")
    assert render.tight_bbox(fig, "png") == render.tight_bbox(fig, "pdf") == "tight"
    plt.close(fig)
    fig = plt.figure()
    for sub in fig.subfigures(1, 2):
        sub.subplots()
    assert render.tight_bbox(fig, "png") == render.tight_bbox(fig, "pdf") == "tight"
    plt.close(fig)
    fig, ax = plt.subplots()
    ax.inset_axes([0.6, 0.6, 0.3, 0.3])
    assert render.tight_bbox(fig, "png") == "tight"
    plt.close(fig)
    fig, ax = plt.subplots()
    assert isinstance(render.tight_bbox(fig, "pdf"), render.Bbox)
    with pytest.raises(ValueError, match="svg"):
        render.tight_bbox(fig, "svg")
    plt.close(fig)
