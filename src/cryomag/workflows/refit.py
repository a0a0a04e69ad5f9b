"""``cryomag refit``: refit local magnification models from a run's stored statistics.

Reads RUN/particles.star and RUN/stats/group_NNN.npz written by ``cryomag estimate`` and fits
the per-particle, per-micrograph and defocus models again (any subset) without reading a
single image. Writes OUT/particles.star and OUT/results.json (and plots).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cryomag.io import stats as store
from cryomag.io.atomic import write_json
from cryomag.workflows.local_fits import LOCAL_FITS, fit_local

log = logging.getLogger("cryomag")


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
    stats, mags, dz = store.load_run(run, ps.group_numbers())
    defocus = ps.defocus_mean_A()
    for g, st in stats.items():
        if dz[g] is not None and np.all(np.isfinite(dz[g])):
            defocus[st.rows] = dz[g]
    run_opts = store.read_options(run)
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
