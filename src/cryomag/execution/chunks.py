"""Split a particle set into chunks: the unit of work of every pass over the images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """A descriptor of work: particle rows of one optics group (never image arrays).

    Attributes
    ----------
    group : int
        0-based optics-group row.
    rows : tuple of int
        Particle row indices (0-based, into the particle table), sorted.
    index : int
        Position of the chunk in the run (fixed order for reductions).
    """

    group: int
    rows: tuple
    index: int

    def __len__(self) -> int:
        return len(self.rows)


def make_chunks(group_index: np.ndarray, chunk_size: int) -> list[Chunk]:
    """Chunks of at most ``chunk_size`` particles, each within one optics group.

    Parameters
    ----------
    group_index : ndarray, shape (N,)
        0-based optics-group row of each particle.
    chunk_size : int
        Maximum particles per chunk; memory per chunk grows linearly with it. A group is
        split into equal chunks (sizes differ by at most one), so that the last one does
        not leave the other workers idle.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    chunks: list[Chunk] = []
    for g in np.unique(group_index):
        rows = np.flatnonzero(group_index == g)
        for part in np.array_split(rows, -(-len(rows) // chunk_size)):
            chunks.append(Chunk(int(g), tuple(int(r) for r in part), len(chunks)))
    return chunks
