"""Passes over the images on a Dask cluster (``dask.distributed``).

Three ways to get workers, one code path to use them:

- ``DaskExecutor.local(n_workers)``: a LocalCluster of worker processes on this machine
  (the command line's default, one single-threaded worker per core);
- ``DaskExecutor.connect("tcp://host:8786")``: a running scheduler (``dask scheduler`` plus
  ``dask worker`` processes started by hand or by any deployment tool);
- ``DaskExecutor.jobqueue("slurm" | "pbs", jobs=N, ...)``: workers submitted as batch jobs
  through dask-jobqueue (SLURMCluster / PBSCluster); the jobs run this interpreter.

For every pass, the pass function is split (:class:`cryomag.execution.payload.Payload`) into
a small pickle and its shared parts (for ``cryomag estimate``: the particle table, the image
source and the reference). Each part becomes one task of the graph whose key is its content
token: a worker fetches it once and builds the object once per process, and later passes,
which refer to the same parts, ship only the small pickle. The parts are tasks rather than
scattered data so that the scheduler can recompute them when the worker holding them dies.
Each chunk is then one task taking the chunk descriptor; results are gathered as they finish
(updating the progress bar) and returned in chunk order. A worker lost mid-pass has its tasks
rerun elsewhere by the scheduler (``distributed.scheduler.allowed-failures`` times); the
driver keeps exactly one result per chunk, so nothing is lost or counted twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from cryomag.execution.allocator import keep_block_arrays_on_heap
from cryomag.execution.base import Executor, ResultCallback
from cryomag.execution.payload import Blob, Payload
from cryomag.execution.worker import limit_blas_threads, materialize

log = logging.getLogger("cryomag")


# ----------------------------------------------------------------------- worker side
def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return 1


def _keep(blob: Blob) -> Blob:
    """Task body of a shared part: the blob itself (kept in the worker's memory)."""
    return blob


def run_chunk(chunk: Any, payload: Blob, *parts: Blob) -> Any:
    """Task body of one chunk: build (or reuse) the pass function and apply it to ``chunk``."""
    keep_block_arrays_on_heap()
    limit_blas_threads()
    blobs = {b.token: b for b in parts}
    blobs[payload.token] = payload
    fn = materialize(payload.token, blobs, _worker_threads())
    return fn(chunk)


# ------------------------------------------------------------------ worker processes
#: Dask settings of the local cluster's workers (:meth:`DaskExecutor.local`).
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}

#: True while :meth:`DaskExecutor.local` forks its workers (read in the child: see
#: :func:`_after_fork_in_child`).
_FORKING_WORKERS = False
_AT_FORK_REGISTERED = False


def _after_fork_in_child() -> None:
    """In a worker forked by :meth:`DaskExecutor.local`: the signal handlers a spawned
    worker starts with. The command line turns SIGTERM into an interruption of its main
    thread (:func:`cryomag.cli.main.sigterm_as_interrupt`); a worker inheriting that
    handler would not end when its nanny terminates it."""
    if not _FORKING_WORKERS:
        return
    with contextlib.suppress(ValueError, OSError):  # not the main thread: nothing to undo
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # the start blocks them in the driver (start_in_background); a worker takes them
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _START_SIGNALS)


#: Signals held back while the forked workers start (see :meth:`DaskExecutor.start_in_background`).
_START_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _forking_workers():
    """Within the block, processes forked from this one are cluster workers."""
    global _FORKING_WORKERS, _AT_FORK_REGISTERED
    if not _AT_FORK_REGISTERED:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _AT_FORK_REGISTERED = True
    _FORKING_WORKERS = True
    try:
        yield
    finally:
        _FORKING_WORKERS = False


def _child_pids() -> set[int]:
    """Pids of this process's descendants."""
    try:
        import psutil

        return {c.pid for c in psutil.Process().children(recursive=True)}
    except Exception:  # pragma: no cover - psutil comes with distributed
        return set()


def _new_children(before: set[int]) -> list:
    """This process's descendants that were not in ``before`` (psutil.Process), except
    multiprocessing's resource tracker (shared by the whole process, it ends with it)."""
    try:
        import psutil

        out = []
        for c in psutil.Process().children(recursive=True):
            if c.pid in before:
                continue
            with contextlib.suppress(psutil.Error):
                if "resource_tracker" in " ".join(c.cmdline()):
                    continue
            out.append(c)
        return out
    except Exception:  # pragma: no cover
        return []


def _descendants(proc) -> list:
    """The live descendants of a psutil.Process (none when it has ended)."""
    try:
        return proc.children(recursive=True)
    except Exception:
        return []


def _reap(procs: list, timeout: float = 10.0) -> None:
    """Wait for ``procs`` to end; SIGTERM those alive after ``timeout`` s, then SIGKILL.

    Every process is waited for (no zombie is left), and a process that ended long ago and
    whose pid was reused is never signalled (psutil checks the creation time).
    """
    if not procs:
        return
    import psutil

    procs = list({p.pid: p for p in procs}.values())
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for sig in ("terminate", "kill"):
        if not alive:
            return
        for p in alive:
            with contextlib.suppress(psutil.Error):
                getattr(p, sig)()
        _, alive = psutil.wait_procs(alive, timeout=5.0)
    if alive:  # pragma: no cover - SIGKILL does not fail
        log.warning("worker processes %s did not end", [p.pid for p in alive])


# ----------------------------------------------------------------------- driver side
class DaskExecutor(Executor):
    """Run the chunks of each pass as tasks of a ``dask.distributed`` cluster.

    Parameters
    ----------
    start : callable
        Returns ``(client, cluster_or_None)``; called on the first :meth:`map`, so that making
        the executor is cheap and a cluster starts only when there is work.
    name : str
        Label for the log.
    retries : int
        Extra tries of a chunk whose task raised (default 0: errors in the data are not
        transient). Tasks of workers that died are rerun regardless.

    Notes
    -----
    Use the class methods :meth:`local`, :meth:`connect` or :meth:`jobqueue`. Close the
    executor (or use it as a context manager) to stop a cluster it started.
    """

    def __init__(
        self, start: Callable[[], tuple[Any, Any]], name: str = "dask", retries: int = 0
    ) -> None:
        self._start = start
        self.name = name
        self.retries = int(retries)
        self._client = None
        self._cluster = None
        self._parts: dict[str, Any] = {}
        self._starter: threading.Thread | None = None
        #: only a LocalCluster starts in a background thread (batch-system clusters install
        #: signal handlers, which only the main thread may do)
        self.background_start = False
        #: a LocalCluster whose workers :meth:`start_in_background` forks from this process
        #: at once, instead of spawning them in a background thread
        self.fork_start = False
        self._start_error: BaseException | None = None
        self._start_lock = threading.Lock()
        #: processes a LocalCluster started (psutil.Process), reaped by close()
        self._procs: list = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def local(
        cls,
        n_workers: int,
        threads_per_worker: int = 1,
        memory_limit: str | float | None = "auto",
        local_directory: str | None = None,
        retries: int = 0,
        preload: Sequence[str] = (),
        fork: bool | None = None,
    ) -> DaskExecutor:
        """A LocalCluster of ``n_workers`` processes of ``threads_per_worker`` threads.

        Shared parts built in a worker learn its ``threads_per_worker``
        (``__cryomag_on_worker__``). ``memory_limit`` is per worker ("auto": the machine's
        memory divided by the workers). ``preload``: modules each worker imports as it
        starts (the numerical kernels: about a second per worker that would otherwise fall
        in the first pass).

        ``fork`` (default: on Linux): when the cluster is started by
        :meth:`start_in_background` -- before the driver has done any numerical work or
        started threads of its own -- its workers are forked from this process rather than
        spawned: they start in ~0.1 s with the driver's imports instead of ~0.6 s importing
        everything again (the default fit of 5,000 particles of box 128: 1.1 s of 11.5 on 2
        cores; bench/RESULTS.md, issue 14). Each worker limits its BLAS to one thread, as a
        spawned one has it, so both give the same numbers. A cluster started later (the
        first :meth:`map`), or restarted workers, are spawned: forking a process whose
        OpenMP or BLAS threads have run is not safe.
        """
        fork_early = sys.platform.startswith("linux") if fork is None else bool(fork)

        def start(method: str | None = None):
            import dask
            from distributed import Client, LocalCluster

            before = _child_pids()
            how = contextlib.ExitStack()
            # no statistical profiler in the workers: it samples their threads' stacks every
            # 10 ms (for the dashboard, which a local cluster here does not have), and took
            # ~5-8 % of a pass's time on 2 cores (bench/RESULTS.md, issue 14)
            how.enter_context(dask.config.set(WORKER_CONFIG))
            if method:
                how.enter_context(
                    dask.config.set({"distributed.worker.multiprocessing-method": method})
                )
                if method == "fork":
                    how.enter_context(_forking_workers())
            with warnings.catch_warnings(), how:
                # no dashboard; its HTTP server moves off a busy port 8787 with a warning
                warnings.filterwarnings("ignore", message=".*[Pp]ort .* is already in use.*")
                cluster = LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=threads_per_worker,
                    processes=True,
                    memory_limit=memory_limit,
                    dashboard_address=None,
                    local_directory=local_directory,
                    silence_logs=logging.ERROR,
                    preload=list(preload),
                )
            client = Client(cluster)
            # the processes the cluster started (nannies and their workers), reaped by close()
            ex._procs = _new_children(before)
            return client, cluster

        ex = cls(
            start,
            name=f"dask LocalCluster ({n_workers} processes x {threads_per_worker} threads)",
            retries=retries,
        )
        ex.background_start = True
        ex.fork_start = fork_early
        return ex

    @classmethod
    def connect(cls, address: str, retries: int = 0) -> DaskExecutor:
        """A running scheduler at ``address`` (``tcp://host:8786``).

        Its workers must import the same cryomag and see the particle stacks and maps at
        the same paths as this process.
        """

        def start():
            from distributed import Client

            return Client(address), None

        return cls(start, name=f"dask scheduler {address}", retries=retries)

    @classmethod
    def jobqueue(cls, config, retries: int = 0) -> DaskExecutor:
        """Workers as SLURM or PBS batch jobs (dask-jobqueue), as ``config`` describes them.

        Parameters
        ----------
        config : ExecutorConfig
            ``cluster`` ("slurm" or "pbs"), ``jobs`` (``cluster.scale(jobs=...)``), ``cores``
            (cores per job), ``processes`` (worker processes per job, default ``cores``: one
            single-threaded worker per core), ``memory`` (per job, split between its
            processes; a worker over 95 % of its share is restarted by its nanny), ``queue``,
            ``account``, ``walltime`` (the pass in progress is resumable with ``--resume`` if
            the jobs end first), ``python`` (default ``sys.executable``), ``job_extra``,
            ``job_prologue``, ``log_directory``, ``local_directory``, ``interface``; see
            :class:`~cryomag.execution.ExecutorConfig`.
        """
        kind = (config.cluster or "").lower()
        jobs, cores, memory = config.jobs, config.cores, config.memory
        queue, account, walltime = config.queue, config.account, config.walltime
        python, job_extra, job_prologue = config.python, config.job_extra, config.job_prologue
        log_directory, local_directory = config.log_directory, config.local_directory
        interface, processes = config.interface, config.processes
        if kind not in ("slurm", "pbs"):
            raise ValueError(f"cluster kind must be slurm or pbs, got {kind!r}")
        procs = processes or cores

        def start():
            try:
                import dask_jobqueue
            except ImportError as exc:  # pragma: no cover - a dependency
                raise RuntimeError(
                    "--cluster needs dask-jobqueue (pip install dask-jobqueue)"
                ) from exc
            from distributed import Client

            klass = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
            kwargs: dict[str, Any] = {
                "cores": cores,
                "processes": procs,
                "memory": memory,
                "walltime": walltime,
                "python": python or sys.executable,
                "job_extra_directives": list(job_extra),
                "job_script_prologue": list(job_prologue),
                "scheduler_options": {"dashboard_address": None},
            }
            for key, value in (
                ("queue", queue),
                ("account", account),
                ("log_directory", log_directory),
                ("local_directory", local_directory),
                ("interface", interface),
            ):
                if value is not None:
                    kwargs[key] = value
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Pp]ort .* is already in use.*")
                cluster = klass(**kwargs)
            log.info("dask-jobqueue job script:\n%s", cluster.job_script())
            cluster.scale(jobs=jobs)
            return Client(cluster), cluster

        return cls(
            start,
            name=f"dask {kind.upper()} ({jobs} job(s) x {procs} workers)",
            retries=retries,
        )

    # ------------------------------------------------------------------ use
    def start_in_background(self) -> None:
        """Start the cluster in a background thread; :attr:`client` waits for it. A
        LocalCluster with ``fork`` starts here at once instead (its workers forked from this
        process: see :meth:`local`); should that fail, in the background as spawned."""
        with self._start_lock:
            if not self.background_start or self._client is not None or self._starter:
                return
            if self.fork_start:
                self.fork_start = False  # only this first, early start forks
                # Ctrl-C / SIGTERM wait the ~0.1 s until the cluster is whole (and close()
                # can stop it): an interruption inside its construction would leave it
                # half-started, out of reach
                main = threading.current_thread() is threading.main_thread()
                old = signal.pthread_sigmask(signal.SIG_BLOCK, _START_SIGNALS) if main else None
                try:
                    self._client, self._cluster = self._start("fork")
                    return
                except Exception as exc:
                    log.warning("forked local workers did not start (%s): spawning them", exc)
                finally:
                    if old is not None:
                        signal.pthread_sigmask(signal.SIG_SETMASK, old)
            # import here, in the caller's thread: two threads importing distributed at once
            # can meet a partially initialised module
            import distributed  # noqa: F401

            self._starter = threading.Thread(
                target=self._start_now, name="cryomag-cluster-start", daemon=True
            )
            self._starter.start()

    def _start_now(self) -> None:
        try:
            self._client, self._cluster = self._start()
        except BaseException as exc:  # re-raised by the first use of the client
            self._start_error = exc

    @property
    def client(self):
        """The ``distributed.Client`` (starting the cluster on first use)."""
        starter = self._starter
        if starter is not None:
            starter.join()
            self._starter = None
            if self._start_error is not None:
                err, self._start_error = self._start_error, None
                raise err
            log.info("executor: %s", self.describe())
        if self._client is None:
            self._client, self._cluster = self._start()
            log.info("executor: %s", self.describe())
        return self._client

    def describe(self) -> str:
        """Where the work runs."""
        if self._client is None:
            return self.name
        return f"{self.name}, scheduler {self._client.scheduler.address}"

    def _submit_part(self, blob: Blob):
        """Submit a shared part once per executor (its key is its content token)."""
        hit = self._parts.get(blob.token)
        if hit is not None:
            return hit[0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
            warnings.filterwarnings("ignore", message=".*[Ss]ending large graph.*")
            fut = self.client.submit(_keep, blob, key=f"cryomag-part-{blob.token}", pure=False)
        self._parts[blob.token] = (fut, blob.deps)
        return fut

    def map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        description: str = "particles",
        progress: bool = True,
        on_result: ResultCallback | None = None,
        collect: bool = True,
    ) -> list[Any] | None:
        """Run ``fn`` on every chunk as cluster tasks; results in chunk order (see class)."""
        from distributed import as_completed

        from cryomag.execution.local import progress_bar

        chunks = list(chunks)
        if not chunks:
            return [] if collect else None
        client = self.client
        payload = Payload(fn)
        tokens, new = payload.parts({k: v[1] for k, v in self._parts.items()})
        for blob in new.values():
            self._submit_part(blob)
        parts = [self._parts[t][0] for t in tokens]
        pfut = self._submit_part(payload.blob)
        keys = [f"cryomag-{payload.token[:16]}-{i}-{c.index}" for i, c in enumerate(chunks)]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
            futures = client.map(
                run_chunk,
                chunks,
                [pfut] * len(chunks),
                *[[p] * len(chunks) for p in parts],
                key=keys,
                pure=False,
                retries=self.retries,
            )
        where = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(chunks)
        done = [False] * len(chunks)
        total = sum(len(c) for c in chunks)
        try:
            with progress_bar(disable=not progress) as bar:
                task = bar.add_task(description, total=total)
                for fut, res in as_completed(futures, with_results=True, raise_errors=True):
                    i = where[fut.key]
                    if done[i]:  # pragma: no cover - as_completed yields each future once
                        continue
                    done[i] = True
                    if collect:
                        results[i] = res
                    if on_result is not None:
                        on_result(chunks[i], res)
                    del res
                    bar.advance(task, len(chunks[i]))
                    fut.release()
        except BaseException:
            with contextlib.suppress(Exception):
                client.cancel(futures)
            raise
        finally:
            # drop the pass pickle; shared parts stay for the next pass
            self._parts.pop(payload.blob.token, None)
            with contextlib.suppress(Exception):
                pfut.release()
        missing = [i for i, d in enumerate(done) if not d]
        if missing:  # pragma: no cover - as_completed returns every future
            raise RuntimeError(f"{len(missing)} chunk(s) returned no result")
        return results if collect else None

    def run_on_workers(self, fn: Callable[[], Any]) -> dict[Any, Any]:
        """``fn()`` in every worker of the cluster, by worker address."""
        return self.client.run(fn)

    def close(self) -> None:
        """Release the shared parts; stop the client and the cluster if this started them.

        The processes of a LocalCluster (nannies and workers) are reaped before this returns:
        after the cluster's own shutdown, any still alive get SIGTERM, then SIGKILL
        (:func:`_reap`). Safe to call twice, also after Ctrl-C or an error.
        """
        if self._starter is not None:
            with contextlib.suppress(BaseException):
                self._starter.join()
            self._starter = None
        self._parts.clear()
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        procs, self._procs = self._procs, []
        procs = procs + [c for p in procs for c in _descendants(p)]  # workers restarted since
        try:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close(timeout=10)
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close(timeout=10)
        finally:
            _reap(procs)
