"""Fingerprints of every engine's numbers, to prove a refactor changes none of them.

Runs a fixed set of small scenarios (estimate in each mode, refit, merge, reconstruct, apply)
synchronously with one finufft thread, and prints (or stores) a SHA-256 per scenario and per
array: the statistics of every pass the engine reduced, the fitted values, results.json
without timings, and the written STAR tables. Run it before and after a change:

    python bench/check_identical.py --save /tmp/before.json
    ... change ...
    python bench/check_identical.py --compare /tmp/before.json

Exit status 1 when any fingerprint differs (the differing keys are listed). Options that a
change adds to results.json are ignored (only keys present in both are compared); any value
that exists in both must be identical bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _array_sha(a) -> str:
    a = np.ascontiguousarray(np.asarray(a))
    if a.dtype == object:
        return _sha(repr(a.tolist()).encode())
    return _sha(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())


def _flatten(obj, prefix=""):
    """JSON tree -> {dotted key: leaf}."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and obj and isinstance(obj[0], (dict, list)):
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


SKIP_JSON = ("timings", "options.", "command", "version", "created", "elapsed", "started")


def _json_prints(path: Path, label: str) -> dict:
    data = json.loads(path.read_text())
    flat = _flatten(data)
    return {
        f"{label}:{k}": _sha(json.dumps(v, sort_keys=True).encode())
        for k, v in flat.items()
        if not any(s in k for s in SKIP_JSON)
        and not (isinstance(v, str) and ("/" in v or "\\" in v))  # paths of the work folder
    }


def _star_prints(path: Path, label: str) -> dict:
    import starfile

    blocks = starfile.read(path, always_dict=True)
    out = {}
    for name, df in blocks.items():
        for col in df.columns:
            if col == "rlnImageName":
                continue
            out[f"{label}:{name}.{col}"] = _array_sha(df[col].to_numpy())
    return out


def _stats_prints(stats: dict, label: str) -> dict:
    out = {}
    for g, st in sorted(stats.items()):
        arrays = st.as_arrays() if hasattr(st, "as_arrays") else st
        for k, v in sorted(arrays.items()):
            out[f"{label}:stats[{g}].{k}"] = _array_sha(v)
    return out


def _sim(folder: Path, seed: int, groups, n: int, kappa=0.3, mic=0.3, true_defocus=False):
    from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
    from cryomag.simulation.simulator import simulate_dataset

    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(
            name=f"g{i}",
            pixel_size_A=apix,
            true_pixel_size_A=true_apix,
            aniso=[1.01, 0.99, 30.0],
            box=box,
            n_particles=n,
            particles_per_micrograph=20,
        )
        for i, (apix, true_apix, box) in enumerate(groups)
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.6, 1.6
    cfg.noise.snr = 0.5
    cfg.magnification.kappa_pct_per_um = kappa
    cfg.magnification.mic_iso_std_pct = mic
    cfg.phantom.diameter_A = 50.0
    cfg.phantom.n_atoms = 800
    cfg.output.true_defocus = true_defocus
    cfg.render.n_workers = 1
    simulate_dataset(cfg, folder, progress=False)
    return folder


def run(work: Path, only: set[str] | None = None) -> dict:
    import cryomag
    from cryomag.execution import ExecutorConfig
    from cryomag.workflows import apply as apply_wf
    from cryomag.workflows import merge as merge_wf
    from cryomag.workflows import reconstruct as recon_wf
    from cryomag.workflows import refit as refit_wf

    prints: dict[str, str] = {}
    sim = _sim(work / "sim", 1, [(1.6, None, 48), (1.4, 1.41, 56)], 240)
    star, ref = sim / "particles.star", sim / "ref.mrc"
    base = dict(progress=False, nthreads=1, executor=ExecutorConfig(j=1, threads=1))
    scenarios = {
        "default": {},
        "pad1_warm": {"window_pad": 1, "warm_start": 60},
        "local": {"fit": ("scale", "aniso", "particle", "micrograph", "defocus")},
        # the local models with the defocus held (the behaviour before it was refined)
        "local_held": {
            "fit": ("scale", "aniso", "particle", "micrograph", "defocus"),
            "defocus": "fixed",
            "astigmatism": "fixed",
        },
        "true_frame": {"defocus_frame": "true", "window_pad": 1},
        "exact_norelin": {"exact_gradient": True, "relinearise": False, "window_pad": 2},
        "fixed_scale": {"joint_scale": False, "fit": ("scale", "aniso"), "curvature_every": 1},
    }
    for name, opts in scenarios.items():
        if only and name not in only:
            continue
        out = work / f"est_{name}"
        res = cryomag.estimate(star, ref, out, plots=False, **base, **opts)
        prints.update(_stats_prints(res.stats, name))
        prints.update(_stats_prints(res.first_stats, name + ".first"))
        prints[f"{name}:scales"] = _array_sha(res.scales.normalised)
        prints[f"{name}:scale_err"] = _array_sha(res.scales.error)
        for gr in res.groups:
            prints[f"{name}:M[{gr.group}]"] = _array_sha(gr.mag)
            prints[f"{name}:Mcov[{gr.group}]"] = _array_sha(gr.covariance)
        prints.update(_json_prints(out / "results.json", name))
        prints.update(_star_prints(out / "particles.star", name))
    if not only or "half" in only:
        out = work / "est_half"
        res = cryomag.estimate(star, None, out, half_maps=(ref, ref), plots=False, **base)
        prints.update(_stats_prints(res.stats, "half"))
        prints.update(_json_prints(out / "results.json", "half"))
    if not only or "dask" in only:
        # the command line's parallel execution (named when it was a Dask LocalCluster; local
        # worker processes on Linux now): two workers, the synchronous run's numbers
        out = work / "est_dask"
        res = cryomag.estimate(
            star, ref, out, plots=False, progress=False, nthreads=1,
            executor=ExecutorConfig(j=2, threads=1),
        )  # fmt: skip
        prints.update(_stats_prints(res.stats, "dask"))
        prints.update(_json_prints(out / "results.json", "dask"))
    if (not only or "refit" in only) and (work / "est_local").exists():
        out = work / "refit"
        refit_wf.refit(work / "est_local", ("particle", "micrograph", "defocus"), out, plots=False)
        prints.update(_json_prints(out / "results.json", "refit"))
        prints.update(_star_prints(out / "particles.star", "refit"))
    if not only or "reconstruct" in only:
        r = recon_wf.reconstruct(star, work / "recon", nthreads=1, progress=False)
        prints["reconstruct:half1"] = _array_sha(r.half1)
        prints["reconstruct:full"] = _array_sha(r.full)
        prints["reconstruct:fsc"] = _array_sha(r.fsc)
        prints.update(_json_prints(work / "recon" / "fsc.json", "reconstruct"))
    if (not only or "apply" in only) and (work / "est_default").exists():
        apply_wf.apply(work / "est_default", work / "apply", resample=True, progress=False)
        import mrcfile

        for p in sorted((work / "apply").rglob("*.mrcs")):
            with mrcfile.open(p, permissive=True) as m:
                prints[f"apply:{p.name}"] = _array_sha(m.data)
    if not only or "merge" in only:
        sim2 = _sim(work / "sim2", 2, [(1.3, 1.32, 56)], 200)
        merge_wf.merge(
            [star, sim2 / "particles.star"], work / "merge", ref, progress=False, nthreads=1,
            executor=ExecutorConfig(j=1, threads=1), plots=False,
        )  # fmt: skip
        prints.update(_json_prints(work / "merge" / "merge.json", "merge"))
    return prints


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", type=Path, help="store the fingerprints as JSON")
    ap.add_argument("--compare", type=Path, help="compare with stored fingerprints")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="cryomag-identical-"))
    work.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s} or None
    try:
        prints = run(work, only)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(prints)} fingerprints")
    if args.save:
        args.save.write_text(json.dumps(prints, indent=0, sort_keys=True))
    if args.compare:
        old = json.loads(args.compare.read_text())
        common = sorted(set(old) & set(prints))
        diff = [k for k in common if old[k] != prints[k]]
        gone = sorted(set(old) - set(prints))
        new = sorted(set(prints) - set(old))
        print(f"compared {len(common)}: {len(diff)} differ; {len(gone)} missing, {len(new)} new")
        by_scenario: dict[str, int] = {}
        for k in diff:
            name = k.split(":")[0].split(".")[0]
            by_scenario[name] = by_scenario.get(name, 0) + 1
        if by_scenario:
            print("differing fingerprints by scenario: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(by_scenario.items())))  # fmt: skip
        same = sorted({k.split(":")[0].split(".")[0] for k in common} - set(by_scenario))
        print("scenarios identical: " + ", ".join(same))
        for k in diff[:60]:
            print("  DIFFERS", k)
        for k in gone[:20]:
            print("  MISSING", k)
        return 1 if diff or gone else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
