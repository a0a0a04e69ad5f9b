"""Safe writing: atomic replacement of output files and the I/O error classes.

Every writer in :mod:`cryomag.io` writes to a temporary file in the destination folder and
renames it onto the destination only when writing succeeded, so that a crash or an error never
leaves a half-written STAR, .cs or MRC file behind, and never destroys an existing one. Writers
also refuse to replace a file they (or the particle set) read from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryomag._files import NoFileWritten, atomic_path
from cryomag.model.particles import ParticleDataError

__all__ = [
    "ParticleFileError",
    "ParticleFileNotFoundError",
    "atomic_write",
    "ensure_not_input",
    "read_json",
    "write_json",
]


class ParticleFileError(ParticleDataError):
    """A particle, optics or image file is missing, malformed or inconsistent.

    The message names the file, the row or column where possible, and what was expected.
    """


class ParticleFileNotFoundError(ParticleFileError, FileNotFoundError):
    """An input file does not exist (also catchable as :class:`FileNotFoundError`)."""


def ensure_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise if ``out`` is the same file as one of ``inputs``.

    Parameters
    ----------
    out : path
        The file about to be written.
    inputs : iterable of path or None
        Files that were read to produce the output (``None`` entries are ignored).

    Raises
    ------
    ParticleFileError
        When ``out`` resolves to (or is a hard link of) one of the inputs.
    """
    out_path = Path(out)
    out_resolved = out_path.resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp_path = Path(inp)
        same = inp_path.resolve() == out_resolved
        if not same and out_path.exists() and inp_path.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out_path, inp_path)
        if same:
            raise ParticleFileError(
                f"{out_path}: refusing to overwrite an input file ({inp_path}); "
                "write to a different path"
            )


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Context manager yielding a temporary path that replaces ``path`` on success.

    The temporary file lies in the destination folder (so the final :func:`os.replace` is an
    atomic rename on the same file system) and keeps the destination's suffix. If the body
    raises, the temporary file is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : path
        Final destination.
    inputs : iterable of path or None
        Files read to produce the output; writing onto any of them is refused (see
        :func:`ensure_not_input`).

    Yields
    ------
    Path
        Temporary file path to write to (it does not exist yet).

    Raises
    ------
    ParticleFileError
        If ``path`` is one of ``inputs``.
    FileNotFoundError
        If the destination folder does not exist.

    Examples
    --------
    >>> with atomic_write("out.star") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("data_\\n")
    """
    dest = Path(path)
    ensure_not_input(dest, inputs)
    try:
        with atomic_path(dest) as tmp:
            yield tmp
    except NoFileWritten as exc:
        raise ParticleFileError(str(exc)) from None


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_json(
    path: str | os.PathLike, obj, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars/arrays and paths allowed)."""
    import json

    with atomic_write(path, inputs) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=_json_default))
    return Path(path)


def read_json(path: str | os.PathLike, what: str = "a JSON file written by cryomag") -> dict:
    """Read a JSON object; a missing, unreadable or garbage file raises naming it.

    Parameters
    ----------
    path : path
        The file.
    what : str
        What it should be, for the message (e.g. "the results.json of cryomag estimate").

    Raises
    ------
    ParticleFileNotFoundError
        Missing file.
    ParticleFileError
        Unreadable, not JSON, or not a JSON object.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise ParticleFileNotFoundError(f"{path}: file not found (expected {what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ParticleFileError(f"{path}: not valid JSON ({err}); expected {what}") from err
    if not isinstance(data, dict):
        raise ParticleFileError(
            f"{path}: holds a JSON {type(data).__name__}, expected {what} (a JSON object)"
        )
    return data
