"""RELION External job mode (CONVENTIONS_VERIFIED 10; RELION 5.0.1 src/pipeline_jobs.cpp,
pipeliner.cpp): the job folder a pipeline can read, run from the project folder with
relative paths as RELION runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import starfile

from cryomag.cli import relion_external as rx
from cryomag.io import read_star
from cryomag.io.mrc import parse_image_names
from cryomag.simulation.simulator import simulate_dataset
from tests.workflows.test_estimate import small_config

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A RELION-like project folder: Import/job001/ holds particles.star, stacks, ref.mrc."""
    root = tmp_path_factory.mktemp("project")
    simulate_dataset(small_config(n=240, box=48, cs=False), root / "Import" / "job001",
                     progress=False)  # fmt: skip
    return root


def _args(job: str, *extra: str) -> list[str]:
    return [
        "--o", f"External/{job}/",
        "--in_parts", "Import/job001/particles.star",
        "--in_3dref", "Import/job001/ref.mrc",
        *extra,
        "--j", "1",
    ]  # fmt: skip


def _markers(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("RELION_JOB_")}


def test_job_folder_readable_by_the_pipeline(project, monkeypatch):
    monkeypatch.chdir(project)
    code = rx.run_external(_args("job002", "--fit", "scale,aniso", "--no_plots", "yes"),
                           record_as="cryomag_relion_external")  # fmt: skip
    job = project / "External" / "job002"
    assert code == 0
    assert _markers(job) == {rx.SUCCESS}
    nodes = starfile.read(job / rx.NODES_FILE, always_dict=True)
    assert list(nodes) == ["output_nodes"]
    table = nodes["output_nodes"]
    assert list(table.columns) == ["rlnPipeLineNodeName", "rlnPipeLineNodeTypeLabel"]
    assert table.to_dict("records") == [
        {
            "rlnPipeLineNodeName": "External/job002/particles.star",
            "rlnPipeLineNodeTypeLabel": "ParticleGroupMetadata.star.relion",
        }
    ]
    # node names and image names resolve from the project folder, as RELION reads them
    assert Path(table["rlnPipeLineNodeName"][0]).is_file()
    ps = read_star(job / "particles.star")
    _, files = parse_image_names(ps.particles["rlnImageName"])
    assert all(not os.path.isabs(f) and Path(f).is_file() for f in set(files)), set(files)
    assert all(f.startswith("Import/job001/") for f in set(files))
    manifest = json.loads((job / ".cryomag-manifest.json").read_text())
    assert manifest["command_line"].startswith("cryomag_relion_external --o External/job002/")
    assert json.loads((job / "results.json").read_text())["verdict"] != "failed"


def test_plots_pdf_is_a_logfile_node_and_a_rerun_replaces_markers(project, monkeypatch):
    monkeypatch.chdir(project)
    job = project / "External" / "job003"
    job.mkdir(parents=True)
    (job / rx.FAILURE).touch()  # an earlier failed run; RELION's own note.txt stays
    (job / "note.txt").write_text("RELION")
    assert rx.run_external(_args("job003", "--fit", "scale")) == 0
    assert _markers(job) == {rx.SUCCESS}
    assert (job / "note.txt").read_text() == "RELION"
    table = starfile.read(job / rx.NODES_FILE, always_dict=True)["output_nodes"]
    assert dict(zip(table.iloc[:, 0], table.iloc[:, 1], strict=True)) == {
        "External/job003/particles.star": "ParticleGroupMetadata.star.relion",
        "External/job003/plots/estimate.pdf": "LogFile.pdf.relion",
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--frobnicate", "3"], "--frobnicate: unknown parameter label; expected one of"),
        (["--in_mics", "CtfFind/job003/micrographs_ctf.star"], "cryomag does not use mics"),
        (["--cs", "maybe"], "--cs 'maybe': expected yes or no"),
        (["--halfmaps", "one.mrc"], "expected two half-map files"),
        (["--max_iter", "0"], "--max-iter 0: expected an integer >= 1"),
    ],
)
def test_bad_arguments_fail_the_job_with_a_clear_error(project, monkeypatch, capsys, extra,
                                                       message):  # fmt: skip
    monkeypatch.chdir(project)
    job = project / "External" / "bad"
    assert rx.run_external(_args("bad", *extra)) == 1
    assert message in capsys.readouterr().err
    assert _markers(job) == {rx.FAILURE}
    assert not (job / rx.NODES_FILE).exists()


def test_missing_input_file_named_relative_to_the_project(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["--o", "External/job004/", "--in_parts", "Import/job001/nothere.star",
            "--in_3dref", "Import/job001/ref.mrc", "--j", "1"]  # fmt: skip
    assert rx.run_external(args) == 1
    assert "Import/job001/nothere.star: file not found" in capsys.readouterr().err
    assert _markers(project / "External" / "job004") == {rx.FAILURE}


def test_failed_fit_marks_the_job_failed(project, monkeypatch):
    """estimate's exit status 3 (a fit failed its quality checks) is a failed job."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(rx, "_run_estimate", lambda args: 3)
    assert rx.run_external(_args("job005")) == 3
    job = project / "External" / "job005"
    assert _markers(job) == {rx.FAILURE}
    assert not (job / rx.NODES_FILE).exists()


def test_labels_map_onto_estimate_options():
    parsed = rx.parse_external_args(
        ["--o", "External/job9/", "--in_parts", "p.star", "--halfmaps", "a.mrc,b.mrc",
         "--in_mask", "m.mrc", "--defocus", "micrograph", "--exact-gradient", "no",
         "--no_plots", "", "--cs", "no", "--high_res", "4.5", "--j", "4"]  # fmt: skip
    )
    assert parsed.out == Path("External/job9/")
    assert parsed.estimate_args == [
        "--out", "External/job9/", "--particles", "p.star", "--half-maps", "a.mrc", "b.mrc",
        "--mask", "m.mrc", "--defocus", "micrograph", "--image-gradient", "--no-plots",
        "--high-res", "4.5", "--j", "4", "--image-paths", "cwd",
    ]  # fmt: skip
    # every label's option exists in `cryomag estimate`
    import typer

    from cryomag.cli.main import app

    command = typer.main.get_command(app).commands["estimate"]
    flags = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for option, _kind in rx.LABELS.values():
        for o in option if isinstance(option, tuple) else (option,):
            assert o in flags, o
    with pytest.raises(rx.ExternalArgsError, match="--in_3dref: missing"):
        rx.parse_external_args(["--o", "x/", "--in_parts", "p.star"])
    with pytest.raises(rx.ExternalArgsError, match="--o: missing"):
        rx.parse_external_args(["--in_parts", "p.star", "--in_3dref", "r.mrc"])


def test_abort_now_present_at_start_aborts(project, monkeypatch):
    monkeypatch.chdir(project)
    job = project / "External" / "job006"
    job.mkdir(parents=True)
    (job / rx.ABORT_NOW).touch()
    assert rx.run_external(_args("job006")) == 130
    assert _markers(job) == {rx.ABORTED, rx.ABORT_NOW}
    assert not (job / "particles.star").exists()


def test_abort_now_during_the_run(project):
    """The GUI's Abort (RELION_JOB_ABORT_NOW created while the job runs) stops the run and
    leaves RELION_JOB_EXIT_ABORTED, the folder unlocked; run as RELION runs it: a process
    started in the project folder."""
    job = project / "External" / "job007"
    env = {**os.environ, "PYTHONPATH": str(SRC), "CRYOMAG_PLAIN": "1"}
    args = _args("job007", "--fit", "scale,aniso,defocus", "--max_iter", "50", "--tol", "0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryomag", "relion-external", *args],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (job / "cryomag.log").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (job / rx.ABORT_NOW).touch()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert _markers(job) == {rx.ABORTED, rx.ABORT_NOW}, out
    assert not (job / ".cryomag.lock").exists()
    assert not (job / rx.NODES_FILE).exists()
