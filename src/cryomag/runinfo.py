"""What produced a run folder: the exact command line, the cryomag version, where it ran.

The command line is recorded by the command-line entry points (:mod:`cryomag.cli.main`,
:mod:`cryomag.cli.relion_external`) as they parse their arguments; a run started from Python
records the interpreter's ``sys.argv`` instead, marked as a Python API call. Every output
folder stores :func:`run_record` in its manifest (:mod:`cryomag.io.outdir`); the run log
(``cryomag.log``) and estimate's results.json repeat the command line and version, and the
HTML report shows them.
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Sequence

__all__ = ["command_line", "recorded_command_line", "run_record", "set_command_line", "version"]

_COMMAND: list[str] | None = None


def set_command_line(argv: Sequence[str]) -> None:
    """Record the command line of this process (program name first, e.g. ``["cryomag",
    "estimate", ...]``)."""
    global _COMMAND
    _COMMAND = [str(a) for a in argv]


def recorded_command_line() -> list[str] | None:
    """The recorded command line as a list of arguments (None from Python)."""
    return None if _COMMAND is None else list(_COMMAND)


def command_line() -> str:
    """The command line that started this run, shell-quoted so that it can be pasted back.

    Returns the recorded command line, or, for a run started from Python,
    ``"(Python API) " + sys.argv`` (the script that called cryomag).
    """
    if _COMMAND is not None:
        return shlex.join(_COMMAND)
    argv = [os.path.basename(sys.executable) or "python", *sys.argv]
    return "(Python API) " + shlex.join(argv)


def version() -> str:
    """The installed cryomag version."""
    from cryomag import __version__

    return __version__


def run_record() -> dict:
    """JSON-ready: command line, cryomag and Python versions, host, user, working folder, pid
    and start time of this process's run."""
    try:
        user = os.getlogin()
    except OSError:
        user = os.environ.get("USER", "")
    return {
        "command_line": command_line(),
        "cryomag_version": version(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "user": user,
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
