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
from cryomag.workflows.estimate import EXACT_GRADIENT_BELOW_BOX
from cryomag.workflows.local_fits import LOCAL_FITS, fit_local

log = logging.getLogger("cryomag")


def refit(run, fits: tuple, out=None, plots: bool = True, defocus: str | None = None,
          astigmatism: str | None = None) -> dict:  # fmt: skip
    """Refit the local models of a run (Python API of ``cryomag refit``).

    The local models are single linear steps from the run's last pass, so they refit exactly
    from its statistics. Where the run refined the defocus, each model refits the defocus at
    its level with the magnification, as estimate does. Refining the defocus where the run
    held it, or at other levels, changes the state the statistics were linearised at: that
    needs a new pass, and is refused with a message saying so.

    Parameters
    ----------
    run : path
        Output folder of ``cryomag estimate``.
    fits : tuple of str
        Subset of ``particle``, ``micrograph``, ``defocus``.
    out : path, optional
        Output folder (default RUN/refit); never the run folder itself.
    defocus, astigmatism : str, optional
        The defocus levels; default (None) the run's. Anything else is refused (a new pass).

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
    run_opts = store.read_options(run)
    levels = _run_levels(run, run_opts, stats, dz, defocus, astigmatism)
    mean_dz = ps.defocus_mean_A()
    for g, st in stats.items():
        stored = dz[g]["mean_A"]
        if stored is not None and np.all(np.isfinite(stored)):
            mean_dz[st.rows] = stored
    joint = None
    if levels.active:
        joint = {
            g: (levels, dz[g]["deviation"], dz[g]["prior"], dz[g]["last_step"]) for g in stats
        }
    measured = run_opts.get("defocus_frame", "measured") != "true"
    # runs before the image-based gradient existed carry no key: they used the exact one
    small = int(ps.boxes_px().min()) < EXACT_GRADIENT_BELOW_BOX
    if run_opts.get("exact_gradient") is False and small:
        log.warning(
            "%s: statistics from the slice-image gradient on a box below %d px: local "
            "deviations read about 0.5 %% low; run estimate with the local fits (or "
            "--exact-gradient) for unattenuated values",
            run,
            EXACT_GRADIENT_BELOW_BOX,
        )
    summary = fit_local(
        ps, stats, mags, tuple(fits), defocus_A=mean_dz, defocus_measured=measured, joint=joint
    )
    out.mkdir(parents=True, exist_ok=True)
    from cryomag.io.mrc import rebase_image_names

    rebase_image_names(ps, out)
    write_star(ps, out / "particles.star")
    write_json(out / "results.json", {"fit": list(fits), "groups": summary})
    if plots:
        from cryomag.report.plots_local import plot_local

        plot_local(ps, summary, out / "plots")
    return summary


def _run_levels(run, run_opts, stats, dz, defocus, astigmatism):
    """The defocus levels of a run, checked against a refit's request (see :func:`refit`)."""
    from cryomag.fit.defocus import DefocusLevels

    stored = DefocusLevels(
        run_opts.get("defocus", "fixed") if run_opts.get("defocus") != "auto" else "fixed",
        run_opts.get("astigmatism", "fixed")
        if run_opts.get("astigmatism") != "auto"
        else "fixed",
    )
    want = DefocusLevels(defocus or stored.defocus, astigmatism or stored.astigmatism)
    if want != stored:
        raise ValueError(
            f"{run}: the run refined the defocus at levels defocus={stored.defocus}, "
            f"astigmatism={stored.astigmatism}; refitting at defocus={want.defocus}, "
            f"astigmatism={want.astigmatism} needs a new pass over the images (its statistics "
            "are linearised at the run's defocus): run cryomag estimate with --defocus "
            f"{want.defocus} --astigmatism {want.astigmatism}"
        )
    if stored.active:
        for g, st in stats.items():
            if st.layout["defocus"] is None or dz[g]["deviation"] is None:
                raise ValueError(
                    f"{run}: stats/group_{g:03d}.npz has no defocus statistics although the "
                    "run says the defocus was refined: rerun cryomag estimate"
                )
    return stored
