"""Atomic file replacement, shared by the I/O layer and the execution layer (no domain code).

A writer writes to a temporary file in the destination folder; the temporary file is renamed
onto the destination only when writing succeeded, so a crash or an error never leaves a
half-written file behind and never destroys an existing one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TEMP_GLOB", "NoFileWritten", "atomic_path"]

#: Names of the temporary files of :func:`atomic_path` (left behind only by a SIGKILL).
TEMP_GLOB = ".*.tmp-*"


class NoFileWritten(FileNotFoundError):
    """The body of :func:`atomic_path` finished without creating the temporary file."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder that replaces ``path`` on success.

    The temporary file keeps the destination's suffix (writers that choose the format by
    suffix still work). If the body raises or writes nothing, the temporary file is removed
    and ``path`` is left as it was.

    Raises
    ------
    FileNotFoundError
        If the destination folder does not exist.
    NoFileWritten
        If the body produced no file.
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"{dest}: output folder {folder} does not exist")
    tmp = folder / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{dest.suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise NoFileWritten(f"{dest}: the writer produced no file")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
