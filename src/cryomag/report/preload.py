"""Import the plotting modules in a background thread while a run computes.

matplotlib takes ~0.6 s to import on a laptop core, a run's plots come at its end, and the
driver mostly waits for its workers until then: :func:`start` imports the plot modules
meanwhile, :func:`wait` (called before a process is forked to draw, so that no import is
half-done in it) waits until that has finished. An import that fails here is left to the
caller's own import, which then raises it.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

__all__ = ["MODULES", "start", "wait"]

#: The modules the plots of an estimation import (matplotlib with them).
MODULES = (
    "cryomag.report.render",
    "cryomag.report.plots_estimate",
    "cryomag.report.plots_local",
    "cryomag.report.plots_defocus",
    "cryomag.report.plots_aberrations",
    "matplotlib.backends.backend_agg",
)

_thread: threading.Thread | None = None


def _import_all() -> None:
    for name in MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def start() -> None:
    """Begin importing :data:`MODULES` in a daemon thread (once per process)."""
    global _thread
    if _thread is None:
        _thread = threading.Thread(target=_import_all, name="cryomag-plot-imports", daemon=True)
        _thread.start()


def wait() -> None:
    """Return once the imports :func:`start` began have finished (at once without them)."""
    if _thread is not None:
        _thread.join()
