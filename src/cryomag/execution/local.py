"""Run a function over chunks in this process, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cryomag.execution.allocator import keep_block_arrays_on_heap
from cryomag.execution.base import Executor, ResultCallback

__all__ = ["LocalExecutor", "map_chunks", "progress_bar"]


def progress_bar(disable: bool = False) -> Progress:
    """The progress bar used by every long command."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=disable,
        transient=True,
    )


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
