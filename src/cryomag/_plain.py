"""Whether output is plain (for logs) or rich (a terminal): one switch, shared by the
execution layer's progress display and the report's tables (no domain code; see
:mod:`cryomag.report.console` for what plain output looks like)."""

from __future__ import annotations

import os
import sys

__all__ = ["is_plain", "set_plain"]

_FORCED: bool | None = None


def set_plain(value: bool | None) -> None:
    """Force plain output (True), rich output (False) or decide automatically (None)."""
    global _FORCED
    _FORCED = value


def is_plain(stream=None) -> bool:
    """Whether output to ``stream`` (default stdout) is plain: forced by :func:`set_plain`
    (``cryomag --plain``), ``CRYOMAG_PLAIN=1``, or ``stream`` is not a terminal."""
    if _FORCED is not None:
        return _FORCED
    if os.environ.get("CRYOMAG_PLAIN", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    stream = sys.stdout if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True
