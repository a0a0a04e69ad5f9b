"""Run a function over chunks in this process, with a progress bar."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cryomag.execution.allocator import keep_block_arrays_on_heap
from cryomag.execution.base import Executor, ResultCallback

__all__ = ["LineProgress", "LocalExecutor", "map_chunks", "progress_bar"]

#: Seconds between the progress lines of a log (``CRYOMAG_PROGRESS_INTERVAL`` overrides).
PROGRESS_INTERVAL_S = 30.0


def progress_bar(disable: bool = False) -> Progress | LineProgress:
    """The progress display used by every long command.

    On a terminal: a rich progress bar (removed when done). When output is plain (stdout not
    a terminal, ``--plain``, ``CRYOMAG_PLAIN=1``; :func:`cryomag._plain.is_plain`):
    :class:`LineProgress`, periodic lines on stderr that read well in a log. Both offer
    ``add_task``, ``advance`` and ``update`` and are context managers.
    """
    from cryomag._plain import is_plain

    if not disable and is_plain():
        return LineProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=disable,
        transient=True,
    )


class LineProgress:
    """Progress as lines for logs: ``[HH:MM:SS] label: done/total (pct %), elapsed, left``.

    A line is written when a task starts, at most every ``interval`` seconds while it runs
    (default :data:`PROGRESS_INTERVAL_S`, or ``CRYOMAG_PROGRESS_INTERVAL``), and when it
    completes; to ``stream`` (default stderr), flushed at once.

    Parameters
    ----------
    interval : float, optional
        Seconds between lines of a running task.
    stream : file, optional
        Where the lines go.
    """

    def __init__(self, interval: float | None = None, stream=None) -> None:
        if interval is None:
            try:
                interval = float(os.environ.get("CRYOMAG_PROGRESS_INTERVAL", PROGRESS_INTERVAL_S))
            except ValueError:
                interval = PROGRESS_INTERVAL_S
        self.interval = max(0.0, interval)
        self.stream = stream
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def start(self) -> None:
        """Nothing to start (as :meth:`rich.progress.Progress.start`)."""

    def stop(self) -> None:
        """Nothing to stop (as :meth:`rich.progress.Progress.stop`)."""

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        """Start a task; returns its id."""
        tid = len(self._tasks)
        now = time.monotonic()
        self._tasks[tid] = {"label": description, "total": total, "done": 0.0, "t0": now,
                            "last": now, "finished": False}  # fmt: skip
        self._line(tid, f"started ({total:.0f} in all)" if total else "started")
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        """Add ``advance`` units of work done."""
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float = 0, completed: float | None = None,
               total: float | None = None, description: str | None = None,
               **_: Any) -> None:  # fmt: skip
        """Change a task (as :meth:`rich.progress.Progress.update`)."""
        t = self._tasks[task_id]
        if description is not None:
            t["label"] = description
        if total is not None:
            t["total"] = total
        t["done"] = (completed if completed is not None else t["done"]) + advance
        now = time.monotonic()
        done = t["total"] is not None and t["done"] >= t["total"]
        if done and not t["finished"]:
            t["finished"] = True
            self._line(task_id)
        elif not done and now - t["last"] >= self.interval:
            self._line(task_id)

    def _line(self, task_id: int, note: str | None = None) -> None:
        t = self._tasks[task_id]
        now = time.monotonic()
        t["last"] = now
        elapsed = now - t["t0"]
        total, done = t["total"], t["done"]
        text = f"[{time.strftime('%H:%M:%S')}] {t['label']}: "
        if note:
            text += note
        elif total:
            frac = min(done / total, 1.0)
            text += f"{done:.0f}/{total:.0f} ({100 * frac:.1f} %), {_duration(elapsed)}"
            if frac >= 1.0:
                text += " (done)"
            elif frac > 0:
                text += f", about {_duration(elapsed * (1 - frac) / frac)} left"
        else:
            text += f"{done:.0f} done, {_duration(elapsed)}"
        stream = self.stream or sys.stderr
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed stream: progress is never worth a crash
            pass


def _duration(seconds: float) -> str:
    """``12 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def map_chunks(
    fn: Callable[[Any], Any],
    chunks: Sequence[Any],
    description: str = "particles",
    progress: bool = True,
    weight: Callable[[Any], int] = len,
    on_result: Callable[[Any, Any], None] | None = None,
    collect: bool = True,
) -> list[Any] | None:
    """Apply ``fn`` to each chunk in order and return the results in chunk order.

    ``on_result(chunk, result)`` is called after each chunk (e.g. to store a checkpoint);
    with ``collect=False`` the results are not kept and None is returned.
    """
    results: list[Any] = []
    total = sum(weight(c) for c in chunks)
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=total)
        for c in chunks:
            res = fn(c)
            if on_result is not None:
                on_result(c, res)
            if collect:
                results.append(res)
            del res
            bar.advance(task, weight(c))
    return results if collect else None


class LocalExecutor(Executor):
    """Run every chunk in this process, one after the other (the synchronous path).

    The function is used as it is (no pickling), so the objects it refers to keep the thread
    counts they were built with.
    """

    name = "local (synchronous)"

    def map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[Any],
        description: str = "particles",
        progress: bool = True,
        on_result: ResultCallback | None = None,
        collect: bool = True,
    ) -> list[Any] | None:
        keep_block_arrays_on_heap()
        return map_chunks(fn, chunks, description, progress, on_result=on_result, collect=collect)
