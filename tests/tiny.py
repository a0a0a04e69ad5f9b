"""A tiny simulated data set (box 32, SNR 1) for tests of plumbing, not of accuracy."""

from __future__ import annotations

from pathlib import Path

from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset


def tiny_dataset(folder: Path, n_particles: int) -> Path:
    """Simulate ``n_particles`` particles of box 32 at 2 A (10 per micrograph) into
    ``folder``; returns it."""
    cfg = SimulationConfig(seed=5)
    cfg.optics_groups = [
        OpticsGroupConfig(
            pixel_size_A=2.0, aniso=None, box=32, n_particles=n_particles,
            particles_per_micrograph=10,
        )
    ]  # fmt: skip
    cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.0
    cfg.noise.snr = 1.0
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 40.0, 300
    cfg.render.n_workers = 1
    simulate_dataset(cfg, folder, progress=False)
    return folder
