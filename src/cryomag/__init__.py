"""cryomag: per-particle contrast scale and magnification for cryo-EM single-particle analysis.

The public API (each name is imported on first use, so ``import cryomag`` stays fast):

=====================  ===============================================================
``estimate``           scales, per-group M and local models from particles and a map
                       (:func:`cryomag.workflows.estimate.estimate`)
``refit``              the local models again from a run's stored statistics
                       (:func:`cryomag.workflows.refit.refit`)
``apply``              resampled stacks, optics groups per micrograph / bin, per-particle
                       cryoSPARC anisomag (:func:`cryomag.workflows.apply.apply`)
``merge``              merge data sets of different pixel sizes
                       (:func:`cryomag.workflows.merge.merge`)
``reconstruct``        half maps, map and FSC honouring M and scales
                       (:func:`cryomag.workflows.reconstruct.reconstruct`)
``simulate``           a ground-truth data set
                       (:func:`cryomag.simulation.simulator.simulate_dataset`)
``SimulationConfig``   its settings (:class:`cryomag.simulation.config.SimulationConfig`)
``read_particles``     a STAR or .cs file as a ParticleSet (:func:`cryomag.io.read_particles`)
``ParticleSet``        particles and optics groups (:class:`cryomag.model.particles.ParticleSet`)
=====================  ===============================================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ParticleSet",
    "SimulationConfig",
    "apply",
    "estimate",
    "merge",
    "read_particles",
    "reconstruct",
    "refit",
    "simulate",
]

_WHERE = {
    "estimate": ("cryomag.workflows.estimate", "estimate"),
    "refit": ("cryomag.workflows.refit", "refit"),
    "apply": ("cryomag.workflows.apply", "apply"),
    "merge": ("cryomag.workflows.merge", "merge"),
    "reconstruct": ("cryomag.workflows.reconstruct", "reconstruct"),
    "simulate": ("cryomag.simulation.simulator", "simulate_dataset"),
    "SimulationConfig": ("cryomag.simulation.config", "SimulationConfig"),
    "read_particles": ("cryomag.io", "read_particles"),
    "ParticleSet": ("cryomag.model.particles", "ParticleSet"),
}

if TYPE_CHECKING:  # pragma: no cover
    from cryomag.io import read_particles
    from cryomag.model.particles import ParticleSet
    from cryomag.simulation.config import SimulationConfig
    from cryomag.simulation.simulator import simulate_dataset as simulate
    from cryomag.workflows.apply import apply
    from cryomag.workflows.estimate import estimate
    from cryomag.workflows.merge import merge
    from cryomag.workflows.reconstruct import reconstruct
    from cryomag.workflows.refit import refit


def __getattr__(name: str) -> Any:
    try:
        module, attr = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'cryomag' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
