"""Speed of the default fit against the read + FFT floor and one round of RELION's CtfRefine.

Issue 14's benchmark, one command. On N simulated particles (default 5,000; box 128 at
1.25 A, defocus 0.5-1.5 um, one optics group with 2 % anisotropy at 30 deg, SNR 0.05; the
simulation is cached in ``--cache``) it prints, in one run:

- the floor: read + rfft2 of the whole stack (float32, one thread);
- the command ``cryomag estimate -i particles.star --ref ref.mrc -o OUT`` with the
  defaults (local worker processes, one single-threaded worker per core, automatic window
  padding), wall time of a fresh process: imports, worker start, map preparation, every
  Gauss-Newton pass and every output (STAR, results.json, statistics, plots) included, as
  a user waits for it; with its parts, its CPU time (user + system of the process and its
  workers: the work done, which unlike the wall does not count the time they wait for a
  core), peak RSS of the driver and of the largest worker, and M's error
  against the truth in standard errors (read back from results.json);
- ``relion_ctf_refine --fit_aniso --j 2`` (one round) on the same particles and map when
  ``RELION_BIN`` (or ``--relion-bin``) points at a RELION 5 build's bin folder, its CPU
  time, peak RSS and its M's error in cryomag's standard errors;
- optionally (``--local``) ``--fit scale,aniso,particle,micrograph,defocus`` against the
  group fit on the same data: by default (``--local-ctf micrograph``) a second data set
  with real-like CTF input (the same particles' parameters, but one defocus per micrograph
  written with a 50 A estimation error, the particles at heights spread 200 A), on which
  both run, and the group fit with the defocus refined per micrograph (``--defocus
  micrograph``, what the held fit's warning there asks for); ``--local-ctf exact`` runs
  them on the main data set (each particle's exact
  defocus); and (``--pads``) other window paddings;
- optionally (``--split N2``) both tools again on the data set's first N2 particles (a STAR
  of them beside ``particles.star``), interleaved: each one's time split into a fixed part
  and a part per particle (the line through the two sizes), so that a ratio at one size can
  be told apart into the two;

each a median of ``--repeat`` runs, and the ratios cryomag / floor, RELION / floor and
cryomag / RELION (wall, and CPU time).

Usage::

    python bench/bench_speed.py [--n 5000] [--repeat 3] [--relion-bin DIR] [--local]
        [--local-ctf micrograph|exact] [--split N2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from relion_common import (  # noqa: E402
    cpu_model,
    cpu_seconds,
    floor_seconds,
    run_relion_ctf_refine,
)

BOX, APIX = 128, 1.25
GROUP_FIT = ("scale", "aniso")
LOCAL_FIT = ("scale", "aniso", "particle", "micrograph", "defocus")
#: The case of the group fit with the defocus refined per micrograph (``--local``, real-like).
MIC_GROUP = "cryomag group fit + micrograph defocus, real-like CTF"


def dataset(cache: Path, n: int, seed: int = 14, ctf: str = "exact") -> Path:
    """The cached simulated data set of ``n`` particles (see the module docstring); ``ctf``
    "micrograph": one defocus per micrograph written, with a 50 A estimation error."""
    from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
    from cryomag.simulation.simulator import simulate_dataset

    folder = cache / f"speed_box{BOX}_n{n}_s{seed}{'_mic50' if ctf == 'micrograph' else ''}"
    if not (folder / "done.json").is_file():
        cfg = SimulationConfig(seed=seed)
        cfg.optics_groups = [
            OpticsGroupConfig(name="bench", pixel_size_A=APIX, aniso=[1.01, 0.99, 30.0],
                              box=BOX, n_particles=n, particles_per_micrograph=100)  # fmt: skip
        ]
        cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.5
        if ctf == "micrograph":  # heights: the default spread of 200 A
            cfg.defocus.written, cfg.defocus.estimation_error_A = "micrograph", 50.0
        cfg.noise.snr = 0.05
        cfg.render.n_workers = 2
        t0 = time.perf_counter()
        simulate_dataset(cfg, folder, progress=False)
        (folder / "done.json").write_text(json.dumps({"simulate_s": time.perf_counter() - t0}))
    return folder


def _peak_mb() -> float:
    """Peak resident memory of this process (MB, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def m_cryomag(folder: str, fit: list[str], window_pad: int, t_exec: float,
              options: dict | None = None, star: str = "particles.star"
              ) -> NoReturn:  # fmt: skip
    """One ``cryomag estimate`` command with the defaults, in this (fresh) process, which it
    ends; the measurement is printed (a JSON line) by an exit handler.

    The command line as a user runs it (``cryomag estimate -i ... --ref ... -o OUT``, its
    local worker processes, every output: STAR, results.json, statistics, plots), through
    the console script's own entry (``cryomag.cli.main.main``; ``app`` for a baseline that
    has none) in this process, so that its workers' peak memory is this process's
    children's and the process ends as the console script's does: the wall time
    :func:`one` measures runs from the interpreter's start to the process's end, as a
    user's clock (and RELION's, measured the same way) sees it. ``t_exec``: the parent's
    clock when it started this process; ``options``: more command-line options
    (``{"defocus": "micrograph"}`` -> ``--defocus micrograph``); ``star``: the particles'
    STAR file in ``folder``. M, its standard errors
    and the passes are read back from OUT/results.json by the handler, whose own time is
    reported (``report_s``) and left out of the wall.
    """
    import atexit
    import resource
    import shutil

    t_imp = time.time()
    import cryomag.cli.main as cli
    from cryomag.simulation.simulator import load_truth

    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix="cryomag-bench-run-"))
    out = tmp / "run"
    args = ["estimate", "-i", str(folder / star), "--ref", str(folder / "ref.mrc"),
            "-o", str(out), "--fit", ",".join(fit), "--window-pad", str(window_pad),
            "--quiet"]  # fmt: skip
    for key, value in (options or {}).items():
        args += [f"--{key.replace('_', '-')}", str(value)]

    def report() -> None:
        t1 = time.time()
        try:
            res = json.loads((out / "results.json").read_text())
        except OSError:
            res = None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if res is None:
            print(json.dumps({"error": "cryomag estimate wrote no results.json"}), flush=True)
            return
        truth = load_truth(folder)
        g = res["groups"][0]
        mag, se = np.asarray(g["M"]), np.asarray(g["M_standard_error"])
        err = mag - truth["M_group"][0]
        print(json.dumps({
            "python_start_s": t_imp - t_exec,
            "imports_s": t0 - t_imp,
            "estimate_s": t1 - t0,
            "statistics_s": res["timings"]["statistics_s"],
            "particle_passes": res["timings"]["particle_passes"],
            "passes": [h["particles"] for h in g["history"] if not h.get("relinearised")],
            # each pass's wall (older results.json without them: none)
            "pass_s": res["timings"].get("pass_seconds", []),
            "verdict": res["verdict"],
            "mag": mag.tolist(),
            "err_over_se": float(np.max(np.abs(err) / se)),
            "max_abs_error": float(np.abs(err).max()),
            "max_se": float(se.max()),
            "se": se.tolist(),
            "driver_peak_mb": _peak_mb(),
            # the largest child of the command: its worker processes (the plots' PDF child
            # is smaller), all reaped by now
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
            # the CPU time of the whole command: this process (imports included) and its
            # children (the workers, the plots' PDF child)
            "cpu_s": cpu_seconds(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN),
            "report_s": time.time() - t1,
        }), flush=True)  # fmt: skip

    atexit.register(report)  # the first registered: it runs after the command's own
    sys.argv = ["cryomag", *args]
    t0 = time.time()
    getattr(cli, "main", cli.app)()
    raise SystemExit(0)  # an entry that returned


def m_relion(relion_bin: str, folder: str, out: str, star: str = "particles.star") -> dict:
    """One round of relion_ctf_refine --fit_aniso on ``folder``'s ``star``; its M from the
    output's optics table."""
    from cryomag.io import read_star

    dt, peak, cpu_s = run_relion_ctf_refine(Path(relion_bin), Path(folder), Path(out), BOX,
                                            APIX, ["--fit_aniso"], star=star)  # fmt: skip
    ps = read_star(Path(out) / "particles_ctf_refine.star")
    mag = ps.mag_matrix(ps.groups_used()[0])
    return {"wall_s": dt, "peak_mb": peak, "cpu_s": cpu_s, "mag": np.asarray(mag).tolist()}


def one(what: str, src: str | None = None, **kw) -> dict:
    """One measurement in a fresh process (``src``: import cryomag from this folder)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    kw["t_exec"] = time.time()
    cmd = [sys.executable, __file__, "--one", json.dumps({"what": what, **kw})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    process_s = time.time() - kw["t_exec"]
    ok = out.returncode == 0 or (what == "cryomag" and out.returncode == 3)  # 3: a warning
    if not ok or not out.stdout.strip():
        raise RuntimeError(f"{what} exited {out.returncode}: {out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if "error" in res:
        raise RuntimeError(res["error"] + ": " + out.stderr[-3000:])
    if what == "cryomag":  # the process's whole life, less the measurement's own report
        res["wall_s"] = process_s - res["report_s"]
    return res


def _median(runs: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def first_particles(folder: Path, n: int) -> str:
    """A STAR file of ``folder``'s first ``n`` particles, written again (atomically, by
    ``write_star``) beside its particles.star, where the images' paths stay valid; returns
    its name."""
    from cryomag.io import read_star, write_star

    name = f"particles_first{n}.star"
    ps = read_star(folder / "particles.star")
    if not 0 < n < len(ps):
        raise SystemExit(f"--split {n}: expected 0 < N2 < {len(ps)} (the data set's size)")
    write_star(ps.select(np.arange(n)), folder / name)
    return name


def split_costs(n: int, wall: float, n2: int, wall2: float) -> tuple[float, float]:
    """The line through (n2, wall2) and (n, wall): (fixed part (s), ms per particle)."""
    per = (wall - wall2) / (n - n2)
    return wall - per * n, 1e3 * per


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cryomag-bench")
    ap.add_argument("--relion-bin", type=Path, default=os.environ.get("RELION_BIN"))
    ap.add_argument("--local", action="store_true",
                    help="also --fit scale,aniso,particle,micrograph,defocus")  # fmt: skip
    ap.add_argument("--local-ctf", choices=("micrograph", "exact"), default="micrograph",
                    help="the local models' data: real-like CTF input (default) or exact")
    ap.add_argument("--pads", default="0", help="window paddings to run (0 = automatic)")
    ap.add_argument("--split", type=int, default=0, metavar="N2",
                    help="also both tools on the first N2 particles: fixed and per-particle "
                    "parts of each one's time")
    ap.add_argument("--baseline-src", help="also the defaults with cryomag imported from this "
                    "folder (e.g. an older checkout's src), interleaved in the same run")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        kw = json.loads(a.one)
        what, t_exec = kw.pop("what"), kw.pop("t_exec")
        if what == "cryomag":
            m_cryomag(**kw, t_exec=t_exec)  # ends the process; its exit handler reports
        out = (m_relion(**kw) if what == "relion"
               else {"wall_s": floor_seconds(Path(kw["folder"]))})  # fmt: skip
        print(json.dumps(out))
        return 0
    # the bytecode an installed package has (pip compiles it; a source tree run with
    # PYTHONDONTWRITEBYTECODE would compile every module in every run)
    import compileall

    import cryomag
    from cryomag.simulation.simulator import load_truth

    for src in [Path(cryomag.__file__).parent, *([Path(a.baseline_src) / "cryomag"]
                                                 if a.baseline_src else [])]:  # fmt: skip
        compileall.compile_dir(str(src), quiet=1)
    cpu = cpu_model()
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, cores {os.cpu_count()} ({cpu}), "
          f"load {os.getloadavg()}")  # fmt: skip
    folder = dataset(a.cache, a.n)
    truth = np.asarray(load_truth(folder)["M_group"][0])
    runs: dict[str, list[dict]] = {"floor": []}
    cases = [(f"cryomag pad {'auto' if p == 0 else p}", GROUP_FIT, p, None, folder, None)
             for p in (int(x) for x in a.pads.split(","))]  # fmt: skip
    if a.baseline_src:
        cases.append(("cryomag baseline", GROUP_FIT, 0, a.baseline_src, folder, None))
    local_group = cases[0][0]  # the group fit the local models are compared with
    if a.local:
        lf = folder
        if a.local_ctf == "micrograph":
            lf = dataset(a.cache, a.n, ctf="micrograph")
            local_group = "cryomag group fit, real-like CTF"
            cases.append((local_group, GROUP_FIT, 0, None, lf, None))
            # the group fit with the defocus refined per micrograph (what its warning asks for)
            cases.append((MIC_GROUP, GROUP_FIT, 0, None, lf, {"defocus": "micrograph"}))
        cases.append(("cryomag local models", LOCAL_FIT, 0, None, lf, None))
        if a.baseline_src:
            cases.append(("cryomag baseline local models", LOCAL_FIT, 0, a.baseline_src, lf,
                          None))  # fmt: skip
    for name, *_ in cases:
        runs[name] = []
    if a.relion_bin:
        runs["relion"] = []
    small = first_particles(folder, a.split) if a.split else None
    if small:
        runs["cryomag small"] = []
        if a.relion_bin:
            runs["relion small"] = []
    work = Path(tempfile.mkdtemp(prefix="cryomag-speed-"))
    for _ in range(a.repeat):  # interleaved: the machine's load affects every tool alike
        runs["floor"].append(one("floor", folder=str(folder)))
        for name, fit, pad, src, data, options in cases:
            kw = {"options": options} if options else {}
            runs[name].append(one("cryomag", src, folder=str(data), fit=list(fit),
                                  window_pad=pad, **kw))  # fmt: skip
        if a.relion_bin:
            runs["relion"].append(one("relion", relion_bin=str(a.relion_bin),
                                      folder=str(folder), out=str(work / "relion")))  # fmt: skip
        if small:
            runs["cryomag small"].append(one("cryomag", folder=str(folder), fit=list(GROUP_FIT),
                                             window_pad=cases[0][2], star=small))  # fmt: skip
            if a.relion_bin:
                runs["relion small"].append(one("relion", relion_bin=str(a.relion_bin),
                                                folder=str(folder), out=str(work / "relion"),
                                                star=small))  # fmt: skip
    floor = _median(runs["floor"], "wall_s")
    print(f"{a.n} particles, box {BOX} at {APIX} A, medians of {a.repeat} run(s)")
    print(f"floor (read + rfft2, 1 thread, median of 3 reads per run): {floor:.3f} s")
    ref_name = cases[0][0]
    se = np.asarray(runs[ref_name][-1]["se"])
    summary: dict = {"n": a.n, "floor_s": floor, "cpu": cpu, "cores": os.cpu_count()}
    for name, *_ in cases:
        rr = runs[name]
        wall = _median(rr, "wall_s")
        last = rr[-1]
        parts = {k: _median(rr, k) for k in ("python_start_s", "imports_s", "estimate_s",
                                               "statistics_s")}  # fmt: skip
        # what the process took after its command: the interpreter's exit
        parts["exit_s"] = _median([{"x": r["wall_s"] - r["python_start_s"] - r["imports_s"]
                                    - r["estimate_s"]} for r in rr], "x")  # fmt: skip
        cpu_s = _median(rr, "cpu_s")
        print(f"{name}: {wall:.1f} s ({wall / floor:.0f}x floor; CPU {cpu_s:.1f} s; python start "
              f"{parts['python_start_s']:.1f} + imports {parts['imports_s']:.1f} + command "
              f"{parts['estimate_s']:.1f} + exit {parts['exit_s']:.2f} s, of which "
              f"statistics passes {parts['statistics_s']:.1f} s and inputs, outputs and plots "
              f"{parts['estimate_s'] - parts['statistics_s']:.1f} s); passes "
              f"{last['passes']}"
              + (f" in [{', '.join(f'{t:.2f}' for t in last['pass_s'])}] s"
                 if last.get("pass_s") else "")
              + "; peak RSS driver "
              f"{last['driver_peak_mb']:.0f} MB, worker {last['worker_peak_mb']:.0f} MB; "
              f"max |M - truth| {last['max_abs_error']:.1e} = {last['err_over_se']:.2f} SE "
              f"(SE {last['max_se']:.1e}); verdict {last.get('verdict', '?')}")  # fmt: skip
        summary[name] = {"wall_s": wall, "floor_ratio": wall / floor, "cpu_s": cpu_s, **parts,
                         "last": last}  # fmt: skip
    if a.baseline_src:
        b = summary["cryomag baseline"]
        now = summary[ref_name]
        dm = np.abs(np.subtract(now["last"]["mag"], b["last"]["mag"]))
        print(f"defaults now / baseline: wall {now['wall_s'] / b['wall_s']:.2f}, statistics "
              f"passes {now['statistics_s'] / b['statistics_s']:.2f}; M now - baseline: max "
              f"{dm.max():.1e} = {np.max(dm / se):.2f} SE")  # fmt: skip
    if a.local:
        ratio = summary["cryomag local models"]["wall_s"] / summary[local_group]["wall_s"]
        st = (summary["cryomag local models"]["statistics_s"]
              / summary[local_group]["statistics_s"])  # fmt: skip
        print(f"local models / group fit ({a.local_ctf} CTF): wall {ratio:.2f}, statistics "
              f"passes {st:.2f}")  # fmt: skip
        summary["local_over_group"] = ratio
        if MIC_GROUP in summary:
            r_mic = summary["cryomag local models"]["wall_s"] / summary[MIC_GROUP]["wall_s"]
            print(f"local models / group fit with --defocus micrograph: wall {r_mic:.2f}")
            summary["local_over_group_micrograph_defocus"] = r_mic
        if a.baseline_src:
            bl, bg = summary["cryomag baseline local models"], summary["cryomag baseline"]
            if a.local_ctf == "exact":  # the baseline's group fit ran on the same data
                print(f"baseline local models / baseline group fit: wall "
                      f"{bl['wall_s'] / bg['wall_s']:.2f}")  # fmt: skip
            print(f"local models now / baseline: wall "
                  f"{summary['cryomag local models']['wall_s'] / bl['wall_s']:.2f}")
    if a.relion_bin:
        rel = _median(runs["relion"], "wall_s")
        mag = np.asarray(runs["relion"][-1]["mag"])
        err = mag - truth
        rel_cpu = _median(runs["relion"], "cpu_s")
        ours = summary[ref_name]["wall_s"]
        ours_cpu = summary[ref_name]["cpu_s"]
        print(f"RELION ctf_refine --fit_aniso --j 2: {rel:.1f} s ({rel / floor:.0f}x floor; "
              f"CPU {rel_cpu:.1f} s); peak RSS {runs['relion'][-1]['peak_mb']:.0f} MB; max "
              f"|M - truth| {np.abs(err).max():.1e} = {np.max(np.abs(err) / se):.2f} SE "
              f"(cryomag's)")  # fmt: skip
        print(f"cryomag / RELION: {ours / rel:.2f}"
              + (f" (baseline {summary['cryomag baseline']['wall_s'] / rel:.2f})"
                 if a.baseline_src else "")
              + f"; CPU time {ours_cpu / rel_cpu:.2f}")  # fmt: skip
        summary["relion"] = {"wall_s": rel, "floor_ratio": rel / floor, "cpu_s": rel_cpu,
                             "mag": mag.tolist(), "cryomag_over_relion": ours / rel,
                             "cryomag_over_relion_cpu": ours_cpu / rel_cpu}  # fmt: skip
    else:
        print("RELION: not run (set RELION_BIN to a RELION 5 build's bin folder)")
    if small:
        tools = [("cryomag", summary[ref_name]["wall_s"], runs["cryomag small"])]
        if a.relion_bin:
            tools.append(("RELION", summary["relion"]["wall_s"], runs["relion small"]))
        split = {}
        for tool, wall, rs in tools:
            w2 = _median(rs, "wall_s")
            fixed, per = split_costs(a.n, wall, a.split, w2)
            split[tool] = {"wall_small_s": w2, "fixed_s": fixed, "ms_per_particle": per}
            print(f"{tool} on the first {a.split}: {w2:.1f} s; fixed part {fixed:.1f} s + "
                  f"{per:.2f} ms per particle (the line through {a.split} and {a.n})")
        if len(split) == 2:
            c, r = split["cryomag"], split["RELION"]
            per = c["ms_per_particle"] / r["ms_per_particle"]
            print(f"cryomag / RELION: per particle {per:.2f}, fixed part "
                  f"{c['fixed_s'] - r['fixed_s']:+.1f} s")  # fmt: skip
        summary["split"] = {"n_small": a.split, **split}
    print(f"load at end {os.getloadavg()}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
