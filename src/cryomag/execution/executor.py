"""Executors: where the chunks of a pass over the images are computed.

Every pass over the images is ``executor.map(fn, chunks)``: ``fn`` (a small picklable callable;
for ``cryomag estimate`` the pass object) is applied to each chunk descriptor (an optics group
and particle rows, never image arrays) and the results come back as a list in chunk order,
whatever order the chunks finished in. The engine reduces them in that fixed order, in float64,
so the statistics do not depend on the executor or on the number of workers.

Executors
---------
:class:`LocalExecutor`
    This process, one chunk after the other (``--j 1``: debugging, profiling, small data).
:class:`cryomag.execution.dask.DaskExecutor`
    A ``dask.distributed`` client: a LocalCluster sized to the machine (the command line's
    default), an existing scheduler (``--scheduler tcp://host:8786``) or SLURM / PBS jobs
    through dask-jobqueue (``--cluster slurm --jobs N ...``).
:class:`cryomag.execution.resume.CheckpointExecutor`
    Wraps either of them: stores each finished chunk's result atomically and, with
    ``resume=True``, reuses those of an interrupted run.

Shipping work to workers
------------------------
A pass object holds the particle table, the image source and the reference (a map and its
three gradient volumes: by far the largest piece). :class:`Payload` pickles it *without* those:
objects of the registered shared types (:data:`SHARED_TYPES`: MapReference, ParticleSet,
ImageSource) and arrays above :data:`SHARE_MIN_BYTES` are replaced by a content token, shipped
once per worker and built once per worker process (a MapReference is shipped as its real
volume and rebuilt there). What goes out per pass is the small rest (bands, current M, noise
model); what goes out per task is a chunk descriptor. Shared objects are treated as read-only
while a run lasts.

Results and finufft threads
---------------------------
Chunk results depend only on the chunk and the pass object, and the reduction order is fixed,
so 1 and N workers give identical statistics. The one exception is finufft's thread count: its
output changes at the 1e-5 relative level (single precision, eps 1e-4) with the number of
threads it uses. Dask workers evaluate with their own thread count (1 by default), so a
synchronous run with ``nthreads=1`` (``--j 1 --threads 1``) reproduces a cluster run to
rounding, while one with all threads agrees to ~1e-5.

Memory per worker (bytes; particle box B, reference box N, chunk size c, window padding p,
b = 8 bytes per complex value at eps >= 1e-5, else 16)::

    reference   2 N^3 b     the map and its gradient volumes (4 N^3 b more only with
                            ``exact_gradient``), built once per process
              + 4 N^3       the shipped float32 volume (kept by Dask with the task)
              + 2 N^3 b     finufft's upsampled grid (1.25^3) while a batch is evaluated
    chunk       c B^2 8     images and spectra (single precision)
              + c B^2 p^2 5 the slice values (and with ``exact_gradient`` 3x more)
              + < 16e6 x 20 one batch of 3D points and values (accumulate.MAX_POINTS)
              + 16 B^2 p^2 100   one block of 2D arithmetic (16 / p^2 particles at p > 1)
    + ~150 MB for Python, NumPy and the worker, + up to 256 MB that the tuned allocator
      keeps (:mod:`cryomag.execution.allocator`)

e.g. N = B = 128, c = 1024, p = 1: 34 + 8 + 34 + 134 + 84 + 133 + 26 + 150 MB ~ 0.6 GB
plus the allocator's reserve; measured peak RSS of a LocalCluster worker on 20,000 such
particles: 0.81-0.90 GB at p = 1, 1.2 GB at p = 2.
The driver also holds every chunk's result until the pass is reduced: ~1.3 kB per particle
with the second-order statistics, plus 5 x 8 bytes per band pixel per chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np

log = logging.getLogger("cryomag")

#: Called in the driver with (chunk, result) as each chunk finishes (any order).
ResultCallback = Callable[[Any, Any], None]

#: Arrays at least this large travel once per worker, keyed by their content.
SHARE_MIN_BYTES = 1 << 20


# ------------------------------------------------------------------------------ executors
class Executor(ABC):
    """Applies a function to chunk descriptors and returns the results in chunk order."""

    #: Short label for logs.
    name = "executor"

    def start_in_background(self) -> None:  # noqa: B027 (a hook: no-op by default)
        """Begin starting the workers without waiting for them (no-op where none start).

        Called at the start of a run, so that a cluster comes up while the driver reads the
        particle table and the reference.
        """

    @abstractmethod
    def map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        description: str = "particles",
        progress: bool = True,
        on_result: ResultCallback | None = None,
    ) -> list[Any]:
        """Apply ``fn`` to every chunk.

        Parameters
        ----------
        fn : callable
            ``fn(chunk) -> result``; picklable for distributed executors.
        chunks : sequence
            Chunk descriptors (:class:`cryomag.execution.chunks.Chunk`); ``len(chunk)``
            weights the progress bar (particles).
        description : str
            Label of the progress bar.
        progress : bool
            Show a progress bar with an ETA.
        on_result : callable, optional
            ``on_result(chunk, result)``, called in this process as each chunk finishes.

        Returns
        -------
        list
            ``[fn(c) for c in chunks]``, in the order of ``chunks``.
        """

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


class LocalExecutor(Executor):
    """Run every chunk in this process, one after the other (the synchronous path).

    The pass object is used as it is (no pickling), so its reference keeps the thread count
    it was built with (``EstimateOptions.nthreads``; 0 = all cores).
    """

    name = "local (synchronous)"

    def map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        description: str = "particles",
        progress: bool = True,
        on_result: ResultCallback | None = None,
    ) -> list[Any]:
        from cryomag.execution.local import map_chunks

        return map_chunks(fn, chunks, description, progress, on_result=on_result)


@dataclass
class ExecutorConfig:
    """How and where to run the passes (the command line's execution options).

    Attributes
    ----------
    j : int
        Local worker processes: 0 = one per core, 1 = synchronous in this process (no Dask).
        Ignored with ``scheduler`` or ``cluster``.
    threads : int
        Threads per worker process, which finufft uses (default 1). For ``j == 1`` the
        finufft threads of the synchronous run (0 = all cores).
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``); its workers must have
        cryomag installed and see the particle files at the same paths.
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
        directory).
    local_directory : str, optional
        Scratch folder of the workers.
    interface : str, optional
        Network interface of the scheduler and workers (``ib0``), when the default route is
        not reachable from the compute nodes.
    """

    j: int = 0
    threads: int = 1
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
        if self.threads < 0:
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

    @property
    def synchronous(self) -> bool:
        """True when the passes run in this process."""
        return self.scheduler is None and self.cluster is None and self.j == 1


def usable_cores() -> int:
    """Cores this process may use (CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def make_executor(config: ExecutorConfig | None = None) -> Executor:
    """The executor described by ``config`` (default: a LocalCluster sized to the machine).

    Clusters start on the first :meth:`Executor.map`; call :meth:`Executor.close` (or use the
    executor as a context manager) to stop what was started.
    """
    cfg = config or ExecutorConfig()
    if cfg.synchronous:
        return LocalExecutor()
    from cryomag.execution.dask import DaskExecutor

    if cfg.scheduler is not None:
        return DaskExecutor.connect(cfg.scheduler)
    if cfg.cluster is not None:
        return DaskExecutor.jobqueue(
            cfg.cluster,
            jobs=cfg.jobs,
            cores=cfg.cores,
            processes=cfg.processes,
            memory=cfg.memory,
            queue=cfg.queue,
            account=cfg.account,
            walltime=cfg.walltime,
            python=cfg.python,
            job_extra=cfg.job_extra,
            job_prologue=cfg.job_prologue,
            log_directory=cfg.log_directory,
            local_directory=cfg.local_directory,
            interface=cfg.interface,
        )
    threads = max(cfg.threads, 1)
    workers = cfg.j or max(usable_cores() // threads, 1)
    return DaskExecutor.local(
        n_workers=workers, threads_per_worker=threads, local_directory=cfg.local_directory
    )


@contextlib.contextmanager
def run_executor(
    executor: Executor | ExecutorConfig | None = None,
    checkpoints: str | os.PathLike | None = None,
    resume: bool = False,
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
    """
    if resume and checkpoints is None:
        raise ValueError("resume needs an output folder (the checkpoints live in OUT/.chunks)")
    owned = not isinstance(executor, Executor)
    ex = executor if isinstance(executor, Executor) else None
    if ex is None:
        ex = make_executor(executor) if isinstance(executor, ExecutorConfig) else LocalExecutor()
    try:
        run: Executor = ex
        if checkpoints is not None:
            from cryomag.execution.resume import CheckpointExecutor

            run = CheckpointExecutor(ex, checkpoints, resume=resume)
        yield run
        if checkpoints is not None:
            run.finish()  # type: ignore[attr-defined]
    finally:
        if owned:
            ex.close()


# ------------------------------------------------------------------------------ tokens
_TOKENS: dict[int, tuple[weakref.ref, str]] = {}
_TOKENS_LOCK = threading.Lock()


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.hexdigest()


def _array_token(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return _sha("ndarray", str(a.dtype), str(a.shape), memoryview(a).cast("B"))


def _frame_token(df) -> str:
    import pandas as pd

    hashed = pd.util.hash_pandas_object(df, index=True).to_numpy()
    return _sha(",".join(map(str, df.columns)), hashed.tobytes())


def _content_token(obj: Any) -> str:
    from cryomag.io.mrc import ImageSource
    from cryomag.model.particles import ParticleSet
    from cryomag.physics.projection import MapReference

    if isinstance(obj, np.ndarray):
        return _array_token(obj)
    if isinstance(obj, ParticleSet):
        return _sha(
            "ParticleSet", _frame_token(obj.particles), _frame_token(obj.optics), str(obj.name)
        )
    if isinstance(obj, ImageSource):
        return _sha("ImageSource", content_token(obj.ps), str(obj.max_open))
    vol = getattr(obj, "_value", None)  # the map as evaluated
    if isinstance(obj, MapReference) and isinstance(vol, np.ndarray):
        return _sha("MapReference", repr((obj.box, obj.pixel_size_A, obj.eps)), _array_token(vol))
    return _sha(type(obj).__qualname__, cloudpickle.dumps(obj, protocol=5))


def content_token(obj: Any) -> str:
    """A hex digest of ``obj``'s content (cached per object for the shared types).

    Tables, maps and image sources are hashed once per object (they are read-only during a
    run); arrays are hashed each time (cheap next to a pass).
    """
    if isinstance(obj, np.ndarray):
        return _array_token(obj)
    key = id(obj)
    with _TOKENS_LOCK:
        hit = _TOKENS.get(key)
        if hit is not None and hit[0]() is obj:
            return hit[1]
    try:
        tok = _content_token(obj)
    except Exception:  # unhashable content: a token that matches nothing else
        tok = _sha("unique", os.urandom(16))
    try:
        ref = weakref.ref(obj)
    except TypeError:
        return tok
    with _TOKENS_LOCK:
        _TOKENS[key] = (ref, tok)
        if len(_TOKENS) > 256:
            for k in [k for k, (r, _) in _TOKENS.items() if r() is None]:
                del _TOKENS[k]
    return tok


# ------------------------------------------------------------------------------ payloads
def shared_types() -> tuple[type, ...]:
    """Types whose instances travel once per worker (see the module docstring)."""
    from cryomag.io.mrc import ImageSource
    from cryomag.model.particles import ParticleSet
    from cryomag.physics.projection import MapReference

    return (MapReference, ParticleSet, ImageSource, *SHARED_TYPES)


#: Extra types to ship once per worker (append your own read-only classes).
SHARED_TYPES: list[type] = []

_REFERENCE_FIELDS = {"box", "pixel_size_A", "eps", "nthreads", "nyquist", "_dtype"}
_REFERENCE_ARRAYS = {"_value", "_with_grad"}


def rebuild_reference(volume: np.ndarray, pixel_size_A: float, eps: float, nthreads: int):
    """Rebuild a MapReference from its real volume (the receiving side of shipping)."""
    from cryomag.physics.projection import MapReference

    return MapReference(volume, pixel_size_A, eps=eps, nthreads=nthreads)


class _Pickler(cloudpickle.Pickler):
    """Pickles an object with its shared parts replaced by persistent tokens."""

    def __init__(self, file, top: Any, shared: dict[str, Any], share_arrays: bool) -> None:
        super().__init__(file, protocol=5)
        self._top = top
        self._shared = shared
        self._types = shared_types()
        self._share_arrays = share_arrays

    def persistent_id(self, obj: Any) -> str | None:
        if obj is self._top:
            return None
        if isinstance(obj, self._types) or (
            self._share_arrays
            and type(obj) is np.ndarray
            and obj.nbytes >= SHARE_MIN_BYTES
            and obj.dtype != object
        ):
            tok = content_token(obj)
            self._shared.setdefault(tok, obj)
            return tok
        return None

    def reducer_override(self, obj: Any):
        from cryomag.physics.projection import MapReference

        if (
            type(obj) is MapReference
            and obj is self._top
            and set(vars(obj)) == _REFERENCE_FIELDS | _REFERENCE_ARRAYS
        ):
            vol = np.ascontiguousarray(obj._value.real)
            return rebuild_reference, (vol, obj.pixel_size_A, obj.eps, obj.nthreads)
        return super().reducer_override(obj)


@dataclass
class Blob:
    """An object pickled without its shared parts.

    Attributes
    ----------
    token : str
        Content token of the object (for shared objects) or of ``data`` (for payloads).
    data : bytes
        The pickle, with persistent ids for the shared parts.
    deps : tuple of str
        Tokens of the shared parts it refers to.
    """

    token: str
    data: bytes
    deps: tuple


def _dumps(obj: Any, share_arrays: bool) -> tuple[bytes, dict[str, Any]]:
    buf = io.BytesIO()
    shared: dict[str, Any] = {}
    _Pickler(buf, obj, shared, share_arrays).dump(obj)
    return buf.getvalue(), shared


class Payload:
    """A pass object split into a small pickle and its shared parts.

    Attributes
    ----------
    blob : Blob
        The pass object; ``blob.token`` fingerprints everything the pass computes from
        (shared parts enter through their content tokens).
    direct : dict of str to object
        The shared objects the pass object refers to directly, by token.
    """

    def __init__(self, fn: Any) -> None:
        data, direct = _dumps(fn, share_arrays=True)
        self.blob = Blob(_sha("payload", data), data, tuple(direct))
        self.direct = direct

    @property
    def token(self) -> str:
        """The fingerprint of the pass object (content of all its parts)."""
        return self.blob.token

    def parts(self, known: dict[str, tuple]) -> tuple[list[str], dict[str, Blob]]:
        """The tokens of every shared part (recursively) and blobs for the new ones.

        Parameters
        ----------
        known : dict of str to tuple of str
            Parts already shipped, with the tokens they depend on; they are not pickled
            again.

        Returns
        -------
        tokens : list of str
            Every shared part the pass needs, directly or through other parts.
        new : dict of str to Blob
            Pickles of the parts not in ``known``.
        """
        tokens: list[str] = []
        new: dict[str, Blob] = {}
        stack: list[tuple[str, Any]] = list(self.direct.items())
        while stack:
            tok, obj = stack.pop()
            if tok in tokens:
                continue
            tokens.append(tok)
            if tok in known:
                stack.extend((d, None) for d in known[tok])
                continue
            data, deps = _dumps(obj, share_arrays=False)
            new[tok] = Blob(tok, data, tuple(deps))
            stack.extend(deps.items())
        return tokens, new


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, resolve: Callable[[str], Any]) -> None:
        super().__init__(file)
        self._resolve = resolve

    def persistent_load(self, pid: str) -> Any:
        return self._resolve(pid)


def load_blob(blob: Blob, resolve: Callable[[str], Any]) -> Any:
    """Unpickle ``blob``, taking its shared parts from ``resolve(token)``."""
    return _Unpickler(io.BytesIO(blob.data), resolve).load()


def cryomag_version() -> str:
    """The installed cryomag version (part of checkpoint fingerprints)."""
    try:
        from importlib.metadata import version

        return version("cryomag")
    except Exception:  # pragma: no cover - not installed
        return "unknown"
