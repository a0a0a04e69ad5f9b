"""Shared pieces of the command modules."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

#: Exit status of a command whose fit failed its quality checks (outputs written, flagged).
EXIT_FIT_FAILED = 3

#: ``--allow-negative-cs`` of every command that reads particles.
AllowNegativeCs = Annotated[
    bool,
    typer.Option(
        "--allow-negative-cs",
        help="accept a negative spherical aberration (rlnSphericalAberration / ctf/cs_mm < 0), "
        "as a Cs corrector can leave; refused by default",
        rich_help_panel="Input validation",
    ),
]

#: ``--quiet`` of the commands with a progress bar.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]

#: ``--passthrough`` of the commands that read cryoSPARC particles.
Passthrough = Annotated[
    Path | None, typer.Option("--passthrough", help="cryoSPARC passthrough .cs")
]

#: ``--max-defocus`` of every command that reads particles.
MaxDefocus = Annotated[
    float,
    typer.Option(
        "--max-defocus",
        help="largest accepted |defocus| in um (rlnDefocusU/V); larger values are refused "
        "as corrupt",
        rich_help_panel="Input validation",
    ),
]


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


@contextlib.contextmanager
def input_limits(allow_negative_cs: bool, max_defocus_um: float) -> Iterator[None]:
    """The validation limits of the particle files read in the block (the two options)."""
    from cryomag.model.validation import validation_limits

    if not (math.isfinite(max_defocus_um) and max_defocus_um > 0):
        raise ValueError(f"--max-defocus {max_defocus_um!r}: expected a defocus in um > 0")
    with validation_limits(allow_negative_cs=allow_negative_cs, max_defocus_um=max_defocus_um):
        yield


def require(ok: bool, option: str, value, expected: str) -> None:
    """Raise ``ValueError("OPTION VALUE: expected ...")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{option} {value!r}: expected {expected}")


def positive(value: float | None) -> bool:
    """A finite number > 0 (None counts as given-by-default)."""
    return value is None or (math.isfinite(value) and value > 0)
