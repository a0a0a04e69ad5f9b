"""Per-particle, per-micrograph and defocus-dependent magnification from stored statistics.

Every model here is linear in the increment of M around the group's fitted matrix M_g, so it
is solved from each particle's reduced 4x4 normal equations (scale profiled out, see
:mod:`cryomag.fit.anisomag`) without touching the images. With H_p, b_p the particle's
system linearised at M_lin (the matrix of the last pass) and D_g = M_g - M_lin, the gradient
at the group solution is b'_p = b_p - H_p vec(D_g), and a model vec(M_p) = vec(M_g) + J_p theta
has the normal equations (sum J_p^T H_p J_p) theta = sum J_p^T b'_p, covariance
chi2 / 2 (sum J^T H J)^-1.

Isotropic models scale the group matrix: M_p = (1 + delta) M_g, i.e. J_p = vec(M_g); an
isotropic magnification m_p = 1 + delta relative to the group.

Defocus-dependent magnification (illumination curvature): m_p = m_0 (1 + kappa (dz_p - dz_ref)),
linearised as delta_p = delta_0 + kappa (dz_p - dz_ref), dz_p the particle's mean defocus (A)
as the CTF models it. The CTF is held fixed as measured during these fits (only V(M k)
carries the magnification), so a CTF defocus that absorbed part of a magnification error on
the distorted micrograph does not trade off against kappa here; the defocus semantics are
those of the group fit (see :mod:`cryomag.workflows.estimate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the normal distribution from scipy.special: scipy.stats costs 0.3 s to import
from scipy.special import ndtr, ndtri

from cryomag.fit.anisomag import per_particle_system
from cryomag.fit.statistics import GroupStatistics
from cryomag.fit.unit_sums import unit_sums


@dataclass
class LinearFit:
    """theta with covariance for one unit or a pooled model."""

    theta: np.ndarray
    covariance: np.ndarray
    gain: float  # reduction of sum w |r|^2

    @property
    def standard_error(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(np.atleast_2d(self.covariance)), 0, None))


def _gradients(
    stats: GroupStatistics, m_lin: np.ndarray, m_group: np.ndarray, ctf_moves: bool = False
):
    h, b = per_particle_system(stats, ctf_moves=ctf_moves)
    d = (np.asarray(m_group) - np.asarray(m_lin)).ravel()
    if ctf_moves:
        # the group step moved the reference, not the measured CTF
        hx = _cross(stats)
        return h, b - hx @ d
    return h, b - h @ d


def _cross(stats: GroupStatistics) -> np.ndarray:
    """Reduced cross block between the ctf-moves parameters and the group parameters."""
    ok = stats.pp > 0
    pp = np.where(ok, stats.pp, 1.0)
    proj = np.vstack([np.eye(4), np.eye(4)])
    h8 = stats.hgg[:, :8, :8]
    hx = np.einsum("ia,nij->naj", proj, h8[:, :, :4])
    hpg8 = stats.hpg[:, :8] @ proj
    hx = hx - hpg8[:, :, None] * stats.hpg[:, None, :4] / pp[:, None, None]
    hx[~ok] = 0
    return hx


def _solve(a: np.ndarray, c: np.ndarray, chi2: float) -> LinearFit:
    a = np.atleast_2d(a)
    c = np.atleast_1d(c)
    ainv = np.linalg.pinv(a, rcond=1e-12)
    theta = ainv @ c
    return LinearFit(theta, ainv * chi2 / 2.0, float(c @ theta))


def unit_fits(
    stats: GroupStatistics,
    m_lin: np.ndarray,
    m_group: np.ndarray,
    labels: np.ndarray,
    isotropic: bool = True,
    ctf_moves: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit one isotropic (or full) increment per unit (particle or micrograph).

    Parameters
    ----------
    labels : ndarray, shape (N,)
        Unit of each particle of ``stats.rows`` (e.g. the row itself, or a micrograph id).

    Returns
    -------
    units : ndarray, shape (U,)
        The distinct labels.
    theta : ndarray, shape (U, d)
        delta (d = 1, isotropic) or vec(M_unit - M_g) (d = 4).
    cov : ndarray, shape (U, d, d)
    gain : ndarray, shape (U,)
        Reduction of sum w |r|^2 of each unit's fit.
    """
    ctf_moves = ctf_moves and stats.layout["mag_ctf"] is not None
    h, bp = _gradients(stats, m_lin, m_group, ctf_moves)
    chi2 = stats.chi2_per_pixel()
    units, inv = np.unique(labels, return_inverse=True)
    nu = len(units)
    if isotropic:
        v = np.asarray(m_group, float).ravel()
        a = np.bincount(inv, np.einsum("i,nij,j->n", v, h, v), minlength=nu)
        c = np.bincount(inv, bp @ v, minlength=nu)
        with np.errstate(divide="ignore", invalid="ignore"):
            theta = np.where(a > 0, c / a, np.nan)
            var = np.where(a > 0, chi2 / (2 * a), np.nan)
        return units, theta[:, None], var[:, None, None], np.where(a > 0, c * theta, 0.0)
    a = unit_sums(h, inv, nu)
    c = unit_sums(bp, inv, nu)
    theta = np.full((nu, 4), np.nan)
    cov = np.full((nu, 4, 4), np.nan)
    gain = np.zeros(nu)
    for u in range(nu):
        if np.linalg.matrix_rank(a[u]) == 4:
            f = _solve(a[u], c[u], chi2)
            theta[u], cov[u], gain[u] = f.theta, f.covariance, f.gain
    return units, theta, cov, gain


@dataclass
class DefocusModel:
    """m_p = m_0 (1 + kappa (dz_p - dz_ref)) for one group (isotropic part).

    Attributes
    ----------
    kappa_per_A : float
        kappa in 1/A of defocus.
    kappa_se_per_A : float
    delta0 : float
        Isotropic magnification at dz_ref relative to the group matrix.
    dz_ref_A : float
        Reference defocus (weighted mean of the group), A.
    z : float
        kappa / se; p_value is the two-sided p of kappa = 0.
    """

    kappa_per_A: float
    kappa_se_per_A: float
    delta0: float
    delta0_se: float
    dz_ref_A: float
    z: float
    p_value: float
    gain: float
    anisotropic: np.ndarray | None = None  # (2, 2) d vec(M) / d dz per A when fitted
    micrograph_scatter: float = 0.0  # isotropic scatter between micrographs not due to dz

    @property
    def kappa_percent_per_um(self) -> float:
        """kappa in % per micrometre of defocus."""
        return self.kappa_per_A * 1e4 * 100

    @property
    def kappa_se_percent_per_um(self) -> float:
        return self.kappa_se_per_A * 1e4 * 100

    def interval_percent_per_um(self, level: float = 0.95) -> tuple[float, float]:
        """Confidence interval of kappa (%/um)."""
        zq = float(ndtri(0.5 + level / 2))
        return (
            self.kappa_percent_per_um - zq * self.kappa_se_percent_per_um,
            self.kappa_percent_per_um + zq * self.kappa_se_percent_per_um,
        )

    def magnification(self, dz_A: np.ndarray) -> np.ndarray:
        """Predicted isotropic magnification relative to the group matrix at defocus dz."""
        return 1.0 + self.delta0 + self.kappa_per_A * (np.asarray(dz_A) - self.dz_ref_A)


def defocus_fit(
    stats: GroupStatistics,
    m_lin: np.ndarray,
    m_group: np.ndarray,
    dz_A: np.ndarray,
    anisotropic: bool = False,
) -> DefocusModel:
    """Weighted least-squares fit of the defocus model on the per-particle statistics.

    Parameters
    ----------
    dz_A : ndarray, shape (N,)
        Mean defocus of each particle of ``stats.rows`` (A).
    anisotropic : bool
        Also fit a full 2x2 defocus slope (reported in ``anisotropic``).
    """
    h, bp = _gradients(stats, m_lin, m_group)
    chi2 = stats.chi2_per_pixel()
    v = np.asarray(m_group, float).ravel()
    hv = np.einsum("i,nij,j->n", v, h, v)
    cv = bp @ v
    dz = np.asarray(dz_A, float)
    ok = hv > 0
    dz_ref = float(np.sum(hv[ok] * dz[ok]) / np.sum(hv[ok])) if ok.any() else float(dz.mean())
    x = dz - dz_ref
    a = np.array([[hv.sum(), (hv * x).sum()], [(hv * x).sum(), (hv * x * x).sum()]])
    c = np.array([cv.sum(), (cv * x).sum()])
    f = _solve(a, c, chi2)
    se = f.standard_error
    z = f.theta[1] / se[1] if se[1] > 0 else 0.0
    p = float(2 * ndtr(-abs(z)))
    aniso = None
    if anisotropic:
        big = np.zeros((8, 8))
        cc = np.zeros(8)
        hx = h.sum(0)
        hxx = np.einsum("n,nij->ij", x, h)
        hxxx = np.einsum("n,nij->ij", x * x, h)
        big[:4, :4], big[:4, 4:], big[4:, :4], big[4:, 4:] = hx, hxx, hxx, hxxx
        cc[:4], cc[4:] = bp.sum(0), (bp * x[:, None]).sum(0)
        fa = _solve(big, cc, chi2)
        aniso = fa.theta[4:].reshape(2, 2)
    return DefocusModel(
        kappa_per_A=float(f.theta[1]),
        kappa_se_per_A=float(se[1]),
        delta0=float(f.theta[0]),
        delta0_se=float(se[0]),
        dz_ref_A=dz_ref,
        z=float(z),
        p_value=p,
        gain=f.gain,
        anisotropic=aniso,
    )


def defocus_fit_mixed(
    stats: GroupStatistics,
    m_lin: np.ndarray,
    m_group: np.ndarray,
    dz_A: np.ndarray,
    micrographs: np.ndarray,
    unit_fitter=None,
) -> DefocusModel:
    """Defocus model with a random magnification offset per micrograph (meta-regression).

    Micrographs differ in magnification for reasons other than defocus (stage height,
    specimen charging, drift of the lenses); ignoring that scatter makes kappa's standard
    error far too small. Each micrograph's isotropic magnification x_i (variance v_i, from its
    particles' statistics) is modelled as delta_0 + kappa (dz_i - dz_ref) + u_i with
    u_i ~ N(0, tau^2); tau^2 is estimated by restricted maximum likelihood and kappa by
    weighted least squares with weights 1 / (v_i + tau^2). With fewer than 4 micrographs the
    particle-level fit :func:`defocus_fit` is returned.

    ``unit_fitter(labels, isotropic) -> (units, x, cov, gain)``: how each micrograph's
    magnification is fitted (default :func:`unit_fits`; with the defocus refined, the fit
    that refits each micrograph's defocus with it).
    """
    from scipy.optimize import minimize_scalar

    if unit_fitter is None:
        units, x, var, _ = unit_fits(stats, m_lin, m_group, micrographs, isotropic=True)
    else:
        units, x, var, _ = unit_fitter(micrographs, True)
    ok = np.isfinite(x[:, 0]) & np.isfinite(var[:, 0, 0])
    if ok.sum() < 4:
        return defocus_fit(stats, m_lin, m_group, dz_A)
    h, _ = per_particle_system(stats)
    v = np.asarray(m_group, float).ravel()
    hv = np.einsum("i,nij,j->n", v, h, v)
    _, inv = np.unique(micrographs, return_inverse=True)
    wsum = np.bincount(inv, hv, minlength=len(units))
    dzm = np.bincount(inv, hv * np.asarray(dz_A, float), minlength=len(units)) / np.where(
        wsum > 0, wsum, 1
    )
    xi, vi, di = x[ok, 0], var[ok, 0, 0], dzm[ok]
    dz_ref = float(np.sum(di / vi) / np.sum(1 / vi))
    design = np.stack([np.ones_like(di), di - dz_ref], axis=1)

    def fit(tau2):
        w = 1.0 / (vi + tau2)
        a = design.T @ (w[:, None] * design)
        beta = np.linalg.solve(a, design.T @ (w * xi))
        r = xi - design @ beta
        reml = np.sum(np.log(vi + tau2)) + np.linalg.slogdet(a)[1] + np.sum(w * r * r)
        return reml, beta, a

    upper = max(float(np.var(xi)) * 10, 1e-12)
    best = minimize_scalar(
        lambda t: fit(t)[0], bounds=(0.0, upper), method="bounded", options={"xatol": upper * 1e-6}
    )
    tau2 = float(best.x) if fit(best.x)[0] < fit(0.0)[0] else 0.0
    _, beta, a = fit(tau2)
    cov = np.linalg.inv(a)
    se = np.sqrt(np.diag(cov))
    z = beta[1] / se[1] if se[1] > 0 else 0.0
    p = float(2 * ndtr(-abs(z)))
    chi2 = stats.chi2_per_pixel()
    gain = float(np.sum(xi * xi / vi) - np.sum((xi - design @ beta) ** 2 / vi)) * chi2 / 2
    model = DefocusModel(
        kappa_per_A=float(beta[1]),
        kappa_se_per_A=float(se[1]),
        delta0=float(beta[0]),
        delta0_se=float(se[0]),
        dz_ref_A=dz_ref,
        z=float(z),
        p_value=p,
        gain=gain,
    )
    model.micrograph_scatter = float(np.sqrt(tau2))
    return model


def model_choice(
    stats: GroupStatistics,
    m_in: np.ndarray,
    m_lin: np.ndarray,
    m_group: np.ndarray,
    micrographs: np.ndarray,
    dz_A: np.ndarray,
) -> dict:
    """Compare none / global / per-micrograph / defocus-linear / per-particle by AIC and BIC.

    All models are evaluated in the quadratic (Gauss-Newton) approximation around the group
    solution; -2 log L = 2 sum w |r|^2 / chi2 for complex Gaussian noise with the fitted noise
    model. Values are relative to the global model; the lowest AIC is chosen.
    """
    chi2 = stats.chi2_per_pixel()
    h, _ = per_particle_system(stats)
    d = (np.asarray(m_in) - np.asarray(m_group)).ravel()
    n_obs = 2.0 * stats.npix.sum()
    loss_none = 2 * float(d @ h.sum(0) @ d) / chi2
    _, _, _, gain_mic = unit_fits(stats, m_lin, m_group, micrographs, isotropic=True)
    _, _, _, gain_part = unit_fits(stats, m_lin, m_group, stats.rows, isotropic=True)
    dm = defocus_fit(stats, m_lin, m_group, dz_A)
    n_mic = len(np.unique(micrographs))
    n_part = len(stats.rows)
    models = {
        "none": (loss_none, 0),
        "global": (0.0, 4),
        "per-micrograph": (-2 * gain_mic.sum() / chi2, 4 + n_mic),
        "defocus-linear": (-2 * dm.gain / chi2, 4 + 2),
        "per-particle": (-2 * gain_part.sum() / chi2, 4 + n_part),
    }
    out = {}
    for name, (dl, k) in models.items():
        out[name] = {
            "delta_minus2loglik": float(dl),
            "n_parameters": int(k),
            "aic": float(dl + 2 * k),
            "bic": float(dl + k * np.log(n_obs)),
        }
    best = min(out, key=lambda m: out[m]["aic"])
    return {"models": out, "chosen": best, "criterion": "aic"}
