"""The console script's exit (cryomag.cli.main.main): the exit status and the exit handlers
as with a normal exit, the interpreter's teardown skipped only where nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PRELUDE = """
import atexit, sys, threading, time
from pathlib import Path
mark = Path(sys.argv[1])
atexit.register(lambda: mark.with_suffix(".atexit").write_text("ran"))
atexit.register(lambda: print("[atexit]", end=""))  # unflushed until the exit's flush
"""


def _run(tmp_path: Path, body: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(PRELUDE + body)
    # block-buffered output, as a pipeline's (PYTHONUNBUFFERED would hide a missing flush)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, str(script), str(tmp_path / "mark"), *args],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


def test_help_exits_0_with_handlers_run_and_output_flushed(tmp_path):
    body = """
sys.argv = ["cryomag", "--help"]
print("before", end="")  # unflushed: must reach the pipe
from cryomag.cli.main import main
main()
print("never")
"""
    r = _run(tmp_path, body)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("before") and "Usage" in r.stdout and "never" not in r.stdout
    assert r.stdout.endswith("[atexit]")
    assert (tmp_path / "mark.atexit").read_text() == "ran"


@pytest.mark.parametrize("argv", [["estimate", "-i", "missing.star", "--ref", "missing.mrc",
                                   "-o", "out"], ["no-such-command"]])  # fmt: skip
def test_failures_keep_their_exit_status(tmp_path, argv):
    """The same status, and the same error text, as the command without the fast exit."""
    outs = {}
    for entry in ("main", "app"):
        body = f"""
sys.argv = ["cryomag", *{argv!r}]
from cryomag.cli.main import {entry}
{entry}()
"""
        outs[entry] = _run(tmp_path, body)
    assert outs["main"].returncode == outs["app"].returncode != 0
    assert outs["main"].stderr == outs["app"].stderr
    assert (tmp_path / "mark.atexit").read_text() == "ran"


def test_a_running_thread_is_waited_for(tmp_path):
    """A non-daemon thread still running: the normal exit, which waits for it."""
    body = """
def late():
    time.sleep(0.5)
    mark.write_text("thread done")
threading.Thread(target=late).start()
sys.argv = ["cryomag", "--help"]
from cryomag.cli.main import main
main()
"""
    r = _run(tmp_path, body)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mark").read_text() == "thread done"
