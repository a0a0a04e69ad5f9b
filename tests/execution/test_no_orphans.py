"""No process of cryomag outlives the command that started it (issue 17).

``cryomag estimate --j 2`` runs two worker processes (forked from the command on Linux,
else a Dask LocalCluster: nannies and workers). The command is run in a subprocess whose
environment carries a unique marker; every process it starts inherits the marker, also
when it is re-parented after its parent ends. After the command returns (normally, after
Ctrl-C, after SIGTERM), no process with the marker may remain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.tiny import tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("orphans") / "data", 40)


def _marked(mark: str) -> list[tuple[int, str]]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("CRYOMAG_TEST_MARK") == mark:
                found.append((p.pid, " ".join(p.cmdline())[:120]))
        except (psutil.Error, OSError):
            continue
    return found


def _start(tiny: Path, out: Path, mark: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "cryomag.cli.main", "estimate",
        "-i", str(tiny / "particles.star"), "--ref", str(tiny / "ref.mrc"), "--out", str(out),
        "--j", "2", "--max-iter", "3", "--chunk-size", "8", "--no-plots",
    ]  # fmt: skip
    env = dict(os.environ, CRYOMAG_TEST_MARK=mark)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _wait_for_workers(proc: subprocess.Popen, mark: str, timeout: float = 60.0, n: int = 3) -> None:
    """Until ``n`` processes run: the command and its two workers (spawned, with a resource
    tracker besides, or forked from the command: the same command line); ``n`` = 2: the
    first worker has just appeared (the cluster is still starting)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.stderr.read()}")
        if len([p for p in _marked(mark) if "resource_tracker" not in p[1]]) >= n:
            return
        time.sleep(0.05 if n > 2 else 0.0)
    pytest.fail("the worker processes did not appear")


def _assert_none_left(mark: str) -> None:
    left = _marked(mark)
    t0 = time.monotonic()
    while left and time.monotonic() - t0 < 2.0:  # a process may still be in its exit
        time.sleep(0.1)
        left = _marked(mark)
    assert left == [], f"processes outlived the command: {left}"


def test_no_worker_outlives_a_finished_run(tiny, tmp_path):
    mark = uuid.uuid4().hex
    proc = _start(tiny, tmp_path / "run", mark)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    _assert_none_left(mark)


@pytest.mark.parametrize(
    "sig, n", [(signal.SIGTERM, 3), (signal.SIGTERM, 2)], ids=["sigterm", "sigterm-at-start"]
)  # Ctrl-C: same path; at start: while the forked workers start (their signals held back)
def test_no_worker_outlives_an_interrupted_run(tiny, tmp_path, sig, n):
    mark = uuid.uuid4().hex
    out = tmp_path / "run"
    proc = _start(tiny, out, mark)
    _wait_for_workers(proc, mark, n=n)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err  # 0: it finished before the signal arrived
    if proc.returncode == 130:
        assert "interrupted" in err
    _assert_none_left(mark)
    assert not (out / ".cryomag.lock").exists()  # the folder was released
