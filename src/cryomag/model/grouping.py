"""New optics groups from a column or from the micrograph names (beam-shift groups).

Data collected with aberration-free image shift have a beam tilt (and coma) per beam-shift
position; users then fit the aberrations per position, as new optics groups. Two ways to
say which particles belong together:

- ``column:NAME``: the value of a particle column (e.g. ``column:rlnBeamShiftGroup`` or any
  label an earlier step wrote);
- ``pattern:REGEX``: a regular expression searched in each particle's micrograph name, its
  first capture group (or, without one, the whole match) naming the group, e.g.
  ``pattern:_(\\d+)_Data`` for EPU names or ``pattern:FoilHole_(\\d+)``.

Within each existing optics group, every distinct value becomes a new optics group named
``<old name>_<value>``, a copy of the old group's optics row (pixel size, voltage, M,
aberrations), numbered 1..G in order of first appearance.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from cryomag.model.particles import ParticleDataError, ParticleSet

__all__ = ["regroup_by"]


def _labels(ps: ParticleSet, spec: str) -> np.ndarray:
    kind, _, arg = spec.partition(":")
    if kind == "column" and arg:
        if arg not in ps.particles.columns:
            raise ParticleDataError(
                f"{ps.name}: no particle column {arg} to group by (--regroup {spec}); "
                f"columns: {', '.join(map(str, ps.particles.columns))}"
            )
        return ps.particles[arg].astype(str).to_numpy()
    if kind == "pattern" and arg:
        try:
            rx = re.compile(arg)
        except re.error as exc:
            raise ValueError(f"--regroup {spec}: not a regular expression ({exc})") from None
        names = ps.micrographs()
        out = np.empty(len(names), dtype=object)
        for i, name in enumerate(names):
            m = rx.search(str(name))
            if m is None:
                raise ParticleDataError(
                    f"{ps.name}: particle row {i + 1}: micrograph name {name!r} does not match "
                    f"--regroup pattern {arg!r}"
                )
            out[i] = m.group(1) if rx.groups else m.group(0)
        return out
    raise ValueError(
        f"--regroup {spec!r}: expected column:NAME (a particle column) or pattern:REGEX (a "
        "regular expression on the micrograph names)"
    )


def regroup_by(ps: ParticleSet, spec: str) -> ParticleSet:
    """A new set with one optics group per (old group, value of ``spec``); see the module.

    Parameters
    ----------
    ps : ParticleSet
    spec : str
        ``column:NAME`` or ``pattern:REGEX``.

    Returns
    -------
    ParticleSet
        The particles in their new groups (the input is not changed).
    """
    labels = _labels(ps, spec)
    gidx = ps.group_index()
    key, uniques = pd.factorize(pd.Series(list(zip(gidx, labels, strict=True))))
    suffixes = [str(u[1]) for u in uniques]
    return ps.regroup(np.asarray(key), suffixes)
