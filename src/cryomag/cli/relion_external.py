"""RELION External job mode: ``cryomag relion-external`` (also ``cryomag_relion_external``).

RELION 4/5's External job runs (src/pipeline_jobs.cpp, ``getCommandsExternalJob``), from the
project folder::

    EXECUTABLE --o External/jobNNN/ [--in_movies F] [--in_mics F] [--in_parts F]
               [--in_coords F] [--in_3dref F] [--in_mask F] [--LABEL VALUE]... --j N [OTHER]

This module turns that call into one ``cryomag estimate`` run, parsed by the estimate command
itself (no option is parsed twice): ``--in_parts`` -> ``--particles``, ``--in_3dref`` ->
``--ref``, ``--in_mask`` -> ``--mask``, ``--j`` -> ``--j``, ``--o`` -> ``--out`` and each
``--LABEL VALUE`` through :data:`LABELS`. Image names in the written particles.star are
relative to the project folder (``--image-paths cwd``), as RELION reads them.

In ``--o`` it writes, besides estimate's outputs:

- ``RELION_OUTPUT_NODES.star``: ``data_output_nodes`` with ``_rlnPipeLineNodeName`` and
  ``_rlnPipeLineNodeTypeLabel`` (RELION 5 labels): the particles
  (``ParticleGroupMetadata.star.relion``) and the plots' PDF (``LogFile.pdf.relion``);
- ``RELION_JOB_EXIT_SUCCESS``, or ``RELION_JOB_EXIT_FAILURE`` (bad input, an error, or a fit
  that failed its quality checks: estimate's exit status 3), or ``RELION_JOB_EXIT_ABORTED``
  when the GUI's Abort created ``RELION_JOB_ABORT_NOW`` (polled every
  :data:`ABORT_POLL_S` seconds; the run stops as after Ctrl-C, between chunks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import typer

__all__ = [
    "ABORTED",
    "ABORT_NOW",
    "FAILURE",
    "LABELS",
    "NODES_FILE",
    "SUCCESS",
    "ExternalArgs",
    "main",
    "parse_external_args",
    "run_external",
    "write_output_nodes",
]

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
NODES_FILE = "RELION_OUTPUT_NODES.star"
#: Seconds between looks for RELION_JOB_ABORT_NOW.
ABORT_POLL_S = 0.5

#: RELION 5 node type labels (src/pipeline_jobs.h: LABEL_PARTS_CPIPE, LABEL_LOGFILE_CPIPE).
PARTICLES_LABEL = "ParticleGroupMetadata.star.relion"
LOGFILE_LABEL = "LogFile.pdf.relion"

#: External job parameter label -> (estimate option, kind). ``value``: passed on as
#: ``OPTION VALUE``; ``pair``: two file names (space- or comma-separated) -> ``OPTION A B``;
#: ``flag``: yes/no (``true/false``, ``1/0``, empty = yes) -> the option or nothing;
#: ``switch``: yes/no -> the first or the second of two options. Labels may use ``-`` or
#: ``_``.
LABELS: dict[str, tuple[str | tuple[str, str], str]] = {
    "fit": ("--fit", "value"),
    "defocus": ("--defocus", "value"),
    "astigmatism": ("--astigmatism", "value"),
    "defocus_tol": ("--defocus-tol", "value"),
    "defocus_frame": ("--defocus-frame", "value"),
    "low_res": ("--low-res", "value"),
    "high_res": ("--high-res", "value"),
    "max_iter": ("--max-iter", "value"),
    "tol": ("--tol", "value"),
    "chunk_size": ("--chunk-size", "value"),
    "window_pad": ("--window-pad", "value"),
    "warm_start": ("--warm-start", "value"),
    "angpix": ("--angpix", "value"),
    "threads": ("--threads", "value"),
    "max_defocus": ("--max-defocus", "value"),
    "halfmaps": ("--half-maps", "pair"),
    "half_maps": ("--half-maps", "pair"),
    "cs": ("--cs", "flag"),
    "no_plots": ("--no-plots", "flag"),
    "allow_negative_cs": ("--allow-negative-cs", "flag"),
    "exact_gradient": (("--exact-gradient", "--image-gradient"), "switch"),
}

#: RELION input flags and the estimate option each becomes (None: not used by cryomag).
INPUTS = {
    "in_parts": "--particles",
    "in_3dref": "--ref",
    "in_mask": "--mask",
    "in_movies": None,
    "in_mics": None,
    "in_coords": None,
}

_YES = {"", "yes", "y", "true", "1", "on"}
_NO = {"no", "n", "false", "0", "off"}


class ExternalArgsError(ValueError):
    """The External job's command line cannot be used (the message says why)."""


@dataclass
class ExternalArgs:
    """The parsed External job command line.

    Attributes
    ----------
    out : Path or None
        ``--o``: the job folder (relative to the project folder, as RELION passes it).
    estimate_args : list of str
        The equivalent ``cryomag estimate`` arguments.
    """

    out: Path | None
    estimate_args: list[str] = field(default_factory=list)


def _flag_value(label: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _YES:
        return True
    if v in _NO:
        return False
    raise ExternalArgsError(f"--{label} {value!r}: expected yes or no")


def parse_external_args(argv: list[str]) -> ExternalArgs:
    """Translate an External job's arguments into ``cryomag estimate`` arguments.

    Parameters
    ----------
    argv : list of str
        The arguments after the executable.

    Returns
    -------
    ExternalArgs

    Raises
    ------
    ExternalArgsError
        A token that is not ``--NAME``, a missing value, an unknown parameter label (the
        message lists the known ones), a RELION input cryomag does not use, a repeated
        option, or no ``--o`` / ``--in_parts`` / reference. ``out`` is filled in as soon as
        ``--o`` was read, so that the caller can still write the failure marker.
    """
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ExternalArgsError(f"{tok!r}: expected --NAME VALUE (External job arguments)")
        name = tok[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:  # an empty parameter value: RELION writes "--LABEL " and the next option
            value = ""
            i += 1
        pairs.append((name, value))

    out_value = next((v for n, v in pairs if n == "o"), None)
    parsed = ExternalArgs(out=Path(out_value) if out_value else None)
    seen: set[str] = set()
    args: list[str] = []
    ref_given = False
    error: ExternalArgsError | None = None
    for name, value in pairs:
        key = name.replace("-", "_")
        if key in seen and error is None:
            error = ExternalArgsError(f"--{name}: given twice")
        seen.add(key)
        if error is not None:
            continue
        try:
            args += _translate(key, name, value)
        except ExternalArgsError as exc:
            error = exc
        ref_given |= key in ("in_3dref", "halfmaps", "half_maps")
    if error is None:
        if parsed.out is None:
            error = ExternalArgsError("--o: missing (the job folder RELION passes)")
        elif "in_parts" not in seen:
            error = ExternalArgsError(
                "--in_parts: missing; give the particles STAR file as the job's 'Input "
                "particles'"
            )
        elif not ref_given:
            error = ExternalArgsError(
                "--in_3dref: missing; give the reference map as the job's 'Input 3D "
                "reference' (or half maps with the parameter label halfmaps)"
            )
    if error is not None:
        error.out = parsed.out  # type: ignore[attr-defined]
        raise error
    args += ["--image-paths", "cwd"]
    parsed.estimate_args = args
    return parsed


def _translate(key: str, name: str, value: str) -> list[str]:
    """One External job option as estimate arguments."""
    if key == "o":
        if not value:
            raise ExternalArgsError("--o: expected the job folder")
        return ["--out", value]
    if key == "j":
        return ["--j", value]
    if key in INPUTS:
        option = INPUTS[key]
        if option is None:
            raise ExternalArgsError(
                f"--{name} {value}: cryomag does not use {name[3:]}; leave this input empty "
                "(cryomag needs 'Input particles' and 'Input 3D reference')"
            )
        if not value:
            raise ExternalArgsError(f"--{name}: expected a file name")
        return [option, value]
    if key not in LABELS:
        known = ", ".join(sorted(LABELS))
        raise ExternalArgsError(
            f"--{name}: unknown parameter label; expected one of: {known} (as in "
            "'cryomag estimate --help', with _ for -)"
        )
    option, kind = LABELS[key]
    if kind == "value":
        if not value:
            raise ExternalArgsError(f"--{name}: expected a value")
        return [str(option), value]
    if kind == "pair":
        files = value.replace(",", " ").split()
        if len(files) != 2:
            raise ExternalArgsError(
                f"--{name} {value!r}: expected two half-map files, space- or comma-separated"
            )
        return [str(option), *files]
    on = _flag_value(name, value)
    if kind == "flag":
        return [str(option)] if on else []
    yes, no = option
    return [yes if on else no]


# ---------------------------------------------------------------------------- job folder
def write_output_nodes(out: str | os.PathLike, nodes: list[tuple[str, str]]) -> Path:
    """Write ``OUT/RELION_OUTPUT_NODES.star`` (atomically).

    Parameters
    ----------
    out : path
        The job folder as RELION passed it (``--o``); node names are ``out`` + file name,
        relative to the project folder, as the pipeliner stores them.
    nodes : list of (str, str)
        (file name inside ``out``, node type label).
    """
    from cryomag.io.atomic import atomic_write

    folder = Path(out)
    prefix = str(out) if str(out).endswith("/") else f"{out}/"
    lines = [
        "",
        "# version 50001",
        "",
        "data_output_nodes",
        "",
        "loop_",
        "_rlnPipeLineNodeName #1",
        "_rlnPipeLineNodeTypeLabel #2",
    ]
    for name, label in nodes:
        node = prefix + name
        if any(c.isspace() for c in node):
            raise ValueError(f"{node!r}: RELION node names cannot contain spaces")
        lines.append(f"{node} {label}")
    target = folder / NODES_FILE
    with atomic_write(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n\n")
    return target


def _touch(folder: Path, name: str) -> None:
    with contextlib.suppress(OSError):
        (folder / name).touch()


def _clear_markers(folder: Path) -> None:
    """Remove the exit markers and nodes of an earlier run (RELION does the same)."""
    for name in (SUCCESS, FAILURE, ABORTED, NODES_FILE):
        with contextlib.suppress(OSError):
            (folder / name).unlink()


class _AbortWatcher:
    """Polls for ``RELION_JOB_ABORT_NOW`` and, when it appears, interrupts the main thread
    with SIGTERM (handled as Ctrl-C: the workers stop, the folder is released)."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / ABORT_NOW
        self.requested = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relion-abort", daemon=True)

    def __enter__(self) -> _AbortWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(ABORT_POLL_S):
            if self.file.exists():
                self.requested = True
                os.kill(os.getpid(), signal.SIGTERM)
                return


def _run_estimate(args: list[str]) -> int:
    """Run ``cryomag estimate ARGS`` in this process; its exit status."""
    import click

    from cryomag.cli.main import app

    command = typer.main.get_command(app).commands["estimate"]  # type: ignore[attr-defined]
    try:
        code = command.main(args=args, prog_name="cryomag estimate", standalone_mode=False)
    except click.ClickException as exc:
        typer.secho(f"error: {exc.format_message()}", fg=typer.colors.RED, err=True)
        return exc.exit_code or 1
    except click.Abort:
        return 130
    return int(code or 0)


def run_external(argv: list[str], record_as: str | None = None) -> int:
    """Run an External job: parse, estimate, mark the job folder; the exit status.

    0 success; 1 bad arguments or input; 3 a fit failed its quality checks; 130 aborted or
    interrupted. Exactly one of RELION_JOB_EXIT_SUCCESS / _FAILURE / _ABORTED is left in
    ``--o`` (none only when ``--o`` itself is missing). ``record_as``: the program name to
    record as the run's command line (:mod:`cryomag.runinfo`) before ``argv``; None: the
    command line recorded already (``cryomag relion-external ...``) is kept.
    """
    from cryomag.cli.main import sigterm_as_interrupt
    from cryomag.runinfo import set_command_line

    if record_as is not None:
        set_command_line([record_as, *argv])
    try:
        parsed = parse_external_args(argv)
    except ExternalArgsError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        out = getattr(exc, "out", None)
        if out is not None:
            with contextlib.suppress(OSError):
                out.mkdir(parents=True, exist_ok=True)
            _clear_markers(out)
            _touch(out, FAILURE)
        return 1
    out = parsed.out
    assert out is not None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        typer.secho(f"error: --o {out}: cannot create the job folder: {exc}", err=True)
        return 1
    _clear_markers(out)
    typer.echo("cryomag estimate " + " ".join(parsed.estimate_args))
    with sigterm_as_interrupt(), _AbortWatcher(out) as watcher:
        if watcher.file.exists():  # RELION removes it before a run: an abort already asked
            watcher.requested = True
            code = 130
        else:
            try:
                code = _run_estimate(parsed.estimate_args)
            except KeyboardInterrupt:
                code = 130
    if watcher.requested:
        typer.secho("aborted (RELION_JOB_ABORT_NOW)", fg=typer.colors.RED, err=True)
        _touch(out, ABORTED)
        return 130
    if code == 0:
        nodes = [("particles.star", PARTICLES_LABEL)]
        if (out / "plots" / "estimate.pdf").is_file():
            nodes.append(("plots/estimate.pdf", LOGFILE_LABEL))
        try:
            write_output_nodes(out, nodes)
        except (OSError, ValueError) as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            _touch(out, FAILURE)
            return 1
        _touch(out, SUCCESS)
        return 0
    if code == 3:
        typer.secho(
            f"a fit failed its quality checks: see {out}/results.json; the job is marked "
            "failed",
            fg=typer.colors.RED,
            err=True,
        )
    _touch(out, FAILURE)
    return code


def main() -> None:
    """Console script ``cryomag_relion_external`` (the External job's executable)."""
    sys.exit(run_external(sys.argv[1:], record_as="cryomag_relion_external"))


def relion_external_cmd(ctx: typer.Context) -> None:
    """Run as a RELION External job (executable: cryomag_relion_external).

    Takes RELION's arguments: --o JOBDIR --in_parts particles.star --in_3dref map.mrc
    [--in_mask mask.mrc] [--LABEL VALUE]... --j N. Labels: fit, defocus, astigmatism,
    defocus_tol, defocus_frame, low_res, high_res, max_iter, tol, chunk_size, window_pad,
    warm_start, angpix, threads, max_defocus, halfmaps ("h1.mrc h2.mrc"), cs, no_plots,
    allow_negative_cs, exact_gradient (yes/no): as the estimate options of the same names.
    Writes estimate's outputs, RELION_OUTPUT_NODES.star and RELION_JOB_EXIT_SUCCESS /
    FAILURE / ABORTED into JOBDIR; honours RELION_JOB_ABORT_NOW.
    """
    raise typer.Exit(run_external(list(ctx.args)))


def register(app: typer.Typer) -> None:
    """Add ``relion-external`` to the cryomag app."""
    app.command(
        "relion-external",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(relion_external_cmd)
