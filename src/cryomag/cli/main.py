"""The ``cryomag`` command line: a thin layer over the Python API, one module per command."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading

import typer
from typer.core import TyperGroup


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``scancel``, a pipeline's abort): handled as Ctrl-C, so that the
    command stops its workers, releases its output folder and exits cleanly."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the
    main thread; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _RecordingGroup(TyperGroup):
    """The command group that records the exact command line before parsing it
    (:mod:`cryomag.runinfo`: every run folder stores it) and turns SIGTERM into a clean
    interruption while a command runs."""

    def parse_args(self, ctx, args):
        from cryomag.runinfo import set_command_line

        set_command_line(["cryomag", *args])
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with sigterm_as_interrupt():
            return super().invoke(ctx)


app = typer.Typer(
    name="cryomag",
    cls=_RecordingGroup,
    help="Estimate and correct per-particle contrast scale and magnification of cryo-EM particles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    plain: bool = typer.Option(
        False,
        "--plain",
        help="plain output for logs: full-width ASCII tables, no colour, progress as periodic "
        "lines (automatic when stdout is not a terminal, or with CRYOMAG_PLAIN=1)",
    ),
) -> None:
    """Estimate and correct per-particle contrast scale and magnification of cryo-EM particles."""
    from cryomag.report.console import set_plain

    set_plain(True if plain else None)


def _register() -> None:
    from cryomag.cli import (
        apply,
        calibrate,
        demo,
        estimate,
        inspect_cmd,
        merge,
        reconstruct,
        refit,
        relion_external,
        report,
        simulate,
    )

    for module in (
        apply,
        calibrate,
        demo,
        estimate,
        inspect_cmd,
        merge,
        reconstruct,
        refit,
        relion_external,
        report,
        simulate,
    ):
        module.register(app)


_register()


def main() -> None:
    """The ``cryomag`` console script: :data:`app`, then the process ends without the
    interpreter's teardown.

    A command's outputs are complete (each written atomically) when it returns; what the
    interpreter does after that -- a last garbage collection and the clearing of every
    module (numpy, scipy, pandas, matplotlib) -- frees memory the operating system takes
    back anyway, ~0.3 s of a 10 s estimation (bench/RESULTS.md, issue 14). So once the
    command has ended with an exit status, the exit handlers run (logging's flush,
    multiprocessing's, the libraries' own), standard output and error are flushed and the
    process exits with that status. Where that would skip work -- threads that are not
    daemons still running, or an exit with a message instead of a status -- the normal
    exit is taken; an exception other than SystemExit propagates as before.
    """
    try:
        app()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    run_exit = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate()
              if t is not threading.current_thread() and not t.daemon]  # fmt: skip
    if not isinstance(code, int) or others or run_exit is None:
        raise SystemExit(code)
    run_exit()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code & 0xFF)


if __name__ == "__main__":  # pragma: no cover
    main()
