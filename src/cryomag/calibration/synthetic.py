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


def simulate_from_model(
    folder,
    n_particles: int = 600,
    box: int = 64,
    declared_pixel_A: float = 1.0,
    true_pixel_A: float = 1.02,
    snr: float = 0.5,
    n_residues: int = 300,
    seed: int = 0,
    progress: bool = False,
    render_eps: float = 1e-6,
    n_workers: int = 0,
):
    """Particles of :func:`synthetic_model` at a known true pixel size, declared wrong.

    The model is centred at the centre voxel of the particles' box at the declared pixel size
    (``(box // 2) * declared_pixel_A`` on each axis: calibrate's default centre). Its
    potential (:func:`cryomag.calibration.density.model_map` at the true pixel size, B-factors
    20-60 A^2) is the specimen of :func:`cryomag.simulation.simulator.simulate_dataset`, whose
    images are taken at ``true_pixel_A`` and declared as ``declared_pixel_A``
    (rlnImagePixelSize; the written defocus is the one measured at the declared size).

    Parameters
    ----------
    folder : path
        Written: ``model.cif`` (the model), ``truth_map.mrc`` and the simulator's
        ``sim/particles.star``, stacks and truth.
    n_particles, box : int
        Particles and their box (px).
    declared_pixel_A, true_pixel_A : float
        Declared and physical pixel sizes (A).
    snr : float
        Signal-to-noise ratio of the images (the simulator's definition).
    n_residues, seed : int
        Of the synthetic model.
    render_eps : float
        finufft tolerance of the image rendering (relative; far below the images' noise).
    n_workers : int
        Rendering processes (0 = one per CPU).

    Returns
    -------
    (Path, Path)
        The particle STAR file and the model file.
    """
    from pathlib import Path

    from cryomag.calibration.density import model_map
    from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
    from cryomag.simulation.phantom import write_mrc_map
    from cryomag.simulation.simulator import simulate_dataset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = (box // 2) * declared_pixel_A
    st = synthetic_model(n_residues=n_residues, radius_A=0.3 * box * declared_pixel_A,
                         centre_A=(c, c, c), seed=seed)  # fmt: skip
    model_path = folder / "model.cif"
    st.setup_entities()
    doc = st.make_mmcif_document()
    doc.write_file(str(model_path))
    truth = folder / "truth_map.mrc"
    write_mrc_map(truth, model_map(st, true_pixel_A, box, (c, c, c)), true_pixel_A)
    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(
            pixel_size_A=declared_pixel_A,
            true_pixel_size_A=true_pixel_A,
            box=box,
            n_particles=n_particles,
            particles_per_micrograph=50,
        )
    ]
    cfg.defocus.min_um = 0.8
    cfg.defocus.max_um = 1.6
    cfg.noise.snr = snr
    cfg.phantom.map_path = str(truth)
    cfg.render.eps = render_eps
    cfg.render.n_workers = n_workers
    simulate_dataset(cfg, folder / "sim", progress=progress)
    return folder / "sim" / "particles.star", model_path
