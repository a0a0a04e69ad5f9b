"""Where the passes run: this process, local worker processes, a Dask scheduler or batch jobs.

The layer maps a picklable function over chunk descriptors and hands back the results in a
fixed order; it knows nothing of particles, maps or statistics (objects that want to travel
once per worker declare it themselves, see :mod:`cryomag.execution.payload`).

- :mod:`~cryomag.execution.base`: the :class:`Executor` interface and :class:`ExecutorConfig`;
- :mod:`~cryomag.execution.local`, :mod:`~cryomag.execution.processes`,
  :mod:`~cryomag.execution.dask`: the executors;
- :mod:`~cryomag.execution.worker`: what a worker process does with a pass function;
- :mod:`~cryomag.execution.checkpoint`: resumable runs;
- :mod:`~cryomag.execution.chunks`: chunk descriptors;
- :mod:`~cryomag.execution.payload`: shipping functions and their shared parts;
- :mod:`~cryomag.execution.allocator`: the memory-allocator policy of the worker processes.

Memory per worker is that of the function being mapped (for ``cryomag estimate`` see
:mod:`cryomag.fit.passes`) plus ~150 MB for Python, NumPy and the worker, plus up to 256 MB
that the tuned allocator keeps.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from cryomag.execution.base import Executor, ExecutorConfig, ResultCallback, usable_cores
from cryomag.execution.chunks import Chunk, make_chunks
from cryomag.execution.local import LocalExecutor

__all__ = [
    "Chunk",
    "Executor",
    "ExecutorConfig",
    "LocalExecutor",
    "ResultCallback",
    "make_chunks",
    "make_executor",
    "run_executor",
    "usable_cores",
]


def make_executor(config: ExecutorConfig | None = None, preload: tuple[str, ...] = ()) -> Executor:
    """The executor described by ``config`` (default: worker processes sized to the machine).

    Local workers (``j`` != 1, no scheduler or cluster) are a
    :class:`~cryomag.execution.processes.ProcessExecutor` where processes can be forked
    (Linux), else a Dask LocalCluster; ``scheduler`` and ``cluster`` use Dask. ``preload``:
    modules the workers import as they start (where they are not forked from this process).
    Workers start on the first :meth:`Executor.map` (or
    :meth:`Executor.start_in_background`); call :meth:`Executor.close` (or use the executor
    as a context manager) to stop what was started.
    """
    cfg = config or ExecutorConfig()
    if cfg.synchronous:
        return LocalExecutor()
    from cryomag.execution.dask import DaskExecutor
    from cryomag.execution.processes import ProcessExecutor, fork_available

    if cfg.scheduler is not None:
        return DaskExecutor.connect(cfg.scheduler)
    if cfg.cluster is not None:
        return DaskExecutor.jobqueue(cfg)
    threads = max(cfg.worker_threads, 1)
    workers = cfg.j or max(usable_cores() // threads, 1)
    if fork_available():
        return ProcessExecutor(workers, threads, preload)
    return DaskExecutor.local(
        n_workers=workers,
        threads_per_worker=threads,
        local_directory=cfg.local_directory,
        preload=preload,
    )


@contextlib.contextmanager
def run_executor(
    executor: Executor | ExecutorConfig | None = None,
    checkpoints: str | os.PathLike | None = None,
    resume: bool = False,
    codec=None,
    preload: tuple[str, ...] = (),
) -> Iterator[Executor]:
    """The executor of one run, with checkpoints when a folder is given.

    Parameters
    ----------
    executor : Executor, ExecutorConfig or None
        An executor owned by the caller (left open), a configuration (the executor is made
        here and closed on exit) or None (:class:`LocalExecutor`).
    checkpoints : path, optional
        Folder for per-chunk results (``OUT/.chunks``); removed when the block completes
        without an exception, kept (resumable) otherwise.
    resume : bool
        Reuse the finished chunks found in ``checkpoints``.
    codec : ResultCodec, optional
        How the checkpoints store results (:mod:`cryomag.execution.checkpoint`).
    preload : tuple of str
        Modules the local workers made here import as they start (where not forked).
    """
    if resume and checkpoints is None:
        raise ValueError("resume needs an output folder (the checkpoints live in OUT/.chunks)")
    owned = not isinstance(executor, Executor)
    ex = executor if isinstance(executor, Executor) else None
    if ex is None:
        ex = (
            make_executor(executor, preload)
            if isinstance(executor, ExecutorConfig)
            else LocalExecutor()
        )
    try:
        run: Executor = ex
        if checkpoints is not None:
            from cryomag.execution.checkpoint import CheckpointExecutor

            run = CheckpointExecutor(ex, checkpoints, resume=resume, codec=codec)
        yield run
        if checkpoints is not None:
            run.finish()  # type: ignore[attr-defined]
    finally:
        if owned:
            ex.close()
