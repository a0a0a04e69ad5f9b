"""File formats: RELION STAR, cryoSPARC .cs, MRC stacks and maps.

:func:`read_particles` and :func:`write_particles` pick the format from the file suffix
(``.star`` or ``.cs``). Every writer replaces its destination atomically and refuses to
overwrite a file it read. Errors are :class:`~cryomag.model.particles.ParticleDataError`
subclasses whose messages name the file, the row or column and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryomag.io.atomic import (
    ParticleFileError,
    ParticleFileNotFoundError,
    atomic_write,
    ensure_not_input,
)
from cryomag.io.cryosparc import load_cs_array, read_cs, write_cs
from cryomag.io.mrc import ImageSource, read_map, stack_shape, write_stack
from cryomag.io.star import read_star, read_star_blocks, write_star
from cryomag.model.particles import ParticleSet

__all__ = [
    "ImageSource",
    "ParticleFileError",
    "ParticleFileNotFoundError",
    "atomic_write",
    "ensure_not_input",
    "load_cs_array",
    "read_cs",
    "read_map",
    "read_particles",
    "read_star",
    "read_star_blocks",
    "stack_shape",
    "write_cs",
    "write_particles",
    "write_stack",
    "write_star",
]


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".star":
        return "star"
    if suffix == ".cs":
        return "cs"
    raise ParticleFileError(
        f"{path}: unknown particle file type {suffix or '(no suffix)'!r} (expected .star or .cs)"
    )


def read_particles(
    path: str | os.PathLike,
    angpix: float | None = None,
    passthrough: str | os.PathLike | None = None,
    *,
    allow_negative_cs: bool | None = None,
    max_defocus_um: float | None = None,
) -> ParticleSet:
    """Read particles from a RELION ``.star`` or cryoSPARC ``.cs`` file, validated.

    Parameters
    ----------
    path : path
        ``.star`` or ``.cs`` file.
    angpix : float, optional
        Pixel size in A for RELION 3.0 STAR files (see :func:`read_star`). Not used for .cs.
    passthrough : path, optional
        cryoSPARC passthrough file joined on uid (see :func:`read_cs`). Not used for STAR.
    allow_negative_cs : bool, optional
        Accept a negative spherical aberration (a Cs corrector); default: refused.
    max_defocus_um : float, optional
        Largest accepted |defocus| in um (default 20).

    Returns
    -------
    ParticleSet
        Every column an engine uses checked by :mod:`cryomag.model.validation`.
    """
    path = Path(path)
    kind = _kind(path)
    limits = {"allow_negative_cs": allow_negative_cs, "max_defocus_um": max_defocus_um}
    if kind == "star":
        if passthrough is not None:
            raise ParticleFileError(
                f"{path}: a passthrough file (--passthrough) applies to .cs input only"
            )
        return read_star(path, angpix=angpix, **limits)
    if angpix is not None:
        raise ParticleFileError(
            f"{path}: --angpix applies to RELION 3.0 STAR files only (.cs files carry "
            "blob/psize_A)"
        )
    return read_cs(path, passthrough=passthrough, **limits)


def write_particles(ps: ParticleSet, path: str | os.PathLike) -> None:
    """Write particles as ``.star`` (:func:`write_star`) or ``.cs`` (:func:`write_cs`)."""
    path = Path(path)
    if _kind(path) == "star":
        write_star(ps, path)
    else:
        write_cs(ps, path)
