"""Throughput of the ground-truth simulator (particles per second).

Usage::

    python bench/bench_simulate.py [--n 2000] [--box 128] [--apix 1.3] [--workers 2]
                                   [--keep DIR]

Runs :func:`cryomag.simulation.simulator.simulate_dataset` on the default configuration
(defocus 0.8-2.5 um, 1 % anisotropic magnification, SNR 0.05, 50 particles per micrograph)
and prints the wall time and particles/s, split into the fixed cost (phantom, reference map,
noise pilot) and the rendering.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from cryomag.simulation.config import SimulationConfig
from cryomag.simulation.simulator import simulate_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="particles")
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--apix", type=float, default=1.3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep the output")
    args = ap.parse_args()

    cfg = SimulationConfig(seed=0, n_particles=args.n)
    cfg.optics_groups[0].box = args.box
    cfg.optics_groups[0].pixel_size_A = args.apix
    cfg.render.n_workers = args.workers
    out = args.keep or Path(tempfile.mkdtemp(prefix="cryomag-bench-"))
    t0 = time.perf_counter()
    try:
        _, truth = simulate_dataset(cfg, out, progress=False)
        total = time.perf_counter() - t0
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    print(
        f"simulate_dataset: {args.n} particles, box {args.box}, {args.apix} A/px, "
        f"{args.workers} worker(s), {os.cpu_count()} CPU(s)"
    )
    tm = truth["timing"]
    print(f"  wall time        {total:8.1f} s")
    print(f"  setup (phantom, ref.mrc, noise pilot) {tm['setup_s']:.1f} s")
    print(f"  rendering + noise + stacks            {tm['render_s']:.1f} s")
    print(f"  particles/s (rendering)  {args.n / tm['render_s']:8.1f}")
    print(f"  particles/s (overall)    {args.n / total:8.1f}")


if __name__ == "__main__":
    main()
