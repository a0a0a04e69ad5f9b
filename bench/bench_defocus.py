"""Per-particle defocus and per-micrograph astigmatism: cryomag vs relion_ctf_refine.

One simulated data set with real-like CTF input (issue 12): one defocus and astigmatism per
micrograph written with an estimation error, the particles at heights spread in the ice, the
true group M written (so that both programs refine the defocus only). Printed, in one run:

- the read + rfft2 floor of the stack (one thread);
- cryomag estimate --fit scale --defocus particle --astigmatism micrograph (wall time);
- relion_ctf_refine --fit_defocus --fit_mode fpmff (per-particle defocus, per-micrograph
  astigmatism) when RELION_BIN (or --relion-bin) points at a RELION 5 build;
- each one's errors against the truth: rms of the particles' mean defocus, rms of the
  micrographs' mean defocus, rms of the astigmatism (A), and the ratio of cryomag's rms error
  to its median reported standard error (calibration).

    python bench/bench_defocus.py [--n 2500] [--box 128] [--runs 1] [--keep DIR]

Medians over --runs repeats of the timings (the machines are noisy); errors are from the last
run (they do not depend on the run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relion_common import floor_seconds, run_relion_ctf_refine  # noqa: E402


def simulate(folder: Path, n: int, box: int, seed: int) -> None:
    from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
    from cryomag.simulation.simulator import simulate_dataset

    cfg = SimulationConfig(seed=seed)
    apix = 1.25 * 128 / box
    cfg.optics_groups = [
        OpticsGroupConfig(pixel_size_A=apix, aniso=[1.01, 0.99, 30.0], box=box, n_particles=n,
                          particles_per_micrograph=50)  # fmt: skip
    ]
    d = cfg.defocus
    d.min_um, d.max_um = 0.5, 2.0
    d.written, d.estimation_error_A, d.astig_error_A, d.particle_std_A = (
        "micrograph", 50.0, 20.0, 150.0)  # fmt: skip
    cfg.noise.snr = 0.05
    cfg.output.write_true_group_mag = True
    cfg.render.n_workers = 2
    simulate_dataset(cfg, folder, progress=False)


def run_cryomag(folder: Path, out: Path) -> float:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "cryomag.cli.main", "estimate", "-i",
           str(folder / "particles.star"), "--ref", str(folder / "ref.mrc"), "-o", str(out),
           "--fit", "scale", "--defocus", "particle", "--astigmatism", "micrograph",
           "--j", "2", "--no-plots", "-q"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def run_relion(relion_bin: Path, folder: Path, out: Path, box: int, apix: float) -> float:
    fit = ["--fit_defocus", "--fit_mode", "fpmff", "--kmin_defocus", "30"]
    return run_relion_ctf_refine(relion_bin, folder, out, box, apix, fit)[0]


def errors(star: Path, folder: Path, se_col: str | None = None) -> dict:
    """rms errors of the particles' and micrographs' mean defocus and of the astigmatism."""
    from cryomag.io import read_star
    from cryomag.physics.ctf import defocus_matrix
    from cryomag.simulation.simulator import load_truth

    ps = read_star(star)
    p = load_truth(folder)["particles"]
    def keys(table):  # index@stack file name: outputs rebase the stacks' folders
        return [f"{n.split('@')[0].lstrip('0')}@{Path(n.split('@')[1]).name}"
                for n in table.particles["rlnImageName"].astype(str)]  # fmt: skip

    order = {k: i for i, k in enumerate(keys(read_star(folder / "particles.star")))}
    rows = np.array([order[k] for k in keys(ps)])
    # the frame: the written M (= the truth's group M, no local magnification)
    a_true = defocus_matrix(p["defocus_u_true_A"], p["defocus_v_true_A"],
                            p["defocus_angle_true_deg"])[rows]  # fmt: skip
    a = defocus_matrix(ps.column("rlnDefocusU"), ps.column("rlnDefocusV"),
                       ps.column("rlnDefocusAngle"))  # fmt: skip
    d = a - a_true
    mean_err = 0.5 * (d[:, 0, 0] + d[:, 1, 1])
    astig_err = np.hypot(0.5 * (d[:, 0, 0] - d[:, 1, 1]), d[:, 0, 1])
    mics = ps.micrographs()
    _, inv = np.unique(mics, return_inverse=True)
    mic_err = np.bincount(inv, mean_err) / np.bincount(inv)
    out = {
        "particle_rms_A": float(np.sqrt(np.mean(mean_err**2))),
        "micrograph_rms_A": float(np.sqrt(np.mean(mic_err**2))),
        "astig_rms_A": float(np.sqrt(np.mean(astig_err**2))),
    }
    if se_col and se_col in ps.particles.columns:
        out["rms_over_median_se"] = out["particle_rms_A"] / float(np.median(ps.column(se_col)))
    return out


def _fmt(e: dict) -> str:
    return (f"rms error particle {e['particle_rms_A']:.1f} A, micrograph "
            f"{e['micrograph_rms_A']:.1f} A, astigmatism {e['astig_rms_A']:.1f} A")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--relion-bin", type=Path, default=os.environ.get("RELION_BIN"))
    ap.add_argument("--keep", type=Path, help="work folder to keep")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="cryomag-bench-defocus-"))
    data = work / "data"
    if not (data / "particles.star").exists():
        simulate(data, args.n, args.box, args.seed)
    apix = 1.25 * 128 / args.box
    t_floor, t_ours, t_rel = [], [], []
    for _ in range(args.runs):
        t_floor.append(floor_seconds(data))
        t_ours.append(run_cryomag(data, work / "cryomag"))
        if args.relion_bin:
            t_rel.append(run_relion(Path(args.relion_bin), data, work / "relion", args.box, apix))
    floor = statistics.median(t_floor)
    print(f"{args.n} particles, box {args.box} at {apix:.3f} A; micrograph CTF with 50 A "
          "error, heights 150 A; medians of", args.runs, "run(s)")  # fmt: skip
    print(f"read + rfft2 floor: {floor:.2f} s")
    ours = statistics.median(t_ours)
    err_in = errors(data / "particles.star", data)
    err = errors(work / "cryomag" / "particles.star", data, "cmagDefocusError")
    print(f"input:    {_fmt(err_in)}")
    calib = err.get("rms_over_median_se", float("nan"))
    print(f"cryomag:  {ours:.1f} s ({ours / floor:.0f}x floor); {_fmt(err)}; "
          f"particle rms / median SE {calib:.2f}")
    if t_rel:
        rel = statistics.median(t_rel)
        er = errors(work / "relion" / "particles_ctf_refine.star", data)
        print(f"RELION:   {rel:.1f} s ({rel / floor:.0f}x floor; cryomag / RELION "
              f"{ours / rel:.2f}); {_fmt(er)}")
    else:
        print("RELION:   not run (set RELION_BIN to a RELION 5 build's bin folder)")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
