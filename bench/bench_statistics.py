"""Benchmark of the statistics pass (``cryomag estimate``), simulation and reconstruction.

Generates data sets with the simulator (cached in ``--cache``, default a folder in the system
temp folder; the simulation time of a data set is stored with it) and prints, in one run:

- simulation: particles/s of ``simulate_dataset`` per box;
- the read + FFT floor: reading the stack (ImageSource) and the centred rfft2, alone;
- one statistics pass (``run_estimate`` with ``fit=("scale",)``: exactly one pass over the
  images) per box, synchronous with 1 thread; particles/s and its ratio to the floor;
- scaling with the particle count at box 128 (counts above the simulated set reuse its
  images: the particle table is tiled, so the per-particle work is the same);
- a LocalCluster of 2 worker processes against the synchronous run (1 thread, and all
  threads) on the largest count: time per particle and the ratio (target <= 1.2 x the
  single-process time; the issue's target run is 100,000 particles of box 128);
- peak memory: peak RSS of every measurement (each runs in a fresh process; for the cluster,
  the largest worker and the driver), and tracemalloc's peak inside one chunk, which checks
  the per-worker formula of cryomag.execution.executor;
- reconstruction particles/s (``run_reconstruct``), when cryomag.workflows.reconstruct exists.

Usage::

    python bench/bench_statistics.py                         # boxes 64,128,256; 1e3, 1e4
    python bench/bench_statistics.py --counts 1000,10000,100000
    python bench/bench_statistics.py --quick                 # small sizes, a smoke test

Every measurement runs in its own subprocess (``--one JSON``), so peak RSS values do not
mix. The machine (CPU, cores, load average) and the date are printed first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIM_BOX_PIXEL_A = {64: 2.6, 128: 1.3, 256: 1.3}


# ------------------------------------------------------------------------------ data
def sim_config(box: int, n: int, seed: int = 7):
    """One optics group, 1 % anisotropy, SNR 0.1; phantom ~ half the box."""
    from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig

    apix = SIM_BOX_PIXEL_A.get(box, 1.3)
    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(
            name="bench",
            pixel_size_A=apix,
            aniso=[1.01, 0.99, 30.0],
            box=box,
            n_particles=n,
            particles_per_micrograph=100,
        )
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.8, 1.6
    cfg.noise.snr = 0.1
    cfg.phantom.diameter_A = 0.5 * box * apix
    cfg.phantom.n_atoms = 2500
    return cfg


def dataset(cache: Path, box: int, n: int) -> tuple[Path, dict]:
    """The simulated set of ``n`` particles at ``box`` (made once, then cached)."""
    from cryomag.simulation.simulator import simulate_dataset

    folder = cache / f"box{box}_n{n}"
    meta_path = folder / "bench.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return folder, meta
    t0 = time.perf_counter()
    simulate_dataset(sim_config(box, n), folder, progress=False)
    dt = time.perf_counter() - t0
    meta = {"box": box, "n": n, "simulate_s": dt, "simulate_pps": n / dt}
    meta_path.write_text(json.dumps(meta))
    meta["cached"] = False
    return folder, meta


def tiled(folder: Path, n: int) -> Path:
    """A STAR of ``n`` particles that repeats the set's particles (same images)."""
    import pandas as pd

    from cryomag.io import read_particles, write_star
    from cryomag.model.particles import ParticleSet

    star = folder / f"particles_x{n}.star"
    if star.is_file():
        return star
    ps = read_particles(folder / "particles.star")
    reps = -(-n // len(ps))
    table = pd.concat([ps.particles] * reps, ignore_index=True).iloc[:n].reset_index(drop=True)
    write_star(ParticleSet(table, ps.optics.copy(), ps.source), star)
    return star


# ------------------------------------------------------------------------------ measurements
def _peak_mb() -> float:
    """Peak resident memory of this process (MB): VmHWM, else ru_maxrss.

    ru_maxrss of a freshly exec'ed child starts at its parent's peak on Linux, so the
    process's own high-water mark is read from /proc where it exists.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def m_floor(star: str, chunk_size: int) -> dict:
    """Read + centred rfft2 of every particle, in chunks: the floor of any pass."""
    import scipy.fft as sfft

    from cryomag.execution.chunks import make_chunks
    from cryomag.io import ImageSource, read_particles

    ps = read_particles(star)
    src = ImageSource(ps)
    chunks = make_chunks(ps.group_index(), chunk_size)
    t0 = time.perf_counter()
    for c in chunks:
        # as the estimate reads them: float32, centred rfft2, one thread
        img = src.read(np.asarray(c.rows)).astype(np.float32)
        sfft.rfft2(sfft.ifftshift(img, axes=(-2, -1)), axes=(-2, -1), workers=1)
    dt = time.perf_counter() - t0
    return {"n": len(ps), "seconds": dt, "pps": len(ps) / dt, "peak_mb": _peak_mb()}


def _bands(ps, refs, opts):
    from cryomag.fit.bands import make_bands

    return make_bands(ps, min(r.nyquist for r in refs.values()), opts.low_res_A, opts.high_res_A)


def _pads(ps, refs, opts) -> dict[int, int]:
    """The window padding of each optics group (by number) that the engine will use."""
    from cryomag.fit.bands import auto_window_pad

    if opts.window_pad > 0:
        return {int(g): opts.window_pad for g in ps.group_numbers()}
    bands = _bands(ps, refs, opts)
    return {int(g): auto_window_pad(ps, int(g), bands[int(g)]) for g in ps.group_numbers()}


def _options(chunk_size: int, nthreads: int, window_pad: int):
    from cryomag.workflows.estimate import EstimateOptions

    kw = {"fit": ("scale",), "chunk_size": chunk_size, "nthreads": nthreads}
    if "window_pad" in EstimateOptions.__dataclass_fields__:
        kw["window_pad"] = window_pad
    return EstimateOptions(**kw)


def m_pass(star: str, ref: str, mode: str, chunk_size: int, window_pad: int = 1) -> dict:
    """One statistics pass: mode sync1 (1 thread), sync (all threads), dask1 or dask2."""
    from cryomag.execution import LocalExecutor
    from cryomag.io import ImageSource, read_particles
    from cryomag.workflows.estimate import load_references, run_estimate

    ps = read_particles(star)
    nthreads = 0 if mode == "sync" else 1
    opts = _options(chunk_size, nthreads, window_pad)
    refs, _ = load_references(ref, eps=opts.eps, nthreads=nthreads)
    out: dict = {"n": len(ps), "mode": mode, "chunk_size": chunk_size}
    out["window_pad"] = _pads(ps, refs, opts)
    if mode.startswith("dask"):
        from cryomag.execution.dask import DaskExecutor

        workers = int(mode[4:])
        t0 = time.perf_counter()
        ex = DaskExecutor.local(workers)
        ex.client.wait_for_workers(workers)
        out["cluster_start_s"] = time.perf_counter() - t0
        cpu_workers = ex.client.run(time.process_time)
    else:
        ex = LocalExecutor()
    t0 = time.perf_counter()
    c0 = time.process_time()
    run_estimate(ps, refs, ImageSource(ps), opts, None, False, executor=ex)
    dt = time.perf_counter() - t0
    out.update(seconds=dt, pps=len(ps) / dt, peak_mb=_peak_mb(), cpu_s=time.process_time() - c0)
    if mode.startswith("dask"):
        after = ex.client.run(time.process_time)
        out["driver_cpu_s"] = out["cpu_s"]
        out["worker_cpu_s"] = sum(after[w] - cpu_workers[w] for w in after)
        out["cpu_s"] = out["worker_cpu_s"] + out["driver_cpu_s"]
        peaks = ex.client.run(_peak_mb)
        out["worker_peak_mb"] = max(peaks.values())
        out["driver_peak_mb"] = out["peak_mb"]
        ex.close()
    return out


def m_chunk_memory(star: str, ref: str, chunk_size: int, window_pad: int = 1) -> dict:
    """tracemalloc peak of one chunk of the pass (numpy arrays; the reference excluded)."""
    import tracemalloc

    from cryomag.execution import make_chunks
    from cryomag.fit.bands import initial_noise
    from cryomag.fit.passes import GroupPass, PassSpec, StatisticsPass
    from cryomag.io import ImageSource, read_particles
    from cryomag.workflows.estimate import load_references

    ps = read_particles(star)
    opts = _options(chunk_size, 1, window_pad)
    refs, _ = load_references(ref, eps=opts.eps, nthreads=1)
    bands = _bands(ps, refs, opts)
    pads = _pads(ps, refs, opts)
    g = int(ps.group_numbers()[0])
    chunks = make_chunks(ps.particles["rlnOpticsGroup"].to_numpy(int), chunk_size)
    probe = StatisticsPass(ps, refs, ImageSource(ps), bands, PassSpec({}, nthreads=1))
    noise = initial_noise(probe.spectra(np.asarray(chunks[0].rows)[:256]), bands[g])
    spec = PassSpec({g: GroupPass(ps.mag_matrix(g), ps.mag_matrix(g), noise, pads[g])}, nthreads=1)
    pass_ = StatisticsPass(ps, refs, ImageSource(ps), bands, spec)
    pass_(chunks[0])  # warm: open the stacks
    tracemalloc.start()
    pass_(chunks[0])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    box = bands[g].box
    n_ref = refs[0].box
    return {
        "chunk_peak_mb": peak / 2**20,
        "bytes_per_particle_per_box2": peak / (len(chunks[0]) * box * box),
        "reference_mb": sum(a.nbytes for a in vars(refs[0]).values() if isinstance(a, np.ndarray))
        / 2**20,
        "reference_box": n_ref,
    }


def m_reconstruct(star: str) -> dict:
    """Particles/s of run_reconstruct (half maps + full map, default settings)."""
    from cryomag.io import ImageSource, read_particles
    from cryomag.workflows.reconstruct import ReconstructOptions, run_reconstruct

    ps = read_particles(star)
    t0 = time.perf_counter()
    run_reconstruct(ps, ImageSource(ps), ReconstructOptions(nthreads=0), progress=False)
    dt = time.perf_counter() - t0
    return {"n": len(ps), "seconds": dt, "pps": len(ps) / dt, "peak_mb": _peak_mb()}


MEASURES = {
    "floor": m_floor,
    "pass": m_pass,
    "chunk_memory": m_chunk_memory,
    "reconstruct": m_reconstruct,
}


def one(what: str, **kw) -> dict:
    """Run a measurement in a fresh process (clean peak RSS); returns its JSON."""
    arg = json.dumps({"what": what, **kw})
    r = subprocess.run(
        [sys.executable, __file__, "--one", arg], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"{what} {kw} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report
def machine() -> str:
    from relion_common import cpu_model  # this script's folder is on sys.path

    cpu = cpu_model()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {cpu}; nproc {os.cpu_count()}; "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB; "
        f"load average {' '.join(f'{x:.1f}' for x in load)}; Python {platform.python_version()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", default="64,128,256", help="boxes for the per-box table")
    ap.add_argument("--n-box", type=int, default=1000, help="particles simulated per box")
    ap.add_argument("--scaling-box", type=int, default=128)
    ap.add_argument("--counts", default="1000,10000", help="particle counts (scaling box)")
    ap.add_argument("--sim-max", type=int, default=10000, help="most particles simulated")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument(
        "--window-pad",
        type=int,
        default=1,
        help="EstimateOptions.window_pad: 1 box-periodic model (default here), 0 the engine's "
        "automatic choice (window-aware, up to ~pad^2 slower)",
    )
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "cryomag-bench"))
    ap.add_argument("--quick", action="store_true", help="boxes 64,128; 300 / 1000 particles")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(MEASURES[spec.pop("what")](**spec)))
        return
    if args.quick:
        args.boxes, args.n_box, args.counts, args.sim_max = "64,128", 300, "300,1000", 300
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    boxes = [int(b) for b in args.boxes.split(",")]
    counts = sorted(int(c) for c in args.counts.split(","))
    cs = args.chunk_size
    wp = args.window_pad
    print(f"machine: {machine()}")
    print(
        f"cache: {cache}; chunk size {cs}; window_pad {wp} "
        f"({'automatic' if wp == 0 else 'fixed'}); finufft eps 1e-4 (the default)\n"
    )

    print("== per box: simulation, read+FFT floor, one statistics pass (sync, 1 thread)")
    hdr = (
        f"{'box':>5} {'n':>6} {'sim p/s':>9} {'floor p/s':>10} {'pass p/s':>9} "
        f"{'floor/pass':>10} {'peak MB':>8} {'chunk MB':>9} {'B/(px*box^2)':>13}"
    )
    print(hdr)
    per_box = {}
    for box in boxes:
        folder, meta = dataset(cache, box, args.n_box)
        star, ref = str(folder / "particles.star"), str(folder / "ref.mrc")
        fl = one("floor", star=star, chunk_size=cs)
        ps_ = one("pass", star=star, ref=ref, mode="sync1", chunk_size=cs, window_pad=wp)
        mem = one("chunk_memory", star=star, ref=ref, chunk_size=cs, window_pad=wp)
        per_box[box] = {"sim": meta, "floor": fl, "pass": ps_, "memory": mem}
        print(
            f"{box:>5} {args.n_box:>6} {meta['simulate_pps']:>9.1f}"
            f"{'*' if meta['cached'] else ' '}{fl['pps']:>9.0f} {ps_['pps']:>9.1f} "
            f"{fl['pps'] / ps_['pps']:>10.1f} {ps_['peak_mb']:>8.0f} "
            f"{mem['chunk_peak_mb']:>9.1f} {mem['bytes_per_particle_per_box2']:>13.0f}"
            + ("" if wp == 1 else f"  pad {ps_['window_pad']}")
        )
    print("  (* simulation time from the cache: measured when the set was made)")
    print(
        "  chunk MB: tracemalloc peak of one chunk; reference arrays: "
        + ", ".join(f"box {b}: {v['memory']['reference_mb']:.0f} MB" for b, v in per_box.items())
    )

    box = args.scaling_box
    if box in per_box:
        folder, _ = dataset(cache, box, args.n_box)
        print(f"\n== chunk size, box {box}, n {args.n_box} (sync, 1 thread)")
        for size in sorted({cs, 4 * cs}):
            r = one(
                "pass",
                star=str(folder / "particles.star"),
                ref=str(folder / "ref.mrc"),
                mode="sync1",
                chunk_size=size,
                window_pad=wp,
            )
            print(f"  chunk size {size:>4}: {r['pps']:7.1f} p/s, peak {r['peak_mb']:.0f} MB")
        print("  (each chunk evaluates the reference's 4 upsampled volumes once: larger chunks")
        print("   amortise that FFT; memory grows by chunk x box^2 x ~110 B)")

    print(f"\n== scaling with particle count, box {box} (sync, 1 thread)")
    n_sim = min(max(counts), args.sim_max)
    folder, meta = dataset(cache, box, n_sim)
    ref = str(folder / "ref.mrc")
    print(f"{'n':>7} {'seconds':>9} {'p/s':>8} {'peak MB':>8}")
    stars = {}
    for n in counts:
        stars[n] = str(folder / "particles.star") if n == n_sim else str(tiled(folder, n))
        r = one("pass", star=stars[n], ref=ref, mode="sync1", chunk_size=cs, window_pad=wp)
        print(f"{n:>7} {r['seconds']:>9.1f} {r['pps']:>8.1f} {r['peak_mb']:>8.0f}")
    if max(counts) > n_sim:
        print(f"  (counts above {n_sim} repeat the {n_sim} simulated particles)")

    n = max(counts)
    print(f"\n== LocalCluster (2 processes x 1 thread) vs synchronous, box {box}, n {n}")
    sync1 = r  # the last scaling run
    syncall = one("pass", star=stars[n], ref=ref, mode="sync", chunk_size=cs, window_pad=wp)
    dask1 = one("pass", star=stars[n], ref=ref, mode="dask1", chunk_size=cs, window_pad=wp)
    dask2 = one("pass", star=stars[n], ref=ref, mode="dask2", chunk_size=cs, window_pad=wp)
    for name, r in (
        ("sync, 1 thread", sync1),
        ("sync, all threads", syncall),
        ("dask, 1 worker", dask1),
        ("dask, 2 workers", dask2),
    ):
        extra = (
            f"; cluster start {r['cluster_start_s']:.1f} s; peak worker "
            f"{r['worker_peak_mb']:.0f} MB, driver {r['driver_peak_mb']:.0f} MB"
            if "cluster_start_s" in r
            else f"; peak {r['peak_mb']:.0f} MB"
        )
        print(
            f"  {name:<18} {r['seconds']:8.1f} s  {1e3 * r['seconds'] / r['n']:7.2f} ms/particle"
            f", CPU {1e3 * r['cpu_s'] / r['n']:6.2f} ms/particle" + extra
        )
    best_single = min(sync1["seconds"], syncall["seconds"])
    print(
        f"  wall time dask2 / best single process: {dask2['seconds'] / best_single:.2f} "
        f"(target <= 1.2); per-core efficiency (sync 1 thread / (2 x dask2)): "
        f"{sync1['seconds'] / (2 * dask2['seconds']):.2f}"
    )
    print(
        f"  CPU time dask1 / sync 1 thread: {dask1['cpu_s'] / sync1['cpu_s']:.2f} (the engine "
        "alone, one process computing at a time)"
    )
    print(
        f"  CPU time dask2 (workers {dask2['worker_cpu_s']:.1f} s + driver "
        f"{dask2['driver_cpu_s']:.1f} s) / sync 1 thread ({sync1['cpu_s']:.1f} s): "
        f"{dask2['cpu_s'] / sync1['cpu_s']:.2f} (engine + two processes sharing the "
        "machine's caches and memory bandwidth)"
    )

    if importlib.util.find_spec("cryomag.workflows.reconstruct") is not None:
        print(f"\n== reconstruction (run_reconstruct, all threads), box {box}")
        n_rec = min(2000, n_sim)
        star = str(folder / "particles.star") if n_rec == n_sim else str(tiled(folder, n_rec))
        r = one("reconstruct", star=star)
        print(
            f"  n {r['n']}: {r['seconds']:.1f} s, {r['pps']:.1f} particles/s, "
            f"peak {r['peak_mb']:.0f} MB"
        )
    else:
        print("\n== reconstruction: cryomag.workflows.reconstruct not present; skipped")
    print(f"\nmachine at the end: {machine()}")


if __name__ == "__main__":
    main()
