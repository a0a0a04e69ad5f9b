"""Issue 15, output hygiene (cryomag.io.outdir): no output folder that is an input folder, a
lock against concurrent runs, a reused folder cleaned of the previous run's outputs, and no
command that writes over a file it reads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cryomag.cli.main import app
from cryomag.io.outdir import (
    LOCK_NAME,
    MANIFEST_NAME,
    OutputFolderError,
    output_folder,
    read_manifest,
)
from cryomag.model.validation import DataWarning
from tests.tiny import tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_out") / "data", 20)


def _estimate(tiny, out, *extra):
    return CliRunner().invoke(
        app,
        ["estimate", "-i", str(tiny / "particles.star"), "--ref", str(tiny / "ref.mrc"),
         "--out", str(out), "--j", "1", "--max-iter", "2", "--tol", "0", "-q", *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "est"
    r = _estimate(tiny, out, "--fit", "scale,aniso,micrograph")
    assert r.exit_code == 0, r.output
    return out


# ---------------------------------------------------------------- input folders
def _snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "command",
    ["estimate", "reconstruct", "apply", "merge", "refit", "inspect", "simulate"],
)
def test_out_that_is_an_input_folder_is_refused_before_any_work(tiny, run, tmp_path, command):
    data = tiny
    args = {
        "estimate": ["estimate", "-i", str(data / "particles.star"), "--ref",
                     str(data / "ref.mrc"), "--out", str(data), "--j", "1", "-q"],
        "reconstruct": ["reconstruct", "-i", str(data / "particles.star"), "--out",
                        str(data / "Particles"), "-q"],
        "apply": ["apply", str(run), "--out", str(run), "-q"],
        "merge": ["merge", str(data / "particles.star"), "--no-estimate", "--out",
                  str(data.parent), "-q"],
        "refit": ["refit", str(run), "--out", str(run / "stats"), "--no-plots"],
        "inspect": ["inspect", str(data / "particles.star"), "--out", str(data)],
        "simulate": ["simulate", "--out", str(data), "--map", str(data / "ref.mrc"),
                     "--force", "--n-particles", "4", "--quiet"],
    }[command]  # fmt: skip
    before = {**_snapshot(data), **_snapshot(run)}
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0, r.output
    assert "error" in r.output and "Traceback" not in r.output
    assert "input" in r.output, r.output
    after = {**_snapshot(data), **_snapshot(run)}
    assert after == before  # nothing written: no lock, no log, no .chunks


def test_estimate_into_its_input_folder_refused_before_the_fit(tiny, tmp_path):
    """Until issue 15 this was refused only after the whole fit, leaving .chunks and a log."""
    from cryomag.io.outdir import check_out_not_input

    with pytest.raises(OutputFolderError, match="is the folder of the input"):
        check_out_not_input(tiny, [tiny / "particles.star"])
    with pytest.raises(OutputFolderError, match="holds the input"):
        check_out_not_input(tiny.parent, [tiny / "particles.star"])
    assert not (tiny / ".chunks").exists() and not (tiny / "cryomag.log").exists()


def test_image_stacks_are_inputs(tiny, tmp_path):
    import cryomag
    from cryomag.io import read_star

    ps = read_star(tiny / "particles.star")
    with pytest.raises(OutputFolderError, match=r"Particles.*\.mrcs"):
        with output_folder(tiny / "Particles", "test", particles=ps):
            pass
    assert cryomag  # (imported for the API)


# ------------------------------------------------------------------------ report
def test_report_never_writes_over_a_run_file(run):
    before = (run / "results.json").read_bytes()
    for target in (run / "results.json", run / "cryomag.log", run / "particles.star"):
        r = CliRunner().invoke(app, ["report", str(run), "--out", str(target)])
        assert r.exit_code == 1, r.output
        assert "error:" in r.output and "choose" in r.output
    assert (run / "results.json").read_bytes() == before
    r = CliRunner().invoke(app, ["report", str(run), "--out", str(run / "stats")])
    assert r.exit_code == 1 and "is a folder" in r.output
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["report", str(run)])  # an earlier report is replaced
    assert r.exit_code == 0, r.output


def test_report_embeds_only_what_the_run_wrote(tiny, tmp_path):
    out = tmp_path / "est"
    r = _estimate(tiny, out, "--fit", "scale,aniso,micrograph")
    assert r.exit_code == 0, r.output
    assert (out / "plots" / "local_micrograph.png").exists() or list(
        (out / "plots").glob("*micrograph*")
    )
    first = sorted(p.name for p in (out / "plots").glob("*.png"))
    # a foreign old plot dropped into plots/ is not embedded
    (out / "plots" / "zz_old.png").write_bytes((out / "plots" / first[0]).read_bytes())
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    assert "zz_old.png" not in page and "1 older plot(s)" in page
    assert f"plots/{first[0]}" in page


# ---------------------------------------------------------------- reused --out
def test_reused_out_is_cleaned_of_the_previous_run(tiny, tmp_path):
    out = tmp_path / "est"
    r = _estimate(tiny, out, "--fit", "scale,aniso,micrograph")
    assert r.exit_code == 0, r.output
    (out / "notes.txt").write_text("mine")  # a foreign file
    (out / "plots" / "mine.png").write_bytes(b"x")
    r = CliRunner().invoke(app, ["report", str(out)])
    assert r.exit_code == 0
    assert "report.html" in read_manifest(out)["files"]
    r = _estimate(tiny, out, "--no-plots")  # the second run writes no plots
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine"  # foreign files are left alone
    assert {p.name for p in (out / "plots").glob("*.png")} == {"mine.png"}
    assert not (out / "report.html").exists()  # the old report is gone with its run
    log = (out / "cryomag.log").read_text()
    assert log.count("estimate: 20 particles") == 1  # a fresh log
    man = read_manifest(out)
    assert man["complete"] and man["command"] == "estimate"
    assert "results.json" in man["files"] and "notes.txt" not in man["files"]
    assert not (out / LOCK_NAME).exists()


def test_resume_keeps_the_previous_outputs(tmp_path):
    out = tmp_path / "o"
    with output_folder(out, "estimate") as o:
        (o / "results.json").write_text("{}")
        (o / ".chunks").mkdir()
        (o / ".chunks" / "state.json").write_text("{}")
    with output_folder(out, "estimate", resume=True):
        assert (out / "results.json").exists() and (out / ".chunks" / "state.json").exists()
    assert "results.json" in read_manifest(out)["files"]
    with output_folder(out, "estimate"):
        assert not (out / "results.json").exists()
        assert (out / ".chunks" / "state.json").exists()  # estimate's own business


def test_folder_of_an_older_version_and_of_a_killed_run(tmp_path):
    old = tmp_path / "old"
    (old / "plots").mkdir(parents=True)
    for name in ("cryomag.log", "results.json", "plots/a.png", "keep.txt"):
        (old / name).write_text("x")
    with output_folder(old, "estimate"):
        names = sorted(p.name for p in old.iterdir())
        assert names == sorted([LOCK_NAME, MANIFEST_NAME, "keep.txt"])
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "foreign.txt").write_text("x")
    os.utime(killed / "foreign.txt", (time.time() - 100, time.time() - 100))
    (killed / MANIFEST_NAME).write_text(
        json.dumps({"command": "estimate", "started": time.time() - 10, "complete": False,
                    "files": []})
    )  # fmt: skip
    (killed / "particles.star").write_text("half written")
    with output_folder(killed, "estimate"):
        assert not (killed / "particles.star").exists()
        assert (killed / "foreign.txt").exists()


# --------------------------------------------------------------------------- lock
def test_concurrent_run_fails_at_once_naming_the_lock(tiny, tmp_path):
    out = tmp_path / "est"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(
            json.dumps({"pid": other.pid, "host": socket.gethostname(),
                        "command": "estimate", "started": "now"})
        )  # fmt: skip
        t0 = time.monotonic()
        r = _estimate(tiny, out)
        assert time.monotonic() - t0 < 30
        assert r.exit_code == 1, r.output
        assert "another cryomag run is writing into this folder" in r.output
        assert LOCK_NAME in r.output and f"pid {other.pid}" in r.output
        assert not (out / "particles.star").exists() and not (out / "cryomag.log").exists()
    finally:
        other.kill()
        other.wait()
    # the lock of a process that is gone is taken over, with a warning
    with pytest.warns(DataWarning, match="taking over the stale lock"):
        with output_folder(out, "estimate") as o:
            info = json.loads((o / LOCK_NAME).read_text())
            assert info["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_lock_is_released_after_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with output_folder(tmp_path / "o", "x"):
            raise RuntimeError("boom")
    assert not (tmp_path / "o" / LOCK_NAME).exists()
    with output_folder(tmp_path / "o", "x"):
        with pytest.raises(OutputFolderError, match="another cryomag run"):
            with output_folder(tmp_path / "o", "y"):
                pass


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputFolderError, match="exists and is not a folder"):
        with output_folder(tmp_path / "f", "x"):
            pass
    assert np.isfinite(1.0)
