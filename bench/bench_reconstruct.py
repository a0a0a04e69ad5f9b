"""Benchmark of ``cryomag reconstruct``: particles per second.

Default: N synthetic particles of one optics group, box B: a pool of clean projections of a
blob phantom (forward model, CTF on) at random poses, defocus and origins, repeated over the
N rows with fresh Gaussian noise per read (held in memory, so the numbers measure
computation, not the disk; the noise synthesis is counted as reading). They are
reconstructed into half maps + full map with the default settings (FSC-based Wiener term,
up to 20 CG iterations per map). With ``--star`` a real particle file is used instead.

Usage::

    python bench/bench_reconstruct.py                      # 20,000 particles, box 128
    python bench/bench_reconstruct.py --n 2000 --box 64 --threads 2
    python bench/bench_reconstruct.py --star run/particles.star

Target (issue 6): 20,000 particles of box 128 in under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from cryomag.model.particles import ParticleSet
from cryomag.workflows.reconstruct import ReconstructOptions, run_reconstruct


def blob_phantom(box: int, n_blobs: int = 1500, seed: int = 0) -> np.ndarray:
    """A protein-like map: Gaussian atoms (sigma 1-2 voxels) inside 0.35 box, [z, y, x]."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((box, box, box))
    r = 6
    g = np.arange(-r, r + 1)
    for _ in range(n_blobs):
        c = rng.normal(0, box / 10, 3)
        c = c * min(1.0, 0.35 * box / max(np.linalg.norm(c), 1e-9))
        s = rng.uniform(1.0, 2.0)
        i = np.round(c).astype(int) + box // 2
        d = c + box // 2 - i
        gz, gy, gx = np.meshgrid(g - d[2], g - d[1], g - d[0], indexing="ij")
        vol[i[2] - r : i[2] + r + 1, i[1] - r : i[1] + r + 1, i[0] - r : i[0] + r + 1] += np.exp(
            -(gx**2 + gy**2 + gz**2) / (2 * s * s)
        )
    return vol


class PoolImages:
    """An ImageSource stand-in: particle i is clean projection i % pool plus fresh noise.

    The clean projections come from the forward model (CTF on) of a blob phantom at the
    particle's own pose, defocus and origin (the table repeats the pool's parameters), so the
    data are consistent and the FSC behaves as for real data; the noise is drawn per read.
    """

    def __init__(self, ps: ParticleSet, pool: int, snr: float = 0.05, seed: int = 0) -> None:
        from cryomag.physics.forward import OpticsParams, ParticleGeometry, predict
        from cryomag.physics.fourier import centered_irfft2, rfft_freqs
        from cryomag.physics.reference import MapReference

        o = ps.optics.iloc[0]
        box, apix = int(o["rlnImageSize"]), float(o["rlnImagePixelSize"])
        ref = MapReference(blob_phantom(box, seed=seed), apix, eps=1e-5)
        t = ps.particles.iloc[:pool]
        z = np.zeros(pool)
        geom = ParticleGeometry(
            t[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float),
            t[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float),
            np.eye(2),
            t["rlnDefocusU"].to_numpy(float),
            t["rlnDefocusV"].to_numpy(float),
            t["rlnDefocusAngle"].to_numpy(float),
            z,
            z,
            np.ones(pool),
        )
        optics = OpticsParams(apix, box, 300.0, 2.7, 0.1)
        kx, ky = rfft_freqs(box, apix)
        clean = []
        for s in range(0, pool, 64):
            sl = slice(s, min(s + 64, pool))
            g = ParticleGeometry(
                *(
                    getattr(geom, f)[sl] if f != "mag" else geom.mag
                    for f in (
                        "euler_deg",
                        "origin_A",
                        "mag",
                        "defocus_u_A",
                        "defocus_v_A",
                        "defocus_angle_deg",
                        "phase_shift_deg",
                        "bfactor_A2",
                        "ctf_scale",
                    )
                )
            )
            spec = predict(ref, g, optics, kx.ravel(), ky.ravel())
            clean.append(centered_irfft2(spec.reshape(-1, box, box // 2 + 1), box))
        self.clean = np.concatenate(clean).astype(np.float32)
        self.sigma = float(np.sqrt(np.mean(self.clean**2) / snr))
        self.pool = pool
        self.seed = seed

    def read(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        rng = np.random.default_rng([self.seed, int(rows[0]), len(rows)])
        out = self.clean[rows % self.pool].copy()
        out += rng.standard_normal(out.shape, np.float32) * np.float32(self.sigma)
        return out


def synthetic_set(n: int, box: int, apix: float, pool: int, seed: int = 0) -> ParticleSet:
    """A particle table of ``pool`` random poses/defocus/origins, repeated to ``n`` rows."""
    rng = np.random.default_rng(seed)
    eul = Rotation.random(pool, random_state=seed).as_euler("ZYZ", degrees=True)
    du = rng.uniform(8000, 25000, pool)
    dv = du - rng.uniform(0, 500, pool)
    ang = rng.uniform(-90, 90, pool)
    org = rng.normal(0, 3, (pool, 2))
    i = np.arange(n) % pool
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{k % 1000 + 1:06d}@stack{k // 1000:03d}.mrcs" for k in range(n)],
            "rlnOpticsGroup": 1,
            "rlnDefocusU": du[i],
            "rlnDefocusV": dv[i],
            "rlnDefocusAngle": ang[i],
            "rlnAngleRot": eul[i, 0],
            "rlnAngleTilt": eul[i, 1],
            "rlnAnglePsi": eul[i, 2],
            "rlnOriginXAngst": org[i, 0],
            "rlnOriginYAngst": org[i, 1],
        }
    )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [apix],
            "rlnImageSize": [box],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
        }
    )
    return ParticleSet(particles, optics)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="particles (synthetic)")
    ap.add_argument("--box", type=int, default=128, help="box (synthetic)")
    ap.add_argument("--apix", type=float, default=1.3, help="pixel size (synthetic)")
    ap.add_argument("--pool", type=int, default=2000, help="distinct poses (synthetic)")
    ap.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio (synthetic)")
    ap.add_argument("--threads", type=int, default=0, help="threads (0 = all cores)")
    ap.add_argument("--sym", default="C1")
    ap.add_argument("--eps", type=float, default=ReconstructOptions.eps)
    ap.add_argument("--max-iter", type=int, default=ReconstructOptions.max_iter)
    ap.add_argument("--star", default=None, help="reconstruct this particle file instead")
    args = ap.parse_args()

    if args.star:
        from cryomag.io import ImageSource, read_particles

        ps = read_particles(args.star)
        src = ImageSource(ps)
        label = args.star
    else:
        ps = synthetic_set(args.n, args.box, args.apix, min(args.pool, args.n))
        t0 = time.perf_counter()
        src = PoolImages(ps, min(args.pool, args.n), args.snr)
        print(f"made {src.pool} clean projections in {time.perf_counter() - t0:.1f} s")
        label = f"synthetic {args.n} x {args.box}^2 ({src.pool} poses, SNR {args.snr})"
    opts = ReconstructOptions(
        symmetry=args.sym, nthreads=args.threads, eps=args.eps, max_iter=args.max_iter
    )
    t0 = time.perf_counter()
    res = run_reconstruct(ps, src, opts, progress=False)
    dt = time.perf_counter() - t0
    tm = res.info["timings"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"threads={args.threads or 'all'}"
    )
    print(f"data: {label}, output box {res.box} at {res.pixel_size_A:.3f} A, sym {args.sym}")
    print(
        f"total {dt:.1f} s = backprojection {tm['backprojection_s']:.1f} s (read "
        f"{tm['read_s']:.1f}, FFT+CTF {tm['fft_ctf_s']:.1f}, finufft {tm['finufft_s']:.1f}) + "
        f"solve {tm['solve_s']:.1f} s; CG iterations {res.info['cg_iterations']}"
    )
    print(
        f"resolution (FSC 0.143): {res.resolution_A:.2f} A; particles/s: {len(ps) / dt:.0f} "
        f"(excluding image reading/synthesis: {len(ps) / max(dt - tm['read_s'], 1e-9):.0f})"
    )


if __name__ == "__main__":
    main()
