"""``cryomag estimate --cluster slurm`` against a real SLURM (issue 7).

The fixture brings up a single-node SLURM on this machine: Debian's slurm-wlm and munge
(``apt-get install slurm-wlm munge``; .ci/run installs them), a private slurm.conf (the
machine's host name, CPUs=2, RealMemory from ``slurmd -C``) in a temporary folder, munged,
slurmctld and slurmd; it waits until ``sinfo`` shows the node idle and stops what it started
at the end. A SLURM that already answers (``SLURM_CONF`` or /etc/slurm/slurm.conf) is used
as it is. The test skips only when ``sbatch`` is not installed (or, not being root, it can
neither find nor start a SLURM).

The run submits a real batch job (dask-jobqueue's SLURMCluster; the job runs this Python)
whose two single-threaded workers compute the chunks; the statistics must equal a local run's
to 1e-10.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cryomag.simulation.config import OpticsGroupConfig, SimulationConfig
from cryomag.simulation.simulator import simulate_dataset
from cryomag.workflows.estimate import estimate

SLURM_CONF = """\
ClusterName=cryomag-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdTimeout=60
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _sh(*cmd: str, timeout: float = 30, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _node_idle(env=None) -> bool:
    try:
        r = _sh("sinfo", "-h", "-o", "%T", timeout=10, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "idle" in r.stdout


def _start_munge(root: Path) -> list[int]:
    """Start munged unless a credential round trip already works; its pid if started."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        enc = _sh("munge", "-n", timeout=10)
        if (
            enc.returncode == 0
            and subprocess.run(
                ["unmunge"], input=enc.stdout, capture_output=True, text=True, timeout=10
            ).returncode
            == 0
        ):
            return []
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    r = _sh("runuser", "-u", "munge", "--", "munged")
    assert r.returncode == 0, f"munged failed to start: {r.stderr}"
    pidfile = run / "munged.pid"
    for _ in range(50):
        if pidfile.exists() and pidfile.read_text().strip():
            return [int(pidfile.read_text().split()[0])]
        time.sleep(0.1)
    return []


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A working single-node SLURM; yields the environment for its clients."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: install SLURM (apt-get install slurm-wlm munge)")
    if _node_idle():
        yield {"env": dict(os.environ), "logs": None}
        return
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("no running SLURM answers, and starting one needs root and slurmctld")
    root = tmp_path_factory.mktemp("slurm")
    os.chmod(root, 0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    info = _sh("slurmd", "-C").stdout
    host = re.search(r"NodeName=(\S+)", info).group(1)
    memory = int(re.search(r"RealMemory=(\d+)", info).group(1))
    cpus = min(2, int(re.search(r"CPUs=(\d+)", info).group(1)))
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host, root=root, cpus=cpus, memory=memory, ctld_port=6817, slurmd_port=6818
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started = _start_munge(root)
    for daemon in ("slurmctld", "slurmd"):
        r = _sh(daemon, "-f", str(conf), env=env)
        assert r.returncode == 0, f"{daemon} failed to start: {r.stderr}"
        for _ in range(50):
            pid = root / f"{daemon}.pid"
            if pid.exists() and pid.read_text().strip():
                started.append(int(pid.read_text().split()[0]))
                break
            time.sleep(0.1)
    t0 = time.monotonic()
    while not _node_idle(env):
        if time.monotonic() - t0 > 60:
            logs = "\n".join(p.read_text()[-2000:] for p in root.glob("*.log") if p.exists())
            pytest.fail(f"SLURM node not idle after 60 s:\n{logs}")
        time.sleep(0.5)
    yield {"env": env, "logs": root}
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        _sh("scancel", "--user", "root", env=env)
    for pid in reversed(started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    cfg = SimulationConfig(seed=5)
    cfg.optics_groups = [
        OpticsGroupConfig(
            pixel_size_A=2.0,
            aniso=[1.01, 0.99, 30.0],
            box=48,
            n_particles=160,
            particles_per_micrograph=20,
        )
    ]
    cfg.noise.snr = 0.3
    cfg.phantom.diameter_A, cfg.phantom.n_atoms = 60.0, 800
    cfg.render.n_workers = 1
    folder = tmp_path_factory.mktemp("slurm_sim")
    simulate_dataset(cfg, folder, progress=False)
    return folder


def _diagnostics(slurm: dict, out: Path) -> str:
    """Queue, node state and log tails, for a failure message."""
    parts = []
    for cmd in (("squeue",), ("sinfo", "-N", "-l")):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            parts.append(_sh(*cmd, timeout=10, env=slurm["env"]).stdout)
    logs = list((out / "jobs").glob("*")) if (out / "jobs").is_dir() else []
    if slurm["logs"] is not None:
        logs += sorted(Path(slurm["logs"]).glob("*.log"))
    for p in logs:
        parts.append(f"--- {p}\n{p.read_text()[-1500:]}")
    return "\n".join(parts)


def test_estimate_on_slurm_matches_the_local_run(slurm, data, tmp_path):
    out = tmp_path / "run"
    opts = ["--fit", "scale,aniso", "--max-iter", "2", "--tol", "0", "--chunk-size", "20"]
    cmd = [
        sys.executable,
        "-m",
        "cryomag.cli.main",
        "estimate",
        "-i",
        str(data / "particles.star"),
        "--ref",
        str(data / "ref.mrc"),
        "-o",
        str(out),
        *opts,
        "--no-plots",
        "-q",
        "--cluster",
        "slurm",
        "--jobs",
        "1",
        "--cores",
        "2",
        "--memory",
        "2GB",
        "--walltime",
        "00:10:00",
    ]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=slurm["env"])
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the SLURM run did not finish in 600 s\n{_diagnostics(slurm, out)}\n{exc}")
    assert r.returncode == 0, f"{r.stderr[-4000:]}\n{_diagnostics(slurm, out)}"
    log = (out / "cryomag.log").read_text()
    assert "#SBATCH" in log and "dask SLURM" in log
    job_logs = list((out / "jobs").glob("*"))
    assert job_logs, "the SLURM job wrote no output: it did not run"
    assert any("Starting Worker" in p.read_text() for p in job_logs)

    local = estimate(
        data / "particles.star",
        data / "ref.mrc",
        None,
        progress=False,
        fit=("scale", "aniso"),
        max_iter=2,
        tol=0.0,
        chunk_size=20,
        nthreads=1,
    )
    got = json.loads((out / "results.json").read_text())
    np.testing.assert_allclose(got["groups"][0]["M"], local.groups[0].mag, rtol=1e-10, atol=0)
    with np.load(out / "stats" / "group_001.npz") as z:
        for name, x in local.stats[1].as_arrays().items():
            np.testing.assert_allclose(z[name], x, rtol=1e-10, atol=0, err_msg=name)
