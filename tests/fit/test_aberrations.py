"""Aberrations refined per optics group jointly with M (issue 13): the parameters' basis in
RELION's conventions, and recovery of simulated values with calibrated standard errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import cryomag
from cryomag.fit.aberrations import AberrationTerms, parse_aberrations
from cryomag.io import read_star, write_star
from cryomag.physics.ctf import electron_wavelength_A
from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import load_truth, simulate_dataset


def test_parse_aberrations_names_shortcuts_and_errors():
    assert parse_aberrations("trefoil, tilt") == ("tilt", "trefoil")
    assert parse_aberrations("odd") == ("tilt", "trefoil")
    assert parse_aberrations("none") == () == parse_aberrations(None)
    assert len(AberrationTerms(parse_aberrations("all"))) == 9
    with pytest.raises(ValueError, match="unknown aberration 'coma'"):
        parse_aberrations("tilt,coma")


def _zernike(m: int, n: int, ux, uy):
    """RELION's Zernike::Z_cart with the radius unnormalised (CONVENTIONS_VERIFIED 9.2)."""
    from math import factorial

    r, phi = np.hypot(ux, uy), np.arctan2(uy, ux)
    am = abs(m)
    radial = sum(
        (-1) ** s * factorial(n - s) / (factorial(s) * factorial((n + am) // 2 - s)
                                        * factorial((n - am) // 2 - s)) * r ** (n - 2 * s)
        for s in range((n - am) // 2 + 1)
    )  # fmt: skip
    return radial * (np.cos(m * phi) if m >= 0 else np.sin(am * phi))


def test_basis_is_relion_zernike_and_insert_tilt():
    """The odd basis: beam tilt as RELION's TiltHelper::insertTilt turns it into odd Zernike
    coefficients (tilt_helper.cpp:557-574: Z3x = -pi Cs[mm] 2e4 lambda^2 t_x / 3, c1 += 2 Z3x,
    c4 += Z3x; indices 1 = Z(1,1), 4 = Z(1,3)), trefoil as Z(+-3,3); the even basis: minus
    RELION's Z(+-4,4), Z(+-2,4) (gamma = -chi) and the Cs term of chi."""
    rng = np.random.default_rng(0)
    ux, uy = rng.uniform(-0.4, 0.4, (2, 50))
    lam, cs = float(electron_wavelength_A(300.0)), 2.7
    terms = AberrationTerms(parse_aberrations("all"))
    b = dict(zip(terms.names, terms.basis(ux, uy, lam, cs), strict=True))
    z3x = -np.pi * cs * 2e4 * lam**2 * 1.0 / 3  # per mrad of t_x
    tilt_phase = 2 * z3x * _zernike(1, 1, ux, uy) + z3x * _zernike(1, 3, ux, uy)
    np.testing.assert_allclose(b["beam_tilt_x"], tilt_phase, rtol=1e-10, atol=1e-14)
    tilt_y = 2 * z3x * _zernike(-1, 1, ux, uy) + z3x * _zernike(-1, 3, ux, uy)
    np.testing.assert_allclose(b["beam_tilt_y"], tilt_y, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(b["odd_zernike_2"], _zernike(-3, 3, ux, uy), atol=1e-14)
    np.testing.assert_allclose(b["odd_zernike_5"], _zernike(3, 3, ux, uy), atol=1e-14)
    for idx, (m, n) in {4: (-4, 4), 8: (4, 4), 5: (-2, 4), 7: (2, 4)}.items():
        np.testing.assert_allclose(b[f"even_zernike_{idx}"], -_zernike(m, n, ux, uy),
                                   atol=1e-13)  # fmt: skip
    u2 = ux * ux + uy * uy
    np.testing.assert_allclose(b["cs"], -0.5 * np.pi * 1e7 * lam**3 * u2 * u2)
    with pytest.raises(ValueError, match="spherical aberration"):
        AberrationTerms(("tilt",)).basis(ux, uy, lam, 0.0)


# ------------------------------------------------------------------ recovery (simulated)
def _simulate(folder: Path, seed: int, n: int = 1200) -> Path:
    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(pixel_size_A=1.6, aniso=[1.01, 0.99, 30.0], box=64, n_particles=n,
                          particles_per_micrograph=20)  # fmt: skip
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.5
    cfg.noise.snr = 0.2
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 70.0, 1500
    cfg.render.n_workers = 1
    simulate_dataset(cfg, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory.mktemp("aberr"), 6)


FAST = {"progress": False, "plots": False, "nthreads": 1, "warm_start": 0}


def _with_cs(sim: Path, factor: float, out: Path) -> Path:
    ps = read_star(sim / "particles.star")
    ps.optics["rlnSphericalAberration"] = ps.optics["rlnSphericalAberration"] * factor
    write_star(ps, out)
    return out


def test_cs_off_by_two_percent_is_recovered_with_m(sim, tmp_path):
    """Cs written 2 % too high: refined back within 2.5 standard errors, M within its
    standard errors as with the right Cs, and the result written to the STAR and
    results.json; held wrong, M is measurably worse."""
    truth = load_truth(sim)
    wrong = _with_cs(sim, 1.02, sim / "wrong_cs.star")  # beside its stacks
    res = cryomag.estimate(wrong, sim / "ref.mrc", tmp_path / "run", aberrations="cs", **FAST)
    gr = res.groups[0]
    assert res.verdict == "ok" and gr.converged
    cs_true = 2.7
    se = float(np.sqrt(gr.aberration_cov[0, 0]))
    assert abs(gr.optics.cs_mm - cs_true) < 2.5 * se and se < 0.01 * cs_true, (gr.optics, se)
    m_err = np.abs(gr.mag - truth["M_group"][0])
    assert np.all(m_err < 3 * gr.mag_error), (m_err, gr.mag_error)
    # held wrong, the Cs error is read as an isotropic magnification (the coupled part)
    held = cryomag.estimate(wrong, sim / "ref.mrc", None, **FAST).groups[0]
    v = np.eye(2).reshape(4) / 2

    def iso_err(g):
        return abs(v @ (g.mag - truth["M_group"][0]).reshape(4)), np.sqrt(v @ g.covariance @ v)

    (e_fit, _), (e_held, se_held) = iso_err(gr), iso_err(held)
    assert e_held > 2.5 * se_held and e_held > 2 * e_fit, (e_held, se_held, e_fit)
    out = read_star(tmp_path / "run" / "particles.star")
    assert out.optics["rlnSphericalAberration"].iloc[0] == pytest.approx(gr.optics.cs_mm)
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    cs = summary["groups"][0]["aberrations"]["parameters"]["cs"]
    assert cs["input"] == pytest.approx(cs_true * 1.02) and cs["unit"] == "mm"
    assert cs["standard_error"] == pytest.approx(se)
    assert -1 < cs["correlation_with_isotropic_M"] < 0  # a larger Cs reads as a larger pixel


def test_no_aberration_found_where_there_is_none(sim):
    """The right Cs as input: the refined change is within 2.5 standard errors of 0."""
    res = cryomag.estimate(sim / "particles.star", sim / "ref.mrc", None, aberrations="cs",
                           **FAST)  # fmt: skip
    gr = res.groups[0]
    assert abs(gr.aberration[0]) < 2.5 * np.sqrt(gr.aberration_cov[0, 0])


# ------------------------------------------------------------------ Cramer-Rao bound
@pytest.mark.parametrize("groups", [("cs",), ("tilt", "trefoil"), ("tetrafoil", "astig4"),
                                    ("tilt", "trefoil", "cs", "tetrafoil")])
def test_aberration_standard_errors_are_the_cramer_rao_bound(groups):
    """40 particles of one group: the standard errors of the aberration parameters fitted
    jointly with M (4 elements) and the scales equal the Cramer-Rao bound of the exact
    forward model (Fisher information by central differences, scales profiled), within 8 %."""
    import dataclasses

    from cryomag.fit.accumulate import KernelOptions, chunk_statistics
    from cryomag.fit.defocus import DefocusLevels, solve_joint
    from cryomag.fit.statistics import GroupStatistics
    from cryomag.physics.forward import ParticleGeometry, predict
    from tests.fit.test_defocus import crb_setup, fisher_with_scales, noisy_spectra

    rng, ref, optics, band, geom, scale = crb_setup(7)
    n = len(geom)
    kx, ky = band.kx, band.ky
    terms = AberrationTerms(groups)
    k = len(terms)

    def model(dmag=np.zeros((2, 2)), dab=np.zeros(k)):
        g = ParticleGeometry(**{**geom.__dict__, "mag": np.eye(2) + dmag})
        o = terms.apply(optics, dab) if k else optics
        p = predict(ref, g, o, kx, ky)
        return p / np.linalg.det(np.eye(2) + dmag) * scale[:, None]  # amplitude to the scale

    clean = model()
    sigma = 0.6 * float(np.sqrt(np.mean(np.abs(clean) ** 2)))
    e = np.eye(4).reshape(4, 2, 2)
    hm = 1e-5
    steps = {"cs": 0.01, "beam_tilt_x": 0.01, "beam_tilt_y": 0.01}
    cols = [(model(dmag=hm * e[i]) - model(dmag=-hm * e[i])) / (2 * hm) for i in range(4)]
    for j, name in enumerate(terms.names):
        h = steps.get(name, 1e-3)
        d = np.zeros(k)
        d[j] = h
        cols.append((model(dab=d) - model(dab=-d)) / (2 * h))
    p_unit = clean / scale[:, None]
    ns = 4 + k
    fisher = fisher_with_scales(cols, p_unit, sigma)
    crb = np.sqrt(np.diag(np.linalg.inv(fisher))[4:ns])
    spectra, power = noisy_spectra(clean, band, sigma, rng)
    st = GroupStatistics.reduce(
        [chunk_statistics(ref, spectra, geom, dataclasses.replace(optics), band, power,
                          np.arange(n), KernelOptions(exact_gradient=True, aberrations=terms))]
    )  # fmt: skip
    sol = solve_joint(st, np.zeros(n), DefocusLevels(), n_aberration=k)
    se = np.sqrt(np.diag(sol.aberration_cov))
    np.testing.assert_allclose(se, crb, rtol=0.08)


# ------------------------------------------------------------------ issue 13's targets
#: The issue's aberrations: beam tilt 0.5 mrad, a trefoil of 0.3 rad at 3 A (Z(3,3)
#: coefficient 0.3 * 27 = 8.1 rad A^3), Cs written 2 % high.
TILT = (0.5, -0.3)
TREFOIL = 8.1  # Z(3,3): 0.3 rad at 3 A


def _simulate_aberrated(folder: Path, seed: int, n: int = 1500) -> Path:
    cfg = SimulationConfig(seed=seed)
    cfg.optics_groups = [
        OpticsGroupConfig(pixel_size_A=1.6, aniso=[1.01, 0.99, 30.0], box=64, n_particles=n,
                          particles_per_micrograph=20, beam_tilt_mrad=list(TILT),
                          odd_zernike=[0.0, 0.0, 0.0, 0.0, 0.0, TREFOIL])  # fmt: skip
    ]
    cfg.defocus.min_um, cfg.defocus.max_um = 0.5, 1.5
    cfg.noise.snr = 0.2
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 70.0, 1500
    cfg.render.n_workers = 1
    simulate_dataset(cfg, folder, progress=False)
    assert read_star(folder / "particles.star").aberrations(1)[0] == pytest.approx(TILT)
    return hide_aberrations(folder)


def hide_aberrations(folder: Path) -> Path:
    """``folder/unknown.star``: the simulated particles without their beam tilt and Zernike
    terms, and with Cs written 2 % high; returns ``folder``."""
    ps = read_star(folder / "particles.star")
    ps.set_aberrations(1, beam_tilt_mrad=(0.0, 0.0), odd=(), even=())
    ps.optics["rlnSphericalAberration"] = ps.optics["rlnSphericalAberration"] * 1.02
    write_star(ps, folder / "unknown.star")
    return folder


def found_and_truth(gr) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """A group's fitted aberration parameters (names, values, truth, standard errors) for a
    set simulated with TILT, TREFOIL and Cs 2.7 mm."""
    terms = gr.aberration_terms
    got = terms.values(gr.optics)
    se = np.sqrt(np.diag(gr.aberration_cov))
    truth = {"beam_tilt_x": TILT[0], "beam_tilt_y": TILT[1], "odd_zernike_2": 0.0,
             "odd_zernike_5": TREFOIL, "cs": 2.7}  # fmt: skip
    return terms.names, got, np.array([truth[n] for n in terms.names]), se


def test_tilt_trefoil_and_cs_are_recovered(tmp_path):
    """Beam tilt, trefoil and a 2 % Cs error, none of them in the STAR: each recovered within
    2.5 standard errors, written in RELION's columns, and M as accurate as with the
    aberrations known."""
    sim = _simulate_aberrated(tmp_path / "sim", 11)
    res = cryomag.estimate(sim / "unknown.star", sim / "ref.mrc", tmp_path / "run",
                           aberrations="tilt,trefoil,cs", **{**FAST, "plots": True})  # fmt: skip
    gr = res.groups[0]
    assert res.verdict == "ok" and gr.converged
    names, got, want, se = found_and_truth(gr)
    z = (got - want) / se
    assert np.all(np.abs(z) < 2.5), dict(zip(names, zip(got, se, strict=True),
                                              strict=True))  # fmt: skip
    assert se[names.index("beam_tilt_x")] < 0.1  # mrad
    m_err = np.abs(gr.mag - load_truth(sim)["M_group"][0])
    assert np.all(m_err < 3 * gr.mag_error), (m_err, gr.mag_error)
    out = read_star(tmp_path / "run" / "particles.star")
    tilt, odd, _ = out.aberrations(1)
    assert tilt == pytest.approx(tuple(got[:2]), rel=1e-9)
    assert odd[5] == pytest.approx(got[names.index("odd_zernike_5")], rel=1e-9)
    assert (tmp_path / "run" / "plots" / "aberrations_group001.png").exists()


def test_nothing_found_where_nothing_is(sim):
    """No aberration in the data, every term fitted: the changes are consistent with zero
    (chi-square of all of them with their covariance below its 99 % point, each within 3
    standard errors) and M's error stays within its (slightly larger) standard errors."""
    from scipy.stats import chi2

    res = cryomag.estimate(sim / "particles.star", sim / "ref.mrc", None, aberrations="all",
                           **FAST)  # fmt: skip
    gr = res.groups[0]
    d = gr.aberration
    cov = gr.aberration_cov
    stat = float(d @ np.linalg.solve(cov, d))
    assert stat < chi2.ppf(0.99, len(d)), (stat, d, np.sqrt(np.diag(cov)))
    assert np.all(np.abs(d) < 3 * np.sqrt(np.diag(cov)))
    plain = cryomag.estimate(sim / "particles.star", sim / "ref.mrc", None, **FAST).groups[0]
    truth = load_truth(sim)["M_group"][0]
    assert np.all(np.abs(gr.mag - truth) < 3 * gr.mag_error)
    assert np.all(gr.mag_error < 1.5 * plain.mag_error)
