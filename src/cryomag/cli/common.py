"""Shared pieces of the command modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

#: Exit status of a command whose fit failed its quality checks (outputs written, flagged).
EXIT_FIT_FAILED = 3


@contextlib.contextmanager
def fail_cleanly() -> Iterator[None]:
    """Turn expected errors (bad input files, bad values) into one clear line and exit 1."""
    from cryomag.model.particles import ParticleDataError

    try:
        yield
    except (ParticleDataError, FileNotFoundError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        raise typer.Exit(130) from None
