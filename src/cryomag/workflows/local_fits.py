"""Per-particle, per-micrograph and defocus-dependent magnification: from the stored statistics.

Used by ``cryomag estimate --fit ...,particle,micrograph,defocus`` after the group fit and by
``cryomag refit DIR`` (no images read). Writes documented columns into the particle table:

=============================  ==================================================================
``cmagParticleMag``            isotropic magnification of the particle relative to its group's M,
                               shrunk toward the group (empirical Bayes); 1 = the group
``cmagParticleMagRaw``         the same, unshrunk (the particle's own least-squares value)
``cmagParticleMagError``       standard error of the raw value
``cmagParticleMagMat00..11``   the particle's full matrix M_p (RELION convention, absolute),
                               anisotropic fit shrunk toward the group
``cmagMicrographMag``          isotropic magnification of the micrograph relative to the group
                               (shrunk); ``cmagMicrographMagRaw``, ``cmagMicrographMagError``
``cmagMicrographMagMat00..11`` the micrograph's full matrix (absolute, shrunk)
``cmagDefocusMag``             the defocus model's magnification at the particle's defocus,
                               relative to the group
=============================  ==================================================================
"""

from __future__ import annotations

import logging

import numpy as np

from cryomag.fit.defocus import unit_mag_fits
from cryomag.fit.hierarchy import shrink
from cryomag.fit.local import defocus_fit, defocus_fit_mixed, model_choice, unit_fits
from cryomag.fit.statistics import GroupStatistics
from cryomag.model.particles import ParticleSet

log = logging.getLogger("cryomag")

LOCAL_FITS = ("particle", "micrograph", "defocus")
MAT = ("00", "01", "10", "11")


def true_defocus(
    stats: GroupStatistics,
    m_in: np.ndarray,
    m_lin: np.ndarray,
    m_group: np.ndarray,
    dz_measured_A: np.ndarray,
    micrographs: np.ndarray,
    iterations: int = 4,
    unit_fitter=None,
):
    """Specimen-frame defocus of each particle and the defocus model fitted against it.

    Defocus measured on an image magnified by m (relative to the frame of the input's CTF,
    M_in) reads m^2 times the true value (the CTF phase goes with |M k|^2). The magnification
    model m_p = m0 (1 + kappa (dz_p - dz_ref)) refers to the true defocus; fitting it against
    the measured one would read kappa low by about 2 kappa dz (1.6 % at 0.5 %/um and
    1.6 um). The fit alternates: dz = dz_measured / (g (1 + delta0 + kappa (dz - dz_ref)))^2,
    g^2 = det(M_group M_in^-1), then the model on dz (the model's prediction, not each
    micrograph's noisy estimate, so the regressor carries no noise of the response).

    Returns
    -------
    dz_true : ndarray, shape (N,), A
    model : DefocusModel (:func:`cryomag.fit.local.defocus_fit_mixed` on ``dz_true``)
    """
    g2 = float(np.linalg.det(np.asarray(m_group, float) @ np.linalg.inv(np.asarray(m_in, float))))
    dz_meas = np.asarray(dz_measured_A, float)
    dz = dz_meas / g2
    dm = defocus_fit_mixed(stats, m_lin, m_group, dz, micrographs, unit_fitter)
    for _ in range(iterations):
        rel = 1 + dm.delta0 + dm.kappa_per_A * (dz - dm.dz_ref_A)
        dz = dz_meas / (g2 * rel * rel)
        dm = defocus_fit_mixed(stats, m_lin, m_group, dz, micrographs, unit_fitter)
    return dz, dm


def _fitter(stats, m_lin, m_g, mics, joint, unit, capture=None):
    """``fit(labels, isotropic) -> (units, theta, cov, gain)``: the plain per-unit fit, or,
    with the defocus refined (``joint`` = (levels, deviation, prior, last step)), the one
    that refits the unit's defocus with its magnification
    (:func:`cryomag.fit.defocus.unit_mag_fits`);
    ``capture`` (a dict) then receives the defocus change of the isotropic fit."""
    if joint is None:
        # a particle's defocus was measured for its micrograph: its CTF moves with it
        moves = unit == "particle"
        return lambda labels, iso: unit_fits(stats, m_lin, m_g, labels, iso, moves)
    levels, deviation, prior, last_step = joint
    return lambda labels, iso: unit_mag_fits(
        stats, m_lin, m_g, labels, mics, levels, iso, unit, deviation=deviation, prior=prior,
        defocus_shift=last_step, defocus_out=capture if iso else None,
        ctf_moves=unit == "particle",
    )  # fmt: skip


def _shrunk_iso(fit, labels):
    units, theta, var, _ = fit(labels, True)
    res = shrink(theta[:, 0], var[:, 0, 0])
    # units shrink left out (no finite estimate, a variance <= 0): the mean
    post = np.where(np.isfinite(res.posterior[:, 0]), res.posterior[:, 0], res.mean[0])
    return units, theta[:, 0], np.sqrt(var[:, 0, 0]), post, res


def _shrunk_aniso(fit, labels):
    units, theta, cov, _ = fit(labels, False)
    ok = np.all(np.isfinite(theta), axis=1)
    out = np.tile(np.zeros(4), (len(units), 1))
    res = None
    if ok.sum() >= 3:
        res = shrink(theta, cov)
        # units shrink left out (no finite estimate, a covariance not positive definite)
        valid = np.all(np.isfinite(res.posterior), axis=1)
        out = np.where(valid[:, None], res.posterior, res.mean)
    return units, out, res


def fit_local(
    ps: ParticleSet,
    stats: dict[int, GroupStatistics],
    mags: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
    fits: tuple,
    defocus_A: np.ndarray | None = None,
    defocus_measured: bool = True,
    joint: dict | None = None,
    defocus_updates: dict | None = None,
) -> dict:
    """Run the local fits of every group and write their columns into ``ps.particles``.

    Parameters
    ----------
    ps : ParticleSet
        The output set (columns are added in place).
    stats : dict
        Optics group number -> GroupStatistics of the last pass.
    mags : dict
        Optics group number -> (M_in, M_lin, M_group): the input matrix, the linearisation
        point of the statistics and the fitted group matrix.
    fits : tuple of str
        Any of ``particle``, ``micrograph``, ``defocus``.
    defocus_A : ndarray, shape (N,), optional
        Mean defocus per particle as the CTF models it; default from the table.
    defocus_measured : bool
        The defocus was measured on the distorted images (the input's CTF frame, M_in): the
        defocus model is then fitted against the true defocus, dz = dz_measured / m^2 with m
        the particle's isotropic magnification relative to M_in as the model predicts it
        (:func:`true_defocus`). False: the defocus is already in the specimen frame.
    joint : dict, optional
        Optics group number -> (DefocusLevels, deviation (N, k_p), prior T (k_p, k_p),
        last step (N, 3) or None) where the defocus was refined with M (the particles'
        deviations from their micrograph, their prior and each particle's defocus change
        (a00, a01, a11, A) in the step after the statistics' pass,
        :class:`cryomag.fit.defocus.JointSolution`): every local model then
        refits the defocus at its level with the magnification
        (:func:`cryomag.fit.defocus.unit_mag_fits`); ``defocus_A`` should be the refined
        defocus.
    defocus_updates : dict, optional
        With ``joint``: receives, per optics group number, each particle's defocus change
        (N, 3) (a00, a01, a11, A) in the richest local model fitted (per micrograph, else per
        particle): the defocus that goes with the local magnification.

    Returns
    -------
    dict
        Per optics-group number: the JSON summary (defocus model with kappa, its 95 %
        interval and the test of kappa = 0; real scatter per particle and per micrograph with
        standard errors; model choice).
    """
    n = len(ps)
    dz_all = ps.defocus_mean_A() if defocus_A is None else np.asarray(defocus_A, float)
    mics_all = ps.micrographs()
    new_cols: dict[str, np.ndarray] = {}

    def col(name, fill=np.nan):
        if name not in new_cols:
            new_cols[name] = np.full(n, fill)
        return new_cols[name]

    summary = {}
    for g, st in stats.items():
        n_est = int(np.count_nonzero(st.matrix_estimated))
        if n_est:
            # cryomag estimate never gets here (its local fits' passes form every matrix);
            # refit from a group fit's statistics does
            log.warning(
                "optics group %d: the statistics' pass estimated the Gauss-Newton matrix of "
                "%d of %d particles (the group fit's lean matrix, which the group's M needs "
                "only summed): the local models from it are approximate (measured: the "
                "particles' standard errors 4 %% rms off, at most 13 %%; the micrographs' 3 "
                "%%, at most 7 %%); for exact ones run cryomag estimate with the local fits",
                g, n_est, len(st.rows),
            )  # fmt: skip
        m_in, m_lin, m_g = (np.asarray(x, float) for x in mags[g])
        rows = st.rows
        mics = mics_all[rows]
        dz = dz_all[rows]
        out: dict = {}
        joint_g = (joint or {}).get(g)
        got = {"particle": {}, "micrograph": {}}
        fit_p = _fitter(st, m_lin, m_g, mics, joint_g, "particle", got["particle"])
        fit_m = _fitter(st, m_lin, m_g, mics, joint_g, "micrograph", got["micrograph"])
        if "particle" in fits:
            _, raw, se, post, res = _shrunk_iso(fit_p, rows)
            col("cmagParticleMag")[rows] = 1 + post
            col("cmagParticleMagRaw")[rows] = 1 + raw
            col("cmagParticleMagError")[rows] = se
            _, post4, res4 = _shrunk_aniso(fit_p, rows)
            mp = m_g.ravel()[None] + post4
            for j, c in enumerate(MAT):
                col(f"cmagParticleMagMat{c}")[rows] = mp[:, j]
            out["particle"] = {
                "isotropic_scatter": float(res.scatter[0]),
                "isotropic_scatter_se": float(res.scatter_se[0]),
                "median_standard_error": float(np.nanmedian(se)),
                "mean_shrinkage_weight": float(np.nanmean(res.weight)),
                "anisotropic_scatter": res4.scatter.tolist() if res4 is not None else None,
            }
        if "micrograph" in fits:
            units, raw, se, post, res = _shrunk_iso(fit_m, mics)
            lookup = {u: i for i, u in enumerate(units)}
            idx = np.array([lookup[m] for m in mics])
            col("cmagMicrographMag")[rows] = 1 + post[idx]
            col("cmagMicrographMagRaw")[rows] = 1 + raw[idx]
            col("cmagMicrographMagError")[rows] = se[idx]
            _, post4, res4 = _shrunk_aniso(fit_m, mics)
            mm = m_g.ravel()[None] + post4
            for j, c in enumerate(MAT):
                col(f"cmagMicrographMagMat{c}")[rows] = mm[idx, j]
            out["micrograph"] = {
                "n_micrographs": len(units),
                "isotropic_scatter": float(res.scatter[0]),
                "isotropic_scatter_se": float(res.scatter_se[0]),
                "median_standard_error": float(np.nanmedian(se)),
                "values": {str(u): float(1 + p) for u, p in zip(units, post, strict=True)},
            }
        if "defocus" in fits:
            if defocus_measured:
                dz, dm = true_defocus(st, m_in, m_lin, m_g, dz, mics, unit_fitter=fit_m)
            else:
                dm = defocus_fit_mixed(st, m_lin, m_g, dz, mics, fit_m)
            aniso = defocus_fit(st, m_lin, m_g, dz, anisotropic=True).anisotropic
            col("cmagDefocusMag")[rows] = dm.magnification(dz)
            lo, hi = dm.interval_percent_per_um(0.95)
            out["defocus"] = {
                "kappa_percent_per_um": dm.kappa_percent_per_um,
                "kappa_se_percent_per_um": dm.kappa_se_percent_per_um,
                "kappa_ci95_percent_per_um": [lo, hi],
                "kappa_per_A": dm.kappa_per_A,
                "z": dm.z,
                "p_value_kappa_zero": dm.p_value,
                "dz_ref_A": dm.dz_ref_A,
                "magnification_at_dz_ref": 1 + dm.delta0,
                "micrograph_scatter_not_from_defocus": dm.micrograph_scatter,
                "method": "micrograph-level meta-regression with REML random offsets",
                "anisotropic_slope_per_um": (aniso * 1e4).tolist(),
            }
        out["model_choice"] = model_choice(st, m_in, m_lin, m_g, mics, dz)
        summary[int(g)] = out
        if defocus_updates is not None and joint_g is not None:
            best = got["micrograph"] or got["particle"]
            if best:
                defocus_updates[int(g)] = best
    for name, values in new_cols.items():
        ps.particles[name] = values
    return summary


def print_local_summary(summary: dict, console) -> None:
    """Print kappa, the real scatter and the chosen model of each group."""
    for num, info in summary.items():
        lines = [f"[bold]Optics group {num}[/]"]
        if "defocus" in info:
            d = info["defocus"]
            lo, hi = d["kappa_ci95_percent_per_um"]
            lines.append(
                f"  defocus-dependent magnification: kappa = {d['kappa_percent_per_um']:.4f} "
                f"%/um (95 % interval {lo:.4f} .. {hi:.4f}; p(kappa = 0) = "
                f"{d['p_value_kappa_zero']:.2g})"
            )
        for unit in ("micrograph", "particle"):
            if unit in info:
                u = info[unit]
                lines.append(
                    f"  per-{unit} isotropic scatter: {100 * u['isotropic_scatter']:.3f} % "
                    f"(+- {100 * u['isotropic_scatter_se']:.3f} %), median standard error "
                    f"{100 * u['median_standard_error']:.3f} %"
                )
        mc = info.get("model_choice")
        if mc:
            lines.append(f"  model chosen by AIC: {mc['chosen']}")
        console.print("\n".join(lines))
