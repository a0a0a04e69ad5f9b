"""Benchmark: time ``starfile.write`` against ``cryomag.io.write_star`` on synthetic particles.

Run: ``python bench/bench_star_write.py [--sizes 100000 1000000] [--repeats 3]``. Prints the
median wall time of each writer per size and the ratio starfile / cryomag. Files go to a
temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryomag.io import read_star, write_star
from cryomag.model.particles import ParticleSet, SourceInfo


def synthetic_set(n: int, seed: int = 0) -> ParticleSet:
    """A RELION-like particle set of ``n`` rows (25 columns) and one optics group."""
    rng = np.random.default_rng(seed)
    mic = rng.integers(0, max(1, n // 300), n)
    parts = pd.DataFrame(
        {
            "rlnCoordinateX": np.round(rng.uniform(0, 4096, n), 6),
            "rlnCoordinateY": np.round(rng.uniform(0, 4096, n), 6),
            "rlnImageName": pd.Series(np.arange(n) % 300 + 1).map("{:06d}".format).to_numpy()
            + "@Extract/job012/Movies/mic_"
            + pd.Series(mic).astype(str).to_numpy()
            + ".mrcs",
            "rlnMicrographName": "MotionCorr/job002/Movies/mic_"
            + pd.Series(mic).astype(str).to_numpy()
            + ".mrc",
            "rlnOpticsGroup": np.ones(n, dtype=int),
            "rlnDefocusU": np.round(rng.uniform(5000, 30000, n), 6),
            "rlnDefocusV": np.round(rng.uniform(5000, 30000, n), 6),
            "rlnDefocusAngle": np.round(rng.uniform(-180, 180, n), 6),
            "rlnCtfBfactor": np.zeros(n),
            "rlnCtfScalefactor": np.ones(n),
            "rlnPhaseShift": np.zeros(n),
            "rlnAngleRot": np.round(rng.uniform(-180, 180, n), 6),
            "rlnAngleTilt": np.round(rng.uniform(0, 180, n), 6),
            "rlnAnglePsi": np.round(rng.uniform(-180, 180, n), 6),
            "rlnOriginXAngst": np.round(rng.normal(0, 5, n), 6),
            "rlnOriginYAngst": np.round(rng.normal(0, 5, n), 6),
            "rlnClassNumber": np.ones(n, dtype=int),
            "rlnNormCorrection": rng.uniform(0.8, 1.2, n),  # full precision floats
            "rlnLogLikeliContribution": rng.normal(2.5e5, 1e3, n),
            "rlnMaxValueProbDistribution": np.round(rng.uniform(0, 1, n), 6),
            "rlnNrOfSignificantSamples": rng.integers(1, 500, n),
            "rlnRandomSubset": rng.integers(1, 3, n),
            "rlnGroupNumber": mic + 1,
            "rlnCtfMaxResolution": np.round(rng.uniform(3, 8, n), 6),
            "rlnCtfFigureOfMerit": np.round(rng.uniform(0, 0.3, n), 6),
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnAmplitudeContrast": [0.1],
            "rlnSphericalAberration": [2.7],
            "rlnVoltage": [300.0],
            "rlnImagePixelSize": [1.06],
            "rlnImageSize": [256],
            "rlnImageDimensionality": [2],
            "rlnMagMat00": [1.0123456789],
            "rlnMagMat01": [0.0012345678],
            "rlnMagMat10": [0.0011],
            "rlnMagMat11": [0.9987654321],
        }
    )
    return ParticleSet(parts, optics, SourceInfo())


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'rows':>9} {'starfile [s]':>13} {'write_star [s]':>15} {'ratio':>7} {'read [s]':>9}")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for n in args.sizes:
            ps = synthetic_set(n)
            blocks = {"optics": ps.optics, "particles": ps.particles}
            t_sf = _time(lambda: starfile.write(blocks, tmp / "sf.star"), args.repeats)  # noqa: B023
            t_cm = _time(lambda: write_star(ps, tmp / "cm.star"), args.repeats)  # noqa: B023
            t_rd = _time(lambda: read_star(tmp / "cm.star"), 1)
            back = read_star(tmp / "cm.star")
            for c in ps.particles.columns:
                a, b = ps.particles[c].to_numpy(), back.particles[c].to_numpy()
                if not np.array_equal(a, b):
                    raise SystemExit(f"round trip changed column {c}")
            print(f"{n:>9} {t_sf:>13.2f} {t_cm:>15.2f} {t_sf / t_cm:>7.1f} {t_rd:>9.2f}")


if __name__ == "__main__":
    main()
