"""Run a function over chunks in this process, with a progress bar (see also executor.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


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
) -> list[Any]:
    """Apply ``fn`` to each chunk in order and return the results in chunk order.

    ``on_result(chunk, result)`` is called after each chunk (e.g. to store a checkpoint).
    """
    results = []
    total = sum(weight(c) for c in chunks)
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=total)
        for c in chunks:
            res = fn(c)
            if on_result is not None:
                on_result(c, res)
            results.append(res)
            bar.advance(task, weight(c))
    return results
