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


def make_chunks(
    group_index: np.ndarray, chunk_size: int, balance: int = 4, min_chunk: int = 128
) -> list[Chunk]:
    """Chunks of at most ``chunk_size`` particles, each within one optics group.

    Parameters
    ----------
    group_index : ndarray, shape (N,)
        0-based optics-group row of each particle.
    chunk_size : int
        Maximum particles per chunk; memory per chunk grows linearly with it.
    balance : int
        A group is split into equal chunks (sizes differ by at most one), and their number
        is rounded up to a multiple of ``balance`` (else of 2) when the chunks keep at least
        ``min_chunk`` particles: 1, 2 or ``balance`` workers then finish a pass together
        instead of one worker computing the last chunk alone (5,000 particles in chunks of
        1,024 on 2 workers: 8 chunks, 4 rounds of 625, not 5 chunks, 3 rounds of 1,000).
        The layout depends only on the particle set and these numbers, never on the
        executor, so results do not depend on where they were computed.
    min_chunk : int
        See ``balance``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    chunks: list[Chunk] = []
    for g in np.unique(group_index):
        rows = np.flatnonzero(group_index == g)
        n_chunks = -(-len(rows) // chunk_size)
        for multiple in (max(int(balance), 1), 2):
            rounded = -(-n_chunks // multiple) * multiple
            if len(rows) // rounded >= min_chunk:
                n_chunks = rounded
                break
        for part in np.array_split(rows, n_chunks):
            chunks.append(Chunk(int(g), tuple(int(r) for r in part), len(chunks)))
    return chunks
