"""Per-particle normal systems moved to other parameters: L^T H_n R for every particle n.

The joint fits (:mod:`cryomag.fit.defocus`, :mod:`cryomag.fit.anisomag`) express each
particle's system in the statistics' columns (M's elements, the defocus matrix, the
aberrations) in the parameters they fit, with maps L, R whose entries are nearly always 0
or +-1 (a column picked, two columns added, a sign). ``np.einsum("ia,nij,jb->nab", L, H,
R)`` does this with a product per entry and particle (60 ms for 5,000 particles of 11
columns); :func:`sandwich` adds the picked entries instead, in the order the einsum
accumulates them (i, then j, ascending), so the result is the einsum's bit for bit (adding
+-0 and multiplying by +-1 are exact; tests/fit/test_projection.py).
"""

from __future__ import annotations

import numpy as np

__all__ = ["sandwich"]


def sandwich(left: np.ndarray, h: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left^T h[n] right`` for every n: ``np.einsum("ia,nij,jb->nab", left, h, right)``.

    Parameters
    ----------
    left : ndarray, shape (I, A)
    h : ndarray, shape (N, I, J)
    right : ndarray, shape (J, B)

    Returns
    -------
    ndarray, shape (N, A, B)
        Float64. Where every entry of ``left`` and ``right`` is 0, 1 or -1, formed by
        adding the picked entries of ``h`` (bit-identical to the einsum for finite ``h``);
        otherwise by two matrix products (the einsum's value to rounding, ~1e-15
        relative).
    """
    left = np.asarray(left, float)
    right = np.asarray(right, float)
    h = np.asarray(h)
    if not (_is_signs(left) and _is_signs(right)):
        # two matrix products (the three-operand einsum makes a product per entry of
        # every term: ~10x slower for 5,000 particles of 11 columns mapped to 4)
        return np.matmul(np.matmul(left.T, h), right)
    n = h.shape[0]
    out = np.zeros((n, left.shape[1], right.shape[1]))
    rows = [np.flatnonzero(left[:, a]) for a in range(left.shape[1])]
    cols = [np.flatnonzero(right[:, b]) for b in range(right.shape[1])]
    for a, ia in enumerate(rows):
        for b, jb in enumerate(cols):
            acc = out[:, a, b]
            for i in ia:
                for j in jb:
                    sign = left[i, a] * right[j, b]
                    acc += h[:, i, j] if sign > 0 else -h[:, i, j]
    return out


def _is_signs(m: np.ndarray) -> bool:
    """Whether every entry is 0, 1 or -1."""
    return bool(np.all((m == 0) | (m == 1) | (m == -1)))
