"""unit_sums: the per-unit sums of per-particle arrays, np.add.at's bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from cryomag.fit.unit_sums import unit_sums


def _add_at(values, inv, n):
    out = np.zeros((n, *np.shape(values)[1:]))
    np.add.at(out, inv, values)
    return out


@pytest.mark.parametrize("tail", [(), (3,), (3, 3), (2, 7), (0, 4)])
def test_equals_add_at_bit_for_bit(tail):
    """Values over 16 decades (so that the order of the additions shows in the rounding),
    units in random order, some units without particles, views with strides."""
    rng = np.random.default_rng(len(tail) * 7 + 1)
    n, nu = 3000, 40
    big = rng.normal(size=(n, *tail, 2)) * 10.0 ** rng.integers(-8, 8, size=(n, *tail, 2))
    values = big[..., 0]  # a strided view, as the joint fits' blocks are
    inv = rng.integers(0, nu - 3, size=n)  # the last three units stay empty
    got = unit_sums(values, inv, nu)
    want = _add_at(values, inv, nu)
    assert got.shape == want.shape == (nu, *tail)
    assert got.dtype == np.float64
    assert np.array_equal(got, want)
    assert not got[nu - 3 :].any()


def test_order_matters_and_is_kept():
    """The same numbers in another order round differently; unit_sums keeps add.at's."""
    v = np.array([1e16, 1.0, -1e16, 1.0])
    inv = np.zeros(4, int)
    assert unit_sums(v, inv, 1)[0] == _add_at(v, inv, 1)[0] == 1.0
    assert unit_sums(v[[0, 2, 1, 3]], inv, 1)[0] == 2.0


def test_empty_and_bad_input():
    assert unit_sums(np.zeros((0, 2, 2)), np.zeros(0, int), 3).shape == (3, 2, 2)
    with pytest.raises(ValueError, match="one unit per row"):
        unit_sums(np.zeros((4, 2)), np.zeros(3, int), 2)
