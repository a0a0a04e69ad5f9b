"""``cryomag refit``: refit local magnification models from a run's stored statistics.

Reads RUN/particles.star and RUN/stats/group_NNN.npz written by ``cryomag estimate`` and fits
the per-particle, per-micrograph and defocus models again (any subset) without reading a
single image. Writes OUT/particles.star and OUT/results.json (and plots).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cryomag.fit.statistics import SECOND_ORDER_FIELDS, GroupStatistics
from cryomag.io.atomic import read_json, write_json
from cryomag.model.particles import ParticleDataError
from cryomag.workflows.local_fits import LOCAL_FITS, fit_local, mean_defocus_A

log = logging.getLogger("cryomag")

#: Arrays every stored group must have (the second-order ones are optional: runs before
#: they existed, and the local fits do not use them).
STAT_FIELDS = tuple(f for f in GroupStatistics.__dataclass_fields__ if f not in SECOND_ORDER_FIELDS)


def load_statistics(run: Path, group_numbers: np.ndarray) -> tuple[dict, dict, dict]:
    """GroupStatistics, (M_in, M_lin, M) and input defocus per group row, from RUN/stats."""
    stats, mags, dz = {}, {}, {}
    folder = Path(run) / "stats"
    if not folder.is_dir():
        raise ParticleDataError(f"{folder}: no stored statistics (run cryomag estimate first)")
    for g, num in enumerate(group_numbers):
        path = folder / f"group_{int(num):03d}.npz"
        if not path.exists():
            continue
        with np.load(path) as z:
            missing = [f for f in STAT_FIELDS if f not in z.files]
            if missing:
                raise ParticleDataError(f"{path}: missing arrays {missing}")
            arrays = {f: z[f] for f in STAT_FIELDS}
            arrays.update({f: z[f] for f in SECOND_ORDER_FIELDS if f in z.files})
            stats[g] = GroupStatistics(**arrays)
            mags[g] = (z["mag_in"], z["mag_lin"], z["mag"])
            dz[g] = z["defocus_mean_A"] if "defocus_mean_A" in z.files else None
    if not stats:
        raise ParticleDataError(f"{folder}: no group_NNN.npz files")
    return stats, mags, dz


def refit(run, fits: tuple, out=None, plots: bool = True) -> dict:
    """Refit the local models of a run (Python API of ``cryomag refit``).

    Parameters
    ----------
    run : path
        Output folder of ``cryomag estimate``.
    fits : tuple of str
        Subset of ``particle``, ``micrograph``, ``defocus``.
    out : path, optional
        Output folder (default RUN/refit); never the run folder itself.

    Returns
    -------
    dict
        The per-group summary (as in results.json "local").
    """
    from cryomag.io import read_star, write_star

    run = Path(run)
    bad = set(fits) - set(LOCAL_FITS)
    if bad or not fits:
        raise ValueError(f"refit: choose from {', '.join(LOCAL_FITS)}; got {sorted(fits)}")
    out = Path(out) if out is not None else run / "refit"
    if out.resolve() == run.resolve():
        raise ValueError(f"{out}: refit writes to a new folder, not into the run folder")
    ps = read_star(run / "particles.star")
    stats, mags, dz = load_statistics(run, ps.group_numbers())
    defocus = mean_defocus_A(ps)
    for g, st in stats.items():
        if dz[g] is not None and np.all(np.isfinite(dz[g])):
            defocus[st.rows] = dz[g]
    options_file = run / "stats" / "options.json"
    run_opts = read_json(options_file, "estimate options") if options_file.is_file() else {}
    measured = run_opts.get("defocus_frame", "measured") != "true"
    # runs before the image-based gradient existed carry no key: they used the exact one
    if run_opts.get("exact_gradient") is False:
        log.warning(
            "%s: statistics from the slice-image gradient: local deviations read about "
            "1 %% low; run estimate with the local fits (or --exact-gradient) for "
            "unattenuated values",
            run,
        )
    summary = fit_local(ps, stats, mags, tuple(fits), defocus_A=defocus, defocus_measured=measured)
    out.mkdir(parents=True, exist_ok=True)
    from cryomag.io.mrc import rebase_image_names

    rebase_image_names(ps, out)
    write_star(ps, out / "particles.star")
    write_json(out / "results.json", {"fit": list(fits), "groups": summary})
    if plots:
        from cryomag.report.plots_local import plot_local

        plot_local(ps, summary, out / "plots")
    return summary
