"""A synthetic protein-like atomic model (for tests, benchmarks and the calibration demo).

A random chain of residues confined to a sphere: consecutive C-alpha atoms 3.8 A apart (a
self-avoiding random walk kept inside the sphere), each residue with backbone N, C, O and a
C-beta at roughly their distances from its C-alpha, one residue in twenty a methionine-like
sulphur. B-factors grow from the core to the surface, as in real proteins. It is not a
protein, but its potential has the density, composition and spectrum of one.
"""

from __future__ import annotations

import numpy as np

__all__ = ["synthetic_model"]

_SIDE = (("N", "N", 1.46), ("C", "C", 1.52), ("O", "O", 2.40), ("CB", "C", 1.53))


def synthetic_model(
    n_residues: int = 300,
    radius_A: float = 22.0,
    centre_A=(0.0, 0.0, 0.0),
    b_core: float = 20.0,
    b_surface: float = 60.0,
    seed: int = 0,
):
    """A gemmi structure of ``n_residues`` residues (about 5 atoms each) in a sphere.

    Parameters
    ----------
    n_residues : int
        Residues (C-alpha atoms).
    radius_A : float
        Radius of the sphere holding the C-alpha atoms (A).
    centre_A : (float, float, float)
        Centre of the sphere in the model's coordinates (A).
    b_core, b_surface : float
        B-factors (A^2) at the centre and at ``radius_A``, linear in between.
    seed : int
        Random seed.

    Returns
    -------
    gemmi.Structure
        One model, one chain "A", residues "ALA" (or "MET" with an SD atom).
    """
    import gemmi

    rng = np.random.default_rng(seed)
    c = np.asarray(centre_A, float)
    ca = np.zeros((n_residues, 3))
    pos = rng.normal(0, radius_A / 4, 3)
    for i in range(n_residues):
        for _ in range(200):
            step = rng.normal(size=3)
            step *= 3.8 / np.linalg.norm(step)
            new = pos + step
            if np.linalg.norm(new) > radius_A:
                continue
            if i > 1 and np.min(np.linalg.norm(ca[: i - 1] - new, axis=1)) < 3.6:
                continue
            pos = new
            break
        else:  # crowded: accept a step toward the centre
            pos = pos - 3.8 * pos / max(np.linalg.norm(pos), 1e-9)
        ca[i] = pos
    st = gemmi.Structure()
    st.name = "synthetic"
    model = gemmi.Model(1)
    chain = gemmi.Chain("A")

    def atom(name: str, element: str, xyz, b: float) -> gemmi.Atom:
        a = gemmi.Atom()
        a.name = name
        a.element = gemmi.Element(element)
        a.pos = gemmi.Position(*(xyz + c))
        a.b_iso = float(b)
        a.occ = 1.0
        return a

    for i in range(n_residues):
        b = b_core + (b_surface - b_core) * min(np.linalg.norm(ca[i]) / radius_A, 1.0)
        met = i % 20 == 7
        res = gemmi.Residue()
        res.name = "MET" if met else "ALA"
        res.seqid = gemmi.SeqId(i + 1, " ")
        res.add_atom(atom("CA", "C", ca[i], b))
        for name, el, d in _SIDE:
            v = rng.normal(size=3)
            res.add_atom(atom(name, el, ca[i] + d * v / np.linalg.norm(v), b))
        if met:
            v = rng.normal(size=3)
            res.add_atom(atom("SD", "S", ca[i] + 2.8 * v / np.linalg.norm(v), b))
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    return st
