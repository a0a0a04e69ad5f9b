"""Precision of per-particle defocus vs box and SNR, beside its Cramer-Rao bound.

For each setting: simulate particles at heights spread 150 A in the ice (one defocus per
micrograph written, exact), estimate with the defocus refined per particle
(``--fit scale,aniso --defocus particle --astigmatism micrograph``) and compare each
particle's defocus (its own apparent defocus) with the truth. Prints a Markdown table:

- raw: the particle's own estimate (no prior: a flat one), std(estimate - truth) against the
  median Cramer-Rao bound of the same particles (each particle's Fisher information of its
  defocus with M, its scale and its micrograph's parameters profiled), and their ratio;
- shrunk: the written estimate (empirical-Bayes prior from the micrograph), its rms error
  against its median posterior standard error;
- the spread of the heights found (true 150 A) and the time.

Usage: python bench/bench_defocus_precision.py [--n 600] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import cryomag
from cryomag.fit.defocus import DefocusLevels, solve_joint
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import load_truth, simulate_dataset


def one(tmp: Path, box: int, apix: float, snr: float, n: int) -> dict:
    cfg = SimulationConfig(seed=int(box * 10 + snr * 100))
    cfg.optics_groups = [
        OpticsGroupConfig(pixel_size_A=apix, box=box, n_particles=n, particles_per_micrograph=50)
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.5
    cfg.defocus.written, cfg.defocus.particle_std_A = "micrograph", 150.0
    cfg.noise.snr = snr
    cfg.phantom.diameter_A = min(0.8 * box * apix, 120.0)
    cfg.phantom.n_atoms = min(int(1000 * (cfg.phantom.diameter_A / 50) ** 3), 5000)
    cfg.render.n_workers = 2
    simulate_dataset(cfg, tmp, progress=False)
    levels = DefocusLevels("particle", "micrograph")
    res = cryomag.estimate(tmp / "particles.star", tmp / "ref.mrc", fit=("scale", "aniso"),
                           defocus="particle", astigmatism="micrograph", progress=False,
                           plots=False)  # fmt: skip
    gr = res.groups[0]
    st = res.stats[gr.group]
    truth = load_truth(tmp)["particles"]["defocus_mean_apparent_own_M_A"][gr.rows]
    mics = res.particles.micrographs()[gr.rows]
    sol = gr.defocus_solution
    written = 0.5 * (gr.defocus[:, 0] + gr.defocus[:, 1])
    # the particle's own estimate: the same step with a flat prior
    flat = solve_joint(st, mics, levels, fit_mag=False, deviation=sol.particle,
                       prior=np.eye(1) * 1e12)  # fmt: skip
    raw = written + (flat.particle[:, 0] - sol.particle[:, 0])
    err_raw = raw - truth
    err = written - truth
    crb = float(np.median(np.sqrt(flat.particle_cov[:, 0, 0])))
    return {
        "raw_std": float(np.std(err_raw - np.median(err_raw))),
        "crb": crb,
        "shrunk_rms": float(np.sqrt(np.mean(err**2))),
        "post_se": float(np.median(sol.defocus_se)),
        "spread": float(np.sqrt(sol.prior[0, 0])),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--boxes", default="64,128", help="comma-separated boxes to run")
    args = ap.parse_args()
    grid = [(64, 1.6, snr) for snr in (0.05, 0.2, 1.0)] + [(128, 1.25, snr) for snr in (0.05, 0.2)]
    boxes = {int(b) for b in args.boxes.split(",")}
    grid = [g for g in grid if g[0] in boxes]
    if args.quick:
        grid = grid[:2]
    print("| box | pixel (A) | SNR | raw std(est - truth) (A) | CRB (A) | ratio | written rms (A)"
          " | posterior SE (A) | ratio | heights found (true 150 A) | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for box, apix, snr in grid:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            r = one(Path(tmp), box, apix, snr, args.n)
        print(
            f"| {box} | {apix} | {snr} | {r['raw_std']:.1f} | {r['crb']:.1f} | "
            f"{r['raw_std'] / r['crb']:.2f} | {r['shrunk_rms']:.1f} | {r['post_se']:.1f} | "
            f"{r['shrunk_rms'] / r['post_se']:.2f} | {r['spread']:.0f} | "
            f"{time.perf_counter() - t0:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
