"""Passes over the images in local worker processes (the command line's default on Linux).

:class:`ProcessExecutor` keeps ``n`` worker processes, each joined to the driver by one
pipe. Started by :meth:`~ProcessExecutor.start_in_background` -- at the start of a run,
before the driver has read its inputs, run numerical code or started threads of its own --
the workers are forked from the driver: they start in milliseconds with its imports. Started
later, or replacing a worker that died, they are spawned (a fresh interpreter: forking a
process whose OpenMP or BLAS threads have run is not safe).

Each pass function travels as a :class:`~cryomag.execution.payload.Payload`: its shared
parts (for ``cryomag estimate``: the particle table, the image source, the reference) go to
each worker once per executor and are built once per worker process
(:mod:`cryomag.execution.worker`); per pass a small pickle, per chunk its descriptor. A
worker runs one chunk at a time; the results are returned in chunk order (or handed one by
one to ``on_result``), so the numbers are those of the synchronous run and of any number of
workers.

Against the Dask LocalCluster that ran here before (and still runs where ``fork`` is not
available; ``--scheduler`` and ``--cluster`` use Dask): no scheduler, nanny or event-loop
threads beside the kernels on the same cores, no import of ``distributed`` (0.5 s) and no
cluster start (0.15 s). The default fit on 2 cores (box 128; medians, the same numbers bit
for bit): 5,000 particles 10.6 s instead of 12.2 s, 20,000 33.6 s instead of 35.7 s, the
workers' peak memory 537 MB instead of 610 (bench/RESULTS.md, issue 14).

Failures: an exception in a chunk is raised in the driver, of its type, with the worker's
traceback as a note; the workers stay usable. A worker that dies (killed, out of memory, a
crash in native code) is replaced and its chunk rerun, up to :data:`MAX_TRIES` runs per
chunk; then the map fails naming the chunk and how the worker ended. Workers end with
:meth:`~ProcessExecutor.close`, when the driver exits, and on Linux also when the driver is
killed (a parent-death signal).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

import cloudpickle

from cryomag.execution.allocator import keep_block_arrays_on_heap
from cryomag.execution.base import Executor, ResultCallback
from cryomag.execution.payload import Blob, Payload
from cryomag.execution.worker import limit_blas_threads, materialize

__all__ = ["MAX_TRIES", "ProcessExecutor", "fork_available"]

log = logging.getLogger("cryomag")

#: Runs of one chunk before a map gives up on it: a chunk whose worker died this many times
#: (as Dask's default ``distributed.scheduler.allowed-failures`` + 1).
MAX_TRIES = 4

#: Signals held back while the workers are forked (see :meth:`ProcessExecutor.start_in_background`).
_START_SIGNALS = {signal.SIGINT, signal.SIGTERM}

_PR_SET_PDEATHSIG = 1


def fork_available() -> bool:
    """Whether workers can be forked here (Linux; macOS's fork is unsafe with its system
    frameworks, Windows has none)."""
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


# ----------------------------------------------------------------------- worker side
def _exit_with_parent(parent: int, arm: bool) -> None:
    """On Linux (``arm``): SIGTERM to this process when the driver ends, even by SIGKILL.

    The signal follows the thread that started the worker: armed only for workers started
    by the driver's main thread, which lives as long as the driver."""
    if arm and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the driver ended before the signal was armed
        os._exit(0)


def _describe(exc: BaseException) -> tuple[BaseException | None, str, str, str]:
    """An exception as it travels back: itself (None if it does not pickle), its type's name,
    its message and the worker's traceback."""
    tb = "".join(traceback.format_exception(exc))
    try:
        back = pickle.loads(pickle.dumps(exc))
    except Exception:
        back = None
    return back, type(exc).__qualname__, str(exc), tb


def _worker_main(conn, threads: int, preload: tuple[str, ...], parent: int, arm: bool,
                 inherited: Sequence = ()) -> None:  # fmt: skip
    """A worker's life: run what the driver sends over ``conn`` until "stop" or its end.

    Messages in: ("parts", [Blob]) (keep), ("forget", [token]) (drop those blobs),
    ("run", task, (token, chunk)), ("call", task, pickled function), ("stop",). Out, for each
    run or call: ("ok", task, result) or ("error", task, exception or None, type name,
    message, traceback). ``inherited``: the driver's ends of the pipes, which a forked worker
    holds copies of (closed here, so that a pipe ends when the driver's end does).
    """
    # Ctrl-C reaches the driver, which ends the workers; SIGTERM ends a worker (a forked one
    # would otherwise keep the command line's handler, an interruption of its main thread)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _START_SIGNALS)
    for c in inherited:
        with contextlib.suppress(OSError):
            c.close()
    _exit_with_parent(parent, arm)
    keep_block_arrays_on_heap()
    limit_blas_threads()
    for name in preload:
        importlib.import_module(name)
    blobs: dict[str, Blob] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "parts":
            blobs.update((b.token, b) for b in msg[1])
            continue
        if kind == "forget":
            for token in msg[1]:
                blobs.pop(token, None)
            continue
        _, task, body = msg
        try:
            if kind == "run":
                token, chunk = body
                reply: tuple = ("ok", task, materialize(token, blobs, threads)(chunk))
            else:
                reply = ("ok", task, cloudpickle.loads(body)())
        except BaseException as exc:
            reply = ("error", task, *_describe(exc))
        try:
            conn.send(reply)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return
        except Exception as exc:  # the result does not pickle (nothing was sent)
            conn.send(("error", task, *_describe(exc)))
        del reply


# ----------------------------------------------------------------------- driver side
class _Worker:
    """The driver's handle on one worker process."""

    def __init__(self, proc, conn, how: str) -> None:
        self.proc = proc
        self.conn = conn
        self.how = how
        #: tokens of the blobs this worker holds
        self.have: set[str] = set()
        #: the task in flight (its id), None when idle
        self.task: int | None = None

    def ended(self) -> str:
        """How the process ended, for messages."""
        self.proc.join(timeout=1.0)
        code = self.proc.exitcode
        if code is None:
            return "its pipe closed"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        return f"exit code {code}"


class _Died(Exception):
    """A worker's pipe ended."""


def _remote_error(exc, type_name: str, message: str, tb: str) -> BaseException:
    """The exception to raise in the driver for a chunk's error."""
    if exc is None:
        exc = RuntimeError(f"{type_name}: {message}")
    with contextlib.suppress(Exception):
        exc.add_note(f"raised in a worker process:\n{tb.rstrip()}")
    return exc


class ProcessExecutor(Executor):
    """Run the chunks of each pass in ``n_workers`` local processes (see the module).

    Parameters
    ----------
    n_workers : int
        Worker processes.
    threads_per_worker : int
        Threads each worker's numerical libraries use (shared parts learn it through
        ``__cryomag_on_worker__``).
    preload : sequence of str
        Modules a spawned worker imports as it starts (a forked one has the driver's).
    fork : bool, optional
        Fork the workers when :meth:`start_in_background` starts them (default: where
        :func:`fork_available`); False: always spawn.
    """

    def __init__(self, n_workers: int, threads_per_worker: int = 1,
                 preload: Sequence[str] = (), fork: bool | None = None) -> None:  # fmt: skip
        self.n_workers = max(int(n_workers), 1)
        self.threads = max(int(threads_per_worker), 1)
        self.preload = tuple(preload)
        self.fork = fork_available() if fork is None else bool(fork) and fork_available()
        self.name = f"local workers ({self.n_workers} processes x {self.threads} threads)"
        self._workers: list[_Worker] = []
        #: shared parts pickled so far (token -> blob), for workers that join later
        self._blobs: dict[str, Blob] = {}
        self._tasks = itertools.count()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ workers
    def _start_one(self, method: str) -> _Worker:
        ctx = mp.get_context(method)
        ours, theirs = ctx.Pipe(duplex=True)
        inherited = [w.conn for w in self._workers] + [ours] if method == "fork" else []
        proc = ctx.Process(
            target=_worker_main,
            args=(theirs, self.threads, self.preload if method != "fork" else (), os.getpid(),
                  threading.current_thread() is threading.main_thread(), inherited),
            name="cryomag-worker",
            daemon=True,  # ended by multiprocessing when the driver exits
        )  # fmt: skip
        proc.start()
        theirs.close()
        return _Worker(proc, ours, "forked" if method == "fork" else "spawned")

    def start_in_background(self) -> None:
        """Start the workers now: forked (see the module), else spawned (they import while
        the driver reads its inputs)."""
        with self._lock:
            if self._workers:
                return
            main = threading.current_thread() is threading.main_thread()
            if self.fork and main:
                # Ctrl-C / SIGTERM wait the few ms until every worker exists (close() then
                # ends them all); each worker unblocks them for itself
                old = signal.pthread_sigmask(signal.SIG_BLOCK, _START_SIGNALS)
                try:
                    for _ in range(self.n_workers):
                        self._workers.append(self._start_one("fork"))
                    return
                except Exception as exc:
                    log.warning("forked workers did not start (%s): spawning them", exc)
                    self._stop(self._workers)
                    self._workers = []
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
            for _ in range(self.n_workers):
                self._workers.append(self._start_one("spawn"))

    def _replace(self, w: _Worker) -> None:
        """A spawned worker in place of ``w``, which ended."""
        with contextlib.suppress(OSError):
            w.conn.close()
        if w.proc.is_alive():  # its pipe ended first
            w.proc.kill()
        w.proc.join(timeout=1.0)
        self._workers[self._workers.index(w)] = self._start_one("spawn")

    def describe(self) -> str:
        """Where the work runs."""
        how = sorted({w.how for w in self._workers})
        return self.name + (f", {' and '.join(how)}" if how else "")

    # ------------------------------------------------------------------ messages
    def _send(self, w: _Worker, msg: tuple) -> None:
        try:
            w.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as exc:
            raise _Died from exc

    def _receive(self, w: _Worker) -> tuple:
        try:
            return w.conn.recv()
        except (EOFError, ConnectionResetError, OSError) as exc:
            raise _Died from exc

    def _wait_any(self, busy: list[_Worker]) -> list[_Worker]:
        """The busy workers with a reply waiting or whose process ended."""
        ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
        return [w for w in busy if w.conn in ready or w.proc.sentinel in ready]

    def _ship(self, w: _Worker, tokens: Sequence[str], extra: Blob | None = None) -> None:
        """Send ``w`` the blobs of ``tokens`` (and ``extra``) it does not hold yet."""
        blobs = [self._blobs[t] for t in tokens if t not in w.have]
        if extra is not None and extra.token not in w.have:
            blobs.append(extra)
        if blobs:
            self._send(w, ("parts", blobs))
            w.have.update(b.token for b in blobs)

    # ------------------------------------------------------------------ use
    def map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        description: str = "particles",
        progress: bool = True,
        on_result: ResultCallback | None = None,
        collect: bool = True,
    ) -> list[Any] | None:
        """Run ``fn`` on every chunk in the worker processes; results in chunk order."""
        from cryomag.execution.local import progress_bar

        chunks = list(chunks)
        if not chunks:
            return [] if collect else None
        self.start_in_background()
        payload = Payload(fn)
        tokens, new = payload.parts({t: b.deps for t, b in self._blobs.items()})
        self._blobs.update(new)
        n = len(chunks)
        results: list[Any] = [None] * n
        tries = [0] * n
        pending = deque(range(n))
        running: dict[int, int] = {}  # task id -> chunk index (this map's tasks)
        left = n
        try:
            with progress_bar(disable=not progress) as bar:
                bar_task = bar.add_task(description, total=sum(len(c) for c in chunks))
                while left:
                    for w in list(self._workers):
                        if w.task is None and pending:
                            i = pending.popleft()
                            try:
                                self._ship(w, tokens, payload.blob)
                                task = next(self._tasks)
                                self._send(w, ("run", task, (payload.token, chunks[i])))
                            except _Died:
                                # the worker had ended: the chunk goes back (counted as a run,
                                # so that workers that cannot start end the map)
                                task = next(self._tasks)
                                running[task] = i
                                self._lost(w, task, chunks, running, tries, pending)
                                continue
                            w.task, running[task] = task, i
                    busy = [w for w in self._workers if w.task is not None]
                    if not busy:  # every chunk went back to pending: send them again
                        continue
                    for w in self._wait_any(busy):
                        try:
                            if not w.conn.poll():  # the process ended with nothing sent
                                raise _Died
                            msg = self._receive(w)
                        except _Died:
                            self._lost(w, w.task, chunks, running, tries, pending)
                            continue
                        w.task = None
                        i = running.pop(msg[1], None)
                        if i is None:  # a reply to an earlier map that ended in an error
                            continue
                        if msg[0] == "error":
                            raise _remote_error(*msg[2:])
                        left -= 1
                        if collect:
                            results[i] = msg[2]
                        if on_result is not None:
                            on_result(chunks[i], msg[2])
                        del msg
                        bar.advance(bar_task, len(chunks[i]))
        finally:
            # the pass's pickle is not needed again (the shared parts stay)
            for w in self._workers:
                if payload.token in w.have:
                    w.have.discard(payload.token)
                    with contextlib.suppress(_Died):
                        self._send(w, ("forget", [payload.token]))
        return results if collect else None

    def _lost(self, w: _Worker, task: int | None, chunks, running, tries, pending) -> None:
        """``w`` ended: replace it and run its chunk again, or give up on that chunk."""
        how = w.ended()
        i = running.pop(task, None) if task is not None else None
        self._replace(w)
        if i is None:
            log.warning("a worker process ended (%s); a new one replaces it", how)
            return
        tries[i] += 1
        label = getattr(chunks[i], "index", i)
        if tries[i] >= MAX_TRIES:
            raise RuntimeError(
                f"chunk {label}: its worker process ended {tries[i]} times (last: {how}); "
                "if it ran out of memory, use fewer worker processes (--j) or a smaller "
                "--chunk-size"
            )
        log.warning("a worker process ended (%s) while running chunk %s: running it again",
                    how, label)  # fmt: skip
        pending.appendleft(i)

    def run_on_workers(self, fn: Callable[[], Any]) -> dict[int, Any]:
        """``fn()`` in every worker process (between passes), by process id."""
        self.start_in_background()
        body = cloudpickle.dumps(fn)
        out = {}
        for w in list(self._workers):
            while w.task is not None:  # a reply to an earlier map that ended in an error
                self._receive(w)
                w.task = None
            task = next(self._tasks)
            self._send(w, ("call", task, body))
            msg = self._receive(w)
            if msg[0] == "error":
                raise _remote_error(*msg[2:])
            out[w.proc.pid] = msg[2]
        return out

    # ------------------------------------------------------------------ end
    @staticmethod
    def _stop(workers: list[_Worker]) -> None:
        """End ``workers``: idle ones are asked to stop, busy ones terminated (SIGTERM);
        any still alive after 5 s are killed."""
        for w in workers:
            if w.task is None and w.proc.is_alive():
                try:
                    w.conn.send(("stop",))
                    continue
                except Exception:
                    pass
            with contextlib.suppress(Exception):
                w.proc.terminate()
        for w in workers:
            w.proc.join(timeout=5.0)
            if w.proc.is_alive():  # pragma: no cover - SIGTERM ends a worker
                w.proc.kill()
                w.proc.join(timeout=5.0)
            with contextlib.suppress(OSError):
                w.conn.close()

    def close(self) -> None:
        """End the worker processes (safe to call twice, also after Ctrl-C or an error)."""
        with self._lock:
            workers, self._workers = self._workers, []
            self._blobs.clear()
        self._stop(workers)
