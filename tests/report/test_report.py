"""Tests of ``cryomag report``: content of the page, and the page in a real browser.

The browser test loads the page in headless Chromium (Debian package ``chromium``; skipped
when /usr/bin/chromium is absent). Robust, driver-free approach:

1. a copy of the page gets a small script at the top of <head> that records JavaScript
   errors, console.error calls and failed resource loads (capturing ``error`` events), and
   after ``load`` writes ``{images: [naturalWidth...], errors: [...]}`` into a <pre>;
   ``chromium --headless --dump-dom --virtual-time-budget`` prints the resulting DOM, which
   the test parses;
2. the unmodified page is loaded again with ``--screenshot`` and ``--enable-logging=stderr
   --v=0``: Chromium writes every console message to stderr as ``CONSOLE`` lines, and the
   page has no script, so any such line is a failure. The screenshot is kept for a look.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cryomag.report.html import build_report, load_reconstruction
from cryomag.workflows.estimate import estimate
from cryomag.workflows.reconstruct import reconstruct, write_map
from tests.reconstruction.test_reconstruct import Group, blob_map, make_dataset

runner = CliRunner()
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]

_CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__errors.push(t && t.tagName ? "failed to load " + t.tagName + " " +
    String(t.src || t.href).slice(0, 80) : String(e.message));
}, true);
window.addEventListener("unhandledrejection", function (e) {
  window.__errors.push("unhandled rejection " + String(e.reason));
});
(function () {
  var orig = console.error;
  console.error = function () {
    window.__errors.push("console.error " + Array.prototype.join.call(arguments, " "));
    return orig.apply(console, arguments);
  };
})();
window.addEventListener("load", function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {w: i.naturalWidth, h: i.naturalHeight, complete: i.complete, alt: i.alt};
  });
  var pre = document.createElement("pre");
  pre.id = "__cryomag_check";
  pre.textContent = JSON.stringify({images: imgs, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A real pipeline on a tiny data set: estimate, reconstruct before and after."""
    root = tmp_path_factory.mktemp("report")
    vol = blob_map(32, n_blobs=60, seed=3)
    m = np.array([[1.02, 0.01], [0.01, 0.99]])
    star, _ = make_dataset(root / "data", vol, 2.0, [Group(32, 2.0, 300, m)], snr=1.0)
    write_map(root / "data" / "ref.mrc", vol, 2.0)
    est_dir = root / "data" / "estimate"  # inside the project: image paths resolve
    estimate(star, root / "data" / "ref.mrc", out=est_dir, progress=False)
    before = root / "before"
    after = root / "after"
    reconstruct(star, before, progress=False, command=f"cryomag reconstruct -i {star} -o {before}")
    reconstruct(est_dir / "particles.star", after, progress=False)
    return {"root": root, "estimate": est_dir, "before": before, "after": after}


def test_report_content(run):
    res = build_report(run["estimate"], before=run["before"], after=run["after"])
    page = res.path.read_text()
    assert res.path == run["estimate"] / "report.html"
    # every plot of the estimate folder is embedded, plus the combined FSC plot
    pngs = sorted((run["estimate"] / "plots").glob("*.png"))
    assert len(pngs) >= 3
    assert len(res.images) == len(pngs) + 1
    assert page.count('<img src="data:image/png;base64,') == len(res.images)
    for p in pngs:
        assert f"plots/{p.name}" in page
    assert (run["estimate"] / "report_fsc.png").is_file()
    # per-group results with uncertainties, polar form, options, commands
    results = json.loads((run["estimate"] / "results.json").read_text())
    g = results["groups"][0]
    assert f"{g['M'][0][0]:.5f}&plusmn;{g['M_standard_error'][0][0]:.5f}" in page
    assert f"{g['polar']['major_scale']:.5f}" in page
    assert "pixel size change" in page and "Estimation options" in page
    assert "cryomag reconstruct -i" in page  # recorded command line
    # resolution gain
    rb = load_reconstruction(run["before"])["resolution_A"]
    ra = load_reconstruction(run["after"])["resolution_A"]
    assert res.resolution_before_A == pytest.approx(rb)
    assert res.gain_A == pytest.approx(rb - ra)
    assert f"{rb - ra:+.2f} A" in page
    # self-contained: no external reference of any kind
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<script" not in page


def test_report_of_a_reconstruction_folder_and_errors(run, tmp_path):
    res = build_report(run["after"])
    page = res.path.read_text()
    assert "FSC 0.143" in page and res.gain_A is None
    assert len(res.images) == 2  # report_fsc.png and the folder's fsc.png
    with pytest.raises(FileNotFoundError, match="fsc.json"):
        build_report(run["after"], before=tmp_path)
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "missing")


def test_report_cli(run, tmp_path):
    from cryomag.cli.main import app

    out = tmp_path / "r.html"
    r = runner.invoke(
        app,
        [
            "report",
            str(run["estimate"]),
            "--before",
            str(run["before"]),
            "--after",
            str(run["after"]),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "gain" in r.output and out.is_file()
    r = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "not found" in r.output


def _chromium(args: list[str], profile: Path, timeout: int = 120):
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless browser test needs /usr/bin/chromium (Debian package 'chromium')",
)
def test_report_in_headless_chromium(run, tmp_path):
    res = build_report(run["estimate"], before=run["before"], after=run["after"])
    page = res.path.read_text()
    check = tmp_path / "check.html"
    check.write_text(page.replace("<head>", "<head>" + _CHECK_SCRIPT, 1))
    out = _chromium(
        ["--virtual-time-budget=15000", "--dump-dom", check.as_uri()], tmp_path / "profile1"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r'<pre id="__cryomag_check">(.*?)</pre>', out.stdout, re.S)
    assert m, "the check script did not run: " + out.stdout[-500:]
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errors"] == []
    assert len(result["images"]) == len(res.images)
    for img in result["images"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img

    shot = tmp_path / "report.png"
    out = _chromium(
        [
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,2400",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            res.path.as_uri(),
        ],
        tmp_path / "profile2",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
    assert shot.is_file() and shot.stat().st_size > 20_000
    shutil.copy(shot, run["estimate"] / "report_screenshot.png")
