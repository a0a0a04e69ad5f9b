"""cryomag.fit.projection.sandwich against the einsum it replaces: bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from cryomag.fit.defocus import PART_BASIS
from cryomag.fit.projection import sandwich


def _maps(ncol: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The kinds of maps the joint fits use: a pick, two columns added (the CTF's defocus
    term moving with M), signs (the astigmatism basis), a zero column, left != right."""
    pick = np.zeros((ncol, 7))
    pick[0:4, 0:4] = np.eye(4)
    pick[8:11, 4:7] = np.eye(3)
    moves = pick.copy()
    moves[4:8, 0:4] = np.eye(4)
    signs = np.zeros((ncol, 6))
    signs[0:4, 0:4] = np.eye(4)
    signs[8:11, 4:6] = PART_BASIS["astigmatism"]
    right = np.zeros((ncol, 4))
    right[4:8, :] = np.eye(4)
    none = np.zeros((ncol, 2))
    return [(pick, pick), (moves, moves), (signs, signs), (moves, right), (pick, none)]


@pytest.mark.parametrize("case", range(5))
def test_sandwich_is_the_einsum_bit_for_bit(case):
    rng = np.random.default_rng(case)
    ncol = 15
    h = rng.standard_normal((2000, ncol, ncol)) * 10.0 ** rng.uniform(-8, 8, (2000, 1, 1))
    h = h + np.swapaxes(h, 1, 2)
    left, right = _maps(ncol)[case]
    want = np.einsum("ia,nij,jb->nab", left, h, right)
    got = sandwich(left, h, right)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    # a slice of a larger array (the kernel's Gram matrices) too
    big = rng.standard_normal((50, ncol + 2, ncol + 2))
    np.testing.assert_array_equal(
        sandwich(left, big[:, 1:-1, 1:-1], right),
        np.einsum("ia,nij,jb->nab", left, big[:, 1:-1, 1:-1], right),
    )


def test_sandwich_of_other_maps_is_the_einsum_to_rounding():
    rng = np.random.default_rng(9)
    h = rng.standard_normal((30, 5, 5))
    m = rng.standard_normal((5, 3))
    r = rng.standard_normal((5, 2))
    for left, right in ((m, m), (m, r)):
        want = np.einsum("ia,nij,jb->nab", left, h, right)
        got = sandwich(left, h, right)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.abs(want).max())
