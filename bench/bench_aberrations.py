"""Beam tilt, trefoil and Cs: cryomag vs relion_ctf_refine on the same particles (issue 13).

One simulated data set (box 128 at 1.25 A, SNR 0.05, 2 % anisotropy, the true group M
written): beam tilt (0.5, -0.3) mrad, trefoil Z(3,3) of 0.3 rad at 3 A and the STAR's Cs 2 %
too high; the STAR given to both programs (``unknown.star``) has no beam tilt and no Zernike
terms. Printed, in one run:

- the read + rfft2 floor of the stack (one thread);
- ``cryomag estimate --aberrations tilt,trefoil,cs`` (wall time, every pass included);
- ``relion_ctf_refine --fit_beamtilt --odd_aberr_max_n 3 --fit_aberr --even_aberr_max_n 4``
  (one round) when RELION_BIN (or --relion-bin) points at a RELION 5 build;
- for each: the beam tilt found (mrad, RELION's extractTilt of all odd terms), the trefoil
  (phase at 3 A, rad) and, as aberration-agnostic measures, the rms over the band of the
  error of the odd phase (a linear phase, an image shift, removed) and of the CTF's phase chi
  (a constant, defocus and astigmatism removed: the Cs error and the even Zernike terms), in
  rad; cryomag's reported standard errors beside.

    python bench/bench_aberrations.py [--n 5000] [--box 128] [--keep DIR] [--relion-bin DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_defocus import floor_seconds, write_postprocess  # noqa: E402

TILT = (0.5, -0.3)
TREFOIL = 8.1  # Z(3,3) coefficient (rad A^3): 0.3 rad at 3 A
CS_TRUE = 2.7


def simulate(folder: Path, n: int, box: int, seed: int = 71) -> None:
    from cryomag.io import read_star, write_star
    from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
    from cryomag.simulation.simulator import simulate_dataset

    cfg = SimulationConfig(seed=seed)
    apix = 1.25 * 128 / box
    cfg.optics_groups = [
        OpticsGroupConfig(pixel_size_A=apix, aniso=[1.01, 0.99, 30.0], box=box, n_particles=n,
                          particles_per_micrograph=50, beam_tilt_mrad=list(TILT),
                          odd_zernike=[0.0, 0.0, 0.0, 0.0, 0.0, TREFOIL])  # fmt: skip
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.5
    cfg.noise.snr = 0.05
    cfg.output.write_true_group_mag = True
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = min(0.8 * box * apix, 120.0), 5000
    cfg.render.n_workers = 2
    if not (folder / "particles.star").exists():
        simulate_dataset(cfg, folder, progress=False)
    ps = read_star(folder / "particles.star")
    ps.set_aberrations(1, beam_tilt_mrad=(0.0, 0.0), odd=(), even=())
    ps.optics["rlnSphericalAberration"] = CS_TRUE * 1.02
    # the STAR both programs get: no aberrations, Cs 2 % high
    write_star(ps, folder / "unknown.star")


def aberration_errors(star: Path, box: int, apix: float) -> dict:
    """Beam tilt, trefoil and the rms odd-phase and chi errors of a STAR's optics group 1
    against the truth (see the module docstring)."""
    from cryomag.io import read_star
    from cryomag.physics.aberrations import (
        beam_tilt_to_odd,
        chi_even,
        odd_to_beam_tilt,
        phase_odd,
    )
    from cryomag.physics.ctf import electron_wavelength_A

    ps = read_star(star)
    o = ps.optics_params(1)
    lam = float(electron_wavelength_A(o.voltage_kv))
    odd = beam_tilt_to_odd(*o.beam_tilt_mrad, o.cs_mm, lam, o.odd_zernike)
    tx, ty, rest = odd_to_beam_tilt(odd, o.cs_mm, lam)
    k = np.fft.fftfreq(box, apix)
    kx, ky = np.meshgrid(k, k)
    r = np.hypot(kx, ky)
    sel = (r > 1 / 20) & (r < 1 / 3.5)
    kx, ky = kx[sel], ky[sel]
    true_odd = beam_tilt_to_odd(*TILT, CS_TRUE, lam, [0.0, 0.0, 0.0, 0.0, 0.0, TREFOIL])
    d_odd = phase_odd(odd, kx, ky) - phase_odd(true_odd, kx, ky)
    lin = np.stack([kx, ky], 1)
    d_odd -= lin @ np.linalg.lstsq(lin, d_odd, rcond=None)[0]
    u2 = kx * kx + ky * ky

    def chi(cs_mm, even):
        out = -0.5 * np.pi * cs_mm * 1e7 * lam**3 * u2 * u2
        if len(even):
            out = out + chi_even(even, kx, ky)
        return out

    d_chi = chi(o.cs_mm, o.even_zernike) - chi(CS_TRUE, ())
    quad = np.stack([np.ones_like(kx), kx * kx, kx * ky, ky * ky], 1)
    d_chi -= quad @ np.linalg.lstsq(quad, d_chi, rcond=None)[0]
    return {
        "tilt": (tx, ty),
        "trefoil_3A": (rest[5] / 27.0 if len(rest) > 5 else 0.0,
                       rest[2] / 27.0 if len(rest) > 2 else 0.0),  # fmt: skip
        "cs": o.cs_mm,
        "odd_rms": float(np.sqrt(np.mean(d_odd**2))),
        "chi_rms": float(np.sqrt(np.mean(d_chi**2))),
    }


def _fmt(e: dict) -> str:
    return (
        f"tilt ({e['tilt'][0]:.3f}, {e['tilt'][1]:.3f}) mrad, trefoil at 3 A "
        f"({e['trefoil_3A'][0]:.3f}, {e['trefoil_3A'][1]:.3f}) rad, Cs {e['cs']:.4f} mm; "
        f"rms error odd phase {e['odd_rms']:.4f} rad, chi {e['chi_rms']:.4f} rad"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--relion-bin", type=Path, default=os.environ.get("RELION_BIN"))
    args = ap.parse_args()
    apix = 1.25 * 128 / args.box
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "sim"
        if not (folder / "unknown.star").exists():
            simulate(folder, args.n, args.box)
        print(f"{args.n} particles, box {args.box} at {apix:.3f} A; truth: tilt {TILT} mrad, "
              f"trefoil 0.3 rad at 3 A, Cs {CS_TRUE} mm (written {CS_TRUE * 1.02:.3f})")
        print(f"read + rfft2 floor: {floor_seconds(folder):.2f} s")
        print("input:   " + _fmt(aberration_errors(folder / "unknown.star", args.box, apix)))
        import cryomag

        out = folder.parent / "cryomag_out"
        t0 = time.perf_counter()
        res = cryomag.estimate(folder / "unknown.star", folder / "ref.mrc", out,
                               aberrations="tilt,trefoil,cs", progress=False, plots=False,
                               resume=False)  # fmt: skip
        t_c = time.perf_counter() - t0
        gr = res.groups[0]
        se = dict(zip(gr.aberration_terms.names, np.sqrt(np.diag(gr.aberration_cov)),
                      strict=True))  # fmt: skip
        print(f"cryomag: {t_c:.1f} s; " + _fmt(aberration_errors(out / "particles.star",
                                                                   args.box, apix)))  # fmt: skip
        print("         SE: tilt ({:.3f}, {:.3f}) mrad, trefoil {:.3f} rad at 3 A, Cs {:.4f} mm"
              .format(se["beam_tilt_x"], se["beam_tilt_y"], se["odd_zernike_5"] / 27,
                      se["cs"]))  # fmt: skip
        if args.relion_bin:
            import shutil
            import subprocess

            rout = folder.parent / "relion_out"
            if rout.exists():
                shutil.rmtree(rout)
            rout.mkdir(parents=True)
            pp = write_postprocess(rout, args.box, apix)
            cmd = [str(Path(args.relion_bin) / "relion_ctf_refine"), "--i", "unknown.star",
                   "--f", str(pp), "--m1", "ref.mrc", "--m2", "ref.mrc", "--o", str(rout) + "/",
                   "--fit_beamtilt", "--odd_aberr_max_n", "3", "--fit_aberr",
                   "--even_aberr_max_n", "4", "--j", "2"]  # fmt: skip
            t0 = time.perf_counter()
            run = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
            t_r = time.perf_counter() - t0
            if run.returncode != 0:
                print(run.stderr[-3000:])
                return 1
            e = aberration_errors(rout / "particles_ctf_refine.star", args.box, apix)
            print(f"RELION:  {t_r:.1f} s (cryomag / RELION {t_c / t_r:.2f}); " + _fmt(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
