"""The console summary's line on the particles' deviations from their micrograph."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
from rich.console import Console

from cryomag.fit.defocus import JointSolution
from cryomag.report.console import _print_particle_deviations
from cryomag.workflows.estimate import EstimateOptions


def _printed(defocus: str, astigmatism: str, prior: np.ndarray) -> str:
    k = len(prior)
    sol = SimpleNamespace(particle=np.zeros((5, k)), prior=prior,
                          prior_se=np.full(k, 0.5))  # fmt: skip
    sol.prior_spread = JointSolution.prior_spread.fget(sol)
    sol.prior_correlation = JointSolution.prior_correlation.fget(sol)
    res = SimpleNamespace(options=EstimateOptions(defocus=defocus, astigmatism=astigmatism),
                          groups=[SimpleNamespace(group=1, defocus_solution=sol)])  # fmt: skip
    out = io.StringIO()
    _print_particle_deviations(res, Console(file=out, width=1000, no_color=True))
    return " ".join(out.getvalue().split())


def test_astigmatism_that_follows_the_heights_is_said():
    direction = np.array([1.0, 0.01, 0.017])
    t = 200.0**2 * np.outer(direction, direction) + np.diag([0.0, 1e-4, 1e-4])
    line = _printed("particle", "particle", t)
    assert "group 1; the heights in the ice" in line
    assert "defocus 200.0 +- 0.5 A" in line and "astigmatism + 2.0 +- 0.5 A" in line
    assert "correlation with the defocus +1.00 / +1.00" in line
    assert "h M^T M" in line


def test_one_parameter_and_independent_ones():
    assert "correlation" not in _printed("particle", "micrograph", np.array([[150.0**2]]))
    line = _printed("particle", "particle", np.diag([150.0**2, 9.0, 4.0]))
    assert "correlation with the defocus +0.00 / +0.00" in line and "h M^T M" not in line
    # astigmatism alone per particle: no heights
    line = _printed("micrograph", "particle", np.array([[9.0, 5.9], [5.9, 4.0]]))
    assert "heights" not in line and "correlation with the astigmatism + +0.98" in line


def _group(names, spread, corr, converged=True):
    return {"optics_group": 1, "defocus": {"particle_deviations": {
        "parameters": names, "spread_A": spread, "spread_se_A": [0.5] * len(names),
        "correlation": corr, "converged": converged, "prior_steps": 4}}}  # fmt: skip


def test_html_report_section_of_the_deviations():
    from cryomag.report.html import _deviations_of, _particle_deviations

    names = ["defocus_A", "astig_plus_A", "astig_cross_A"]
    rank_one = [[1.0, 0.99997, 0.99999], [0.99997, 1.0, 0.99996], [0.99999, 0.99996, 1.0]]
    text = _particle_deviations(_group(names, [201.4, 1.8, 3.2], rank_one))
    assert "the heights in the ice" in text and "201.4 &plusmn; 0.5" in text
    assert "M<sup>T</sup>M" in text and "did not converge" not in text
    assert "astigmatism x" in text and "&amp;" not in text
    independent = _particle_deviations(_group(names, [150.0, 3.0, 2.0], np.eye(3).tolist()))
    assert "M<sup>T</sup>M" not in independent and "<td>0.00</td>" in independent
    one = _particle_deviations(_group(["defocus_A"], [150.0], [[1.0]], converged=False))
    assert "did not converge" in one
    assert _deviations_of({"optics_group": 1}) is None
    assert _deviations_of({"defocus": {"levels": {}}}) is None
