"""The executor interface and its configuration.

Every pass over the data is ``executor.map(fn, chunks)``: ``fn`` (a small picklable callable)
is applied to each chunk descriptor (a label and rows, never data arrays) and the results come
back in chunk order, or are handed one by one to ``on_result`` as they finish. Callers reduce
them in a fixed order, so the numbers do not depend on the executor or on the number of
workers. This package knows nothing of what ``fn`` computes: it maps callables over chunks.

Executors
---------
:class:`cryomag.execution.local.LocalExecutor`
    This process, one chunk after the other (``--j 1``: debugging, profiling, small data).
:class:`cryomag.execution.processes.ProcessExecutor`
    Local worker processes, forked from this one when the run starts (the command line's
    default on Linux, one single-threaded worker per core).
:class:`cryomag.execution.dask.DaskExecutor`
    A ``dask.distributed`` client: an existing scheduler (``--scheduler tcp://host:8786``),
    SLURM / PBS jobs through dask-jobqueue (``--cluster slurm --jobs N ...``) or a
    LocalCluster (the local default where processes cannot be forked).
:class:`cryomag.execution.checkpoint.CheckpointExecutor`
    Wraps any of them: stores each finished chunk's result atomically and, with
    ``resume=True``, reuses those of an interrupted run.

:func:`cryomag.execution.make_executor` builds one from an :class:`ExecutorConfig`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Executor", "ExecutorConfig", "ResultCallback", "usable_cores"]

#: Called in the driver with (chunk, result) as each chunk finishes (any order).
ResultCallback = Callable[[Any, Any], None]


class Executor(ABC):
    """Applies a function to chunk descriptors and returns the results in chunk order."""

    #: Short label for logs.
    name = "executor"

    def start_in_background(self) -> None:  # noqa: B027 (a hook: no-op by default)
        """Begin starting the workers without waiting for them (no-op where none start).

        Called at the start of a run, so that a cluster comes up while the driver reads its
        inputs.
        """

    @abstractmethod
    def map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        description: str = "particles",
        progress: bool = True,
        on_result: ResultCallback | None = None,
        collect: bool = True,
    ) -> list[Any] | None:
        """Apply ``fn`` to every chunk.

        Parameters
        ----------
        fn : callable
            ``fn(chunk) -> result``; picklable for distributed executors.
        chunks : sequence
            Chunk descriptors (:class:`cryomag.execution.chunks.Chunk`); ``len(chunk)``
            weights the progress bar.
        description : str
            Label of the progress bar.
        progress : bool
            Show a progress bar with an ETA.
        on_result : callable, optional
            ``on_result(chunk, result)``, called in this process as each chunk finishes.
        collect : bool
            Keep the results and return them (default). False: results are only handed to
            ``on_result`` and dropped, so the caller's memory does not grow with the number
            of chunks; returns None.

        Returns
        -------
        list or None
            ``[fn(c) for c in chunks]``, in the order of ``chunks`` (None without
            ``collect``).
        """

    def run_on_workers(self, fn: Callable[[], Any]) -> dict[Any, Any]:
        """``fn()`` in every worker process, between passes, by worker (e.g. a process's
        peak memory). Here: in this process, which runs the chunks."""
        return {os.getpid(): fn()}

    def close(self) -> None:
        """Release workers and clusters this executor started (nothing by default)."""
        return None

    def describe(self) -> str:
        """One line for the log: where the work runs."""
        return self.name

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ExecutorConfig:
    """How and where to run the passes (the command line's execution options).

    Attributes
    ----------
    j : int
        Local worker processes: 0 = one per core, 1 = synchronous in this process (no Dask).
        Ignored with ``scheduler`` or ``cluster``.
    threads : int or None
        Threads per worker process, which the numerical libraries use (None: 1). For
        ``j == 1`` the threads of the synchronous run (None: all cores).
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``); its workers must have
        cryomag installed and see the input files at the same paths.
    cluster : {"slurm", "pbs"}, optional
        Start workers as batch jobs with dask-jobqueue.
    jobs : int
        Batch jobs to submit.
    cores : int
        Cores per job; each job runs ``processes`` workers of ``cores // processes`` threads.
    processes : int, optional
        Worker processes per job (default: ``cores``, one thread each).
    memory : str
        Memory per job (``"8GB"``); split evenly between its worker processes.
    queue, account : str, optional
        Partition / queue and account (project) to charge.
    walltime : str
        Job time limit (``"01:00:00"``).
    python : str, optional
        Interpreter the jobs run (default: this one, ``sys.executable``).
    job_extra : list of str
        Extra scheduler directives, e.g. ``["--gres=gpu:0", "--qos=normal"]`` (SLURM) or
        ``["-l select=1:ncpus=4"]`` (PBS).
    job_prologue : list of str
        Shell lines run before the worker starts (``module load ...``, ``source venv``).
    log_directory : str, optional
        Where the jobs' output files go (default: the batch system's default, the working
        directory; the command line passes ``OUT/jobs``).
    local_directory : str, optional
        Scratch folder of the workers.
    interface : str, optional
        Network interface of the scheduler and workers (``ib0``), when the default route is
        not reachable from the compute nodes.
    """

    j: int = 0
    threads: int | None = None
    scheduler: str | None = None
    cluster: str | None = None
    jobs: int = 1
    cores: int = 1
    processes: int | None = None
    memory: str = "8GB"
    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    python: str | None = None
    job_extra: list[str] = field(default_factory=list)
    job_prologue: list[str] = field(default_factory=list)
    log_directory: str | None = None
    local_directory: str | None = None
    interface: str | None = None

    def __post_init__(self) -> None:
        if self.j < 0:
            raise ValueError(f"--j must be >= 0, got {self.j}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if self.cluster is not None and self.cluster.lower() not in ("slurm", "pbs"):
            raise ValueError(f"--cluster must be slurm or pbs, got {self.cluster!r}")
        if self.cluster is not None and self.scheduler is not None:
            raise ValueError("give either --scheduler or --cluster, not both")
        if self.jobs < 1 or self.cores < 1:
            raise ValueError(f"--jobs and --cores must be >= 1, got {self.jobs}, {self.cores}")
        if self.processes is not None and not 1 <= self.processes <= self.cores:
            raise ValueError(
                f"--processes must be in 1..cores ({self.cores}), got {self.processes}"
            )

    def resolve(self, out: os.PathLike | None = None) -> ExecutorConfig:
        """The config with its defaults decided for a run writing into ``out``: the batch
        jobs' output files go to ``OUT/jobs`` unless ``log_directory`` is set."""
        import dataclasses

        logs = self.log_directory
        if logs is None and self.cluster is not None and out is not None:
            logs = os.path.join(os.fspath(out), "jobs")
        return dataclasses.replace(self, log_directory=logs)

    @property
    def synchronous(self) -> bool:
        """True when the passes run in this process."""
        return self.scheduler is None and self.cluster is None and self.j == 1

    @property
    def worker_threads(self) -> int:
        """Threads of the numerical libraries where the chunks run (0 = all cores).

        Workers of a cluster use ``threads`` (default 1); a synchronous run uses ``threads``
        or, by default, every core of this process.
        """
        if self.threads is not None:
            return int(self.threads)
        return 0 if self.synchronous else 1


def usable_cores() -> int:
    """Cores this process may use (CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1
