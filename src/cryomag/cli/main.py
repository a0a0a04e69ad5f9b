"""The ``cryomag`` command line: a thin layer over the Python API, one module per command."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cryomag",
    help="Estimate and correct per-particle contrast scale and magnification of cryo-EM particles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from cryomag.cli import (
        apply,
        demo,
        estimate,
        inspect_cmd,
        merge,
        reconstruct,
        refit,
        report,
        simulate,
    )

    for module in (
        apply,
        demo,
        estimate,
        inspect_cmd,
        merge,
        reconstruct,
        refit,
        report,
        simulate,
    ):
        module.register(app)


_register()

if __name__ == "__main__":  # pragma: no cover
    app()
