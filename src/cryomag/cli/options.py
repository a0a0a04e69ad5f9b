"""Option groups shared by the commands, each declared once.

:func:`execution_options` adds the execution options (where the passes run: this process,
local worker processes, a Dask scheduler, SLURM / PBS jobs) to a command and hands it one
:class:`~cryomag.execution.ExecutorConfig`, resolved for the command's output folder
(:meth:`~cryomag.execution.ExecutorConfig.resolve`). The meaning of each option is documented
once, on the config's attributes; here are their command-line names and help lines.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["EXECUTION_OPTIONS", "execution_options"]

_PANEL = "Execution"


def _opt(flag: str, help_: str):
    return typer.Option(flag, help=help_, rich_help_panel=_PANEL)


#: name -> (annotation, default): the command-line form of ExecutorConfig's fields (and
#: --job-logs for its log_directory).
EXECUTION_OPTIONS: dict[str, tuple[Any, Any]] = {
    "j": (
        Annotated[int, _opt("--j", "local worker processes (forked from this one on Linux, "
                             "else a Dask LocalCluster); 0 = one per core; 1 = run in this "
                             "process (debugging)")],
        0,
    ),
    "threads": (
        Annotated[int | None, _opt(
            "--threads",
            "threads per worker process, used by finufft (default 1); with --j 1 the threads "
            "of this process (default: all cores). Runs agree bit for bit only at equal thread "
            "counts (finufft's output varies by ~1e-5 with them)")],
        None,
    ),
    "scheduler": (
        Annotated[str | None, _opt(
            "--scheduler",
            "address of a running Dask scheduler (tcp://host:8786); its workers must have "
            "cryomag and see the particle files at the same paths")],
        None,
    ),
    "cluster": (
        Annotated[str | None, _opt(
            "--cluster",
            "slurm or pbs: submit the workers as batch jobs (dask-jobqueue); the jobs run this "
            "Python and need the files at the same paths")],
        None,
    ),
    "jobs": (Annotated[int, _opt("--jobs", "batch jobs to submit")], 1),
    "cores": (Annotated[int, _opt("--cores", "cores per job")], 1),
    "processes": (
        Annotated[int | None, _opt("--processes", "worker processes per job (default: --cores, "
                                                  "one thread each)")],
        None,
    ),
    "memory": (
        Annotated[str, _opt(
            "--memory",
            "memory per job, split between its processes; a worker needs about 8 N^3 x 8 B for "
            "a reference of box N (map, finufft grid) + chunk-size x box^2 x 32 B + 0.4 GB "
            "(N = box = 128: 0.6 GB; 256: 1.6 GB)")],
        "8GB",
    ),
    "queue": (Annotated[str | None, _opt("--queue", "partition / queue")], None),
    "account": (Annotated[str | None, _opt("--account", "account / project to charge")], None),
    "walltime": (Annotated[str, _opt("--walltime", "time limit per job")], "01:00:00"),
    "job_extra": (
        Annotated[list[str] | None, _opt(
            "--job-extra", "extra batch directive, repeatable (e.g. --job-extra=--qos=normal)")],
        None,
    ),
    "job_prologue": (
        Annotated[list[str] | None, _opt(
            "--job-prologue",
            "shell line run in each job before the worker starts, repeatable (e.g. 'module "
            "load cuda')")],
        None,
    ),
    "job_logs": (
        Annotated[Path | None, _opt("--job-logs", "folder for the jobs' output files (default "
                                                  "OUT/jobs)")],
        None,
    ),
    "interface": (
        Annotated[str | None, _opt("--interface", "network interface of scheduler and workers "
                                                  "(e.g. ib0)")],
        None,
    ),
}  # fmt: skip


def execution_options(func: Callable) -> Callable:
    """Give a typer command the execution options and one ``execution`` argument.

    The decorated function declares ``execution`` (an ExecutorConfig) and ``out`` (its output
    folder); the command line gets every option of :data:`EXECUTION_OPTIONS` instead, and the
    function receives them as one config, resolved for ``out``.
    """
    sig = inspect.signature(func, eval_str=True)  # the module's string annotations evaluated
    if "execution" not in sig.parameters:
        raise TypeError(f"{func.__name__} has no 'execution' parameter")
    params = [p for p in sig.parameters.values() if p.name != "execution"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for name, (ann, default) in EXECUTION_OPTIONS.items()
    ]

    @functools.wraps(func)
    def command(*args, **kwargs):
        from cryomag.cli.common import fail_cleanly
        from cryomag.execution import ExecutorConfig

        opts = {name: kwargs.pop(name) for name in EXECUTION_OPTIONS}
        logs = opts.pop("job_logs")
        opts["job_extra"] = list(opts["job_extra"] or [])
        opts["job_prologue"] = list(opts["job_prologue"] or [])
        with fail_cleanly():  # a bad option is one error line, before any work
            config = ExecutorConfig(**opts, log_directory=None if logs is None else str(logs))
        out = kwargs.get("out")
        kwargs["execution"] = config.resolve(None if out is None else Path(out))
        return func(*args, **kwargs)

    hints = {p.name: p.annotation for p in params}
    command.__annotations__ = {**hints, **{n: a for n, (a, _) in EXECUTION_OPTIONS.items()}}
    command.__signature__ = sig.replace(
        parameters=[p for p in params if p.kind != p.KEYWORD_ONLY]
        + [p for p in params if p.kind == p.KEYWORD_ONLY]
        + extra
    )
    return command
