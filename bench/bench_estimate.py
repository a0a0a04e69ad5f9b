"""Benchmark of the whole ``cryomag estimate`` fit (issue 3's speed target).

The target: 20,000 particles of box 128, the whole fit (scale + anisotropic M, every
Gauss-Newton iteration) on 2 cores, reported as particles per second and as the ratio to
reading + FFT of the same stack alone (the floor).

The data set is simulated once and cached (``--cache``): box 128 at 1.3 A, the built-in
phantom (100 A, 4,000 atoms), 2 % anisotropy at 30 deg, SNR 0.05, defocus 0.8-1.6 um, 30 %
spread of contrast scales (the configuration of the full-size accuracy targets).

Measured in one run, each in a fresh process (peak RSS per process):

- floor: read + centred rfft2 of every particle, 1 thread;
- the estimate with the CLI's default execution (local worker processes, one single-threaded
  worker per core) and the automatic window padding, and the same with the box-periodic
  model (``window_pad`` 1, RELION's);
- optionally (``--exact``) the exact-gradient path for comparison.

Each run prints wall time, dataset particles/s, particle-passes/s, the passes (subset and
full), the ratio floor/rate, and the error of M against the truth with its standard error.

Usage::

    python bench/bench_estimate.py                    # 20,000 particles
    python bench/bench_estimate.py --n 2000 --quick   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def sim_config(n: int, seed: int = 31):
    from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig

    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(
            name="bench",
            pixel_size_A=1.3,
            aniso=[1.01, 0.99, 30.0],
            box=128,
            n_particles=n,
            particles_per_micrograph=100,
        )
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.8, 1.6
    cfg.noise.snr = 0.05
    cfg.scale.spread_pct = 30.0
    cfg.phantom.diameter_A = 100.0
    cfg.phantom.n_atoms = 4000
    return cfg


def dataset(cache: Path, n: int) -> Path:
    from cryomag.simulation.simulator import simulate_dataset

    folder = cache / f"estimate_box128_n{n}"
    if not (folder / "done.json").is_file():
        t0 = time.perf_counter()
        simulate_dataset(sim_config(n), folder, progress=True)
        (folder / "done.json").write_text(json.dumps({"simulate_s": time.perf_counter() - t0}))
    return folder


def m_estimate(
    folder: str, window_pad: int, workers: int, exact: bool, chunk_size: int | None = None
) -> dict:
    """The whole fit, as the CLI runs it (``workers`` local processes; 0 = synchronous)."""
    import cryomag
    from cryomag.execution import ExecutorConfig, make_executor
    from cryomag.simulation.simulator import load_truth

    sys.path.insert(0, str(HERE))
    from bench_statistics import _peak_mb

    folder = Path(folder)
    cfg = ExecutorConfig(j=workers if workers else 1, threads=1 if workers else 0)
    t0 = time.perf_counter()
    with make_executor(cfg, ("cryomag.fit.accumulate",)) as ex:
        if workers:
            # start the workers (reported apart: an environment cost, not the fit)
            ex.start_in_background()
            ex.run_on_workers(time.perf_counter)
        start = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = cryomag.estimate(
            folder / "particles.star",
            folder / "ref.mrc",
            fit=("scale", "aniso"),
            window_pad=window_pad,
            exact_gradient=exact,
            nthreads=1 if workers else 0,
            **({"chunk_size": chunk_size} if chunk_size else {}),
            progress=False,
            executor=ex,
        )
        dt = time.perf_counter() - t1
    truth = load_truth(folder)
    g = res.groups[0]
    err = g.mag - truth["M_group"][0]
    return {
        "window_pad": window_pad,
        "workers": workers,
        "exact_gradient": exact,
        "cluster_start_s": start,
        "seconds": dt,
        "pps": len(res.particles) / dt,
        "particle_passes_per_s": res.timings["particle_passes"] / dt,
        "passes": [h["particles"] for h in g.history if not h.get("relinearised")],
        "relinearised_steps": sum(1 for h in g.history if h.get("relinearised")),
        "iterations": len(g.history),
        "max_abs_error": float(np.abs(err).max()),
        "max_se": float(g.mag_error.max()),
        "driver_peak_mb": _peak_mb(),
    }


def one(what: str, **kw) -> dict:
    """Run one measurement in a fresh process."""
    cmd = [sys.executable, __file__, "--one", json.dumps({"what": what, **kw})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cryomag-bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--exact", action="store_true", help="also the exact-gradient path")
    ap.add_argument("--quick", action="store_true", help="skip the box-periodic run")
    ap.add_argument("--pads", default="0,1", help="window paddings to run (0 = automatic)")
    ap.add_argument("--chunk-size", type=int, default=None, help="default: the engine's")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        kw = json.loads(a.one)
        what = kw.pop("what")
        if what == "floor":
            sys.path.insert(0, str(HERE))
            from bench_statistics import m_floor

            print(json.dumps(m_floor(**kw)))
        else:
            print(json.dumps(m_estimate(**kw)))
        return
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, cores {os.cpu_count()}, load {os.getloadavg()}")
    folder = dataset(a.cache, a.n)
    star = str(folder / "particles.star")
    floor = one("floor", star=star, chunk_size=1024)
    print(f"floor (read + float32 FFT, 1 thread): {floor['pps']:.0f} p/s")
    pads = [int(p) for p in a.pads.split(",")]
    if a.quick:
        pads = pads[:1]
    runs = [(p, a.workers, False) for p in pads]
    if a.exact:
        runs.append((0, a.workers, True))
    rows = []
    for pad, workers, exact in runs:
        r = one(
            "estimate",
            folder=str(folder),
            window_pad=pad,
            workers=workers,
            exact=exact,
            chunk_size=a.chunk_size,
        )
        r["floor_ratio"] = floor["pps"] / r["pps"]
        r["floor_ratio_all_cores"] = workers * floor["pps"] / r["pps"]
        rows.append(r)
        print(
            f"window_pad {'auto' if pad == 0 else pad}{' exact-gradient' if exact else ''}: "
            f"{r['seconds']:.1f} s (cluster start {r['cluster_start_s']:.1f} s apart), "
            f"{r['pps']:.0f} particles/s ({r['particle_passes_per_s']:.0f}"
            f" particle-passes/s), passes {r['passes']} + {r['relinearised_steps']} "
            f"re-linearised steps, floor/rate {r['floor_ratio']:.1f} (1-thread floor), "
            f"{r['floor_ratio_all_cores']:.1f} ({workers}-core floor), "
            f"max |M - truth| {r['max_abs_error']:.1e} (SE {r['max_se']:.1e})"
        )
    print(f"load at end {os.getloadavg()}")
    print(json.dumps({"floor": floor, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
